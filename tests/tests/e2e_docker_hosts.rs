//! Docker e2e across hosts: berth watching three Docker Engines, this host's (the machine's
//! dockerd, on its Unix socket) and two others, each a dockerd in a network namespace of its
//! own (`berth_tests::engines`): host `b` with its API on plain TCP, host `c` on TLS with client
//! certificates. Containers of one image on all three make one pool; containers of the other
//! hosts are reached at their hosts' published ports. Clients sit in their own namespace behind
//! the uplink (`berth_tests::docker::Lab`); berth runs in the root namespace and attaches only
//! to interfaces the test made (the lab's bridge and uplink, the links to the other hosts).
//!
//! The faults: a container stopped on `c` under load, host `b` cut off (its link down) under
//! load and brought back, and (with the tutorial's Synapse config plus a second server) host
//! `b` crashed (dockerd and containers killed) and restarted.
//!
//! Reached how: by default, other hosts' containers by full NAT (they see berth's address on
//! the link as the client and reply to it). The other hosts also route back to the clients
//! through the root namespace, so `mode = "dnat"` works as well: the first test switches to it
//! by a reload at the end.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, TEST, stop_under_load_with},
    engines::{EngineHost, HostSpec},
    netns::Netns,
    servers::{CLIENT_TIMEOUT, http_get},
};

const B: HostSpec = HostSpec {
    name: "b",
    n: 2,
    tls: false,
};
const C: HostSpec = HostSpec {
    name: "c",
    n: 3,
    tls: true,
};

/// Starts the given engine hosts side by side (each takes a second or two).
fn hosts(specs: &[HostSpec]) -> Vec<EngineHost> {
    let started: Vec<JoinHandle<EngineHost>> = specs
        .iter()
        .map(|&s| std::thread::spawn(move || EngineHost::start(s, TEST.image)))
        .collect();
    let hosts: Vec<EngineHost> = started
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect();
    for h in &hosts {
        println!(
            "engine host {} at {} answered {:?} after dockerd was started",
            h.spec.name,
            h.endpoint(),
            h.started_in
        );
    }
    hosts
}

/// One request of a load loop: when it started, when it ended, and Ok(hostname) or Err(what).
struct Request {
    started: Instant,
    ended: Instant,
    result: Result<String, String>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} ({:?})", self.result, self.ended - self.started)
    }
}

/// A request every 5 ms from `client` until `stop`.
fn timed_load(
    client: &Netns,
    service: SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Request>> {
    client.spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let result = match http_get(service) {
                Ok((200, body)) => Ok(body.trim_start_matches("Hello from ").to_owned()),
                Ok((s, body)) => Err(format!("status {s}: {body}")),
                Err(e) => Err(e),
            };
            out.push(Request {
                started,
                ended: Instant::now(),
                result,
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

/// The failed requests that were not under way while the fault lasted (`from` - `to`): ended
/// before it began, or started after it was over.
fn failed_outside(results: &[Request], from: Instant, to: Instant) -> Vec<&Request> {
    results
        .iter()
        .filter(|r| r.result.is_err() && (r.ended < from || r.started > to))
        .collect()
}

/// Waits (20 ms steps, up to `limit`) until `berth`'s log holds `needle`; returns when.
fn logged(berth: &Berth, needle: &str, limit: Duration) -> Instant {
    let t = Instant::now();
    while !berth.log_text().contains(needle) {
        assert!(
            t.elapsed() < limit,
            "berth never logged {needle:?}:\n{}",
            berth.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Instant::now()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn containers_on_three_hosts_make_one_pool_and_a_host_cut_off_leaves_it() {
    let lab = Lab::for_tests();
    let other = hosts(&[B, C]);
    let (b, c) = (&other[0], &other[1]);
    let a1 = lab.run("bt-a1", &[]).hostname();
    let b1 = b.run("bt-b1", TEST.image, &[]).hostname();
    let c1 = c.run("bt-c1", TEST.image, &[]).hostname();
    let grace = 2;
    let config = format!(
        "[docker]\nlabel_services = false\ngrace_secs = {grace}\n\
         [[docker.engine]]\nname = \"a\"\nendpoint = \"unix:///var/run/docker.sock\"\n\
         {}{}\
         [[service]]\nname = \"nodeapp\"\nlisten = \"0.0.0.0:8080\"\n\
         [service.docker]\nimage = \"{}\"\nport = 8000\n",
        b.engine_toml(),
        c.engine_toml(),
        TEST.image
    );
    let ifaces = [TEST.uplink, TEST.bridge, b.link.as_str(), c.link.as_str()];
    let berth = Berth::start_root("docker-hosts", &config, &ifaces);
    berth.wait_for(" added (weight ", 3);

    // One pool of the three hosts' containers.
    let m = lab.spread(90);
    println!("three hosts: {m:?}");
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![a1.clone(), b1.clone(), c1.clone()])
    );
    let st = berth.status();
    let backends = &st.services[0].backends;
    let on = |engine: &str| {
        backends
            .iter()
            .find(|x| x.engine.as_deref() == Some(engine))
            .unwrap_or_else(|| panic!("no backend on engine {engine}: {st:?}"))
            .address
            .clone()
    };
    // The other hosts' containers are reached at their published ports.
    assert!(on("b").starts_with("10.42.2.2:"), "{st:?}");
    assert!(on("c").starts_with("10.42.3.2:"), "{st:?}");
    assert!(on("a").starts_with("172.31.250."), "{st:?}");
    for e in &st.engines {
        assert!(e.connected && e.containers == 1, "{e:?}");
    }
    assert_eq!(
        st.engines.iter().map(|e| e.this_host).collect::<Vec<_>>(),
        [true, false, false]
    );

    // A new container on each host joins within a second of its start: counted from the return
    // of `docker run -d` (the container has started), Docker's own time printed beside it.
    let mut joins = Vec::new();
    for (kind, start) in [
        (
            "this host (unix socket)",
            Box::new(|| lab.run("bt-a2", &[]).hostname()) as Box<dyn Fn() -> String>,
        ),
        (
            "remote, plain TCP",
            Box::new(|| b.run("bt-b2", TEST.image, &[]).hostname()),
        ),
        (
            "remote, TLS",
            Box::new(|| c.run("bt-c2", TEST.image, &[]).hostname()),
        ),
    ] {
        let called = Instant::now();
        let h = start();
        let t = Instant::now();
        let joined = lab.served_by(&h, t, Duration::from_secs(5));
        println!(
            "new container on {kind}: served {joined:?} after `docker run` returned (it took \
             {:?})",
            t - called
        );
        joins.push((kind, joined));
    }
    for (kind, joined) in &joins {
        assert!(*joined < Duration::from_secs(1), "{kind}: {joined:?}");
    }

    // `docker stop` on host c under load: no failed request, none answered by it after.
    let n = stop_under_load_with(&lab.client, TEST.service, &c1, || {
        c.docker(&["stop", "bt-c1"]);
    });
    println!("docker stop on host c under load: {n} requests, none failed");

    // Host b cut off under load: its backends leave after the grace (no health check here);
    // requests fail only inside that window.
    let stop = Arc::new(AtomicBool::new(false));
    let load = timed_load(&lab.client, TEST.service, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let cut = Instant::now();
    b.cut();
    let left = logged(
        &berth,
        "engine b unreachable for more than 2 s",
        Duration::from_secs(15),
    );
    // A request to host b under way when it left ends within its timeouts (to connect, then to
    // read); 1.5 s more of requests after it.
    std::thread::sleep(2 * CLIENT_TIMEOUT + Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load loop");
    let window = left.duration_since(cut);
    let failed = results.iter().filter(|r| r.result.is_err()).count();
    println!(
        "host b cut off under load: out of the pool {window:?} after the cut (grace {grace} s); \
         {} requests, {failed} failed",
        results.len(),
    );
    let outside = failed_outside(&results, cut, left);
    assert!(outside.is_empty(), "failed outside the window: {outside:?}");
    // Noticed by a ping left unanswered (every 1 s, 2 s to answer), judged at the next 1 s
    // tick once the grace since the last answer has passed.
    assert!(
        window < Duration::from_secs(grace + 5),
        "took {window:?} (grace {grace} s)"
    );
    let after: Vec<_> = results.iter().filter(|r| r.started > left).collect();
    assert!(
        after.iter().any(|r| matches!(&r.result, Ok(h) if *h == a1)),
        "the others kept serving: {after:?}"
    );
    berth.wait_for(
        "service nodeapp has no health check: its 2 backends there leave",
        1,
    );
    let m = lab.spread(40);
    assert!(
        !m.contains_key(&b1) && m.contains_key(&a1),
        "host b still served: {m:?}"
    );

    // Back: its containers rejoin once its watcher has reconnected.
    let back = Instant::now();
    b.reconnect();
    let rejoined = lab.served_by(&b1, back, Duration::from_secs(10));
    println!("host b reconnected: its containers served again {rejoined:?} later");
    let st = berth.status();
    let eb = st.engines.iter().find(|e| e.name == "b").unwrap();
    assert!(eb.connected && !eb.lost && eb.containers == 2, "{eb:?}");
    // The other hosts' backends took their flows through full NAT (a source address of
    // berth's in the kernel, new flows counted on them)...
    let remote = |st: &lb_userspace::status::Status| -> Vec<(String, String, u64)> {
        st.services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.engine.as_deref().is_some_and(|e| e != "a"))
            .map(|b| (b.address.clone(), b.nat.clone(), b.new_flows))
            .collect()
    };
    let before = remote(&st);
    assert!(
        !before.is_empty(),
        "no backend of another host: {:?}",
        st.services
    );
    assert!(
        before.iter().all(|(_, nat, _)| nat.starts_with("fullnat")),
        "another host's backend not in full NAT: {before:?}"
    );
    assert!(
        before.iter().any(|(_, _, n)| *n > 0),
        "no full-NAT flow: {before:?}"
    );
    // ... and `mode = "dnat"` reaches them too (they route back through berth here).
    berth.reload(&config.replace("[service.docker]", "mode = \"dnat\"\n[service.docker]"));
    let m = lab.spread(90);
    println!("mode = \"dnat\": {m:?}");
    assert!(m.contains_key(&b1) && m.contains_key(&a1), "{m:?}");
    let after = remote(&berth.status());
    assert!(
        after.iter().all(|(_, nat, _)| nat == "dnat"),
        "another host's backend still in full NAT: {after:?}"
    );
}

/// The tutorial's Synapse config (image and check timing adjusted, as in
/// `e2e_docker_config.rs`), with a second server: Docker host `b`.
fn synapse_with(b: &EngineHost) -> String {
    format!(
        r#"{{
  "services": {{
    "nodeapp": {{
      "discovery": {{
        "method": "docker",
        "servers": [{{"name": "localhost", "host": "localhost"}},
                    {{"name": "b", "host": "{}", "port": {}}}],
        "container_port": 8000,
        "image_name": "{}"
      }},
      "haproxy": {{
        "port": 8080,
        "server_options": "check inter 200ms rise 1 fall 2",
        "listen": ["mode http", "option httpchk /", "http-check expect string Hello"]
      }}
    }}
  }},
  "haproxy": {{
    "reload_command": "service haproxy reload",
    "config_file_path": "/etc/haproxy/haproxy.cfg",
    "global": ["daemon"],
    "defaults": ["timeout connect 5000ms"]
  }}
}}"#,
        b.addr,
        b.port(),
        TEST.image
    )
}

#[test]
fn the_synapse_config_with_a_second_server_serves_both_hosts_and_a_crashed_host_leaves() {
    let lab = Lab::for_tests();
    let mut other = hosts(&[B]);
    let b = &mut other[0];
    let a1 = lab.run("bt-sa1", &[]).hostname();
    let b1 = b.run("bt-sb1", TEST.image, &[]).hostname();
    let ifaces = [TEST.uplink, TEST.bridge, b.link.as_str()];
    let berth = Berth::start_root_synapse("synapse-hosts", &synapse_with(b), &ifaces);
    berth.wait_for("(health check passing)", 2);
    let m = lab.spread(60);
    println!("synapse, two hosts: {m:?}");
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![a1.clone(), b1.clone()])
    );
    assert!(
        !berth.log_text().contains("is not this host"),
        "{}",
        berth.log_text()
    );

    // Host b crashes (dockerd and its containers killed) under load: its backend fails its
    // health check and leaves after fall x inter; nothing fails outside that window.
    let stop = Arc::new(AtomicBool::new(false));
    let load = timed_load(&lab.client, TEST.service, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let crashed = Instant::now();
    b.crash();
    let left = logged(
        &berth,
        "removed (health check failing",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load loop");
    let failed = results.iter().filter(|r| r.result.is_err()).count();
    println!(
        "host b crashed under load: out of the pool {:?} after the crash (check every 200 ms, \
         fall 2); {} requests, {failed} failed",
        left.duration_since(crashed),
        results.len(),
    );
    let outside = failed_outside(&results, crashed, left);
    assert!(outside.is_empty(), "failed outside the window: {outside:?}");
    assert!(left.duration_since(crashed) < Duration::from_secs(2));
    // Past the grace (10 s: a Synapse config takes berth's defaults) the engine is lost, and
    // berth says once what that means for the service: its checks decide.
    let judged = logged(
        &berth,
        "engine b unreachable for more than 10 s",
        Duration::from_secs(15),
    );
    println!(
        "host b judged lost {:?} after the crash",
        judged.duration_since(crashed)
    );
    berth.wait_for(
        "service nodeapp keeps its 1 backend there while the health checks pass",
        1,
    );

    // dockerd comes back (its killed containers do not); a new container there joins.
    b.start_dockerd();
    let t = Instant::now();
    let b2 = b.run("bt-sb2", TEST.image, &[]).hostname();
    let joined = lab.served_by(&b2, t, Duration::from_secs(10));
    println!("host b restarted: a new container there served {joined:?} after `docker run`");
    let m = lab.spread(60);
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), sorted(vec![a1, b2]));
}
