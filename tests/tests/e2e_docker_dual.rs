//! Docker e2e over IPv6 and IPv4 at once: the release story on a dual-stack Docker network
//! (`docker network create --ipv6 --subnet fdbe:...`; Debian's dockerd 20.10 needs no flag of
//! its own for a user-defined network, and turns on IPv6 forwarding itself). One configured
//! service on `0.0.0.0:8080` and `[::]:8080` (`listen6`) takes each family's backends from the
//! containers' own addresses on the network; a label service on `berth.port` listens on both
//! families as well.
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): the network's bridge and a veth
//! whose peer sits in a client namespace and plays the host's uplink, with an IPv4 and an IPv6
//! address. All traffic goes from that namespace to the containers the test started, of the
//! project's own image (`hello` listens on `[::]`, taking both families).

use std::time::{Duration, Instant};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, TEST_DUAL, TEST_DUAL_V6, build_hello_image, docker, stop_under_load_over},
    netns::remove_leftovers,
};

/// `TEST_DUAL.config()` made dual stack: the IPv6 half `nodeapp.ipv6` on `[::]:8080`.
fn dual_config() -> String {
    TEST_DUAL.config().replace(
        "listen = \"0.0.0.0:8080\"\n",
        "listen = \"0.0.0.0:8080\"\nlisten6 = \"[::]:8080\"\n",
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn the_release_story_over_ipv6_and_ipv4_at_once() {
    remove_leftovers();
    let lab = Lab::with_ipv6(&TEST_DUAL, Some(&TEST_DUAL_V6));
    let v4 = std::net::SocketAddr::V4(TEST_DUAL.service);
    let v6 = TEST_DUAL_V6.service();
    let h1 = lab.run("bt6-c1", &[]).hostname();
    let h2 = lab.run("bt6-c2", &[]).hostname();
    let config = dual_config();
    assert!(config.contains("listen6"), "{config}");
    let berth = Berth::start_root(
        "docker-dual",
        &config,
        &[TEST_DUAL.uplink, TEST_DUAL.bridge],
    );
    // Two containers, each a backend of both halves.
    berth.wait_for(" added (weight ", 4);

    // Both containers answer over each family.
    for (family, at) in [("IPv4", v4), ("IPv6", v6)] {
        let m = lab.spread_at(at, 100);
        println!("two containers over {family} ({at}): {m:?}");
        assert_eq!(
            m.keys().cloned().collect::<Vec<_>>(),
            sorted(vec![h1.clone(), h2.clone()]),
            "{family}"
        );
    }

    // A third container joins within a second of its start, on both families. `docker run -d`
    // returns once the container has started, which takes Docker itself 1-1.5 s on this
    // 2-core machine while builds run (measured with either family's network alike): the
    // second is counted from there, and the time from the call is printed beside it.
    let called = Instant::now();
    let h3 = lab.run("bt6-c3", &[]).hostname();
    let started = Instant::now();
    let limit = Duration::from_secs(5);
    let on4 = lab.served_by_at(v4, &h3, started, limit);
    let on6 = lab.served_by_at(v6, &h3, started, limit);
    let (j4, j6) = (on4.join().expect("IPv4"), on6.join().expect("IPv6"));
    println!(
        "third container served after `docker run` returned: IPv4 {j4:?}, IPv6 {j6:?} \
         (`docker run` itself took {:?})",
        started - called
    );
    assert!(j4 < Duration::from_secs(1), "IPv4 took {j4:?}");
    assert!(j6 < Duration::from_secs(1), "IPv6 took {j6:?}");

    // `docker stop` under a load loop over each family: no failed request on either, and no
    // answer from the stopped container once stopped.
    let n = stop_under_load_over(&lab.client, &[v4, v6], &h1, || {
        docker(&["stop", "bt6-c1"]);
    });
    println!("{n} requests over both families around the stop");
    for at in [v4, v6] {
        let m = lab.spread_at(at, 40);
        assert_eq!(
            m.keys().cloned().collect::<Vec<_>>(),
            sorted(vec![h2.clone(), h3.clone()]),
            "{at}"
        );
    }

    // `berth status`: the IPv6 half with its containers found behind their IPv6 addresses.
    let st = berth.status();
    let six = st
        .services
        .iter()
        .find(|s| s.name == "nodeapp.ipv6")
        .unwrap_or_else(|| panic!("no IPv6 half: {:?}", st.services));
    assert_eq!(six.listen, "[::]:8080");
    let names: Vec<_> = six
        .backends
        .iter()
        .filter_map(|b| b.container.clone())
        .collect();
    assert_eq!(sorted(names), ["bt6-c2", "bt6-c3"], "{six:?}");
    assert!(
        six.backends
            .iter()
            .all(|b| b.address.starts_with("[fdbe:7e57:251::") && b.in_pool && b.packets > 0),
        "{six:?}"
    );
    drop(berth);
}

#[test]
fn a_label_service_listens_on_both_families() {
    remove_leftovers();
    let lab = Lab::with_ipv6(&TEST_DUAL, Some(&TEST_DUAL_V6));
    // An image of its own: the container must not match the configured selector.
    build_hello_image("berth-test/labelled", false);
    let labels = [
        "--label",
        "berth.port=9090",
        "--label",
        "berth.target-port=8000",
    ];
    let mut args = vec![
        "run",
        "-d",
        "--name",
        "bt6-l1",
        "--label",
        TEST_DUAL.label,
        "--network",
        TEST_DUAL.network,
    ];
    args.extend(labels);
    args.push("berth-test/labelled");
    let l1 = docker(&args)[..12].to_owned();
    let config = "[docker]\nenabled = true\nlabel_services = true\n";
    let berth = Berth::start_root(
        "docker-dual-labels",
        config,
        &[TEST_DUAL.uplink, TEST_DUAL.bridge],
    );
    berth.wait_for(" added (weight ", 2);
    let mut v4 = std::net::SocketAddr::V4(TEST_DUAL.service);
    let mut v6 = TEST_DUAL_V6.service();
    v4.set_port(9090);
    v6.set_port(9090);
    for at in [v4, v6] {
        let m = lab.spread_at(at, 20);
        assert_eq!(m.keys().collect::<Vec<_>>(), [&l1], "{at}");
    }
    let st = berth.status();
    let listens: Vec<_> = st
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.listen.as_str()))
        .collect();
    assert_eq!(
        listens,
        [("tcp-9090", "0.0.0.0:9090"), ("tcp-9090.ipv6", "[::]:9090")]
    );
    drop(berth);
}

#[test]
fn berths_own_health_check_judges_each_family_at_its_own_address() {
    remove_leftovers();
    let lab = Lab::with_ipv6(&TEST_DUAL, Some(&TEST_DUAL_V6));
    let h1 = lab.run("bt6-h1", &[]).hostname();
    let h2 = lab.run("bt6-h2", &[]).hostname();
    let config = format!(
        "{}{}",
        dual_config(),
        "[service.health]\ntype = \"http\"\nexpect_string = \"Hello\"\n\
         interval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 2\n"
    );
    let berth = Berth::start_root(
        "docker-dual-health",
        &config,
        &[TEST_DUAL.uplink, TEST_DUAL.bridge],
    );
    // Each backend of each half enters after its first passing check, made to its address.
    berth.wait_for("(health check passing)", 4);
    let log = berth.log_text();
    assert!(
        log.contains("backend [fdbe:7e57:251::") && log.contains("(health check passing)"),
        "{log}"
    );
    let v4 = std::net::SocketAddr::V4(TEST_DUAL.service);
    let v6 = TEST_DUAL_V6.service();
    for at in [v4, v6] {
        assert_eq!(lab.spread_at(at, 40).len(), 2, "{at}");
    }
    // A hung container fails its checks over both families and leaves both pools.
    docker(&["exec", "bt6-h1", "/hello", "sick", "hang"]);
    berth.wait_for("removed (health check failing: timed out)", 2);
    let log = berth.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("nodeapp.ipv6: backend [fdbe:7e57:251::")
                && l.contains("removed (health check failing: timed out)")),
        "{log}"
    );
    for at in [v4, v6] {
        let m = lab.spread_at(at, 40);
        assert_eq!(m.keys().collect::<Vec<_>>(), [&h2], "{at}");
    }
    // Answering again: back in both.
    docker(&["exec", "bt6-h1", "/hello", "sick", "no"]);
    berth.wait_for("(health check passing)", 6);
    for at in [v4, v6] {
        assert!(lab.spread_at(at, 60).contains_key(&h1), "{at}");
    }
    drop(berth);
}

#[test]
fn the_bridge_of_an_ipv6_only_service_is_attached_when_its_containers_serve() {
    remove_leftovers();
    let lab = Lab::with_ipv6(&TEST_DUAL, Some(&TEST_DUAL_V6));
    let h1 = lab.run("bt6-b1", &[]).hostname();
    // An IPv6 service alone: the network's bridge backs no IPv4 backend, and berth is told
    // only of the uplink. It must find the bridge by the containers' IPv6 addresses.
    let config = TEST_DUAL
        .config()
        .replace("listen = \"0.0.0.0:8080\"", "listen = \"[::]:8080\"");
    let berth = Berth::start_root("docker-dual-bridge", &config, &[TEST_DUAL.uplink]);
    berth.wait_for(" added (weight ", 1);
    berth.wait_for(
        &format!(
            "attached to {} (bridge of a Docker network with backends)",
            TEST_DUAL.bridge
        ),
        1,
    );
    let m = lab.spread_at(TEST_DUAL_V6.service(), 30);
    assert_eq!(m.keys().collect::<Vec<_>>(), [&h1]);
    drop(berth);
}

/// `docker run -d` of the labelled image as `name` on the dual-stack network, for `berth.port`
/// `port`; its short id (the hostname it answers with).
fn run_labelled(name: &str, port: u16) -> String {
    let label = format!("berth.port={port}");
    docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--label",
        TEST_DUAL.label,
        "--network",
        TEST_DUAL.network,
        "--label",
        &label,
        "--label",
        "berth.target-port=8000",
        "berth-test/labelled",
    ])[..12]
        .to_owned()
}

#[test]
fn label_services_beyond_max_services_are_left_out_whole_and_named() {
    remove_leftovers();
    let lab = Lab::with_ipv6(&TEST_DUAL, Some(&TEST_DUAL_V6));
    build_hello_image("berth-test/labelled", false);
    let l1 = run_labelled("bt6-m1", 9090);
    // Room for two services: tcp-9090 and its IPv6 half.
    let config = "[dataplane]\nmax_services = 2\n[docker]\nenabled = true\nlabel_services = true\n";
    let berth = Berth::start_root(
        "docker-dual-max",
        config,
        &[TEST_DUAL.uplink, TEST_DUAL.bridge],
    );
    berth.wait_for(" added (weight ", 2);
    // A second label service finds no room: both of its halves are named with the limit, and
    // neither is written (no id taken, no failed write retried every second).
    let l2 = run_labelled("bt6-m2", 9191);
    for name in ["tcp-9191", "tcp-9191.ipv6"] {
        berth.wait_for(&format!("service {name} (tcp "), 1);
    }
    let at = |port: u16| {
        let mut v4 = std::net::SocketAddr::V4(TEST_DUAL.service);
        let mut v6 = TEST_DUAL_V6.service();
        v4.set_port(port);
        v6.set_port(port);
        [v4, v6]
    };
    for a in at(9090) {
        assert_eq!(
            lab.spread_at(a, 10).keys().collect::<Vec<_>>(),
            [&l1],
            "{a}"
        );
    }
    let names = |b: &Berth| {
        b.status()
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&berth), ["tcp-9090", "tcp-9090.ipv6"]);
    let log = berth.log_text();
    assert!(
        log.contains(
            "service tcp-9191.ipv6 (tcp [::]:9191, from container labels) is not served: \
             dataplane.max_services = 2 services are served already; raise it"
        ),
        "{log}"
    );
    assert!(!log.contains("no free service id"), "{log}");
    // The served service's container goes: the waiting one takes its place, both halves.
    docker(&["rm", "-f", "bt6-m1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while names(&berth) != ["tcp-9191", "tcp-9191.ipv6"] {
        assert!(Instant::now() < deadline, "{:?}", names(&berth));
        std::thread::sleep(Duration::from_millis(50));
    }
    berth.wait_for(" added (weight ", 4);
    for a in at(9191) {
        assert_eq!(
            lab.spread_at(a, 10).keys().collect::<Vec<_>>(),
            [&l2],
            "{a}"
        );
    }
    drop(berth);
}
