//! End to end over IPv6: the TC program attached to the host namespace's interface of a
//! one-armed topology (client, host and backends on one switch), real TCP and UDP servers in
//! backend namespaces, real connections from a client namespace, all over IPv6. Packets from
//! real sockets arrive `CHECKSUM_PARTIAL` (which BPF_PROG_TEST_RUN never gives), so this is
//! where the pseudo-header update of the L4 checksum is proven.
//!
//! The services are the daemon's: `berth run` with a configuration of IPv6 addresses (a VIP
//! and `[::]`), its reconciler writing the IPv6 maps, a reload removing a backend.
//!
//! Host clients (processes of berth's test cgroup in the host namespace, never the root cgroup)
//! are balanced by the IPv6 socket programs: `[::1]`, the host's IPv6 addresses, `curl -6`, and
//! IPv4-mapped destinations of dual-stack sockets.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use berth_tests::capture::check_rewritten_checksums;
use berth_tests::daemon::Berth;
use berth_tests::netns::{bridge, plug};
use berth_tests::servers::{tcp_request_any, udp_request_any};
use berth_tests::topo::{Netns, Servers, Session, remove_leftovers, responder};

fn a6(s: &str) -> Ipv6Addr {
    s.parse().expect("IPv6 address")
}

fn vip(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(a6("fd00:99::1"), port, 0, 0)
}

fn backend(n: u8) -> SocketAddrV6 {
    SocketAddrV6::new(a6(&format!("fd00:20::1{n}")), 8000, 0, 0)
}

struct Topo {
    // Drop order: servers first, then the namespaces (berth, held by the test, before them).
    _servers: Vec<Servers>,
    client: Netns,
    lb: Netns,
    _backends: Vec<Netns>,
    _switch: Netns,
}

/// Client fd00:10::2, host fd00:10::1 + fd00:20::1 on its one interface `eth0`, backends
/// fd00:20::11-13 (b1-b3) serving TCP and UDP on :8000, their default route the host. berth
/// runs in the host namespace, attached to its `eth0`.
fn one_armed() -> Topo {
    remove_leftovers();
    let sw = Netns::new("sw6");
    let lb = Netns::new("lb6");
    let client = Netns::new("cl6");
    bridge(&sw);
    let port = |ns: &Netns, p: &str| plug(&sw, ns, p);
    port(&lb, "p-lb");
    port(&client, "p-cl");
    let addr = |ns: &Netns, a: &str| {
        ns.exec(&["ip", "-6", "addr", "add", a, "dev", "eth0", "nodad"]);
    };
    addr(&lb, "fd00:10::1/64");
    addr(&lb, "fd00:20::1/64");
    lb.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    addr(&client, "fd00:10::2/64");
    client.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:10::1"]);
    // IPv4 beside it (for the dual-stack service): 10.10.0.0/24 and 10.20.0.0/24 alike.
    lb.exec(&["ip", "addr", "add", "10.10.0.1/24", "dev", "eth0"]);
    lb.exec(&["ip", "addr", "add", "10.20.0.1/24", "dev", "eth0"]);
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    client.exec(&["ip", "addr", "add", "10.10.0.2/24", "dev", "eth0"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.10.0.1"]);
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=3u8 {
        let b = Netns::new(&format!("b6{n}"));
        port(&b, &format!("p-b{n}"));
        addr(&b, &format!("fd00:20::1{n}/64"));
        b.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:20::1"]);
        b.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.20.0.1{n}/24"),
            "dev",
            "eth0",
        ]);
        b.exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);
        servers.push(Servers::start_any(
            &b,
            &format!("b{n}"),
            format!("10.20.0.1{n}:8000").parse().expect("address"),
            true,
        ));
        servers.push(Servers::start_any(
            &b,
            &format!("b{n}"),
            backend(n).into(),
            true,
        ));
        backends.push(b);
    }
    Topo {
        _servers: servers,
        client,
        lb,
        _backends: backends,
        _switch: sw,
    }
}

/// The web service on the VIP :80 (TCP), a UDP one on :53, and `[::]:8080` (any IPv6
/// address of the host), backends b1-b3 with `weights` (a weight of `None`: not a backend).
fn config(weights: [Option<u32>; 3]) -> String {
    let backends: Vec<String> = (1..=3u8)
        .filter_map(|n| {
            let w = weights[usize::from(n) - 1]?;
            Some(format!("{{ address = \"{}\", weight = {w} }}", backend(n)))
        })
        .collect();
    let backends = backends.join(", ");
    format!(
        "[dataplane]\ndrain_timeout_secs = 5\n\
         [[service]]\nname = \"web6\"\nlisten = \"{}\"\nbackends = [{backends}]\n\
         [[service]]\nname = \"dns6\"\nlisten = \"{}\"\nprotocol = \"udp\"\n\
         backends = [{backends}]\n\
         [[service]]\nname = \"any6\"\nlisten = \"[::]:8080\"\nbackends = [{backends}]\n",
        vip(80),
        vip(53)
    )
}

/// A counter of `berth status` (e.g. "fwd redirect"), 0 if absent.
fn counter(berth: &Berth, prefix: &str) -> u64 {
    berth
        .status()
        .counters
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn thousand_connections_spread_by_weight_and_udp_over_ipv6() {
    let t = one_armed();
    let berth = Berth::start(&t.lb, &config([Some(1), Some(2), Some(3)]), &["eth0"]);
    let counts: BTreeMap<String, u32> = t.client.run(|| {
        let mut counts = BTreeMap::new();
        for i in 0..1000 {
            let answer = tcp_request_any(vip(80).into(), &format!("req {i}"))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let who = responder(&answer).unwrap_or_else(|| panic!("answer {answer:?}"));
            *counts.entry(who.to_owned()).or_default() += 1;
        }
        counts
    });
    println!("1000 connections over IPv6: {counts:?}");
    for (n, w) in [("b1", 1.0), ("b2", 2.0), ("b3", 3.0)] {
        let share = f64::from(counts.get(n).copied().unwrap_or(0)) / 1000.0;
        assert!(
            (share - w / 6.0).abs() < 0.06,
            "{n}: {share:.3} of the connections, weight share {:.3} ({counts:?})",
            w / 6.0
        );
    }
    // UDP: each connected socket (its own source port) sticks to one backend, and answers
    // come from the service address (a connected socket drops anything else).
    let udp: Vec<String> = t.client.run(|| {
        (0..30)
            .map(|i| {
                let first = udp_request_any(vip(53).into(), &format!("q{i}"))
                    .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
                responder(&first).expect("responder").to_owned()
            })
            .collect()
    });
    let spread: std::collections::BTreeSet<&String> = udp.iter().collect();
    assert!(spread.len() >= 2, "30 UDP clients all on {spread:?}");
    // `[::]:8080`: the host's own IPv6 address, recorded by the daemon.
    let any: Vec<String> = t.client.run(|| {
        (0..20)
            .map(|i| {
                let to = SocketAddrV6::new(a6("fd00:10::1"), 8080, 0, 0);
                let a = tcp_request_any(to.into(), &format!("any {i}"))
                    .unwrap_or_else(|e| panic!("[::]:8080 connection {i}: {e}"));
                responder(&a).expect("responder").to_owned()
            })
            .collect()
    });
    assert!(any.iter().all(|w| ["b1", "b2", "b3"].contains(&w.as_str())));
    // `berth status`: the IPv6 rows, addresses in brackets, with their weights.
    let st = berth.status();
    let web = st
        .services
        .iter()
        .find(|s| s.name == "web6")
        .unwrap_or_else(|| panic!("no web6 in {:?}", st.services));
    assert_eq!(web.listen, "[fd00:99::1]:80");
    let rows: Vec<(String, u32)> = web
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.weight))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("[fd00:20::11]:8000".to_owned(), 1),
            ("[fd00:20::12]:8000".to_owned(), 2),
            ("[fd00:20::13]:8000".to_owned(), 3)
        ]
    );
    let packets: u64 = web.backends.iter().map(|b| b.packets).sum();
    assert!(packets >= 1000 * 5, "web6 backends' packets {packets}");
    println!("counters: {:?}", st.counters);
    assert!(counter(&berth, "fwd_redirect") > 0, "{:?}", st.counters);
    assert_eq!(counter(&berth, "abort_rewrite"), 0, "{:?}", st.counters);
    assert_eq!(counter(&berth, "drop_l4_malformed"), 0, "{:?}", st.counters);
    // Metrics: the IPv6 service and backends labelled with their bracketed addresses.
    let page = t
        .lb
        .run(|| berth_tests::topo::http_get("127.0.0.1:9477".parse().unwrap()).expect("scrape"));
    assert_eq!(page.0, 200);
    let metric = |line: &str| -> f64 {
        page.1
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{}", page.1))
    };
    let flows = metric(
        r#"berth_service_new_flows_total{service="web6",listen="[fd00:99::1]:80",protocol="tcp"}"#,
    );
    assert!(flows >= 1000.0, "web6 new flows {flows}");
    let b3 = metric(
        r#"berth_backend_new_flows_total{service="web6",backend="[fd00:20::13]:8000",container=""}"#,
    );
    assert_eq!(b3 as u32, counts["b3"], "b3's new flows");
    // A restart adopts the pinned IPv6 services: nothing rewritten, still serving.
    let mut berth = berth;
    let tables = berth.log_text().matches("maglev table updated").count();
    let (status, _) = berth.stop();
    assert!(status.success(), "{status}");
    // No daemon: the pinned dataplane still serves IPv6 (its classifier is reached through a
    // pinned program array, whose entry would be cleared with the process's last descriptor).
    t.client.run(|| {
        tcp_request_any(vip(80).into(), "while stopped").expect("served while berth is stopped")
    });
    berth.respawn();
    let log = berth.log_text();
    assert!(
        log.contains("adopted from the pinned dataplane: tcp [fd00:99::1]:80 with 3 backends"),
        "{log}"
    );
    assert!(
        log.contains("service web6: taken over from the pinned dataplane"),
        "{log}"
    );
    assert_eq!(
        log.matches("maglev table updated").count(),
        tables,
        "an adopted IPv6 row is not rewritten: {log}"
    );
    t.client.run(|| {
        tcp_request_any(vip(80).into(), "after restart").expect("served after the restart")
    });
    drop(berth);
    drop(t);
}

#[test]
fn a_removed_backend_keeps_its_sessions_over_ipv6() {
    let t = one_armed();
    let berth = Berth::start(&t.lb, &config([Some(1), Some(1), Some(1)]), &["eth0"]);
    // 30 long-lived sessions, then b1 leaves the configuration (reload): its flows drain.
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let client = t.client.spawn(move || {
        let mut sessions: Vec<(Session, String)> = (0..30)
            .map(|i| {
                let mut s = Session::connect_any(vip(80).into())
                    .unwrap_or_else(|e| panic!("session {i}: {e}"));
                let who = responder(&s.request("hello").expect("first request"))
                    .expect("responder")
                    .to_owned();
                (s, who)
            })
            .collect();
        done_tx
            .send(sessions.iter().map(|(_, w)| w.clone()).collect::<Vec<_>>())
            .unwrap();
        // Wait for the backend change, then use every session again.
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), "changed");
        for (i, (s, who)) in sessions.iter_mut().enumerate() {
            let again = s
                .request("again")
                .unwrap_or_else(|e| panic!("session {i} after: {e}"));
            assert_eq!(responder(&again), Some(who.as_str()), "session {i} moved");
        }
        // New connections never reach b1.
        let mut fresh = BTreeMap::<String, u32>::new();
        for i in 0..200 {
            let a =
                tcp_request_any(vip(80).into(), "new").unwrap_or_else(|e| panic!("new {i}: {e}"));
            *fresh.entry(responder(&a).unwrap().to_owned()).or_default() += 1;
        }
        fresh
    });
    let before = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("sessions open");
    assert!(
        before.iter().any(|w| w == "b1"),
        "some session on b1: {before:?}"
    );
    // The sessions are active flows of their backends in `berth status` (IPv6 conntrack).
    let st = berth.status();
    let active: u64 = st
        .services
        .iter()
        .filter(|s| s.name == "web6")
        .flat_map(|s| s.backends.iter().map(|b| b.active_flows))
        .sum();
    assert_eq!(active, 30, "{:?}", st.services);
    berth.reload(&config([None, Some(1), Some(1)]));
    tx.send("changed").unwrap();
    let fresh = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    println!("sessions before: {before:?}; new connections after b1 left: {fresh:?}");
    assert!(!fresh.contains_key("b1"), "{fresh:?}");
    assert_eq!(fresh.values().sum::<u32>(), 200);
    assert!(
        berth
            .log_text()
            .contains("service web6: backend [fd00:20::11]:8000 removed"),
        "{}",
        berth.log_text()
    );
    // Past the drain timeout (5 s), b1's IPv6 conntrack entries are purged by the daemon.
    let on_b1 = before.iter().filter(|w| *w == "b1").count();
    berth.wait_for("backend [fd00:20::11]:8000: drain timeout over, purged", 1);
    let log = berth.log_text();
    let purged: usize = log
        .lines()
        .find_map(|l| {
            l.split("backend [fd00:20::11]:8000: drain timeout over, purged ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("purge count");
    assert!(
        purged >= 2 * on_b1,
        "{on_b1} sessions on b1, {purged} entries purged"
    );
    drop(berth);
}

#[test]
fn a_dual_stack_service_serves_each_family_with_its_backends() {
    let t = one_armed();
    let berth = Berth::start(
        &t.lb,
        "[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\nlisten6 = \"[::]:8080\"\n\
         backends = [\"10.20.0.11:8000\", \"10.20.0.12:8000\", \"[fd00:20::12]:8000\", \
         \"[fd00:20::13]:8000\"]\n",
        &["eth0"],
    );
    let spread = |to: std::net::SocketAddr| -> BTreeMap<String, u32> {
        t.client.run(move || {
            let mut counts = BTreeMap::new();
            for i in 0..100 {
                let a = tcp_request_any(to, &format!("req {i}"))
                    .unwrap_or_else(|e| panic!("{to} connection {i}: {e}"));
                *counts
                    .entry(responder(&a).expect("responder").to_owned())
                    .or_default() += 1;
            }
            counts
        })
    };
    let v4 = spread("10.10.0.1:8080".parse().unwrap());
    let v6 = spread(SocketAddrV6::new(a6("fd00:10::1"), 8080, 0, 0).into());
    println!("dual stack: IPv4 clients {v4:?}, IPv6 clients {v6:?}");
    assert_eq!(v4.keys().collect::<Vec<_>>(), ["b1", "b2"], "IPv4: {v4:?}");
    assert_eq!(v6.keys().collect::<Vec<_>>(), ["b2", "b3"], "IPv6: {v6:?}");
    let st = berth.status();
    let rows: Vec<(String, String, usize)> = st
        .services
        .iter()
        .map(|s| (s.name.clone(), s.listen.clone(), s.backends.len()))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("web".to_owned(), "0.0.0.0:8080".to_owned(), 2),
            ("web.ipv6".to_owned(), "[::]:8080".to_owned(), 2)
        ]
    );
    drop(berth);
}

/// Host clients: a web service on `0.0.0.0:8080` + `[::]:8080` and a UDP one on
/// `0.0.0.0:8053` + `[::]:8053`. IPv6 backends b1-b3 weighted 1:2:3, IPv4 backends b1 and b2
/// only (an IPv4-mapped destination reaching the IPv4 service shows in who answers).
const HOST_CLIENTS_CONFIG: &str = r#"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
listen6 = "[::]:8080"
backends = [
  "10.20.0.11:8000", "10.20.0.12:8000",
  { address = "[fd00:20::11]:8000", weight = 1 },
  { address = "[fd00:20::12]:8000", weight = 2 },
  { address = "[fd00:20::13]:8000", weight = 3 },
]
[[service]]
name = "dns"
listen = "0.0.0.0:8053"
listen6 = "[::]:8053"
protocol = "udp"
backends = ["10.20.0.11:8000", "10.20.0.12:8000", "[fd00:20::11]:8000", "[fd00:20::12]:8000", "[fd00:20::13]:8000"]
"#;

/// `hello client KIND ADDR N` run in the host namespace as a process of berth's test cgroup
/// (or outside it): (who answered, the peer its socket reported) per request; panics on a
/// failed request.
fn host_client(
    t: &Topo,
    berth: &Berth,
    in_cgroup: bool,
    kind: &str,
    addr: &str,
    n: usize,
) -> Vec<(String, String)> {
    let mut cmd = t.lb.command(berth_tests::docker::hello_bin());
    cmd.args(["client", kind, addr, &n.to_string()]);
    if in_cgroup {
        berth.cgroup.command(&mut cmd);
    }
    let out = cmd.output().expect("hello client");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let results: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            assert!(!l.starts_with("ERR"), "{kind} {addr}: {l}\n{out}");
            let (answer, peer) = l.rsplit_once(" peer=").unwrap_or_else(|| panic!("{l:?}"));
            let who = responder(answer).unwrap_or_else(|| panic!("{l:?}"));
            (who.to_owned(), peer.to_owned())
        })
        .collect();
    assert_eq!(results.len(), n, "{kind} {addr}: {out}");
    results
}

/// Who answered how often, and every peer address the client saw.
fn tally(results: &[(String, String)]) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut who = BTreeMap::new();
    let mut peers: Vec<String> = Vec::new();
    for (w, p) in results {
        *who.entry(w.clone()).or_insert(0) += 1;
        if !peers.contains(p) {
            peers.push(p.clone());
        }
    }
    (who, peers)
}

#[test]
fn host_clients_over_ipv6_are_balanced_at_their_sockets() {
    let t = one_armed();
    let mut berth = Berth::start(&t.lb, HOST_CLIENTS_CONFIG, &["eth0"]);
    // Nothing on the host listens on 8080: outside berth's cgroup a connect is refused.
    let mut plain = t.lb.command(berth_tests::docker::hello_bin());
    let out = plain
        .args(["client", "tcp", "[::1]:8080", "1"])
        .output()
        .expect("hello client");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("ERR connect"), "{out}");

    // TCP to `[::1]:8080` (connect6, getpeername6): spread by weight over the IPv6 backends,
    // and the socket only ever reports the address it asked for.
    let (who, peers) = tally(&host_client(&t, &berth, true, "tcp", "[::1]:8080", 1000));
    println!("host tcp [::1]:8080, 1000 connections: {who:?}, peers {peers:?}");
    assert_eq!(peers, vec!["[::1]:8080".to_owned()]);
    for (n, w) in [("b1", 1.0), ("b2", 2.0), ("b3", 3.0)] {
        let share = who.get(n).copied().unwrap_or(0) as f64 / 1000.0;
        assert!(
            (share - w / 6.0).abs() < 0.06,
            "{n}: {share:.3} of the connections, weight share {:.3} ({who:?})",
            w / 6.0
        );
    }
    // The host's own IPv6 addresses (`LOCAL_ADDRS6`), TCP, UDP (sendmsg6 + recvmsg6: the
    // answer's source shows as the service) and connected UDP (connect6 + getpeername6).
    for (kind, addr) in [
        ("tcp", "[fd00:10::1]:8080"),
        ("tcp", "[fd00:20::1]:8080"),
        ("udp", "[::1]:8053"),
        ("udp", "[fd00:10::1]:8053"),
        ("udp-connected", "[::1]:8053"),
        ("udp-connected", "[fd00:20::1]:8053"),
    ] {
        let (who, peers) = tally(&host_client(&t, &berth, true, kind, addr, 40));
        println!("host {kind} {addr}: {who:?}, peers {peers:?}");
        assert!(who.len() >= 2, "{kind} {addr}: all on {who:?}");
        assert_eq!(peers, vec![addr.to_owned()], "{kind} {addr}");
    }
    // curl, as an operator would run it, inside the cgroup.
    let mut curled = BTreeMap::<String, usize>::new();
    for i in 0..20 {
        let mut cmd = t.lb.command("curl");
        cmd.args([
            "-6",
            "-sS",
            "--max-time",
            "3",
            "--noproxy",
            "*",
            "http://[::1]:8080/",
        ]);
        berth.cgroup.command(&mut cmd);
        let out = cmd.output().expect("curl");
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "curl {i}: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let who = body
            .strip_prefix("Hello from ")
            .unwrap_or_else(|| panic!("curl {i}: {body:?}"));
        *curled.entry(who.to_owned()).or_default() += 1;
    }
    println!("curl -6 http://[::1]:8080/: {curled:?}");
    assert!(curled.len() >= 2, "{curled:?}");
    // A dual-stack socket naming an IPv4 destination IPv4-mapped reaches the IPv4 service
    // (backends b1 and b2 only), and sees the mapped address it asked for as its peer (UDP:
    // sendmsg4 translates, recvmsg6 shows the mapped service address).
    for (kind, addr) in [
        ("tcp", "[::ffff:127.0.0.1]:8080"),
        ("tcp", "[::ffff:10.10.0.1]:8080"),
        ("udp", "[::ffff:10.10.0.1]:8053"),
        ("udp-connected", "[::ffff:127.0.0.1]:8053"),
    ] {
        let (who, peers) = tally(&host_client(&t, &berth, true, kind, addr, 40));
        println!("host {kind} {addr} (IPv4-mapped): {who:?}, peers {peers:?}");
        assert_eq!(
            who.keys().map(String::as_str).collect::<Vec<_>>(),
            ["b1", "b2"],
            "{kind} {addr}"
        );
        assert_eq!(peers, vec![addr.to_owned()], "{kind} {addr}");
    }
    let total = 1000 + 6 * 40 + 20 + 4 * 40;
    let st = berth.status();
    println!("counters: {:?}", st.counters);
    assert!(
        counter(&berth, "event_sock_translated") >= total,
        "{:?}",
        st.counters
    );
    // A reverse translation per UDP answer, and per getpeername of the TCP and connected
    // UDP sockets.
    assert!(
        counter(&berth, "event_sock_reverse") >= total - 20,
        "{:?}",
        st.counters
    );
    assert_eq!(counter(&berth, "event_sock_no_backend"), 0);
    assert_eq!(counter(&berth, "event_sock_revnat_failed"), 0);
    assert_eq!(counter(&berth, "abort_map"), 0);
    assert_eq!(
        counter(&berth, "fwd_redirect"),
        0,
        "no client packet went through TC"
    );
    let web6 = st
        .services
        .iter()
        .find(|s| s.name == "web.ipv6")
        .unwrap_or_else(|| panic!("no web.ipv6 in {:?}", st.services));
    let flows: u64 = web6.backends.iter().map(|b| b.new_flows).sum();
    assert!(flows >= 1000 + 80 + 20, "web.ipv6 new flows {flows}");

    // A restart takes the pinned socket attachments over; `berth down` then removes them.
    let (status, _) = berth.stop();
    assert!(status.success(), "{status}");
    let (who, _) = tally(&host_client(&t, &berth, true, "tcp", "[::1]:8080", 10));
    assert!(who.keys().all(|w| ["b1", "b2", "b3"].contains(&w.as_str())));
    berth.respawn();
    let (who, peers) = tally(&host_client(&t, &berth, true, "udp", "[::1]:8053", 10));
    assert_eq!(
        peers,
        vec!["[::1]:8053".to_owned()],
        "after the restart {who:?}"
    );
    let (status, _) = berth.stop();
    assert!(status.success(), "{status}");
    let (downed, out) = berth.down();
    println!("{out}");
    assert!(downed.success(), "{out}");
    for prog in [
        lb_common::PROG_SOCK_CONNECT6,
        lb_common::PROG_SOCK_SENDMSG6,
        lb_common::PROG_SOCK_RECVMSG6,
        lb_common::PROG_SOCK_GETPEERNAME6,
    ] {
        assert!(out.contains(prog), "{prog} not removed: {out}");
    }
    let mut after = t.lb.command(berth_tests::docker::hello_bin());
    berth.cgroup.command(&mut after);
    let out = after
        .args(["client", "tcp", "[::1]:8080", "1"])
        .output()
        .expect("hello client");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("ERR connect"), "after berth down: {out}");
    drop(berth);
    drop(t);
}

/// Rewritten IPv6 packets carry checksums right for their skb's state, as the IPv4 ones (see
/// `e2e_netns`): real TCP and UDP through the service with transmit checksum offload on (the
/// frames `CHECKSUM_PARTIAL`, whose field holds only the pseudo-header's sum) and off (complete
/// checksums), captured where the backends and the client receive them. A veth hands both on
/// unchecked, so a wrong partial field would otherwise go unseen.
#[test]
fn rewritten_packets_carry_checksums_right_for_partial_and_complete_skbs_over_ipv6() {
    let t = one_armed();
    let backends: Vec<String> = (1..=3u8)
        .map(|n| format!("{{ address = \"{}\", weight = 1 }}", backend(n)))
        .collect();
    let backends = backends.join(", ");
    let config = format!(
        "[[service]]\nname = \"tcp6\"\nlisten = \"{0}\"\nbackends = [{backends}]\n\
         [[service]]\nname = \"udp6\"\nlisten = \"{0}\"\nprotocol = \"udp\"\n\
         backends = [{backends}]\n",
        vip(8080)
    );
    let berth = Berth::start(&t.lb, &config, &["eth0"]);
    berth.wait_for("checksums of rewritten packets: by hand from ip_summed", 1);
    check_rewritten_checksums("IPv6 DNAT", &t.client, &t._backends, vip(8080));
}
