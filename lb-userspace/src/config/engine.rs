//! The Docker Engines berth watches: `[[docker.engine]]` entries, the one-engine shorthand
//! `[docker] socket`, and, when neither is given, the docker CLI's environment (`DOCKER_HOST`,
//! `DOCKER_TLS_VERIFY`, `DOCKER_TLS`, `DOCKER_CERT_PATH`). Pure: the environment is a function
//! handed in, and the TLS files are only named here (they are read when the daemon prepares).
//!
//! ```toml
//! [[docker.engine]]
//! name = "a"
//! endpoint = "unix:///var/run/docker.sock"   # this host
//! [[docker.engine]]
//! name = "b"
//! endpoint = "tcp://10.0.0.12:2375"
//! [[docker.engine]]
//! name = "c"
//! endpoint = "tcp://docker-c.internal:2376"
//! address = "10.0.0.13"                      # where its published ports are reached
//! tls_ca = "/etc/berth/c/ca.pem"
//! tls_cert = "/etc/berth/c/cert.pem"
//! tls_key = "/etc/berth/c/key.pem"
//! ```

use std::{fmt, net::Ipv4Addr, path::PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// The name of the one engine of the shorthand forms (`[docker] socket`, `DOCKER_HOST`, the
/// default socket).
pub const DEFAULT_ENGINE: &str = "default";

/// Docker's own default socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The port Docker's CLI assumes for `tcp://HOST` without one (2376 with TLS).
const DOCKER_TCP_PORT: u16 = 2375;
const DOCKER_TLS_PORT: u16 = 2376;

/// One `[[docker.engine]]` entry as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// How the engine is named in logs, `berth status`, metrics and `docker.engines` selectors.
    pub name: String,
    /// As Docker spells it: `unix:///var/run/docker.sock` or `tcp://HOST:PORT`.
    pub endpoint: String,
    /// The IPv4 address at which this engine's published ports are reached (default: the
    /// endpoint's host, resolved when the watcher connects if it is a name).
    pub address: Option<String>,
    /// PEM file of the CA that signed the engine's certificate (TLS; needed to verify it).
    pub tls_ca: Option<PathBuf>,
    /// PEM files of berth's client certificate and key, for an engine run with `--tlsverify`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Verify the engine's certificate against `tls_ca` and the endpoint's host (default: true
    /// when TLS is on). `false` is the CLI's `--tls` without `--tlsverify`.
    pub tls_verify: Option<bool>,
}

/// Where an engine's API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket: always this host's engine.
    Unix(PathBuf),
    /// TCP, `host` an IPv4 literal or a name.
    Tcp { host: String, port: u16 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// TLS towards an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Verify the engine's certificate (against `ca` only, and the endpoint's host).
    pub verify: bool,
}

/// An engine to watch, resolved from the config or the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub name: String,
    pub endpoint: Endpoint,
    /// Where published ports are reached, when known without a DNS lookup.
    pub address: Option<Ipv4Addr>,
    pub tls: Option<Tls>,
    /// Where it was configured (`docker.engine[1]`, `docker.socket`, `DOCKER_HOST`), for the
    /// errors found when its TLS files are read.
    pub origin: String,
}

impl Engine {
    /// The field an error about `what` (`tls_ca`, ...) names.
    pub fn field(&self, what: &str) -> String {
        match self.origin.as_str() {
            "DOCKER_HOST" => match what {
                "tls_ca" | "tls_cert" | "tls_key" => "DOCKER_CERT_PATH".to_owned(),
                _ => "DOCKER_HOST".to_owned(),
            },
            o => format!("{o}.{what}"),
        }
    }
}

/// Whether `name` may name an engine (it appears in logs, metrics labels and selectors).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Parses `unix:///path` or `tcp://HOST[:PORT]` (`default_port` when the port is left out;
/// None: it is required).
fn parse_endpoint(
    text: &str,
    default_port: Option<u16>,
    field: &str,
) -> Result<Endpoint, ConfigError> {
    let bad = |why: &str| ConfigError::new(field, format!("{text:?}: {why}"));
    if let Some(path) = text.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(bad("a unix endpoint names an absolute path (unix:///path)"));
        }
        return Ok(Endpoint::Unix(PathBuf::from(path)));
    }
    let Some(rest) = text.strip_prefix("tcp://") else {
        return Err(bad(
            "must be unix:///PATH or tcp://HOST:PORT (ssh:// and others are not supported)",
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.starts_with('[') {
        return Err(bad(
            "IPv6 endpoints are not supported (berth balances IPv4)",
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h, p),
            _ => return Err(bad("the port must be 1-65535")),
        },
        None => match default_port {
            Some(p) => (rest, p),
            None => return Err(bad("name the port: tcp://HOST:PORT")),
        },
    };
    if host.is_empty()
        || host.len() > 253
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
    {
        return Err(bad("the host must be an IPv4 address or a DNS name"));
    }
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// A usable unicast IPv4 address, for `field`.
fn parse_address(text: &str, field: &str) -> Result<Ipv4Addr, ConfigError> {
    match text.parse::<Ipv4Addr>() {
        Ok(a) if !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()) => Ok(a),
        _ => Err(ConfigError::new(
            field,
            format!("{text:?} is not a unicast IPv4 address"),
        )),
    }
}

/// The endpoint's host as an address, when it is an IPv4 literal.
fn literal_host(endpoint: &Endpoint) -> Option<Ipv4Addr> {
    match endpoint {
        Endpoint::Tcp { host, .. } => host.parse().ok(),
        Endpoint::Unix(_) => None,
    }
}

impl EngineConfig {
    /// Checks the entry at `at` (`docker.engine[i]`).
    pub fn resolve(&self, at: &str) -> Result<Engine, ConfigError> {
        let f = |what: &str| format!("{at}.{what}");
        if !valid_name(&self.name) {
            return Err(ConfigError::new(
                f("name"),
                format!("{:?} must be 1-64 characters of [A-Za-z0-9-_.]", self.name),
            ));
        }
        let endpoint = parse_endpoint(&self.endpoint, None, &f("endpoint"))?;
        let wants_tls = self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_verify.is_some();
        if let Endpoint::Unix(_) = endpoint {
            if self.address.is_some() {
                return Err(ConfigError::new(
                    f("address"),
                    "a unix socket's engine is this host: its containers are reached at their \
                     own addresses (use a tcp:// endpoint for another host)",
                ));
            }
            if wants_tls {
                return Err(ConfigError::new(
                    f("endpoint"),
                    "TLS settings need a tcp:// endpoint",
                ));
            }
        }
        let address = match &self.address {
            Some(a) => Some(parse_address(a, &f("address"))?),
            None => literal_host(&endpoint),
        };
        let tls = if wants_tls {
            let verify = self.tls_verify.unwrap_or(true);
            if verify && self.tls_ca.is_none() {
                return Err(ConfigError::new(
                    f("tls_ca"),
                    "verification is on (tls_verify defaults to true): name the CA that signed \
                     the engine's certificate, or set tls_verify = false",
                ));
            }
            match (&self.tls_cert, &self.tls_key) {
                (Some(_), None) => {
                    return Err(ConfigError::new(
                        f("tls_key"),
                        "tls_cert needs its key (tls_key)",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        f("tls_cert"),
                        "tls_key needs its certificate (tls_cert)",
                    ));
                }
                _ => {}
            }
            for (what, p) in [
                ("tls_ca", &self.tls_ca),
                ("tls_cert", &self.tls_cert),
                ("tls_key", &self.tls_key),
            ] {
                if let Some(p) = p
                    && !p.is_absolute()
                {
                    return Err(ConfigError::new(
                        f(what),
                        format!("{:?} must be an absolute path", p.display()),
                    ));
                }
            }
            Some(Tls {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                verify,
            })
        } else {
            None
        };
        Ok(Engine {
            name: self.name.clone(),
            endpoint,
            address,
            tls,
            origin: at.to_owned(),
        })
    }
}

/// The configured engines (`[[docker.engine]]`, or the `[docker] socket` shorthand), checked;
/// None when neither is given (then the environment decides, see [`from_env`]).
pub fn configured(
    engines: &[EngineConfig],
    socket: Option<&str>,
) -> Result<Option<Vec<Engine>>, ConfigError> {
    if !engines.is_empty() {
        if socket.is_some() {
            return Err(ConfigError::new(
                "docker.socket",
                "the one-engine shorthand cannot be combined with [[docker.engine]]: list this \
                 socket as an engine (endpoint = \"unix:///...\")",
            ));
        }
        let mut out: Vec<Engine> = Vec::with_capacity(engines.len());
        for (i, e) in engines.iter().enumerate() {
            let at = format!("docker.engine[{i}]");
            let engine = e.resolve(&at)?;
            if out.iter().any(|o| o.name == engine.name) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!("duplicate engine name {:?}", engine.name),
                ));
            }
            if out.iter().any(|o| o.endpoint == engine.endpoint) {
                return Err(ConfigError::new(
                    format!("{at}.endpoint"),
                    format!("{} is already engine {:?}", engine.endpoint, {
                        let o = out.iter().find(|o| o.endpoint == engine.endpoint);
                        o.map(|o| o.name.clone()).unwrap_or_default()
                    }),
                ));
            }
            out.push(engine);
        }
        return Ok(Some(out));
    }
    match socket {
        None => Ok(None),
        Some(s) if s.starts_with('/') => Ok(Some(vec![Engine {
            name: DEFAULT_ENGINE.to_owned(),
            endpoint: Endpoint::Unix(PathBuf::from(s)),
            address: None,
            tls: None,
            origin: "docker.socket".to_owned(),
        }])),
        Some(s) => Err(ConfigError::new(
            "docker.socket",
            format!("{s:?} must be an absolute path (a tcp endpoint is a [[docker.engine]])"),
        )),
    }
}

/// The one engine of the docker CLI's environment when nothing is configured: `DOCKER_HOST`
/// (default: the local socket), with TLS when `DOCKER_TLS_VERIFY` (verified) or `DOCKER_TLS`
/// is set to anything non-empty, the files `ca.pem`, `cert.pem`, `key.pem` of
/// `DOCKER_CERT_PATH` (default `~/.docker`) that exist, and the CLI's default ports (2375,
/// 2376 with TLS).
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Engine, ConfigError> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let verify = set("DOCKER_TLS_VERIFY").is_some();
    let tls_on = verify || set("DOCKER_TLS").is_some();
    let host = set("DOCKER_HOST").unwrap_or_else(|| format!("unix://{DEFAULT_SOCKET}"));
    let port = if tls_on {
        DOCKER_TLS_PORT
    } else {
        DOCKER_TCP_PORT
    };
    let endpoint = parse_endpoint(&host, Some(port), "DOCKER_HOST")?;
    let tls = match (&endpoint, tls_on) {
        (Endpoint::Tcp { .. }, true) => {
            let dir = set("DOCKER_CERT_PATH")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .unwrap_or_else(|| PathBuf::from("/root/.docker"));
            let file = |n: &str| Some(dir.join(n)).filter(|p| p.exists());
            let ca = file("ca.pem");
            if verify && ca.is_none() {
                return Err(ConfigError::new(
                    "DOCKER_CERT_PATH",
                    format!(
                        "DOCKER_TLS_VERIFY is set but {} has no ca.pem to verify the engine with",
                        dir.display()
                    ),
                ));
            }
            let (cert, key) = match (file("cert.pem"), file("key.pem")) {
                (Some(c), Some(k)) => (Some(c), Some(k)),
                _ => (None, None),
            };
            Some(Tls {
                ca,
                cert,
                key,
                verify,
            })
        }
        _ => None,
    };
    Ok(Engine {
        name: DEFAULT_ENGINE.to_owned(),
        address: literal_host(&endpoint),
        endpoint,
        tls,
        origin: "DOCKER_HOST".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn entry(name: &str, endpoint: &str) -> EngineConfig {
        EngineConfig {
            name: name.into(),
            endpoint: endpoint.into(),
            address: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_verify: None,
        }
    }

    fn field_of(engines: &[EngineConfig], socket: Option<&str>) -> String {
        configured(engines, socket)
            .expect_err("should be refused")
            .field
    }

    #[test]
    fn endpoints_as_docker_spells_them() {
        let ok = configured(
            &[
                entry("a", "unix:///var/run/docker.sock"),
                entry("b", "tcp://10.0.0.2:2375"),
                entry("c", "tcp://docker-c.internal:4243/"),
            ],
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            ok[0].endpoint,
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(ok[0].address, None);
        assert_eq!(ok[1].address, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(ok[1].endpoint.to_string(), "tcp://10.0.0.2:2375");
        // A name is resolved when the watcher connects.
        assert_eq!(ok[2].address, None);
        assert_eq!(ok[2].endpoint.to_string(), "tcp://docker-c.internal:4243");
        for (bad, needle) in [
            ("ssh://me@host", "ssh://"),
            ("http://10.0.0.2:2375", "must be unix"),
            ("tcp://10.0.0.2", "name the port"),
            ("tcp://10.0.0.2:0", "1-65535"),
            ("tcp://10.0.0.2:http", "1-65535"),
            ("tcp://[::1]:2375", "IPv6"),
            ("tcp://:2375", "IPv4 address or a DNS name"),
            ("unix://relative.sock", "absolute path"),
        ] {
            let e = configured(&[entry("a", bad)], None).unwrap_err();
            assert_eq!(e.field, "docker.engine[0].endpoint", "{bad}");
            assert!(e.message.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let mut bad_name = entry("a b", "tcp://10.0.0.2:2375");
        assert_eq!(field_of(&[bad_name.clone()], None), "docker.engine[0].name");
        bad_name.name = "a".into();
        assert_eq!(
            field_of(&[bad_name.clone(), bad_name.clone()], None),
            "docker.engine[1].name"
        );
        assert_eq!(
            field_of(
                &[bad_name.clone(), entry("other", "tcp://10.0.0.2:2375")],
                None
            ),
            "docker.engine[1].endpoint"
        );
        assert_eq!(
            field_of(&[bad_name.clone()], Some("/var/run/docker.sock")),
            "docker.socket"
        );
        let mut addr = entry("a", "tcp://10.0.0.2:2375");
        addr.address = Some("10.0.0.300".into());
        assert_eq!(field_of(&[addr.clone()], None), "docker.engine[0].address");
        addr.address = Some("0.0.0.0".into());
        assert_eq!(field_of(&[addr.clone()], None), "docker.engine[0].address");
        addr.address = Some("192.0.2.7".into());
        assert_eq!(
            configured(&[addr.clone()], None).unwrap().unwrap()[0].address,
            Some(Ipv4Addr::new(192, 0, 2, 7))
        );
        let mut unix_addr = entry("a", "unix:///run/d.sock");
        unix_addr.address = Some("192.0.2.7".into());
        assert_eq!(field_of(&[unix_addr], None), "docker.engine[0].address");
        assert_eq!(field_of(&[], Some("docker.sock")), "docker.socket");
    }

    #[test]
    fn tls_verifies_by_default_and_needs_its_files_in_pairs() {
        let mut e = entry("c", "tcp://10.0.0.3:2376");
        e.tls_cert = Some("/c/cert.pem".into());
        e.tls_key = Some("/c/key.pem".into());
        // Verification is on by default: without a CA it cannot be done.
        assert_eq!(field_of(&[e.clone()], None), "docker.engine[0].tls_ca");
        e.tls_ca = Some("/c/ca.pem".into());
        let tls = configured(&[e.clone()], None).unwrap().unwrap()[0]
            .tls
            .clone()
            .unwrap();
        assert!(tls.verify);
        let mut no_key = e.clone();
        no_key.tls_key = None;
        assert_eq!(field_of(&[no_key], None), "docker.engine[0].tls_key");
        let mut no_cert = e.clone();
        no_cert.tls_cert = None;
        assert_eq!(field_of(&[no_cert], None), "docker.engine[0].tls_cert");
        let mut relative = e.clone();
        relative.tls_ca = Some("ca.pem".into());
        assert_eq!(field_of(&[relative], None), "docker.engine[0].tls_ca");
        // TLS without verification, as the CLI's --tls: no CA needed.
        let mut unverified = entry("c", "tcp://10.0.0.3:2376");
        unverified.tls_verify = Some(false);
        let tls = configured(&[unverified], None).unwrap().unwrap()[0]
            .tls
            .clone()
            .unwrap();
        assert!(!tls.verify && tls.ca.is_none());
        // No TLS setting: plain TCP.
        assert!(
            configured(&[entry("b", "tcp://10.0.0.2:2375")], None)
                .unwrap()
                .unwrap()[0]
                .tls
                .is_none()
        );
        let mut unix_tls = entry("a", "unix:///run/d.sock");
        unix_tls.tls_ca = Some("/c/ca.pem".into());
        assert_eq!(field_of(&[unix_tls], None), "docker.engine[0].endpoint");
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn without_engines_the_docker_cli_environment_decides() {
        // The shorthand wins over the environment; nothing at all is the default socket.
        assert_eq!(
            configured(&[], Some("/run/other.sock")).unwrap().unwrap()[0].endpoint,
            Endpoint::Unix("/run/other.sock".into())
        );
        assert_eq!(configured(&[], None).unwrap(), None);
        let e = from_env(&env(&[])).unwrap();
        assert_eq!(e.endpoint, Endpoint::Unix(DEFAULT_SOCKET.into()));
        assert_eq!((e.name.as_str(), e.tls.is_none()), (DEFAULT_ENGINE, true));
        let e = from_env(&env(&[("DOCKER_HOST", "tcp://10.0.0.9")])).unwrap();
        assert_eq!(e.endpoint.to_string(), "tcp://10.0.0.9:2375");
        assert_eq!(e.address, Some(Ipv4Addr::new(10, 0, 0, 9)));
        let e = from_env(&env(&[("DOCKER_HOST", "unix:///tmp/d.sock")])).unwrap();
        assert_eq!(e.endpoint, Endpoint::Unix("/tmp/d.sock".into()));
        let bad = from_env(&env(&[("DOCKER_HOST", "ssh://me@there")])).unwrap_err();
        assert_eq!(bad.field, "DOCKER_HOST");
        // TLS from DOCKER_TLS_VERIFY and the files of DOCKER_CERT_PATH that exist.
        let dir = std::env::temp_dir().join(format!("berth-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir_s = dir.display().to_string();
        let verify = [
            ("DOCKER_HOST", "tcp://10.0.0.9"),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", dir_s.as_str()),
        ];
        let e = from_env(&env(&verify)).unwrap_err();
        assert_eq!(e.field, "DOCKER_CERT_PATH");
        assert!(e.message.contains("ca.pem"), "{e}");
        std::fs::write(dir.join("ca.pem"), "x").unwrap();
        let e = from_env(&env(&verify)).unwrap();
        assert_eq!(e.endpoint.to_string(), "tcp://10.0.0.9:2376");
        let tls = e.tls.unwrap();
        assert!(tls.verify && tls.ca == Some(dir.join("ca.pem")) && tls.cert.is_none());
        std::fs::write(dir.join("cert.pem"), "x").unwrap();
        std::fs::write(dir.join("key.pem"), "x").unwrap();
        let tls = from_env(&env(&verify)).unwrap().tls.unwrap();
        assert_eq!(tls.key, Some(dir.join("key.pem")));
        // DOCKER_TLS alone: TLS without verification; an empty DOCKER_TLS_VERIFY is unset.
        let tls = from_env(&env(&[
            ("DOCKER_HOST", "tcp://10.0.0.9:2376"),
            ("DOCKER_TLS", "1"),
            ("DOCKER_TLS_VERIFY", ""),
            ("DOCKER_CERT_PATH", dir_s.as_str()),
        ]))
        .unwrap()
        .tls
        .unwrap();
        assert!(!tls.verify);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
