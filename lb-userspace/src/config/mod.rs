//! The TOML configuration: parsing is a pure function of the text, and `validate` names the
//! offending field of anything it rejects.
//!
//! ```toml
//! [dataplane]
//! interfaces = ["eth0", "docker0"]
//! maglev_table_size = 65537
//!
//! [[service]]
//! name = "web"
//! listen = "0.0.0.0:8080"      # 0.0.0.0 = any address of this host
//! protocol = "tcp"
//! backends = ["172.17.0.2:8000", { address = "172.17.0.3:8000", weight = 2 }]
//! ```

use std::{collections::BTreeSet, fmt, net::SocketAddrV4, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer, de};

mod error;
mod etcd;
mod health;
pub mod synapse;
mod validate;

use error::field_at;
pub use error::{ConfigError, clip_values};
pub use etcd::{EtcdConfig, EtcdSelector, PublishConfig, PublishService};
pub use health::{CheckKind, HealthConfig};

/// Where berth pins its dataplane unless told otherwise (`dataplane.pin_path`, `--pin-path`).
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/berth";

/// Whether `n` is prime (trial division; table sizes are small). The Maglev table size must be.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Which cgroup v2 directory the socket programs attach to (`dataplane.cgroup`, `--cgroup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// The root of the cgroup v2 hierarchy: every process of the host.
    Auto,
    /// No socket programs (clients on this host are not balanced).
    None,
    /// Only the processes of this directory (absolute).
    Path(PathBuf),
}

impl Cgroup {
    /// Reads `"auto"`, `"none"` or an absolute directory; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "none" => Some(Self::None),
            p if p.starts_with('/') => Some(Self::Path(PathBuf::from(p))),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub dataplane: DataplaneConfig,
    pub docker: DockerConfig,
    pub metrics: MetricsConfig,
    /// The etcd cluster services with an `etcd` selector (and `berth publish`) talk to.
    pub etcd: EtcdConfig,
    /// What `berth publish` announces in etcd (ignored by `berth run`).
    pub publish: PublishConfig,
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Interfaces to attach to (the host's uplink, and the bridges backends sit behind).
    /// `--iface` on the command line replaces this list; empty means the default route's
    /// interface.
    pub interfaces: Vec<String>,
    /// Slots per service in the Maglev table: a prime, ideally >= 100 x the backends per service.
    pub maglev_table_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    /// Capacity of the LRU connection-tracking map (entries; each flow takes two).
    pub conntrack_size: u32,
    /// How long a TCP flow's entries linger after a FIN or RST.
    pub tcp_closing_timeout_secs: u64,
    /// How long an idle TCP flow is remembered.
    pub tcp_idle_timeout_secs: u64,
    /// How long an idle UDP flow is remembered.
    pub udp_idle_timeout_secs: u64,
    /// How long flows pinned to a backend that left may go on before their conntrack entries
    /// are purged (a backend that comes back meanwhile keeps them).
    pub drain_timeout_secs: u64,
    /// Seed of the flow hash; random per start when absent.
    pub hash_seed: Option<u32>,
    /// Route translated packets in the program and redirect them to the egress device
    /// (required for backends behind Docker's FORWARD DROP); `false` hands them to the stack.
    pub redirect: bool,
    /// Decrement the TTL of packets berth forwards itself, as a router does (`false`: a
    /// transparent hop).
    pub decrement_ttl: bool,
    /// Answer traffic to a service with no backend as a host with nothing listening would (a
    /// TCP RST, an ICMP port unreachable for UDP), so clients fail at once (`false`: drop it;
    /// clients wait for their timeouts).
    pub reject_without_backend: bool,
    /// bpffs directory where maps and attachments are pinned, so the dataplane outlives the
    /// daemon and a restarted berth adopts it (`berth down` removes it).
    pub pin_path: String,
    /// cgroup v2 directory the socket programs (clients on this host) attach to: "auto" is the
    /// root of the cgroup v2 hierarchy (every process of the host), "none" turns them off.
    pub cgroup: String,
    /// Detach everything and remove the pins when the daemon stops (SIGTERM/SIGINT), instead of
    /// leaving the dataplane serving for the next berth.
    pub detach_on_exit: bool,
}

impl DataplaneConfig {
    /// `cgroup` as what it means (validated configs always parse).
    pub fn cgroup_target(&self) -> Cgroup {
        Cgroup::parse(&self.cgroup).unwrap_or(Cgroup::Auto)
    }
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            maglev_table_size: lb_common::DEFAULT_MAGLEV_SIZE,
            max_services: lb_common::DEFAULT_MAX_SERVICES,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            tcp_closing_timeout_secs: 10,
            tcp_idle_timeout_secs: 3600,
            udp_idle_timeout_secs: 60,
            drain_timeout_secs: 30,
            hash_seed: None,
            redirect: true,
            decrement_ttl: true,
            reject_without_backend: true,
            pin_path: DEFAULT_PIN_PATH.into(),
            cgroup: "auto".into(),
            detach_on_exit: false,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Address to serve `/metrics` on; loopback unless you mean it.
    pub listen: String,
    /// Seconds a metrics page is served from its snapshot before a scrape takes a new one (each
    /// walks the whole conntrack map): about the scrape interval.
    pub refresh_interval_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9477".into(),
            refresh_interval_secs: 5,
        }
    }
}

/// Docker discovery.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Watch Docker at all (default: when any service has a `docker` selector, or when berth runs
    /// without a config file).
    pub enabled: Option<bool>,
    pub socket: String,
    /// Let containers create services through their `berth.*` labels (default: only when berth
    /// runs without a config file). A container can then take any free port on this host:
    /// enable it only where whoever starts containers may do that.
    pub label_services: Option<bool>,
    /// Pool a new container (or a restarted one) only once a TCP connect to its address and
    /// port succeeds: started is not listening yet, and a client sent there meanwhile is
    /// refused. `false` pools a container as soon as it runs. (UDP services: no probe.)
    pub readiness_probe: bool,
    /// How long the probe tries every 100 ms; after that berth says so once and keeps the
    /// container out of the pool, probing every second until it answers.
    pub readiness_timeout_ms: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            socket: "/var/run/docker.sock".into(),
            label_services: None,
            readiness_probe: true,
            readiness_timeout_ms: 10_000,
        }
    }
}

/// Which containers back a configured service, and on which port.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DockerSelector {
    /// Image the container runs (`name` also matches `name:tag`).
    pub image: Option<String>,
    /// Labels the container must carry, all of them.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The container port to send traffic to (need not be published).
    pub port: u16,
    /// Docker network whose address to use (default: the container's first network by name).
    pub network: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// `ADDR:PORT`; `0.0.0.0` means any local address of this host.
    pub listen: String,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Active health check of the backends (none: every backend is taken as healthy).
    pub health: Option<HealthConfig>,
    /// Containers that back this service, in addition to `backends`.
    pub docker: Option<DockerSelector>,
    /// Backends registered in etcd under a key prefix, in addition to the others.
    pub etcd: Option<EtcdSelector>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// A backend, written either as `"ip:port"` or as `{ address = "ip:port", weight = N }`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub address: String,
    pub weight: u32,
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            #[serde(default = "one")]
            weight: u32,
        }
        fn one() -> u32 {
            1
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = BackendConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""ip:port" or { address = "ip:port", weight = N }"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(BackendConfig {
                    address: s.to_owned(),
                    weight: 1,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendConfig {
                    address: t.address,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Largest weight accepted (keeps the Maglev credit arithmetic far from overflow).
pub const MAX_WEIGHT: u32 = 10_000;

/// A validated service, ready for the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub listen: SocketAddrV4,
    pub protocol: Protocol,
    pub backends: Vec<(SocketAddrV4, u32)>,
    pub health: Option<HealthConfig>,
    /// The container run behind each backend found through Docker (configured backends have
    /// none).
    pub instances: std::collections::BTreeMap<SocketAddrV4, Instance>,
}

/// Which run of which container a backend is: a digest of the container's id and start time.
/// Another one at the same address (a new container at a reused address, or the same container
/// restarted) is a new backend: a fresh slot with zeroed counters, a new readiness probe, a new
/// health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance(pub u64);

impl Instance {
    /// The instance of the container `id` started at `started_at` (Docker's `State.StartedAt`).
    pub fn of(id: &str, started_at: &str) -> Self {
        // FNV-1a: stable across builds and platforms (std's hasher is not promised to be).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.bytes().chain([0]).chain(started_at.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_setting_reads_as_its_meaning() {
        assert_eq!(Cgroup::parse("auto"), Some(Cgroup::Auto));
        assert_eq!(Cgroup::parse("none"), Some(Cgroup::None));
        assert_eq!(
            Cgroup::parse("/sys/fs/cgroup/x"),
            Some(Cgroup::Path("/sys/fs/cgroup/x".into()))
        );
        assert_eq!(Cgroup::parse("relative/dir"), None);
        assert_eq!(Cgroup::parse("Auto"), None);
        assert_eq!(DataplaneConfig::default().cgroup_target(), Cgroup::Auto);
    }

    fn err(text: &str) -> ConfigError {
        Config::load(text).expect_err("config should be rejected")
    }

    #[test]
    fn full_example_parses() {
        let (cfg, services) = Config::load(
            r#"
            [dataplane]
            interfaces = ["eth0", "docker0"]
            maglev_table_size = 4099
            [[service]]
            name = "web"
            listen = "0.0.0.0:8080"
            protocol = "tcp"
            backends = ["10.0.0.2:8000", { address = "10.0.0.3:8000", weight = 2 }]
            [[service]]
            name = "dns"
            listen = "10.99.0.1:53"
            protocol = "udp"
            backends = [{ address = "10.0.0.4:53" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.dataplane.interfaces, ["eth0", "docker0"]);
        assert_eq!(services.len(), 2);
        assert_eq!(
            services[0].backends[1],
            ("10.0.0.3:8000".parse().unwrap(), 2)
        );
        assert_eq!(services[1].backends[0].1, 1);
        assert_eq!(services[1].protocol, Protocol::Udp);
    }

    #[test]
    fn errors_name_the_field() {
        let base = "[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\n";
        assert_eq!(
            err(&format!("{base}backends = [\"10.0.0.1\"]\n")).field,
            "service[0].backends[0]"
        );
        assert_eq!(
            err(&format!(
                "{base}backends = [{{ address = \"10.0.0.1:80\", weight = 99999 }}]\n"
            ))
            .field,
            "service[0].backends[0].weight"
        );
        assert_eq!(
            err("[[service]]\nname = \"w\"\nlisten = \"nope\"\n").field,
            "service[0].listen"
        );
        assert_eq!(
            err("[dataplane]\nmaglev_table_size = 65536\n").field,
            "dataplane.maglev_table_size"
        );
        assert_eq!(
            err("[dataplane]\nconntrack_size = 5\n").field,
            "dataplane.conntrack_size"
        );
        assert_eq!(
            err("[docker]\nreadiness_timeout_ms = 0\n").field,
            "docker.readiness_timeout_ms"
        );
        assert_eq!(
            err(&format!(
                "{base}[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:9\"\n"
            ))
            .field,
            "service[1].name"
        );
        assert_eq!(
            err(&format!(
                "{base}[[service]]\nname = \"w2\"\nlisten = \"0.0.0.0:8080\"\n"
            ))
            .field,
            "service[1].listen"
        );
        // Same port over UDP is a different service.
        assert!(
            Config::load(&format!(
                "{base}[[service]]\nname = \"u\"\nlisten = \"0.0.0.0:8080\"\nprotocol = \"udp\"\n"
            ))
            .is_ok()
        );
        assert_eq!(
            err(&format!(
                "{base}backends = [\"10.0.0.1:80\", \"10.0.0.1:80\"]\n"
            ))
            .field,
            "service[0].backends[1]"
        );
    }

    #[test]
    fn etcd_settings_are_checked_field_by_field() {
        let svc = "[[service]]\nname = \"web\"\nlisten = \"10.99.0.1:80\"\n";
        let (cfg, _) = Config::load(&format!(
            "[etcd]\nendpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\n\
             ca_file = \"/etc/berth/ca.pem\"\nusername = \"berth\"\npassword = \"x\"\n\
             {svc}etcd = {{ prefix = \"/berth/services/web/\" }}\n"
        ))
        .unwrap();
        assert!(cfg.etcd_enabled());
        assert_eq!(cfg.etcd_selectors()["web"], "/berth/services/web/");
        assert!(!Config::load("").unwrap().0.etcd_enabled());
        for (text, field) in [
            ("[etcd]\nendpoints = []\n", "etcd.endpoints"),
            (
                "[etcd]\nendpoints = [\"10.0.0.1:2379\"]\n",
                "etcd.endpoints[0]",
            ),
            (
                "[etcd]\nendpoints = [\"grpc://10.0.0.1:2379\"]\n",
                "etcd.endpoints[0]",
            ),
            (
                "[etcd]\nendpoints = [\"http://10.0.0.1\"]\n",
                "etcd.endpoints[0]",
            ),
            (
                "[etcd]\nendpoints = [\"https://a:1\", \"http://10.0.0.1:2379\"]\n",
                "etcd.endpoints[1]",
            ),
            ("[etcd]\nca_file = \"/ca.pem\"\n", "etcd.endpoints[0]"),
            (
                "[etcd]\nendpoints = [\"https://a:1\"]\ncert_file = \"/c.pem\"\n",
                "etcd.key_file",
            ),
            (
                "[etcd]\nendpoints = [\"https://a:1\"]\nca_file = \"ca.pem\"\n",
                "etcd.ca_file",
            ),
            ("[etcd]\nusername = \"berth\"\n", "etcd.password"),
            ("[etcd]\npassword = \"x\"\n", "etcd.username"),
            ("[etcd]\ntimeout_ms = 5\n", "etcd.timeout_ms"),
            ("[etcd]\nendpiont = 5\n", "etcd.endpiont (line 2)"),
            ("[publish]\nttl_secs = 1\n", "publish.ttl_secs"),
            ("[publish]\naddress = \"0.0.0.0\"\n", "publish.address"),
            (
                "[[publish.service]]\nprefix = \"/web\"\nimage = \"x\"\nport = 80\n",
                "publish.service[0].prefix",
            ),
            (
                "[[publish.service]]\nprefix = \"/web/\"\nport = 80\n",
                "publish.service[0].image",
            ),
        ] {
            assert_eq!(err(text).field, field, "{text}");
        }
        for prefix in ["", "/berth/services/web"] {
            assert_eq!(
                err(&format!("{svc}etcd = {{ prefix = \"{prefix}\" }}\n")).field,
                "service[0].etcd.prefix"
            );
        }
    }

    #[test]
    fn metrics_listen_on_loopback_unless_configured() {
        let (cfg, _) = Config::load("").unwrap();
        let addr: std::net::SocketAddr = cfg.metrics.listen.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert!(cfg.metrics.enabled);
        let (cfg, _) = Config::load("[metrics]\nenabled = false\n").unwrap();
        assert!(!cfg.metrics.enabled);
        assert_eq!(cfg.metrics.refresh_interval_secs, 5);
        for bad in ["0", "3601"] {
            assert_eq!(
                err(&format!("[metrics]\nrefresh_interval_secs = {bad}\n")).field,
                "metrics.refresh_interval_secs"
            );
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected_with_location() {
        let e = err("[dataplane]\nmaglev_tabel_size = 7\n");
        assert!(e.message.contains("maglev_tabel_size"), "{e}");
        assert_eq!(e.field, "dataplane.maglev_tabel_size (line 2)");
        let e = err("[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nprotocol = \"sctp\"\n");
        assert!(e.message.contains("sctp"), "{e}");
        assert_eq!(e.field, "service[0].protocol (line 4)");
        let e = err("[dataplane]\nmax_services = \"many\"\n");
        assert_eq!(e.field, "dataplane.max_services (line 2)");
        assert!(
            e.message.contains("integer") || e.message.contains("invalid type"),
            "{e}"
        );
        let e = err(
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nbackends = [{ addr = \"1.2.3.4:5\" }]\n",
        );
        assert!(e.message.contains("addr"), "{e}");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "x".repeat(1000);
        let e = err(&format!("[[service]]\nname = \"w\"\nlisten = \"{long}\"\n"));
        let shown = e.to_string();
        assert_eq!(
            shown,
            format!(
                "service[0].listen: \"{}…\" (1000 bytes) is not an IPv4 ADDR:PORT",
                "x".repeat(80)
            )
        );
        // Escaped quotes stay inside the value; short values and text are untouched.
        let quoted = format!("{:?} and \"short\"", format!("a\"{long}"));
        let c = clip_values(&quoted);
        assert!(c.ends_with("…\" (1003 bytes) and \"short\""), "{c}");
        assert!(c.starts_with("\"a\\\"x"), "{c}");
        let key = format!("dataplane.{long} (line 2)");
        assert_eq!(
            clip_values(&key),
            format!("dataplane.{}… (1010 bytes) (line 2)", "x".repeat(70))
        );
        assert_eq!(
            clip_values("unknown field `turbo`"),
            "unknown field `turbo`"
        );
        // Multi-byte characters are cut on a character boundary.
        let wide = "é".repeat(100);
        assert!(clip_values(&format!("`{wide}`")).contains("(200 bytes)"));
    }

    #[test]
    fn empty_config_is_valid() {
        let (cfg, services) = Config::load("").unwrap();
        assert!(services.is_empty());
        assert_eq!(cfg.dataplane, DataplaneConfig::default());
    }
}
