//! End-to-end test topologies: network namespaces joined by veth pairs (and bridges), real TCP
//! and UDP servers inside them, and the real `berth` daemon running in the namespace that plays
//! the host. Everything is removed on drop, including after a panic; leftovers of a crashed run
//! (same name prefix) are removed before a topology is built.
//!
//! Traffic only ever goes between namespaces created here.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Prefix of every namespace and interface the e2e tests create.
pub const PREFIX: &str = "bte";

/// Runs a command; Err(what failed, with its stderr) on failure.
pub fn try_sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("running {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command, panicking with its stderr on failure.
pub fn sh(args: &[&str]) -> String {
    try_sh(args).unwrap_or_else(|e| panic!("{e}"))
}

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces and root-namespace links left by a crashed run.
pub fn remove_leftovers() {
    let list = sh("ip netns list".split(' ').collect::<Vec<_>>().as_slice());
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(PREFIX) {
            kill_all_in(name);
            sh_quiet(&["ip", "netns", "del", name]);
        }
    }
    let links = sh(&["ip", "-o", "link", "show"]);
    for line in links.lines() {
        if let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
            && name.starts_with(PREFIX)
        {
            sh_quiet(&["ip", "link", "del", name]);
        }
    }
    if let Ok(pins) = std::fs::read_dir("/sys/fs/bpf") {
        for p in pins.filter_map(|e| e.ok()) {
            if p.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = berth_down(&p.path());
            }
        }
    }
    if let Ok(cgroups) = std::fs::read_dir(cgroup2_root()) {
        for c in cgroups.filter_map(|e| e.ok()) {
            if c.file_name().to_string_lossy().starts_with(PREFIX) {
                remove_cgroup(&c.path());
            }
        }
    }
}

/// Sends `sig` to `pid` (a process the tests or benchmarks started, or a daemon they manage).
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Whether `pid` runs. A zombie still has a /proc entry but only waits to be reaped: not alive.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// Kills every process left in namespace `ns`: SIGTERM, up to 3 s to exit, then SIGKILL.
pub fn kill_all_in(ns: &str) {
    let pids = |s: String| -> Vec<i32> {
        s.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let list = pids(try_sh(&["ip", "netns", "pids", ns]).unwrap_or_default());
        if list.is_empty() {
            return;
        }
        for p in &list {
            signal(*p, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && list.iter().any(|p| alive(*p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace, deleted (after killing what runs in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(short: &str) -> Self {
        let name = format!("{PREFIX}-{short}");
        sh_quiet(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command that runs `program` in this network namespace only (unlike `ip netns exec`, it
    /// keeps the host's mounts: /sys/fs/bpf, cgroups).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        ns_command(&self.name, program)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it creates live here)
    /// and waits for it, propagating its panic.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }

    /// Starts `f` on a thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        sh_quiet(&["ip", "netns", "del", &self.name]);
    }
}

/// A command that runs `program` in network namespace `ns` only: setns(2) on the network
/// namespace, so the mounts (bpffs, cgroups) stay the host's, which `ip netns exec` would not keep.
pub fn ns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    let f = std::fs::File::open(PathBuf::from("/run/netns").join(ns))
        .unwrap_or_else(|e| panic!("opening netns {ns}: {e}"));
    // SAFETY: setns(2) on a descriptor opened before the fork is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd
}

/// Pins `cmd`'s process to one CPU before it runs (sched_setaffinity(2), as taskset does).
pub fn on_cpu(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure only calls sched_setaffinity(2) with a set built on its stack
    // (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A command run to completion in network namespace `ns` (see `ns_command`), panicking with its
/// stderr on failure.
pub fn ns_sh(ns: &str, args: &[&str]) -> String {
    let out = ns_command(ns, args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?} in {ns}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns affects the calling
/// thread only: sockets it creates live there) and waits for it, propagating its panic.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f)
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Starts `f` on a thread that has entered network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

fn enter(path: &PathBuf) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Creates a veth pair directly inside two namespaces (the root namespace never holds a test
/// interface), both ends up.
pub fn veth(a_ns: &Netns, a: &str, b_ns: &Netns, b: &str) {
    sh(&[
        "ip", "link", "add", a, "netns", &a_ns.name, "type", "veth", "peer", "name", b, "netns",
        &b_ns.name,
    ]);
    a_ns.exec(&["ip", "link", "set", a, "up"]);
    b_ns.exec(&["ip", "link", "set", b, "up"]);
}

/// TCP and UDP servers answering `Hello from {name}: {request}` on one address, stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddrV4, udp: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let path = PathBuf::from("/run/netns").join(&ns.name);
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (stop, name, path, tx) = (stop.clone(), name.to_owned(), path.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&path);
                let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                l.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let name = name.clone();
                            std::thread::spawn(move || serve_tcp(s, &name));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        if udp {
            let (stop, name, tx) = (stop.clone(), name.to_owned(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&path);
                let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                tx.send(()).expect("ready");
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let mut reply = format!("Hello from {name}: ").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = s.send_to(&reply, from);
                    }
                }
            }));
        }
        for _ in 0..threads.len() {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server ready");
        }
        Self { stop, threads }
    }
}

/// Answers each line with `Hello from {name}: {line}`; the line `peer?` is answered with the
/// address the connection came from (to check what the backend sees); a `GET` request line gets
/// an HTTP/1.0 response `200 OK` with body `Hello from {name}` (for HTTP health checks).
fn serve_tcp(s: TcpStream, name: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.starts_with("GET ") => {
                // Skip the headers, answer, close.
                let mut h = String::new();
                while r.read_line(&mut h).is_ok_and(|n| n > 0) && !h.trim_end().is_empty() {
                    h.clear();
                }
                let body = format!("Hello from {name}\n");
                let _ = w.write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                return;
            }
            Ok(_) => {
                let answer = if line.trim_end() == "peer?" {
                    format!("Hello from {name}: peer {peer}\n")
                } else {
                    format!("Hello from {name}: {line}")
                };
                if w.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connection, one line, one answer line (runs in the calling thread's namespace).
pub fn tcp_request(addr: SocketAddrV4, line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Ok(out.trim_end().to_owned())
}

/// A long-lived TCP connection (in the calling thread's namespace).
pub struct Session {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Session {
    pub fn connect(addr: SocketAddrV4) -> Result<Self, String> {
        let s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Self {
            w,
            r: BufReader::new(s),
        })
    }

    pub fn request(&mut self, line: &str) -> Result<String, String> {
        self.w
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut out = String::new();
        match self.r.read_line(&mut out) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(out.trim_end().to_owned()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// One datagram over a *connected* UDP socket: the kernel drops any answer whose source is not
/// `addr`, so an answer proves the reply was translated back to the service address.
pub fn udp_request(addr: SocketAddrV4, payload: &str) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.send(payload.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 2048];
    let n = s
        .recv(&mut buf)
        .map_err(|e| format!("recv from {addr}: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The backend name in an answer `Hello from NAME: ...`.
pub fn responder(answer: &str) -> Option<&str> {
    answer.strip_prefix("Hello from ")?.split(':').next()
}

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
fn remove_cgroup(path: &std::path::Path) {
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

/// An HTTP/1.0 GET of `/` (in the calling thread's namespace): (status, body).
pub fn http_get(addr: SocketAddrV4) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not HTTP: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_owned();
    Ok((status, body))
}
