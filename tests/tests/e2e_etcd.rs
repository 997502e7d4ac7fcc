//! etcd discovery and several balancers, end to end: a real etcd member in a namespace, berth
//! nodes each in its own namespace with its own watch, real TCP servers as backends, a client.
//!
//! The fleet: one switch; client 10.70.0.2; nodes nK at 10.70.0.1K (and 10.71.0.1K on the
//! backend network, same link); backends bJ at 10.71.0.2J:8000 whose default gateway is the
//! floating address 10.71.0.1; etcd at 10.70.0.100:2379. The service is the VIP 10.99.0.1:8080,
//! the same on every node (ECMP or a floating route sends a client's packets to one of them):
//! the client's route to the VIP and the floating gateway sit on the active node, and moving
//! both is what a keepalived-style failover does (the backends' neighbour caches are flushed in
//! place of its gratuitous ARP).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::FromRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{
    docker::{Lab, Layout, TEST, docker},
    engines::{EngineHost, HostSpec},
    etcd::{Etcd, value},
    fabric::{self, Fabric, Publisher},
    servers::http_get,
    topo::{
        Berth, Netns, Servers, Session, bridge, plug, remove_leftovers, responder, signal,
        tcp_request, tcp_request_any,
    },
};

const PREFIX: &str = "/berth/services/web/";

fn vip() -> SocketAddrV4 {
    "10.99.0.1:8080".parse().unwrap()
}

fn backend_addr(j: usize) -> String {
    format!("10.71.0.2{j}:8000")
}

struct Fleet {
    // Drop order: servers, then etcd, then the namespaces.
    servers: Vec<Servers>,
    etcd: Etcd,
    client: Netns,
    nodes: Vec<Netns>,
    backends: Vec<Netns>,
    _etcd_ns: Netns,
    _switch: Netns,
}

fn fleet(nodes: usize, backends: usize) -> Fleet {
    remove_leftovers();
    let sw = Netns::new("esw");
    bridge(&sw);
    let port = |ns: &Netns, p: &str| plug(&sw, ns, p);
    let client = Netns::new("ecl");
    port(&client, "p-cl");
    client.exec(&["ip", "addr", "add", "10.70.0.2/24", "dev", "eth0"]);
    let et = Netns::new("etcd");
    port(&et, "p-etcd");
    et.exec(&["ip", "addr", "add", "10.70.0.100/24", "dev", "eth0"]);
    let mut ns = Vec::new();
    for k in 1..=nodes {
        let n = Netns::new(&format!("n{k}"));
        port(&n, &format!("p-n{k}"));
        n.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.70.0.1{k}/24"),
            "dev",
            "eth0",
        ]);
        n.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.71.0.1{k}/24"),
            "dev",
            "eth0",
        ]);
        n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns.push(n);
    }
    let mut bs = Vec::new();
    let mut servers = Vec::new();
    for j in 1..=backends {
        let b = Netns::new(&format!("eb{j}"));
        port(&b, &format!("p-b{j}"));
        b.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.71.0.2{j}/24"),
            "dev",
            "eth0",
        ]);
        b.exec(&["ip", "route", "add", "default", "via", "10.71.0.1"]);
        servers.push(Servers::start(
            &b,
            &format!("b{j}"),
            backend_addr(j).parse().unwrap(),
            false,
        ));
        bs.push(b);
    }
    let etcd = Etcd::start(&et, Ipv4Addr::new(10, 70, 0, 100));
    Fleet {
        servers,
        etcd,
        client,
        nodes: ns,
        backends: bs,
        _etcd_ns: et,
        _switch: sw,
    }
}

fn config() -> String {
    format!(
        r#"
[dataplane]
hash_seed = 7
maglev_table_size = 4099
[metrics]
enabled = false
[etcd]
endpoints = ["http://10.70.0.100:2379"]
timeout_ms = 1000
[[service]]
name = "web"
listen = "10.99.0.1:8080"
etcd = {{ prefix = "{PREFIX}" }}
"#
    )
}

impl Fleet {
    /// berth on node `k` (1-based), synced with etcd.
    fn berth(&self, k: usize) -> Berth {
        let b = Berth::start(&self.nodes[k - 1], &config(), &["eth0"]);
        b.wait_for("etcd: synced", 1);
        b
    }

    /// Node `k` takes the traffic: the client's route to the VIP and the backends' floating
    /// gateway move to it.
    fn activate(&self, k: usize) {
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = n
                .command("ip")
                .args(["addr", "del", "10.71.0.1/24", "dev", "eth0"])
                .output();
            if i + 1 == k {
                n.exec(&["ip", "addr", "add", "10.71.0.1/24", "dev", "eth0"]);
            }
        }
        for b in &self.backends {
            b.exec(&["ip", "neigh", "flush", "dev", "eth0"]);
        }
        self.client.exec(&[
            "ip",
            "route",
            "replace",
            "10.99.0.1/32",
            "via",
            &format!("10.70.0.1{k}"),
        ]);
    }

    fn put(&self, j: usize) {
        self.etcd
            .put(&format!("{PREFIX}b{j}"), &value(&backend_addr(j), 1));
    }
}

/// The backends in `berth`'s pool for the VIP (from `berth status`).
fn pool(berth: &Berth) -> Vec<String> {
    let st = berth.status();
    st.services
        .iter()
        .filter(|s| s.listen == vip().to_string())
        .flat_map(|s| s.backends.iter().filter(|b| b.in_pool))
        .map(|b| b.address.clone())
        .collect()
}

fn wait_pool(berth: &Berth, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool(berth).len() != n {
        assert!(
            Instant::now() < deadline,
            "pool never reached {n} backends: {:?}",
            pool(berth)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request over a TCP connection from `port` of this thread's namespace's address
/// 10.70.0.2, closed with a RST (no TIME_WAIT: the next round reuses the port).
fn request_from(port: u16, to: SocketAddrV4, line: &str) -> Result<String, String> {
    use std::io::{BufRead as _, Write as _};
    // SAFETY: plain socket calls on a descriptor this function owns; it is handed to a
    // TcpStream (which closes it) as soon as it is connected.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    let local = sin(SocketAddrV4::new(Ipv4Addr::new(10, 70, 0, 2), port));
    let remote = sin(to);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid pointers to initialised values of the sizes given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        if libc::bind(fd, (&raw const local).cast(), len) != 0 {
            -1
        } else {
            libc::connect(fd, (&raw const remote).cast(), len)
        }
    };
    // SAFETY: `fd` is an open socket owned by nobody else.
    let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    if rc != 0 {
        return Err(format!(
            "connect from {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    (&s).write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: as above; closing with linger 0 sends a RST.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    Ok(out.trim_end().to_owned())
}

/// Which backend answers each of `ports` (one connection each) through the active node.
fn picks(client: &Netns, ports: std::ops::Range<u16>) -> BTreeMap<u16, String> {
    client.run(move || {
        ports
            .map(|p| {
                let a = request_from(p, vip(), &format!("from {p}"))
                    .unwrap_or_else(|e| panic!("port {p}: {e}"));
                (p, responder(&a).unwrap_or("?").to_owned())
            })
            .collect()
    })
}

#[test]
fn a_put_is_served_at_once_and_an_expired_lease_leaves_the_pool() {
    let f = fleet(1, 4);
    f.put(1);
    f.put(2);
    let berth = f.berth(1);
    f.activate(1);
    wait_pool(&berth, 2);
    // A key put: served as soon as berth has it (measured from before etcdctl starts).
    let t = Instant::now();
    f.etcd.put(
        &format!("{PREFIX}b3"),
        // Nerve's layout, as Synapse reads it.
        r#"{"host":"10.71.0.23","port":8000,"name":"b3"}"#,
    );
    let put_took = t.elapsed();
    let served = f.client.run(move || {
        let mut i = 0u32;
        loop {
            i += 1;
            if let Ok(a) = tcp_request(vip(), &format!("probe {i}"))
                && a.starts_with("Hello from b3:")
            {
                return (t.elapsed(), i);
            }
            assert!(t.elapsed() < Duration::from_secs(5), "b3 never answered");
        }
    });
    println!(
        "etcd put -> first request answered by the new backend: {:?} ({} requests; the put \
         itself took {put_took:?})",
        served.0, served.1
    );
    assert!(
        served.0 < Duration::from_millis(200),
        "served {:?} after the put",
        served.0
    );
    // A key under a lease nobody refreshes: in the pool, then out when the lease expires.
    let lease = f.etcd.lease(2);
    f.etcd
        .put_with_lease(&format!("{PREFIX}b4"), &value(&backend_addr(4), 1), &lease);
    let granted = Instant::now();
    wait_pool(&berth, 4);
    berth.wait_for(&format!("etcd: {PREFIX}b4 deleted"), 1);
    println!(
        "lease of 2 s: its key left berth's pool {:?} after the grant",
        granted.elapsed()
    );
    wait_pool(&berth, 3);
    let answers = f.client.run(|| {
        (0..100)
            .map(|i| tcp_request(vip(), &format!("after {i}")).expect("request"))
            .collect::<Vec<_>>()
    });
    assert!(
        !answers.iter().any(|a| a.starts_with("Hello from b4:")),
        "b4 still answers after its lease expired"
    );
    assert!(
        berth
            .log_text()
            .contains("backend 10.71.0.24:8000 removed (etcd:"),
        "{}",
        berth.log_text()
    );
}

#[test]
fn etcd_killed_and_restarted_under_load_costs_no_request() {
    let mut f = fleet(1, 3);
    for j in 1..=3 {
        f.put(j);
    }
    let berth = f.berth(1);
    f.activate(1);
    wait_pool(&berth, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        f.client.spawn(move || {
            let mut out = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                out.push(tcp_request(vip(), &format!("r{i}")));
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            out
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    f.etcd.kill();
    berth.wait_for("etcd unreachable", 1);
    let st = berth.status();
    let e = st.etcd.as_ref().expect("etcd in berth status");
    assert!(!e.connected && e.error.is_some() && e.keys == 3, "{e:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pool(&berth).len(), 3, "the known backends keep serving");
    f.etcd.restart();
    berth.wait_for("etcd reachable again", 1);
    assert!(berth.status().etcd.expect("etcd").connected);
    // The watch is back: a deletion is followed (b3 drains; its server still answers).
    f.etcd.delete(&format!("{PREFIX}b3"));
    wait_pool(&berth, 2);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load loop");
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    let log = berth.log_text();
    println!(
        "etcd killed and restarted under load: {} requests, {} failed; 'etcd unreachable' \
         logged {} time(s)",
        results.len(),
        failed.len(),
        log.matches("etcd unreachable").count()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        log.matches("etcd unreachable").count(),
        1,
        "said once:\n{log}"
    );
}

#[test]
fn balancers_agree_per_flow_and_a_session_survives_a_failover() {
    let f = fleet(3, 4);
    // Each node learns the backends in another order and history: n1 one event at a time,
    // n2 from a listing of two then events, n3 from one listing after a backend came and went
    // (so their backend slot ids differ; only the addresses must agree).
    let n1 = f.berth(1);
    f.put(4);
    f.put(3);
    wait_pool(&n1, 2);
    let n2 = f.berth(2);
    f.etcd
        .put(&format!("{PREFIX}extra"), &value("10.71.0.99:8000", 1));
    f.put(2);
    f.put(1);
    wait_pool(&n2, 5);
    f.etcd.delete(&format!("{PREFIX}extra"));
    let n3 = f.berth(3);
    let nodes = [&n1, &n2, &n3];
    for n in nodes {
        wait_pool(n, 4);
    }
    let ports = 21000..21300;
    let round = |what: &str| -> Vec<BTreeMap<u16, String>> {
        (1..=3)
            .map(|k| {
                f.activate(k);
                let p = picks(&f.client, ports.clone());
                let mut per: BTreeMap<&str, usize> = BTreeMap::new();
                for b in p.values() {
                    *per.entry(b.as_str()).or_default() += 1;
                }
                println!("{what}: node n{k}: {per:?}");
                p
            })
            .collect()
    };
    let before = round("4 backends");
    assert_eq!(before[0], before[1], "n1 and n2 disagree");
    assert_eq!(before[0], before[2], "n1 and n3 disagree");
    assert_eq!(
        before[0]
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        4,
        "every backend takes flows"
    );
    // One backend leaves, on all of them through their watches.
    f.etcd.delete(&format!("{PREFIX}b4"));
    for n in nodes {
        wait_pool(n, 3);
    }
    let after = round("b4 removed");
    assert_eq!(after[0], after[1], "n1 and n2 disagree after the removal");
    assert_eq!(after[0], after[2], "n1 and n3 disagree after the removal");
    let moved = before[0]
        .iter()
        .filter(|(p, b)| after[0][*p] != **b)
        .count();
    let on_b4 = before[0].values().filter(|b| *b == "b4").count();
    let share = moved as f64 / before[0].len() as f64;
    println!(
        "{} flows: {moved} moved ({share:.3}), {on_b4} had been on b4 (1/N = 0.25)",
        before[0].len()
    );
    assert!(
        before[0]
            .iter()
            .filter(|(_, b)| *b == "b4")
            .all(|(p, _)| after[0][p] != "b4"),
        "a flow still goes to b4"
    );
    assert!(moved >= on_b4 && share < 0.25 + 0.1, "moved {share}");

    // A session through n1; n1's link is cut, the route and the gateway move to n2 (as
    // keepalived would), and the session goes on with the same backend.
    f.activate(1);
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let session = {
        let stop = stop.clone();
        f.client.spawn(move || {
            let mut s = Session::connect(vip()).expect("session through n1");
            let first = s.request("hello").expect("first request");
            started_tx.send(()).unwrap();
            let mut answers = vec![first];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                answers.push(
                    s.request(&format!("line {i}"))
                        .unwrap_or_else(|e| format!("ERR {e}")),
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            answers
        })
    };
    started_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("session started");
    std::thread::sleep(Duration::from_millis(200));
    f.nodes[0].exec(&["ip", "link", "set", "eth0", "down"]);
    f.activate(2);
    let moved_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let answers = session.join().expect("session thread");
    let who: Vec<&str> = answers.iter().map(|a| responder(a).unwrap_or(a)).collect();
    let pickups = n2
        .status()
        .counters
        .iter()
        .find(|(n, _)| n == "event_ct_midstream_pickup")
        .map_or(0, |(_, v)| *v);
    println!(
        "failover after {:?}: {} requests on one session, answered by {:?}; n2 picked up {pickups} \
         flow(s) mid-stream",
        moved_at.elapsed(),
        answers.len(),
        who.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        answers.iter().all(|a| a.starts_with("Hello from ")),
        "the session broke: {answers:?}"
    );
    assert!(who.iter().all(|w| *w == who[0]), "backend changed: {who:?}");
    assert!(pickups >= 1, "n2 never saw the session");
    drop((n1, n2, n3));
    let _ = &f.servers;
}

/// The Docker lab of the publish test: its own network, image and label.
const PUB_LAB: Layout = Layout {
    network: "berth-pub-net",
    bridge: "bte-pdock0",
    subnet: "172.31.248.0/24",
    uplink: "bte-pdh0",
    client_ns: "pdcl",
    service: SocketAddrV4::new(Ipv4Addr::new(10, 43, 0, 1), 8080),
    client: Ipv4Addr::new(10, 43, 0, 2),
    image: "berth-test/pub-hello",
    label: "berth-pubtest=1",
    healthcheck: false,
};

/// Who answers `n` HTTP requests to the service from the fabric's client (hostname -> count).
fn http_spread(f: &Fabric, n: usize) -> BTreeMap<String, usize> {
    f.client.run(move || {
        let mut m = BTreeMap::new();
        for i in 0..n {
            let (status, body) =
                http_get(fabric::SERVICE).unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(status, 200, "{body}");
            *m.entry(body.trim_start_matches("Hello from ").to_owned())
                .or_insert(0) += 1;
        }
        m
    })
}

#[test]
fn berth_publish_feeds_two_balancers_and_its_lease_takes_the_containers_out() {
    remove_leftovers();
    let lab = Lab::new(&PUB_LAB);
    let f = Fabric::new(2);
    let n1 = f.berth(1);
    let n2 = f.berth(2);
    let mut publisher = Publisher::start("pub", &f.publish_config(PUB_LAB.image, 2));
    let c1 = lab.run("bpub-1", &["-p", "8000"]);
    let c2 = lab.run("bpub-2", &["-p", "8000"]);
    let long = Duration::from_secs(10);
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 2, long);
    }
    let hosts: std::collections::BTreeSet<String> = [c1.hostname(), c2.hostname()].into();
    for k in 1..=2 {
        f.activate(k);
        let spread = http_spread(&f, 30);
        println!("through balancer {k}: {spread:?}");
        assert_eq!(
            spread
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            hosts,
            "balancer {k} does not serve both containers"
        );
    }
    // `docker stop`: withdrawn at its kill event, out of both pools.
    docker(&["stop", "-t", "2", &c2.name]);
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 1, long);
    }
    // The publisher dies without a word: its lease (2 s) expires and the entries go.
    publisher.signal(libc::SIGKILL);
    let t = Instant::now();
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 0, long);
    }
    println!(
        "publisher killed: out of both pools after {:?} (lease ttl 2 s)",
        t.elapsed()
    );
    // Back, then stopped cleanly: the lease is revoked, the entries go at once.
    publisher.respawn();
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 1, long);
    }
    publisher.signal(libc::SIGTERM);
    let t = Instant::now();
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 0, long);
    }
    let revoked = t.elapsed();
    println!("publisher stopped: out of both pools after {revoked:?}");
    assert!(
        revoked < Duration::from_secs(1),
        "the lease was not revoked at exit ({revoked:?})"
    );
    assert!(
        publisher.log_text().contains("lease revoked"),
        "{}",
        publisher.log_text()
    );
}

/// The Docker hosts of the two-host publish test: each a dockerd in its own namespace
/// (`berth_tests::engines`), plugged into the fabric's switch as 10.72.0.2N.
const PUB_B: HostSpec = HostSpec {
    name: "pb",
    n: 5,
    tls: false,
};
const PUB_C: HostSpec = HostSpec {
    name: "pc",
    n: 6,
    tls: true,
};

/// The pool's addresses, sorted.
fn pool_sorted(b: &Berth) -> Vec<String> {
    let mut p = fabric::pool(b);
    p.sort();
    p
}

#[test]
fn berth_publish_on_two_docker_hosts_feeds_two_balancers() {
    remove_leftovers();
    // Engine hosts first: dropped last, after the publishers and balancers.
    let started: Vec<_> = [PUB_B, PUB_C]
        .into_iter()
        .map(|s| std::thread::spawn(move || EngineHost::start(s, TEST.image)))
        .collect();
    let hosts: Vec<EngineHost> = started
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect();
    let (hb, hc) = (&hosts[0], &hosts[1]);
    let f = Fabric::new(2);
    let (addr_b, addr_c) = (Ipv4Addr::new(10, 72, 0, 21), Ipv4Addr::new(10, 72, 0, 22));
    f.plug(&hb.ns, "p-hb", addr_b);
    f.plug(&hc.ns, "p-hc", addr_c);
    let n1 = f.berth(1);
    let n2 = f.berth(2);
    let etcd = format!(
        "[etcd]\nendpoints = [\"{}\"]\ntimeout_ms = 1000\n",
        f.etcd.endpoint()
    );
    let service = format!(
        "[[publish.service]]\nprefix = \"{}\"\nimage = \"{}\"\nport = 8000\n",
        fabric::PREFIX,
        TEST.image
    );
    // Host b: a publisher on the host itself, finding its engine as the docker CLI does
    // (DOCKER_HOST), announcing the host's address on the fabric.
    let mut pub_b = Publisher::start_in(
        "pub-b",
        &format!("{etcd}[publish]\naddress = \"{addr_b}\"\nttl_secs = 2\n{service}"),
        Some(&hb.ns),
        &[("DOCKER_HOST", hb.socket().as_str())],
    );
    // Host c: published from elsewhere (this namespace) through its TLS API, a
    // `[[docker.engine]]` entry whose `address` says where its published ports are reached;
    // an engine unreachable for more than `grace_secs` has its entries withdrawn.
    let grace = Duration::from_secs(2);
    let pub_c = Publisher::start(
        "pub-c",
        &format!(
            "{etcd}[docker]\ngrace_secs = {}\n{}address = \"{addr_c}\"\n[publish]\n\
             ttl_secs = 2\n{service}",
            grace.as_secs(),
            hc.engine_toml()
        ),
    );
    let b1 = hb.run("bpb-1", TEST.image, &[]).hostname();
    let c1 = hc.run("bpc-1", TEST.image, &[]).hostname();
    let c2 = hc.run("bpc-2", TEST.image, &[]).hostname();
    let long = Duration::from_secs(15);
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 3, long);
    }
    // Both balancers have the same pool: host b's container at b's address, c's two at c's.
    let p1 = pool_sorted(&n1);
    assert_eq!(p1, pool_sorted(&n2), "the balancers disagree");
    let on = |a: Ipv4Addr| {
        p1.iter()
            .filter(|x| x.starts_with(&format!("{a}:")))
            .count()
    };
    assert_eq!((on(addr_b), on(addr_c)), (1, 2), "{p1:?}");
    let keys = f.etcd.ctl(&["get", "--prefix", fabric::PREFIX]);
    assert!(
        keys.contains("\"engine\":\"default\"") && keys.contains("\"engine\":\"pc\""),
        "each entry names its engine: {keys}"
    );
    // Served through either balancer.
    let all: std::collections::BTreeSet<String> = [b1.clone(), c1.clone(), c2.clone()].into();
    for k in 1..=2 {
        f.activate(k);
        let spread = http_spread(&f, 45);
        println!("through balancer {k}: {spread:?}");
        assert_eq!(
            spread
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            all,
            "balancer {k} does not serve the containers of both hosts"
        );
    }
    // `docker stop` on host c: out of both pools.
    let t = Instant::now();
    hc.docker(&["stop", "-t", "2", "bpc-2"]);
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 2, long);
    }
    println!(
        "docker stop on host c: out of both pools {:?} after the call",
        t.elapsed()
    );
    // Host b's publisher dies without a word: its lease expires and host b's container
    // leaves both pools; host c's stays and serves.
    pub_b.signal(libc::SIGKILL);
    let t = Instant::now();
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 1, long);
        assert!(
            pool_sorted(n)[0].starts_with(&format!("{addr_c}:")),
            "{:?}",
            pool_sorted(n)
        );
    }
    println!(
        "host b's publisher killed: its container out of both pools after {:?} (lease ttl 2 s)",
        t.elapsed()
    );
    for k in 1..=2 {
        f.activate(k);
        let spread = http_spread(&f, 10);
        assert_eq!(
            spread.keys().cloned().collect::<Vec<_>>(),
            std::slice::from_ref(&c1),
            "balancer {k}"
        );
    }
    // Back: host b's container rejoins both pools.
    pub_b.respawn();
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 2, long);
    }
    assert!(
        pub_b
            .log_text()
            .contains("docker default: following unix://"),
        "{}",
        pub_b.log_text()
    );
    // Host c dies without a word while its publisher (elsewhere) lives on: both its links are
    // cut, so the publisher's pings go unanswered and the balancers no longer reach its
    // published ports. Past the grace its container leaves both pools, withdrawn by the
    // publisher; host b's stays throughout and serves.
    let b_entry = |p: &[String]| p.iter().any(|a| a.starts_with(&format!("{addr_b}:")));
    hc.cut();
    f.set_port("p-hc", false);
    let t = Instant::now();
    let limit = grace + Duration::from_secs(4);
    for n in [&n1, &n2] {
        loop {
            let p = pool_sorted(n);
            assert!(b_entry(&p), "host b's container left a pool: {p:?}");
            if p.len() == 1 {
                break;
            }
            assert!(
                t.elapsed() < limit,
                "host c's container still in a pool {:?} after its engine was cut off: {p:?}\n{}",
                t.elapsed(),
                pub_c.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let withdrawn = t.elapsed();
    println!(
        "host c cut off: its container out of both pools after {withdrawn:?} (grace {grace:?})"
    );
    // The grace runs from the last answer, at most a ping (1 s) before the cut.
    assert!(
        withdrawn + Duration::from_secs(1) >= grace,
        "withdrawn before the grace ran out ({withdrawn:?})"
    );
    for k in 1..=2 {
        f.activate(k);
        let spread = http_spread(&f, 10);
        assert_eq!(
            spread.keys().cloned().collect::<Vec<_>>(),
            std::slice::from_ref(&b1),
            "balancer {k} while host c is cut off"
        );
    }
    // Back: the publisher lists host c's containers again and they rejoin both pools.
    hc.reconnect();
    f.set_port("p-hc", true);
    let t = Instant::now();
    for n in [&n1, &n2] {
        fabric::wait_pool(n, 2, long);
    }
    println!(
        "host c back: its container in both pools again after {:?}",
        t.elapsed()
    );
    let all: std::collections::BTreeSet<String> = [b1.clone(), c1.clone()].into();
    for k in 1..=2 {
        f.activate(k);
        let spread = http_spread(&f, 30);
        assert_eq!(
            spread
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            all,
            "balancer {k} after host c came back"
        );
    }
    let log = pub_c.log_text();
    assert_eq!(
        log.matches("unreachable for more than").count(),
        1,
        "the loss said once:\n{log}"
    );
    assert!(log.contains("docker pc: answers again"), "{log}");
    drop((pub_b, pub_c, n1, n2));
}

#[test]
fn a_watch_behind_a_compaction_reads_afresh_and_gets_the_pool_right() {
    let f = fleet(1, 3);
    f.activate(1);
    f.put(1);
    f.put(2);
    let n1 = f.berth(1);
    wait_pool(&n1, 2);
    let addr = |j: usize| backend_addr(j);
    // berth stops reading its watch (SIGSTOP): etcd's sends to it back up (HTTP/2 windows,
    // socket buffers, the watch's queue), and etcd puts the watch aside as a slow watcher.
    signal(n1.pid(), libc::SIGSTOP);
    let pad = "x".repeat(100_000);
    let b2 = addr(2);
    f.etcd.put_many(&format!("{PREFIX}b2"), 300, move |i| {
        format!(r#"{{"address":"{b2}","weight":1,"pad":"{i}{pad}"}}"#)
    });
    // What the pool must become, written while berth is behind; then every revision before
    // now is compacted away, those of the slow watch included.
    f.etcd.delete(&format!("{PREFIX}b1"));
    f.put(3);
    let rev = f.etcd.revision();
    f.etcd.ctl(&["compact", &rev.to_string()]);
    signal(n1.pid(), libc::SIGCONT);
    let t = Instant::now();
    while !n1.log_text().contains("fell behind a compaction") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "berth never said its watch fell behind a compaction:\n{}",
            n1.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let want = vec![addr(2), addr(3)];
    let t = Instant::now();
    loop {
        let mut p = pool(&n1);
        p.sort();
        if p == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pool {p:?} after the fresh read, etcd has {want:?}:\n{}",
            n1.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = n1.log_text();
    assert!(
        !log.contains("etcd unreachable"),
        "a reconnect, not the compaction, made the fresh read:\n{log}"
    );
    // Served by the keys etcd holds now.
    let seen: std::collections::BTreeSet<String> =
        picks(&f.client, 41000..41030).into_values().collect();
    assert_eq!(
        seen,
        ["b2".to_owned(), "b3".to_owned()].into(),
        "served by what etcd holds"
    );
    let _ = &f.servers;
}

/// The IPv6 backends' addresses: `[fd71::2J]:8000` (beside 10.71.0.2J).
fn backend6(j: usize) -> std::net::SocketAddr {
    format!("[fd71::2{j}]:8000").parse().unwrap()
}

/// The backends in `berth`'s pool of service `name` (from `berth status`).
fn pool_of(berth: &Berth, name: &str) -> Vec<String> {
    let st = berth.status();
    let mut p: Vec<String> = st
        .services
        .iter()
        .filter(|s| s.name == name)
        .flat_map(|s| s.backends.iter().filter(|b| b.in_pool))
        .map(|b| b.address.clone())
        .collect();
    p.sort();
    p
}

fn wait_pool_of(berth: &Berth, name: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool_of(berth, name) != want {
        assert!(
            Instant::now() < deadline,
            "service {name}: pool never became {want:?}: {:?}",
            pool_of(berth, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ipv6_entries_feed_ipv6_services_and_a_mismatched_family_is_named() {
    let mut f = fleet(1, 2);
    // IPv6 beside IPv4: client fd70::2 -> node fd70::11 (and the backends' gateway fd71::1),
    // backends fd71::21-22 serving on :8000 too. The VIP fd99::1 is routed to the node.
    let add6 = |ns: &Netns, a: &str| {
        ns.exec(&["ip", "-6", "addr", "add", a, "dev", "eth0", "nodad"]);
    };
    let node = &f.nodes[0];
    add6(node, "fd70::11/64");
    add6(node, "fd71::1/64");
    node.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    add6(&f.client, "fd70::2/64");
    f.client
        .exec(&["ip", "-6", "route", "add", "fd99::1/128", "via", "fd70::11"]);
    for (j, b) in f.backends.iter().enumerate() {
        let j = j + 1;
        add6(b, &format!("fd71::2{j}/64"));
        b.exec(&["ip", "-6", "route", "add", "default", "via", "fd71::1"]);
        f.servers.push(Servers::start_any(
            b,
            &format!("v6b{j}"),
            backend6(j),
            false,
        ));
    }
    // A dual-stack service and an IPv4-only one, each with its own prefix.
    let cfg = format!(
        r#"
[dataplane]
hash_seed = 7
maglev_table_size = 4099
[metrics]
enabled = false
[etcd]
endpoints = ["http://10.70.0.100:2379"]
timeout_ms = 1000
[[service]]
name = "web"
listen = "10.99.0.1:8080"
listen6 = "[fd99::1]:8080"
etcd = {{ prefix = "{PREFIX}" }}
[[service]]
name = "api"
listen = "10.99.0.1:9090"
etcd = {{ prefix = "/berth/services/api/" }}
"#
    );
    f.put(1);
    f.etcd.put(
        &format!("{PREFIX}v6b1"),
        &value(&backend6(1).to_string(), 1),
    );
    f.etcd.put(
        "/berth/services/api/v6",
        &value(&backend6(2).to_string(), 1),
    );
    let berth = Berth::start(&f.nodes[0], &cfg, &["eth0"]);
    berth.wait_for("etcd: synced", 1);
    f.activate(1);
    // Each half takes its family's entries of the one prefix.
    wait_pool_of(&berth, "web", &["10.71.0.21:8000"]);
    wait_pool_of(&berth, "web.ipv6", &["[fd71::21]:8000"]);
    let vip6: std::net::SocketAddr = "[fd99::1]:8080".parse().unwrap();
    let a = f
        .client
        .run(move || tcp_request_any(vip6, "first").expect("IPv6 request"));
    assert!(a.starts_with("Hello from v6b1:"), "{a}");
    // An IPv6 key put (Nerve's layout, a bare IPv6 host): served at once over IPv6.
    let t = Instant::now();
    f.etcd.put(
        &format!("{PREFIX}v6b2"),
        r#"{"host":"fd71::22","port":8000,"name":"v6b2"}"#,
    );
    let put_took = t.elapsed();
    let served = f.client.run(move || {
        let mut i = 0u32;
        loop {
            i += 1;
            if let Ok(a) = tcp_request_any(vip6, &format!("probe {i}"))
                && a.starts_with("Hello from v6b2:")
            {
                return (t.elapsed(), i);
            }
            assert!(t.elapsed() < Duration::from_secs(5), "v6b2 never answered");
        }
    });
    println!(
        "etcd put of an IPv6 entry -> first IPv6 request answered by it: {:?} ({} requests; \
         the put itself took {put_took:?})",
        served.0, served.1
    );
    wait_pool_of(&berth, "web.ipv6", &["[fd71::21]:8000", "[fd71::22]:8000"]);
    wait_pool_of(&berth, "web", &["10.71.0.21:8000"]);
    // IPv4 clients still reach the IPv4 entry only.
    let a = f
        .client
        .run(|| tcp_request(vip(), "v4").expect("IPv4 request"));
    assert!(a.starts_with("Hello from b1:"), "{a}");
    // A deleted IPv6 key leaves the IPv6 pool.
    f.etcd.delete(&format!("{PREFIX}v6b1"));
    wait_pool_of(&berth, "web.ipv6", &["[fd71::22]:8000"]);
    let answers = f.client.run(move || {
        (0..50)
            .map(|i| tcp_request_any(vip6, &format!("after {i}")).expect("request"))
            .collect::<Vec<_>>()
    });
    assert!(
        answers.iter().all(|a| a.starts_with("Hello from v6b2:")),
        "{answers:?}"
    );
    // The IPv4-only service takes no IPv6 entry, and says so once, naming key and service.
    assert!(
        pool_of(&berth, "api").is_empty(),
        "{:?}",
        pool_of(&berth, "api")
    );
    let log = berth.log_text();
    let named =
        "etcd: key /berth/services/api/v6: [fd71::22]:8000 is IPv6, service api listens on IPv4";
    assert_eq!(log.matches(named).count(), 1, "{log}");
    // Nothing named for the dual-stack prefix, whose halves take both families.
    assert!(!log.contains(&format!("key {PREFIX}")), "{log}");
    f.servers.clear();
}

#[test]
fn berth_publish_withdraws_a_killed_dockerds_entries_after_the_grace_and_restores_them() {
    remove_leftovers();
    let mut hb = EngineHost::start(PUB_B, TEST.image);
    let f = Fabric::new(1);
    let addr_b = Ipv4Addr::new(10, 72, 0, 21);
    f.plug(&hb.ns, "p-hb", addr_b);
    let n1 = f.berth(1);
    let grace = Duration::from_secs(2);
    // The usual deployment: the publisher on the Docker host, its engine from DOCKER_HOST;
    // the host's IPv6 address given too, so the ports Docker publishes on `::` are announced.
    let publisher = Publisher::start_in(
        "pub-k",
        &format!(
            "[etcd]\nendpoints = [\"{}\"]\ntimeout_ms = 1000\n[docker]\ngrace_secs = {}\n\
             [publish]\naddress = \"{addr_b}\"\naddress6 = \"fd72::21\"\nttl_secs = 2\n\
             [[publish.service]]\nprefix = \"{}\"\nimage = \"{}\"\nport = 8000\n",
            f.etcd.endpoint(),
            grace.as_secs(),
            fabric::PREFIX,
            TEST.image
        ),
        Some(&hb.ns),
        &[("DOCKER_HOST", hb.socket().as_str())],
    );
    // Restarted by its policy when dockerd is back (dockerd stops what ran at its death).
    let k1 = hb
        .run("bpk-1", TEST.image, &["--restart", "always"])
        .hostname();
    let long = Duration::from_secs(15);
    fabric::wait_pool(&n1, 1, long);
    f.activate(1);
    assert_eq!(
        http_spread(&f, 5).keys().cloned().collect::<Vec<_>>(),
        std::slice::from_ref(&k1)
    );
    // Both of the container's bindings (dockerd lists 0.0.0.0 and ::), one entry each.
    let families = |keys: &[String]| {
        (
            keys.iter().filter(|k| k.contains("10.72.0.21:")).count(),
            keys.iter().filter(|k| k.contains("[fd72::21]:")).count(),
        )
    };
    let keys = f.etcd.keys(fabric::PREFIX);
    assert_eq!(families(&keys), (1, 1), "{keys:?}");
    // The balancer's service is IPv4: it names the IPv6 entry instead of serving it.
    n1.wait_for("is IPv6, service web listens on IPv4", 1);
    // dockerd killed (the host, its link and the publisher live on): the publisher's pings
    // are refused; past the grace the entry is withdrawn, and the balancer's pool empties.
    hb.kill_dockerd();
    let t = Instant::now();
    fabric::wait_pool(&n1, 0, grace + Duration::from_secs(4));
    let withdrawn = t.elapsed();
    println!("dockerd killed: its entry out of the pool after {withdrawn:?} (grace {grace:?})");
    // The grace runs from the last answer, at most a ping (1 s) before the kill.
    assert!(
        withdrawn + Duration::from_secs(1) >= grace,
        "withdrawn before the grace ran out ({withdrawn:?})"
    );
    let log = publisher.log_text();
    assert_eq!(
        log.matches("unreachable for more than").count(),
        1,
        "the loss said once:\n{log}"
    );
    let keys = f.etcd.keys(fabric::PREFIX);
    assert!(keys.is_empty(), "both entries withdrawn: {keys:?}");
    // dockerd back: it restarts the container, the publisher lists it and writes it again.
    hb.start_dockerd();
    let t = Instant::now();
    fabric::wait_pool(&n1, 1, long);
    println!(
        "dockerd back: the container in the pool again {:?} after dockerd answered",
        t.elapsed()
    );
    assert_eq!(
        http_spread(&f, 5).keys().cloned().collect::<Vec<_>>(),
        std::slice::from_ref(&k1),
        "the restarted container serves again"
    );
    let log = publisher.log_text();
    assert!(log.contains("docker default: answers again"), "{log}");
    let keys = f.etcd.keys(fabric::PREFIX);
    assert_eq!(families(&keys), (1, 1), "{keys:?}");
    drop((publisher, n1));
}
