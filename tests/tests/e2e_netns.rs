//! End to end: the real `berth` daemon in a namespace playing the host, real TCP/UDP servers in
//! backend namespaces, real connections from a client namespace, in two topologies:
//!
//! - one-armed ("same network"): client, host and backends on one switch (a bridge in its own
//!   namespace); the host has a single interface, packets leave the way they came;
//! - bridged ("Docker-like"): backends behind a bridge on the host, with Docker's iptables rules
//!   (FORWARD policy DROP, MASQUERADE of the bridge's subnet); berth attached to the uplink and
//!   to the bridge.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use berth_tests::{
    capture::check_rewritten_checksums,
    topo::{
        Berth, Netns, Servers, Session, assert_shares, berth_bin, remove_leftovers, responder,
        spread, tcp_request, veth,
    },
};

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("socket address")
}

struct Topo {
    // Drop order: servers and berth (held by tests) first, then namespaces. The first three
    // are b1-b3's :8000 servers.
    servers: Vec<Servers>,
    lb: Netns,
    client: Netns,
    backends: Vec<Netns>,
    _switch: Option<Netns>,
}

/// Client 10.10.0.2, host 10.10.0.1 + 10.20.0.1 on one interface `eth0`, backends
/// 10.20.0.11-13 (names b1-b3) serving TCP+UDP on :8000, all on one switch.
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
    lb.exec(&["ip", "addr", "add", "10.10.0.1/24", "dev", "eth0"]);
    lb.exec(&["ip", "addr", "add", "10.20.0.1/24", "dev", "eth0"]);
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    client.exec(&["ip", "addr", "add", "10.10.0.2/24", "dev", "eth0"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.10.0.1"]);
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
            &format!("10.20.0.1{n}/24"),
            "dev",
            "eth0",
        ]);
        b.exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);
        servers.push(Servers::start(
            &b,
            &format!("b{n}"),
            sa(&format!("10.20.0.1{n}:8000")),
            true,
        ));
        backends.push(b);
    }
    // "ssh-like" non-service servers on the host and on b1.
    servers.push(Servers::start(&lb, "lb-ssh", sa("10.10.0.1:2222"), false));
    servers.push(Servers::start(
        &backends[0],
        "b1-ssh",
        sa("10.20.0.11:2222"),
        false,
    ));
    Topo {
        servers,
        lb,
        client,
        backends,
        _switch: Some(sw),
    }
}

/// Client 10.30.0.2 -- eth0 10.30.0.1 [host] br0 172.18.0.1/16 -- backends 172.18.0.11-13,
/// with Docker's iptables rules on the host.
fn bridged() -> Topo {
    remove_leftovers();
    let lb = Netns::new("lb");
    let client = Netns::new("cl");
    veth(&lb, "eth0", &client, "eth0");
    lb.exec(&["ip", "addr", "add", "10.30.0.1/24", "dev", "eth0"]);
    client.exec(&["ip", "addr", "add", "10.30.0.2/24", "dev", "eth0"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.30.0.1"]);
    lb.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    lb.exec(&["ip", "addr", "add", "172.18.0.1/16", "dev", "br0"]);
    lb.exec(&["ip", "link", "set", "br0", "up"]);
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for rule in [
        "-P FORWARD DROP",
        "-A FORWARD -o br0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -i br0 ! -o br0 -j ACCEPT",
        "-A FORWARD -i br0 -o br0 -j ACCEPT",
        "-t nat -A POSTROUTING -s 172.18.0.0/16 ! -o br0 -j MASQUERADE",
    ] {
        let mut args = vec!["iptables"];
        args.extend(rule.split(' '));
        lb.exec(&args);
    }
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=3 {
        let b = Netns::new(&format!("b{n}"));
        veth(&b, "eth0", &lb, &format!("veth-b{n}"));
        lb.exec(&["ip", "link", "set", &format!("veth-b{n}"), "master", "br0"]);
        b.exec(&[
            "ip",
            "addr",
            "add",
            &format!("172.18.0.1{n}/16"),
            "dev",
            "eth0",
        ]);
        b.exec(&["ip", "route", "add", "default", "via", "172.18.0.1"]);
        servers.push(Servers::start(
            &b,
            &format!("b{n}"),
            sa(&format!("172.18.0.1{n}:8000")),
            true,
        ));
        backends.push(b);
    }
    Topo {
        servers,
        lb,
        client,
        backends,
        _switch: None,
    }
}

const ONE_ARMED_CONFIG: &str = r#"
[dataplane]
maglev_table_size = 65537
[[service]]
name = "web"
listen = "0.0.0.0:8080"
backends = [
  { address = "10.20.0.11:8000", weight = 1 },
  { address = "10.20.0.12:8000", weight = 2 },
  { address = "10.20.0.13:8000", weight = 3 },
]
[[service]]
name = "vip"
listen = "10.99.0.1:80"
backends = ["10.20.0.11:8000", "10.20.0.12:8000", "10.20.0.13:8000"]
[[service]]
name = "udp"
listen = "0.0.0.0:8080"
protocol = "udp"
backends = ["10.20.0.11:8000", "10.20.0.12:8000", "10.20.0.13:8000"]
"#;

#[test]
fn one_armed_tcp_follows_weights_and_every_answer_is_right() {
    let t = one_armed();
    let _berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 1000);
    assert_shares(
        "one-armed tcp 1:2:3",
        &counts,
        &[("b1", 1), ("b2", 2), ("b3", 3)],
        0.07,
    );
}

#[test]
fn one_armed_udp_and_vip_services() {
    let t = one_armed();
    let _berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    let counts = spread(&t.client, sa("10.10.0.1:8080"), true, 600);
    assert_shares(
        "one-armed udp",
        &counts,
        &[("b1", 1), ("b2", 1), ("b3", 1)],
        0.08,
    );
    // 300 draws: a share's standard deviation is 2.7 points, the tolerance 3.7 of them (100
    // draws with 0.15 failed once in a few hundred runs).
    let counts = spread(&t.client, sa("10.99.0.1:80"), false, 300);
    assert_shares(
        "one-armed vip",
        &counts,
        &[("b1", 1), ("b2", 1), ("b3", 1)],
        0.1,
    );
}

#[test]
fn one_armed_non_service_traffic_is_unaffected() {
    let t = one_armed();
    let _berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    t.client.run(|| {
        for i in 0..20 {
            assert_eq!(
                tcp_request(sa("10.10.0.1:2222"), &format!("s{i}")).unwrap(),
                format!("Hello from lb-ssh: s{i}")
            );
            // Routed through the host to b1's own port: not a service, forwarded by the kernel.
            assert_eq!(
                tcp_request(sa("10.20.0.11:2222"), &format!("t{i}")).unwrap(),
                format!("Hello from b1-ssh: t{i}")
            );
            // A backend reached directly on its service port is not translated either.
            assert_eq!(
                tcp_request(sa("10.20.0.12:8000"), "direct").unwrap(),
                "Hello from b2: direct"
            );
        }
    });
}

#[test]
fn removing_a_backend_keeps_established_flows_and_steers_new_ones_away() {
    let t = one_armed();
    let berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    let (tx_go, rx_go) = std::sync::mpsc::channel::<()>();
    let (tx_first, rx_first) = std::sync::mpsc::channel::<Vec<String>>();
    let (tx_after, rx_after) = std::sync::mpsc::channel::<Vec<String>>();
    // Sessions live on one client thread across the reload.
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            t.client.run(move || {
                let mut sessions: Vec<Session> = (0..30)
                    .map(|_| Session::connect(sa("10.10.0.1:8080")).expect("connect"))
                    .collect();
                let first: Vec<String> = sessions
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| {
                        responder(&s.request(&format!("a{i}")).expect("first"))
                            .unwrap()
                            .to_owned()
                    })
                    .collect();
                tx_first.send(first).unwrap();
                rx_go.recv().unwrap();
                let after: Vec<String> = sessions
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| {
                        let a = s
                            .request(&format!("b{i}"))
                            .unwrap_or_else(|e| panic!("session {i} after removal: {e}"));
                        responder(&a).unwrap().to_owned()
                    })
                    .collect();
                tx_after.send(after).unwrap();
            })
        });
        let first = rx_first
            .recv_timeout(Duration::from_secs(30))
            .expect("sessions opened");
        let on_b3 = first.iter().filter(|b| *b == "b3").count();
        println!("30 sessions before removal: {on_b3} on b3");
        assert!(
            on_b3 > 0,
            "with weight 3 of 6, some sessions must land on b3"
        );
        berth.reload(
            &ONE_ARMED_CONFIG.replace("  { address = \"10.20.0.13:8000\", weight = 3 },\n", ""),
        );
        tx_go.send(()).unwrap();
        let after = rx_after
            .recv_timeout(Duration::from_secs(30))
            .expect("sessions answered");
        assert_eq!(
            first, after,
            "every established session stays on its backend (b3's included)"
        );
        handle.join().expect("client thread");
    });
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 300);
    assert!(
        !counts.contains_key("b3"),
        "new connections reached the removed backend: {counts:?}"
    );
    assert_shares("after removing b3", &counts, &[("b1", 1), ("b2", 2)], 0.1);
}

const BRIDGED_CONFIG: &str = r#"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
backends = ["172.18.0.11:8000", "172.18.0.12:8000", "172.18.0.13:8000"]
[[service]]
name = "udp"
listen = "0.0.0.0:8080"
protocol = "udp"
backends = ["172.18.0.11:8000", "172.18.0.12:8000", "172.18.0.13:8000"]
"#;

#[test]
fn bridged_docker_like_host_balances_through_forward_drop() {
    let t = bridged();
    // Without berth, Docker's FORWARD DROP really blocks the client from the backends.
    let blocked = t
        .client
        .run(|| tcp_request(sa("172.18.0.11:8000"), "direct"));
    assert!(blocked.is_err(), "FORWARD DROP not in force: {blocked:?}");
    let _berth = Berth::start(&t.lb, BRIDGED_CONFIG, &["eth0", "br0"]);
    let counts = spread(&t.client, sa("10.30.0.1:8080"), false, 1000);
    assert_shares(
        "bridged tcp equal",
        &counts,
        &[("b1", 1), ("b2", 1), ("b3", 1)],
        0.07,
    );
    let counts = spread(&t.client, sa("10.30.0.1:8080"), true, 600);
    assert_shares(
        "bridged udp",
        &counts,
        &[("b1", 1), ("b2", 1), ("b3", 1)],
        0.08,
    );
    // Backends see the client's own address (DNAT only: nothing masquerades the way in), while
    // the client only ever sees the service address (its connected sockets prove that).
    let peer = t
        .client
        .run(|| tcp_request(sa("10.30.0.1:8080"), "peer?").unwrap());
    assert!(peer.contains(": peer 10.30.0.2:"), "{peer}");
}

#[test]
fn sigterm_leaves_the_dataplane_serving_and_the_next_berth_takes_it_over() {
    let t = bridged();
    let svc = sa("10.30.0.1:8080");
    let mut berth = Berth::start(&t.lb, BRIDGED_CONFIG, &["eth0", "br0"]);
    assert_eq!(
        spread(&t.client, svc, false, 30).values().sum::<usize>(),
        30
    );
    // An established connection that must live through both the stop and the take-over.
    let mut session = t
        .client
        .run(move || Session::connect(svc).expect("connect"));
    let mut ask = move |what: &str| {
        let answer = session
            .request(what)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        responder(&answer).map(str::to_owned).expect("an answer")
    };
    let first = ask("before");

    let (status, took) = berth.stop();
    println!("berth stopped with {status} in {took:?}");
    assert!(status.success(), "{status}: {}", berth.log_text());
    assert!(took < Duration::from_secs(5));
    assert!(
        berth
            .log_text()
            .contains("the dataplane keeps serving on eth0, br0")
    );
    // No daemon: the pinned dataplane still balances new connections and carries the old one.
    let counts = spread(&t.client, svc, false, 60);
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert_eq!(ask("while stopped"), first);

    // The next berth adopts it: same backends, no Maglev slot rewritten, same flows.
    let tables = berth.log_text().matches("maglev table updated").count();
    berth.respawn();
    let log = berth.log_text();
    assert!(log.contains("eth0: took over the attachment"), "{log}");
    assert!(
        log.contains("service web: taken over from the pinned dataplane"),
        "{log}"
    );
    assert_eq!(log.matches("maglev table updated").count(), tables, "{log}");
    assert_eq!(ask("after take-over"), first);
    assert_eq!(
        spread(&t.client, svc, false, 30).values().sum::<usize>(),
        30
    );

    // `berth down` is refused while a berth runs on the pins, and detaches everything after.
    let (refused, out) = berth.down();
    assert!(
        !refused.success() && out.contains("another berth is running"),
        "{out}"
    );
    let (status, _) = berth.stop();
    assert!(status.success());
    let (downed, out) = berth.down();
    assert!(downed.success(), "{out}");
    println!("{out}");
    assert!(
        out.contains("tc-") && out.contains("eth0") && out.contains("br0"),
        "{out}"
    );
    assert!(!berth.pin_path.exists());
    let after = t.client.run(move || tcp_request(svc, "x"));
    assert!(after.is_err(), "still answered after berth down: {after:?}");
}

#[test]
fn a_pinned_dataplane_berth_cannot_read_is_refused_with_the_reset_command() {
    let t = one_armed();
    let mut berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    berth.stop();
    let pins = berth.pin_path.clone();
    let run = |config: &str| {
        let path = berth.config.with_extension("other.toml");
        std::fs::write(&path, config).unwrap();
        let out =
            t.lb.command(berth_bin())
                .args([
                    "run",
                    "--iface",
                    "eth0",
                    "--cgroup",
                    "none",
                    "--admin-socket",
                ])
                .arg(berth.admin.with_extension("other"))
                .arg("--pin-path")
                .arg(&pins)
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Other map sizes than the pinned maps have: named, with the reset command.
    let (status, err) = run(&ONE_ARMED_CONFIG.replace(
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nconntrack_size = 4096",
    ));
    println!("{err}");
    assert!(!status.success());
    assert!(
        err.contains("has max_entries") && err.contains("(set by dataplane.conntrack_size)"),
        "{err}"
    );
    assert!(
        err.contains(&format!("berth down --pin-path {}", pins.display())),
        "{err}"
    );
    // Another layout version: never read.
    std::fs::create_dir(pins.join("v0")).unwrap();
    let (status, err) = run(ONE_ARMED_CONFIG);
    println!("{err}");
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "has layout v0, this berth uses v{}",
            lb_common::PIN_LAYOUT
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("berth down --pin-path {}", pins.display())),
        "{err}"
    );
    // The refusals changed nothing: the pinned dataplane still serves.
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 30);
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
    let (downed, out) = berth.down();
    assert!(downed.success(), "{out}");
    assert!(!pins.exists());
}

const HEALTH_CONFIG: &str = r#"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
backends = ["10.20.0.11:8000", "10.20.0.12:8000", "10.20.0.13:8000"]
[service.health]
type = "http"
path = "/"
expect_string = "Hello"
interval_ms = 200
timeout_ms = 150
rise = 2
fall = 2
"#;

/// Requests in a loop from the client namespace until `stop`; returns (time, answer or error).
fn load_loop(
    client: &Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(std::time::Instant, Result<String, String>)>> {
    client.spawn(move || {
        let mut out = Vec::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = tcp_request(sa("10.10.0.1:8080"), &format!("r{i}"));
            out.push((std::time::Instant::now(), r));
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

#[test]
fn failing_backend_leaves_after_fall_checks_and_returns_after_rise() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let mut t = one_armed();
    let berth = Berth::start(&t.lb, HEALTH_CONFIG, &["eth0"]);
    // Backends enter after their first passing checks (rise = 2 at 200 ms).
    for n in 1..=3 {
        berth.wait_for(
            &format!("backend 10.20.0.1{n}:8000 added (weight 1) (health check passing)"),
            1,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_loop(&t.client, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // b3's server goes away: connections to it are refused until the checks remove it.
    let killed_at = std::time::Instant::now();
    drop(t.servers.remove(2));
    berth.wait_for(
        "backend 10.20.0.13:8000 removed (health check failing: connection refused)",
        1,
    );
    let removed_after = killed_at.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    // b3 comes back and rejoins after `rise` passing checks.
    let back = Servers::start(&t.backends[2], "b3", sa("10.20.0.13:8000"), true);
    berth.wait_for(
        "backend 10.20.0.13:8000 added (weight 1) (health check passing)",
        2,
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load loop");
    drop(back);

    let window = Duration::from_millis(2 * 200 + 150 + 300); // fall x interval + timeout + slack
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let late: Vec<_> = failed
        .iter()
        .filter(|(at, _)| at.saturating_duration_since(killed_at) > removed_after.max(window))
        .collect();
    let b3_after_return = results
        .iter()
        .rev()
        .take(50)
        .filter(|(_, r)| r.as_deref().is_ok_and(|a| a.starts_with("Hello from b3:")))
        .count();
    println!(
        "health: {} requests, {} failed (all within {:?} of the kill; removal after {removed_after:?}), \
         b3 answered {b3_after_return} of the last 50 after returning",
        results.len(),
        failed.len(),
        removed_after.max(window),
    );
    assert!(
        late.is_empty(),
        "failures after the health-check window: {late:?}"
    );
    assert!(
        removed_after <= window,
        "removal took {removed_after:?}, window {window:?}"
    );
    assert!(b3_after_return > 0, "b3 got no traffic after it came back");
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric(page: &str, prefix: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix:?} in\n{page}"))
}

#[test]
fn metrics_match_the_traffic_sent() {
    let t = one_armed();
    let config = format!("{ONE_ARMED_CONFIG}\n[metrics]\nlisten = \"127.0.0.1:9477\"\n").replace(
        "[dataplane]\nmaglev_table_size = 65537",
        "[dataplane]\nmaglev_table_size = 65537\nconntrack_size = 65536",
    );
    let berth = Berth::start(&t.lb, &config, &["eth0"]);
    let sent = 200;
    let counts = spread(&t.client, sa("10.10.0.1:8080"), false, sent);
    // Five connections that stay open: the only active flows (the 200 above are closed).
    let mut sessions: Vec<Session> = t.client.run(|| {
        (0..5)
            .map(|_| Session::connect(sa("10.10.0.1:8080")).expect("connect"))
            .collect()
    });
    // Each backend's new flows: its share of the 200, plus the sessions that went to it.
    let mut counts = counts;
    for s in &mut sessions {
        let answer = s.request("hello").expect("answer");
        *counts
            .entry(responder(&answer).expect("a backend").to_owned())
            .or_insert(0) += 1;
    }
    let page =
        t.lb.run(|| berth_tests::topo::http_get(sa("127.0.0.1:9477")).expect("scrape"));
    assert_eq!(page.0, 200);
    let page = page.1;
    let web = r#"{service="web",listen="0.0.0.0:8080",protocol="tcp"}"#;
    let flows = metric(&page, &format!("berth_service_new_flows_total{web}"));
    let packets = metric(&page, &format!("berth_service_packets_total{web}"));
    println!("metrics after {sent} connections: new flows {flows}, packets {packets}");
    assert_eq!(flows as usize, sent + 5, "one new flow per connection");
    // Each connection: SYN, ACK, request, FIN, ACK one way; SYN-ACK, answer, FIN(-ACK) back.
    assert!(packets as usize >= sent * 6, "packets {packets}");
    for (n, (name, c)) in counts.iter().enumerate() {
        let line = format!(
            r#"berth_backend_new_flows_total{{service="web",backend="10.20.0.1{}:8000",container=""}}"#,
            &name[1..]
        );
        assert_eq!(metric(&page, &line) as usize, *c, "backend {n} {name}");
    }
    assert_eq!(metric(&page, "berth_conntrack_capacity"), 65536.0);
    let active: f64 = page
        .lines()
        .filter(|l| l.starts_with(r#"berth_backend_active_flows{service="web""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let entries = metric(&page, "berth_conntrack_entries");
    println!("active flows {active}, conntrack entries {entries}");
    assert_eq!(active, 5.0, "{page}");
    // Two entries per flow; the closed ones linger (closing timeout) until swept.
    assert!(
        (10.0..=(2 * (sent + 5)) as f64).contains(&entries),
        "{entries}"
    );
    let st = berth.status();
    let web_active: u64 = st
        .services
        .iter()
        .filter(|s| s.name == "web")
        .flat_map(|s| s.backends.iter().map(|b| b.active_flows))
        .sum();
    assert_eq!(web_active, 5);
    drop(sessions);
    assert!(
        metric(
            &page,
            r#"berth_packets_total{action="fwd",reason="redirect"}"#
        ) >= (sent * 4) as f64
    );
}

/// A stand-in Docker API on a Unix socket that answers every request with `answer` (an HTTP 500,
/// or bytes that are not HTTP at all), counting requests. The real API is exercised by the
/// Docker tests; this one is broken on purpose.
fn broken_docker_api(
    path: &std::path::Path,
    answer: &'static [u8],
    delay: Duration,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{Read as _, Write as _};
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).expect("bind fake docker socket");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            std::thread::sleep(delay);
            let _ = c.write_all(answer);
        }
    });
    seen
}

#[test]
fn a_docker_api_that_fails_is_named_retried_and_never_stops_the_configured_services() {
    let http500 = &b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"message\":\"engine broke\"}\n"[..];
    for (what, answer, delay) in [
        ("HTTP 500", http500, Duration::ZERO),
        (
            "garbage",
            &b"\x00\x01garbage, not HTTP\r\n\r\n"[..],
            Duration::ZERO,
        ),
        ("HTTP 500 after 1 s", http500, Duration::from_secs(1)),
    ] {
        let t = one_armed();
        let sock =
            std::env::temp_dir().join(format!("bte-fake-docker-{}.sock", std::process::id()));
        let requests = broken_docker_api(&sock, answer, delay);
        let config = format!(
            "[docker]\nenabled = true\nsocket = \"{}\"\n{ONE_ARMED_CONFIG}",
            sock.display()
        );
        let berth = Berth::start(&t.lb, &config, &["eth0"]);
        // Reported once, naming the socket, and retried with backoff (100 ms doubling to 2 s).
        berth.wait_for("reconnecting (and resyncing) with backoff", 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while requests.load(std::sync::atomic::Ordering::Relaxed) < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "no retries: {}",
                berth.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = berth.log_text();
        let first = log
            .lines()
            .find(|l| l.contains("reconnecting"))
            .unwrap_or_default()
            .to_owned();
        println!("docker API answering {what}: retried, reported as: {first}");
        assert!(first.contains(&sock.display().to_string()), "{first}");
        // ... while the configured services keep being served.
        let counts = spread(&t.client, sa("10.10.0.1:8080"), false, 60);
        assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
        assert!(
            !log.contains("panicked") && !log.contains("removed"),
            "{log}"
        );
        drop(berth);
        let _ = std::fs::remove_file(&sock);
    }
}

/// Path MTU discovery through berth, with real packets: a router on the client's side has a
/// 1280-byte link towards the client, whose own interface (and so its MSS) says 1500. The
/// backend's full-size segments reach that router, which answers "fragmentation needed" to the
/// address they came from: the service's. berth must translate that error to the backend
/// (quoting backend -> client), or the backend never learns the path MTU and the transfer
/// black-holes.
#[test]
fn path_mtu_discovery_works_through_berth() {
    remove_leftovers();
    let lb = Netns::new("lb");
    let rt = Netns::new("rt");
    let client = Netns::new("cl");
    let b = Netns::new("b1");
    veth(&lb, "eth0", &rt, "eth0");
    veth(&rt, "eth1", &client, "eth0");
    veth(&lb, "eth1", &b, "eth0");
    lb.exec(&["ip", "addr", "add", "10.10.0.1/24", "dev", "eth0"]);
    lb.exec(&["ip", "addr", "add", "10.20.0.1/24", "dev", "eth1"]);
    lb.exec(&["ip", "route", "add", "10.30.0.0/24", "via", "10.10.0.254"]);
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    rt.exec(&["ip", "addr", "add", "10.10.0.254/24", "dev", "eth0"]);
    rt.exec(&["ip", "addr", "add", "10.30.0.1/24", "dev", "eth1"]);
    rt.exec(&["ip", "link", "set", "eth1", "mtu", "1280"]);
    rt.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    client.exec(&["ip", "addr", "add", "10.30.0.2/24", "dev", "eth0"]);
    client.exec(&["ip", "route", "add", "default", "via", "10.30.0.1"]);
    b.exec(&["ip", "addr", "add", "10.20.0.11/24", "dev", "eth0"]);
    b.exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);

    const SIZE: usize = 256 * 1024;
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let expected = body.clone();
    let server = b.spawn(move || {
        let l = std::net::TcpListener::bind("10.20.0.11:8000").expect("bind");
        let (mut s, _) = l.accept().expect("accept");
        use std::io::Write as _;
        let _ = s.write_all(&body);
    });
    let berth = Berth::start(
        &lb,
        "[[service]]\nname = \"big\"\nlisten = \"10.10.0.1:8080\"\nbackends = [\"10.20.0.11:8000\"]\n",
        &["eth0", "eth1"],
    );
    let got = client.run(|| {
        use std::io::Read as _;
        let mut s = std::net::TcpStream::connect_timeout(
            &"10.10.0.1:8080".parse().unwrap(),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => Ok(buf),
            Err(e) => Err(format!("after {} bytes: {e}", buf.len())),
        }
    });
    let translated = berth
        .status()
        .counters
        .iter()
        .find(|(n, _)| n == "event_icmp_translated")
        .map_or(0, |(_, v)| *v);
    let got = got.unwrap_or_else(|e| {
        panic!("transfer through a 1280-byte hop failed ({translated} ICMP errors translated): {e}")
    });
    assert_eq!(got.len(), SIZE);
    assert!(got == expected, "payload corrupted");
    assert!(
        translated >= 1,
        "the router's 'fragmentation needed' was never translated"
    );
    let _ = server.join();
    println!("{SIZE} bytes through a 1280-byte hop; {translated} ICMP errors translated");
}

/// (packets, new flows) of every backend of service `name`, by address.
fn backend_totals(st: &lb_userspace::status::Status, name: &str) -> BTreeMap<String, (u64, u64)> {
    st.services
        .iter()
        .filter(|s| s.name == name)
        .flat_map(|s| s.backends.iter())
        .map(|b| (b.address.clone(), (b.packets, b.new_flows)))
        .collect()
}

/// After a restart berth holds the pinned services as they are until Docker's first listing; a
/// Docker that never answers makes that hold last. `berth status` shows the kernel's totals (and
/// pool) all the same, not zeros.
#[test]
fn status_shows_the_pinned_totals_after_a_restart() {
    let t = one_armed();
    let sock = std::env::temp_dir().join(format!("bte-hold-docker-{}.sock", std::process::id()));
    let http500 = &b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}"[..];
    let _requests = broken_docker_api(&sock, http500, Duration::ZERO);
    let config = format!(
        "[docker]\nenabled = true\nsocket = \"{}\"\n{ONE_ARMED_CONFIG}",
        sock.display()
    );
    let mut berth = Berth::start(&t.lb, &config, &["eth0"]);
    let svc = sa("10.10.0.1:8080");
    assert_eq!(
        spread(&t.client, svc, false, 60).values().sum::<usize>(),
        60
    );
    let before = backend_totals(&berth.status(), "web");
    let flows: u64 = before.values().map(|v| v.1).sum();
    assert_eq!(flows, 60, "{before:?}");
    let (status, _) = berth.stop();
    assert!(status.success());
    berth.respawn();
    berth.wait_for("keeping the pinned services as they are", 1);
    let st = berth.status();
    let after = backend_totals(&st, "web");
    println!("before the restart {before:?}, after (held) {after:?}");
    // Nothing was sent meanwhile: the kernel's totals, as they were, and still in the pool.
    assert_eq!(after, before, "{}", berth.log_text());
    assert!(
        st.services
            .iter()
            .filter(|s| s.name == "web")
            .flat_map(|s| s.backends.iter())
            .all(|b| b.in_pool),
        "{st:?}"
    );
    assert_eq!(
        spread(&t.client, svc, false, 30).values().sum::<usize>(),
        30
    );
    let flows: u64 = backend_totals(&berth.status(), "web")
        .values()
        .map(|v| v.1)
        .sum();
    assert_eq!(flows, 90);
    drop(berth);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn every_pin_directory_and_pin_is_root_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = one_armed();
    let berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    };
    let layout = berth.pin_path.join(format!("v{}", lb_common::PIN_LAYOUT));
    for dir in [
        berth.pin_path.clone(),
        layout.clone(),
        layout.join("maps"),
        layout.join("links"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{} is {:o}", dir.display(), mode(&dir));
        for e in std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()) {
            if e.file_type().unwrap().is_file() {
                let m = mode(&e.path());
                assert_eq!(m, 0o600, "{} is {m:o}", e.path().display());
            }
        }
    }
}

/// `ip netns exec` gives berth a mount namespace of its own with a fresh /sys, where berth mounts
/// a BPF filesystem nobody else sees: the pins die with that namespace. berth says so at start,
/// never claims at exit that the dataplane keeps serving, and indeed it does not.
#[test]
fn under_ip_netns_exec_berth_warns_that_the_pins_die_with_it() {
    let t = one_armed();
    let dir = std::env::temp_dir().join(format!("berth-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("netns-exec.toml");
    std::fs::write(&config, ONE_ARMED_CONFIG).unwrap();
    let log = dir.join("netns-exec.log");
    // Only ever inside the private mount namespace: the host's /sys/fs/bpf never sees it.
    let pins = berth_tests::topo::test_pin_path("netns-exec");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &t.lb.name])
        .arg(berth_bin())
        .args([
            "run",
            "--iface",
            "eth0",
            "--cgroup",
            "none",
            "--admin-socket",
        ])
        .arg(dir.join("netns-exec.sock"))
        .arg("--pin-path")
        .arg(&pins)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !text().contains("berth ready") {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "berth not ready:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let svc = sa("10.10.0.1:8080");
    assert_eq!(
        spread(&t.client, svc, false, 30).values().sum::<usize>(),
        30
    );
    assert!(!pins.exists(), "the pins showed up in the host's bpffs");
    // SAFETY: plain signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = text();
    println!("{log}");
    assert!(status.success(), "{status}");
    assert!(
        log.contains("the pins will not outlive this process"),
        "no warning at start:\n{log}"
    );
    assert!(
        !log.contains("keeps serving") && !log.contains("(pinned under"),
        "a false claim:\n{log}"
    );
    assert!(log.contains("goes with this mount namespace"), "{log}");
    // And true: once berth is gone, so is the dataplane.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if t.client.run(move || tcp_request(svc, "x")).is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still balanced after berth exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// utime + stime of a process, in seconds, and its peak resident memory in MiB.
fn cpu_and_peak_rss(pid: i32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm / 1024.0)
}

/// Connections to the metrics port that never send a request cost no conntrack walk, and real
/// scrapes share one walk per refresh interval, while still showing current figures.
#[test]
fn metrics_connections_do_not_each_walk_conntrack() {
    let t = one_armed();
    let berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    let svc = sa("10.10.0.1:8080");
    let metrics = sa("127.0.0.1:9477");
    // 2000 conntrack entries (closed flows linger until the sweep).
    assert_eq!(
        spread(&t.client, svc, false, 1000).values().sum::<usize>(),
        1000
    );
    let (cpu0, _) = cpu_and_peak_rss(berth.pid());
    let conns = 500;
    t.lb.run(move || {
        for _ in 0..conns {
            drop(std::net::TcpStream::connect(metrics).expect("connect to metrics"));
        }
    });
    // Let the daemon finish whatever those connections made it do.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu1, rss) = cpu_and_peak_rss(berth.pid());
    println!(
        "{conns} connect-then-close connections to the metrics port: berth CPU {:.2} s, peak RSS {rss:.1} MiB",
        cpu1 - cpu0
    );
    let scrape = || {
        let (status, page) =
            t.lb.run(move || berth_tests::topo::http_get(metrics).expect("scrape"));
        assert_eq!(status, 200, "{page}");
        page
    };
    let web = r#"{service="web",listen="0.0.0.0:8080",protocol="tcp"}"#;
    let page = scrape();
    assert_eq!(
        metric(&page, &format!("berth_service_new_flows_total{web}")),
        1000.0
    );
    let walks = metric(&page, "berth_conntrack_walks_total");
    // The sweep at start, and this scrape's refresh.
    assert!(walks <= 2.0, "{walks} conntrack walks");
    // Many scrapes at once within the refresh interval: one snapshot, no further walk.
    let pages: Vec<String> = (0..8)
        .map(|_| {
            t.lb.spawn(move || {
                (0..10)
                    .map(|_| berth_tests::topo::http_get(metrics).expect("scrape").1)
                    .collect::<Vec<_>>()
            })
        })
        .flat_map(|h| h.join().expect("scraper"))
        .collect();
    assert!(pages.iter().all(|p| *p == page), "a scrape differed");
    // After the interval (default 5 s) a scrape shows what happened meanwhile.
    assert_eq!(
        spread(&t.client, svc, false, 30).values().sum::<usize>(),
        30
    );
    std::thread::sleep(Duration::from_millis(5200));
    let page = scrape();
    assert_eq!(
        metric(&page, &format!("berth_service_new_flows_total{web}")),
        1030.0
    );
    let walks = metric(&page, "berth_conntrack_walks_total");
    assert!(walks <= 3.0, "{walks} conntrack walks");
    let (cpu2, rss) = cpu_and_peak_rss(berth.pid());
    println!(
        "after 82 scrapes: berth CPU {:.2} s in all since the flood, peak RSS {rss:.1} MiB, {walks} walks",
        cpu2 - cpu0
    );
}

/// A connection to a service whose pool is empty is refused at once (a RST from the service
/// address, as with nothing listening), not left to time out, and a UDP request gets port
/// unreachable (a connected socket sees ECONNREFUSED); with `reject_without_backend = false`
/// they are dropped as before.
#[test]
fn an_empty_pool_refuses_connections_at_once() {
    let t = one_armed();
    let config = "[[service]]\nname = \"empty\"\nlisten = \"10.10.0.1:9090\"\nbackends = []\n\
                  [[service]]\nname = \"empty-udp\"\nlisten = \"10.10.0.1:9091\"\n\
                  protocol = \"udp\"\nbackends = []\n";
    let udp = |t: &Topo| {
        t.client.run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect("10.10.0.1:9091").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send(b"anyone?").unwrap();
            let mut buf = [0u8; 64];
            s.recv(&mut buf).map(|_| ()).map_err(|e| e.kind())
        })
    };
    let connect = |t: &Topo| {
        t.client.run(|| {
            let started = std::time::Instant::now();
            let r = std::net::TcpStream::connect_timeout(
                &"10.10.0.1:9090".parse().unwrap(),
                Duration::from_secs(3),
            );
            (r.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
        })
    };
    let berth = Berth::start(&t.lb, config, &["eth0"]);
    for _ in 0..5 {
        let (r, took) = connect(&t);
        assert_eq!(r, Err(std::io::ErrorKind::ConnectionRefused), "{took:?}");
        assert!(
            took < Duration::from_millis(500),
            "refused only after {took:?}"
        );
    }
    drop(berth);
    let berth = Berth::start(
        &t.lb,
        &format!("[dataplane]\nreject_without_backend = false\n{config}"),
        &["eth0"],
    );
    let (r, took) = connect(&t);
    assert_eq!(r, Err(std::io::ErrorKind::TimedOut), "{took:?}");
    assert!(
        matches!(
            udp(&t),
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "a dropped datagram gets no answer"
    );
    drop(berth);
}

/// The first backend of an empty pool takes every new connection from the moment the service
/// stops refusing: no SYN is dropped while its Maglev row fills (one slot at a time, 65,537
/// writes), because a slot not yet written falls back to a backend of the pool.
#[test]
fn the_first_backend_of_an_empty_pool_takes_every_syn_while_its_row_fills() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let t = one_armed();
    let empty = "[[service]]\nname = \"web\"\nlisten = \"10.10.0.1:8080\"\nbackends = []\n";
    let berth = Berth::start(&t.lb, empty, &["eth0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Connects as fast as the answers come: refused at once while the pool is empty, accepted
    // once the backend is in; a dropped SYN would hold a connect for its timeout.
    let client = t.client.spawn(move || {
        let (mut refused, mut accepted, mut other) = (0u32, 0u32, Vec::new());
        // Until the backend took a few dozen (more would only fill its accept queue).
        while !flag.load(Ordering::SeqCst) && accepted < 50 {
            match std::net::TcpStream::connect_timeout(
                &"10.10.0.1:8080".parse().unwrap(),
                Duration::from_millis(300),
            ) {
                Ok(_) => accepted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Err(e) => other.push(e.to_string()),
            }
        }
        (refused, accepted, other)
    });
    std::thread::sleep(Duration::from_millis(300));
    berth.reload(&empty.replace("backends = []", "backends = [\"10.20.0.11:8000\"]"));
    berth.wait_for("maglev table updated", 1);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (refused, accepted, other) = client.join().expect("client");
    let drops = berth
        .status()
        .counters
        .iter()
        .find(|(n, _)| n == "drop_no_backend")
        .map_or(0, |(_, v)| *v);
    assert!(
        refused > 0 && accepted > 0,
        "refused {refused}, accepted {accepted}"
    );
    assert_eq!(
        (drops, other),
        (0, vec![]),
        "SYNs dropped while the row filled ({accepted} accepted, {refused} refused before)"
    );
}

/// Every packet berth rewrites leaves with checksums right for its skb's state, both ways, TCP
/// and UDP: with transmit checksum offload on (a local socket's or a container's packets are
/// `CHECKSUM_PARTIAL`, the field holding only the pseudo-header's sum, which the TC program
/// must change by the addresses alone) and off (complete checksums, changed by addresses and
/// ports). The veths hand both on unchecked, so captures at the backends and the client check
/// each rewritten frame ([`Frame::verify`]).
#[test]
fn rewritten_packets_carry_checksums_right_for_partial_and_complete_skbs() {
    let t = one_armed();
    let berth = Berth::start(&t.lb, ONE_ARMED_CONFIG, &["eth0"]);
    berth.wait_for("checksums of rewritten packets: by hand from ip_summed", 1);
    check_rewritten_checksums("DNAT", &t.client, &t.backends, sa("10.10.0.1:8080"));
}
