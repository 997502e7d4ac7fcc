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
    /// "healthy", "unhealthy", "unchecked" (no health check configured), or "starting" (a
    /// new container whose port does not accept connections yet: not in the pool).
    pub health: String,
    pub weight: u32,
    /// Whether it is in the Maglev table (takes new flows).
    pub in_pool: bool,
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
            ]);
        }
        for b in &svc.backends {
            rows.push([
                svc.name.clone(),
                svc.listen.clone(),
                svc.protocol.clone(),
                b.address.clone(),
                b.container.clone().unwrap_or_else(|| "-".into()),
                b.health.clone(),
                if b.in_pool { "in" } else { "out" }.into(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                b.packets.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..10)
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
                    health: "healthy".into(),
                    weight: 1,
                    in_pool: true,
                    active_flows: 3,
                    packets: 120,
                    bytes: 9000,
                    new_flows: 4,
                }],
            }],
            counters: vec![],
            etcd: None,
        };
        let t = render(&s);
        assert!(t.lines().next().unwrap().starts_with("SERVICE"));
        let row = t.lines().nth(1).unwrap();
        for cell in [
            "web",
            "0.0.0.0:8080",
            "172.17.0.2:8000",
            "app-1",
            "healthy",
            "in",
            "3",
            "120",
        ] {
            assert!(row.contains(cell), "{row}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }
}
