//! Connecting to one Docker Engine: over its Unix socket, plain TCP, or TLS (rustls with ring;
//! trusting only the engine's own CA, never the system's roots, as the docker CLI does with
//! `--tlscacert`). The TLS files are read when the daemon prepares, so a missing or bad one
//! stops berth (exit 64) before the kernel is touched, naming the field.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use bollard::{API_DEFAULT_VERSION, BollardRequest, Docker};
use rustls::{
    ClientConfig, RootCertStore,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};

use crate::config::{ConfigError, Endpoint, Engine, Tls};

/// Seconds a request (listing, inspect, the event stream's head) may take.
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// Where an engine's containers are reached, as found when its watcher connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// The address its published ports are reached at (None: a name that did not resolve to
    /// IPv4; its containers cannot be served through published ports).
    pub address: Option<Ipv4Addr>,
    /// This host's engine: its containers are reached directly at their own addresses.
    pub local: bool,
}

/// An engine ready to be connected to, again and again (the watcher reconnects).
#[derive(Clone)]
pub struct EngineClient {
    pub engine: Engine,
    tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for EngineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineClient")
            .field("engine", &self.engine)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl EngineClient {
    /// Reads the engine's TLS files (if any) into a client configuration.
    pub fn new(engine: Engine) -> Result<Self, ConfigError> {
        let tls = match &engine.tls {
            Some(t) => Some(Arc::new(tls_config(&engine, t)?)),
            None => None,
        };
        Ok(Self { engine, tls })
    }

    pub fn name(&self) -> &str {
        &self.engine.name
    }

    /// A client for the engine (no request is made yet).
    pub fn connect(&self) -> Result<Docker, String> {
        let e = &self.engine;
        match (&e.endpoint, &self.tls) {
            (Endpoint::Unix(path), _) => Docker::connect_with_unix(
                &path.display().to_string(),
                REQUEST_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            ),
            (Endpoint::Tcp { host, port }, None) => Docker::connect_with_http(
                &format!("tcp://{host}:{port}"),
                REQUEST_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            ),
            (Endpoint::Tcp { host, port }, Some(cfg)) => {
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((**cfg).clone())
                    .https_only()
                    .enable_http1()
                    .build();
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                // A handshake per request would be paid every second by the liveness ping.
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https);
                Docker::connect_with_custom_transport(
                    move |req: BollardRequest| {
                        let client = client.clone();
                        async move {
                            client
                                .request(req)
                                .await
                                .map_err(bollard::errors::Error::from)
                        }
                    },
                    Some(format!("https://{host}:{port}")),
                    REQUEST_TIMEOUT_SECS,
                    API_DEFAULT_VERSION,
                )
            }
        }
        .map_err(|err| format!("connecting to {}: {err}", e.endpoint))
    }

    /// Where its containers are reached: a Unix socket is this host; a TCP engine is at its
    /// `address` (or its endpoint's host, resolved now), and is this host when that address is
    /// one of `local_addrs` or loopback.
    pub async fn reach(&self, local_addrs: &[Ipv4Addr]) -> Reach {
        let e = &self.engine;
        let address = match (&e.endpoint, e.address) {
            (Endpoint::Unix(_), _) => None,
            (_, Some(a)) => Some(a),
            (Endpoint::Tcp { host, port }, None) => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .ok()
                .and_then(|mut addrs| {
                    addrs.find_map(|a| match a.ip() {
                        std::net::IpAddr::V4(v4) => Some(v4),
                        std::net::IpAddr::V6(_) => None,
                    })
                }),
        };
        let local = match (&e.endpoint, address) {
            (Endpoint::Unix(_), _) => true,
            (_, Some(a)) => a.is_loopback() || local_addrs.contains(&a),
            (_, None) => false,
        };
        Reach { address, local }
    }
}

fn read_certs(
    engine: &Engine,
    what: &str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let field = engine.field(what);
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError {
            field: field.clone(),
            message: format!("{}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(ConfigError {
            field,
            message: format!("{}: no PEM certificate in it", path.display()),
        });
    }
    Ok(certs)
}

/// The rustls configuration of `tls`: only the engine's CA is trusted (or nothing is checked,
/// with `verify` off), and berth's client certificate is presented when given.
fn tls_config(engine: &Engine, tls: &Tls) -> Result<ClientConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let fail = |what: &str, message: String| ConfigError {
        field: engine.field(what),
        message,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("endpoint", format!("TLS: {e}")))?;
    let builder = match (&tls.ca, tls.verify) {
        (Some(ca), true) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(engine, "tls_ca", ca)? {
                roots
                    .add(c)
                    .map_err(|e| fail("tls_ca", format!("{}: {e}", ca.display())))?;
            }
            builder.with_root_certificates(roots)
        }
        (None, true) => {
            return Err(fail(
                "tls_ca",
                "verification is on: the CA that signed the engine's certificate is needed".into(),
            ));
        }
        (_, false) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
    };
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(engine, "tls_cert", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| fail("tls_key", format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|e| fail("tls_key", format!("{}: {e}", key.display())))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `tls_verify = false`: any certificate is taken (the handshake's signatures are still
/// checked, so the session is encrypted to whoever holds that certificate's key).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_engine(tls: Option<Tls>) -> Engine {
        Engine {
            name: "c".into(),
            endpoint: Endpoint::Tcp {
                host: "10.0.0.3".into(),
                port: 2376,
            },
            address: Some(Ipv4Addr::new(10, 0, 0, 3)),
            tls,
            origin: "docker.engine[2]".into(),
        }
    }

    #[test]
    fn unreadable_or_bad_tls_files_name_their_field() {
        let dir = std::env::temp_dir().join(format!("berth-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = |ca: &str| Tls {
            ca: Some(dir.join(ca)),
            cert: None,
            key: None,
            verify: true,
        };
        let e = EngineClient::new(tcp_engine(Some(tls("missing.pem")))).unwrap_err();
        assert_eq!(e.field, "docker.engine[2].tls_ca");
        assert!(e.message.contains("missing.pem"), "{e}");
        std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
        let e = EngineClient::new(tcp_engine(Some(tls("junk.pem")))).unwrap_err();
        assert_eq!(e.field, "docker.engine[2].tls_ca");
        assert!(e.message.contains("no PEM certificate"), "{e}");
        // Without verification nothing needs to be read.
        let unverified = Tls {
            ca: None,
            cert: None,
            key: None,
            verify: false,
        };
        assert!(EngineClient::new(tcp_engine(Some(unverified))).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_unix_socket_is_this_host_and_a_tcp_engine_is_where_its_address_is() {
        let unix = EngineClient::new(Engine {
            name: "a".into(),
            endpoint: Endpoint::Unix("/run/d.sock".into()),
            address: None,
            tls: None,
            origin: "docker.engine[0]".into(),
        })
        .unwrap();
        assert_eq!(
            unix.reach(&[]).await,
            Reach {
                address: None,
                local: true
            }
        );
        let remote = EngineClient::new(tcp_engine(None)).unwrap();
        let here = [Ipv4Addr::new(10, 0, 0, 3)];
        assert!(!remote.reach(&[]).await.local);
        assert!(remote.reach(&here).await.local);
        let mut by_name = tcp_engine(None);
        by_name.endpoint = Endpoint::Tcp {
            host: "localhost".into(),
            port: 2375,
        };
        by_name.address = None;
        let r = EngineClient::new(by_name).unwrap().reach(&[]).await;
        assert_eq!(r.address, Some(Ipv4Addr::LOCALHOST));
        assert!(r.local);
    }
}
