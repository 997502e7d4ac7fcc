//! End to end over IPv6: the TC program attached to the host namespace's interface of a
//! one-armed topology (client, host and backends on one switch), real TCP and UDP servers in
//! backend namespaces, real connections from a client namespace, all over IPv6. Packets from
//! real sockets arrive `CHECKSUM_PARTIAL` (which BPF_PROG_TEST_RUN never gives), so this is
//! where the pseudo-header update of the L4 checksum is proven.
//!
//! The daemon does not serve IPv6 services yet (its configuration takes IPv4 addresses), so the
//! test loads the dataplane itself and installs the service with `install_service6`: the same
//! maps the daemon's reconciler will write.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use berth_tests::servers::{tcp_request_any, udp_request_any};
use berth_tests::topo::{Netns, Servers, Session, remove_leftovers, responder, veth};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Reason};
use lb_userspace::dataplane::{Backend6Spec, Dataplane, DataplaneOptions};

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
    // Drop order: servers and the dataplane first, then the namespaces.
    _servers: Vec<Servers>,
    dp: Dataplane,
    client: Netns,
    _lb: Netns,
    _backends: Vec<Netns>,
    _switch: Netns,
}

/// Client fd00:10::2, host fd00:10::1 + fd00:20::1 on its one interface `eth0`, backends
/// fd00:20::11-13 (b1-b3) serving TCP and UDP on :8000, their default route the host. The
/// program is attached to the host's `eth0`.
fn one_armed() -> Topo {
    remove_leftovers();
    let sw = Netns::new("sw6");
    let lb = Netns::new("lb6");
    let client = Netns::new("cl6");
    sw.exec(&["ip", "link", "add", "sw0", "type", "bridge"]);
    sw.exec(&["ip", "link", "set", "sw0", "up"]);
    let port = |ns: &Netns, p: &str| {
        veth(ns, "eth0", &sw, p);
        sw.exec(&["ip", "link", "set", p, "master", "sw0"]);
    };
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
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=3u8 {
        let b = Netns::new(&format!("b6{n}"));
        port(&b, &format!("p-b{n}"));
        addr(&b, &format!("fd00:20::1{n}/64"));
        b.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:20::1"]);
        servers.push(Servers::start_any(
            &b,
            &format!("b{n}"),
            backend(n).into(),
            true,
        ));
        backends.push(b);
    }
    let dp = lb.run(|| {
        let mut dp = Dataplane::load(DataplaneOptions {
            maglev_size: 1021,
            max_services: 8,
            max_backends: 64,
            conntrack_size: 65_536,
            hash_seed: 0x5eed_0006,
            ..DataplaneOptions::default()
        })
        .expect("load dataplane");
        dp.attach("eth0").expect("attach to eth0");
        dp.sync_local_addrs6(&lb_userspace::dataplane::host_ipv6_addrs())
            .expect("local addresses");
        dp
    });
    Topo {
        _servers: servers,
        dp,
        client,
        _lb: lb,
        _backends: backends,
        _switch: sw,
    }
}

/// The web service on the VIP :80 (TCP, id 0) and a UDP one on :53 (id 1), backends b1-b3
/// with `weights` (backend ids 1-3 for both: one backend, one id).
fn install(dp: &mut Dataplane, weights: [u32; 3]) {
    let specs: Vec<Backend6Spec> = (1..=3u8)
        .map(|n| Backend6Spec {
            id: u32::from(n),
            addr: backend(n),
            weight: weights[usize::from(n) - 1],
        })
        .collect();
    dp.install_service6(0, vip(80), IPPROTO_TCP, &specs)
        .expect("install TCP service");
    dp.install_service6(1, vip(53), IPPROTO_UDP, &specs)
        .expect("install UDP service");
}

fn reason(dp: &Dataplane, r: Reason) -> u64 {
    dp.reason_counters()
        .expect("counters")
        .into_iter()
        .find(|(x, _)| *x == r)
        .map_or(0, |(_, n)| n)
}

#[test]
fn thousand_connections_spread_by_weight_and_udp_over_ipv6() {
    let mut t = one_armed();
    install(&mut t.dp, [1, 2, 3]);
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
    assert!(reason(&t.dp, Reason::FwdRedirect) + reason(&t.dp, Reason::FwdRedirectNeigh) > 0);
    assert_eq!(reason(&t.dp, Reason::AbortRewrite), 0);
    assert_eq!(reason(&t.dp, Reason::DropL4Malformed), 0);
    drop(t);
}

#[test]
fn a_removed_backend_keeps_its_sessions_over_ipv6() {
    let mut t = one_armed();
    install(&mut t.dp, [1, 1, 1]);
    // 30 long-lived sessions, then b1 leaves (weight 0: its slot stays while it drains).
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
    install(&mut t.dp, [0, 1, 1]);
    tx.send("changed").unwrap();
    let fresh = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    println!("sessions before: {before:?}; new connections after b1 left: {fresh:?}");
    assert!(!fresh.contains_key("b1"), "{fresh:?}");
    assert_eq!(fresh.values().sum::<u32>(), 200);
}
