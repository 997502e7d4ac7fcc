//! Balancers in front of a Docker host that announces its containers through `berth publish`
//! and etcd (shared by the e2e test and the discovery benchmark).
//!
//! One switch (a bridge in its own namespace) joins: the Docker host, which is this machine's
//! root namespace through a veth `bte-pub0` (10.72.0.1/24, the only root-namespace interface
//! made here; it also gets the route back to the clients' network through the floating gateway,
//! removed with it); balancer namespaces nK (10.72.0.1K and 10.74.0.1K on one `eth0`); an etcd
//! member (10.72.0.100); a client (10.74.0.2). The service is 10.99.0.1:8080 on every balancer;
//! the active one holds the client's route to it and the floating gateway 10.72.0.254 that the
//! Docker host sends the replies to (moving both is a keepalived-style failover).
//!
//! A request goes client -> balancer (DNAT to 10.72.0.1:<published port>) -> the Docker host's
//! own published-port DNAT -> container; the reply comes back through the gateway, i.e. the
//! same balancer, which translates it back to the service address.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    daemon::{Berth, berth_bin},
    etcd::Etcd,
    netns::{Netns, bridge, plug, sh, signal, veth},
};

/// The Docker host's end of the fabric (root namespace).
pub const UPLINK: &str = "bte-pub0";
pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 72, 0, 1);
pub const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 8080);
pub const PREFIX: &str = "/berth/services/web/";

pub struct Fabric {
    // Drop order: etcd, then the namespaces, then the uplink.
    pub etcd: Etcd,
    pub client: Netns,
    pub nodes: Vec<Netns>,
    /// Namespaces of other Docker hosts plugged into the switch (`plug`).
    plugged: std::sync::Mutex<Vec<String>>,
    _etcd_ns: Netns,
    _switch: Netns,
}

impl Fabric {
    /// The fabric with `nodes` balancer namespaces (no berth started yet) and etcd running.
    pub fn new(nodes: usize) -> Self {
        let _ = Command::new("ip").args(["link", "del", UPLINK]).output();
        let sw = Netns::new("psw");
        bridge(&sw);
        let port = |ns: &Netns, p: &str| plug(&sw, ns, p);
        sh(&[
            "ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "p-host", "netns",
            &sw.name,
        ]);
        sw.exec(&["ip", "link", "set", "p-host", "master", "sw0"]);
        sw.exec(&["ip", "link", "set", "p-host", "up"]);
        sh(&["ip", "addr", "add", &format!("{HOST}/24"), "dev", UPLINK]);
        sh(&["ip", "link", "set", UPLINK, "up"]);
        sh(&[
            "ip",
            "route",
            "add",
            "10.74.0.0/24",
            "via",
            "10.72.0.254",
            "dev",
            UPLINK,
        ]);
        let client = Netns::new("pcl");
        port(&client, "p-cl");
        client.exec(&["ip", "addr", "add", "10.74.0.2/24", "dev", "eth0"]);
        let et = Netns::new("petcd");
        port(&et, "p-etcd");
        et.exec(&["ip", "addr", "add", "10.72.0.100/24", "dev", "eth0"]);
        let mut ns = Vec::new();
        for k in 1..=nodes {
            let n = Netns::new(&format!("pn{k}"));
            port(&n, &format!("p-n{k}"));
            n.exec(&[
                "ip",
                "addr",
                "add",
                &format!("10.72.0.1{k}/24"),
                "dev",
                "eth0",
            ]);
            n.exec(&[
                "ip",
                "addr",
                "add",
                &format!("10.74.0.1{k}/24"),
                "dev",
                "eth0",
            ]);
            n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            ns.push(n);
        }
        let etcd = Etcd::start(&et, Ipv4Addr::new(10, 72, 0, 100));
        Self {
            etcd,
            client,
            nodes: ns,
            plugged: std::sync::Mutex::new(Vec::new()),
            _etcd_ns: et,
            _switch: sw,
        }
    }

    /// Plugs another Docker host (an engine host's namespace) into the switch as `addr`
    /// (10.72.0.x) on its interface `fab0`, with its route to the clients through the floating
    /// gateway, as this host's. Its published ports are then reached at `addr`.
    pub fn plug(&self, host: &Netns, port: &str, addr: Ipv4Addr) {
        veth(host, "fab0", &self._switch, port);
        self._switch
            .exec(&["ip", "link", "set", port, "master", "sw0"]);
        host.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "fab0"]);
        host.exec(&[
            "ip",
            "route",
            "add",
            "10.74.0.0/24",
            "via",
            "10.72.0.254",
            "dev",
            "fab0",
        ]);
        self.plugged
            .lock()
            .expect("plugged hosts")
            .push(host.name.clone());
    }

    /// A plugged host's switch port (`plug`'s `port`) down, as a pulled cable: the host keeps
    /// its addresses and routes (its `fab0` only loses its carrier); `up` plugs it back.
    pub fn set_port(&self, port: &str, up: bool) {
        self._switch
            .exec(&["ip", "link", "set", port, if up { "up" } else { "down" }]);
    }

    /// A balancer's config: the service, its backends under `PREFIX` in this fabric's etcd.
    pub fn balancer_config(&self) -> String {
        format!(
            r#"
[dataplane]
hash_seed = 7
maglev_table_size = 4099
[metrics]
enabled = false
[etcd]
endpoints = ["{}"]
timeout_ms = 1000
[[service]]
name = "web"
listen = "{SERVICE}"
etcd = {{ prefix = "{PREFIX}" }}
"#,
            self.etcd.endpoint()
        )
    }

    /// berth on balancer `k` (1-based), synced with etcd.
    pub fn berth(&self, k: usize) -> Berth {
        let b = Berth::start(&self.nodes[k - 1], &self.balancer_config(), &["eth0"]);
        b.wait_for("etcd: synced", 1);
        b
    }

    /// Balancer `k` takes the traffic: the client's route to the service and the floating
    /// gateway move to it (the Docker hosts' neighbour entries are flushed in place of the
    /// gratuitous ARP keepalived would send).
    pub fn activate(&self, k: usize) {
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = n
                .command("ip")
                .args(["addr", "del", "10.72.0.254/24", "dev", "eth0"])
                .output();
            if i + 1 == k {
                n.exec(&["ip", "addr", "add", "10.72.0.254/24", "dev", "eth0"]);
            }
        }
        sh(&["ip", "neigh", "flush", "dev", UPLINK]);
        for host in self.plugged.lock().expect("plugged hosts").iter() {
            sh(&["ip", "-n", host, "neigh", "flush", "dev", "fab0"]);
        }
        self.client.exec(&[
            "ip",
            "route",
            "replace",
            &format!("{}/32", SERVICE.ip()),
            "via",
            &format!("10.74.0.1{k}"),
        ]);
    }

    /// `berth publish`'s config: containers of `image` with port 8000 published, under
    /// `PREFIX`, as this host (`HOST`), with a lease of `ttl_secs`.
    pub fn publish_config(&self, image: &str, ttl_secs: u32) -> String {
        format!(
            r#"
[etcd]
endpoints = ["{}"]
timeout_ms = 1000
[publish]
address = "{HOST}"
ttl_secs = {ttl_secs}
[[publish.service]]
prefix = "{PREFIX}"
image = "{image}"
port = 8000
"#,
            self.etcd.endpoint()
        )
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", UPLINK]).output();
    }
}

/// `berth publish` running on this host (the root namespace, where Docker is), or in another
/// Docker host's namespace; killed on drop.
pub struct Publisher {
    child: Option<Child>,
    pub log: PathBuf,
    config: PathBuf,
    /// The namespace it runs in (None: the root namespace).
    ns: Option<String>,
    env: Vec<(String, String)>,
}

impl Publisher {
    pub fn start(tag: &str, config: &str) -> Self {
        Self::start_in(tag, config, None, &[])
    }

    /// Started in namespace `ns` (None: this one) with `env` added to its environment (e.g.
    /// `DOCKER_HOST`).
    pub fn start_in(tag: &str, config: &str, ns: Option<&Netns>, env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{tag}.publish.toml"));
        std::fs::write(&path, config).expect("publish config");
        let log = dir.join(format!("{tag}.publish.log"));
        let _ = std::fs::remove_file(&log);
        let mut p = Self {
            child: None,
            log,
            config: path,
            ns: ns.map(|n| n.name.clone()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        p.respawn();
        p
    }

    /// Starts it again with the same config (after `kill` or `stop`).
    pub fn respawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match &self.ns {
            Some(ns) => crate::netns::ns_command(ns, berth_bin()),
            None => Command::new(berth_bin()),
        };
        self.child = Some(
            cmd.args(["publish", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "info")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("berth publish"),
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits for the exit.
    pub fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            signal(c.id() as i32, sig);
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        if std::thread::panicking() {
            eprintln!("---- berth publish log ----\n{}", self.log_text());
        }
    }
}

/// The backends in `berth`'s pool for `SERVICE` (from `berth status`).
pub fn pool(berth: &Berth) -> Vec<String> {
    berth
        .status()
        .services
        .iter()
        .filter(|s| s.listen == SERVICE.to_string())
        .flat_map(|s| s.backends.iter().filter(|b| b.in_pool))
        .map(|b| b.address.clone())
        .collect()
}

/// Waits until `berth`'s pool has `n` backends; returns how long that took.
pub fn wait_pool(berth: &Berth, n: usize, limit: Duration) -> Duration {
    let t = Instant::now();
    while pool(berth).len() != n {
        assert!(
            t.elapsed() < limit,
            "pool never reached {n} backends: {:?}",
            pool(berth)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}
