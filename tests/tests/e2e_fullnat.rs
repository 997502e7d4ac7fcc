//! End to end, full NAT (issue 11): the real `berth` daemon in a namespace playing the host, real
//! TCP/UDP servers in backend namespaces whose way back to the client does not pass through the
//! host, real connections from a client namespace.
//!
//! ```text
//!            switch (one L2 segment, three subnets)
//!   client 10.10.0.2 --+-- 10.10.0.1 eth0 [host, berth] eth1 10.60.0.1 --+
//!                      +-- 10.10.0.254 + 10.50.0.254 eth0 [router] eth1 10.60.0.2
//!   b1-b3 10.50.0.11-13 (default route: the router) --+
//! ```
//!
//! The host reaches the backends through the router over `eth1` (a link berth is not told
//! about); the backends answer whatever source they see through the router, which delivers
//! straight to the client when that source is the client. So DNAT alone cannot work: the
//! client gets the backend's address back and refuses it. Full NAT makes the host the source
//! (`10.60.0.1`, the kernel's source toward the backends), so the answers come back to it over
//! `eth1`, where berth attaches by itself (the route toward its full-NAT backends).

use std::{collections::BTreeMap, net::SocketAddrV4, process::Command};

use berth_tests::{
    capture::check_rewritten_checksums,
    topo::{
        Berth, Netns, Servers, Session, assert_shares, ns_command, peers_of, remove_leftovers,
        requests_never_meet_time_wait, responder, spread, tcp_request, udp_request, veth,
    },
};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("socket address")
}

struct Topo {
    // Drop order: servers first, then namespaces.
    _servers: Vec<Servers>,
    lb: Netns,
    client: Netns,
    backends: Vec<Netns>,
    _router: Netns,
    _switch: Netns,
}

fn remote() -> Topo {
    remove_leftovers();
    let sw = Netns::new("sw");
    let lb = Netns::new("lb");
    let client = Netns::new("cl");
    let rt = Netns::new("rt");
    sw.exec(&["ip", "link", "add", "sw0", "type", "bridge"]);
    sw.exec(&["ip", "link", "set", "sw0", "up"]);
    veth(&lb, "eth0", &sw, "p-lb");
    veth(&client, "eth0", &sw, "p-cl");
    veth(&rt, "eth0", &sw, "p-rt");
    veth(&lb, "eth1", &rt, "eth1");
    for p in ["p-lb", "p-cl", "p-rt"] {
        sw.exec(&["ip", "link", "set", p, "master", "sw0"]);
    }
    lb.exec(&["ip", "addr", "add", "10.10.0.1/24", "dev", "eth0"]);
    lb.exec(&["ip", "addr", "add", "10.60.0.1/30", "dev", "eth1"]);
    lb.exec(&["ip", "route", "add", "10.50.0.0/24", "via", "10.60.0.2"]);
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    client.exec(&["ip", "addr", "add", "10.10.0.2/24", "dev", "eth0"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.10.0.1"]);
    rt.exec(&["ip", "addr", "add", "10.10.0.254/24", "dev", "eth0"]);
    rt.exec(&["ip", "addr", "add", "10.50.0.254/24", "dev", "eth0"]);
    rt.exec(&["ip", "addr", "add", "10.60.0.2/30", "dev", "eth1"]);
    rt.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The client's packets that DNAT sends over eth1 come back by eth0: not a spoof here.
    for c in ["all", "default", "eth0", "eth1"] {
        rt.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{c}.rp_filter=0")]);
    }
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=3 {
        let b = Netns::new(&format!("b{n}"));
        veth(&b, "eth0", &sw, &format!("p-b{n}"));
        sw.exec(&["ip", "link", "set", &format!("p-b{n}"), "master", "sw0"]);
        b.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.50.0.1{n}/24"),
            "dev",
            "eth0",
        ]);
        b.exec(&["ip", "route", "add", "default", "via", "10.50.0.254"]);
        servers.push(Servers::start(
            &b,
            &format!("b{n}"),
            sa(&format!("10.50.0.1{n}:8000")),
            true,
        ));
        backends.push(b);
    }
    Topo {
        _servers: servers,
        lb,
        client,
        backends,
        _router: rt,
        _switch: sw,
    }
}

/// The web service (TCP, weights 1:2:3) and the same backends over UDP, reached by `mode`;
/// `backends` of b1-b3 (1-based) only.
fn config(mode: &str, backends: &[u8]) -> String {
    let list = |weights: bool| {
        backends
            .iter()
            .map(|n| {
                if weights {
                    format!("{{ address = \"10.50.0.1{n}:8000\", weight = {n} }}")
                } else {
                    format!("\"10.50.0.1{n}:8000\"")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
[dataplane]
maglev_table_size = 65537
[[service]]
name = "web"
listen = "0.0.0.0:8080"
mode = "{mode}"
backends = [{}]
[[service]]
name = "udp"
listen = "0.0.0.0:8080"
protocol = "udp"
mode = "{mode}"
backends = [{}]
"#,
        list(true),
        list(false)
    )
}

#[test]
fn dnat_cannot_serve_backends_that_answer_around_berth_and_full_nat_does() {
    let t = remote();
    let mut berth = Berth::start(&t.lb, &config("dnat", &[1, 2, 3]), &["eth0"]);
    // The DNAT probes' flows stay in the conntrack (a UDP one for its idle timeout), and a flow
    // keeps its translation: a later full-NAT request that happened to reuse one of their source
    // ports would be DNAT'd and lost, as it should be. So the probes take their ports from a
    // range the full-NAT requests never use.
    let ports = |range: &str| {
        t.client.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={range}"),
        ]);
    };
    ports("20000 20999");
    // DNAT: the backends answer the client directly, from their own address; it refuses.
    let failed = t.client.run(|| {
        (0..3)
            .filter(|i| tcp_request(sa("10.10.0.1:8080"), &format!("d{i}")).is_err())
            .count()
    });
    assert_eq!(
        failed, 3,
        "DNAT must fail in this topology: the test would prove nothing"
    );
    let udp_failed = t
        .client
        .run(|| udp_request(sa("10.10.0.1:8080"), "d").is_err());
    assert!(
        udp_failed,
        "a UDP answer from the backend's address is not the service's"
    );

    ports("32768 60999");
    // Full NAT, from a reload: berth attaches where the answers now arrive, and serves.
    berth.reload(&config("fullnat", &[1, 2, 3]));
    berth.wait_for("attached to eth1 (route to full-NAT backends)", 1);
    // 1200 connections: the heaviest backend's share (0.5) then has a standard deviation of
    // 0.014, so the 0.07 tolerance is 4.9 of them (with 600 it was 3.4: one CI run failed
    // at 0.425).
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 1200);
    assert_shares(
        "full NAT tcp 1:2:3",
        &counts,
        &[("b1", 1), ("b2", 2), ("b3", 3)],
        0.07,
    );
    let counts = spread(&t.client, sa("10.10.0.1:8080"), true, 300);
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    assert_eq!(counts.len(), 3, "every backend answers UDP: {counts:?}");

    // The backend sees the host's address and a port of the range, never the client's.
    let mut session = t
        .client
        .run(|| Session::connect(sa("10.10.0.1:8080")).expect("connect"));
    let who = responder(&session.request("who").expect("answer"))
        .unwrap()
        .to_owned();
    let n: usize = who[1..].parse().expect("b<n>");
    let peers = peers_of(&t.backends[n - 1], 8000);
    assert!(!peers.is_empty(), "no established connection on {who}");
    for p in &peers {
        let p = sa(p);
        assert_eq!(p.ip().to_string(), "10.60.0.1", "{peers:?}");
        assert!((61000..=65535).contains(&p.port()), "{peers:?}");
    }
    // And `berth status` says how each backend is reached.
    let status = berth.status();
    let web = status.services.iter().find(|s| s.name == "web").unwrap();
    assert!(
        web.backends.iter().all(|b| b.nat == "fullnat 10.60.0.1"),
        "{:?}",
        web.backends
    );
    let counted = |n: &str| {
        status
            .counters
            .iter()
            .find(|(c, _)| c == n)
            .map_or(0, |(_, v)| *v)
    };
    assert!(counted("reply_redirect") >= 900, "{:?}", status.counters);
    assert_eq!(counted("drop_snat_exhausted"), 0, "{:?}", status.counters);
    drop(session);
    let (st, _) = berth.stop();
    assert!(st.success());
}

#[test]
fn a_removed_full_nat_backend_keeps_its_established_sessions() {
    let t = remote();
    let berth = Berth::start(&t.lb, &config("fullnat", &[1, 2, 3]), &["eth0"]);
    berth.wait_for("attached to eth1 (route to full-NAT backends)", 1);
    let mut sessions: Vec<Session> = t.client.run(|| {
        (0..24)
            .map(|_| Session::connect(sa("10.10.0.1:8080")).expect("connect"))
            .collect()
    });
    let first: Vec<String> = sessions
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            responder(&s.request(&format!("a{i}")).expect("first answer"))
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        first.iter().any(|w| w == "b3"),
        "no session on b3: {first:?}"
    );
    // b3 leaves the config: new connections go elsewhere, its sessions stay on it.
    berth.reload(&config("fullnat", &[1, 2]));
    let after: Vec<String> = sessions
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let a = s
                .request(&format!("b{i}"))
                .unwrap_or_else(|e| panic!("session {i} after the removal: {e}"));
            responder(&a).unwrap().to_owned()
        })
        .collect();
    assert_eq!(after, first, "every session stays on its backend");
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 200);
    assert!(!counts.contains_key("b3"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 200);
}

#[test]
fn host_clients_reach_full_nat_backends_from_their_own_address() {
    let t = remote();
    let berth = Berth::start(&t.lb, &config("fullnat", &[1, 2, 3]), &["eth0"]);
    berth.wait_for("attached to eth1 (route to full-NAT backends)", 1);
    // A process of the host (in berth's test cgroup): its socket is sent to a backend directly
    // and talks from the host's own address; nothing is translated per packet.
    let ask = |proto: &str, i: usize| {
        let script =
            format!("exec 3<>/dev/{proto}/10.10.0.1/8080 && echo host-{i} >&3 && head -1 <&3");
        let mut cmd: Command = ns_command(&t.lb.name, "timeout");
        cmd.args(["3", "bash", "-c", &script]);
        berth.cgroup.command(&mut cmd);
        let out = cmd.output().expect("bash");
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "{proto} request {i}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            answer.ends_with(&format!(": host-{i}")),
            "{proto} request {i}: {answer:?}"
        );
        responder(&answer).unwrap().to_owned()
    };
    let mut counts = BTreeMap::new();
    for i in 0..30 {
        *counts.entry(ask("tcp", i)).or_insert(0) += 1;
        *counts.entry(ask("udp", i)).or_insert(0) += 1;
    }
    println!("host clients: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60);
    assert!(counts.len() >= 2, "balanced over the backends: {counts:?}");
    let status = berth.status();
    let counted = |n: &str| {
        status
            .counters
            .iter()
            .find(|(c, _)| c == n)
            .map_or(0, |(_, v)| *v)
    };
    assert!(
        counted("event_sock_translated") >= 60,
        "{:?}",
        status.counters
    );
    assert_eq!(
        counted("fwd_redirect"),
        0,
        "no client packet went through TC"
    );
}

/// Full NAT rewrites both ends of every packet: its checksums must be right for the skb's
/// state too, both ways, TCP and UDP, with transmit checksum offload on (`CHECKSUM_PARTIAL`:
/// the field takes the addresses' change only) and off (complete: addresses and ports). See
/// e2e_netns's `rewritten_packets_carry_checksums_right_for_partial_and_complete_skbs`.
#[test]
fn full_nat_rewrites_carry_checksums_right_for_partial_and_complete_skbs() {
    let t = remote();
    let berth = Berth::start(&t.lb, &config("fullnat", &[1, 2, 3]), &["eth0"]);
    berth.wait_for("checksums of rewritten packets: by hand from ip_summed", 1);
    check_rewritten_checksums("full NAT", &t.client, &t.backends, sa("10.10.0.1:8080"));
}

#[test]
fn connections_to_a_backend_that_closes_first_never_meet_its_time_wait() {
    let t = remote();
    // Without timestamps the backend's TIME_WAIT takes a new SYN on the old tuple only if its
    // sequence number is beyond the old connection's: a coin toss for a reused port, and a
    // lost toss is answered with the old connection's ACK, which costs the client a SYN retry.
    t.client
        .exec(&["sysctl", "-qw", "net.ipv4.tcp_timestamps=0"]);
    let config = r#"
[dataplane]
maglev_table_size = 65537
snat_ports = "61000-61003"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
mode = "fullnat"
backends = ["10.50.0.11:8000"]
"#;
    let mut berth = Berth::start(&t.lb, config, &["eth0"]);
    berth.wait_for("attached to eth1 (route to full-NAT backends)", 1);
    // Four HTTP/1.0 requests in a row, as many as the range has ports: each finds a port no
    // earlier one marked (at most three marked, fewer than a flow passes by).
    // (Without the mark, all four on distinct ports happens 1 run in 10.)
    requests_never_meet_time_wait(
        &t.client,
        &t.backends[0],
        sa("10.10.0.1:8080").into(),
        4,
        "10.60.0.1:",
    );
    let (st, _) = berth.stop();
    assert!(st.success());
}
