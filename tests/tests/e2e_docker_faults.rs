//! Docker e2e, faults under load: a killed backend, an invalid config reloaded, the host's
//! interface flapping, a hung backend; requests may fail only inside each fault's window.
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): a Docker network's bridge
//! (`bte-dock0`) and a veth (`bte-dh0`) whose peer sits in a client namespace and plays the
//! host's uplink. All traffic goes from that namespace to the containers the test started, of the
//! project's own image (a static `hello` HTTP server answering `Hello from <hostname>`, with an
//! exec-form HEALTHCHECK).

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, Request, TEST, TEST_CLIENT_IMAGE, docker},
    netns::sh,
    servers::http_get,
};

#[test]
fn faults_under_load_fail_requests_only_inside_their_window() {
    let lab = Lab::for_tests();
    lab.run("bt-f1", &[]);
    lab.run("bt-f2", &[]);
    let h3 = lab.run("bt-f3", &[]).hostname();
    // A container asking, by labels, for a service of its own on port 9090: with a config file
    // berth does not take services from labels, so it gets nothing.
    docker(&["tag", TEST.image, TEST_CLIENT_IMAGE]);
    docker(&[
        "run",
        "-d",
        "--name",
        "bt-fl",
        "--label",
        TEST.label,
        "--network",
        TEST.network,
        "--label",
        "berth.port=9090",
        "--label",
        "berth.target-port=8000",
        TEST_CLIENT_IMAGE,
    ]);
    let mut berth = Berth::start_root("docker-faults", &TEST.config(), &[TEST.uplink, TEST.bridge]);
    berth.wait_for(" added (weight ", 3);
    let stolen = lab
        .client
        .run(|| http_get(SocketAddrV4::new(*TEST.service.ip(), 9090)));
    assert!(stolen.is_err(), "a label took port 9090: {stolen:?}");
    let names: Vec<_> = berth
        .status()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["nodeapp".to_owned()]);

    let stop = Arc::new(AtomicBool::new(false));
    let loaded = Instant::now();
    let load = lab.load_loop(stop.clone());
    let pause = || std::thread::sleep(Duration::from_millis(500));
    let mut windows: Vec<(&str, Instant, Instant)> = Vec::new();
    pause();

    // A request may fail if it was under way inside a fault's window: one that began before
    // the fault ended may fail after it, by its timeout (2 s).
    //
    // A backend killed (SIGKILL, no grace): requests in flight to it may fail until berth has
    // taken it out at Docker's kill event.
    let t = Instant::now();
    docker(&["kill", "bt-f1"]);
    berth.wait_for("removed (docker: container bt-f1", 1);
    windows.push((
        "backend killed",
        t,
        Instant::now() + Duration::from_millis(200),
    ));
    println!(
        "killed backend out of the pool {:?} after `docker kill`",
        t.elapsed()
    );
    pause();

    // An invalid config reloaded: reported, the running one kept, nothing fails.
    let good = std::fs::read_to_string(&berth.config).unwrap();
    std::fs::write(
        &berth.config,
        "[[service]]\nname = \"nodeapp\"\nlisten = 8080\n",
    )
    .unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(berth.pid(), libc::SIGHUP) };
    berth.wait_for("config reload failed, keeping the running config", 1);
    std::fs::write(&berth.config, good).unwrap();
    pause();

    // The host's interface flapped: nothing gets through while it is down; afterwards traffic
    // flows again without a restart (the attachment survives the flap).
    let t = Instant::now();
    sh(&["ip", "link", "set", TEST.uplink, "down"]);
    std::thread::sleep(Duration::from_millis(300));
    sh(&["ip", "link", "set", TEST.uplink, "up"]);
    sh(&["ip", "addr", "replace", "10.41.0.1/24", "dev", TEST.uplink]);
    windows.push(("interface down", t, Instant::now() + Duration::from_secs(2)));
    pause();
    pause();

    // A backend that hangs: Docker's own HEALTHCHECK (interval 1 s, retries 2) marks it
    // unhealthy and berth takes it out; requests it swallowed meanwhile time out (2 s).
    let t = Instant::now();
    docker(&["exec", "bt-f2", "/hello", "sick", "hang"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !berth
        .log_text()
        .contains("(docker: container bt-f2 unhealthy)")
    {
        assert!(
            Instant::now() < deadline,
            "hung backend never left: {}",
            berth.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Requests it swallowed began before it was taken out, so their window is its own.
    windows.push((
        "backend hung",
        t,
        Instant::now() + Duration::from_millis(200),
    ));
    println!(
        "hung backend out of the pool {:?} after it hung",
        t.elapsed()
    );
    pause();
    pause();
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();

    let inside = |r: &Request| windows.iter().find(|(_, a, b)| r.overlaps(*a, *b));
    let mut per_window: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut outside = Vec::new();
    for r in &results {
        match inside(r) {
            Some((name, _, _)) => {
                let e = per_window.entry(name).or_default();
                e.0 += 1;
                e.1 += usize::from(r.result.is_err());
            }
            None if r.result.is_err() => outside.push(r),
            None => {}
        }
    }
    // Times from the load's start, in ms, to read a failure against the windows.
    let from = |at: Instant| (at - loaded).as_millis();
    let windows_ms: Vec<_> = windows
        .iter()
        .map(|(name, a, b)| (name, from(*a), from(*b)))
        .collect();
    let outside: Vec<_> = outside
        .iter()
        .map(|r| (from(r.sent), from(r.done), &r.result))
        .collect();
    println!(
        "faults under load: {} requests, {} failed outside the fault windows; per window \
         (requests, failed): {per_window:?}",
        results.len(),
        outside.len()
    );
    assert!(
        outside.is_empty(),
        "failed outside the fault windows (sent ms, done ms, what): {outside:?}; windows (ms): \
         {windows_ms:?}"
    );
    // Afterwards only the healthy backend answers, and berth is still the same process.
    let m = lab.spread(20);
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        vec![h3.clone()],
        "{m:?}"
    );
    let (status, _) = berth.stop();
    assert!(status.success(), "{}", berth.log_text());
}
