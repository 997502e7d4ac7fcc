//! `cargo xtask bench` (second part): macro benchmark of berth against its peers, on one machine,
//! in one run, through namespaces this program builds and removes.
//!
//! Topology (every name starts with `bb-`; nothing outside these namespaces is touched):
//!
//! ```text
//!  bb-client            bb-lb ("the host")              bb-be1 / bb-be2
//!  wrk  bb-c0 ---- bb-lbc 10.77.0.1 (service :8080)
//!  10.77.0.2              bb-lb1 10.77.1.1 ---- bb-e1  10.77.1.2  nginx :8000 "be1"
//!                         bb-lb2 10.77.2.1 ---- bb-e2  10.77.2.2  nginx :8000 "be2"
//! ```
//!
//! Contenders, all with the same backends, clients and CPU pinning (wrk and both nginx pinned
//! with sched_setaffinity, as taskset does):
//! - `direct`: one wrk per backend, each with half the connections, routed through bb-lb by plain
//!   IPv4 forwarding (the ceiling: same hops, both backends loaded, no balancer); rates are
//!   added, the worse p99 and the mean p50 kept;
//! - `direct1` (only when asked for with `--contenders`): wrk to backend 1 alone, all connections,
//!   the literal "one backend, no balancer" ceiling. Only one nginx is busy then, alone on its
//!   CPU, so its p99 lacks the few ms of scheduling delay that two busy nginx sharing a CPU add
//!   to every contender that spreads the load (`direct` included);
//! - `berth`: `berth run` in bb-lb on all three of its veths (TC ingress, redirect mode), no
//!   socket programs (`--cgroup none`);
//! - `nftables`: kube-proxy-style kernel NAT, table `ip bb_nat` in bb-lb: prerouting
//!   `dnat to jhash ip saddr . tcp sport mod 2 map { 0 : be1 . 8000, 1 : be2 . 8000 }` (per-flow
//!   hash, chosen once per conntrack entry). No masquerade: the backends' default route goes
//!   through bb-lb, so conntrack sees and un-NATs the replies, exactly as berth needs;
//! - `haproxy`: Debian's HAProxy, `mode tcp`, `balance roundrobin`, `nbthread 1` (left unpinned:
//!   with 2 cores a second thread only competes with wrk and nginx).
//!
//! Workloads (wrk, `-t1 -cN --latency`): HTTP keep-alive requests/s, and new connections/s (one
//! request per connection: `-H 'Connection: close'`). Latency p50/p99 are wrk's.
//!
//! CPU per 100k requests: the machine's system + softirq time from /proc/stat (all CPUs) over
//! the wrk run, nothing subtracted, so it includes wrk's and nginx's kernel time (the same for
//! every contender) and whatever else runs on the machine. For HAProxy its user time
//! (/proc/PID/stat utime) is added; its system time is already in the machine's. berth's
//! dataplane runs in softirq, so its kernel time is what counts for it.
//!
//! Rounds are interleaved (round 1: every contender, then round 2 ...; the order rotates each
//! round), and every figure is the median over rounds, printed beside its ratio to berth's.
//! Results go to stdout (markdown) and to target/bench/loadbench-<unix time>.json and
//! target/bench/latest.json.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

const NS_CLIENT: &str = "bb-client";
const NS_LB: &str = "bb-lb";
const NS_BE: [&str; 2] = ["bb-be1", "bb-be2"];
const VIP: &str = "10.77.0.1";
const CLIENT_IP: &str = "10.77.0.2";
const BACKENDS: [&str; 2] = ["10.77.1.2", "10.77.2.2"];
const SVC_PORT: u16 = 8080;
const BE_PORT: u16 = 8000;
/// Client-side veth of the balancer, then its backend-side ones.
const LB_IFACES: [&str; 3] = ["bb-lbc", "bb-lb1", "bb-lb2"];
const WORKDIR: &str = "/tmp/bb-loadbench";
const PIN_PATH: &str = "/sys/fs/bpf/bb-berth";
const ADMIN_SOCKET: &str = "/tmp/bb-berth.sock";
/// nginx logs only the status: 4 bytes a request, so a log's growth counts requests.
const LOG_LINE: u64 = 4;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Contender {
    Direct1,
    Direct,
    Berth,
    Nftables,
    Haproxy,
}

impl Contender {
    const ALL: [Contender; 5] = [
        Contender::Direct1,
        Contender::Direct,
        Contender::Berth,
        Contender::Nftables,
        Contender::Haproxy,
    ];

    /// What runs without `--contenders`.
    const DEFAULT: [Contender; 4] = [
        Contender::Direct,
        Contender::Berth,
        Contender::Nftables,
        Contender::Haproxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Direct1 => "direct1",
            Contender::Direct => "direct",
            Contender::Berth => "berth",
            Contender::Nftables => "nftables",
            Contender::Haproxy => "haproxy",
        }
    }

    /// Where the clients connect (one wrk per address).
    fn endpoints(self) -> Vec<String> {
        match self {
            Contender::Direct1 => vec![format!("{}:{BE_PORT}", BACKENDS[0])],
            Contender::Direct => BACKENDS.iter().map(|b| format!("{b}:{BE_PORT}")).collect(),
            _ => vec![format!("{VIP}:{SVC_PORT}")],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Workload {
    KeepAlive,
    NewConn,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::KeepAlive, Workload::NewConn];

    fn name(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keep-alive",
            Workload::NewConn => "new-conn",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::KeepAlive => "req/s",
            Workload::NewConn => "conn/s",
        }
    }
}

struct Args {
    duration: u32,
    rounds: usize,
    connections: u32,
    contenders: Vec<Contender>,
    wrk_cpu: usize,
    nginx_cpu: usize,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn args() -> Args {
    let n = cores();
    let mut a = Args {
        duration: 5,
        rounds: 5,
        connections: 32,
        contenders: Contender::DEFAULT.to_vec(),
        wrk_cpu: 0,
        nginx_cpu: if n > 1 { 1 } else { 0 },
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => {
                a.duration = val()
                    .trim_end_matches('s')
                    .parse()
                    .expect("--duration SECONDS")
            }
            "--rounds" => a.rounds = val().parse().expect("--rounds N"),
            "--connections" => a.connections = val().parse().expect("--connections N"),
            "--wrk-cpu" => a.wrk_cpu = val().parse().expect("--wrk-cpu N"),
            "--nginx-cpu" => a.nginx_cpu = val().parse().expect("--nginx-cpu N"),
            "--contenders" => {
                a.contenders = val()
                    .split(',')
                    .map(|c| {
                        *Contender::ALL
                            .iter()
                            .find(|k| k.name() == c)
                            .unwrap_or_else(|| panic!("unknown contender {c}"))
                    })
                    .collect();
                if !a.contenders.contains(&Contender::Berth) {
                    a.contenders.insert(0, Contender::Berth);
                }
            }
            "-h" | "--help" => {
                println!(
                    "berth-loadbench [--duration SECONDS (5)] [--rounds N (5)] [--connections N (32)] \
                     [--contenders direct,berth,nftables,haproxy (also: direct1)] [--wrk-cpu N (0)] [--nginx-cpu N (1)]"
                );
                std::process::exit(0);
            }
            other => panic!(
                "unknown argument {other}; use --duration S --rounds N --connections N --contenders LIST"
            ),
        }
    }
    assert!(a.rounds >= 1 && a.duration >= 1 && a.connections >= 1);
    assert!(
        a.wrk_cpu < n && a.nginx_cpu < n,
        "this machine has {n} CPUs"
    );
    a
}

// ---------------------------------------------------------------------------------------------
// Commands and namespaces

/// Runs a command; Err(stderr) on failure.
fn try_sh(args: &[&str]) -> Result<String, String> {
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

fn sh(args: &[&str]) -> String {
    try_sh(args).unwrap_or_else(|e| panic!("{e}"))
}

/// `program` started inside network namespace `ns` (setns(2) on the network namespace only: the
/// mounts, bpffs included, stay the host's, which `ip netns exec` would not keep), optionally
/// pinned to one CPU.
fn ns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>, cpu: Option<usize>) -> Command {
    let mut cmd = Command::new(program);
    let f = File::open(Path::new("/run/netns").join(ns))
        .unwrap_or_else(|e| panic!("opening netns {ns}: {e}"));
    // SAFETY: the closure only makes the setns(2) and sched_setaffinity(2) system calls, on a
    // descriptor opened before the fork and a set built on the stack (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// A command run to completion inside `ns`.
fn ns_sh(ns: &str, args: &[&str]) -> String {
    let out = ns_command(ns, args[0], None)
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

/// Runs `f` on a thread that has entered `ns` (setns affects the calling thread only).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(Path::new("/run/netns").join(ns)).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns on a valid descriptor; only this thread changes namespace.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; pids are of processes we started.
    unsafe { libc::kill(pid, sig) };
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry: only count it alive if its state is not Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// Kills every process left in a namespace (all were started by this program), TERM then KILL.
fn kill_all_in(ns: &str) {
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

fn berth_bin() -> PathBuf {
    std::env::var_os("BERTH_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/berth"),
        PathBuf::from,
    )
}

/// Whether this berth has `--pin-path`/`--cgroup` and `berth down` (pinned dataplane).
fn berth_pins() -> bool {
    Command::new(berth_bin())
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--pin-path"))
}

fn berth_down() {
    if berth_pins() && Path::new(PIN_PATH).exists() {
        let _ = Command::new(berth_bin())
            .args(["down", "--pin-path", PIN_PATH])
            .stdout(Stdio::null())
            .status();
    }
}

/// Removes what a crashed run (or this one) left: processes in `bb-` namespaces, the
/// namespaces, berth's pins.
fn remove_everything() {
    let list = try_sh(&["ip", "netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with("bb-") {
            kill_all_in(name);
            let _ = try_sh(&["ip", "netns", "del", name]);
        }
    }
    berth_down();
    let _ = std::fs::remove_file(ADMIN_SOCKET);
}

/// The four namespaces and their veths; removed on drop (also when unwinding from a panic).
struct Topology;

impl Topology {
    fn build() -> Self {
        remove_everything();
        let t = Topology;
        for ns in [NS_CLIENT, NS_LB, NS_BE[0], NS_BE[1]] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // Each veth pair is created directly inside its two namespaces: the host's namespace
        // never sees it.
        let veth = |a: &str, ns_a: &str, b: &str, ns_b: &str| {
            sh(&[
                "ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns",
                ns_b,
            ]);
        };
        veth("bb-c0", NS_CLIENT, "bb-lbc", NS_LB);
        veth("bb-e1", NS_BE[0], "bb-lb1", NS_LB);
        veth("bb-e2", NS_BE[1], "bb-lb2", NS_LB);
        let addr = |ns: &str, dev: &str, cidr: &str| {
            sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        };
        addr(NS_CLIENT, "bb-c0", &format!("{CLIENT_IP}/24"));
        addr(NS_LB, "bb-lbc", &format!("{VIP}/24"));
        addr(NS_LB, "bb-lb1", "10.77.1.1/24");
        addr(NS_LB, "bb-lb2", "10.77.2.1/24");
        addr(NS_BE[0], "bb-e1", &format!("{}/24", BACKENDS[0]));
        addr(NS_BE[1], "bb-e2", &format!("{}/24", BACKENDS[1]));
        sh(&[
            "ip",
            "-n",
            NS_CLIENT,
            "route",
            "add",
            "10.77.0.0/16",
            "via",
            VIP,
        ]);
        sh(&[
            "ip",
            "-n",
            NS_BE[0],
            "route",
            "add",
            "default",
            "via",
            "10.77.1.1",
        ]);
        sh(&[
            "ip",
            "-n",
            NS_BE[1],
            "route",
            "add",
            "default",
            "via",
            "10.77.2.1",
        ]);
        ns_sh(NS_LB, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Many short connections from one client address: widen the port range and let
        // connect() reuse ports in TIME_WAIT (wrk closes first after `Connection: close`).
        for ns in [NS_CLIENT, NS_LB] {
            ns_sh(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
            );
        }
        for ns in NS_BE {
            ns_sh(ns, &["sysctl", "-qw", "net.core.somaxconn=4096"]);
            // nginx closes first after `Connection: close`, so TIME_WAIT piles up on the
            // backends, and a client port reused within its 60 s meets an old socket there
            // (an ACK instead of a SYN-ACK, a reset, a 1 s SYN retry): the rates then depended
            // on how many runs came before. Keep no TIME_WAIT sockets on the backends.
            ns_sh(ns, &["sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0"]);
        }
        ns_sh(NS_LB, &["sysctl", "-qw", "net.core.somaxconn=4096"]);
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        remove_everything();
    }
}

/// A long-running process we started; TERM (then KILL) on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Self {
        let log = Path::new(WORKDIR).join(format!("{name}.log"));
        let f = File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { name, child, log }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    fn check_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log_text());
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Backends and contenders

fn start_nginx(i: usize, cpu: usize) -> Proc {
    let dir = Path::new(WORKDIR).join(format!("be{}", i + 1));
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\n\
         daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n\
         \x20 log_format bb '$status';\n\
         \x20 access_log {d}/access.log bb buffer=64k flush=1s;\n\
         \x20 client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         \x20 keepalive_requests 100000000; keepalive_timeout 60s;\n\
         \x20 server {{\n\
         \x20   listen {ip}:{BE_PORT} backlog=4096;\n\
         \x20   location / {{ default_type text/plain; return 200 \"be{n}\\n\"; }}\n\
         \x20 }}\n\
         }}\n",
        ip = BACKENDS[i],
        n = i + 1,
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let mut cmd = ns_command(NS_BE[i], "nginx", Some(cpu));
    cmd.arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut p = Proc::spawn(if i == 0 { "nginx-be1" } else { "nginx-be2" }, cmd);
    let addr: SocketAddr = format!("{}:{BE_PORT}", BACKENDS[i]).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_netns(NS_BE[i], move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    }) {
        p.check_running();
        assert!(
            Instant::now() < deadline,
            "nginx be{} never listened",
            i + 1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

fn access_log_requests(i: usize) -> u64 {
    let p = Path::new(WORKDIR).join(format!("be{}/access.log", i + 1));
    std::fs::metadata(p).map_or(0, |m| m.len() / LOG_LINE)
}

/// A running contender: what must be undone when its turn ends.
enum Running {
    Direct,
    Berth(Proc),
    Nftables(NftTable),
    Haproxy(Proc),
}

impl Running {
    /// The pid whose user time counts as balancer CPU (HAProxy's).
    fn user_pid(&self) -> Option<i32> {
        match self {
            Running::Haproxy(p) => Some(p.pid()),
            _ => None,
        }
    }

    fn stop(self) {
        match self {
            Running::Berth(mut p) => {
                p.stop();
                berth_down();
            }
            Running::Haproxy(mut p) => p.stop(),
            Running::Nftables(t) => drop(t),
            Running::Direct => {}
        }
    }
}

/// The nft table in bb-lb; deleted on drop (the namespace's removal would also drop it).
struct NftTable;

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = ns_command(NS_LB, "nft", None)
            .args(["delete", "table", "ip", "bb_nat"])
            .stderr(Stdio::null())
            .status();
    }
}

fn start(c: Contender) -> Running {
    match c {
        Contender::Direct | Contender::Direct1 => Running::Direct,
        Contender::Berth => Running::Berth(start_berth()),
        Contender::Nftables => {
            let rules = format!(
                "table ip bb_nat {{\n\
                 \x20 chain prerouting {{\n\
                 \x20   type nat hook prerouting priority dstnat; policy accept;\n\
                 \x20   ip daddr {VIP} tcp dport {SVC_PORT} dnat to jhash ip saddr . tcp sport mod 2 seed 0xb0a7 map {{ 0 : {b0} . {BE_PORT}, 1 : {b1} . {BE_PORT} }}\n\
                 \x20 }}\n\
                 }}\n",
                b0 = BACKENDS[0],
                b1 = BACKENDS[1],
            );
            let path = Path::new(WORKDIR).join("nft.conf");
            std::fs::write(&path, rules).expect("nft.conf");
            let guard = NftTable;
            ns_sh(NS_LB, &["nft", "-f", path.to_str().unwrap()]);
            Running::Nftables(guard)
        }
        Contender::Haproxy => {
            let conf = format!(
                "global\n  nbthread 1\n  maxconn 8000\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend bb_front\n  bind {VIP}:{SVC_PORT}\n  backlog 4096\n  default_backend bb_back\n\
                 backend bb_back\n  balance roundrobin\n  server be1 {b0}:{BE_PORT}\n  server be2 {b1}:{BE_PORT}\n",
                b0 = BACKENDS[0],
                b1 = BACKENDS[1],
            );
            let path = Path::new(WORKDIR).join("haproxy.cfg");
            std::fs::write(&path, conf).expect("haproxy.cfg");
            let mut cmd = ns_command(NS_LB, "haproxy", None);
            cmd.arg("-f").arg(&path).arg("-db");
            let mut p = Proc::spawn("haproxy", cmd);
            let addr: SocketAddr = format!("{VIP}:{SVC_PORT}").parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !in_netns(NS_LB, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            }) {
                p.check_running();
                assert!(Instant::now() < deadline, "haproxy never listened");
                std::thread::sleep(Duration::from_millis(50));
            }
            Running::Haproxy(p)
        }
    }
}

fn start_berth() -> Proc {
    let config = format!(
        "[metrics]\nenabled = false\n\n[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:{SVC_PORT}\"\n\
         protocol = \"tcp\"\nbackends = [\"{b0}:{BE_PORT}\", \"{b1}:{BE_PORT}\"]\n",
        b0 = BACKENDS[0],
        b1 = BACKENDS[1],
    );
    let path = Path::new(WORKDIR).join("berth.toml");
    std::fs::write(&path, config).expect("berth.toml");
    let mut cmd = ns_command(NS_LB, berth_bin(), None);
    cmd.arg("run").arg("--config").arg(&path);
    for i in LB_IFACES {
        cmd.args(["--iface", i]);
    }
    cmd.args(["--admin-socket", ADMIN_SOCKET]);
    if berth_pins() {
        berth_down();
        cmd.args(["--cgroup", "none", "--pin-path", PIN_PATH]);
    }
    cmd.env("RUST_LOG", "info");
    let mut p = Proc::spawn("berth", cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.log_text().contains("berth ready") {
        p.check_running();
        assert!(
            Instant::now() < deadline,
            "berth never logged \"berth ready\":\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// One `Connection: close` request from the client namespace: the body ("be1"/"be2").
fn one_request(target: &str) -> Result<String, String> {
    let addr: SocketAddr = target.parse().map_err(|e| format!("{e}"))?;
    in_netns(NS_CLIENT, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bb\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_owned())
            .ok_or_else(|| format!("not HTTP: {resp:?}"))
    })
}

/// Warm-up and check: fresh connections through the contender; the bodies seen.
fn check(c: Contender) -> Result<BTreeMap<String, u32>, String> {
    // Resolve the neighbours on every path first (berth's bpf_fib_lookup needs them resolved):
    // a connection from the balancer to each backend, and a SYN to the client (refused: RST).
    in_netns(NS_LB, || {
        for a in BACKENDS {
            let addr: SocketAddr = format!("{a}:{BE_PORT}").parse().unwrap();
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        let addr: SocketAddr = format!("{CLIENT_IP}:9").parse().unwrap();
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    });
    let mut seen = BTreeMap::new();
    let endpoints = c.endpoints();
    for i in 0..16 {
        *seen
            .entry(one_request(&endpoints[i % endpoints.len()])?)
            .or_insert(0) += 1;
    }
    let want = if c == Contender::Direct1 { 1 } else { 2 };
    if seen.len() != want {
        return Err(format!(
            "{}: 16 new connections reached {seen:?}, expected {want} backend(s)",
            c.name()
        ));
    }
    Ok(seen)
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// Machine-wide (system, softirq) ticks, from the first line of /proc/stat.
fn kernel_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq ...
    (
        f.get(2).copied().unwrap_or(0),
        f.get(6).copied().unwrap_or(0),
    )
}

/// (utime, stime) ticks of a process.
fn proc_ticks(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
    let rest: Vec<&str> = s
        .rsplit_once(") ")
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    let at = |i: usize| rest.get(i - 3).and_then(|v| v.parse().ok()).unwrap_or(0);
    (at(14), at(15))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[derive(Clone, Debug, Default)]
struct Run {
    rps: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    socket_errors: u64,
    non_2xx: u64,
    /// System + softirq seconds of the whole machine (+ HAProxy's user time).
    cpu_s: f64,
    cpu_per_100k: f64,
    /// HAProxy's own user / system seconds (informational; the system part is in `cpu_s`).
    proc_user_s: f64,
    proc_sys_s: f64,
    /// Requests each backend logged during the run.
    split: [u64; 2],
}

impl Run {
    fn errors(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }

    fn json(&self) -> Value {
        json!({
            "rps": self.rps, "requests": self.requests, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
            "socket_errors": self.socket_errors, "non_2xx": self.non_2xx,
            "cpu_s": self.cpu_s, "cpu_s_per_100k": self.cpu_per_100k,
            "balancer_process_user_s": self.proc_user_s, "balancer_process_sys_s": self.proc_sys_s,
            "backend_requests": self.split,
        })
    }
}

/// wrk's latency figure ("385.00us", "1.20ms", "2.00s", "1.00m") in milliseconds.
fn parse_latency(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

/// The figures of wrk's output (with `--latency`).
fn parse_wrk(out: &str) -> Result<Run, String> {
    let mut r = Run::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
        } else if words.len() >= 2 && words[1] == "requests" && words.get(2) == Some(&"in") {
            r.requests = words[0].parse().map_err(|e| format!("{line:?}: {e}"))?;
        } else if words.len() == 2 && words[0] == "50%" {
            r.p50_ms = parse_latency(words[1]).ok_or(format!("latency {line:?}"))?;
        } else if words.len() == 2 && words[0] == "99%" {
            r.p99_ms = parse_latency(words[1]).ok_or(format!("latency {line:?}"))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    if r.rps == 0.0 || r.requests == 0 {
        return Err(format!("no requests/s in wrk's output:\n{out}"));
    }
    Ok(r)
}

fn measure(c: Contender, w: Workload, running: &Running, a: &Args) -> Run {
    // The ceiling loads both backends like the balancers do: one wrk per backend with half the
    // connections each (same CPU), rates added, the worse p99 and the mean p50 kept. One
    // backend alone (direct1) leaves the second nginx idle, while both share a CPU.
    let targets = c.endpoints();
    let duration = format!("{}s", a.duration);
    let conns = (a.connections / targets.len() as u32).max(1).to_string();
    let logs0 = [access_log_requests(0), access_log_requests(1)];
    let pid = running.user_pid();
    let p0 = pid.map(proc_ticks).unwrap_or_default();
    let k0 = kernel_ticks();
    let children: Vec<Child> = targets
        .iter()
        .map(|t| {
            let mut cmd = ns_command(NS_CLIENT, "wrk", Some(a.wrk_cpu));
            cmd.args([
                "-t1",
                "-c",
                &conns,
                "-d",
                &duration,
                "--timeout",
                "2s",
                "--latency",
            ]);
            if w == Workload::NewConn {
                cmd.args(["-H", "Connection: close"]);
            }
            cmd.arg(format!("http://{t}/"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running wrk")
        })
        .collect();
    let outs: Vec<std::process::Output> = children
        .into_iter()
        .map(|ch| ch.wait_with_output().expect("wrk"))
        .collect();
    let k1 = kernel_ticks();
    let p1 = pid.map(proc_ticks).unwrap_or_default();
    let parsed: Vec<Run> = outs
        .iter()
        .map(|out| {
            parse_wrk(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| {
                panic!(
                    "{} {}: wrk ({}): {e}\n{}",
                    c.name(),
                    w.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    let mut r = parsed[0].clone();
    for p in &parsed[1..] {
        r.rps += p.rps;
        r.requests += p.requests;
        r.p50_ms = (r.p50_ms + p.p50_ms) / 2.0;
        r.p99_ms = r.p99_ms.max(p.p99_ms);
        r.socket_errors += p.socket_errors;
        r.non_2xx += p.non_2xx;
    }
    let hz = clock_ticks();
    r.proc_user_s = p1.0.saturating_sub(p0.0) as f64 / hz;
    r.proc_sys_s = p1.1.saturating_sub(p0.1) as f64 / hz;
    let kernel = (k1.0 - k0.0 + k1.1 - k0.1) as f64 / hz;
    r.cpu_s = kernel + r.proc_user_s;
    r.cpu_per_100k = r.cpu_s / r.requests as f64 * 100_000.0;
    // Let connections close and nginx flush its buffered access log (flush=1s).
    std::thread::sleep(Duration::from_millis(1200));
    r.split = [
        access_log_requests(0) - logs0[0],
        access_log_requests(1) - logs0[1],
    ];
    r
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

type Results = BTreeMap<(Contender, Workload), Vec<Run>>;

#[derive(Clone, Copy)]
enum Metric {
    Rate,
    P50,
    P99,
    Cpu,
}

impl Metric {
    fn of(self, r: &Run) -> f64 {
        match self {
            Metric::Rate => r.rps,
            Metric::P50 => r.p50_ms,
            Metric::P99 => r.p99_ms,
            Metric::Cpu => r.cpu_per_100k,
        }
    }
}

fn med(res: &Results, c: Contender, w: Workload, m: Metric) -> f64 {
    median(
        res.get(&(c, w))
            .map(|v| v.iter().map(|r| m.of(r)).collect())
            .unwrap_or_default(),
    )
}

fn fmt_num(v: f64, m: Metric) -> String {
    if v.is_nan() {
        return "-".into();
    }
    match m {
        Metric::Rate => format!("{v:.0}"),
        Metric::P50 | Metric::P99 => format!("{v:.2}"),
        Metric::Cpu => format!("{v:.3}"),
    }
}

struct Target {
    text: String,
    value: f64,
    pass: bool,
}

fn targets(res: &Results, present: &[Contender]) -> Vec<Target> {
    use Contender::*;
    use Workload::*;
    let mut t = Vec::new();
    let has = |c| present.contains(&c);
    let mut ratio_min = |w: Workload, m: Metric, other: Contender, min: f64, label: &str| {
        if has(other) {
            let v = med(res, Berth, w, m) / med(res, other, w, m);
            t.push(Target {
                text: format!("{label} berth >= {min}x {}", other.name()),
                value: v,
                pass: v >= min,
            });
        }
    };
    ratio_min(KeepAlive, Metric::Rate, Direct, 0.95, "keep-alive req/s");
    ratio_min(KeepAlive, Metric::Rate, Direct1, 0.95, "keep-alive req/s");
    ratio_min(KeepAlive, Metric::Rate, Haproxy, 1.5, "keep-alive req/s");
    ratio_min(NewConn, Metric::Rate, Direct, 0.9, "new conn/s");
    ratio_min(NewConn, Metric::Rate, Direct1, 0.9, "new conn/s");
    ratio_min(NewConn, Metric::Rate, Haproxy, 2.0, "new conn/s");
    ratio_min(NewConn, Metric::Rate, Nftables, 1.1, "new conn/s");
    for d in [Direct, Direct1] {
        if !has(d) {
            continue;
        }
        for w in Workload::ALL {
            let v = med(res, Berth, w, Metric::P99) / med(res, d, w, Metric::P99);
            t.push(Target {
                text: format!("{} p99 berth <= 1.1x {}", w.name(), d.name()),
                value: v,
                pass: v <= 1.1,
            });
        }
    }
    for w in Workload::ALL {
        // Lowest among the balancers (direct balances nothing).
        let others: Vec<f64> = present
            .iter()
            .filter(|c| !matches!(c, Berth | Direct | Direct1))
            .map(|c| med(res, *c, w, Metric::Cpu))
            .collect();
        if others.is_empty() {
            continue;
        }
        let best_other = others.iter().copied().fold(f64::INFINITY, f64::min);
        let v = med(res, Berth, w, Metric::Cpu) / best_other;
        t.push(Target {
            text: format!("{} CPU/100k berth lowest of the balancers", w.name()),
            value: v,
            pass: v < 1.0,
        });
    }
    t
}

fn first_line_value(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_owned())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn report(res: &Results, a: &Args, present: &[Contender], started: Instant) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let kernel = try_sh(&["uname", "-r"])
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpu = first_line_value("/proc/cpuinfo", "model name");
    let n = cores();
    let mut md = String::new();
    md += &format!(
        "\n## berth-loadbench {} ({} rounds x {} s per run, median; kernel {kernel}, {cpu}, {n} cores)\n\n",
        utc(now),
        a.rounds,
        a.duration
    );
    md += "Each cell: median (ratio to berth). Errors: wrk socket errors + non-2xx, summed over rounds. \
           be1/be2: share of the requests each backend logged, over all rounds.\n\n";
    md += "| workload | contender | rate /s | p50 ms | p99 ms | CPU s/100k req | errors | be1/be2 % |\n";
    md += "|---|---|---|---|---|---|---|---|\n";
    for w in Workload::ALL {
        for &c in present {
            let runs = res.get(&(c, w)).cloned().unwrap_or_default();
            let cell = |m: Metric| {
                let v = med(res, c, w, m);
                let b = med(res, Contender::Berth, w, m);
                format!("{} ({:.2}x)", fmt_num(v, m), v / b)
            };
            let errors: u64 = runs.iter().map(Run::errors).sum();
            let split = runs
                .iter()
                .fold([0u64; 2], |s, r| [s[0] + r.split[0], s[1] + r.split[1]]);
            let total = (split[0] + split[1]).max(1) as f64;
            md += &format!(
                "| {} ({}) | {} | {} | {} | {} | {} | {errors} | {:.0}/{:.0} |\n",
                w.name(),
                w.unit(),
                c.name(),
                cell(Metric::Rate),
                cell(Metric::P50),
                cell(Metric::P99),
                cell(Metric::Cpu),
                100.0 * split[0] as f64 / total,
                100.0 * split[1] as f64 / total,
            );
        }
    }
    let ts = targets(res, present);
    md += "\n| target | measured | result |\n|---|---|---|\n";
    for t in &ts {
        md += &format!(
            "| {} | {:.2}x | {} |\n",
            t.text,
            t.value,
            if t.pass { "pass" } else { "miss" }
        );
    }
    md += &format!(
        "\nTotal {:.0} s. CPU = machine-wide system + softirq seconds over the run (+ HAProxy's user time), \
         per 100k requests.\n",
        started.elapsed().as_secs_f64()
    );
    print!("{md}");

    let mut contenders = serde_json::Map::new();
    for &c in present {
        let mut per = serde_json::Map::new();
        for w in Workload::ALL {
            let runs = res.get(&(c, w)).cloned().unwrap_or_default();
            per.insert(
                w.name().into(),
                json!({
                    "median": {
                        "rps": med(res, c, w, Metric::Rate),
                        "p50_ms": med(res, c, w, Metric::P50),
                        "p99_ms": med(res, c, w, Metric::P99),
                        "cpu_s_per_100k": med(res, c, w, Metric::Cpu),
                    },
                    "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
                }),
            );
        }
        contenders.insert(c.name().into(), Value::Object(per));
    }
    let doc = json!({
        "date": utc(now),
        "unix_time": now,
        "kernel": kernel,
        "cpu_model": cpu,
        "cores": n,
        "duration_s": a.duration,
        "rounds": a.rounds,
        "connections": a.connections,
        "wrk_cpu": a.wrk_cpu,
        "nginx_cpu": a.nginx_cpu,
        "method": {
            "wrk": format!("wrk -t1 -c{} -d{}s --timeout 2s --latency [-H 'Connection: close']", a.connections, a.duration),
            "cpu": "machine-wide (system + softirq) jiffies delta from /proc/stat over the wrk run, nothing subtracted; \
                    plus HAProxy's utime from /proc/PID/stat (its stime is already in the machine's system time)",
            "direct": "one wrk per backend, half the connections each, same CPU, routed through bb-lb (no balancer); rates added, worse p99, mean p50",
            "direct1": "one wrk to backend 1 alone (only with --contenders)",
            "nftables": "dnat to jhash ip saddr . tcp sport mod 2 map (per flow), no masquerade",
            "haproxy": "mode tcp, balance roundrobin, nbthread 1, unpinned",
            "median": "per figure over rounds; contenders interleaved, order rotated each round",
        },
        "contenders": contenders,
        "targets": ts.iter().map(|t| json!({"target": t.text, "value": t.value, "pass": t.pass})).collect::<Vec<_>>(),
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let text = serde_json::to_string_pretty(&doc).expect("json");
    let file = dir.join(format!("loadbench-{now}.json"));
    std::fs::write(&file, &text).expect("write json");
    std::fs::write(dir.join("latest.json"), &text).expect("write latest.json");
    eprintln!("loadbench: wrote {}", file.display());
}

// ---------------------------------------------------------------------------------------------

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Removes the work directory on drop (after the processes that write there are gone).
struct WorkDir;

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["berth.log", "haproxy.log"] {
                if let Ok(s) = std::fs::read_to_string(Path::new(WORKDIR).join(f)) {
                    eprintln!("---- {f} ----\n{s}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(WORKDIR);
    }
}

fn main() {
    let a = args();
    for tool in ["wrk", "nginx", "haproxy", "nft"] {
        assert!(
            try_sh(&["sh", "-c", &format!("command -v {tool}")]).is_ok(),
            "{tool} is missing: run `cargo xtask bench`, which installs it"
        );
    }
    assert!(
        berth_bin().exists(),
        "{} not built: run `cargo xtask bench` (or set BERTH_BIN)",
        berth_bin().display()
    );
    // SIGINT/SIGTERM: stop after the current run and clean up through the guards (the
    // children in our process group get the same SIGINT and stop on their own).
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(WORKDIR);
    std::fs::create_dir_all(WORKDIR).expect("work dir");
    // Drop order (reverse of declaration): contender, nginx, topology, then the work dir.
    let _workdir = WorkDir;
    let _topo = Topology::build();
    let _nginx = [start_nginx(0, a.nginx_cpu), start_nginx(1, a.nginx_cpu)];
    eprintln!(
        "loadbench: {} rounds x {:?} x {} workloads x {} s (wrk on CPU {}, nginx on CPU {})",
        a.rounds,
        a.contenders.iter().map(|c| c.name()).collect::<Vec<_>>(),
        Workload::ALL.len(),
        a.duration,
        a.wrk_cpu,
        a.nginx_cpu
    );
    let mut res: Results = BTreeMap::new();
    for round in 0..a.rounds {
        let n = a.contenders.len();
        for k in 0..n {
            let c = a.contenders[(k + round) % n];
            let running = start(c);
            match check(c) {
                Ok(seen) => eprintln!(
                    "loadbench: round {} {}: check ok {seen:?}",
                    round + 1,
                    c.name()
                ),
                Err(e) => {
                    eprintln!(
                        "loadbench: round {} {}: CHECK FAILED: {e}",
                        round + 1,
                        c.name()
                    );
                    if let Running::Berth(p) = &running {
                        eprintln!("---- berth log ----\n{}", p.log_text());
                    }
                }
            }
            for w in Workload::ALL {
                assert!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                let r = measure(c, w, &running, &a);
                eprintln!(
                    "loadbench: round {} {:>8} {:>10}: {:>8.0} {} p50 {:.2} ms p99 {:.2} ms, {:.3} CPU s/100k, errors {}, be1/be2 {}/{}",
                    round + 1,
                    c.name(),
                    w.name(),
                    r.rps,
                    w.unit(),
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_per_100k,
                    r.errors(),
                    r.split[0],
                    r.split[1]
                );
                res.entry((c, w)).or_default().push(r);
            }
            running.stop();
        }
    }
    let mut present = a.contenders.clone();
    present.sort();
    report(&res, &a, &present, started);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 5s test @ http://10.77.0.1:8080/\n  1 threads and 32 connections\n  \
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.02ms  300.00us   9.00ms   80.00%\n  \
            Latency Distribution\n     50%  385.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.50ms\n  \
            123456 requests in 5.00s, 17.43MB read\n  Socket errors: connect 0, read 12, write 1, timeout 0\n  \
            Non-2xx or 3xx responses: 5\nRequests/sec:  24690.35\nTransfer/sec:      3.49MB\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 123_456);
        assert!((r.rps - 24690.35).abs() < 1e-6);
        assert!((r.p50_ms - 0.385).abs() < 1e-9);
        assert!((r.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(r.socket_errors, 13);
        assert_eq!(r.non_2xx, 5);
    }

    #[test]
    fn formats_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
