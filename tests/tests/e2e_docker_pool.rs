//! Docker e2e, the pool: containers join and leave it by themselves as they start, stop and fail
//! Docker's own HEALTHCHECK or berth's own health check.
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): a Docker network's bridge
//! (`bte-dock0`) and a veth (`bte-dh0`) whose peer sits in a client namespace and plays the
//! host's uplink. All traffic goes from that namespace to the containers the test started, of the
//! project's own image (a static `hello` HTTP server answering `Hello from <hostname>`, with an
//! exec-form HEALTHCHECK).

use std::time::{Duration, Instant};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, TEST, docker, stop_under_load},
    servers::http_get,
};

#[test]
fn containers_join_and_leave_the_pool_by_themselves() {
    let lab = Lab::for_tests();
    let h1 = lab.run("bt-c1", &["-p", "8000"]).hostname();
    let h2 = lab.run("bt-c2", &["-p", "8000"]).hostname();
    let berth = Berth::start_root("docker", &TEST.config(), &[TEST.uplink, TEST.bridge]);
    berth.wait_for(" added (weight ", 2);

    // Both containers answer, through Docker's FORWARD DROP, without the published ports.
    let m = lab.spread(100);
    println!("two containers: {m:?}");
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), {
        let mut v = vec![h1.clone(), h2.clone()];
        v.sort();
        v
    });

    // A third container, no published port, joins within a second of its start: counted from
    // the return of `docker run -d`, which returns once the container has started (Docker's own
    // start, 0.5-1.5 s here, is printed beside it; it grows when the machine is busy).
    let called = Instant::now();
    let h3 = lab.run("bt-c3", &[]).hostname();
    let started = Instant::now();
    let joined = lab.served_by(&h3, started, Duration::from_secs(5));
    println!(
        "third container served {joined:?} after `docker run` returned (`docker run` itself \
         took {:?})",
        started - called
    );
    assert!(joined < Duration::from_secs(1), "took {joined:?}");

    // `docker stop` under load: no failed request, and no answer from it once stopped.
    stop_under_load(&lab.client, lab.layout.service, "bt-c1", &h1);

    // A container whose own HEALTHCHECK fails (server answers 500) leaves the pool.
    docker(&["exec", "bt-c2", "/hello", "sick", "500"]);
    let sick = Instant::now();
    let left = lab.client.run({
        let h2 = h2.clone();
        move || {
            let mut clean = 0;
            loop {
                match http_get(TEST.service) {
                    Ok((200, b)) if b != format!("Hello from {h2}") => clean += 1,
                    _ => clean = 0,
                }
                if clean >= 30 {
                    return sick.elapsed();
                }
                assert!(
                    sick.elapsed() < Duration::from_secs(10),
                    "sick container kept traffic"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    println!(
        "unhealthy container out of the pool {left:?} after it started failing (Docker: interval 1 s, retries 2)"
    );
    let m = lab.spread(50);
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec![h3.clone()]);

    // Healthy again: back in the pool.
    docker(&["exec", "bt-c2", "/hello", "sick", "no"]);
    let back = lab.served_by(&h2, Instant::now(), Duration::from_secs(10));
    println!("recovered container back in the pool after {back:?}");

    // `berth status` shows the service, its containers, their health and traffic.
    let st = berth.status();
    let svc = &st.services[0];
    assert_eq!(
        (svc.name.as_str(), svc.listen.as_str()),
        ("nodeapp", "0.0.0.0:8080")
    );
    let names: Vec<_> = svc
        .backends
        .iter()
        .filter_map(|b| b.container.clone())
        .collect();
    assert!(
        names.contains(&"bt-c2".to_owned()) && names.contains(&"bt-c3".to_owned()),
        "{svc:?}"
    );
    assert!(
        svc.backends.iter().all(|b| b.in_pool && b.packets > 0),
        "{svc:?}"
    );
    drop(berth);
}

/// `TEST.config()` with berth's own fast HTTP check.
fn health_config() -> String {
    format!(
        "{}{}",
        TEST.config(),
        r#"[service.health]
type = "http"
expect_string = "Hello"
interval_ms = 200
timeout_ms = 150
rise = 1
fall = 2
"#
    )
}

#[test]
fn hung_container_leaves_after_fall_times_interval_of_berths_own_check() {
    let lab = Lab::for_tests();
    let h1 = lab.run("bt-h1", &[]).hostname();
    let h2 = lab.run("bt-h2", &[]).hostname();
    let berth = Berth::start_root(
        "docker-health",
        &health_config(),
        &[TEST.uplink, TEST.bridge],
    );
    // New backends enter after their first passing check (rise = 1).
    berth.wait_for("(health check passing)", 2);
    assert_eq!(lab.spread(40).len(), 2);

    docker(&["exec", "bt-h1", "/hello", "sick", "hang"]);
    let hung = Instant::now();
    berth.wait_for("removed (health check failing: timed out)", 1);
    let removed = hung.elapsed();
    println!(
        "hung container removed {removed:?} after it stopped answering (interval 200 ms, timeout 150 ms, fall 2)"
    );
    assert!(
        removed < Duration::from_millis(2 * 200 + 150 + 400),
        "{removed:?}"
    );
    let m = lab.spread(40);
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec![h2.clone()]);

    docker(&["exec", "bt-h1", "/hello", "sick", "no"]);
    berth.wait_for("(health check passing)", 3);
    let m = lab.spread(60);
    assert!(m.contains_key(&h1), "recovered container not back: {m:?}");

    // Answering 500 instead: out after fall x interval too, with the status as the reason.
    docker(&["exec", "bt-h1", "/hello", "sick", "500"]);
    let failing = Instant::now();
    berth.wait_for(
        "removed (health check failing: unexpected HTTP status 500)",
        1,
    );
    let removed = failing.elapsed();
    println!("container answering 500 removed {removed:?} after it started failing");
    assert!(
        removed < Duration::from_millis(2 * 200 + 400),
        "{removed:?}"
    );
    assert_eq!(lab.spread(30).keys().cloned().collect::<Vec<_>>(), vec![h2]);
}
