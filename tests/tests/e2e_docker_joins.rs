//! Docker e2e, joins: containers whose service listens only 1.5 s after they start
//! (`HELLO_LISTEN_AFTER_MS`), joining the pool and restarting (`docker restart`) under a load
//! loop, and one listening only after the probe's timeout (said once in berth's log, pooled when
//! it listens). With berth's readiness probe no request is refused; with the probe turned off
//! (`readiness_probe = false`) the same joins are refused requests, so the test can tell.
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): a Docker network's bridge and a veth
//! whose peer sits in a client namespace and plays the host's uplink. All traffic goes from that
//! namespace to the containers the test started, of the project's own image.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, TEST, docker},
};

/// How long the late containers' service takes to listen after they start.
const LISTEN_AFTER_MS: u64 = 1500;
/// The probe's timeout in these tests (`docker.readiness_timeout_ms`), and how long the slow
/// container's service takes to listen: longer than that.
const PROBE_TIMEOUT_MS: u64 = 3000;
const SLOW_LISTEN_AFTER_MS: u64 = 4500;

/// What one run of the story saw.
struct Seen {
    requests: usize,
    /// Failed requests: (what failed, which phase).
    failed: Vec<(String, &'static str)>,
    /// From `docker run` (or `docker restart` returning) to the first answer of the container.
    joins: Vec<(&'static str, Duration)>,
    /// The probe's own measure, from berth's log: how long after it saw a container start a
    /// connect to it succeeded.
    probe_after: Vec<f64>,
    /// berth's log.
    log: String,
}

/// One container serving from the start, then under a load loop: three containers listening
/// late join one after the other, one of them is restarted, a container listening at once joins,
/// and one listening only after the probe's timeout.
fn joins_under_load(tag: &str, config: &str) -> Seen {
    let lab = Lab::for_tests();
    lab.run("bt-j0", &[]);
    let berth = Berth::start_root(tag, config, &[TEST.uplink, TEST.bridge]);
    berth.wait_for(" added (weight ", 1);

    let stop = Arc::new(AtomicBool::new(false));
    let load = lab.load_loop(stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let late = format!("HELLO_LISTEN_AFTER_MS={LISTEN_AFTER_MS}");
    let mut phases: Vec<(Instant, &'static str)> = Vec::new();
    let mut joins = Vec::new();
    let mut late_hosts = Vec::new();
    for name in ["bt-j1", "bt-j2", "bt-j3"] {
        let started = Instant::now();
        phases.push((started, "late join"));
        let host = lab.run(name, &["-e", &late]).hostname();
        joins.push((
            "late join",
            lab.served_by(&host, started, Duration::from_secs(15)),
        ));
        late_hosts.push(host);
    }
    // `docker restart` returns once the container runs again: its service is 1.5 s away.
    phases.push((Instant::now(), "docker restart"));
    docker(&["restart", "bt-j1"]);
    let restarted = Instant::now();
    joins.push((
        "restart",
        lab.served_by(&late_hosts[0], restarted, Duration::from_secs(15)),
    ));
    let started = Instant::now();
    phases.push((started, "join"));
    let host = lab.run("bt-j4", &[]).hostname();
    joins.push((
        "join",
        lab.served_by(&host, started, Duration::from_secs(15)),
    ));
    let started = Instant::now();
    phases.push((started, "slow join"));
    let slow = format!("HELLO_LISTEN_AFTER_MS={SLOW_LISTEN_AFTER_MS}");
    // Without the image's HEALTHCHECK, which would call it unhealthy before it listens (and
    // berth would take it out for that reason instead).
    let host = lab
        .run("bt-j5", &["-e", &slow, "--no-healthcheck"])
        .hostname();
    joins.push((
        "slow join",
        lab.served_by(&host, started, Duration::from_secs(15)),
    ));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load loop");

    let phase_of = |at: Instant| {
        phases
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .map_or("before", |(_, p)| *p)
    };
    let failed: Vec<_> = results
        .iter()
        .filter_map(|r| {
            r.result
                .as_ref()
                .err()
                .map(|e| (e.clone(), phase_of(r.sent)))
        })
        .collect();
    let log = berth.log_text();
    let probe_after = log
        .split("accepting connections after ")
        .skip(1)
        .filter_map(|rest| rest.split(' ').next()?.parse::<f64>().ok())
        .collect();
    Seen {
        requests: results.len(),
        failed,
        joins,
        probe_after,
        log,
    }
}

/// `TEST.config()` with these settings added to its `[docker]` table.
fn config(docker: &str) -> String {
    let c = TEST
        .config()
        .replace("[docker]\n", &format!("[docker]\n{docker}"));
    assert!(c.contains(docker), "{c}");
    c
}

fn report(what: &str, seen: &Seen) {
    println!(
        "{what}: {} requests, {} failed; joins (from docker run / restart to first answer): {:?}; \
         probe passed after (s): {:?}",
        seen.requests,
        seen.failed.len(),
        seen.joins,
        seen.probe_after
    );
    let mut by_phase = std::collections::BTreeMap::new();
    for (_, phase) in &seen.failed {
        *by_phase.entry(*phase).or_insert(0) += 1;
    }
    if !by_phase.is_empty() {
        println!("{what}: failed requests by phase: {by_phase:?}");
    }
}

#[test]
fn late_listeners_join_and_restart_under_load_without_a_refused_request() {
    let seen = joins_under_load(
        "docker-joins",
        &config(&format!("readiness_timeout_ms = {PROBE_TIMEOUT_MS}\n")),
    );
    report("readiness probe on", &seen);
    assert!(
        seen.requests > 500,
        "the load loop barely ran: {}",
        seen.requests
    );
    assert!(seen.failed.is_empty(), "failed requests: {:?}", seen.failed);
    // Each container was probed: the one serving from the start, four late starts (three joins
    // and a restart), one listening at once and the slow one.
    assert_eq!(seen.probe_after.len(), 7, "{:?}", seen.probe_after);
    let late = LISTEN_AFTER_MS as f64 / 1000.0;
    for after in &seen.probe_after[1..5] {
        assert!(*after >= late - 0.3, "pooled before it listened: {after} s");
    }
    // The slow one: said once, when the timeout passed, and pooled within a second (probes
    // every second from then on) of listening.
    let slow = SLOW_LISTEN_AFTER_MS as f64 / 1000.0;
    let after = seen.probe_after[6];
    assert!((slow - 0.3..slow + 1.3).contains(&after), "{after} s");
    let said: Vec<_> = seen
        .log
        .lines()
        .filter(|l| l.contains("nothing accepts connections"))
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("container bt-j5:") && said[0].contains("kept out of service nodeapp's"),
        "{said:?}"
    );
}

#[test]
fn without_the_probe_late_listeners_are_refused_requests() {
    let seen = joins_under_load(
        "docker-joins-off",
        &config(&format!(
            "readiness_probe = false\nreadiness_timeout_ms = {PROBE_TIMEOUT_MS}\n"
        )),
    );
    report("readiness probe off", &seen);
    // Each late join and the restart pooled a container that refused connections.
    assert!(
        seen.failed.iter().all(|(e, _)| e.contains("refused")),
        "{:?}",
        seen.failed
    );
    for phase in ["late join", "docker restart", "slow join"] {
        assert!(
            seen.failed.iter().any(|(_, p)| *p == phase),
            "no refused request during {phase}: {:?}",
            seen.failed
        );
    }
    assert!(seen.probe_after.is_empty(), "probed while turned off");
    assert!(!seen.log.contains("nothing accepts connections"));
}
