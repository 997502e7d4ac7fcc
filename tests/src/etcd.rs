//! A real etcd (Debian's `etcd-server`, one member) for the tests: started in a network
//! namespace the test made, its data in a temporary directory; killed and its data removed on
//! drop. `etcdctl` (Debian's `etcd-client`) writes to it from the same namespace.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, ns_command, signal};

/// One etcd member listening on `addr`:2379 inside a namespace.
pub struct Etcd {
    child: Option<Child>,
    ns: String,
    pub addr: std::net::Ipv4Addr,
    pub data: PathBuf,
    log: PathBuf,
}

impl Etcd {
    /// Starts a member in `ns` on `addr` (an address of that namespace) and waits until it
    /// answers.
    pub fn start(ns: &Netns, addr: std::net::Ipv4Addr) -> Self {
        let data =
            std::env::temp_dir().join(format!("berth-etcd-{}-{}", ns.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).expect("etcd data dir");
        let log = data.with_extension("log");
        let mut e = Self {
            child: None,
            ns: ns.name.clone(),
            addr,
            data,
            log,
        };
        e.restart();
        e
    }

    /// `http://ADDR:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:2379", self.addr)
    }

    /// Starts the member again (after `kill`) on the same data; waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let client = self.endpoint();
        let child = ns_command(&self.ns, "etcd")
            .args(["--name", "bte", "--data-dir"])
            .arg(self.data.join("member-data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "bte=http://127.0.0.1:2380",
                "--logger",
                "zap",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_ctl(&["endpoint", "health"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 20 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        let mut c = self.child.take().expect("etcd running");
        signal(c.id() as i32, libc::SIGKILL);
        let _ = c.wait();
    }

    /// `etcdctl ARGS` against this member: stdout, or what failed.
    pub fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = ns_command(&self.ns, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "--dial-timeout", "1s"])
            .args(args)
            .output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    pub fn delete(&self, key: &str) {
        self.ctl(&["del", key]);
    }

    /// Grants a lease of `ttl_secs`; returns its id (hex, as etcdctl takes it).
    pub fn lease(&self, ttl_secs: u32) -> String {
        let out = self.ctl(&["lease", "grant", &ttl_secs.to_string()]);
        // "lease 694d7f3c2b1a0e05 granted with TTL(2s)"
        out.split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no lease id in {out:?}"))
            .to_owned()
    }

    pub fn put_with_lease(&self, key: &str, value: &str, lease: &str) {
        self.ctl(&["put", &format!("--lease={lease}"), key, value]);
    }

    /// Writes `key` `n` times, with `value(i)` each time, as fast as the member takes them
    /// (one client, from the member's namespace; `etcdctl` per write would take minutes).
    pub fn put_many(&self, key: &str, n: usize, value: impl Fn(usize) -> String + Send + 'static) {
        let endpoint = self.endpoint();
        let key = key.to_owned();
        crate::netns::in_netns(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
                    .await
                    .expect("etcd client");
                for i in 0..n {
                    c.put(key.as_str(), value(i), None)
                        .await
                        .unwrap_or_else(|e| panic!("put {i} of {n} to {key}: {e}"));
                }
            });
        });
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "berth-test-revision-probe", "-w", "json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        v["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revision in {out}"))
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.ctl(&["get", "--prefix", "--keys-only", prefix])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// `{"address": "ADDR", "weight": W}`.
pub fn value(addr: &str, weight: u32) -> String {
    format!(r#"{{"address":"{addr}","weight":{weight}}}"#)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- etcd log (tail) ----\n{}",
                std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_file(&self.log);
    }
}
