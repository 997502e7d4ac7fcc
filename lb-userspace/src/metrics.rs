//! Prometheus text exposition of what `berth status` shows, plus the dataplane's exit and event
//! counters and conntrack occupancy. Served over plain HTTP on `[metrics] listen` (loopback by
//! default), rendered from a [`Status`](crate::status::Status) so both views agree.

use std::fmt::Write as _;

use crate::status::Status;

/// Extra figures the status document does not carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    pub docker_events: u64,
    /// Seconds from the last Docker event's timestamp to its change being applied.
    pub discovery_lag_seconds: Option<f64>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics page.
pub fn render(s: &Status, x: &Extra) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let backend_rows =
        |f: &dyn Fn(&crate::status::BackendStatus) -> String| -> Vec<(String, String)> {
            s.services
                .iter()
                .flat_map(|svc| {
                    svc.backends.iter().map(move |b| {
                        (
                            format!(
                                "service=\"{}\",backend=\"{}\",container=\"{}\"",
                                escape(&svc.name),
                                escape(&b.address),
                                escape(b.container.as_deref().unwrap_or(""))
                            ),
                            f(b),
                        )
                    })
                })
                .collect()
        };
    family(
        "berth_backend_packets_total",
        "counter",
        "Packets translated for a backend (both directions).",
        backend_rows(&|b| b.packets.to_string()),
    );
    family(
        "berth_backend_bytes_total",
        "counter",
        "Bytes translated for a backend (both directions).",
        backend_rows(&|b| b.bytes.to_string()),
    );
    family(
        "berth_backend_new_flows_total",
        "counter",
        "New flows balanced to a backend.",
        backend_rows(&|b| b.new_flows.to_string()),
    );
    family(
        "berth_backend_active_flows",
        "gauge",
        "Open flows pinned to a backend.",
        backend_rows(&|b| b.active_flows.to_string()),
    );
    family(
        "berth_backend_healthy",
        "gauge",
        "1 if the backend passes its health check (or has none), else 0.",
        backend_rows(&|b| u8::from(b.health != "unhealthy").to_string()),
    );
    family(
        "berth_backend_in_pool",
        "gauge",
        "1 if the backend takes new flows.",
        backend_rows(&|b| u8::from(b.in_pool).to_string()),
    );
    let service_rows = |f: &dyn Fn(&crate::status::ServiceStatus) -> u64| -> Vec<(String, String)> {
        s.services
            .iter()
            .map(|svc| {
                (
                    format!(
                        "service=\"{}\",listen=\"{}\",protocol=\"{}\"",
                        escape(&svc.name),
                        svc.listen,
                        svc.protocol
                    ),
                    f(svc).to_string(),
                )
            })
            .collect()
    };
    family(
        "berth_service_packets_total",
        "counter",
        "Packets translated for a service's backends.",
        service_rows(&|svc| svc.backends.iter().map(|b| b.packets).sum()),
    );
    family(
        "berth_service_new_flows_total",
        "counter",
        "New flows balanced by a service.",
        service_rows(&|svc| svc.backends.iter().map(|b| b.new_flows).sum()),
    );
    let (exits, events): (Vec<_>, Vec<_>) = s
        .counters
        .iter()
        .partition(|(n, _)| !n.starts_with("event_"));
    family(
        "berth_packets_total",
        "counter",
        "Packets by the program's exit: action and reason (see README, action policy).",
        exits
            .iter()
            .map(|(n, v)| {
                let (action, reason) = n.split_once('_').unwrap_or((n.as_str(), ""));
                (
                    format!("action=\"{action}\",reason=\"{reason}\""),
                    v.to_string(),
                )
            })
            .collect(),
    );
    family(
        "berth_dataplane_events_total",
        "counter",
        "Notable dataplane events (not exits).",
        events
            .iter()
            .map(|(n, v)| {
                (
                    format!("event=\"{}\"", n.trim_start_matches("event_")),
                    v.to_string(),
                )
            })
            .collect(),
    );
    family(
        "berth_conntrack_entries",
        "gauge",
        "Conntrack entries in use (two per flow).",
        vec![(String::new(), x.conntrack_entries.to_string())],
    );
    family(
        "berth_conntrack_capacity",
        "gauge",
        "Conntrack map size.",
        vec![(String::new(), x.conntrack_capacity.to_string())],
    );
    family(
        "berth_docker_events_total",
        "counter",
        "Docker container and network events handled.",
        vec![(String::new(), x.docker_events.to_string())],
    );
    if let Some(lag) = x.discovery_lag_seconds {
        family(
            "berth_discovery_lag_seconds",
            "gauge",
            "From the last Docker event's timestamp to its change being in the kernel.",
            vec![(String::new(), format!("{lag:.6}"))],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, ServiceStatus};

    #[test]
    fn exposition_format() {
        let s = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:8080".into(),
                protocol: "tcp".into(),
                backends: vec![BackendStatus {
                    address: "10.0.0.2:8000".into(),
                    container: Some("a\"b".into()),
                    health: "unhealthy".into(),
                    weight: 1,
                    in_pool: false,
                    active_flows: 2,
                    packets: 10,
                    bytes: 700,
                    new_flows: 3,
                }],
            }],
            counters: vec![
                ("pass_no_service".into(), 5),
                ("event_ct_closing".into(), 1),
            ],
        };
        let m = render(
            &s,
            &Extra {
                conntrack_entries: 4,
                conntrack_capacity: 1024,
                docker_events: 7,
                discovery_lag_seconds: Some(0.002),
            },
        );
        for line in [
            "# TYPE berth_backend_packets_total counter",
            r#"berth_backend_packets_total{service="web",backend="10.0.0.2:8000",container="a\"b"} 10"#,
            r#"berth_backend_healthy{service="web",backend="10.0.0.2:8000",container="a\"b"} 0"#,
            r#"berth_service_new_flows_total{service="web",listen="0.0.0.0:8080",protocol="tcp"} 3"#,
            r#"berth_packets_total{action="pass",reason="no_service"} 5"#,
            r#"berth_dataplane_events_total{event="ct_closing"} 1"#,
            "berth_conntrack_capacity 1024",
            "berth_discovery_lag_seconds 0.002000",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
    }
}
