//! The Docker Engine as the Docker e2e tests and the discovery benchmark use it: the `docker`
//! CLI, dockerd's lifecycle (is it up, start it with stale pid files removed, stop or kill it),
//! the project's `hello` image, and a lab: a Docker network whose bridge berth attaches to, and
//! a client namespace behind a veth that plays the host's uplink, so all traffic goes from that
//! namespace to containers the lab started.
//!
//! Everything a lab creates carries its label or its names; it is removed on drop, and the
//! leftovers of a crashed run are removed before a lab is built.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    netns::{Netns, alive, remove_leftovers, sh, signal},
    servers::http_get_any,
};

/// `docker ARGS`, trimmed stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let mut full = vec!["docker"];
    full.extend_from_slice(args);
    sh(&full).trim().to_owned()
}

/// `docker ARGS`, whatever comes of it (clean-up).
pub fn docker_quiet(args: &[&str]) {
    let _ = Command::new("docker").args(args).output();
}

/// Whether dockerd answers.
pub fn dockerd_up() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Pid files dockerd and its containerd leave when killed; a stale one blocks a restart.
const PID_FILES: [&str; 2] = [
    "/var/run/docker.pid",
    "/var/run/docker/containerd/containerd.pid",
];

/// Starts dockerd the way `cargo xtask docker-up` does (xtask is a binary crate the tests
/// cannot call into) unless it answers, and waits for it.
pub fn start_dockerd() {
    if dockerd_up() {
        return;
    }
    // Only stale pid files, as `cargo xtask docker-up` does: a live containerd left by a killed
    // dockerd is taken over through its pid file.
    for f in PID_FILES {
        let live = std::fs::read_to_string(f)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(alive);
        if !live {
            let _ = std::fs::remove_file(f);
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/var/log/berth-dockerd.log")
        .expect("/var/log/berth-dockerd.log");
    // Forked away from the test (reparented to init), as `cargo xtask docker-up` does.
    let status = Command::new("setsid")
        .args(["--fork", "dockerd"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .status()
        .expect("start dockerd");
    assert!(status.success(), "setsid --fork dockerd: {status}");
    let t = Instant::now();
    while !dockerd_up() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "dockerd did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops dockerd (SIGTERM, as an operator's restart does) and waits until it is gone.
pub fn stop_dockerd() {
    signal_dockerd(libc::SIGTERM);
}

/// Sends `sig` to dockerd and waits until it is gone.
pub fn signal_dockerd(sig: i32) {
    let pid: i32 = std::fs::read_to_string(PID_FILES[0])
        .expect("dockerd pid file")
        .trim()
        .parse()
        .expect("pid");
    signal(pid, sig);
    let t = Instant::now();
    // A zombie counts as gone: dockerd may be the child of a process that does not reap
    // it (an older `cargo xtask` that spawned it without `--fork`).
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "dockerd did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes sure dockerd runs again when dropped, even if the test fails half-way.
pub struct DockerdBack;

impl Drop for DockerdBack {
    fn drop(&mut self) {
        start_dockerd();
    }
}

/// The static `hello` binary (server of the image, and the tests' client): `$BERTH_HELLO_BIN`
/// (as `cargo xtask test` and `bench` set it), else the workspace's musl release build.
pub fn hello_bin() -> PathBuf {
    let bin = std::env::var_os("BERTH_HELLO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-linux-musl/release/hello")
        });
    assert!(
        bin.exists(),
        "{} missing: run through `cargo xtask test` (or `bench`)",
        bin.display()
    );
    bin
}

/// Builds image `tag` from the static `hello` binary, FROM scratch (cheap when Docker's cache
/// has it), with an exec-form HEALTHCHECK (interval 1 s, retries 2) if `healthcheck`.
pub fn build_hello_image(tag: &str, healthcheck: bool) {
    build_hello_image_on(None, tag, healthcheck);
}

/// [`build_hello_image`] on the engine at `host` (`docker -H`; None: the default one).
pub fn build_hello_image_on(host: Option<&str>, tag: &str, healthcheck: bool) {
    // A context of its own per build: engines' images are built side by side.
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "berth-image-{}-{}",
        std::process::id(),
        BUILDS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("image dir");
    std::fs::copy(hello_bin(), dir.join("hello")).expect("copy hello");
    let check = if healthcheck {
        "HEALTHCHECK --interval=1s --timeout=1s --retries=2 \
         CMD [\"/hello\", \"get\", \"127.0.0.1:8000\"]\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM scratch\nCOPY hello /hello\nEXPOSE 8000\n{check}\
             ENTRYPOINT [\"/hello\", \"serve\", \"8000\"]\n"
        ),
    )
    .expect("Dockerfile");
    let context = dir.to_str().expect("utf-8 path");
    match host {
        None => docker(&["build", "-q", "-t", tag, context]),
        Some(h) => docker(&["-H", h, "build", "-q", "-t", tag, context]),
    };
    let _ = std::fs::remove_dir_all(&dir);
}

/// Names and addresses of a lab.
pub struct Layout {
    /// The Docker network the containers join.
    pub network: &'static str,
    /// Its bridge (a name berth's tests may attach to: `bte-...`).
    pub bridge: &'static str,
    pub subnet: &'static str,
    /// The host's end of the veth to the client namespace (its uplink).
    pub uplink: &'static str,
    /// The client namespace's short name (`Netns::new`).
    pub client_ns: &'static str,
    /// The service berth serves: the host's address on the uplink (/24), port 8080.
    pub service: SocketAddrV4,
    /// The client's address on the uplink (its default route goes through the host).
    pub client: Ipv4Addr,
    /// The lab's build of the `hello` image.
    pub image: &'static str,
    /// `key=value` on every container and network of the lab: what the clean-up finds.
    pub label: &'static str,
    /// Whether the image has a HEALTHCHECK.
    pub healthcheck: bool,
}

impl Layout {
    /// berth serving the lab's containers (its image, port 8000) on port 8080 of the host, as
    /// service `nodeapp`; no label services.
    pub fn config(&self) -> String {
        format!(
            r#"
[docker]
label_services = false
[[service]]
name = "nodeapp"
listen = "0.0.0.0:8080"
[service.docker]
image = "{}"
port = 8000
"#,
            self.image
        )
    }
}

/// The Docker e2e tests' lab.
pub const TEST: Layout = Layout {
    network: "berth-test-net",
    bridge: "bte-dock0",
    subnet: "172.31.250.0/24",
    uplink: "bte-dh0",
    client_ns: "dcl",
    service: SocketAddrV4::new(Ipv4Addr::new(10, 41, 0, 1), 8080),
    client: Ipv4Addr::new(10, 41, 0, 2),
    image: "berth-test/hello",
    label: "berth-test=1",
    healthcheck: true,
};

/// The IPv6 side of a dual-stack lab ([`Lab::with_ipv6`]).
pub struct Layout6 {
    /// The Docker network's IPv6 subnet (a ULA prefix of the test's own).
    pub subnet: &'static str,
    /// The service over IPv6: the host's IPv6 address on the uplink (/64), port 8080.
    pub service: SocketAddrV6,
    /// The client's IPv6 address on the uplink (its default route goes through the host).
    pub client: Ipv6Addr,
}

impl Layout6 {
    /// The service at its IPv6 address.
    pub fn service(&self) -> SocketAddr {
        SocketAddr::V6(self.service)
    }
}

/// The dual-stack Docker e2e test's lab: names and IPv4 addresses of its own beside `TEST`'s.
pub const TEST_DUAL: Layout = Layout {
    network: "berth-test-dual",
    bridge: "bte-dock6",
    subnet: "172.31.251.0/24",
    uplink: "bte-dh6",
    client_ns: "dcl6",
    service: SocketAddrV4::new(Ipv4Addr::new(10, 41, 6, 1), 8080),
    client: Ipv4Addr::new(10, 41, 6, 2),
    image: "berth-test/hello",
    label: "berth-test=1",
    healthcheck: true,
};

/// Its IPv6 side (prefixes clear of any the machine has).
pub const TEST_DUAL_V6: Layout6 = Layout6 {
    subnet: "fdbe:7e57:251::/64",
    service: SocketAddrV6::new(
        Ipv6Addr::new(0xfdbe, 0x7e57, 0x41, 0, 0, 0, 0, 1),
        8080,
        0,
        0,
    ),
    client: Ipv6Addr::new(0xfdbe, 0x7e57, 0x41, 0, 0, 0, 0, 2),
};

/// The test image under another name, for clients: not taken for a backend of `TEST.config()`.
pub const TEST_CLIENT_IMAGE: &str = "berth-test/client";

/// A Docker network and a client namespace behind the host's uplink; removed on drop.
pub struct Lab {
    pub client: Netns,
    pub layout: &'static Layout,
}

/// A container a lab started.
pub struct Container {
    pub name: String,
    pub id: String,
}

impl Container {
    /// Its hostname (Docker's default: the short id), which `hello` answers with.
    pub fn hostname(&self) -> String {
        self.id[..12].to_owned()
    }
}

/// Removes a lab's containers, network and uplink (leftovers of a crashed run included).
fn remove(layout: &Layout) {
    let ids = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={}", layout.label)])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for id in ids.split_whitespace() {
        docker_quiet(&["rm", "-f", id]);
    }
    docker_quiet(&["network", "rm", layout.network]);
    let _ = Command::new("ip")
        .args(["link", "del", layout.uplink])
        .output();
}

impl Lab {
    /// Removes what a crashed run left, builds the image, the network and the client namespace.
    pub fn new(layout: &'static Layout) -> Self {
        Self::with_ipv6(layout, None)
    }

    /// [`Lab::new`], dual stack with `v6`: the Docker network gets its IPv6 subnet too
    /// (`docker network create --ipv6`), the uplink and the client their IPv6 addresses.
    pub fn with_ipv6(layout: &'static Layout, v6: Option<&Layout6>) -> Self {
        remove(layout);
        build_hello_image(layout.image, layout.healthcheck);
        let bridge_opt = format!("com.docker.network.bridge.name={}", layout.bridge);
        let mut args = vec![
            "network",
            "create",
            "--driver",
            "bridge",
            "--opt",
            &bridge_opt,
            "--subnet",
            layout.subnet,
            "--label",
            layout.label,
        ];
        if let Some(v6) = v6 {
            args.extend(["--ipv6", "--subnet", v6.subnet]);
        }
        args.push(layout.network);
        docker(&args);
        let client = client_behind_uplink(
            layout.client_ns,
            layout.uplink,
            *layout.service.ip(),
            layout.client,
        );
        if let Some(v6) = v6 {
            let host = format!("{}/64", v6.service.ip());
            sh(&[
                "ip",
                "-6",
                "addr",
                "add",
                &host,
                "dev",
                layout.uplink,
                "nodad",
            ]);
            let me = format!("{}/64", v6.client);
            client.exec(&["ip", "-6", "addr", "add", &me, "dev", "eth0", "nodad"]);
            let via = v6.service.ip().to_string();
            client.exec(&["ip", "-6", "route", "add", "default", "via", &via]);
        }
        Self { client, layout }
    }

    /// `docker run -d` of the lab's image on its network, with `extra` arguments.
    pub fn run(&self, name: &str, extra: &[&str]) -> Container {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--label",
            self.layout.label,
            "--network",
            self.layout.network,
        ];
        args.extend_from_slice(extra);
        args.push(self.layout.image);
        let id = docker(&args);
        Container {
            name: name.to_owned(),
            id,
        }
    }

    /// Who answers `n` requests to the service from the client (hostname -> count); panics on
    /// any failure.
    pub fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        self.spread_at(self.layout.service, n)
    }

    /// [`Lab::spread`] to the service at `service` (its IPv6 address, say).
    pub fn spread_at(&self, service: impl Into<SocketAddr>, n: usize) -> BTreeMap<String, usize> {
        let service = service.into();
        self.client.run(move || {
            let mut m = BTreeMap::new();
            for i in 0..n {
                let (status, body) =
                    http_get_any(service).unwrap_or_else(|e| panic!("request {i}: {e}"));
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

    /// Requests every 10 ms until the container with hostname `host` answers; returns the time
    /// since `since` (panics after `limit`).
    pub fn served_by(&self, host: &str, since: Instant, limit: Duration) -> Duration {
        self.served_by_at(self.layout.service, host, since, limit)
            .join()
            .expect("served_by")
    }

    /// [`Lab::served_by`] at `service`, on a thread of the client's (join it): several
    /// addresses can be watched at once.
    pub fn served_by_at(
        &self,
        service: impl Into<SocketAddr>,
        host: &str,
        since: Instant,
        limit: Duration,
    ) -> JoinHandle<Duration> {
        let service = service.into();
        let want = format!("Hello from {host}");
        self.client.spawn(move || {
            loop {
                if let Ok((200, body)) = http_get_any(service)
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

    /// Requests from the client every 5 ms until `stop`: (when, Ok(hostname) or Err(what
    /// failed)).
    pub fn load_loop(&self, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Request>> {
        load_loop(&self.client, self.layout.service, stop)
    }
}

/// A client namespace `ns` whose `eth0` is the peer of `uplink`, a veth in the root namespace
/// playing the host's uplink: the host is `host`/24 on it, the client `client`/24 with its
/// default route through the host.
pub fn client_behind_uplink(ns: &str, uplink: &str, host: Ipv4Addr, client: Ipv4Addr) -> Netns {
    let c = Netns::new(ns);
    sh(&[
        "ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", &c.name,
    ]);
    sh(&["ip", "addr", "add", &format!("{host}/24"), "dev", uplink]);
    sh(&["ip", "link", "set", uplink, "up"]);
    c.exec(&["ip", "link", "set", "eth0", "up"]);
    c.exec(&["ip", "addr", "add", &format!("{client}/24"), "dev", "eth0"]);
    c.exec(&["ip", "route", "add", "default", "via", &host.to_string()]);
    c
}

/// `docker stop` of `container` (whose hostname answers as `hostname`) while `client` sends
/// requests to `service` every 5 ms: no request may fail, and none may be answered by it once
/// stopped. Prints what it saw.
pub fn stop_under_load(
    client: &Netns,
    service: impl Into<SocketAddr>,
    container: &str,
    hostname: &str,
) {
    stop_under_load_with(client, service, hostname, || {
        docker(&["stop", container]);
    });
}

/// [`stop_under_load`] with the stop done by `stop_it` (`docker stop` on another engine, say).
/// Returns how many requests were made.
pub fn stop_under_load_with(
    client: &Netns,
    service: impl Into<SocketAddr>,
    hostname: &str,
    stop_it: impl FnOnce(),
) -> usize {
    stop_under_load_over(client, &[service.into()], hostname, stop_it)
}

/// [`stop_under_load_with`] with one load loop per service address at once (the IPv4 and IPv6
/// addresses of a dual-stack service, say): no request to any may fail, none may be answered
/// by the stopped container. Returns how many requests were made in all.
pub fn stop_under_load_over(
    client: &Netns,
    services: &[SocketAddr],
    hostname: &str,
    stop_it: impl FnOnce(),
) -> usize {
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = services
        .iter()
        .map(|&s| (s, load_loop(client, s, stop.clone())))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    stop_it();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (service, load) in loads {
        let results = load.join().expect("load loop");
        let failed: Vec<_> = results.iter().filter(|r| r.result.is_err()).collect();
        let from_stopped = results
            .iter()
            .filter(|r| r.sent > stopped && r.result.as_deref() == Ok(hostname))
            .count();
        println!(
            "docker stop under load to {service}: {} requests, {} failed",
            results.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "{service}: failed requests: {failed:?}");
        assert_eq!(
            from_stopped, 0,
            "{service}: the stopped container still got requests"
        );
        total += results.len();
    }
    total
}

/// One request of a [`load_loop`].
#[derive(Debug)]
pub struct Request {
    /// When the request began (its connect).
    pub sent: Instant,
    /// When it ended: answered, refused or timed out.
    pub done: Instant,
    /// Ok(the answering hostname) or Err(what failed).
    pub result: Result<String, String>,
}

impl Request {
    /// Whether the request was under way at some time in `from..=to`. A request that began
    /// before a fault ended may fail after it, by its timeout.
    pub fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.sent <= to && self.done >= from
    }
}

/// Requests from `client` to `service` every 5 ms until `stop`.
pub fn load_loop(
    client: &Netns,
    service: impl Into<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Request>> {
    let service = service.into();
    client.spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let result = match http_get_any(service) {
                Ok((200, body)) => Ok(body.trim_start_matches("Hello from ").to_owned()),
                Ok((s, body)) => Err(format!("status {s}: {body}")),
                Err(e) => Err(e),
            };
            out.push(Request {
                sent,
                done: Instant::now(),
                result,
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        remove(self.layout);
    }
}

impl Lab {
    /// The Docker e2e tests' lab (`TEST`), after removing what any crashed test run left
    /// (`netns::remove_leftovers`).
    pub fn for_tests() -> Self {
        remove_leftovers();
        Self::new(&TEST)
    }
}
