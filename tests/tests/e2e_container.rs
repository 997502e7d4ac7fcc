//! berth deployed as operators deploy it: its own image (`cargo xtask image`, a static binary
//! FROM scratch) started with `docker run --network host --pid host`, the capabilities the
//! README names and the bpffs, Docker socket, config and cgroup v2 mounts; and the Compose
//! example (`docker-compose up --scale web=3`, Debian's docker-compose v1).
//!
//! As in `e2e_docker.rs`, berth attaches only to what the test creates: a Docker network's
//! bridge and a veth whose peer is a client namespace playing the uplink; it pins under the
//! test's `/sys/fs/bpf/bte-*` and attaches its socket programs to the test's child cgroup.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{
    docker::{
        build_hello_image, client_behind_uplink, docker, docker_quiet, hello_bin, load_loop,
        stop_under_load,
    },
    topo::{
        Netns, TestCgroup, berth_down, cgroup2_root, http_get, remove_leftovers, sh, test_pin_path,
    },
};

/// Label of everything this file starts in Docker (removed before and after each test).
const LABEL: &str = "berth-test-ctr=1";
const NETWORK: &str = "berth-ctr-net";
const BRIDGE: &str = "bte-ctr0";
const UPLINK: &str = "bte-ch0";
/// The backends' image: the project's `hello` server, under a tag of this file's own.
const HELLO_IMAGE: &str = "berth-test/ctr-hello";
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 1), 8080);
/// The capabilities the README names (beyond Docker's default set). Docker 20.10 does not know
/// CAP_BPF and CAP_PERFMON; CAP_SYS_ADMIN covers both for bpf(2) (see the README).
const CAPS: [&str; 2] = ["SYS_ADMIN", "NET_ADMIN"];

/// The berth image under test (`cargo xtask test` builds it and sets `BERTH_IMAGE`).
fn berth_image() -> String {
    std::env::var("BERTH_IMAGE")
        .expect("BERTH_IMAGE unset: run through `cargo xtask test` (it builds berth's image)")
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

/// The test's world: a Docker network with a bridge of its own, a client namespace behind a
/// veth, the config directory mounted at /etc/berth, a pin path and a child cgroup. Removed on
/// drop (the berth containers first, then whatever they left pinned).
struct World {
    client: Netns,
    /// Mounted at /etc/berth: berth.toml, and the admin socket.
    etc: PathBuf,
    pin_path: PathBuf,
    cgroup: TestCgroup,
    /// The uplink, and the network's bridge when there is one.
    ifaces: Vec<&'static str>,
}

impl World {
    fn new(tag: &str, subnet: Option<&str>) -> Self {
        remove_leftovers();
        remove_docker_leftovers();
        build_hello_image(HELLO_IMAGE, true);
        if let Some(subnet) = subnet {
            docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--opt",
                &format!("com.docker.network.bridge.name={BRIDGE}"),
                "--subnet",
                subnet,
                "--label",
                LABEL,
                NETWORK,
            ]);
        }
        let client = client_behind_uplink(
            "ccl",
            UPLINK,
            Ipv4Addr::new(10, 42, 0, 1),
            Ipv4Addr::new(10, 42, 0, 2),
        );
        let etc = std::env::temp_dir().join(format!("berth-ctr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&etc);
        std::fs::create_dir_all(&etc).unwrap();
        let pin_path = test_pin_path(tag);
        let _ = berth_down(&pin_path);
        Self {
            client,
            etc,
            pin_path,
            cgroup: TestCgroup::new(tag),
            ifaces: if subnet.is_some() {
                vec![UPLINK, BRIDGE]
            } else {
                vec![UPLINK]
            },
        }
    }

    /// A backend: `docker run -d` of the hello image on the test network; returns its hostname.
    fn backend(&self, name: &str) -> String {
        let id = docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--label",
            LABEL,
            "--network",
            NETWORK,
            HELLO_IMAGE,
        ]);
        id[..12].to_owned()
    }

    /// The operator's `docker run` flags (README), with this test's config directory; `caps`
    /// replaces the README's capabilities (to show each is needed).
    fn berth_flags(&self, name: &str, caps: &[&str]) -> Vec<String> {
        let mut f: Vec<String> = [
            "-d",
            "--name",
            name,
            "--label",
            LABEL,
            "--network",
            "host",
            "--pid",
            "host",
        ]
        .map(str::to_owned)
        .to_vec();
        for c in caps {
            f.extend(["--cap-add".into(), (*c).into()]);
        }
        let cg = cgroup2_root();
        for (host, inside) in [
            (Path::new("/sys/fs/bpf"), Path::new("/sys/fs/bpf")),
            (
                Path::new("/var/run/docker.sock"),
                Path::new("/var/run/docker.sock"),
            ),
            (self.etc.as_path(), Path::new("/etc/berth")),
            (cg.as_path(), cg.as_path()),
        ] {
            f.extend([
                "-v".into(),
                format!("{}:{}", host.display(), inside.display()),
            ]);
        }
        f
    }

    /// `berth run` arguments: the image's default (the mounted config) plus the test's own pin
    /// path, cgroup, interfaces and admin socket (in the mounted directory, so the host sees it).
    fn berth_args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["run", "--config", "/etc/berth/berth.toml"]
            .map(str::to_owned)
            .to_vec();
        a.extend(["--pin-path".into(), self.pin_path.display().to_string()]);
        a.extend(["--cgroup".into(), self.cgroup.path.display().to_string()]);
        a.extend(["--admin-socket".into(), "/etc/berth/admin.sock".into()]);
        for i in &self.ifaces {
            a.extend(["--iface".into(), (*i).into()]);
        }
        a
    }

    /// Starts a berth container as the README does; returns it once it logged "berth ready",
    /// with the time from `docker run` to that line.
    fn start_berth(&self, name: &str) -> (BerthContainer, Duration) {
        let t = Instant::now();
        let mut args = self.berth_flags(name, &CAPS);
        args.push(berth_image());
        args.extend(self.berth_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&[&["run"], &args[..]].concat());
        let c = BerthContainer(name.to_owned());
        c.wait_for("berth ready", 1);
        (c, t.elapsed())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        remove_docker_leftovers();
        let _ = berth_down(&self.pin_path);
        let _ = Command::new("ip").args(["link", "del", UPLINK]).output();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

/// A berth container: its log is printed if the test fails while it exists.
struct BerthContainer(String);

impl BerthContainer {
    fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.0])
            .output()
            .expect("docker logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until the log holds `needle` `times` times (panics after 20 s or if it exits).
    fn wait_for(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.logs().matches(needle).count() < times {
            let running = docker(&["inspect", "-f", "{{.State.Running}}", &self.0]);
            assert!(
                running == "true" && Instant::now() < deadline,
                "berth container {} never logged {needle:?} (running: {running})",
                self.0
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `docker stop` (SIGTERM); returns how long it took and the exit code.
    fn stop(&self) -> (Duration, String) {
        let t = Instant::now();
        docker(&["stop", &self.0]);
        let took = t.elapsed();
        (
            took,
            docker(&["inspect", "-f", "{{.State.ExitCode}}", &self.0]),
        )
    }
}

impl Drop for BerthContainer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- berth container {} ----\n{}-------------------",
                self.0,
                self.logs()
            );
        }
    }
}

/// Who answers `n` requests from the client namespace (hostname -> count); panics on a failure.
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

/// Requests every 10 ms until `want` (a set of hostnames) have all answered; returns the time
/// since `since` (panics after `limit`).
fn all_answer(client: &Netns, want: &[String], since: Instant, limit: Duration) -> Duration {
    let want = want.to_vec();
    client.run(move || {
        let mut seen = std::collections::BTreeSet::new();
        loop {
            if let Ok((200, body)) = http_get(SERVICE)
                && let Some(who) = body.strip_prefix("Hello from ")
            {
                seen.insert(who.to_owned());
            }
            if want.iter().all(|w| seen.contains(w)) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < limit,
                "{want:?} did not all answer within {limit:?} (seen {seen:?})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

const CONFIG: &str = r#"
[docker]
label_services = false
[metrics]
listen = "127.0.0.1:9478"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
[service.docker]
image = "berth-test/ctr-hello"
port = 8000
"#;

#[test]
fn berth_in_a_container_serves_the_release_story_and_its_pins_outlive_it() {
    let w = World::new("ctr", Some("172.31.251.0/24"));
    std::fs::write(w.etc.join("berth.toml"), CONFIG).unwrap();
    // The image is this checkout's berth (a stale image would test old code).
    let image_version = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        &berth_image(),
        "--version",
    ]);
    let host_version = sh(&[
        berth_tests::topo::berth_bin().to_str().unwrap(),
        "--version",
    ]);
    assert_eq!(
        image_version,
        host_version.trim(),
        "image {}",
        berth_image()
    );
    let h1 = w.backend("bt-ctr-1");
    let h2 = w.backend("bt-ctr-2");

    let t = Instant::now();
    let (berth, ready) = w.start_berth("bte-berth-1");
    let serving = all_answer(
        &w.client,
        &[h1.clone(), h2.clone()],
        t,
        Duration::from_secs(10),
    );
    println!("berth container: ready {ready:?} and serving both {serving:?} after `docker run`");

    // Both containers answer, in turn as the flows hash.
    let m = spread(&w.client, 100);
    println!("two containers: {m:?}");
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![h1.clone(), h2.clone()])
    );

    // A third joins.
    let started = Instant::now();
    let h3 = w.backend("bt-ctr-3");
    let joined = all_answer(
        &w.client,
        std::slice::from_ref(&h3),
        started,
        Duration::from_secs(5),
    );
    println!("third container served {joined:?} after `docker run` was called");
    assert!(joined < Duration::from_secs(2), "took {joined:?}");

    // One stops under load: traffic keeps flowing, none to it afterwards.
    stop_under_load(&w.client, SERVICE, "bt-ctr-1", &h1);
    let m = spread(&w.client, 50);
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![h2.clone(), h3.clone()])
    );

    // The cgroup mount works: a client on the host, in the test's cgroup, is balanced at its
    // socket (nothing listens on the host's port 8080).
    let mut cmd = Command::new(hello_bin());
    cmd.args(["client", "tcp", "127.0.0.1:8080", "20"]);
    w.cgroup.command(&mut cmd);
    let out = String::from_utf8_lossy(&cmd.output().expect("hello client").stdout).into_owned();
    let answered: std::collections::BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Hello from ")?.split_whitespace().next())
        .collect();
    assert_eq!(
        answered.into_iter().map(str::to_owned).collect::<Vec<_>>(),
        sorted(vec![h2.clone(), h3.clone()]),
        "host client through the socket programs:\n{out}"
    );

    // Operators' tools: `berth status` inside the container, metrics on the host's loopback.
    let st = docker(&[
        "exec",
        "bte-berth-1",
        "/usr/local/bin/berth",
        "status",
        "--admin-socket",
        "/etc/berth/admin.sock",
    ]);
    println!("{st}");
    assert!(st.contains("bt-ctr-2") && st.contains("bt-ctr-3"), "{st}");
    let metrics = http_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9478)).expect("metrics");
    assert!(metrics.1.contains("berth_backend_in_pool"), "{metrics:?}");

    // The pins outlive the container: stop it under load, start a new one, which adopts the
    // dataplane; not one request fails on the way.
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_loop(&w.client, SERVICE, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let (took, code) = berth.stop();
    println!("berth container stopped in {took:?} (exit code {code})");
    assert_eq!(code, "0", "{}", berth.logs());
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM not handled: {took:?}"
    );
    docker(&["rm", "bte-berth-1"]);
    std::thread::sleep(Duration::from_millis(500));
    let (berth2, ready2) = w.start_berth("bte-berth-2");
    berth2.wait_for("adopting the dataplane pinned under", 1);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r.result.is_err()).collect();
    println!(
        "berth container replaced under load (new one ready in {ready2:?}): {} requests, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let m = spread(&w.client, 50);
    assert_eq!(
        m.keys().cloned().collect::<Vec<_>>(),
        sorted(vec![h2.clone(), h3.clone()])
    );

    // Stopped again, `berth down` from the image removes the dataplane: the service is gone.
    berth2.stop();
    // Still served while no berth runs (`spread` panics on a failed request).
    spread(&w.client, 5);
    let mut down: Vec<String> = ["run", "--rm", "--label", LABEL]
        .map(str::to_owned)
        .to_vec();
    for c in CAPS {
        down.extend(["--cap-add".into(), c.into()]);
    }
    down.extend(["-v".into(), "/sys/fs/bpf:/sys/fs/bpf".into(), berth_image()]);
    down.extend([
        "down".into(),
        "--pin-path".into(),
        w.pin_path.display().to_string(),
    ]);
    let down: Vec<&str> = down.iter().map(String::as_str).collect();
    let out = docker(&down);
    println!("{out}");
    assert!(out.contains("berth down: detached"), "{out}");
    assert!(!w.pin_path.exists(), "pins left after berth down");
    let r = w.client.run(|| http_get(SERVICE));
    assert!(r.is_err(), "served after berth down: {r:?}");
}

/// Compose project name of the example's test run (its network is `bteproj_default`).
const PROJECT: &str = "bteproj";

/// `docker-compose -p PROJECT -f dist/docker-compose.yml -f OVERRIDE ARGS`, with the image under
/// test; panics with compose's output on failure.
fn compose(override_file: &Path, args: &[&str]) -> String {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/docker-compose.yml");
    let out = Command::new("docker-compose")
        .args(["--no-ansi", "-p", PROJECT, "-f"])
        .arg(&example)
        .arg("-f")
        .arg(override_file)
        .args(args)
        .env("BERTH_IMAGE", berth_image())
        .output()
        .expect("docker-compose (Debian's package; `cargo xtask test` installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "docker-compose {args:?}: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Takes the Compose project down however the test ends.
struct ComposeDown(PathBuf);

impl Drop for ComposeDown {
    fn drop(&mut self) {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/docker-compose.yml");
        let _ = Command::new("docker-compose")
            .args(["--no-ansi", "-p", PROJECT, "-f"])
            .arg(&example)
            .arg("-f")
            .arg(&self.0)
            .args(["down", "--timeout", "5"])
            .env("BERTH_IMAGE", berth_image())
            .output();
        docker_quiet(&["network", "rm", &format!("{PROJECT}_default")]);
    }
}

/// The hostnames (short IDs) of the project's `web` containers.
fn web_hosts(override_file: &Path) -> Vec<String> {
    sorted(
        compose(override_file, &["ps", "-q", "web"])
            .split_whitespace()
            .map(|id| id[..12].to_owned())
            .collect(),
    )
}

#[test]
fn compose_example_scaled_to_three_serves_all_three() {
    let w = World::new("cmp", None);
    // The example unchanged but for what makes it this test's: the image under test, the
    // test's pin path, cgroup, uplink and admin socket, the backends' image and port, and a
    // bridge of the test's own for the project's network.
    let override_file = w.etc.join("docker-compose.test.yml");
    std::fs::write(
        &override_file,
        format!(
            r#"version: "2.4"
services:
  berth:
    image: ${{BERTH_IMAGE}}
    command: ["run", "--pin-path", "{pin}", "--cgroup", "{cgroup}", "--iface", "{UPLINK}",
              "--admin-socket", "/etc/berth/admin.sock"]
    labels: {{ berth-test-ctr: "1" }}
    volumes: ["{etc}:/etc/berth"]
  web:
    image: {HELLO_IMAGE}
    labels: {{ berth.target-port: "8000", berth-test-ctr: "1" }}
networks:
  default:
    driver_opts: {{ com.docker.network.bridge.name: bte-cmp0 }}
    ipam: {{ config: [{{ subnet: 172.31.252.0/24 }}] }}
"#,
            pin = w.pin_path.display(),
            cgroup = w.cgroup.path.display(),
            etc = w.etc.display(),
        ),
    )
    .unwrap();
    let version = Command::new("docker-compose")
        .arg("version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!("{version}");
    let _down = ComposeDown(override_file.clone());

    let t = Instant::now();
    compose(&override_file, &["up", "-d", "--scale", "web=3"]);
    let up = t.elapsed();
    let berth = BerthContainer(format!("{PROJECT}_berth_1"));
    berth.wait_for("berth ready", 1);
    let hosts = web_hosts(&override_file);
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    let all = all_answer(&w.client, &hosts, t, Duration::from_secs(15));
    println!(
        "docker-compose up --scale web=3 took {up:?}; all three answered {all:?} after it was called"
    );
    let m = spread(&w.client, 150);
    println!("three web containers: {m:?}");
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), hosts);
    assert!(
        berth.logs().contains("bte-cmp0"),
        "berth attached to the project's bridge:\n{}",
        berth.logs()
    );

    // Scaled down to one: the two stopped leave the pool, traffic keeps flowing.
    compose(&override_file, &["up", "-d", "--scale", "web=1"]);
    let left = web_hosts(&override_file);
    assert_eq!(left.len(), 1, "{left:?}");
    let m = spread(&w.client, 30);
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), left);
}

/// The capability test's config: one static backend, no Docker, no metrics port.
const STATIC_CONFIG: &str = r#"
[docker]
enabled = false
[metrics]
enabled = false
[[service]]
name = "a"
listen = "0.0.0.0:8080"
backends = ["10.42.0.2:8000"]
"#;

/// Waits until `log()` shows "berth ready" (true) or `exited()` (false); at most 10 s.
fn ready_or_exited(log: impl Fn() -> String, mut exited: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if log().contains("berth ready") {
            return true;
        }
        if exited() {
            return log().contains("berth ready");
        }
        assert!(
            Instant::now() < deadline,
            "neither ready nor exited:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One berth container with `caps` and the README's flags minus `without` (flag, value) pairs:
/// (whether it got ready, its log). Removed afterwards, with whatever it pinned.
fn try_container(w: &World, caps: &[&str], without: &[(&str, &str)]) -> (bool, String) {
    let name = "bte-berth-caps";
    let mut flags = w.berth_flags(name, caps);
    for (flag, value) in without {
        let i = flags
            .windows(2)
            .position(|p| p[0] == *flag && p[1] == *value)
            .unwrap_or_else(|| panic!("no {flag} {value} in {flags:?}"));
        flags.drain(i..i + 2);
    }
    let mut args = vec!["run".to_owned()];
    args.extend(flags);
    args.push(berth_image());
    args.extend(w.berth_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args);
    let c = BerthContainer(name.to_owned());
    let ready = ready_or_exited(
        || c.logs(),
        || docker(&["inspect", "-f", "{{.State.Running}}", name]) != "true",
    );
    let log = c.logs();
    docker(&["rm", "-f", name]);
    let _ = berth_down(&w.pin_path);
    (ready, log)
}

/// The host binary run with exactly `caps` (as systemd's CapabilityBoundingSet gives a root
/// service), pinning under `pin_path`: (whether it got ready, its log). Stopped afterwards;
/// its pins are left to the caller.
fn try_host(w: &World, caps: &[&str], pin_path: &Path, tag: &str) -> (bool, String) {
    let log_path = w.etc.join(format!("{tag}.log"));
    let mut bounding = "-all".to_owned();
    for c in caps {
        bounding.push_str(&format!(",+{}", c.to_lowercase()));
    }
    let mut child = Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--inh-caps", "-all"])
        .arg(berth_tests::topo::berth_bin())
        .arg("run")
        .arg("--config")
        .arg(w.etc.join("berth.toml"))
        .arg("--pin-path")
        .arg(pin_path)
        .args(["--cgroup", "none", "--iface", UPLINK, "--admin-socket"])
        .arg(w.etc.join(format!("{tag}.sock")))
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("setpriv (util-linux)");
    let ready = ready_or_exited(
        || std::fs::read_to_string(&log_path).unwrap_or_default(),
        || !matches!(child.try_wait(), Ok(None)),
    );
    // SAFETY: plain signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    (
        ready,
        std::fs::read_to_string(&log_path).unwrap_or_default(),
    )
}

fn last_line(log: &str) -> &str {
    log.lines().last().unwrap_or("")
}

#[test]
fn the_named_capabilities_and_mounts_are_each_needed() {
    let w = World::new("caps", None);
    std::fs::write(w.etc.join("berth.toml"), STATIC_CONFIG).unwrap();

    // In Docker (its default capabilities and seccomp profile): the README's set works;
    // without CAP_SYS_ADMIN (which stands for CAP_BPF and CAP_PERFMON on Engine 20.10) the
    // maps cannot be created.
    let (ready, log) = try_container(&w, &CAPS, &[]);
    assert!(ready, "{log}");
    for caps in [&["NET_ADMIN"][..], &[]] {
        let (ready, log) = try_container(&w, caps, &[]);
        println!("container with {caps:?}: {}", last_line(&log));
        assert!(!ready && log.contains("Operation not permitted"), "{log}");
    }
    let (ready, log) = try_container(&w, &["SYS_ADMIN"], &[]);
    println!(
        "container with [\"SYS_ADMIN\"] only: {}",
        if ready { "ready" } else { last_line(&log) }
    );
    // Without the cgroup v2 mount the socket programs have nowhere to attach.
    let cg = cgroup2_root().display().to_string();
    let (ready, log) = try_container(&w, &CAPS, &[("-v", &format!("{cg}:{cg}"))]);
    println!("container without the cgroup mount: {}", last_line(&log));
    assert!(!ready && log.contains("opening cgroup"), "{log}");
    // Without the bpffs mount berth mounts a BPF filesystem of its own, which dies with the
    // container; with the host's PID namespace it can tell (PID 1's mounts) and warns.
    const DIES: &str = "will not outlive";
    let (ready, log) = try_container(&w, &CAPS, &[("-v", "/sys/fs/bpf:/sys/fs/bpf")]);
    assert!(ready && log.contains(DIES), "{log}");
    let (ready, log) = try_container(
        &w,
        &CAPS,
        &[("-v", "/sys/fs/bpf:/sys/fs/bpf"), ("--pid", "host")],
    );
    assert!(ready && !log.contains(DIES), "{log}");
    println!("without the bpffs mount: warned with --pid host, silent without it");

    // Outside Docker, as the systemd unit runs it (a root service with a bounding set):
    // CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN load and attach everything, and none of them can
    // go (CAP_SYS_ADMIN stands in for each, so it is left out here).
    const LOAD: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];
    let (ready, log) = try_host(&w, &LOAD, &w.pin_path, "unit");
    let _ = berth_down(&w.pin_path);
    assert!(ready, "{log}");
    for missing in LOAD {
        let caps: Vec<&str> = LOAD.iter().copied().filter(|c| *c != missing).collect();
        let (ready, log) = try_host(&w, &caps, &w.pin_path, "unit");
        let _ = berth_down(&w.pin_path);
        println!("host without CAP_{missing}: {}", last_line(&log));
        assert!(!ready, "CAP_{missing} is not needed after all:\n{log}");
    }
    const UNIT: [&str; 4] = ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"];
    // CAP_SYS_ADMIN is what lets berth see whose program is attached to an interface
    // (BPF_PROG_GET_FD_BY_ID): a second berth on the same interface is refused with it.
    let first = berth_tests::topo::Berth::start_root("caps1", STATIC_CONFIG, &[UPLINK]);
    let second = test_pin_path("caps2");
    let (ready, log) = try_host(&w, &UNIT, &second, "second");
    let _ = berth_down(&second);
    assert!(!ready && log.contains("already attached"), "{log}");
    // Without it the attached program cannot be identified: berth must say so, not pass
    // silently.
    let (ready, log) = try_host(&w, &LOAD, &second, "second");
    let _ = berth_down(&second);
    println!(
        "a second berth on the same interface without CAP_SYS_ADMIN: {}",
        if ready {
            "not refused, warned"
        } else {
            last_line(&log)
        }
    );
    assert!(
        !ready || log.contains("another berth attached there would not be detected"),
        "neither refused nor warned:\n{log}"
    );
    drop(first);
}
