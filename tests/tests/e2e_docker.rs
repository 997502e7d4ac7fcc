//! End to end with a real Docker Engine and real containers of the project's own image (a
//! static `hello` HTTP server answering `Hello from <hostname>`, with an exec-form HEALTHCHECK).
//!
//! berth runs in the root namespace, where Docker's networks live, but attaches only to
//! interfaces this test creates: a Docker network's bridge (`bte-dock0`) and a veth (`bte-dh0`)
//! whose peer sits in a client namespace and plays the host's uplink. All traffic goes from that
//! namespace to the containers the test started.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::topo::{Berth, Netns, http_get, remove_leftovers, sh};

const NETWORK: &str = "berth-test-net";
const BRIDGE: &str = "bte-dock0";
const UPLINK: &str = "bte-dh0";
const IMAGE: &str = "berth-test/hello";
const CLIENT_IMAGE: &str = "berth-test/client";
const LABEL: &str = "berth-test=1";

fn docker(args: &[&str]) -> String {
    let mut full = vec!["docker"];
    full.extend_from_slice(args);
    sh(&full).trim().to_owned()
}

fn docker_quiet(args: &[&str]) {
    let _ = Command::new("docker").args(args).output();
}

fn remove_docker_leftovers() {
    let ids = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={LABEL}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for id in ids.split_whitespace() {
        docker_quiet(&["rm", "-f", id]);
    }
    docker_quiet(&["network", "rm", NETWORK]);
}

/// The static `hello` binary (server of the image, and the test's client).
fn hello_bin() -> std::path::PathBuf {
    let bin = std::env::var_os("BERTH_HELLO_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-linux-musl/release/hello")
        });
    assert!(
        bin.exists(),
        "{} missing: run through `cargo xtask test`",
        bin.display()
    );
    bin
}

/// Builds the test image from the static binary (cheap when Docker's cache has it).
fn build_image() {
    let bin = hello_bin();
    let dir = std::env::temp_dir().join(format!("berth-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&bin, dir.join("hello")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY hello /hello\nEXPOSE 8000\n\
         HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD [\"/hello\", \"get\", \"127.0.0.1:8000\"]\n\
         ENTRYPOINT [\"/hello\", \"serve\", \"8000\"]\n",
    )
    .unwrap();
    docker(&["build", "-q", "-t", IMAGE, dir.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Docker network, the client namespace and the uplink veth; removed on drop.
struct Setup {
    client: Netns,
}

impl Setup {
    fn new() -> Self {
        remove_leftovers();
        remove_docker_leftovers();
        build_image();
        docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--opt",
            &format!("com.docker.network.bridge.name={BRIDGE}"),
            "--subnet",
            "172.31.250.0/24",
            "--label",
            LABEL,
            NETWORK,
        ]);
        let client = Netns::new("dcl");
        sh(&[
            "ip",
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ]);
        sh(&["ip", "addr", "add", "10.41.0.1/24", "dev", UPLINK]);
        sh(&["ip", "link", "set", UPLINK, "up"]);
        client.exec(&["ip", "link", "set", "eth0", "up"]);
        client.exec(&["ip", "addr", "add", "10.41.0.2/24", "dev", "eth0"]);
        client.exec(&["ip", "route", "add", "default", "via", "10.41.0.1"]);
        Self { client }
    }

    /// `docker run -d` of the test image; returns (container name, hostname).
    fn run(&self, name: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--label",
            LABEL,
            "--network",
            NETWORK,
        ];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        let id = docker(&args);
        (name.to_owned(), id[..12].to_owned())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        remove_docker_leftovers();
        let _ = Command::new("ip").args(["link", "del", UPLINK]).output();
    }
}

const SERVICE: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 41, 0, 1), 8080);

/// Who answers `n` requests (hostname -> count); panics on any failure.
fn spread(client: &Netns, n: usize) -> BTreeMap<String, usize> {
    client.run(move || {
        let mut m = BTreeMap::new();
        for i in 0..n {
            let (status, body) = http_get(SERVICE).unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(status, 200, "request {i}: {body}");
            let who = body
                .strip_prefix("Hello from ")
                .unwrap_or_else(|| panic!("{body:?}"))
                .to_owned();
            *m.entry(who).or_insert(0) += 1;
        }
        m
    })
}

/// Requests every 10 ms until the container with hostname `host` answers; returns the time since
/// `since` (panics after `limit`).
fn served_by(client: &Netns, host: &str, since: Instant, limit: Duration) -> Duration {
    let want = format!("Hello from {host}");
    client.run(move || {
        loop {
            if let Ok((200, body)) = http_get(SERVICE)
                && body == want
            {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < limit,
                "{want:?} never answered within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Requests in a loop until `stop`: (when, Ok(hostname) or Err(what failed)).
fn load_loop(
    client: &Netns,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, Result<String, String>)>> {
    client.spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = match http_get(SERVICE) {
                Ok((200, body)) => Ok(body.trim_start_matches("Hello from ").to_owned()),
                Ok((s, body)) => Err(format!("status {s}: {body}")),
                Err(e) => Err(e),
            };
            out.push((Instant::now(), r));
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

const CONFIG: &str = r#"
[docker]
label_services = false
[[service]]
name = "nodeapp"
listen = "0.0.0.0:8080"
[service.docker]
image = "berth-test/hello"
port = 8000
"#;

#[test]
fn containers_join_and_leave_the_pool_by_themselves() {
    let setup = Setup::new();
    let (_, h1) = setup.run("bt-c1", &["-p", "8000"]);
    let (_, h2) = setup.run("bt-c2", &["-p", "8000"]);
    let berth = Berth::start_root("docker", CONFIG, &[UPLINK, BRIDGE]);
    berth.wait_for("(docker: resync)", 2);

    // Both containers answer, through Docker's FORWARD DROP, without the published ports.
    let m = spread(&setup.client, 100);
    println!("two containers: {m:?}");
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), {
        let mut v = vec![h1.clone(), h2.clone()];
        v.sort();
        v
    });

    // A third container, no published port, joins within a second of its start.
    let started = Instant::now();
    let (_, h3) = setup.run("bt-c3", &[]);
    let joined = served_by(&setup.client, &h3, started, Duration::from_secs(5));
    println!("third container served {joined:?} after `docker run` was called");
    assert!(joined < Duration::from_secs(1), "took {joined:?}");

    // `docker stop` under load: no failed request, and no answer from it once stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_loop(&setup.client, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    docker(&["stop", "bt-c1"]);
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let from_stopped = results
        .iter()
        .filter(|(at, r)| *at > stopped && r.as_deref() == Ok(h1.as_str()))
        .count();
    println!(
        "docker stop under load: {} requests, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(from_stopped, 0, "the stopped container still got requests");

    // A container whose own HEALTHCHECK fails (server answers 500) leaves the pool.
    docker(&["exec", "bt-c2", "/hello", "sick", "500"]);
    let sick = Instant::now();
    let left = setup.client.run({
        let h2 = h2.clone();
        move || {
            let mut clean = 0;
            loop {
                match http_get(SERVICE) {
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
    let m = spread(&setup.client, 50);
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec![h3.clone()]);

    // Healthy again: back in the pool.
    docker(&["exec", "bt-c2", "/hello", "sick", "no"]);
    let back = served_by(&setup.client, &h2, Instant::now(), Duration::from_secs(10));
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

/// Whether dockerd answers.
fn docker_up() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Starts dockerd the way `cargo xtask docker-up` does (xtask is a binary crate a test cannot
/// call into), and waits for it.
fn start_dockerd() {
    if docker_up() {
        return;
    }
    // Only stale pid files, as `cargo xtask docker-up` does.
    for f in [
        "/var/run/docker.pid",
        "/var/run/docker/containerd/containerd.pid",
    ] {
        let alive = std::fs::read_to_string(f)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            // A zombie is not alive: it only waits to be reaped.
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .is_some_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            });
        if !alive {
            let _ = std::fs::remove_file(f);
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/var/log/berth-dockerd.log")
        .unwrap();
    // Forked away from the test (reparented to init), as `cargo xtask docker-up` does.
    let status = Command::new("setsid")
        .args(["--fork", "dockerd"])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("start dockerd");
    assert!(status.success(), "setsid --fork dockerd: {status}");
    let t = Instant::now();
    while !docker_up() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "dockerd did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops dockerd (SIGTERM, as an operator's restart does) and waits until it is gone.
fn stop_dockerd() {
    signal_dockerd(libc::SIGTERM);
}

/// Sends `sig` to dockerd and waits until it is gone.
fn signal_dockerd(sig: i32) {
    let pid: i32 = std::fs::read_to_string("/var/run/docker.pid")
        .expect("dockerd pid file")
        .trim()
        .parse()
        .expect("pid");
    // SAFETY: a signal to the daemon's pid.
    unsafe { libc::kill(pid, sig) };
    let t = Instant::now();
    // A zombie counts as gone: dockerd may be the child of a process that does not reap
    // it (an older `cargo xtask` that spawned it without `--fork`).
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    }) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "dockerd did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes sure dockerd runs again even if the test fails half-way.
struct DockerdBack;

impl Drop for DockerdBack {
    fn drop(&mut self) {
        start_dockerd();
    }
}

#[test]
fn dockerd_restart_is_survived_and_resynced() {
    let setup = Setup::new();
    let _back = DockerdBack;
    let (_, h1) = setup.run("bt-r1", &["--restart", "always"]);
    let (_, h2) = setup.run("bt-r2", &["--restart", "always"]);
    let mut berth = Berth::start_root("docker-restart", CONFIG, &[UPLINK, BRIDGE]);
    berth.wait_for("(docker: resync)", 2);
    assert_eq!(spread(&setup.client, 40).len(), 2);

    let t = Instant::now();
    stop_dockerd();
    berth.wait_for("reconnecting (and resyncing) with backoff", 1);
    start_dockerd();
    // A second session with a fresh listing, without a restart of berth.
    berth.wait_for("docker: connected", 2);
    println!("berth reconnected {:?} after the stop began", t.elapsed());
    // The containers come back (restart policy), possibly on new addresses; berth must find
    // them again through a fresh listing.
    let served = setup.client.run({
        let (h1, h2) = (h1.clone(), h2.clone());
        move || {
            let mut seen = std::collections::BTreeSet::new();
            loop {
                if let Ok((200, b)) = http_get(SERVICE) {
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
    let load = load_loop(&setup.client, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    signal_dockerd(libc::SIGKILL);
    start_dockerd();
    let back = setup.client.run({
        let (h1, h2) = (h1.clone(), h2.clone());
        move || {
            let mut seen = std::collections::BTreeSet::new();
            while !(seen.contains(&h1) && seen.contains(&h2)) {
                if let Ok((200, b)) = http_get(SERVICE) {
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
    let failed_in = results
        .iter()
        .filter(|(at, r)| *at <= back && r.is_err())
        .count();
    let after: Vec<_> = results
        .iter()
        .filter(|(at, r)| *at > back && r.is_err())
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

/// `CONFIG` with berth's own fast HTTP check.
fn health_config() -> String {
    format!(
        "{CONFIG}{}",
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
    let setup = Setup::new();
    let (_, h1) = setup.run("bt-h1", &[]);
    let (_, h2) = setup.run("bt-h2", &[]);
    let berth = Berth::start_root("docker-health", &health_config(), &[UPLINK, BRIDGE]);
    // New backends enter after their first passing check (rise = 1).
    berth.wait_for("(health check passing)", 2);
    assert_eq!(spread(&setup.client, 40).len(), 2);

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
    let m = spread(&setup.client, 40);
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec![h2.clone()]);

    docker(&["exec", "bt-h1", "/hello", "sick", "no"]);
    berth.wait_for("(health check passing)", 3);
    let m = spread(&setup.client, 60);
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
    assert_eq!(
        spread(&setup.client, 30)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![h2]
    );
}

#[test]
fn without_a_config_file_containers_are_served_by_their_labels() {
    let setup = Setup::new();
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
    let (_, h1) = setup.run("bt-l1", &labels);
    let (_, h2) = setup.run("bt-l2", &labels);
    // A label asking for a port a host process listens on is refused: take one that is.
    let host_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = host_port.local_addr().unwrap().port().to_string();
    let (_, _h3) = setup.run(
        "bt-l3",
        &[
            "--label",
            &format!("berth.port={taken}"),
            "--label",
            "berth.target-port=8000",
        ],
    );
    // Only the uplink is named: berth attaches to the containers' bridge by itself.
    let berth = Berth::start_root_without_config("docker-labels", &[UPLINK]);
    berth.wait_for(
        &format!("attached to {BRIDGE} (bridge of a Docker network with backends)"),
        1,
    );
    // Health-checked by berth through their labels: they enter after passing checks.
    berth.wait_for("(health check passing)", 2);
    let m = spread(&setup.client, 60);
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
    let setup = Setup::new();
    let (_, h1) = setup.run("bt-s1", &["-p", "8000"]);
    let (_, h2) = setup.run("bt-s2", &["-p", "8000"]);
    let berth = Berth::start_root_synapse("synapse", SYNAPSE, &[UPLINK, BRIDGE]);
    berth.wait_for("synapse config: the top-level haproxy section", 1);
    berth.wait_for("(health check passing)", 2);
    let m = spread(&setup.client, 60);
    let mut want = vec![h1.clone(), h2.clone()];
    want.sort();
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), want);
    // The httpchk/expect lines became berth's HTTP check: a hung container leaves.
    docker(&["exec", "bt-s1", "/hello", "sick", "hang"]);
    berth.wait_for("removed (health check failing: timed out)", 1);
    assert_eq!(
        spread(&setup.client, 30)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![h2]
    );
}

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
    docker(&["tag", IMAGE, CLIENT_IMAGE]);
    let out = docker(&[
        "run",
        "--rm",
        "--label",
        LABEL,
        "--network",
        NETWORK,
        "--cgroup-parent",
        &parent,
        "--entrypoint",
        "/hello",
        CLIENT_IMAGE,
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

const SOCKET_CONFIG: &str = r#"
[docker]
label_services = false
[[service]]
name = "nodeapp"
listen = "0.0.0.0:8080"
[service.docker]
image = "berth-test/hello"
port = 8000
[[service]]
name = "nodeapp-udp"
listen = "0.0.0.0:8080"
protocol = "udp"
[service.docker]
image = "berth-test/hello"
port = 8000
"#;

/// The host's address on the test network's bridge (the containers' gateway).
const GATEWAY: &str = "172.31.250.1:8080";

#[test]
fn clients_on_the_host_and_in_containers_are_balanced_by_the_socket_programs() {
    let setup = Setup::new();
    let (_, h1) = setup.run("bt-s1", &[]);
    let (_, h2) = setup.run("bt-s2", &[]);
    let both = {
        let mut v = vec![h1.clone(), h2.clone()];
        v.sort();
        v
    };
    let berth = Berth::start_root("docker-sock", SOCKET_CONFIG, &[UPLINK, BRIDGE]);
    berth.wait_for("(docker: resync)", 4);

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

#[test]
fn sigkill_under_load_loses_no_connection_and_fails_no_request() {
    use std::io::{Read as _, Write as _};
    let setup = Setup::new();
    let (_, h1) = setup.run("bt-k1", &[]);
    let (_, h2) = setup.run("bt-k2", &[]);
    let mut berth = Berth::start_root("docker-kill", CONFIG, &[UPLINK, BRIDGE]);
    berth.wait_for("(docker: resync)", 2);
    assert_eq!(spread(&setup.client, 20).len(), 2);

    // A connection established before the kill, finished after the restart.
    let mut open = setup.client.run(|| {
        let mut s = std::net::TcpStream::connect(SERVICE).expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n").expect("write");
        s
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_loop(&setup.client, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let status = berth.kill();
    let killed = Instant::now();
    println!("berth: {status}");
    // A container started while no berth runs: the restarted one finds it in its first listing.
    let (_, h3) = setup.run("bt-k3", &[]);
    std::thread::sleep(Duration::from_millis(1000));
    let tables = berth.log_text().matches("maglev table updated").count();
    let restarted = Instant::now();
    berth.respawn();
    berth.wait_for("docker: connected", 2);
    println!(
        "restarted berth ready {:?} after the restart began",
        restarted.elapsed()
    );
    let joined = served_by(&setup.client, &h3, restarted, Duration::from_secs(5));
    println!("container started while berth was down served {joined:?} after the restart began");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();

    open.write_all(b"\r\n").expect("finish the request");
    let mut resp = String::new();
    open.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let while_dead = results
        .iter()
        .filter(|(at, _)| *at > killed && *at < restarted)
        .count();
    let who: std::collections::BTreeSet<_> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
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

#[test]
fn faults_under_load_fail_requests_only_inside_their_window() {
    let setup = Setup::new();
    setup.run("bt-f1", &[]);
    setup.run("bt-f2", &[]);
    let (_, h3) = setup.run("bt-f3", &[]);
    // A container asking, by labels, for a service of its own on port 9090: with a config file
    // berth does not take services from labels, so it gets nothing.
    docker(&["tag", IMAGE, CLIENT_IMAGE]);
    docker(&[
        "run",
        "-d",
        "--name",
        "bt-fl",
        "--label",
        LABEL,
        "--network",
        NETWORK,
        "--label",
        "berth.port=9090",
        "--label",
        "berth.target-port=8000",
        CLIENT_IMAGE,
    ]);
    let mut berth = Berth::start_root("docker-faults", CONFIG, &[UPLINK, BRIDGE]);
    berth.wait_for("(docker: resync)", 3);
    let stolen = setup
        .client
        .run(|| http_get(SocketAddrV4::new(*SERVICE.ip(), 9090)));
    assert!(stolen.is_err(), "a label took port 9090: {stolen:?}");
    let names: Vec<_> = berth
        .status()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["nodeapp".to_owned()]);

    let stop = Arc::new(AtomicBool::new(false));
    let load = load_loop(&setup.client, stop.clone());
    let pause = || std::thread::sleep(Duration::from_millis(500));
    let mut windows: Vec<(&str, Instant, Instant)> = Vec::new();
    pause();

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
    sh(&["ip", "link", "set", UPLINK, "down"]);
    std::thread::sleep(Duration::from_millis(300));
    sh(&["ip", "link", "set", UPLINK, "up"]);
    sh(&["ip", "addr", "replace", "10.41.0.1/24", "dev", UPLINK]);
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
    windows.push(("backend hung", t, Instant::now() + Duration::from_secs(2)));
    println!(
        "hung backend out of the pool {:?} after it hung",
        t.elapsed()
    );
    pause();
    pause();
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();

    let inside = |at: &Instant| windows.iter().find(|(_, a, b)| at >= a && at <= b);
    let mut per_window: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut outside = Vec::new();
    for (at, r) in &results {
        match inside(at) {
            Some((name, _, _)) => {
                let e = per_window.entry(name).or_default();
                e.0 += 1;
                e.1 += usize::from(r.is_err());
            }
            None if r.is_err() => outside.push((at, r)),
            None => {}
        }
    }
    println!(
        "faults under load: {} requests, {} failed outside the fault windows; per window \
         (requests, failed): {per_window:?}",
        results.len(),
        outside.len()
    );
    assert!(
        outside.is_empty(),
        "failed outside the fault windows: {outside:?}"
    );
    // Afterwards only the healthy backend answers, and berth is still the same process.
    let m = spread(&setup.client, 20);
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        vec![h3.clone()],
        "{m:?}"
    );
    let (status, _) = berth.stop();
    assert!(status.success(), "{}", berth.log_text());
}
