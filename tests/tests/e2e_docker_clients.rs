//! Docker e2e, clients on the host and in containers: balanced at their sockets by berth's cgroup
//! programs (nothing on the host listens on the service port).
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces the test creates (`berth_tests::docker::Lab`): a Docker network's bridge
//! (`bte-dock0`) and a veth (`bte-dh0`) whose peer sits in a client namespace and plays the
//! host's uplink. All traffic goes from that namespace to the containers the test started, of the
//! project's own image (a static `hello` HTTP server answering `Hello from <hostname>`, with an
//! exec-form HEALTHCHECK).

use std::{collections::BTreeMap, process::Command};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, TEST, TEST_CLIENT_IMAGE, docker, hello_bin},
};

/// Parses `hello client` output: (hostname, peer) per request; panics on any failed request.
fn client_results(out: &str) -> Vec<(String, String)> {
    out.lines()
        .map(|l| {
            assert!(!l.starts_with("ERR"), "client request failed: {l}\n{out}");
            let (answer, peer) = l.rsplit_once(" peer=").unwrap_or_else(|| panic!("{l:?}"));
            let who = answer
                .strip_prefix("Hello from ")
                .unwrap_or_else(|| panic!("{l:?}"));
            (who.to_owned(), peer.to_owned())
        })
        .collect()
}

/// `hello client KIND ADDR N` on the host (root namespace), inside `berth`'s test cgroup.
fn host_client(berth: &Berth, kind: &str, addr: &str, n: usize) -> Vec<(String, String)> {
    let mut cmd = Command::new(hello_bin());
    cmd.args(["client", kind, addr, &n.to_string()]);
    berth.cgroup.command(&mut cmd);
    let out = cmd.output().expect("hello client");
    client_results(&String::from_utf8_lossy(&out.stdout))
}

/// `hello client KIND ADDR N` in a container of the test network, inside `berth`'s test cgroup.
/// The image is tagged under another name so the client is not taken for a backend.
fn container_client(berth: &Berth, kind: &str, addr: &str, n: usize) -> Vec<(String, String)> {
    let parent = berth.cgroup.docker_parent();
    let n = n.to_string();
    docker(&["tag", TEST.image, TEST_CLIENT_IMAGE]);
    let out = docker(&[
        "run",
        "--rm",
        "--label",
        TEST.label,
        "--network",
        TEST.network,
        "--cgroup-parent",
        &parent,
        "--entrypoint",
        "/hello",
        TEST_CLIENT_IMAGE,
        "client",
        kind,
        addr,
        &n,
    ]);
    client_results(&out)
}

/// Who answered, and every peer address the client saw.
fn tally(results: &[(String, String)]) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut who = BTreeMap::new();
    let mut peers: Vec<String> = Vec::new();
    for (w, p) in results {
        *who.entry(w.clone()).or_insert(0) += 1;
        if !peers.contains(p) {
            peers.push(p.clone());
        }
    }
    (who, peers)
}

/// `TEST.config()` and the same service over UDP.
fn socket_config() -> String {
    format!(
        r#"{}[[service]]
name = "nodeapp-udp"
listen = "0.0.0.0:8080"
protocol = "udp"
[service.docker]
image = "{}"
port = 8000
"#,
        TEST.config(),
        TEST.image
    )
}

/// The host's address on the test network's bridge (the containers' gateway).
const GATEWAY: &str = "172.31.250.1:8080";

#[test]
fn clients_on_the_host_and_in_containers_are_balanced_by_the_socket_programs() {
    let lab = Lab::for_tests();
    let h1 = lab.run("bt-s1", &[]).hostname();
    let h2 = lab.run("bt-s2", &[]).hostname();
    let both = {
        let mut v = vec![h1.clone(), h2.clone()];
        v.sort();
        v
    };
    let berth = Berth::start_root("docker-sock", &socket_config(), &[TEST.uplink, TEST.bridge]);
    berth.wait_for(" added (weight ", 4);

    // Nothing listens on the host's port 8080: outside berth's cgroup a connect is refused.
    let mut plain = Command::new(hello_bin());
    let out = plain
        .args(["client", "tcp", "127.0.0.1:8080", "1"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("ERR connect"), "{out}");

    // From the host: loopback and the host's own addresses, TCP, UDP and connected UDP. Every
    // answer comes from a container, and the client only ever sees the address it asked for.
    for (kind, addr) in [
        ("tcp", "127.0.0.1:8080"),
        ("tcp", "10.41.0.1:8080"),
        ("tcp", GATEWAY),
        ("udp", "127.0.0.1:8080"),
        ("udp-connected", "10.41.0.1:8080"),
    ] {
        let (who, peers) = tally(&host_client(&berth, kind, addr, 40));
        println!("host {kind} {addr}: {who:?}, peers {peers:?}");
        assert_eq!(
            who.keys().cloned().collect::<Vec<_>>(),
            both,
            "{kind} {addr}"
        );
        assert_eq!(peers, vec![addr.to_owned()], "{kind} {addr}");
    }
    // From a container, to the host's address on its network.
    for kind in ["tcp", "udp"] {
        let (who, peers) = tally(&container_client(&berth, kind, GATEWAY, 40));
        println!("container {kind} {GATEWAY}: {who:?}, peers {peers:?}");
        assert_eq!(
            who.keys().cloned().collect::<Vec<_>>(),
            both,
            "container {kind}"
        );
        assert_eq!(peers, vec![GATEWAY.to_owned()], "container {kind}");
    }

    // A backend that leaves gets no new connection, from the host or from a container.
    docker(&["stop", "bt-s1"]);
    berth.wait_for("removed (docker: container bt-s1", 2);
    for (kind, addr) in [("tcp", "127.0.0.1:8080"), ("udp", "127.0.0.1:8080")] {
        let (who, _) = tally(&host_client(&berth, kind, addr, 20));
        assert_eq!(
            who.keys().cloned().collect::<Vec<_>>(),
            vec![h2.clone()],
            "{kind}"
        );
    }
    let (who, _) = tally(&container_client(&berth, "tcp", GATEWAY, 20));
    assert_eq!(who.keys().cloned().collect::<Vec<_>>(), vec![h2.clone()]);
    let counters = berth.status().counters;
    println!("socket counters: {counters:?}");
}
