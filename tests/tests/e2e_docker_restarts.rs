//! Docker e2e, restarts: dockerd restarted or killed under berth, and berth killed (SIGKILL) and
//! restarted under load, adopting its pinned dataplane.
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): a Docker network's bridge
//! (`bte-dock0`) and a veth (`bte-dh0`) whose peer sits in a client namespace and plays the
//! host's uplink. All traffic goes from that namespace to the containers the test started, of the
//! project's own image (a static `hello` HTTP server answering `Hello from <hostname>`, with an
//! exec-form HEALTHCHECK).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{
    daemon::Berth,
    docker::{DockerdBack, Lab, TEST, signal_dockerd, start_dockerd, stop_dockerd},
    servers::http_get,
};

#[test]
fn dockerd_restart_is_survived_and_resynced() {
    let lab = Lab::for_tests();
    let _back = DockerdBack;
    let h1 = lab.run("bt-r1", &["--restart", "always"]).hostname();
    let h2 = lab.run("bt-r2", &["--restart", "always"]).hostname();
    let mut berth = Berth::start_root(
        "docker-restart",
        &TEST.config(),
        &[TEST.uplink, TEST.bridge],
    );
    berth.wait_for(" added (weight ", 2);
    assert_eq!(lab.spread(40).len(), 2);

    let t = Instant::now();
    stop_dockerd();
    berth.wait_for("reconnecting (and resyncing) with backoff", 1);
    start_dockerd();
    // A second session with a fresh listing, without a restart of berth.
    berth.wait_for("docker: connected", 2);
    println!("berth reconnected {:?} after the stop began", t.elapsed());
    // The containers come back (restart policy), possibly on new addresses; berth must find
    // them again through a fresh listing.
    let served = lab.client.run({
        let (h1, h2) = (h1.clone(), h2.clone());
        move || {
            let mut seen = std::collections::BTreeSet::new();
            loop {
                if let Ok((200, b)) = http_get(TEST.service) {
                    seen.insert(b.trim_start_matches("Hello from ").to_owned());
                }
                if seen.contains(&h1) && seen.contains(&h2) {
                    return t.elapsed();
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "not resynced: saw {seen:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    println!("dockerd restarted: both containers served again {served:?} after the stop began");

    // dockerd killed (SIGKILL) under a load loop. Without live-restore the restarted dockerd
    // restarts every container, so requests fail until they are back: berth must then serve
    // them again by itself, and nothing may fail after that.
    let stop = Arc::new(AtomicBool::new(false));
    let load = lab.load_loop(stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    signal_dockerd(libc::SIGKILL);
    start_dockerd();
    let back = lab.client.run({
        let (h1, h2) = (h1.clone(), h2.clone());
        move || {
            let mut seen = std::collections::BTreeSet::new();
            while !(seen.contains(&h1) && seen.contains(&h2)) {
                if let Ok((200, b)) = http_get(TEST.service) {
                    seen.insert(b.trim_start_matches("Hello from ").to_owned());
                }
                assert!(t.elapsed() < Duration::from_secs(60), "not back: {seen:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Instant::now()
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();
    // A request sent before the containers were back may fail after, by its timeout.
    let failed_in = results
        .iter()
        .filter(|r| r.sent <= back && r.result.is_err())
        .count();
    let after: Vec<_> = results
        .iter()
        .filter(|r| r.sent > back && r.result.is_err())
        .collect();
    println!(
        "dockerd killed under load: both containers served again {:?} after the kill; {} \
         requests, {failed_in} failed while the containers restarted, {} after",
        back - t,
        results.len(),
        after.len()
    );
    assert!(
        after.is_empty(),
        "failed after the containers were back: {after:?}"
    );
    let (status, _) = berth.stop();
    assert!(
        status.success(),
        "berth did not survive the dockerd restart: {}",
        berth.log_text()
    );
}

#[test]
fn sigkill_under_load_loses_no_connection_and_fails_no_request() {
    use std::io::{Read as _, Write as _};
    let lab = Lab::for_tests();
    let h1 = lab.run("bt-k1", &[]).hostname();
    let h2 = lab.run("bt-k2", &[]).hostname();
    let mut berth = Berth::start_root("docker-kill", &TEST.config(), &[TEST.uplink, TEST.bridge]);
    berth.wait_for(" added (weight ", 2);
    assert_eq!(lab.spread(20).len(), 2);

    // A connection established before the kill, finished after the restart.
    let mut open = lab.client.run(|| {
        let mut s = std::net::TcpStream::connect(TEST.service).expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n").expect("write");
        s
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = lab.load_loop(stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let status = berth.kill();
    let killed = Instant::now();
    println!("berth: {status}");
    // A container started while no berth runs: the restarted one finds it in its first listing.
    let h3 = lab.run("bt-k3", &[]).hostname();
    std::thread::sleep(Duration::from_millis(1000));
    let tables = berth.log_text().matches("maglev table updated").count();
    let restarted = Instant::now();
    berth.respawn();
    berth.wait_for("docker: connected", 2);
    let ready = Instant::now();
    println!(
        "restarted berth ready {:?} after the restart began",
        ready - restarted
    );
    // Counted from the restarted berth's first listing: how long its programs take to load
    // (seconds on a busy machine) is not what this asks.
    let joined = lab.served_by(&h3, ready, Duration::from_secs(5));
    println!(
        "container started while berth was down served {joined:?} after the restarted berth \
         listed Docker's containers ({:?} after the restart began)",
        ready - restarted + joined
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();

    open.write_all(b"\r\n").expect("finish the request");
    let mut resp = String::new();
    open.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    let failed: Vec<_> = results.iter().filter(|r| r.result.is_err()).collect();
    let while_dead = results
        .iter()
        .filter(|r| r.sent > killed && r.done < restarted)
        .count();
    let who: std::collections::BTreeSet<_> = results
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    println!(
        "SIGKILL under load: {} requests ({} while no berth ran), {} failed; the connection \
         opened before the kill was answered after the restart",
        results.len(),
        while_dead,
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(while_dead > 20, "the load loop barely ran: {while_dead}");
    assert!(who.contains(&h1) && who.contains(&h2), "{who:?}");
    let log = berth.log_text();
    assert!(
        log.contains("service nodeapp: taken over from the pinned dataplane"),
        "{log}"
    );
    // Adopted as it was, then one update for the new container.
    assert_eq!(
        log.matches("maglev table updated").count(),
        tables + 1,
        "{log}"
    );
}
