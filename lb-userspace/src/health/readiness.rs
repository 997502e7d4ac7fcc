//! The readiness probe. A container that runs does not listen yet (its process is still
//! starting), and a client sent to it meanwhile is refused; so a new container backend, or a
//! new run of one (a restart), joins its pool only once a TCP connect to its address and port
//! succeeds. One task per backend run feeds the event loop, as the health checks do: a connect
//! every 100 ms until one succeeds; past the timeout it says so once and goes on every second.
//! A task is aborted when its backend goes away (or another run takes its address).
//!
//! Only container backends of TCP services are probed: nothing answers a UDP probe by
//! protocol, and configured backends are taken as they are (they were there before berth). A
//! service with a health check needs no probe either: a new backend starts unhealthy and joins
//! after `rise` passing checks, each of which connected to it; only a check told to start
//! healthy (`start_healthy = true`) would pool it at once, so those backends are probed.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::{
    sync::mpsc,
    task::AbortHandle,
    time::{Instant, MissedTickBehavior, interval, interval_at},
};

use super::{Failure, check::connect};
use crate::config::{Instance, Protocol, Service};

/// How often a new backend is tried until the timeout.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How often it is tried after the timeout.
pub const SLOW_PROBE_EVERY: Duration = Duration::from_secs(1);
/// The most one connect may take: a container on a local bridge answers within a millisecond,
/// and a SYN lost while its network comes up is better sent again by the next attempt than by
/// the kernel's retransmission a second later.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);

/// What a probe tells the event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub service: String,
    pub backend: SocketAddr,
    /// The container run probed (a report about an earlier run no longer counts).
    pub instance: Instance,
    pub outcome: ProbeOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A connect succeeded, `after` the probe started: the backend may join its pool.
    Ready { after: Duration },
    /// Nothing accepted a connection within the timeout (`last`: why the last attempt
    /// failed). The probe goes on, every second.
    Slow { last: Failure },
}

/// Tries a TCP connect to `backend` every [`PROBE_EVERY`] until one succeeds (reported, then
/// done); reports once when `timeout` passes without one, and tries every
/// [`SLOW_PROBE_EVERY`] from then on. The connection is closed at once: the backend sees a
/// connection open and close, as with a TCP health check. Ends when the receiver is gone;
/// aborted by [`Readiness`] when the backend goes away.
pub async fn probe(
    service: String,
    backend: SocketAddr,
    instance: Instance,
    timeout: Duration,
    tx: mpsc::Sender<ProbeReport>,
) {
    let started = Instant::now();
    let mut every = interval(PROBE_EVERY);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut slow = false;
    loop {
        every.tick().await;
        let attempt = match tokio::time::timeout(ATTEMPT_TIMEOUT, connect(backend)).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(Failure::Timeout),
        };
        let outcome = match attempt {
            Ok(()) => ProbeOutcome::Ready {
                after: started.elapsed(),
            },
            Err(last) if !slow && started.elapsed() >= timeout => {
                slow = true;
                every = interval_at(Instant::now() + SLOW_PROBE_EVERY, SLOW_PROBE_EVERY);
                every.set_missed_tick_behavior(MissedTickBehavior::Delay);
                ProbeOutcome::Slow { last }
            }
            Err(_) => continue,
        };
        let ready = matches!(outcome, ProbeOutcome::Ready { .. });
        let report = ProbeReport {
            service: service.clone(),
            backend,
            instance,
            outcome,
        };
        if tx.send(report).await.is_err() || ready {
            return;
        }
    }
}

/// A running probe's task, aborted when this is dropped.
struct Running(AbortHandle);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A backend run and its probe (None: passed).
struct Probe {
    instance: Instance,
    running: Option<Running>,
}

/// Owns one probe per (service, backend) run, and keeps the backends whose probe has not passed
/// out of the set handed to the reconciler.
pub struct Readiness {
    tx: mpsc::Sender<ProbeReport>,
    /// How long a probe tries every 100 ms; None: the probe is off.
    timeout: Option<Duration>,
    probes: HashMap<(String, SocketAddr), Probe>,
    /// (service address, protocol, backend) taken as ready without a probe: backends adopted
    /// from a running dataplane, which has been sending them traffic all along.
    presumed: HashSet<(SocketAddr, Protocol, SocketAddr)>,
}

impl Readiness {
    /// Probes reporting on `tx`, trying every 100 ms for `timeout` (None: no probes, every
    /// backend is ready as soon as it is wanted).
    pub fn new(tx: mpsc::Sender<ProbeReport>, timeout: Option<Duration>) -> Self {
        Self {
            tx,
            timeout,
            probes: HashMap::new(),
            presumed: HashSet::new(),
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Backends that join without a probe when they first appear (see `presumed`).
    pub fn presume_ready(
        &mut self,
        backends: impl IntoIterator<Item = (SocketAddr, Protocol, SocketAddr)>,
    ) {
        self.presumed.extend(backends);
    }

    /// Starts a probe for each container backend run not seen before, and aborts those whose
    /// backend is gone or whose address another run took. Must run inside a tokio runtime.
    pub fn sync(&mut self, services: &[Service]) {
        let Some(timeout) = self.timeout else {
            return;
        };
        let mut wanted = HashMap::new();
        let probed = |s: &&Service| {
            s.protocol == Protocol::Tcp && s.health.as_ref().is_none_or(|h| h.start_healthy)
        };
        for s in services.iter().filter(probed) {
            for addr in s.backends.iter().map(|b| &b.addr) {
                if let Some(&instance) = s.instances.get(addr) {
                    wanted.insert((s.name.clone(), *addr), (instance, s.listen));
                }
            }
        }
        // Dropping a running probe aborts its task.
        self.probes
            .retain(|key, p| wanted.get(key).is_some_and(|(i, _)| *i == p.instance));
        for (key, (instance, listen)) in wanted {
            if self.probes.contains_key(&key) {
                continue;
            }
            let running = if self.presumed.remove(&(listen, Protocol::Tcp, key.1)) {
                None
            } else {
                let task = tokio::spawn(probe(
                    key.0.clone(),
                    key.1,
                    instance,
                    timeout,
                    self.tx.clone(),
                ));
                Some(Running(task.abort_handle()))
            };
            self.probes.insert(key, Probe { instance, running });
        }
    }

    /// Whether `report` comes from a probe still running for a backend still wanted (not from
    /// one of a backend gone, or of an earlier run at its address).
    pub fn current(&self, report: &ProbeReport) -> bool {
        self.probes
            .get(&(report.service.clone(), report.backend))
            .is_some_and(|p| p.instance == report.instance && p.running.is_some())
    }

    /// Records a report; true when a backend's probe passed just now (it may join its pool).
    pub fn record(&mut self, report: &ProbeReport) -> bool {
        if !self.current(report) || !matches!(report.outcome, ProbeOutcome::Ready { .. }) {
            return false;
        }
        if let Some(p) = self
            .probes
            .get_mut(&(report.service.clone(), report.backend))
        {
            p.running = None;
        }
        true
    }

    /// Whether `backend` of `service` waits for its probe.
    pub fn waiting(&self, service: &str, backend: SocketAddr) -> bool {
        self.probes
            .get(&(service.to_owned(), backend))
            .is_some_and(|p| p.running.is_some())
    }

    /// `services` without the backends that wait for their probe, unless every backend of a
    /// service waits and `keep_all_waiting` (berth refuses clients of a service without
    /// backends, `dataplane.reject_without_backend`): then it keeps them all. With none ready, a
    /// client is refused either way (by berth for want of a backend, or by a container not
    /// listening yet), but the ones that do listen answer; leaving them out would refuse
    /// everyone until the first probe passes. That is the case after Docker restarts a
    /// service's containers (dockerd killed without live-restore): each is a new run, probed
    /// anew, and berth's resync used to take every backend out for the probe's first round
    /// trip, refusing the requests of that moment although the containers were serving. Where
    /// berth drops a client's SYN instead (so that it retries a second later), a container not
    /// listening yet would refuse it at once: there they wait out of the pool as before.
    pub fn filter(&self, services: &[Service], keep_all_waiting: bool) -> Vec<Service> {
        services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                let name = s.name.clone();
                let all = s.backends.clone();
                s.backends.retain(|b| !self.waiting(&name, b.addr));
                if s.backends.is_empty() && keep_all_waiting {
                    s.backends = all;
                }
                s
            })
            .collect()
    }

    /// Aborts every probe.
    pub fn stop(&mut self) {
        self.probes.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::TcpListener};

    use super::*;

    /// A loopback port nothing listens on (yet): bound, then closed.
    fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn service(name: &str, protocol: Protocol, backends: &[(SocketAddr, Option<u64>)]) -> Service {
        Service {
            name: name.into(),
            listen: "10.99.0.1:80".parse().unwrap(),
            protocol,
            backends: backends
                .iter()
                .map(|(a, _)| crate::config::BackendSpec::dnat(*a, 1))
                .collect(),
            mode: None,
            health: None,
            instances: backends
                .iter()
                .filter_map(|(a, i)| Some((*a, Instance((*i)?))))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<ProbeReport>) -> ProbeReport {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report within 5 s")
            .expect("channel open")
    }

    #[tokio::test]
    async fn a_probe_reports_once_when_slow_then_when_the_port_opens() {
        let addr = closed_port();
        let (tx, mut rx) = mpsc::channel(4);
        let timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        tokio::spawn(probe("web".into(), addr, Instance(1), timeout, tx));
        let slow = next(&mut rx).await;
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        assert_eq!(
            slow,
            ProbeReport {
                service: "web".into(),
                backend: addr,
                instance: Instance(1),
                outcome: ProbeOutcome::Slow {
                    last: Failure::Refused
                },
            }
        );
        // Two more slow attempts fail without another report (it is said once); then the port
        // opens and the next attempt finds it.
        tokio::time::sleep(SLOW_PROBE_EVERY * 2 + Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "slow reported more than once");
        let _listener = TcpListener::bind(addr).unwrap();
        let opened = std::time::Instant::now();
        let ready = next(&mut rx).await;
        let ProbeOutcome::Ready { after } = ready.outcome else {
            panic!("{ready:?}");
        };
        assert!(after >= timeout, "{after:?}");
        assert!(opened.elapsed() <= SLOW_PROBE_EVERY + Duration::from_millis(500));
        // Done: nothing more is reported, and the task let go of the channel.
        assert!(rx.recv().await.is_none(), "the probe ended");
    }

    #[tokio::test]
    async fn container_backends_wait_for_their_probe_which_ends_with_them() {
        let addr = closed_port();
        let (tx, mut rx) = mpsc::channel(16);
        let mut r = Readiness::new(tx, Some(Duration::from_secs(10)));
        let configured: SocketAddr = "10.20.0.11:8000".parse().unwrap();
        let web = |instance| {
            service(
                "web",
                Protocol::Tcp,
                &[(addr, Some(instance)), (configured, None)],
            )
        };
        // A health-checked service's backends wait for their checks' rise instead (unless the
        // check starts them healthy).
        let mut checked = service("api", Protocol::Tcp, &[(addr, Some(1))]);
        checked.health = Some(crate::config::HealthConfig {
            kind: crate::config::CheckKind::Tcp,
            path: "/".into(),
            expect_status: None,
            expect_string: None,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            start_healthy: false,
        });
        r.sync(std::slice::from_ref(&checked));
        assert!(!r.waiting("api", addr));
        checked.health.as_mut().unwrap().start_healthy = true;
        r.sync(std::slice::from_ref(&checked));
        assert!(
            r.waiting("api", addr),
            "a check starting healthy gates nothing"
        );
        // A UDP service's container backend cannot be probed: it is taken as it is.
        let dns = service(
            "dns",
            Protocol::Udp,
            &[("10.20.0.12:53".parse().unwrap(), Some(9))],
        );
        r.sync(&[web(1), dns.clone()]);
        assert!(r.waiting("web", addr));
        let kept = r.filter(&[web(1), dns.clone()], true);
        assert_eq!(
            kept[0].backends,
            vec![crate::config::BackendSpec::dnat(configured, 1)],
            "only the configured backend"
        );
        assert_eq!(kept[1], dns);

        // Alone in its service, a waiting backend is kept (no backend is ready to take its
        // place); beside a ready one it is not.
        let alone = service("web", Protocol::Tcp, &[(addr, Some(1))]);
        assert_eq!(
            r.filter(std::slice::from_ref(&alone), true),
            vec![alone.clone()]
        );
        assert_eq!(
            r.filter(std::slice::from_ref(&alone), false)[0].backends,
            vec![],
            "where berth drops SYNs for want of a backend, it waits out of the pool"
        );
        let other = closed_port();
        let pair = service("web", Protocol::Tcp, &[(addr, Some(1)), (other, Some(1))]);
        r.sync(std::slice::from_ref(&pair));
        assert!(r.waiting("web", addr) && r.waiting("web", other));
        assert_eq!(
            r.filter(std::slice::from_ref(&pair), true)[0]
                .backends
                .len(),
            2,
            "every backend waits: all kept"
        );
        r.sync(&[web(1), dns.clone()]);

        // The container goes before it listens: its probe is aborted, so a port that opens
        // afterwards sees no connection and nothing is reported.
        r.sync(&[]);
        assert!(!r.waiting("web", addr));
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        tokio::time::sleep(PROBE_EVERY * 4).await;
        assert!(rx.try_recv().is_err(), "a probe of a backend gone reported");
        assert!(
            listener.accept().is_err(),
            "a probe of a backend gone connected"
        );

        // Back (listening now): in the pool after its first connect.
        r.sync(&[web(1)]);
        let report = next(&mut rx).await;
        assert!(r.current(&report));
        assert!(r.record(&report), "{report:?}");
        assert!(!r.waiting("web", addr));
        assert_eq!(r.filter(&[web(1)], true)[0].backends.len(), 2);
        assert!(!r.record(&report), "recorded once");

        // Another run of the container at the same address is probed anew, and a report of
        // the earlier run does not count for it.
        r.sync(&[web(2)]);
        assert!(r.waiting("web", addr));
        assert!(!r.current(&report) && !r.record(&report));
        let report = next(&mut rx).await;
        assert_eq!(report.instance, Instance(2));
        assert!(r.record(&report));
        assert!(!r.waiting("web", addr));
    }

    #[tokio::test]
    async fn adopted_backends_and_a_probe_turned_off_wait_for_nothing() {
        let addr = closed_port();
        let web = service("web", Protocol::Tcp, &[(addr, Some(1))]);
        let (tx, mut rx) = mpsc::channel(4);
        let mut off = Readiness::new(tx.clone(), None);
        off.sync(std::slice::from_ref(&web));
        assert!(!off.waiting("web", addr));
        assert_eq!(
            off.filter(std::slice::from_ref(&web), false),
            vec![web.clone()]
        );

        let mut on = Readiness::new(tx, Some(Duration::from_secs(10)));
        on.presume_ready([(web.listen, Protocol::Tcp, addr)]);
        on.sync(std::slice::from_ref(&web));
        assert!(
            !on.waiting("web", addr),
            "an adopted backend waits for nothing"
        );
        tokio::time::sleep(PROBE_EVERY * 3).await;
        assert!(rx.try_recv().is_err(), "nothing was probed");
        // Once: a later run of it is probed.
        let mut again = web.clone();
        again.instances.insert(addr, Instance(2));
        on.sync(&[again]);
        assert!(on.waiting("web", addr));
    }
}
