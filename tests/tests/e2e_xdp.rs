//! End to end with the XDP fast path (`[dataplane] xdp = true`): the real daemon in a namespace
//! playing the host, one-armed (client, host and backends on one switch, a bridge in its own
//! namespace; the host has one interface, `eth0`, a veth), real TCP and UDP flows from a client
//! namespace. The established packets of each flow must be sent by XDP (`xdp_tx`), the rest by
//! TC, and every answer must be right.
//!
//! A veth takes `XDP_TX` frames only when its peer's receive side runs NAPI: the switch's port
//! facing the host gets a pass-through XDP program ([`PeerXdp`]), as a NIC driver has its own. Frames a local socket sends through a veth carry `CHECKSUM_PARTIAL` checksums (only
//! the pseudo-header sum in the field); see `partial_checksums_are_left_to_tc` for what that
//! means for XDP.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use berth_tests::topo::{
    Berth, ETHTOOL_STXCSUM, Netns, Servers, Session, assert_shares, attach_noop_xdp, ethtool_flag,
    remove_leftovers, responder, spread, veth,
};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("socket address")
}

/// Sets one legacy ethtool flag of `iface` in `ns` ([`ethtool_flag`]).
fn ethtool_set(ns: &Netns, iface: &str, cmd: u32, on: bool) {
    let iface = iface.to_owned();
    ns.run(move || ethtool_flag(&iface, cmd, on));
}

/// A pass-through XDP program (`berth_xdp_noop`) attached in native mode to `iface` in `ns`,
/// held by a thread there until dropped: it gives a veth's receive side the NAPI instance that
/// `XDP_TX` frames sent into its peer need (GRO set with `ETHTOOL_SGRO` did not: every frame was
/// lost, see README).
struct PeerXdp {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerXdp {
    fn attach(ns: &Netns, iface: &str) -> Self {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let iface = iface.to_owned();
        let thread = ns.spawn(move || match attach_noop_xdp(&iface) {
            Ok(ebpf) => {
                ready_tx.send(Ok(())).unwrap();
                let _ = rx.recv();
                drop(ebpf);
            }
            Err(e) => ready_tx.send(Err(e)).unwrap(),
        });
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("attaching the pass-through program: {e}"));
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for PeerXdp {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Topo {
    // Drop order: servers and the peer's program first, then namespaces.
    _servers: Vec<Servers>,
    _peer_xdp: PeerXdp,
    lb: Netns,
    client: Netns,
    backends: Vec<Netns>,
    sw: Netns,
}

/// Client 10.10.0.2 and fd00:10::2, host 10.10.0.1 + 10.20.0.1 and fd00:10::1 + fd00:20::1 on
/// `eth0`, backends 10.20.0.11-13 and fd00:20::11-13 (b1-b3) serving TCP and UDP on :8000 of
/// both, all on one switch; a pass-through XDP program on the switch's port to the host.
fn one_armed() -> Topo {
    remove_leftovers();
    let sw = Netns::new("sw");
    let lb = Netns::new("lb");
    let client = Netns::new("cl");
    sw.exec(&["ip", "link", "add", "sw0", "type", "bridge"]);
    sw.exec(&["ip", "link", "set", "sw0", "up"]);
    veth(&lb, "eth0", &sw, "p-lb");
    veth(&client, "eth0", &sw, "p-cl");
    for p in ["p-lb", "p-cl"] {
        sw.exec(&["ip", "link", "set", p, "master", "sw0"]);
    }
    let peer_xdp = PeerXdp::attach(&sw, "p-lb");
    lb.exec(&["ip", "addr", "add", "10.10.0.1/24", "dev", "eth0"]);
    lb.exec(&["ip", "addr", "add", "10.20.0.1/24", "dev", "eth0"]);
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    client.exec(&["ip", "addr", "add", "10.10.0.2/24", "dev", "eth0"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.10.0.1"]);
    let addr6 = |ns: &Netns, a: &str| {
        ns.exec(&["ip", "-6", "addr", "add", a, "dev", "eth0", "nodad"]);
    };
    addr6(&lb, "fd00:10::1/64");
    addr6(&lb, "fd00:20::1/64");
    lb.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    addr6(&client, "fd00:10::2/64");
    client.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:10::1"]);
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=3 {
        let b = Netns::new(&format!("b{n}"));
        veth(&b, "eth0", &sw, &format!("p-b{n}"));
        sw.exec(&["ip", "link", "set", &format!("p-b{n}"), "master", "sw0"]);
        let addr = format!("10.20.0.1{n}");
        b.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        b.exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);
        servers.push(Servers::start(
            &b,
            &format!("b{n}"),
            sa(&format!("{addr}:8000")),
            true,
        ));
        addr6(&b, &format!("fd00:20::1{n}/64"));
        b.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:20::1"]);
        servers.push(Servers::start_any(
            &b,
            &format!("b{n}"),
            format!("[fd00:20::1{n}]:8000").parse().expect("address"),
            true,
        ));
        backends.push(b);
    }
    Topo {
        _servers: servers,
        _peer_xdp: peer_xdp,
        lb,
        client,
        backends,
        sw,
    }
}

impl Topo {
    /// Turns transmit checksum offload of the client's and the backends' interfaces on or off:
    /// off, their frames carry complete checksums, as frames from a NIC do.
    fn tx_checksum_offload(&self, on: bool) {
        ethtool_set(&self.client, "eth0", ETHTOOL_STXCSUM, on);
        for b in &self.backends {
            ethtool_set(b, "eth0", ETHTOOL_STXCSUM, on);
        }
    }
}

const CONFIG: &str = r#"
[dataplane]
maglev_table_size = 65537
xdp = true
[[service]]
name = "web"
listen = "0.0.0.0:8080"
backends = ["10.20.0.11:8000", "10.20.0.12:8000", "10.20.0.13:8000"]
[[service]]
name = "udp"
listen = "0.0.0.0:8080"
protocol = "udp"
backends = ["10.20.0.11:8000", "10.20.0.12:8000", "10.20.0.13:8000"]
[[service]]
name = "web6"
listen = "[::]:8080"
backends = ["[fd00:20::11]:8000", "[fd00:20::12]:8000", "[fd00:20::13]:8000"]
[[service]]
name = "udp6"
listen = "[::]:8080"
protocol = "udp"
backends = ["[fd00:20::11]:8000", "[fd00:20::12]:8000", "[fd00:20::13]:8000"]
"#;

fn counter(berth: &Berth, name: &str) -> u64 {
    berth
        .status()
        .counters
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| *v)
}

/// The host's IPv4 service address (:8080).
const SVC4: &str = "10.10.0.1:8080";
/// The host's IPv6 service address (`[::]:8080` on its client-side address).
const SVC6: &str = "[fd00:10::1]:8080";

/// `n` requests on each of `conns` TCP connections to `to`, each answer checked; returns the
/// backends that answered, per connection.
fn tcp_sessions(client: &Netns, to: &str, conns: usize, n: usize) -> Vec<String> {
    let to: SocketAddr = to.parse().expect("service address");
    client.run(move || {
        (0..conns)
            .map(|c| {
                let mut s = Session::connect_any(to).expect("connect");
                let mut who = None;
                for i in 0..n {
                    let line = format!("c{c}-{i}");
                    let a = s.request(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
                    let r = responder(&a).expect("an answer").to_owned();
                    assert_eq!(a, format!("Hello from {r}: {line}"));
                    assert!(who.as_ref().is_none_or(|w| *w == r), "one backend per flow");
                    who = Some(r);
                }
                who.expect("answered")
            })
            .collect()
    })
}

/// `n` datagrams from one UDP socket (one flow) to `to`, each answer checked; the backend.
fn udp_flow(client: &Netns, to: &str, n: usize) -> String {
    let to: SocketAddr = to.parse().expect("service address");
    client.run(move || {
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let s = std::net::UdpSocket::bind(any).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect(to).unwrap();
        let mut who = None;
        let mut buf = [0u8; 256];
        for i in 0..n {
            let line = format!("u{i}");
            s.send(line.as_bytes()).unwrap();
            let k = s.recv(&mut buf).unwrap_or_else(|e| panic!("{line}: {e}"));
            let a = String::from_utf8_lossy(&buf[..k]).into_owned();
            let r = responder(&a).expect("an answer").to_owned();
            assert_eq!(a, format!("Hello from {r}: {line}"));
            assert!(who.as_ref().is_none_or(|w| *w == r), "one backend per flow");
            who = Some(r);
        }
        who.expect("answered")
    })
}

#[test]
fn established_flows_go_by_xdp_and_every_answer_is_right() {
    let t = one_armed();
    t.tx_checksum_offload(false);
    let berth = Berth::start(&t.lb, CONFIG, &["eth0"]);
    berth.wait_for("XDP fast path attached (native mode)", 1);
    // New connections spread as without XDP (their first packets are TC's).
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 300);
    assert_shares(
        "tcp with xdp",
        &counts,
        &[("b1", 1), ("b2", 1), ("b3", 1)],
        0.1,
    );
    let (tx0, fwd0, rep0) = (
        counter(&berth, "xdp_tx"),
        counter(&berth, "fwd_redirect"),
        counter(&berth, "reply_redirect"),
    );
    // 30 connections of 20 requests each: 20 requests and 20 answers per flow, sent by XDP.
    let who = tcp_sessions(&t.client, SVC4, 30, 20);
    assert!(who.iter().any(|w| w != &who[0]), "spread: {who:?}");
    let (tx, fwd, rep) = (
        counter(&berth, "xdp_tx") - tx0,
        counter(&berth, "fwd_redirect") - fwd0,
        counter(&berth, "reply_redirect") - rep0,
    );
    println!("30 x 20 requests: xdp_tx {tx}, TC fwd_redirect {fwd}, reply_redirect {rep}");
    assert!(tx >= 2 * 30 * 20, "requests and answers by XDP: {tx}");
    assert!(
        fwd + rep < tx / 4,
        "TC did only the handshakes and closes: {fwd} + {rep} vs {tx}"
    );
    // A UDP flow: its first datagram and answer are TC's, the rest XDP's.
    let tx0 = counter(&berth, "xdp_tx");
    udp_flow(&t.client, SVC4, 100);
    let tx = counter(&berth, "xdp_tx") - tx0;
    assert!(tx >= 2 * 98, "udp by XDP: {tx}");
    // Nothing dropped for a bad checksum at the receivers: every answer above came back.
    drop(berth);
    let _ = &t.sw;
}

/// The same over IPv6: established flows' packets sent by XDP (`xdp6.rs`), every answer right.
#[test]
fn established_ipv6_flows_go_by_xdp_and_every_answer_is_right() {
    let t = one_armed();
    t.tx_checksum_offload(false);
    let berth = Berth::start(&t.lb, CONFIG, &["eth0"]);
    berth.wait_for("XDP fast path attached (native mode)", 1);
    let (tx0, fwd0, rep0) = (
        counter(&berth, "xdp_tx"),
        counter(&berth, "fwd_redirect"),
        counter(&berth, "reply_redirect"),
    );
    let who = tcp_sessions(&t.client, SVC6, 30, 20);
    assert!(who.iter().any(|w| w != &who[0]), "spread: {who:?}");
    let (tx, fwd, rep) = (
        counter(&berth, "xdp_tx") - tx0,
        counter(&berth, "fwd_redirect") - fwd0,
        counter(&berth, "reply_redirect") - rep0,
    );
    println!("IPv6, 30 x 20 requests: xdp_tx {tx}, TC fwd_redirect {fwd}, reply_redirect {rep}");
    assert!(tx >= 2 * 30 * 20, "requests and answers by XDP: {tx}");
    assert!(
        fwd + rep < tx / 4,
        "TC did only the handshakes and closes: {fwd} + {rep} vs {tx}"
    );
    let tx0 = counter(&berth, "xdp_tx");
    udp_flow(&t.client, SVC6, 100);
    let tx = counter(&berth, "xdp_tx") - tx0;
    println!("IPv6 UDP, 100 datagrams: xdp_tx {tx}");
    assert!(tx >= 2 * 98, "udp by XDP: {tx}");
    drop(berth);
    let _ = &t.sw;
}

#[test]
#[ignore = "fails, as README says: XDP cannot complete CHECKSUM_PARTIAL frames from a veth"]
fn partial_checksums_are_left_to_tc() {
    // Offload on (the veth default): a local socket's frames carry CHECKSUM_PARTIAL.
    let t = one_armed();
    let berth = Berth::start(&t.lb, CONFIG, &["eth0"]);
    berth.wait_for("XDP fast path attached (native mode)", 1);
    let who = tcp_sessions(&t.client, SVC4, 10, 10);
    assert_eq!(who.len(), 10);
    assert!(!udp_flow(&t.client, SVC4, 20).is_empty());
    println!(
        "with tx checksum offload: xdp_tx {}, event_xdp_pass {}",
        counter(&berth, "xdp_tx"),
        counter(&berth, "event_xdp_pass")
    );
}

/// Where XDP_TX'ed frames go in this topology: one UDP flow, then the interface counters of
/// the switch's port to the host and the backends' checksum-error counters. Run by hand
/// (`--ignored diagnose`).
#[test]
#[ignore = "a diagnosis printed, nothing asserted"]
fn diagnose_where_xdp_frames_go() {
    let t = one_armed();
    t.tx_checksum_offload(false);
    let berth = Berth::start(&t.lb, CONFIG, &["eth0"]);
    berth.wait_for("XDP fast path attached (native mode)", 1);
    let r = t.client.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.connect("10.10.0.1:8080").unwrap();
        let mut buf = [0u8; 256];
        (0..5)
            .map(|i| {
                s.send(format!("u{i}").as_bytes()).unwrap();
                s.recv(&mut buf)
                    .map(|k| String::from_utf8_lossy(&buf[..k]).into_owned())
                    .map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    });
    println!("answers: {r:?}");
    println!("counters: {:?}", berth.status().counters);
    println!(
        "sw p-lb: {}",
        t.sw.exec(&["ip", "-s", "link", "show", "p-lb"])
    );
    for b in &t.backends {
        println!(
            "{}: {}",
            b.name,
            b.exec(&["ip", "-s", "link", "show", "eth0"])
        );
        let snmp = b.exec(&["cat", "/proc/net/snmp"]);
        for l in snmp
            .lines()
            .filter(|l| l.starts_with("Udp:") || l.starts_with("Ip:"))
        {
            println!("{}: {l}", b.name);
        }
    }
    println!("lb: {}", t.lb.exec(&["ip", "-s", "link", "show", "eth0"]));
    for p in ["p-cl", "p-b1", "p-b2", "p-b3"] {
        println!("sw {p}: {}", t.sw.exec(&["ip", "-s", "link", "show", p]));
    }
    let snmp = t.client.exec(&["cat", "/proc/net/snmp"]);
    for l in snmp
        .lines()
        .filter(|l| l.starts_with("Udp:") || l.starts_with("Ip:"))
    {
        println!("client: {l}");
    }
    println!(
        "client: {}",
        t.client.exec(&["ip", "-s", "link", "show", "eth0"])
    );
    println!(
        "fdb: {}",
        t.sw.exec(&["bridge", "fdb", "show", "br", "sw0"])
    );
    println!("lb neigh: {}", t.lb.exec(&["ip", "neigh"]));
    // Now with a pass-through XDP program on the switch's port facing the host (native mode)
    // instead of relying on GRO there.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<String>();
    let holder = t.sw.spawn(move || {
        let mut ebpf = aya::EbpfLoader::new()
            .load(lb_userspace::EBPF_OBJECT)
            .expect("load object");
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(lb_common::PROG_XDP_NOOP)
            .expect("noop")
            .try_into()
            .expect("xdp");
        prog.load().expect("load noop");
        let r = prog
            .attach(c"p-lb", aya::programs::XdpMode::Driver)
            .map(|_| "attached".to_owned())
            .unwrap_or_else(|e| format!("attach failed: {e}"));
        ready_tx.send(r).unwrap();
        let _ = rx.recv();
        drop(ebpf);
    });
    println!("noop on p-lb: {}", ready_rx.recv().unwrap());
    let r = t.client.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.connect("10.10.0.1:8080").unwrap();
        let mut buf = [0u8; 256];
        (0..6)
            .map(|i| {
                s.send(format!("v{i}").as_bytes()).unwrap();
                s.recv(&mut buf)
                    .map(|k| String::from_utf8_lossy(&buf[..k]).into_owned())
                    .map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    });
    println!("answers with the noop on p-lb: {r:?}");
    println!("xdp_tx now: {}", counter(&berth, "xdp_tx"));
    let _ = tx.send(());
    let _ = holder.join();
}
