//! Active health checks: a TCP connect, or an HTTP GET with an expected status and/or a string
//! in the body, each with its own timeout, run concurrently per backend; a backend's state flips
//! only after `rise` consecutive passes or `fall` consecutive failures (HAProxy semantics).
//!
//! The checker is a trait with one real implementation (`NetChecker`); results feed a
//! [`HealthState`] per backend, and every state change is sent to the reconciler's loop.

use std::{fmt, net::SocketAddrV4};

pub use crate::config::{CheckKind, HealthConfig};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};

/// Why a check failed (logged once per state change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Timeout,
    Io(String),
    BadStatus(u16),
    MissingString,
    BadResponse,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Io(e) => write!(f, "{e}"),
            Failure::BadStatus(s) => write!(f, "unexpected HTTP status {s}"),
            Failure::MissingString => f.write_str("expected string not in body"),
            Failure::BadResponse => f.write_str("not an HTTP response"),
        }
    }
}

/// Runs one check against one backend.
pub trait Checker: Send + Sync + 'static {
    fn check(
        &self,
        addr: SocketAddrV4,
        cfg: &HealthConfig,
    ) -> impl std::future::Future<Output = Result<(), Failure>> + Send;
}

/// The real checker: TCP connect, or HTTP/1.0 GET over TCP.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetChecker;

/// The most of a response body an HTTP check reads.
const MAX_BODY: usize = 64 * 1024;

impl Checker for NetChecker {
    async fn check(&self, addr: SocketAddrV4, cfg: &HealthConfig) -> Result<(), Failure> {
        match tokio::time::timeout(cfg.timeout(), check_once(addr, cfg)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }
}

async fn check_once(addr: SocketAddrV4, cfg: &HealthConfig) -> Result<(), Failure> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        _ => Failure::Io(e.to_string()),
    })?;
    if cfg.kind == CheckKind::Tcp {
        return Ok(());
    }
    let req = format!(
        "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n",
        cfg.path
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| Failure::Io(e.to_string()))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while buf.len() < MAX_BODY {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::Io(e.to_string()))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    evaluate_http(&buf, cfg)
}

/// Judges a raw HTTP response against the expectations.
pub fn evaluate_http(resp: &[u8], cfg: &HealthConfig) -> Result<(), Failure> {
    let text = String::from_utf8_lossy(resp);
    let status_line = text.lines().next().ok_or(Failure::BadResponse)?;
    let mut parts = status_line.split_whitespace();
    let proto = parts.next().ok_or(Failure::BadResponse)?;
    if !proto.starts_with("HTTP/") {
        return Err(Failure::BadResponse);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(Failure::BadResponse)?;
    let status_ok = match cfg.expect_status {
        Some(want) => status == want,
        None => (200..400).contains(&status),
    };
    if !status_ok {
        return Err(Failure::BadStatus(status));
    }
    if let Some(want) = &cfg.expect_string {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !body.contains(want.as_str()) {
            return Err(Failure::MissingString);
        }
    }
    Ok(())
}

/// A backend's health as HAProxy counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl HealthState {
    pub fn new(start_healthy: bool) -> Self {
        Self {
            healthy: start_healthy,
            streak: 0,
        }
    }

    /// Records one result; returns true when the state flipped.
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> bool {
        if passed == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if passed { rise } else { fall };
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            return true;
        }
        false
    }
}

/// A state change, sent to the reconciler's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub service: String,
    pub backend: SocketAddrV4,
    pub healthy: bool,
    /// The failure that made it unhealthy (None when it became healthy).
    pub reason: Option<Failure>,
}

/// Checks one backend every `interval` until the receiver is gone or `stop` fires, reporting
/// each state change. A slow backend only delays its own task.
pub async fn watch<C: Checker>(
    checker: std::sync::Arc<C>,
    service: String,
    backend: SocketAddrV4,
    cfg: HealthConfig,
    tx: mpsc::Sender<HealthChange>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut state = HealthState::new(cfg.start_healthy);
    let mut tick = tokio::time::interval(cfg.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let result = checker.check(backend, &cfg).await;
        if state.record(result.is_ok(), cfg.rise, cfg.fall) {
            let change = HealthChange {
                service: service.clone(),
                backend,
                healthy: state.healthy,
                reason: result.err(),
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// Owns one check task per (service, backend) with a health check, and the resulting states.
/// The desired set handed to the reconciler is the configured one minus unhealthy backends.
pub struct Supervisor<C: Checker> {
    checker: std::sync::Arc<C>,
    tx: mpsc::Sender<HealthChange>,
    tasks: std::collections::HashMap<
        (String, SocketAddrV4),
        (HealthConfig, tokio::sync::watch::Sender<bool>),
    >,
    healthy: std::collections::HashMap<(String, SocketAddrV4), bool>,
    /// (service address, protocol, backend) whose check starts from healthy whatever the
    /// config says: backends adopted from a running dataplane.
    presumed: std::collections::HashSet<(SocketAddrV4, crate::config::Protocol, SocketAddrV4)>,
}

impl<C: Checker> Supervisor<C> {
    pub fn new(checker: C, tx: mpsc::Sender<HealthChange>) -> Self {
        Self {
            checker: std::sync::Arc::new(checker),
            tx,
            tasks: Default::default(),
            healthy: Default::default(),
            presumed: Default::default(),
        }
    }

    /// Backends whose checks, when they start, start from healthy (they were serving a moment
    /// ago, under an earlier berth): a restart does not take them out until a check fails.
    pub fn presume_healthy(
        &mut self,
        backends: impl IntoIterator<Item = (SocketAddrV4, crate::config::Protocol, SocketAddrV4)>,
    ) {
        self.presumed.extend(backends);
    }

    /// Starts checks for new backends (or changed check settings) and stops those of backends
    /// that are gone. Must run inside a tokio runtime.
    pub fn sync(&mut self, services: &[crate::config::Service]) {
        let mut wanted = std::collections::HashMap::new();
        let mut start_healthy = std::collections::HashSet::new();
        for s in services {
            if let Some(h) = &s.health {
                for (addr, _) in &s.backends {
                    wanted.insert((s.name.clone(), *addr), h.clone());
                    if self.presumed.remove(&(s.listen, s.protocol, *addr)) {
                        start_healthy.insert((s.name.clone(), *addr));
                    }
                }
            }
        }
        self.tasks.retain(|key, (cfg, stop)| {
            let keep = wanted.get(key) == Some(cfg);
            if !keep {
                let _ = stop.send(true);
                self.healthy.remove(key);
            }
            keep
        });
        for (key, cfg) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut task_cfg = cfg.clone();
            task_cfg.start_healthy |= start_healthy.contains(&key);
            self.healthy.insert(key.clone(), task_cfg.start_healthy);
            tokio::spawn(watch(
                self.checker.clone(),
                key.0.clone(),
                key.1,
                task_cfg,
                self.tx.clone(),
                stop_rx,
            ));
            self.tasks.insert(key, (cfg, stop_tx));
        }
    }

    /// Records a change; returns false if it concerns a check that no longer exists.
    pub fn record(&mut self, change: &HealthChange) -> bool {
        match self
            .healthy
            .get_mut(&(change.service.clone(), change.backend))
        {
            Some(h) => {
                *h = change.healthy;
                true
            }
            None => false,
        }
    }

    /// A backend's health: None when it has no check.
    pub fn state(&self, service: &str, backend: SocketAddrV4) -> Option<bool> {
        self.healthy.get(&(service.to_owned(), backend)).copied()
    }

    /// `services` without the backends whose check says unhealthy.
    pub fn filter(&self, services: &[crate::config::Service]) -> Vec<crate::config::Service> {
        services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                let name = s.name.clone();
                s.backends.retain(|(addr, _)| {
                    self.healthy
                        .get(&(name.clone(), *addr))
                        .copied()
                        .unwrap_or(true)
                });
                s
            })
            .collect()
    }

    /// Stops every check.
    pub fn stop(&mut self) {
        for (_, (_, stop)) in self.tasks.drain() {
            let _ = stop.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    fn http(expect_status: Option<u16>, expect_string: Option<&str>) -> HealthConfig {
        HealthConfig {
            kind: CheckKind::Http,
            path: "/".into(),
            expect_status,
            expect_string: expect_string.map(Into::into),
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            start_healthy: false,
        }
    }

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut s = HealthState::new(false);
        assert!(!s.record(true, 2, 3));
        assert!(!s.record(false, 2, 3), "a failure resets the rise streak");
        assert!(!s.record(true, 2, 3));
        assert!(s.record(true, 2, 3));
        assert!(s.healthy);
        assert!(!s.record(false, 2, 3));
        assert!(!s.record(false, 2, 3));
        assert!(!s.record(true, 2, 3), "a pass resets the fall streak");
        for _ in 0..2 {
            assert!(!s.record(false, 2, 3));
        }
        assert!(s.record(false, 2, 3));
        assert!(!s.healthy);
    }

    #[test]
    fn http_expectations() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nHello there";
        assert_eq!(evaluate_http(ok, &http(None, None)), Ok(()));
        assert_eq!(evaluate_http(ok, &http(Some(200), Some("Hello"))), Ok(()));
        assert_eq!(
            evaluate_http(ok, &http(None, Some("Goodbye"))),
            Err(Failure::MissingString)
        );
        let err = b"HTTP/1.1 500 Internal Server Error\r\n\r\nHello";
        assert_eq!(
            evaluate_http(err, &http(None, None)),
            Err(Failure::BadStatus(500))
        );
        assert_eq!(evaluate_http(err, &http(Some(500), Some("Hello"))), Ok(()));
        assert_eq!(
            evaluate_http(b"garbage", &http(None, None)),
            Err(Failure::BadResponse)
        );
        assert_eq!(
            evaluate_http(b"", &http(None, None)),
            Err(Failure::BadResponse)
        );
        // The string must be in the body, not only in a header.
        let hdr = b"HTTP/1.0 200 OK\r\nX-Hello: Hello\r\n\r\nbye";
        assert_eq!(
            evaluate_http(hdr, &http(None, Some("Hello"))),
            Err(Failure::MissingString)
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = http(None, None);
        c.timeout_ms = 5000;
        assert_eq!(
            c.validate("service[0].health").unwrap_err().field,
            "service[0].health.timeout_ms"
        );
        let mut c = http(None, None);
        c.fall = 0;
        assert_eq!(c.validate("h").unwrap_err().field, "h.fall");
        let mut c = http(Some(200), None);
        c.kind = CheckKind::Tcp;
        assert_eq!(c.validate("h").unwrap_err().field, "h.type");
        let mut c = http(None, None);
        c.path = "no-slash".into();
        assert_eq!(c.validate("h").unwrap_err().field, "h.path");
        assert!(http(Some(204), Some("x")).validate("h").is_ok());
    }

    /// A scripted checker: returns the queued results in order, then passes.
    struct Script(Mutex<Vec<Result<(), Failure>>>, AtomicUsize);

    impl Checker for Script {
        async fn check(&self, _: SocketAddrV4, _: &HealthConfig) -> Result<(), Failure> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let mut q = self.0.lock().unwrap();
            if q.is_empty() { Ok(()) } else { q.remove(0) }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reports_changes_after_rise_and_fall_intervals() {
        let script = Arc::new(Script(
            Mutex::new(vec![
                Ok(()),
                Ok(()), // healthy after 2 passes (rise)
                Err(Failure::Refused),
                Err(Failure::Timeout),
                Err(Failure::BadStatus(500)), // unhealthy after 3 failures (fall)
            ]),
            AtomicUsize::new(0),
        ));
        let (tx, mut rx) = mpsc::channel(8);
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let backend: SocketAddrV4 = "10.0.0.1:80".parse().unwrap();
        let cfg = http(None, None);
        let start = tokio::time::Instant::now();
        tokio::spawn(watch(
            script.clone(),
            "web".into(),
            backend,
            cfg,
            tx,
            stop_rx,
        ));
        let up = rx.recv().await.unwrap();
        assert!(up.healthy && up.reason.is_none());
        // First tick is immediate, the second one interval later.
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        let down = rx.recv().await.unwrap();
        assert!(!down.healthy);
        assert_eq!(
            down.reason,
            Some(Failure::BadStatus(500)),
            "the failure that tipped it"
        );
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(4000),
            "fall x interval after the last pass"
        );
        assert_eq!(script.1.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn real_checks_against_loopback_servers() {
        use tokio::net::TcpListener;
        // An HTTP server answering 200 "Hello from x", one answering 500, one that never answers.
        async fn serve(resp: &'static [u8]) -> SocketAddrV4 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let std::net::SocketAddr::V4(addr) = l.local_addr().unwrap() else {
                unreachable!()
            };
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = l.accept().await else {
                        return;
                    };
                    let mut b = [0u8; 1024];
                    let _ = s.read(&mut b).await;
                    if !resp.is_empty() {
                        let _ = s.write_all(resp).await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            });
            addr
        }
        let hello = serve(b"HTTP/1.0 200 OK\r\n\r\nHello from x").await;
        let broken = serve(b"HTTP/1.0 500 Oops\r\n\r\nHello").await;
        let hung = serve(b"").await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let std::net::SocketAddr::V4(a) = l.local_addr().unwrap() else {
                unreachable!()
            };
            drop(l);
            a
        };
        let c = NetChecker;
        let cfg = http(None, Some("Hello"));
        assert_eq!(c.check(hello, &cfg).await, Ok(()));
        assert_eq!(c.check(broken, &cfg).await, Err(Failure::BadStatus(500)));
        assert_eq!(c.check(hung, &cfg).await, Err(Failure::Timeout));
        assert_eq!(c.check(closed, &cfg).await, Err(Failure::Refused));
        let tcp = HealthConfig {
            kind: CheckKind::Tcp,
            expect_string: None,
            ..cfg
        };
        assert_eq!(c.check(hung, &tcp).await, Ok(()), "TCP check only connects");
        assert_eq!(c.check(closed, &tcp).await, Err(Failure::Refused));
    }
}
