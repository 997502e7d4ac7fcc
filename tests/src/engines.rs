//! Other Docker hosts on this machine, for the multi-engine tests: each is a `dockerd` of its
//! own in a network namespace of its own (`bte-eng-<name>`), with its own `--data-root`,
//! `--exec-root`, `--pidfile`, bridge and subnet, its cgroups under `/bte-eng-<name>`, and its
//! API on `tcp://<its address>:2375` (or TLS on 2376, with a CA, server and client
//! certificates made by `openssl` for the test). A veth connects it to the root namespace,
//! where berth runs: the host is `10.42.<n>.2`, the root namespace `10.42.<n>.1`, and the
//! host's default route goes back through the root namespace (so DNAT works too: replies to
//! clients come back through berth). The test's `hello` image is built in it.
//!
//! Only the mount namespace is shared with the machine (dockerd needs the host's cgroups):
//! everything an engine host writes is under `/tmp/bte-engines/<name>`. It is stopped and
//! removed on drop, and [`remove_leftovers`] (run by `netns::remove_leftovers`, before any
//! namespace is cleared) removes what a killed run left: dockerd stopped as an operator would
//! (it stops its containers), then whatever still runs from that directory or in its cgroups
//! killed, its mounts detached, its directory and cgroups removed.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    docker::{Container, build_hello_image_on},
    netns::{Netns, alive, sh, signal, try_sh},
};

/// Where every engine host keeps its files.
pub const BASE: &str = "/tmp/bte-engines";

/// The port of a plain engine's API, and of a TLS one (Docker's conventions).
pub const PLAIN_PORT: u16 = 2375;
pub const TLS_PORT: u16 = 2376;

/// The label on every container an engine host's test starts.
pub const LABEL: &str = "berth-test=1";

/// What a test asks for.
#[derive(Debug, Clone, Copy)]
pub struct HostSpec {
    /// Short name: the engine's name in berth's config, the namespace `bte-eng-<name>`.
    pub name: &'static str,
    /// Its number: addresses `10.42.<n>.0/24` on the link, `172.30.<n>.0/24` for its
    /// containers.
    pub n: u8,
    /// API over TLS (verified both ways) instead of plain TCP.
    pub tls: bool,
}

/// The certificates of a TLS engine host (PEM files).
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// berth's client certificate and key (the engine runs with `--tlsverify`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A Docker host of its own, reached from the root namespace through `link`.
pub struct EngineHost {
    pub spec: HostSpec,
    pub ns: Netns,
    /// The veth's end in the root namespace.
    pub link: String,
    /// The root namespace's address on the link (the host's gateway).
    pub gateway: Ipv4Addr,
    /// The host's address: its API and its published ports are there.
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    pub certs: Option<Certs>,
    /// How long dockerd took to answer after it was started.
    pub started_in: Duration,
}

/// Runs `args`, ignoring the outcome (clean-up).
fn quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Pids of the processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
            && pid != std::process::id() as i32
        {
            out.push(pid);
        }
    }
    out
}

/// The cgroup v1 hierarchies' directories of an engine host's containers (`--cgroup-parent`).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(format!("bte-eng-{name}")))
        .filter(|p| p.is_dir())
        .collect()
}

/// Every process in the cgroups under `dir` (depth first).
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(cgroup_pids(&e.path()));
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    out
}

fn rmdir_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Stops what runs of engine host `name` (files under `dir`) and removes its files and
/// cgroups: dockerd gets SIGTERM and 20 s to stop its containers, then everything left is
/// killed, mounts under `dir` are detached and the directory removed.
fn tear_down(name: &str, dir: &Path) {
    if let Some(pid) = pid_in(&dir.join("docker.pid"))
        && alive(pid)
    {
        signal(pid, libc::SIGTERM);
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let dir_s = dir.display().to_string();
    for _ in 0..3 {
        let mut pids = pids_mentioning(&dir_s);
        for cg in cgroup_dirs(name) {
            pids.extend(cgroup_pids(&cg));
        }
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            signal(*p, libc::SIGKILL);
        }
        let t = Instant::now();
        while pids.iter().any(|p| alive(*p)) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Overlay and namespace mounts of its containers, deepest first.
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir_s))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        quiet(&["umount", "-l", &m]);
    }
    let _ = std::fs::remove_dir_all(dir);
    for cg in cgroup_dirs(name) {
        rmdir_tree(&cg);
    }
}

/// Removes what killed runs left of engine hosts (see the module's header). Cheap when there
/// is nothing.
pub fn remove_leftovers() {
    for e in std::fs::read_dir(BASE).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        tear_down(&name, &e.path());
    }
    // Cgroups of a host whose directory is already gone.
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for c in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
            if c.file_name().to_string_lossy().starts_with("bte-eng-") {
                for p in cgroup_pids(&c.path()) {
                    signal(p, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(100));
                rmdir_tree(&c.path());
            }
        }
    }
}

/// `openssl ARGS` in `dir`, panicking with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for `addr` and a client certificate, all P-256, valid 2 days.
fn make_certs(dir: &Path, addr: Ipv4Addr) -> Certs {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=berth test CA",
    ]);
    openssl(dir, &ca);
    for (who, cn, ext) in [
        (
            "server",
            "berth test engine",
            format!("subjectAltName=IP:{addr}\nextendedKeyUsage=serverAuth\n"),
        ),
        (
            "client",
            "berth",
            "extendedKeyUsage=clientAuth\n".to_owned(),
        ),
    ] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let extfile = format!("{who}.ext");
        std::fs::write(dir.join(&extfile), ext).expect("extension file");
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        let subj = format!("/CN={cn}");
        req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server-cert.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client-cert.pem"),
        client_key: dir.join("client-key.pem"),
    }
}

impl EngineHost {
    /// Builds the host (namespace, link, certificates), starts its dockerd, waits until it
    /// answers, and builds image `image` in it.
    pub fn start(spec: HostSpec, image: &str) -> Self {
        let dir = PathBuf::from(BASE).join(spec.name);
        tear_down(spec.name, &dir);
        std::fs::create_dir_all(&dir).expect("engine host directory");
        let link = format!("bte-e{}0", spec.name);
        let gateway = Ipv4Addr::new(10, 42, spec.n, 1);
        let addr = Ipv4Addr::new(10, 42, spec.n, 2);
        quiet(&["ip", "link", "del", &link]);
        let ns = Netns::new(&format!("eng-{}", spec.name));
        sh(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        sh(&["ip", "addr", "add", &format!("{gateway}/24"), "dev", &link]);
        sh(&["ip", "link", "set", &link, "up"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.exec(&["ip", "route", "add", "default", "via", &gateway.to_string()]);
        let certs = spec.tls.then(|| make_certs(&dir, addr));
        let mut host = Self {
            spec,
            ns,
            link,
            gateway,
            addr,
            dir,
            certs,
            started_in: Duration::ZERO,
        };
        host.start_dockerd();
        build_hello_image_on(Some(&host.socket()), image, true);
        host
    }

    /// The Unix socket the test drives this engine through (berth uses the TCP endpoint).
    pub fn socket(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    pub fn port(&self) -> u16 {
        if self.spec.tls { TLS_PORT } else { PLAIN_PORT }
    }

    /// The engine's API as berth is told it.
    pub fn endpoint(&self) -> String {
        format!("tcp://{}:{}", self.addr, self.port())
    }

    /// This engine as a `[[docker.engine]]` entry of berth's config.
    pub fn engine_toml(&self) -> String {
        let mut t = format!(
            "[[docker.engine]]\nname = \"{}\"\nendpoint = \"{}\"\n",
            self.spec.name,
            self.endpoint()
        );
        if let Some(c) = &self.certs {
            t.push_str(&format!(
                "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                c.ca.display(),
                c.client_cert.display(),
                c.client_key.display()
            ));
        }
        t
    }

    /// Starts dockerd in the host's namespace (pid files of a killed one removed first) and
    /// waits until it answers on its socket.
    pub fn start_dockerd(&mut self) {
        let d = &self.dir;
        for stale in ["docker.pid", "exec/containerd/containerd.pid"] {
            let f = d.join(stale);
            if pid_in(&f).is_none_or(|p| !alive(p)) {
                let _ = std::fs::remove_file(&f);
            }
        }
        std::fs::write(d.join("daemon.json"), "{}").expect("daemon.json");
        let p = |f: &str| d.join(f).display().to_string();
        let mut args = vec![
            "--config-file".to_owned(),
            p("daemon.json"),
            "--data-root".into(),
            p("data"),
            "--exec-root".into(),
            p("exec"),
            "--pidfile".into(),
            p("docker.pid"),
            "-H".into(),
            self.socket(),
            "-H".into(),
            self.endpoint(),
            "--bip".into(),
            format!("172.30.{}.1/24", self.spec.n),
            "--cgroup-parent".into(),
            format!("/bte-eng-{}", self.spec.name),
        ];
        match &self.certs {
            Some(c) => args.extend([
                "--tlsverify".into(),
                "--tlscacert".into(),
                c.ca.display().to_string(),
                "--tlscert".into(),
                c.server_cert.display().to_string(),
                "--tlskey".into(),
                c.server_key.display().to_string(),
            ]),
            // Said on purpose: dockerd 20.10 otherwise waits 15 s to warn about plain TCP.
            None => args.push("--tls=false".into()),
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .expect("dockerd log");
        let t = Instant::now();
        // nsenter enters the network namespace only (dockerd needs the host's cgroups and
        // mounts); setsid --fork leaves it to init, as an operator's dockerd is.
        let status = Command::new("setsid")
            .args([
                "--fork",
                "nsenter",
                &format!("--net=/run/netns/{}", self.ns.name),
                "dockerd",
            ])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .status()
            .expect("start dockerd");
        assert!(status.success(), "setsid dockerd: {status}");
        while try_sh(&[
            "docker",
            "-H",
            &self.socket(),
            "version",
            "--format",
            "{{.Server.Version}}",
        ])
        .is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "engine {} did not answer within 30 s: {}",
                self.spec.name,
                std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.started_in = t.elapsed();
    }

    /// `docker ARGS` against this engine, trimmed stdout; panics with stderr on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        let socket = self.socket();
        let mut full = vec!["docker", "-H", socket.as_str()];
        full.extend_from_slice(args);
        sh(&full).trim().to_owned()
    }

    /// `docker run -d` of `image` with its port 8000 published, and `extra` arguments.
    pub fn run(&self, name: &str, image: &str, extra: &[&str]) -> Container {
        let mut args = vec!["run", "-d", "--name", name, "--label", LABEL, "-p", "8000"];
        args.extend_from_slice(extra);
        args.push(image);
        let id = self.docker(&args);
        Container {
            name: name.to_owned(),
            id,
        }
    }

    /// Cuts the host off as a host that dies without a word: its own end of the link goes
    /// down, so nothing sent to it is answered (no reset, no unreachable). The root
    /// namespace's route to it stays (a link without carrier keeps its routes), so nothing
    /// meant for it leaves through another route.
    pub fn cut(&self) {
        self.ns.exec(&["ip", "link", "set", "eth0", "down"]);
    }

    /// Brings the host's end of the link back up, with its default route.
    pub fn reconnect(&self) {
        self.ns.exec(&["ip", "link", "set", "eth0", "up"]);
        self.ns.exec(&[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            &self.gateway.to_string(),
        ]);
    }

    /// Kills dockerd alone (SIGKILL), as an OOM kill or a crash of the daemon would: the
    /// host, its link and its containers stay (a dockerd started again without live-restore
    /// stops them, then restarts those with a restart policy).
    pub fn kill_dockerd(&self) {
        let pid = pid_in(&self.dir.join("docker.pid")).expect("dockerd's pid file");
        signal(pid, libc::SIGKILL);
        let t = Instant::now();
        while alive(pid) {
            assert!(t.elapsed() < Duration::from_secs(10), "dockerd did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills dockerd and every container of the host at once (SIGKILL), as a host crash
    /// would; the namespace and link stay.
    pub fn crash(&self) {
        let mut pids: Vec<i32> = pid_in(&self.dir.join("docker.pid")).into_iter().collect();
        pids.extend(pids_mentioning(&self.dir.display().to_string()));
        for cg in cgroup_dirs(self.spec.name) {
            pids.extend(cgroup_pids(&cg));
        }
        for p in &pids {
            signal(*p, libc::SIGKILL);
        }
        let t = Instant::now();
        while pids.iter().any(|p| alive(*p)) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "engine host did not die"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EngineHost {
    fn drop(&mut self) {
        tear_down(self.spec.name, &self.dir);
        let _ = std::fs::remove_dir(BASE);
        quiet(&["ip", "link", "del", &self.link]);
        // The namespace goes with `ns`.
    }
}
