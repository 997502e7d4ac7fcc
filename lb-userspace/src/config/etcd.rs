//! The `[etcd]` table (where the etcd cluster is and how to talk to it), a service's
//! `etcd = { prefix = "..." }` selector, and `[publish]` (what `berth publish` announces).
//! Validation names the field; files (TLS, password) are read later, by the etcd client's set-up,
//! still before the kernel is touched.

use serde::Deserialize;

use super::ConfigError;

/// Where the etcd cluster is and how to authenticate to it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Members to talk to, `http://HOST:PORT` or `https://HOST:PORT` (the client balances over
    /// them and moves on when one fails).
    pub endpoints: Vec<String>,
    /// User name (etcd's authentication); needs `password` or `password_file`.
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password (its first line).
    pub password_file: Option<String>,
    /// CA certificate (PEM) the members' certificates must chain to (`https://` endpoints).
    pub ca_file: Option<String>,
    /// Client certificate and key (PEM) for mutual TLS; both or neither.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// The name the members' certificates carry, when it is not the endpoints' host.
    pub server_name: Option<String>,
    /// Connect and request timeout; also how long a silent connection may go before it is
    /// taken for dead (HTTP/2 keep-alive pings every `timeout_ms`).
    pub timeout_ms: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            timeout_ms: 2000,
        }
    }
}

impl EtcdConfig {
    /// Whether the connection is TLS (any TLS setting, or an `https://` endpoint).
    pub fn tls(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.server_name.is_some()
            || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::new(
                "etcd.endpoints",
                "name at least one member (e.g. \"http://127.0.0.1:2379\")",
            ));
        }
        let tls = self.tls();
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = format!("etcd.endpoints[{i}]");
            let (scheme, rest) = e.split_once("://").ok_or_else(|| {
                ConfigError::new(
                    &at,
                    format!("{e:?} must be http://HOST:PORT or https://HOST:PORT"),
                )
            })?;
            if scheme != "http" && scheme != "https" {
                return Err(ConfigError::new(
                    &at,
                    format!("{e:?}: scheme {scheme:?} is neither http nor https"),
                ));
            }
            let hostport = rest.trim_end_matches('/');
            let port_ok = hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok || hostport.contains(['/', ' ', '@']) {
                return Err(ConfigError::new(
                    &at,
                    format!("{e:?} must be {scheme}://HOST:PORT"),
                ));
            }
            if tls && scheme == "http" {
                return Err(ConfigError::new(
                    &at,
                    format!("{e:?} is plain http, but TLS is configured: use https://"),
                ));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let missing = if self.cert_file.is_some() {
                "etcd.key_file"
            } else {
                "etcd.cert_file"
            };
            return Err(ConfigError::new(
                missing,
                "a client certificate needs both cert_file and key_file",
            ));
        }
        for (name, v) in [
            ("etcd.ca_file", &self.ca_file),
            ("etcd.cert_file", &self.cert_file),
            ("etcd.key_file", &self.key_file),
            ("etcd.password_file", &self.password_file),
        ] {
            if v.as_deref().is_some_and(|p| !p.starts_with('/')) {
                return Err(ConfigError::new(
                    name,
                    format!("{:?} must be an absolute path", v.as_deref().unwrap_or("")),
                ));
            }
        }
        match (&self.username, &self.password, &self.password_file) {
            (Some(u), _, _) if u.is_empty() => {
                return Err(ConfigError::new("etcd.username", "must not be empty"));
            }
            (Some(_), None, None) => {
                return Err(ConfigError::new(
                    "etcd.password",
                    "a username needs a password (or password_file)",
                ));
            }
            (_, Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "etcd.password_file",
                    "give the password or a password_file, not both",
                ));
            }
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err(ConfigError::new(
                    "etcd.username",
                    "a password needs a username",
                ));
            }
            _ => {}
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(ConfigError::new(
                "etcd.timeout_ms",
                format!("{} must be between 100 and 60000", self.timeout_ms),
            ));
        }
        Ok(())
    }
}

/// A service's backends from etcd: every key under `prefix`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSelector {
    /// Key prefix, ending in `/` (so `/web/` does not also take `/web2/...`).
    pub prefix: String,
}

/// Checks a prefix (`field` names it in the error).
pub(super) fn validate_prefix(field: &str, prefix: &str) -> Result<(), ConfigError> {
    if prefix.is_empty() || !prefix.ends_with('/') || prefix.len() > 512 {
        return Err(ConfigError::new(
            field,
            format!(
                "{prefix:?} must be a key prefix ending in '/' (e.g. \"/berth/services/web/\"), \
                 at most 512 bytes"
            ),
        ));
    }
    Ok(())
}

/// `berth publish`: this Docker host's containers, announced in etcd.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// The address balancers reach this host on (default: the address of the default route's
    /// interface). A port published on one specific host address is announced on that one.
    pub address: Option<String>,
    /// This host's IPv6 address as balancers reach it: ports Docker publishes on every IPv6
    /// address (`::`) are announced there too (default: none, IPv4 only).
    pub address6: Option<String>,
    /// Lifetime of the lease the entries are written under: they vanish this long after the
    /// publisher (or its host) dies. Refreshed every third of it.
    pub ttl_secs: u64,
    #[serde(rename = "service")]
    pub services: Vec<PublishService>,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            address: None,
            address6: None,
            ttl_secs: 10,
            services: Vec::new(),
        }
    }
}

/// One `[[publish.service]]`: which containers, which port, under which prefix.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublishService {
    /// Where the entries go (a balancer's `etcd = { prefix = ... }`).
    pub prefix: String,
    /// Image the containers run (`name` also matches `name:tag`).
    pub image: Option<String>,
    /// Labels the containers must carry, all of them.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The container port whose published host port is announced.
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl PublishConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.address
            && a.parse::<std::net::Ipv4Addr>().map_or(true, |ip| {
                ip.is_unspecified() || ip.is_loopback() || ip.is_multicast()
            })
        {
            return Err(ConfigError::new(
                "publish.address",
                format!("{a:?} must be this host's IPv4 address as balancers reach it"),
            ));
        }
        if let Some(a) = &self.address6
            && a.parse::<std::net::Ipv6Addr>().map_or(true, |ip| {
                ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.to_ipv4_mapped().is_some()
            })
        {
            return Err(ConfigError::new(
                "publish.address6",
                format!("{a:?} must be this host's IPv6 address as balancers reach it"),
            ));
        }
        if !(2..=3600).contains(&self.ttl_secs) {
            return Err(ConfigError::new(
                "publish.ttl_secs",
                format!("{} must be between 2 and 3600", self.ttl_secs),
            ));
        }
        for (i, s) in self.services.iter().enumerate() {
            let at = |f: &str| format!("publish.service[{i}].{f}");
            validate_prefix(&at("prefix"), &s.prefix)?;
            if s.port == 0 {
                return Err(ConfigError::new(at("port"), "port 0 cannot be published"));
            }
            if s.image.is_none() && s.labels.is_empty() {
                return Err(ConfigError::new(
                    at("image"),
                    "name an image and/or labels, or every container would match",
                ));
            }
            if s.weight > super::MAX_WEIGHT {
                return Err(ConfigError::new(
                    at("weight"),
                    format!(
                        "{} is above the maximum weight {}",
                        s.weight,
                        super::MAX_WEIGHT
                    ),
                ));
            }
        }
        Ok(())
    }
}
