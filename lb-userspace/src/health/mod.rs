//! Active health checks: a TCP connect, or an HTTP GET with an expected status and/or a string
//! in the body, each with its own timeout, run concurrently per backend; a backend's state flips
//! only after `rise` consecutive passes or `fall` consecutive failures (HAProxy semantics).
//!
//! The checker is a trait with one real implementation (`NetChecker`); results feed a
//! [`HealthState`] per backend, and every state change is sent to the reconciler's loop.
//!
//! Before any of that, a new container backend waits for its [`Readiness`] probe: a TCP connect
//! that succeeds (the container runs before it listens).

mod check;
mod readiness;
mod supervisor;

pub use check::{Checker, Failure, NetChecker, evaluate_http};
pub use readiness::{PROBE_EVERY, ProbeOutcome, ProbeReport, Readiness, SLOW_PROBE_EVERY, probe};
pub use supervisor::{HealthChange, HealthState, Supervisor, watch};

pub use crate::config::{CheckKind, HealthConfig};

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        sync::mpsc,
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
        async fn check(&self, _: SocketAddr, _: &HealthConfig) -> Result<(), Failure> {
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
        let backend: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let cfg = http(None, None);
        let start = tokio::time::Instant::now();
        tokio::spawn(watch(
            script.clone(),
            "web".into(),
            backend,
            cfg,
            7,
            tx,
            stop_rx,
        ));
        let up = rx.recv().await.unwrap();
        assert!(up.healthy && up.reason.is_none());
        assert_eq!(up.check, 7, "the task's id travels with its reports");
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

    #[tokio::test(start_paused = true)]
    async fn another_container_run_is_checked_anew_and_a_late_report_ignored() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut sup = Supervisor::new(Script(Mutex::new(vec![]), AtomicUsize::new(0)), tx);
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let web = |run| crate::config::Service {
            name: "web".into(),
            listen: "10.99.0.1:80".parse().unwrap(),
            protocol: crate::config::Protocol::Tcp,
            backends: vec![crate::config::BackendSpec::dnat(addr, 1)],
            mode: None,
            health: Some(http(None, None)),
            instances: [(addr, crate::config::Instance(run))].into(),
        };
        sup.sync(&[web(1)]);
        assert_eq!(sup.state("web", addr), Some(false));
        let up = rx.recv().await.unwrap();
        assert!(sup.record(&up) && sup.state("web", addr) == Some(true));
        // The same run again: the check goes on.
        sup.sync(&[web(1)]);
        assert_eq!(sup.state("web", addr), Some(true));
        // Another run at the address (a restart, another container): checked from the start.
        sup.sync(&[web(2)]);
        assert_eq!(sup.state("web", addr), Some(false));
        assert!(!sup.record(&up), "the earlier run's report counted");
        assert_eq!(sup.state("web", addr), Some(false));
        let up2 = rx.recv().await.unwrap();
        assert_ne!(up2.check, up.check);
        assert!(sup.record(&up2) && sup.state("web", addr) == Some(true));
        sup.stop();
    }

    #[tokio::test]
    async fn real_checks_against_loopback_servers() {
        use tokio::net::TcpListener;
        // An HTTP server answering 200 "Hello from x", one answering 500, one that never answers.
        async fn serve(resp: &'static [u8]) -> SocketAddr {
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
            SocketAddr::V4(addr)
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
        assert_eq!(
            c.check(SocketAddr::V4(closed), &cfg).await,
            Err(Failure::Refused)
        );
        let tcp = HealthConfig {
            kind: CheckKind::Tcp,
            expect_string: None,
            ..cfg
        };
        assert_eq!(c.check(hung, &tcp).await, Ok(()), "TCP check only connects");
        assert_eq!(
            c.check(SocketAddr::V4(closed), &tcp).await,
            Err(Failure::Refused)
        );
    }
}
