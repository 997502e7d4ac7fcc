//! Docker e2e, the other ways to say what to serve: containers' own labels (no config file) and
//! an existing Synapse config.
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): a Docker network's bridge
//! (`bte-dock0`) and a veth (`bte-dh0`) whose peer sits in a client namespace and plays the
//! host's uplink. All traffic goes from that namespace to the containers the test started, of the
//! project's own image (a static `hello` HTTP server answering `Hello from <hostname>`, with an
//! exec-form HEALTHCHECK).

use berth_tests::{
    daemon::Berth,
    docker::{Lab, TEST, docker},
};

#[test]
fn without_a_config_file_containers_are_served_by_their_labels() {
    let lab = Lab::for_tests();
    let labels = [
        "--label",
        "berth.port=8080",
        "--label",
        "berth.target-port=8000",
        "--label",
        "berth.health=http",
        "--label",
        "berth.health.expect-string=Hello",
        "--label",
        "berth.health.interval-ms=200",
    ];
    let h1 = lab.run("bt-l1", &labels).hostname();
    let h2 = lab.run("bt-l2", &labels).hostname();
    // A label asking for a port a host process listens on is refused: take one that is.
    let host_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = host_port.local_addr().unwrap().port().to_string();
    lab.run(
        "bt-l3",
        &[
            "--label",
            &format!("berth.port={taken}"),
            "--label",
            "berth.target-port=8000",
        ],
    );
    // Only the uplink is named: berth attaches to the containers' bridge by itself.
    let berth = Berth::start_root_without_config("docker-labels", &[TEST.uplink]);
    berth.wait_for(
        &format!(
            "attached to {} (bridge of a Docker network with backends)",
            TEST.bridge
        ),
        1,
    );
    // Health-checked by berth through their labels: they enter after passing checks.
    berth.wait_for("(health check passing)", 2);
    let m = lab.spread(60);
    println!("label service tcp-8080: {m:?}");
    let mut want = vec![h1, h2];
    want.sort();
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), want);
    berth.wait_for(
        &format!("container bt-l3: tcp port {taken} is in use by a process on this host"),
        1,
    );
    let st = berth.status();
    assert_eq!(st.services.len(), 1, "{st:?}");
    assert_eq!(st.services[0].name, "tcp-8080");
}

/// The seed's Synapse config, image name adjusted to the test image and checks made faster.
const SYNAPSE: &str = r#"{
  "services": {
    "nodeapp": {
      "discovery": {
        "method": "docker",
        "servers": [{"name": "localhost", "host": "localhost"}],
        "container_port": 8000,
        "image_name": "berth-test/hello"
      },
      "haproxy": {
        "port": 8080,
        "server_options": "check inter 200ms rise 1 fall 2",
        "listen": ["mode http", "option httpchk /", "http-check expect string Hello"]
      }
    }
  },
  "haproxy": {
    "reload_command": "service haproxy reload",
    "config_file_path": "/etc/haproxy/haproxy.cfg",
    "global": ["daemon"],
    "defaults": ["timeout connect 5000ms"]
  }
}"#;

#[test]
fn synapse_config_gives_the_same_behaviour() {
    let lab = Lab::for_tests();
    let h1 = lab.run("bt-s1", &["-p", "8000"]).hostname();
    let h2 = lab.run("bt-s2", &["-p", "8000"]).hostname();
    let berth = Berth::start_root_synapse("synapse", SYNAPSE, &[TEST.uplink, TEST.bridge]);
    berth.wait_for("synapse config: the top-level haproxy section", 1);
    berth.wait_for("(health check passing)", 2);
    let m = lab.spread(60);
    let mut want = vec![h1.clone(), h2.clone()];
    want.sort();
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), want);
    // The httpchk/expect lines became berth's HTTP check: a hung container leaves.
    docker(&["exec", "bt-s1", "/hello", "sick", "hang"]);
    berth.wait_for("removed (health check failing: timed out)", 1);
    assert_eq!(lab.spread(30).keys().cloned().collect::<Vec<_>>(), vec![h2]);
}
