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

use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
};

use serde::{Deserialize, Deserializer, de};

pub mod engine;
mod error;
mod etcd;
mod health;
pub mod synapse;
mod validate;

pub use engine::{Endpoint, Engine, EngineConfig, Tls};
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
    /// Attach the XDP fast path (issue 14) beside the TC program on every interface berth
    /// attaches to, where the driver has native XDP: established IPv4 flows whose route leaves
    /// by the interface they came in on are translated and sent back out there (`XDP_TX`)
    /// before the kernel builds a packet; everything else goes on to TC. Needs `redirect`.
    pub xdp: bool,
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
    /// Source address of full-NAT flows (`None`: the address the kernel would use as source
    /// toward each backend).
    pub snat_address: Option<Ipv4Addr>,
    /// Source address of full-NAT flows to IPv6 backends (`None`: the address the kernel would
    /// use as source toward each backend).
    pub snat_address6: Option<std::net::Ipv6Addr>,
    /// Source ports of full-NAT flows; outside the host's `ip_local_port_range`, or the host's
    /// own connections and berth's flows may pick the same port toward a backend.
    pub snat_ports: PortRange,
    /// How long (ms) a full-NAT flow that has fully closed (FIN both ways, or RST) keeps its
    /// source port before a new flow to the same backend may take it over, replacing the old
    /// flow's entries (as a host reuses a TIME_WAIT port). Until then, and for a flow closed on
    /// one side only for the whole `tcp_closing_timeout_secs`, the port stays the old flow's.
    /// A flow closed by a FIN each way whose final ACK passed berth gives its port up at once
    /// (`lb_common::ct::port_reusable`); this hold is for the others.
    pub snat_port_reuse_ms: u64,
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
            xdp: false,
            reject_without_backend: true,
            pin_path: DEFAULT_PIN_PATH.into(),
            cgroup: "auto".into(),
            detach_on_exit: false,
            snat_address: None,
            snat_address6: None,
            snat_ports: PortRange::DEFAULT_SNAT,
            snat_port_reuse_ms: 1000,
        }
    }
}

/// An inclusive range of ports, written `"FIRST-LAST"` (`dataplane.snat_ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Above Linux's default `ip_local_port_range` (32768-60999).
    pub const DEFAULT_SNAT: PortRange = PortRange {
        first: 61000,
        last: 65535,
    };

    /// How many ports the range holds.
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Never true for a parsed range; for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `"FIRST-LAST"` with 1 <= FIRST <= LAST <= 65535 (a single port is `"N-N"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port range FIRST-LAST (e.g. \"61000-65535\")");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(format!(
                "{s:?}: the first port must be between 1 and the last one"
            ));
        }
        Ok(PortRange { first, last })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
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

/// Docker discovery: which Engines to watch, and what their containers may do.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Watch Docker at all (default: when any service has a `docker` selector, or when berth runs
    /// without a config file).
    pub enabled: Option<bool>,
    /// The one-engine shorthand: this host's Docker socket. Without it and without
    /// `[[docker.engine]]`, the docker CLI's environment decides (`DOCKER_HOST`, ...; default
    /// `/var/run/docker.sock`).
    pub socket: Option<String>,
    /// Let containers create services through their `berth.*` labels (default: only when berth
    /// runs without a config file). A container can then take any free port on this host:
    /// enable it only where whoever starts containers may do that.
    pub label_services: Option<bool>,
    /// A label service also listens on `[::]:<berth.port>` (as `NAME.ipv6`, with the
    /// containers' IPv6 addresses) when the host has IPv6 and one of its containers has an
    /// IPv6 address on its network. `false`: label services are IPv4 only.
    pub label_ipv6: bool,
    /// Pool a new container (or a restarted one) only once a TCP connect to its address and
    /// port succeeds: started is not listening yet, and a client sent there meanwhile is
    /// refused. `false` pools a container as soon as it runs. (UDP services: no probe.)
    pub readiness_probe: bool,
    /// How long the probe tries every 100 ms; after that berth says so once and keeps the
    /// container out of the pool, probing every second until it answers.
    pub readiness_timeout_ms: u64,
    /// The engines to watch (`[[docker.engine]]`), each with its own watcher.
    #[serde(rename = "engine")]
    pub engines: Vec<EngineConfig>,
    /// Seconds an engine may be unreachable before its backends are judged: those of services
    /// with a health check stay while their checks pass, the others leave.
    pub grace_secs: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            socket: None,
            label_services: None,
            label_ipv6: true,
            readiness_probe: true,
            readiness_timeout_ms: 10_000,
            engines: Vec::new(),
            grace_secs: 10,
        }
    }
}

impl DockerConfig {
    /// The engines to watch: as configured, else the one of the docker CLI's environment
    /// (`env` reads a variable).
    pub fn engines(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<Engine>, ConfigError> {
        match engine::configured(&self.engines, self.socket.as_deref())? {
            Some(e) => Ok(e),
            None => Ok(vec![engine::from_env(env)?]),
        }
    }

    /// The names a selector's `engines` may use (`default` for the shorthand forms).
    pub fn engine_names(&self) -> Vec<String> {
        if self.engines.is_empty() {
            vec![engine::DEFAULT_ENGINE.to_owned()]
        } else {
            self.engines.iter().map(|e| e.name.clone()).collect()
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
    /// The engines whose containers count (default: every engine).
    #[serde(default)]
    pub engines: Vec<String>,
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
    /// `ADDR:PORT` of either family: `0.0.0.0:80` / `[::]:80` mean any local address of this
    /// host of that family; `[2001:db8::1]:443` one address.
    pub listen: String,
    /// A dual-stack service's IPv6 address (`listen` then being its IPv4 one): one service on
    /// both families, each family's backends serving that family's clients (no NAT64). Its IPv6
    /// half shows in `status` and metrics as `NAME.ipv6`.
    #[serde(default)]
    pub listen6: Option<String>,
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
    /// How all of this service's backends are reached (absent: static backends and containers
    /// on this host by DNAT, containers on other Docker hosts by full NAT).
    pub mode: Option<Nat>,
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

/// How packets of a flow reach a backend.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Nat {
    /// Destination NAT only: the backend sees the client's address, so its replies must come
    /// back through berth (it is on this host, or berth is its gateway).
    #[serde(rename = "dnat")]
    Dnat,
    /// Source and destination NAT: the backend sees berth's address (`dataplane.snat_address`
    /// and a port of `dataplane.snat_ports`) and replies to it, wherever it is.
    #[serde(rename = "fullnat")]
    Full,
}

impl fmt::Display for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Nat::Dnat => "dnat",
            Nat::Full => "fullnat",
        })
    }
}

/// One backend of a validated service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    /// Of the service's family (IPv4 or IPv6; no NAT64).
    pub addr: SocketAddr,
    /// Maglev weight (0: no new flows).
    pub weight: u32,
    pub nat: Nat,
}

impl BackendSpec {
    /// A backend reached by DNAT (today's default for static backends and local containers).
    pub fn dnat(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            nat: Nat::Dnat,
        }
    }
}

/// A validated service, ready for the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// IPv4 or IPv6; its backends are of the same family.
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// One entry per address.
    pub backends: Vec<BackendSpec>,
    pub health: Option<HealthConfig>,
    /// The container run behind each backend found through Docker (configured backends have
    /// none).
    pub instances: std::collections::BTreeMap<SocketAddr, Instance>,
    /// The configured `mode`, which discovery applies to the backends it adds (`None`: each
    /// source's default).
    pub mode: Option<Nat>,
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

impl Service {
    /// How a backend of this service is reached, given the default of where it comes from.
    pub fn nat_or(&self, default: Nat) -> Nat {
        self.mode.unwrap_or(default)
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
            BackendSpec::dnat("10.0.0.3:8000".parse().unwrap(), 2)
        );
        assert_eq!(services[1].backends[0].weight, 1);
        assert_eq!(services[1].protocol, Protocol::Udp);
    }

    #[test]
    fn ipv6_services_and_dual_stack() {
        let (_, services) = Config::load(
            r#"
            [[service]]
            name = "any6"
            listen = "[::]:8080"
            backends = ["[fd00::2]:80", { address = "[fd00::3]:80", weight = 2 }]

            [[service]]
            name = "one6"
            listen = "[2001:db8::1]:443"
            protocol = "udp"

            [[service]]
            name = "web"
            listen = "0.0.0.0:80"
            listen6 = "[::]:80"
            backends = ["10.0.0.2:80", "[fd00::2]:80", "10.0.0.3:80"]
            "#,
        )
        .unwrap();
        let got: Vec<(String, String, Vec<String>)> = services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.listen.to_string(),
                    s.backends.iter().map(|b| b.addr.to_string()).collect(),
                )
            })
            .collect();
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                (
                    "any6".into(),
                    "[::]:8080".into(),
                    v(&["[fd00::2]:80", "[fd00::3]:80"])
                ),
                ("one6".into(), "[2001:db8::1]:443".into(), v(&[])),
                (
                    "web".into(),
                    "0.0.0.0:80".into(),
                    v(&["10.0.0.2:80", "10.0.0.3:80"])
                ),
                ("web.ipv6".into(), "[::]:80".into(), v(&["[fd00::2]:80"])),
            ]
        );
        assert_eq!(services[0].backends[1].weight, 2);
    }

    #[test]
    fn family_mismatch_names_the_backend() {
        let e = err(
            "[[service]]\nname = \"w\"\nlisten = \"[::]:80\"\nbackends = [\"[fd00::2]:80\", \"10.0.0.2:80\"]\n",
        );
        assert_eq!(e.field, "service[0].backends[1]", "{e}");
        assert!(
            e.message.contains("IPv4") && e.message.contains("IPv6"),
            "{e}"
        );
        let e = err(
            "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nbackends = [\"[fd00::2]:80\"]\n",
        );
        assert_eq!(e.field, "service[0].backends[0]", "{e}");
        // listen6 must be IPv6 and listen IPv4.
        let base = "[[service]]\nname = \"w\"\n";
        assert_eq!(
            err(&format!(
                "{base}listen = \"0.0.0.0:80\"\nlisten6 = \"0.0.0.0:81\"\n"
            ))
            .field,
            "service[0].listen6"
        );
        assert_eq!(
            err(&format!(
                "{base}listen = \"[::]:80\"\nlisten6 = \"[::]:81\"\n"
            ))
            .field,
            "service[0].listen"
        );
        // Full NAT over IPv6 is accepted; its source address is of its family.
        let (c, services) = Config::load(&format!(
            "[dataplane]\nsnat_address6 = \"fd00::7\"\n{base}listen = \"[::]:80\"\nmode = \"fullnat\"\nbackends = [\"[fd00::2]:80\"]\n"
        ))
        .expect("IPv6 full NAT");
        assert_eq!(services[0].backends[0].nat, Nat::Full);
        assert_eq!(c.dataplane.snat_address6, Some("fd00::7".parse().unwrap()));
        assert_eq!(
            err("[dataplane]\nsnat_address = \"fd00::7\"\n").field,
            "dataplane.snat_address (line 2)"
        );
        assert_eq!(
            err("[dataplane]\nsnat_address6 = \"192.0.2.7\"\n").field,
            "dataplane.snat_address6 (line 2)"
        );
        for bad in ["::", "::1", "ff02::1"] {
            assert_eq!(
                err(&format!("[dataplane]\nsnat_address6 = \"{bad}\"\n")).field,
                "dataplane.snat_address6",
                "{bad}"
            );
        }
        // A dual-stack service takes two of max_services.
        assert_eq!(
            err("[dataplane]\nmax_services = 1\n[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\nlisten6 = \"[::]:80\"\n")
                .field,
            "service"
        );
        // The same address twice, across families' spellings.
        assert_eq!(
            err(&format!(
                "{base}listen = \"[::]:80\"\n[[service]]\nname = \"v\"\nlisten = \"0.0.0.0:80\"\nlisten6 = \"[::]:80\"\n"
            ))
            .field,
            "service[1].listen6"
        );
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
            ("[publish]\naddress6 = \"::\"\n", "publish.address6"),
            ("[publish]\naddress6 = \"10.0.0.1\"\n", "publish.address6"),
            (
                "[publish]\naddress6 = \"::ffff:10.0.0.1\"\n",
                "publish.address6",
            ),
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
    fn nat_settings_parse_and_name_their_field() {
        let (cfg, services) = Config::load(
            r#"
            [dataplane]
            snat_address = "192.0.2.7"
            snat_ports = "50000-50009"
            [[service]]
            name = "web"
            listen = "0.0.0.0:8080"
            mode = "fullnat"
            backends = ["10.0.0.2:8000", { address = "10.0.0.3:8000", weight = 2 }]
            [[service]]
            name = "db"
            listen = "0.0.0.0:5432"
            backends = ["10.0.0.4:5432"]
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.dataplane.snat_address,
            Some(Ipv4Addr::new(192, 0, 2, 7))
        );
        assert_eq!(cfg.dataplane.snat_ports.len(), 10);
        assert_eq!(services[0].mode, Some(Nat::Full));
        assert!(services[0].backends.iter().all(|b| b.nat == Nat::Full));
        assert_eq!(services[1].mode, None);
        assert_eq!(services[1].backends[0].nat, Nat::Dnat);
        // Defaults: no fixed address, ports above Linux's default ip_local_port_range.
        let d = DataplaneConfig::default();
        assert_eq!(d.snat_address, None);
        assert_eq!(d.snat_ports.to_string(), "61000-65535");
        assert!(!d.snat_ports.overlaps(&PortRange {
            first: 32768,
            last: 60999
        }));

        let base = "[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\n";
        let e = err(&format!("{base}mode = \"snat\"\n"));
        assert_eq!(e.field, "service[0].mode (line 4)");
        assert!(
            e.message.contains("dnat") && e.message.contains("fullnat"),
            "{e}"
        );
        for bad in ["61000", "0-10", "200-100", "1-65536", "a-b", ""] {
            let e = err(&format!("[dataplane]\nsnat_ports = \"{bad}\"\n"));
            assert_eq!(e.field, "dataplane.snat_ports (line 2)", "{bad}: {e}");
        }
        let e = err("[dataplane]\nsnat_ports = 61000\n");
        assert_eq!(e.field, "dataplane.snat_ports (line 2)");
        // A closed flow's port is taken over after a second by default; the hold may not
        // outlast the linger it shortens.
        assert_eq!(d.snat_port_reuse_ms, 1000);
        let (cfg, _) = Config::load("[dataplane]\nsnat_port_reuse_ms = 0\n").unwrap();
        assert_eq!(cfg.dataplane.snat_port_reuse_ms, 0);
        let e = err("[dataplane]\ntcp_closing_timeout_secs = 2\nsnat_port_reuse_ms = 2001\n");
        assert_eq!(e.field, "dataplane.snat_port_reuse_ms", "{e}");
        assert!(e.message.contains("tcp_closing_timeout_secs"), "{e}");
        let e = err("[dataplane]\nsnat_port_reuse_ms = -1\n");
        assert!(e.field.starts_with("dataplane.snat_port_reuse_ms"), "{e}");
        // The XDP fast path: off by default, on only with redirect.
        assert!(!d.xdp);
        let (cfg, _) = Config::load("[dataplane]\nxdp = true\n").unwrap();
        assert!(cfg.dataplane.xdp);
        let e = err("[dataplane]\nxdp = true\nredirect = false\n");
        assert_eq!(e.field, "dataplane.xdp", "{e}");
        assert!(e.message.contains("redirect"), "{e}");
        let e = err("[dataplane]\nxdp = \"yes\"\n");
        assert!(e.field.starts_with("dataplane.xdp"), "{e}");
        let e = err("[dataplane]\nsnat_address = \"10.0.0\"\n");
        assert_eq!(e.field, "dataplane.snat_address (line 2)");
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            let e = err(&format!("[dataplane]\nsnat_address = \"{bad}\"\n"));
            assert_eq!(e.field, "dataplane.snat_address", "{bad}: {e}");
        }
        assert_eq!(
            "7-7".parse::<PortRange>().map(|r| r.len()),
            Ok(1),
            "a single port is a range"
        );
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
                "service[0].listen: \"{}…\" (1000 bytes) is not an ADDR:PORT ([ADDR]:PORT for IPv6)",
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
    fn docker_engines_parse_and_their_errors_name_the_field() {
        let base = r#"
[docker]
grace_secs = 5
[[docker.engine]]
name = "a"
endpoint = "unix:///var/run/docker.sock"
[[docker.engine]]
name = "b"
endpoint = "tcp://10.0.0.2:2375"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
docker = { image = "web", port = 8000, engines = ["b"] }
"#;
        let (cfg, _) = Config::load(base).unwrap();
        assert_eq!(cfg.docker.grace_secs, 5);
        let engines = cfg.docker.engines(&|_| None).unwrap();
        assert_eq!(
            engines.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(cfg.selectors()["web"].engines, ["b"]);
        assert_eq!(
            err(&base.replace("engines = [\"b\"]", "engines = [\"zz\"]")).field,
            "service[0].docker.engines[0]"
        );
        assert_eq!(
            err(&base.replace("tcp://10.0.0.2:2375", "tcp://10.0.0.2")).field,
            "docker.engine[1].endpoint"
        );
        assert_eq!(
            err(&base.replace("name = \"b\"", "name = \"b\"\ntls_verfy = true")).field,
            "docker.engine[1].tls_verfy (line 9)"
        );
        assert_eq!(
            err(&base.replace("grace_secs = 5", "grace_secs = 0")).field,
            "docker.grace_secs"
        );
        // The shorthand's one engine is "default".
        let e = err("[[service]]\nname = \"w\"\nlisten = \"0.0.0.0:80\"\n\
                     docker = { image = \"w\", port = 80, engines = [\"b\"] }\n");
        assert!(e.message.contains("engines: default"), "{e}");
    }

    #[test]
    fn empty_config_is_valid() {
        let (cfg, services) = Config::load("").unwrap();
        assert!(services.is_empty());
        assert_eq!(cfg.dataplane, DataplaneConfig::default());
    }
}
