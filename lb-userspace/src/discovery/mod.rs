//! Docker discovery: a full listing of running containers, then the event stream; each container
//! event is answered with a fresh inspect, so the order events arrive in does not matter. When
//! the stream ends (dockerd restarted, socket gone) discovery reconnects with backoff and sends a
//! new full snapshot, which replaces everything known before (containers that vanished meanwhile
//! are dropped).
//!
//! What the containers mean for services (selectors, labels) is decided in [`services`], a pure
//! function with unit tests.

mod docker;
pub mod etcd;
mod labels;
mod select;

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::config::{Instance, Protocol};

pub use docker::run;
pub use labels::*;
pub use select::{backend_bridges, services};

/// What berth needs to know about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
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
    /// Network name -> IPv4 address, for the networks the container is attached to.
    pub networks: BTreeMap<String, Ipv4Addr>,
    /// Network name -> the host bridge interface behind it (bridge-driver networks only).
    pub bridges: BTreeMap<String, String>,
    /// When this run of the container started (Docker's `State.StartedAt`): with the id, what
    /// tells a restarted container from the run berth saw before.
    pub started_at: String,
}

impl ContainerInfo {
    /// This run of this container, as a backend's identity.
    pub fn instance(&self) -> Instance {
        Instance::of(&self.id, &self.started_at)
    }

    /// Whether the container may take traffic: running and not reported unhealthy by its own
    /// HEALTHCHECK (one still "starting" is served, once berth's readiness probe passes).
    pub fn serving(&self) -> bool {
        self.running && self.health.as_deref() != Some("unhealthy")
    }

    /// The address on `network`, or on the first network (by name) when none is named.
    pub fn address(&self, network: Option<&str>) -> Option<Ipv4Addr> {
        match network {
            Some(n) => self.networks.get(n).copied(),
            None => self.networks.values().next().copied(),
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

/// What discovery tells the daemon.
#[derive(Debug, Clone)]
pub enum Event {
    /// Everything running now; replaces all earlier knowledge.
    Snapshot(Vec<ContainerInfo>),
    /// A container changed; with the event's Docker timestamp (ns since the epoch).
    Upsert(ContainerInfo, Option<i64>),
    Remove(String, Option<i64>),
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
    use crate::config::{DockerSelector, Service};

    fn c(name: &str, image: &str, labels: &[(&str, &str)], ip: [u8; 4]) -> ContainerInfo {
        ContainerInfo {
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
            networks: [("bridge".to_owned(), Ipv4Addr::from(ip))]
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
        }];
        let selectors: HashMap<_, _> = [(
            "web".to_owned(),
            DockerSelector {
                image: Some("local/nodeapp".into()),
                labels: BTreeMap::new(),
                port: 8000,
                network: None,
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
        .map(|c| (c.id.clone(), c))
        .collect();
        let host: std::collections::HashSet<_> = [(Protocol::Tcp, 22)].into_iter().collect();
        let mut containers = containers;
        let ssh = c("ssh", "x", &[("berth.port", "22")], [10, 0, 0, 11]);
        containers.insert(ssh.id.clone(), ssh);
        let (svcs, problems) = services(&configured, &selectors, &containers, true, &host);
        let web = &svcs[0];
        assert_eq!(
            web.backends,
            vec![
                ("10.0.0.2:8000".parse().unwrap(), 1),
                ("10.0.0.3:8000".parse().unwrap(), 1),
                ("10.0.0.10:8000".parse().unwrap(), 1)
            ],
            "running and starting containers serve; unhealthy and stopped ones do not"
        );
        // Each container backend carries the run of its container, the configured ones none.
        let a = &containers["id-a"];
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
        assert_eq!(lab.backends, vec![("10.0.0.5:80".parse().unwrap(), 1)]);
        assert_eq!(
            lab.instances.get(&"10.0.0.5:80".parse().unwrap()),
            Some(&containers["id-lab"].instance())
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
            backend_bridges(&svcs, &containers)
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["docker0".to_owned()]
        );
        let (svcs, problems) = services(&configured, &selectors, &containers, false, &host);
        assert_eq!(svcs.len(), 1);
        assert!(problems.is_empty());
    }
}
