//! What the running daemon serves, as `berth status` shows it: services, backends, health,
//! flows and packets ([`Status`]), and the table it prints.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// Exit and event counters by name.
    pub counters: Vec<(String, u64)>,
    /// The etcd source, when services take backends from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdStatus>,
    /// The Docker Engines watched.
    #[serde(default)]
    pub engines: Vec<EngineStatus>,
}

/// Whether etcd is reachable, and what berth last read from it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EtcdStatus {
    pub endpoints: Vec<String>,
    /// Every prefix read and watched (false: unreachable, the last known backends serve).
    pub connected: bool,
    /// Why it is unreachable.
    pub error: Option<String>,
    /// Seconds since it became unreachable.
    pub down_for_secs: Option<f64>,
    /// Keys known under the watched prefixes.
    pub keys: usize,
    /// The latest etcd revision seen.
    pub revision: i64,
    /// Puts and deletes received through the watches.
    pub events: u64,
    /// Full reads of the prefixes (the first one, and one per reconnect or compaction).
    pub resyncs: u64,
}

/// One Docker Engine as the daemon sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EngineStatus {
    pub name: String,
    /// As Docker spells it.
    pub endpoint: String,
    /// Its watcher is connected (listed, following events, answering pings).
    pub connected: bool,
    /// This host's engine (containers reached at their own addresses).
    pub this_host: bool,
    /// Where its published ports are reached (another host's engine).
    pub address: Option<String>,
    /// Its running containers, as last known.
    pub containers: usize,
    /// Docker's timestamp of the last container event it sent (seconds since the epoch).
    pub last_event_unix_secs: Option<f64>,
    /// How long it has not answered (while disconnected).
    pub unreachable_secs: Option<f64>,
    /// Unreachable past the grace: its containers back only health-checked services.
    pub lost: bool,
    /// Why it was last disconnected.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: String,
    pub protocol: String,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub address: String,
    /// The container behind it, if discovered through Docker.
    pub container: Option<String>,
    /// The engine that container runs on.
    #[serde(default)]
    pub engine: Option<String>,
    /// "healthy", "unhealthy", "unchecked" (no health check configured), or "starting" (a
    /// new container whose port does not accept connections yet: not in the pool).
    pub health: String,
    pub weight: u32,
    /// Whether it is in the Maglev table (takes new flows).
    pub in_pool: bool,
    /// How new flows reach it: "dnat", or "fullnat" and the source address they get (once in
    /// the kernel: "fullnat 10.0.0.1").
    #[serde(default)]
    pub nat: String,
    /// Open conntrack flows pinned to it.
    pub active_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// The table `berth status` prints.
pub fn render(s: &Status) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "LISTEN",
            "PROTO",
            "BACKEND",
            "CONTAINER",
            "HEALTH",
            "POOL",
            "NAT",
            "WEIGHT",
            "FLOWS",
            "PACKETS",
        ]
        .map(String::from),
    ];
    for svc in &s.services {
        if svc.backends.is_empty() {
            rows.push([
                svc.name.clone(),
                svc.listen.clone(),
                svc.protocol.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for b in &svc.backends {
            rows.push([
                svc.name.clone(),
                svc.listen.clone(),
                svc.protocol.clone(),
                b.address.clone(),
                match (&b.container, &b.engine) {
                    (Some(c), Some(e)) if s.engines.len() > 1 => format!("{e}/{c}"),
                    (Some(c), _) => c.clone(),
                    (None, _) => "-".into(),
                },
                b.health.clone(),
                if b.in_pool { "in" } else { "out" }.into(),
                b.nat.clone(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                b.packets.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..11)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    if let Some(e) = &s.etcd {
        if e.connected {
            out.push_str(&format!(
                "etcd: connected to {} ({} keys, revision {})\n",
                e.endpoints.join(", "),
                e.keys,
                e.revision
            ));
        } else {
            out.push_str(&format!(
                "etcd: UNREACHABLE ({}) for {:.0} s at {}; serving the {} keys last read, \
                 retrying\n",
                e.error.as_deref().unwrap_or("not connected yet"),
                e.down_for_secs.unwrap_or(0.0),
                e.endpoints.join(", "),
                e.keys
            ));
        }
    }
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if !s.engines.is_empty() {
        out.push('\n');
        out.push_str(&engines_table(&s.engines));
    }
    out
}

/// The engines' table under the backends'.
fn engines_table(engines: &[EngineStatus]) -> String {
    let mut rows = vec![["ENGINE", "ENDPOINT", "STATE", "CONTAINERS", "ERROR"].map(String::from)];
    for e in engines {
        let state = match (e.connected, e.lost, e.unreachable_secs) {
            (true, _, _) if e.this_host => "connected (this host)".to_owned(),
            (true, _, _) => format!(
                "connected ({})",
                e.address.as_deref().unwrap_or("no address")
            ),
            (false, true, Some(s)) => format!("lost (unreachable {s:.0} s)"),
            (false, _, Some(s)) => format!("unreachable {s:.0} s"),
            (false, _, None) => "unreachable".to_owned(),
        };
        rows.push([
            e.name.clone(),
            e.endpoint.clone(),
            state,
            e.containers.to_string(),
            if e.connected {
                "-".into()
            } else {
                e.error.clone().unwrap_or_else(|| "-".into())
            },
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_backend() {
        let s = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:8080".into(),
                protocol: "tcp".into(),
                backends: vec![BackendStatus {
                    address: "172.17.0.2:8000".into(),
                    container: Some("app-1".into()),
                    engine: Some("a".into()),
                    health: "healthy".into(),
                    weight: 1,
                    in_pool: true,
                    nat: "fullnat 10.0.0.1".into(),
                    active_flows: 3,
                    packets: 120,
                    bytes: 9000,
                    new_flows: 4,
                }],
            }],
            counters: vec![],
            etcd: None,
            engines: vec![
                EngineStatus {
                    name: "a".into(),
                    endpoint: "unix:///var/run/docker.sock".into(),
                    connected: true,
                    this_host: true,
                    address: None,
                    containers: 1,
                    last_event_unix_secs: None,
                    unreachable_secs: None,
                    lost: false,
                    error: None,
                },
                EngineStatus {
                    name: "b".into(),
                    endpoint: "tcp://10.42.2.2:2375".into(),
                    connected: false,
                    this_host: false,
                    address: Some("10.42.2.2".into()),
                    containers: 2,
                    last_event_unix_secs: Some(1.0),
                    unreachable_secs: Some(12.4),
                    lost: true,
                    error: Some("ping timed out".into()),
                },
            ],
        };
        let t = render(&s);
        let b = t
            .lines()
            .find(|l| l.starts_with("b "))
            .expect("engine b's row");
        for cell in [
            "tcp://10.42.2.2:2375",
            "lost (unreachable 12 s)",
            "ping timed out",
        ] {
            assert!(b.contains(cell), "{t}");
        }
        assert!(t.lines().next().unwrap().starts_with("SERVICE"));
        let row = t.lines().nth(1).unwrap();
        for cell in [
            "web",
            "0.0.0.0:8080",
            "172.17.0.2:8000",
            "a/app-1",
            "healthy",
            "in",
            "fullnat 10.0.0.1",
            "3",
            "120",
        ] {
            assert!(row.contains(cell), "{row}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }
}
