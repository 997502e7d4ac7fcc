//! The contenders (berth, nftables, HAProxy and the no-balancer ceilings, and berth's full NAT
//! against HAProxy to remote backends): starting one, checking it balances, and undoing it when
//! its turn ends.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use berth_tests::{
    daemon::berth_bin,
    netns::{in_netns, ns_command, ns_sh},
    servers::http_get,
};

use crate::topology::{
    ADMIN_SOCKET, BACKENDS, BE_PORT, CLIENT_IP, GATEWAYS, LB_IFACES, NS_BE, NS_CLIENT, NS_LB,
    PIN_PATH, Proc, SVC_PORT, VIP, WORKDIR, berth_down, berth_pins,
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Contender {
    Direct1,
    Direct,
    Berth,
    Nftables,
    Haproxy,
    /// berth with `mode = "fullnat"`, the backends remote (no route back to the client).
    BerthFullnat,
    /// HAProxy to the same remote backends.
    HaproxyRemote,
}

impl Contender {
    pub const ALL: [Contender; 7] = [
        Contender::Direct1,
        Contender::Direct,
        Contender::Berth,
        Contender::Nftables,
        Contender::Haproxy,
        Contender::BerthFullnat,
        Contender::HaproxyRemote,
    ];

    /// What runs without `--contenders`.
    pub const DEFAULT: [Contender; 6] = [
        Contender::Direct,
        Contender::Berth,
        Contender::Nftables,
        Contender::Haproxy,
        Contender::BerthFullnat,
        Contender::HaproxyRemote,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct1 => "direct1",
            Contender::Direct => "direct",
            Contender::Berth => "berth",
            Contender::Nftables => "nftables",
            Contender::Haproxy => "haproxy",
            Contender::BerthFullnat => "berth-fullnat",
            Contender::HaproxyRemote => "haproxy-remote",
        }
    }

    /// Its backends are remote: while it runs they have no route back to the client, so a
    /// balancer that leaves the client's address as the source (DNAT) gets no reply.
    pub fn remote(self) -> bool {
        matches!(self, Contender::BerthFullnat | Contender::HaproxyRemote)
    }

    /// A berth (its TC programs' run time is measured).
    pub fn is_berth(self) -> bool {
        matches!(self, Contender::Berth | Contender::BerthFullnat)
    }

    /// The berth its ratios are given against: full NAT for the remote-backend contenders.
    pub fn reference(self) -> Contender {
        if self.remote() {
            Contender::BerthFullnat
        } else {
            Contender::Berth
        }
    }

    /// Where the clients connect (one wrk per address).
    pub fn endpoints(self) -> Vec<String> {
        match self {
            Contender::Direct1 => vec![format!("{}:{BE_PORT}", BACKENDS[0])],
            Contender::Direct => BACKENDS.iter().map(|b| format!("{b}:{BE_PORT}")).collect(),
            _ => vec![format!("{VIP}:{SVC_PORT}")],
        }
    }
}

/// A running contender: what must be undone when its turn ends.
pub enum Running {
    Direct,
    Berth(Proc),
    Nftables(NftTable),
    Haproxy(Proc),
    /// A contender to remote backends: their routes come back when it stops.
    Remote(Box<Running>, RemoteBackends),
}

impl Running {
    /// The pid whose user time counts as balancer CPU (HAProxy's).
    pub fn user_pid(&self) -> Option<i32> {
        match self {
            Running::Haproxy(p) => Some(p.pid()),
            Running::Remote(r, _) => r.user_pid(),
            _ => None,
        }
    }

    /// berth's log, for a failed check.
    pub fn berth_log(&self) -> Option<String> {
        match self {
            Running::Berth(p) => Some(p.log_text()),
            Running::Remote(r, _) => r.berth_log(),
            _ => None,
        }
    }

    pub fn stop(self) {
        match self {
            Running::Berth(mut p) => {
                p.stop();
                berth_down();
            }
            Running::Haproxy(mut p) => p.stop(),
            Running::Nftables(t) => drop(t),
            Running::Direct => {}
            Running::Remote(r, routes) => {
                r.stop();
                drop(routes);
            }
        }
    }
}

/// The backends made remote: their default routes (through bb-lb) removed, so only what comes
/// from bb-lb's own addresses on their links can be answered, as for backends on other hosts
/// whose way to the client bypasses the balancer. Restored on drop.
pub struct RemoteBackends;

impl RemoteBackends {
    fn new() -> Self {
        for (ns, _) in NS_BE.iter().zip(GATEWAYS) {
            ns_sh(ns, &["ip", "route", "del", "default"]);
        }
        RemoteBackends
    }
}

impl Drop for RemoteBackends {
    fn drop(&mut self) {
        for (ns, gw) in NS_BE.iter().zip(GATEWAYS) {
            ns_sh(ns, &["ip", "route", "replace", "default", "via", gw]);
        }
    }
}

/// The nft table in bb-lb; deleted on drop (the namespace's removal would also drop it).
pub struct NftTable;

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = ns_command(NS_LB, "nft")
            .args(["delete", "table", "ip", "bb_nat"])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn start(c: Contender) -> Running {
    match c {
        Contender::Direct | Contender::Direct1 => Running::Direct,
        Contender::Berth => Running::Berth(start_berth("dnat")),
        Contender::BerthFullnat => {
            let routes = RemoteBackends::new();
            Running::Remote(Box::new(Running::Berth(start_berth("fullnat"))), routes)
        }
        Contender::HaproxyRemote => {
            let routes = RemoteBackends::new();
            Running::Remote(Box::new(start(Contender::Haproxy)), routes)
        }
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
            let mut cmd = ns_command(NS_LB, "haproxy");
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

/// `--berth-dataplane`: lines for berth's `[dataplane]` section, none by default.
pub static BERTH_DATAPLANE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// berth with its service in `mode` ("dnat" or "fullnat": from bb-lb's address on each
/// backend's link, the default source, and the default `snat_ports`, 61000-65535). Before a
/// closed flow's port could be taken over after `snat_port_reuse_ms`, every closed flow held its
/// port for the 10 s linger, so new flows to a backend were bounded by about 450/s (the first run
/// of this contender made 1540 conn/s to the two backends) and this bench needed
/// `snat_ports = "1024-65535"`.
pub fn start_berth(mode: &str) -> Proc {
    let dataplane = BERTH_DATAPLANE
        .get()
        .map_or(String::new(), |l| format!("[dataplane]\n{l}\n"));
    let config = format!(
        "{dataplane}[metrics]\nenabled = false\n\n[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:{SVC_PORT}\"\n\
         protocol = \"tcp\"\nmode = \"{mode}\"\nbackends = [\"{b0}:{BE_PORT}\", \"{b1}:{BE_PORT}\"]\n",
        b0 = BACKENDS[0],
        b1 = BACKENDS[1],
    );
    let path = Path::new(WORKDIR).join("berth.toml");
    std::fs::write(&path, config).expect("berth.toml");
    let mut cmd = ns_command(NS_LB, berth_bin());
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

/// One request on a fresh connection from the client namespace (HTTP/1.0: the server closes
/// it): the body ("be1"/"be2").
pub fn one_request(target: &str) -> Result<String, String> {
    let addr: SocketAddrV4 = target.parse().map_err(|e| format!("{e}"))?;
    in_netns(NS_CLIENT, move || http_get(addr).map(|(_, body)| body))
}

/// Warm-up and check: fresh connections through the contender; the bodies seen.
pub fn check(c: Contender) -> Result<BTreeMap<String, u32>, String> {
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
    if c.remote() {
        // Remote for real: the client cannot reach a backend directly (no way back).
        let addr: SocketAddr = format!("{}:{BE_PORT}", BACKENDS[0]).parse().unwrap();
        if in_netns(NS_CLIENT, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        }) {
            return Err(format!(
                "{}: the client reached {addr} directly: the backends are not remote",
                c.name()
            ));
        }
    }
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
