//! What the maps should hold, as pure functions of what the daemon knows, and the policy that
//! decides when it is written.
//!
//! Desired services = the configured ones + what running containers add (by selector or by
//! label) - backends the health checks took out (that last step is
//! [`Supervisor::filter`](crate::health::Supervisor::filter), applied on the way to the
//! reconciler). The [`Hold`] keeps an adopted dataplane as it is until every Docker Engine has
//! listed its containers (or been lost past its grace), and remembers a failed write so the 1 s
//! tick retries it.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    config::{Config, Protocol, Service},
    discovery::{self, ContainerInfo, ContainerKey, EngineView, Event},
};

/// How long an adopted dataplane is held before berth warns that Docker has not answered.
pub const HOLD_WARNING_AFTER: Duration = Duration::from_secs(10);

/// The configured services plus what the containers of every engine add, and the problems
/// found with containers (bad labels, no address, a port that is taken or not published).
/// `has_file`: label services are on by default only without a config file.
pub fn services(
    cfg: &Config,
    configured: &[Service],
    containers: &BTreeMap<ContainerKey, ContainerInfo>,
    engines: &BTreeMap<String, EngineView>,
    has_file: bool,
    host: &Host,
    previous: &[Service],
) -> (Vec<Service>, Vec<String>) {
    let (mut services, mut problems) = discovery::services(
        configured,
        &cfg.selectors(),
        containers,
        engines,
        label_services(cfg, has_file, host.ipv6),
        &host.ports,
    );
    if !cfg.dataplane.redirect {
        problems.extend(without_full_nat(&mut services));
    }
    problems.extend(fit(
        &mut services,
        configured,
        previous,
        cfg.dataplane.max_services,
    ));
    (services, problems)
}

/// With `dataplane.redirect = false` full NAT cannot work (the stack drops packets whose
/// source is this host's own address), and a configured `mode = "fullnat"` is refused at load;
/// what is left are other hosts' containers, full NAT by default: they are left out, each
/// named.
fn without_full_nat(services: &mut [Service]) -> Vec<String> {
    let mut problems = Vec::new();
    for s in services {
        s.backends.retain(|b| {
            let full = b.nat == crate::config::Nat::Full;
            if full {
                problems.push(format!(
                    "service {}: backend {} (another host's container) needs full NAT, which \
                     needs dataplane.redirect = true; not served (mode = \"dnat\" on the \
                     service serves it if berth is that host's gateway)",
                    s.name, b.addr
                ));
            }
            !full
        });
    }
    problems
}

/// Keeps the services within `max_services` (the configured ones always fit: the config
/// is refused otherwise). Label services (and the IPv6 halves `NAME.ipv6` they grow when a
/// container has IPv6) are added in this order: those already served (in `previous`) first,
/// then IPv4 ones before IPv6 halves, by name; one that does not fit is left out whole (no
/// slot, no map entry) and named with the limit, so a new container never displaces a
/// service that is served.
fn fit(
    services: &mut Vec<Service>,
    configured: &[Service],
    previous: &[Service],
    max: u32,
) -> Vec<String> {
    let max = max as usize;
    if services.len() <= max {
        return Vec::new();
    }
    let is_configured = |s: &Service| configured.iter().any(|c| c.name == s.name);
    let was = |s: &Service| previous.iter().any(|p| p.name == s.name);
    let (mut keep, mut extra): (Vec<Service>, Vec<Service>) = std::mem::take(services)
        .into_iter()
        .partition(|s| is_configured(s));
    extra.sort_by(|a, b| {
        (!was(a), a.listen.is_ipv6(), &a.name).cmp(&(!was(b), b.listen.is_ipv6(), &b.name))
    });
    let mut problems = Vec::new();
    for s in extra {
        if keep.len() < max {
            keep.push(s);
        } else {
            problems.push(format!(
                "service {} ({} {}, from container labels) is not served: dataplane.max_services \
                 = {max} services are served already; raise it",
                s.name, s.protocol, s.listen
            ));
        }
    }
    *services = keep;
    problems
}

/// What of this host the containers' services depend on.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The ports its own processes listen on (labels cannot take them).
    pub ports: HashSet<(Protocol, u16)>,
    /// Whether it has IPv6 ([`discovery::host_has_ipv6`]).
    pub ipv6: bool,
}

impl Host {
    /// This host as it is now.
    pub fn now() -> Self {
        Self {
            ports: discovery::host_ports(),
            ipv6: discovery::host_has_ipv6(),
        }
    }
}

/// Which label services the labels make: none unless `label_services` (default: without a
/// config file), dual stack when the host has IPv6 unless `label_ipv6 = false`.
pub fn label_services(cfg: &Config, has_file: bool, host_ipv6: bool) -> discovery::LabelServices {
    use discovery::LabelServices::*;
    match cfg.docker.label_services.unwrap_or(!has_file) {
        false => Off,
        true if cfg.docker.label_ipv6 && host_ipv6 => DualStack,
        true => Ipv4,
    }
}

/// Updates the known containers with engine `engine`'s `event` and says what changed, as the
/// reason the reconciler logs with its writes (None: the containers did not change). A listing
/// replaces only that engine's containers.
pub fn record(
    containers: &mut BTreeMap<ContainerKey, ContainerInfo>,
    engine: &str,
    event: &Event,
) -> Option<String> {
    Some(match event {
        Event::Snapshot(all, _) => {
            containers.retain(|(e, _), _| e != engine);
            containers.extend(
                all.iter()
                    .filter(|c| c.engine == engine)
                    .map(|c| (c.key(), c.clone())),
            );
            "docker: resync".to_owned()
        }
        Event::Upsert(c, _) => {
            let why = format!(
                "docker: container {} {}",
                c.name,
                if c.serving() {
                    "serving"
                } else if c.running {
                    "unhealthy"
                } else if c.paused {
                    "paused"
                } else {
                    "stopped"
                }
            );
            containers.insert(c.key(), c.clone());
            why
        }
        Event::Remove(id, _) => {
            let name = containers
                .remove(&(engine.to_owned(), id.clone()))
                .map_or_else(|| id.clone(), |c| c.name);
            format!("docker: container {name} gone")
        }
        Event::Lost { .. } => return None,
    })
}

/// Seconds from a Docker event's timestamp (ns since the epoch) to `now_ns`; never negative.
pub fn lag_seconds(event_ns: i64, now_ns: i64) -> f64 {
    (now_ns - event_ns).max(0) as f64 / 1e9
}

/// A reloaded config as it takes effect: `[docker]` stays as it was (the watcher runs with
/// it). The flag says whether `[dataplane]` or `[docker]` changed, which takes a restart
/// (`interfaces` aside: bridges are attached as they are found anyway).
pub fn reloaded(running: &Config, new: Config) -> (Config, bool) {
    let mut dataplane = running.dataplane.clone();
    dataplane.interfaces.clone_from(&new.dataplane.interfaces);
    let needs_restart =
        new.dataplane != dataplane || new.docker != running.docker || new.etcd != running.etcd;
    let mut cfg = new;
    cfg.docker = running.docker.clone();
    cfg.etcd = running.etcd.clone();
    (cfg, needs_restart)
}

/// When desired services are written: held while an adopted dataplane waits for Docker's first
/// listing (applying the config alone would drop every container backend for that moment), and
/// pending after a write that failed, until the tick retries it.
#[derive(Debug)]
pub struct Hold {
    holding: bool,
    pending: bool,
    since: Instant,
    warned: bool,
}

/// What the 1 s tick must do.
#[derive(Debug, PartialEq, Eq)]
pub struct Tick {
    /// Warn (once) that Docker has not answered while the pinned services are held.
    pub warn_hold: bool,
    /// Write the desired services again: the last write failed.
    pub retry: bool,
}

impl Hold {
    /// An adopted dataplane with Docker discovery on is held; anything else is written at once.
    pub fn new(adopted: bool, docker_on: bool, now: Instant) -> Self {
        Self {
            holding: adopted && docker_on,
            pending: false,
            since: now,
            warned: false,
        }
    }

    /// Whether the pinned services are kept as they are.
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Whether a write is owed (held, or failed).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Docker's first listing arrived: the held services may be written.
    pub fn release(&mut self) {
        self.holding = false;
    }

    /// Records a change of the desired services: `write` is called unless held, and returns
    /// whether the write failed.
    pub fn settle(&mut self, write: impl FnOnce() -> bool) {
        self.pending = self.holding || write();
    }

    /// What the tick at `now` must do.
    pub fn tick(&mut self, now: Instant) -> Tick {
        let warn_hold = self.holding
            && now.duration_since(self.since) > HOLD_WARNING_AFTER
            && !std::mem::replace(&mut self.warned, true);
        Tick {
            warn_hold,
            retry: self.pending && !self.holding,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::{config::BackendSpec, discovery::Reach};

    fn container(id: &str, running: bool, health: Option<&str>) -> ContainerInfo {
        ContainerInfo {
            engine: "default".into(),
            published: BTreeMap::new(),
            paused: false,
            id: id.into(),
            name: format!("app-{id}"),
            image: "local/app".into(),
            labels: [("berth.port", "8080"), ("berth.target-port", "8000")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            running,
            health: health.map(Into::into),
            networks: [(
                "bridge".to_owned(),
                Ipv4Addr::new(172, 17, 0, id.len() as u8 + 1).into(),
            )]
            .into_iter()
            .collect(),
            bridges: BTreeMap::new(),
            started_at: "2026-12-03T09:00:00.000000000Z".into(),
        }
    }

    fn configured() -> Vec<Service> {
        vec![Service {
            name: "db".into(),
            listen: "10.0.0.1:5432".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![BackendSpec::dnat("10.0.1.1:5432".parse().unwrap(), 1)],
            health: None,
            instances: BTreeMap::new(),
            mode: None,
        }]
    }

    fn local() -> Reach {
        Reach {
            address: None,
            local: true,
        }
    }

    #[test]
    fn desired_is_configured_plus_serving_containers() {
        let mut known = BTreeMap::new();
        record(
            &mut known,
            "default",
            &Event::Snapshot(
                vec![
                    container("a", true, Some("healthy")),
                    container("bb", true, Some("unhealthy")),
                    container("ccc", false, None),
                ],
                local(),
            ),
        );
        let no_ports = Host::default();
        let none = BTreeMap::new();
        let (s, problems) = services(
            &Config::default(),
            &configured(),
            &known,
            &none,
            false,
            &no_ports,
            &[],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0], configured()[0]);
        let web = &s[1];
        assert_eq!(web.listen, "0.0.0.0:8080".parse().unwrap());
        // Only the running container Docker does not call unhealthy serves.
        assert_eq!(
            web.backends,
            vec![BackendSpec::dnat(
                SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 2), 8000).into(),
                1
            )]
        );
        // With a config file, labels make no services unless turned on.
        let (s, _) = services(
            &Config::default(),
            &configured(),
            &known,
            &none,
            true,
            &no_ports,
            &[],
        );
        assert_eq!(s, configured());
    }

    #[test]
    fn label_services_are_dual_stack_when_the_host_has_ipv6_unless_turned_off() {
        use discovery::LabelServices::*;
        let cfg = |text: &str| Config::parse(text).unwrap();
        let none = cfg("");
        assert_eq!(label_services(&none, false, true), DualStack);
        assert_eq!(label_services(&none, false, false), Ipv4);
        assert_eq!(
            label_services(&none, true, true),
            Off,
            "a file turns them off"
        );
        let on = cfg("[docker]\nlabel_services = true\n");
        assert_eq!(label_services(&on, true, true), DualStack);
        let v4 = cfg("[docker]\nlabel_services = true\nlabel_ipv6 = false\n");
        assert_eq!(label_services(&v4, true, true), Ipv4);
        let e = Config::parse("[docker]\nlabel_ipv6 = \"no\"\n").unwrap_err();
        assert!(e.to_string().contains("label_ipv6"), "{e}");
    }

    #[test]
    fn a_label_cannot_take_a_port_the_host_listens_on() {
        let mut known = BTreeMap::new();
        record(
            &mut known,
            "default",
            &Event::Upsert(container("a", true, None), None),
        );
        let taken = Host {
            ports: HashSet::from([(Protocol::Tcp, 8080)]),
            ipv6: true,
        };
        let none = BTreeMap::new();
        let (s, problems) = services(&Config::default(), &[], &known, &none, false, &taken, &[]);
        assert!(s.is_empty(), "{s:?}");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    /// A container labelled for `port`, with an IPv6 address too when `v6`.
    fn labelled(id: &str, n: u8, port: u16, v6: bool) -> ContainerInfo {
        let mut c = container(id, true, None);
        c.labels.insert("berth.port".into(), port.to_string());
        c.networks.insert(
            "bridge".into(),
            discovery::NetAddrs {
                v4: Some(Ipv4Addr::new(172, 17, 0, n)),
                v6: v6.then(|| std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n))),
            },
        );
        c
    }

    #[test]
    fn label_services_beyond_max_services_are_left_out_whole_and_named() {
        let cfg = Config::parse("[dataplane]\nmax_services = 3\n").unwrap();
        let host = Host {
            ports: HashSet::new(),
            ipv6: true,
        };
        let none = BTreeMap::new();
        let names = |s: &[Service]| s.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        let mut known = BTreeMap::new();
        // db (configured) + tcp-9000 and its IPv6 half: 3, the limit.
        record(
            &mut known,
            "default",
            &Event::Upsert(labelled("a", 2, 9000, true), None),
        );
        let (first, problems) = services(&cfg, &configured(), &known, &none, false, &host, &[]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(names(&first), ["db", "tcp-9000", "tcp-9000.ipv6"]);
        // A new label service finds no room: it is left out (both halves), the served ones
        // stay, and the message names it and the limit.
        record(
            &mut known,
            "default",
            &Event::Upsert(labelled("bb", 3, 8000, true), None),
        );
        let (second, problems) = services(&cfg, &configured(), &known, &none, false, &host, &first);
        assert_eq!(names(&second), ["db", "tcp-9000", "tcp-9000.ipv6"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        for (p, name) in problems.iter().zip(["tcp-8000", "tcp-8000.ipv6"]) {
            assert!(
                p.starts_with(&format!("service {name} "))
                    && p.contains("dataplane.max_services = 3"),
                "{problems:?}"
            );
        }
        // Fresh (nothing served yet): IPv4 halves come before any IPv6 half.
        let (fresh, problems) = services(&cfg, &configured(), &known, &none, false, &host, &[]);
        assert_eq!(names(&fresh), ["db", "tcp-8000", "tcp-9000"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.contains(".ipv6")), "{problems:?}");
        // Room again (the served service's container left): the other one takes it.
        record(&mut known, "default", &Event::Remove("a".into(), None));
        let (third, problems) = services(&cfg, &configured(), &known, &none, false, &host, &second);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(names(&third), ["db", "tcp-8000", "tcp-8000.ipv6"]);
    }

    #[test]
    fn without_redirect_other_hosts_containers_are_left_out_and_named() {
        let cfg = Config::parse("[dataplane]\nredirect = false\n").unwrap();
        let mut far = labelled("a", 2, 8080, false);
        far.engine = "b".into();
        far.published
            .insert((Protocol::Tcp, 8000), (Ipv4Addr::UNSPECIFIED, 32768));
        let mut known = BTreeMap::new();
        record(&mut known, "b", &Event::Upsert(far, None));
        record(
            &mut known,
            "default",
            &Event::Upsert(labelled("bb", 3, 8080, false), None),
        );
        let engines: BTreeMap<_, _> = [(
            "b".to_owned(),
            EngineView {
                reach: Reach {
                    address: Some(Ipv4Addr::new(10, 0, 0, 12)),
                    local: false,
                },
                lost: false,
            },
        )]
        .into();
        let (s, problems) = services(&cfg, &[], &known, &engines, false, &Host::default(), &[]);
        let addrs: Vec<String> = s[0].backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(addrs, ["172.17.0.3:8000"], "only this host's container");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("10.0.0.12:32768")
                && problems[0].contains("dataplane.redirect = true"),
            "{problems:?}"
        );
        // With redirect (the default) both serve, the other host's by full NAT.
        let (s, problems) = services(
            &Config::default(),
            &[],
            &known,
            &engines,
            false,
            &Host::default(),
            &[],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s[0].backends.len(), 2);
    }

    #[test]
    fn events_update_the_containers_and_name_the_change() {
        let mut known = BTreeMap::new();
        let up = |c| Event::Upsert(c, Some(1));
        let mut rec = |e: &Event| record(&mut known, "default", e).unwrap_or_default();
        assert_eq!(
            rec(&up(container("a", true, Some("starting")))),
            "docker: container app-a serving"
        );
        assert_eq!(
            rec(&up(container("a", true, Some("unhealthy")))),
            "docker: container app-a unhealthy"
        );
        let mut paused = container("a", false, None);
        paused.paused = true;
        assert_eq!(rec(&up(paused)), "docker: container app-a paused");
        assert_eq!(
            rec(&up(container("a", false, None))),
            "docker: container app-a stopped"
        );
        assert_eq!(
            rec(&Event::Remove("a".into(), None)),
            "docker: container app-a gone"
        );
        // One never seen is named by its id.
        assert_eq!(
            rec(&Event::Remove("f00".into(), None)),
            "docker: container f00 gone"
        );
        rec(&up(container("a", true, None)));
        assert_eq!(
            rec(&Event::Snapshot(vec![container("b", true, None)], local())),
            "docker: resync"
        );
        assert_eq!(
            known.keys().collect::<Vec<_>>(),
            [&("default".to_owned(), "b".to_owned())]
        );
    }

    #[test]
    fn a_listing_replaces_only_its_own_engines_containers() {
        let mut known = BTreeMap::new();
        let on = |engine: &str, id: &str| {
            let mut c = container(id, true, None);
            c.engine = engine.into();
            c
        };
        let remote = Reach {
            address: Some(Ipv4Addr::new(10, 42, 2, 2)),
            local: false,
        };
        record(
            &mut known,
            "a",
            &Event::Snapshot(vec![on("a", "x"), on("a", "y")], local()),
        );
        // Same ids on another engine: other containers.
        record(
            &mut known,
            "b",
            &Event::Snapshot(vec![on("b", "x"), on("b", "z")], remote),
        );
        assert_eq!(known.len(), 4);
        record(
            &mut known,
            "b",
            &Event::Snapshot(vec![on("b", "w")], remote),
        );
        let keys: Vec<String> = known.keys().map(|(e, i)| format!("{e}/{i}")).collect();
        assert_eq!(keys, ["a/x", "a/y", "b/w"]);
        // A removal names its engine: b's x is long gone, a's x stays.
        record(&mut known, "b", &Event::Remove("x".into(), None));
        assert_eq!(known.len(), 3);
        record(&mut known, "a", &Event::Remove("x".into(), None));
        assert_eq!(known.len(), 2);
        // Losing an engine changes nothing by itself (the grace decides).
        assert_eq!(
            record(
                &mut known,
                "b",
                &Event::Lost {
                    error: "gone".into(),
                    last_contact: Instant::now()
                }
            ),
            None
        );
        assert_eq!(known.len(), 2);
    }

    #[test]
    fn lag_is_never_negative() {
        assert_eq!(lag_seconds(1_000_000_000, 3_500_000_000), 2.5);
        assert_eq!(lag_seconds(5, 1), 0.0);
    }

    #[test]
    fn reload_keeps_docker_and_flags_restart_only_changes() {
        let running = Config::default();
        let mut new = Config::default();
        new.dataplane.interfaces = vec!["eth1".into()];
        new.docker.socket = Some("/elsewhere.sock".into());
        let (cfg, restart) = reloaded(&running, new.clone());
        assert!(restart, "a [docker] change needs a restart");
        assert_eq!(cfg.docker, running.docker);
        assert_eq!(cfg.dataplane.interfaces, ["eth1"]);
        new.docker = running.docker.clone();
        assert!(!reloaded(&running, new.clone()).1, "interfaces alone");
        new.dataplane.drain_timeout_secs += 1;
        let (cfg, restart) = reloaded(&running, new);
        assert!(restart);
        // The new value is taken all the same (the drain runs on the loop).
        assert_eq!(
            cfg.dataplane.drain_timeout_secs,
            running.dataplane.drain_timeout_secs + 1
        );
    }

    #[test]
    fn a_fresh_dataplane_is_written_at_once() {
        let t0 = Instant::now();
        for (adopted, docker_on) in [(false, true), (false, false), (true, false)] {
            let mut h = Hold::new(adopted, docker_on, t0);
            let mut wrote = false;
            h.settle(|| {
                wrote = true;
                false
            });
            assert!(wrote && !h.pending());
            assert_eq!(
                h.tick(t0 + Duration::from_secs(60)),
                Tick {
                    warn_hold: false,
                    retry: false
                }
            );
        }
    }

    #[test]
    fn an_adopted_dataplane_is_held_until_dockers_first_listing() {
        let t0 = Instant::now();
        let mut h = Hold::new(true, true, t0);
        assert!(h.holding());
        h.settle(|| panic!("written while held"));
        assert!(h.pending());
        let quiet = Tick {
            warn_hold: false,
            retry: false,
        };
        assert_eq!(h.tick(t0 + Duration::from_secs(5)), quiet);
        // Docker silent past 10 s: one warning, never a retry while held.
        let warn = Tick {
            warn_hold: true,
            retry: false,
        };
        assert_eq!(h.tick(t0 + Duration::from_secs(11)), warn);
        assert_eq!(h.tick(t0 + Duration::from_secs(12)), quiet);
        // The listing releases it; the write that follows goes through.
        h.release();
        let mut wrote = false;
        h.settle(|| {
            wrote = true;
            false
        });
        assert!(wrote && !h.holding() && !h.pending());
    }

    #[test]
    fn a_failed_write_is_retried_by_the_tick_until_it_succeeds() {
        let t0 = Instant::now();
        let mut h = Hold::new(false, true, t0);
        h.settle(|| true);
        assert!(h.pending());
        let t = h.tick(t0 + Duration::from_secs(1));
        assert!(t.retry && !t.warn_hold);
        h.settle(|| true);
        assert!(h.tick(t0 + Duration::from_secs(2)).retry);
        h.settle(|| false);
        assert!(!h.tick(t0 + Duration::from_secs(3)).retry);
    }
}
