//! The berth daemon as the e2e tests run it (`Berth`: its own pin path, admin socket, log and
//! child cgroup, stopped and `berth down`ed on drop), the binary, and the test cgroups its socket
//! programs attach to.

use std::{
    io::Read as _,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, PREFIX, ns_command, signal};

/// A child cgroup (v2) for a test's client processes: berth's socket programs attach here, never
/// to the root. Removed (with any children Docker left) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_root() -> PathBuf {
    lb_userspace::dataplane::cgroup2_root().expect("a cgroup v2 hierarchy is mounted")
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let path = cgroup2_root().join(format!("{PREFIX}-{tag}"));
        remove_cgroup(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// The path as Docker's `--cgroup-parent` wants it (relative to the hierarchy's root).
    pub fn docker_parent(&self) -> String {
        format!("/{}", self.path.file_name().unwrap().to_string_lossy())
    }

    /// `cmd` with its process moved into this cgroup before it runs.
    pub fn command(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt as _;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("cgroup.procs");
        // SAFETY: the closure only calls write(2) on a descriptor opened before the fork
        // (async-signal-safe); "0" moves the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

/// Removes a cgroup directory and its children (depth first), killing what is left in them.
pub(crate) fn remove_cgroup(path: &std::path::Path) {
    if !path.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if std::fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Where a test's berth pins its dataplane.
pub fn test_pin_path(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{PREFIX}-{tag}"))
}

/// The berth daemon running in a namespace (or the root one), with its own pin path and a child
/// cgroup for its socket programs. SIGTERMed (then killed) on drop, then `berth down` removes
/// what it left attached; its log is printed if the test is failing.
pub struct Berth {
    child: Option<Child>,
    pub log: PathBuf,
    pub config: PathBuf,
    /// Its admin socket (`berth status --admin-socket`).
    pub admin: PathBuf,
    pub pin_path: PathBuf,
    /// The cgroup its socket programs are attached to.
    pub cgroup: TestCgroup,
    netns: Option<String>,
    args: Vec<std::ffi::OsString>,
    starts: usize,
}

/// The berth binary: `$BERTH_BIN` (as `cargo xtask test` and `bench` set it), else the
/// workspace's build of the same profile as this crate (debug for the tests, release for the
/// benchmarks, which `cargo xtask bench` runs with `--release`).
pub fn berth_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_BIN") {
        return p.into();
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
        .join("berth");
    assert!(
        p.exists(),
        "{} not built: run `cargo xtask test` (or `bench`), or set BERTH_BIN",
        p.display()
    );
    p
}

/// `berth down --pin-path`: (exit status, stdout + stderr).
pub fn berth_down(pin_path: &std::path::Path) -> (std::process::ExitStatus, String) {
    let out = Command::new(berth_bin())
        .arg("down")
        .arg("--pin-path")
        .arg(pin_path)
        .output()
        .expect("berth down");
    (
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

impl Berth {
    /// Starts berth inside `ns` (entering only its network namespace: bpffs and cgroups are the
    /// host's, as for a berth on a host).
    pub fn start(ns: &Netns, config: &str, ifaces: &[&str]) -> Self {
        Self::spawn(
            Some(&ns.name),
            &ns.name,
            vec!["run".into()],
            Some(config),
            ifaces,
        )
    }

    /// Starts berth in the root namespace (where Docker's networks are). Only ever with
    /// interfaces the test created.
    pub fn start_root(tag: &str, config: &str, ifaces: &[&str]) -> Self {
        Self::spawn(None, tag, vec!["run".into()], Some(config), ifaces)
    }

    /// Starts berth in the root namespace with a Synapse JSON config (`--synapse-config`).
    pub fn start_root_synapse(tag: &str, json: &str, ifaces: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{tag}.synapse.json"));
        std::fs::write(&path, json).expect("write synapse config");
        let args = vec!["run".into(), "--synapse-config".into(), path.into()];
        Self::spawn(None, tag, args, None, ifaces)
    }

    /// Starts berth in the root namespace without a config file (label-driven services).
    pub fn start_root_without_config(tag: &str, ifaces: &[&str]) -> Self {
        Self::spawn(None, tag, vec!["run".into()], None, ifaces)
    }

    fn spawn(
        netns: Option<&str>,
        tag: &str,
        mut args: Vec<std::ffi::OsString>,
        config: Option<&str>,
        ifaces: &[&str],
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config_path = dir.join(format!("{tag}.toml"));
        if let Some(config) = config {
            std::fs::write(&config_path, config).expect("write config");
        }
        let log = dir.join(format!("{tag}.log"));
        let _ = std::fs::remove_file(&log);
        let admin = dir.join(format!("{tag}.sock"));
        let pin_path = test_pin_path(tag);
        // Leftovers of a crashed run.
        let _ = berth_down(&pin_path);
        let cgroup = TestCgroup::new(tag);
        args.extend(["--admin-socket".into(), admin.clone().into()]);
        args.extend(["--pin-path".into(), pin_path.clone().into()]);
        args.extend(["--cgroup".into(), cgroup.path.clone().into()]);
        if config.is_some() {
            args.extend(["--config".into(), config_path.clone().into()]);
        }
        for i in ifaces {
            args.extend(["--iface".into(), (*i).into()]);
        }
        let mut b = Self {
            child: None,
            log,
            config: config_path,
            admin,
            pin_path,
            cgroup,
            netns: netns.map(str::to_owned),
            args,
            starts: 0,
        };
        b.respawn();
        b
    }

    /// Starts the daemon again with the same arguments (after `stop` or `kill`), appending to
    /// the same log, and waits until it is ready.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "berth is still running");
        let mut cmd = match &self.netns {
            Some(ns) => ns_command(ns, berth_bin()),
            None => Command::new(berth_bin()),
        };
        cmd.args(&self.args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn berth");
        self.child = Some(child);
        self.starts += 1;
        self.wait_for("berth ready", self.starts);
    }

    /// `berth status --json` against this daemon.
    pub fn status(&self) -> lb_userspace::status::Status {
        let out = Command::new(berth_bin())
            .args(["status", "--json", "--admin-socket"])
            .arg(&self.admin)
            .output()
            .expect("berth status");
        assert!(
            out.status.success(),
            "berth status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `times` times.
    pub fn wait_for(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "berth never logged {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Rewrites the config file and sends SIGHUP; waits for the reload to be applied.
    pub fn reload(&self, config: &str) {
        let before = self.log_text().matches("config reloaded").count();
        std::fs::write(&self.config, config).expect("write config");
        signal(self.pid(), libc::SIGHUP);
        self.wait_for("config reloaded", before + 1);
    }

    /// SIGTERM and wait; returns the exit status and how long it took. The dataplane stays
    /// (pinned) unless berth was told to detach on exit.
    pub fn stop(&mut self) -> (std::process::ExitStatus, Duration) {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        self.signal_and_wait(libc::SIGKILL).0
    }

    fn signal_and_wait(&mut self, sig: i32) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let t = Instant::now();
        signal(child.id() as i32, sig);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return (st, t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return (child.wait().expect("wait"), t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `berth down` for this daemon's pin path.
    pub fn down(&self) -> (std::process::ExitStatus, String) {
        berth_down(&self.pin_path)
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        let _ = self.down();
        if std::thread::panicking() {
            let mut s = String::new();
            let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
            eprintln!("---- berth log ----\n{s}-------------------");
        }
    }
}
