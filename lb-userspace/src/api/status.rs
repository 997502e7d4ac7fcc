//! What the running daemon serves, as `berth status` shows it: services, backends, health,
//! flows and packets ([`Status`]), and the table it prints.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// Exit and event counters by name.
    pub counters: Vec<(String, u64)>,
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
