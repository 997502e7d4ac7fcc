//! The benchmark's namespaces (`bb-client`, `bb-lb`, `bb-be1`, `bb-be2`) and their veths, the
//! processes it starts in them, and the two nginx backends every contender shares.

use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use berth_tests::{
    daemon::{self, berth_bin},
    netns::{in_netns, kill_all_in, ns_command, ns_sh, on_cpu, sh, signal, try_sh},
};

pub const NS_CLIENT: &str = "bb-client";
pub const NS_LB: &str = "bb-lb";
pub const NS_BE: [&str; 2] = ["bb-be1", "bb-be2"];
pub const VIP: &str = "10.77.0.1";
pub const CLIENT_IP: &str = "10.77.0.2";
pub const BACKENDS: [&str; 2] = ["10.77.1.2", "10.77.2.2"];
/// bb-lb's address on each backend's link: the backends' default gateway (and full NAT's
/// source toward them).
pub const GATEWAYS: [&str; 2] = ["10.77.1.1", "10.77.2.1"];
pub const SVC_PORT: u16 = 8080;
pub const BE_PORT: u16 = 8000;
/// Client-side veth of the balancer, then its backend-side ones.
pub const LB_IFACES: [&str; 3] = ["bb-lbc", "bb-lb1", "bb-lb2"];
pub const WORKDIR: &str = "/tmp/bb-loadbench";
pub const PIN_PATH: &str = "/sys/fs/bpf/bb-berth";
pub const ADMIN_SOCKET: &str = "/tmp/bb-berth.sock";
/// nginx logs only the status: 4 bytes a request, so a log's growth counts requests.
pub const LOG_LINE: u64 = 4;

/// Whether this berth has `--pin-path`/`--cgroup` and `berth down` (pinned dataplane).
pub fn berth_pins() -> bool {
    Command::new(berth_bin())
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--pin-path"))
}

pub fn berth_down() {
    if berth_pins() && Path::new(PIN_PATH).exists() {
        let _ = daemon::berth_down(Path::new(PIN_PATH));
    }
}

/// Removes what a crashed run (or this one) left: processes in `bb-` namespaces, the
/// namespaces, berth's pins.
pub fn remove_everything() {
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
pub struct Topology;

impl Topology {
    pub fn build() -> Self {
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
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command) -> Self {
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

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    pub fn check_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log_text());
        }
    }

    pub fn stop(&mut self) {
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

pub fn start_nginx(i: usize, cpu: usize) -> Proc {
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
    let mut cmd = ns_command(NS_BE[i], "nginx");
    on_cpu(&mut cmd, cpu);
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

pub fn access_log_requests(i: usize) -> u64 {
    let p = Path::new(WORKDIR).join(format!("be{}/access.log", i + 1));
    std::fs::metadata(p).map_or(0, |m| m.len() / LOG_LINE)
}
