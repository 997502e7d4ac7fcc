//! Docker discovery: one watcher per Docker Engine ([`docker::run`], connected through
//! [`EngineClient`]): a full listing of running containers, then the event stream; each
//! container event is answered with a fresh inspect, so the order events arrive in does not
//! matter. When the stream ends or the engine stops answering, discovery says so
//! ([`Event::Lost`]), reconnects with backoff and sends a new full snapshot, which replaces
//! everything known before of that engine (containers that vanished meanwhile are dropped).
//!
//! What the containers mean for services (selectors, labels) is decided in [`services`], a pure
//! function with unit tests.

mod docker;
mod engine;
pub mod etcd;
mod labels;
mod select;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use crate::config::{Instance, Protocol};

pub use docker::run;
pub(crate) use docker::{CONNECT_TIMEOUT, PING_INTERVAL, PING_TIMEOUT};
pub use engine::{EngineClient, Reach};
pub use labels::*;
pub use select::{EngineView, LabelServices, backend_bridges, container_at, services};

/// What berth needs to know about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The engine it runs on (its name; container ids are unique only per engine).
    pub engine: String,
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// The image as given to `docker run` (e.g. `local/nodeapp` or `local/nodeapp:1.2`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Running and not paused.
    pub running: bool,
    /// Paused (`docker pause`): not running for berth's purposes, but not stopped either.
    pub paused: bool,
    /// Docker's own HEALTHCHECK verdict, if the image has one: "starting", "healthy", "unhealthy".
    pub health: Option<String>,
    /// Network name -> the container's addresses on it, for the networks it is attached to.
    pub networks: BTreeMap<String, NetAddrs>,
    /// Network name -> the host bridge interface behind it (bridge-driver networks only).
    pub bridges: BTreeMap<String, String>,
    /// When this run of the container started (Docker's `State.StartedAt`): with the id, what
    /// tells a restarted container from the run berth saw before.
    pub started_at: String,
    /// Published ports: (protocol, container port) -> (host address, host port), the host
    /// address `0.0.0.0` for every address of the engine's host (IPv4 bindings only).
    pub published: BTreeMap<(Protocol, u16), (Ipv4Addr, u16)>,
}

/// A container's addresses on one Docker network: IPv4 (`IPAddress`) and, on a network made
/// with `--ipv6`, IPv6 (`GlobalIPv6Address`; the link-local one is never a backend).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl NetAddrs {
    /// The address of the family `v6` says.
    pub fn of(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6.map(IpAddr::V6)
        } else {
            self.v4.map(IpAddr::V4)
        }
    }

    /// Whether `ip` is one of them.
    pub fn has(&self, ip: IpAddr) -> bool {
        self.of(ip.is_ipv6()) == Some(ip)
    }
}

impl From<Ipv4Addr> for NetAddrs {
    fn from(v4: Ipv4Addr) -> Self {
        Self {
            v4: Some(v4),
            v6: None,
        }
    }
}

/// A container's key in the daemon's bookkeeping: (engine, container id).
pub type ContainerKey = (String, String);

impl ContainerInfo {
    /// This run of this container, as a backend's identity.
    pub fn instance(&self) -> Instance {
        Instance::of(&self.id, &self.started_at)
    }

    /// Its key among the containers of every engine.
    pub fn key(&self) -> ContainerKey {
        (self.engine.clone(), self.id.clone())
    }

    /// Whether the container may take traffic: running and not reported unhealthy by its own
    /// HEALTHCHECK (one still "starting" is served, once berth's readiness probe passes).
    pub fn serving(&self) -> bool {
        self.running && self.health.as_deref() != Some("unhealthy")
    }

    /// The address of the family `v6` says on `network`, or on the first network (by name)
    /// with an address of that family when none is named.
    pub fn address(&self, network: Option<&str>, v6: bool) -> Option<IpAddr> {
        match network {
            Some(n) => self.networks.get(n)?.of(v6),
            None => self.networks.values().find_map(|a| a.of(v6)),
        }
    }

    /// Whether the container runs `image` (`name` matches `name`, `name:tag`; `name:tag` matches
    /// only itself).
    pub fn runs_image(&self, image: &str) -> bool {
        self.image == image
            || (!image.contains(':')
                && self
                    .image
                    .strip_prefix(image)
                    .is_some_and(|t| t.starts_with(':')))
            || (!image.contains(':')
                && !self.image.contains(':')
                && self.image == format!("{image}:latest"))
    }
}

/// Whether a `kill` event's signal ends the container (TERM, INT, KILL; by number or name).
pub(crate) fn is_stop_signal(signal: Option<&String>) -> bool {
    docker::is_stop_signal(signal)
}

/// What an engine's watcher tells the daemon.
#[derive(Debug, Clone)]
pub enum Event {
    /// The engine answered (again): everything running on it now, which replaces all earlier
    /// knowledge of its containers, and where they are reached.
    Snapshot(Vec<ContainerInfo>, Reach),
    /// A container changed; with the event's Docker timestamp (ns since the epoch).
    Upsert(ContainerInfo, Option<i64>),
    /// A container is gone (by id, on this engine).
    Remove(String, Option<i64>),
    /// The engine stopped answering (its stream ended, a ping failed, it cannot be reached):
    /// what went wrong and when it last answered. Its containers are kept as they were until
    /// the grace runs out.
    Lost {
        error: String,
        last_contact: Instant,
    },
}

/// An [`Event`] of the engine named `engine`.
#[derive(Debug, Clone)]
pub struct EngineEvent {
    pub engine: String,
    pub event: Event,
}

/// Whether this host has IPv6: the kernel's IPv6 is on in the namespace berth runs in
/// (`net.ipv6.conf.all.disable_ipv6` = 0, the file absent when IPv6 is not built in or is
/// disabled at boot with `ipv6.disable=1`).
pub fn host_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// The TCP ports some process on this host listens on and the UDP ports bound, from
/// /proc/net/{tcp,tcp6,udp,udp6} (of the namespace berth runs in).
pub fn host_ports() -> std::collections::HashSet<(Protocol, u16)> {
    let mut out = std::collections::HashSet::new();
    for (file, proto, state) in [
        ("/proc/net/tcp", Protocol::Tcp, "0A"),
        ("/proc/net/tcp6", Protocol::Tcp, "0A"),
        ("/proc/net/udp", Protocol::Udp, "07"),
        ("/proc/net/udp6", Protocol::Udp, "07"),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 3
                && f[3] == state
                && let Some(port) = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                out.insert((proto, port));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{docker::is_stop_signal, *};
    use crate::config::{BackendSpec, DockerSelector, Nat, Service};
    use crate::discovery::{EngineView, Reach};

    fn c(name: &str, image: &str, labels: &[(&str, &str)], ip: [u8; 4]) -> ContainerInfo {
        ContainerInfo {
            engine: "default".into(),
            published: BTreeMap::new(),
            paused: false,
            id: format!("id-{name}"),
            name: name.into(),
            image: image.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            health: None,
            networks: [("bridge".to_owned(), Ipv4Addr::from(ip).into())]
                .into_iter()
                .collect(),
            bridges: [("bridge".to_owned(), "docker0".to_owned())]
                .into_iter()
                .collect(),
            started_at: "2026-12-03T09:00:00.000000000Z".into(),
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_parsing() {
        assert_eq!(parse_labels(&labels(&[("other", "x")])), Ok(None));
        let ls = parse_labels(&labels(&[
            ("berth.port", "8080"),
            ("berth.target-port", "8000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (ls.port, ls.target_port, ls.weight, ls.protocol),
            (8080, 8000, 1, Protocol::Tcp)
        );
        assert_eq!(ls.service, "tcp-8080");
        let ls = parse_labels(&labels(&[
            ("berth.port", "53"),
            ("berth.protocol", "udp"),
            ("berth.weight", "3"),
            ("berth.service", "dns"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (ls.target_port, ls.weight, ls.service.as_str()),
            (53, 3, "dns")
        );
        for (k, v, needle) in [
            ("berth.port", "http", "berth.port=\"http\""),
            ("berth.port", "0", "berth.port"),
            ("berth.port", "70000", "berth.port"),
        ] {
            let e = parse_labels(&labels(&[(k, v)])).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e =
            parse_labels(&labels(&[("berth.port", "80"), ("berth.weight", "lots")])).unwrap_err();
        assert!(e.contains("berth.weight"), "{e}");
        let e =
            parse_labels(&labels(&[("berth.port", "80"), ("berth.protocol", "sctp")])).unwrap_err();
        assert!(e.contains("berth.protocol"), "{e}");
        let e =
            parse_labels(&labels(&[("berth.port", "80"), ("berth.service", "a b")])).unwrap_err();
        assert!(e.contains("berth.service"), "{e}");
        // Health labels.
        let ls = parse_labels(&labels(&[
            ("berth.port", "80"),
            ("berth.health", "http"),
            ("berth.health.path", "/ping"),
            ("berth.health.expect-string", "Hello"),
            ("berth.health.interval-ms", "500"),
            ("berth.health.fall", "2"),
        ]))
        .unwrap()
        .unwrap();
        let h = ls.health.unwrap();
        assert_eq!(
            (
                h.path.as_str(),
                h.expect_string.as_deref(),
                h.interval_ms,
                h.fall,
                h.rise
            ),
            ("/ping", Some("Hello"), 500, 2, 2)
        );
        for (k, v, needle) in [
            ("berth.health", "icmp", "berth.health="),
            ("berth.health.rise", "0", "berth.health.rise"),
            (
                "berth.health.interval-ms",
                "soon",
                "berth.health.interval-ms",
            ),
            ("berth.health.path", "ping", "berth.health.path"),
        ] {
            let mut l: BTreeMap<String, String> =
                labels(&[("berth.port", "80"), ("berth.health", "http")]);
            l.insert(k.into(), v.into());
            let e = parse_labels(&l).unwrap_err();
            assert!(e.contains(needle), "{k}={v}: {e}");
        }
    }

    #[test]
    fn image_matching() {
        let x = c("a", "local/nodeapp", &[], [10, 0, 0, 2]);
        assert!(x.runs_image("local/nodeapp"));
        assert!(!x.runs_image("local/node"));
        let y = c("b", "local/nodeapp:1.2", &[], [10, 0, 0, 3]);
        assert!(y.runs_image("local/nodeapp") && y.runs_image("local/nodeapp:1.2"));
        assert!(!y.runs_image("local/nodeapp:1.3"));
    }

    #[test]
    fn selectors_and_labels_make_services() {
        let configured = vec![Service {
            name: "web".into(),
            listen: "0.0.0.0:8080".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![],
            health: None,
            instances: BTreeMap::new(),
            mode: None,
        }];
        let selectors: HashMap<_, _> = [(
            "web".to_owned(),
            DockerSelector {
                image: Some("local/nodeapp".into()),
                labels: BTreeMap::new(),
                port: 8000,
                network: None,
                engines: vec![],
            },
        )]
        .into_iter()
        .collect();
        let mut unhealthy = c("sick", "local/nodeapp", &[], [10, 0, 0, 9]);
        unhealthy.health = Some("unhealthy".into());
        let mut starting = c("new", "local/nodeapp", &[], [10, 0, 0, 10]);
        starting.health = Some("starting".into());
        let mut stopped = c("off", "local/nodeapp", &[], [10, 0, 0, 8]);
        stopped.running = false;
        let containers: BTreeMap<_, _> = [
            c("a", "local/nodeapp", &[], [10, 0, 0, 2]),
            c("b", "local/nodeapp:2", &[], [10, 0, 0, 3]),
            c("other", "local/else", &[], [10, 0, 0, 4]),
            c(
                "lab",
                "x",
                &[("berth.port", "9090"), ("berth.target-port", "80")],
                [10, 0, 0, 5],
            ),
            c("bad", "x", &[("berth.port", "nine")], [10, 0, 0, 6]),
            c("steal", "x", &[("berth.port", "8080")], [10, 0, 0, 7]),
            unhealthy,
            stopped,
            starting,
        ]
        .into_iter()
        .map(|c| (c.key(), c))
        .collect();
        let host: std::collections::HashSet<_> = [(Protocol::Tcp, 22)].into_iter().collect();
        let mut containers = containers;
        let ssh = c("ssh", "x", &[("berth.port", "22")], [10, 0, 0, 11]);
        containers.insert(ssh.key(), ssh);
        let none = BTreeMap::new();
        let (svcs, problems) = services(
            &configured,
            &selectors,
            &containers,
            &none,
            LabelServices::Ipv4,
            &host,
        );
        let web = &svcs[0];
        assert_eq!(
            web.backends,
            vec![
                BackendSpec::dnat("10.0.0.2:8000".parse().unwrap(), 1),
                BackendSpec::dnat("10.0.0.3:8000".parse().unwrap(), 1),
                BackendSpec::dnat("10.0.0.10:8000".parse().unwrap(), 1)
            ],
            "running and starting containers serve; unhealthy and stopped ones do not"
        );
        // Each container backend carries the run of its container, the configured ones none.
        let a = &containers[&("default".to_owned(), "id-a".to_owned())];
        assert_eq!(
            web.instances.get(&"10.0.0.2:8000".parse().unwrap()),
            Some(&a.instance())
        );
        assert_eq!(web.instances.len(), 3);
        let mut restarted = a.clone();
        restarted.started_at = "2026-12-03T09:00:05.000000000Z".into();
        assert_ne!(restarted.instance(), a.instance(), "a restart is a new run");
        let mut other = a.clone();
        other.id = "id-a2".into();
        assert_ne!(other.instance(), a.instance(), "another container");
        assert!(is_stop_signal(Some(&"15".into())) && is_stop_signal(Some(&"SIGKILL".into())));
        assert!(!is_stop_signal(Some(&"1".into())) && !is_stop_signal(None));
        let lab = svcs
            .iter()
            .find(|s| s.name == "tcp-9090")
            .expect("label service");
        assert_eq!(
            lab.backends,
            vec![BackendSpec::dnat("10.0.0.5:80".parse().unwrap(), 1)]
        );
        assert_eq!(
            lab.instances.get(&"10.0.0.5:80".parse().unwrap()),
            Some(&containers[&("default".to_owned(), "id-lab".to_owned())].instance())
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("container ssh") && p.contains("in use by a process"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("container bad") && p.contains("berth.port"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("container steal") && p.contains("configured service"))
        );
        // Without label services, labels are ignored.
        assert_eq!(
            backend_bridges(&svcs, &containers, &none)
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["docker0".to_owned()]
        );
        let (svcs, problems) = services(
            &configured,
            &selectors,
            &containers,
            &none,
            LabelServices::Off,
            &host,
        );
        assert_eq!(svcs.len(), 1);
        assert!(problems.is_empty());
        // A service's `mode` applies to the containers it selects too.
        let mut full = configured.clone();
        full[0].mode = Some(Nat::Full);
        let (svcs, _) = services(
            &full,
            &selectors,
            &containers,
            &none,
            LabelServices::Off,
            &host,
        );
        assert_eq!(svcs[0].backends.len(), 3);
        assert!(svcs[0].backends.iter().all(|b| b.nat == Nat::Full));
    }

    fn web(health: bool, mode: Option<Nat>) -> Service {
        Service {
            name: "web".into(),
            listen: "0.0.0.0:8080".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![],
            instances: BTreeMap::new(),
            health: health.then(|| crate::config::HealthConfig {
                kind: crate::config::CheckKind::Tcp,
                path: "/".into(),
                expect_status: None,
                expect_string: None,
                interval_ms: 1000,
                timeout_ms: 500,
                rise: 1,
                fall: 2,
                start_healthy: false,
            }),
            mode,
        }
    }

    fn on(
        engine: &str,
        id: &str,
        name: &str,
        ip: [u8; 4],
        published: Option<(Ipv4Addr, u16)>,
    ) -> ContainerInfo {
        let mut x = c(name, "local/nodeapp", &[], ip);
        x.engine = engine.into();
        x.id = id.into();
        if let Some(p) = published {
            x.published.insert((Protocol::Tcp, 8000), p);
        }
        x
    }

    #[test]
    fn containers_of_other_hosts_are_reached_at_their_published_ports() {
        let selectors: HashMap<_, _> = [(
            "web".to_owned(),
            DockerSelector {
                image: Some("local/nodeapp".into()),
                labels: BTreeMap::new(),
                port: 8000,
                network: None,
                engines: vec![],
            },
        )]
        .into_iter()
        .collect();
        let remote = |a: [u8; 4]| EngineView {
            reach: Reach {
                address: Some(Ipv4Addr::from(a)),
                local: false,
            },
            lost: false,
        };
        let mut engines = BTreeMap::from([
            (
                "a".to_owned(),
                EngineView {
                    reach: Reach {
                        address: None,
                        local: true,
                    },
                    lost: false,
                },
            ),
            ("b".to_owned(), remote([10, 42, 2, 2])),
            ("c".to_owned(), remote([10, 42, 3, 2])),
            (
                "nowhere".to_owned(),
                EngineView {
                    reach: Reach {
                        address: None,
                        local: false,
                    },
                    lost: false,
                },
            ),
        ]);
        let any = Some((Ipv4Addr::UNSPECIFIED, 32768));
        let containers: BTreeMap<_, _> = [
            // Container ids are only unique per engine.
            on("a", "same-id", "a1", [172, 17, 0, 2], any),
            on("b", "same-id", "b1", [172, 17, 0, 2], any),
            on(
                "c",
                "same-id",
                "c1",
                [172, 30, 3, 2],
                Some((Ipv4Addr::new(10, 42, 3, 9), 40000)),
            ),
            // Not published: named and skipped.
            on("c", "c2", "c2", [172, 30, 3, 3], None),
            // Published on loopback only: unreachable from here.
            on(
                "c",
                "c3",
                "c3",
                [172, 30, 3, 4],
                Some((Ipv4Addr::LOCALHOST, 40001)),
            ),
            on("nowhere", "n1", "n1", [172, 30, 4, 2], any),
        ]
        .into_iter()
        .map(|c| (c.key(), c))
        .collect();
        assert_eq!(
            containers.len(),
            6,
            "same id on two engines: two containers"
        );
        let host = std::collections::HashSet::new();
        let (svcs, problems) = services(
            &[web(false, None)],
            &selectors,
            &containers,
            &engines,
            LabelServices::Off,
            &host,
        );
        let addrs: Vec<(String, Nat)> = svcs[0]
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.nat))
            .collect();
        assert_eq!(
            addrs,
            [
                ("10.42.2.2:32768".to_owned(), Nat::Full),
                ("10.42.3.9:40000".to_owned(), Nat::Full),
                ("172.17.0.2:8000".to_owned(), Nat::Dnat),
            ]
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        for (name, why) in [
            ("c2", "tcp port 8000 is not published"),
            ("c3", "published on 127.0.0.1 only"),
            ("n1", "address is unknown"),
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains(&format!("container {name} on engine")) && p.contains(why)),
                "{name}: {problems:?}"
            );
        }
        // The status finds each container behind its backend.
        let at = |a: &str| {
            container_at(&containers, &engines, a.parse().unwrap()).map(|c| c.name.clone())
        };
        assert_eq!(at("10.42.2.2:32768").as_deref(), Some("b1"));
        assert_eq!(at("172.17.0.2:8000").as_deref(), Some("a1"));
        assert_eq!(at("10.42.3.9:40000").as_deref(), Some("c1"));
        assert_eq!(at("10.42.3.2:40000"), None);
        // Only this host's containers have bridges to attach to.
        assert_eq!(backend_bridges(&svcs, &containers, &engines).len(), 1);
        // mode = "dnat": the service's backends on other hosts are reached by DNAT.
        let (svcs, _) = services(
            &[web(false, Some(Nat::Dnat))],
            &selectors,
            &containers,
            &engines,
            LabelServices::Off,
            &host,
        );
        assert!(svcs[0].backends.iter().all(|b| b.nat == Nat::Dnat));
        // A selector limited to engines b and c.
        let mut only = selectors.clone();
        only.get_mut("web").unwrap().engines = vec!["b".into()];
        let (svcs, _) = services(
            &[web(false, None)],
            &only,
            &containers,
            &engines,
            LabelServices::Off,
            &host,
        );
        assert_eq!(svcs[0].backends.len(), 1);
        // Engine b lost past its grace: without a health check its backends leave; with one
        // they stay (the checks judge them).
        engines.get_mut("b").unwrap().lost = true;
        let (svcs, _) = services(
            &[web(false, None)],
            &selectors,
            &containers,
            &engines,
            LabelServices::Off,
            &host,
        );
        assert!(
            !svcs[0]
                .backends
                .iter()
                .any(|b| b.addr.ip() == Ipv4Addr::new(10, 42, 2, 2))
        );
        let (svcs, _) = services(
            &[web(true, None)],
            &selectors,
            &containers,
            &engines,
            LabelServices::Off,
            &host,
        );
        assert!(
            svcs[0]
                .backends
                .iter()
                .any(|b| b.addr.ip() == Ipv4Addr::new(10, 42, 2, 2))
        );
    }

    /// A container of image `local/nodeapp` on `nets`: (network, IPv4 last byte, IPv6 or
    /// none), each network's bridge `br-<network>`.
    fn dual(
        name: &str,
        labels: &[(&str, &str)],
        nets: &[(&str, u8, Option<&str>)],
    ) -> ContainerInfo {
        let mut x = c(name, "local/nodeapp", labels, [0, 0, 0, 0]);
        x.networks = nets
            .iter()
            .map(|&(n, b, v6)| {
                let addrs = NetAddrs {
                    v4: Some(Ipv4Addr::new(172, 31, 0, b)),
                    v6: v6.map(|a| a.parse().unwrap()),
                };
                (n.to_owned(), addrs)
            })
            .collect();
        x.bridges = nets
            .iter()
            .map(|&(n, ..)| (n.to_owned(), format!("br-{n}")))
            .collect();
        x
    }

    fn keyed(cs: Vec<ContainerInfo>) -> BTreeMap<ContainerKey, ContainerInfo> {
        cs.into_iter().map(|c| (c.key(), c)).collect()
    }

    fn addrs(s: &Service) -> Vec<String> {
        s.backends.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn a_dual_stack_service_takes_each_family_from_its_own_addresses() {
        let cfg = crate::config::Config::parse(
            "[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\nlisten6 = \"[::]:8080\"\n\
             docker = { image = \"local/nodeapp\", port = 8000 }\n\
             [[service]]\nname = \"six\"\nlisten = \"[fd00:99::1]:80\"\n\
             docker = { image = \"local/nodeapp\", port = 8000, network = \"v6net\" }\n",
        )
        .unwrap();
        let configured = cfg.validate().unwrap();
        let selectors = cfg.selectors();
        let mut keys: Vec<_> = selectors.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["six", "web", "web.ipv6"],
            "a dual-stack service's IPv6 half has its selector"
        );
        let mut remote = dual("far", &[], &[("v6net", 9, Some("fdbe::9"))]);
        remote.engine = "r".into();
        remote
            .published
            .insert((Protocol::Tcp, 8000), (Ipv4Addr::UNSPECIFIED, 32768));
        let containers = keyed(vec![
            dual("a", &[], &[("v6net", 2, Some("fdbe::2"))]),
            dual("b", &[], &[("v6net", 3, Some("fdbe::3"))]),
            // On an IPv4-only network: IPv4 backends only, and a warning for the IPv6 side.
            dual("old", &[], &[("bridge", 4, None)]),
            // On both: the first network (by name) with an address of each family.
            dual(
                "two",
                &[],
                &[("bridge", 5, None), ("v6net", 6, Some("fdbe::6"))],
            ),
            remote,
        ]);
        let engines = BTreeMap::from([(
            "r".to_owned(),
            EngineView {
                reach: Reach {
                    address: Some(Ipv4Addr::new(10, 42, 2, 2)),
                    local: false,
                },
                lost: false,
            },
        )]);
        let host = std::collections::HashSet::new();
        let (svcs, problems) = services(
            &configured,
            &selectors,
            &containers,
            &engines,
            LabelServices::Off,
            &host,
        );
        let by = |n: &str| svcs.iter().find(|s| s.name == n).unwrap();
        assert_eq!(
            addrs(by("web")),
            [
                "10.42.2.2:32768",
                "172.31.0.2:8000",
                "172.31.0.3:8000",
                "172.31.0.4:8000",
                "172.31.0.5:8000"
            ]
        );
        assert_eq!(by("web.ipv6").listen, "[::]:8080".parse().unwrap());
        assert_eq!(
            addrs(by("web.ipv6")),
            ["[fdbe::2]:8000", "[fdbe::3]:8000", "[fdbe::6]:8000"]
        );
        assert!(by("web.ipv6").backends.iter().all(|b| b.nat == Nat::Dnat));
        // Each IPv6 backend carries its container's run.
        assert_eq!(
            by("web.ipv6").instances[&"[fdbe::2]:8000".parse().unwrap()],
            containers[&("default".to_owned(), "id-a".to_owned())].instance()
        );
        // An IPv6-only service with a network named.
        assert_eq!(
            addrs(by("six")),
            ["[fdbe::2]:8000", "[fdbe::3]:8000", "[fdbe::6]:8000"]
        );
        // old: no IPv6 address (named once per IPv6 service); far: published ports are IPv4.
        let about = |who: &str, what: &str| {
            problems
                .iter()
                .filter(|p| p.contains(&format!("container {who}")) && p.contains(what))
                .count()
        };
        assert_eq!(
            about("old:", "no IPv6 address on any network"),
            1,
            "{problems:?}"
        );
        assert_eq!(about("old:", "no IPv6 address on v6net"), 1, "{problems:?}");
        assert_eq!(about("far on engine r", "IPv4 only"), 2, "{problems:?}");
        assert_eq!(problems.len(), 4, "{problems:?}");
        // The status finds the containers behind IPv6 backends, and the bridge of an
        // IPv6 backend's network is attached even when only its IPv6 side serves.
        let at = |a: &str| {
            container_at(&containers, &engines, a.parse().unwrap()).map(|c| c.name.clone())
        };
        assert_eq!(at("[fdbe::6]:8000").as_deref(), Some("two"));
        assert_eq!(at("[fdbe::7]:8000"), None);
        let only6: Vec<Service> = svcs
            .iter()
            .filter(|s| s.listen.is_ipv6())
            .cloned()
            .collect();
        assert_eq!(
            backend_bridges(&only6, &containers, &engines)
                .into_iter()
                .collect::<Vec<_>>(),
            ["br-v6net"]
        );
    }

    #[test]
    fn label_services_get_an_ipv6_half_when_their_containers_have_ipv6() {
        let l = &[("berth.port", "9090"), ("berth.target-port", "8000")];
        let old = &[("berth.port", "7070"), ("berth.target-port", "8000")];
        let containers = keyed(vec![
            dual("a", l, &[("v6net", 2, Some("fdbe::2"))]),
            dual("b", l, &[("bridge", 3, None)]),
            // A service none of whose containers has IPv6: IPv4 only, nothing to warn of.
            dual("c", old, &[("bridge", 4, None)]),
        ]);
        let none = BTreeMap::new();
        let host = std::collections::HashSet::new();
        let (svcs, problems) = services(
            &[],
            &HashMap::new(),
            &containers,
            &none,
            LabelServices::DualStack,
            &host,
        );
        let names: Vec<_> = svcs
            .iter()
            .map(|s| (s.name.as_str(), s.listen.to_string()))
            .collect();
        assert_eq!(
            names,
            [
                ("tcp-7070", "0.0.0.0:7070".to_owned()),
                ("tcp-9090", "0.0.0.0:9090".to_owned()),
                ("tcp-9090.ipv6", "[::]:9090".to_owned())
            ]
        );
        assert_eq!(addrs(&svcs[1]), ["172.31.0.2:8000", "172.31.0.3:8000"]);
        assert_eq!(addrs(&svcs[2]), ["[fdbe::2]:8000"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("container b: no IPv6 address"),
            "{problems:?}"
        );
        // IPv4 only (no IPv6 on the host, or label_ipv6 = false): no IPv6 halves.
        let (svcs, problems) = services(
            &[],
            &HashMap::new(),
            &containers,
            &none,
            LabelServices::Ipv4,
            &host,
        );
        assert!(svcs.iter().all(|s| s.listen.is_ipv4()), "{svcs:?}");
        assert_eq!(svcs.len(), 2);
        assert!(problems.is_empty(), "{problems:?}");
        // A host port taken keeps both halves away.
        let taken = [(Protocol::Tcp, 9090)].into_iter().collect();
        let (svcs, _) = services(
            &[],
            &HashMap::new(),
            &containers,
            &none,
            LabelServices::DualStack,
            &taken,
        );
        assert_eq!(svcs.len(), 1);
    }
}
