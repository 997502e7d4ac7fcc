//! What `berth status` and a metrics page are made of: cheap map reads taken on the event loop
//! ([`build_status`]), and the conntrack walk done off it.

use std::collections::{BTreeMap, HashMap};

use tracing::warn;

use super::engines::Engines;
use crate::{
    api::status,
    config::Service,
    dataplane::{ConntrackReader, DataplaneError},
    discovery::{ContainerInfo, ContainerKey},
    health::{NetChecker, Readiness, Supervisor},
    reconciler::Reconciler,
};

/// What `berth status` shows: every configured or discovered backend, in the pool or not.
pub(super) fn build_status(
    rec: &Reconciler,
    health: &Supervisor<NetChecker>,
    readiness: &Readiness,
    desired: &[Service],
    containers: &BTreeMap<ContainerKey, ContainerInfo>,
    engines: &Engines,
) -> status::Status {
    let dp = rec.dataplane();
    // By address and protocol, not by name: after a restart the adopted services carry
    // placeholder names until the first apply claims them (which waits for Docker's first
    // listing), and their counters are the pinned totals all the same.
    let applied: HashMap<_, _> = rec
        .state()
        .into_iter()
        .map(|s| ((s.listen, s.protocol), s))
        .collect();
    let views = engines.views();
    let container_of =
        |addr: &std::net::SocketAddr| crate::discovery::container_at(containers, &views, *addr);
    let services = desired
        .iter()
        .map(|s| {
            let pool = applied.get(&(s.listen, s.protocol));
            let backends = s
                .backends
                .iter()
                .map(|crate::config::BackendSpec { addr, weight, nat }| {
                    let id =
                        pool.and_then(|p| p.backends.iter().find(|b| b.0 == *addr).map(|b| b.1));
                    let snat =
                        pool.and_then(|p| p.full_nat.iter().find(|b| b.0 == *addr).map(|b| b.1));
                    let c = id
                        .and_then(|id| dp.backend_counters(id).ok())
                        .unwrap_or_default();
                    let container = container_of(addr);
                    status::BackendStatus {
                        address: addr.to_string(),
                        container: container.map(|c| c.name.clone()),
                        engine: container.map(|c| c.engine.clone()),
                        health: match health.state(&s.name, *addr) {
                            _ if readiness.waiting(&s.name, *addr) => "starting",
                            None => "unchecked",
                            Some(true) => "healthy",
                            Some(false) => "unhealthy",
                        }
                        .into(),
                        weight: *weight,
                        in_pool: id.is_some(),
                        nat: match (nat, snat) {
                            (_, Some(from)) => format!("fullnat {from}"),
                            (crate::config::Nat::Full, None) => "fullnat".into(),
                            (crate::config::Nat::Dnat, None) => "dnat".into(),
                        },
                        // Filled in by `fill_active_flows`, off the event loop.
                        active_flows: 0,
                        packets: c.packets,
                        bytes: c.bytes,
                        new_flows: c.new_flows,
                    }
                })
                .collect();
            status::ServiceStatus {
                name: s.name.clone(),
                listen: s.listen.to_string(),
                protocol: s.protocol.to_string(),
                backends,
            }
        })
        .collect();
    let counters = dp
        .reason_counters()
        .map(|v| {
            v.into_iter()
                .map(|(r, n)| (r.name().to_owned(), n))
                .collect()
        })
        .unwrap_or_default();
    let now = std::time::Instant::now();
    let engines = engines
        .iter()
        .map(|(name, e)| status::EngineStatus {
            name: name.clone(),
            endpoint: e.endpoint.clone(),
            connected: e.connected,
            this_host: e.reach.is_some_and(|r| r.local),
            address: e.reach.and_then(|r| r.address).map(|a| a.to_string()),
            containers: containers
                .values()
                .filter(|c| c.engine == *name && c.running)
                .count(),
            last_event_unix_secs: e.last_event_ns.map(|t| t as f64 / 1e9),
            unreachable_secs: e
                .unreachable_since
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            lost: e.lost,
            error: e.error.clone(),
        })
        .collect();
    status::Status {
        services,
        counters,
        engines,
        etcd: None,
    }
}

/// What a metrics page is made of, taken on the event loop.
pub(super) struct MetricsInputs {
    pub(super) status: status::Status,
    pub(super) reader: Result<ConntrackReader, DataplaneError>,
    pub(super) extra: crate::api::metrics::Extra,
}

impl MetricsInputs {
    /// Walks conntrack (on a blocking thread) and renders the page.
    pub(super) async fn render(mut self) -> String {
        let (entries, entries6) = walk_conntrack(self.reader).await;
        fill_active_flows(&mut self.status, &entries, &entries6);
        self.extra.conntrack_entries = (entries.len() + entries6.len()) as u64;
        self.extra.conntrack_walks = crate::dataplane::conntrack_walks();
        crate::api::metrics::render(self.status, self.extra)
    }
}

/// Every conntrack entry, IPv4's and IPv6's, read on a blocking thread (empty, with a warning,
/// if that fails).
pub(super) async fn walk_conntrack(
    reader: Result<ConntrackReader, DataplaneError>,
) -> (
    Vec<(lb_common::FlowKey, lb_common::CtEntry)>,
    Vec<(lb_common::v6::FlowKey6, lb_common::v6::CtEntry6)>,
) {
    match reader {
        Ok(r) => tokio::task::spawn_blocking(move || (r.entries(), r.entries6()))
            .await
            .unwrap_or_default(),
        Err(e) => {
            warn!("reading conntrack: {e}");
            Default::default()
        }
    }
}

/// Sets each backend's active flows: its open forward conntrack entries (of its family).
pub(super) fn fill_active_flows(
    s: &mut status::Status,
    entries: &[(lb_common::FlowKey, lb_common::CtEntry)],
    entries6: &[(lb_common::v6::FlowKey6, lb_common::v6::CtEntry6)],
) {
    let open = |e: &lb_common::CtEntry| {
        e.dir == lb_common::ct::DIR_FORWARD && e.state == lb_common::ct::STATE_OPEN
    };
    let mut flows: HashMap<([u32; 4], u16), u64> = HashMap::new();
    for (_, e) in entries.iter().filter(|(_, e)| open(e)) {
        *flows
            .entry(([e.nat_addr, 0, 0, 0], e.nat_port))
            .or_default() += 1;
    }
    let mut flows6: HashMap<([u32; 4], u16), u64> = HashMap::new();
    for (_, e) in entries6.iter().filter(|(_, e)| open(&e.ct)) {
        *flows6.entry((e.nat_addr, e.ct.nat_port)).or_default() += 1;
    }
    for b in s.services.iter_mut().flat_map(|s| s.backends.iter_mut()) {
        let (table, key) = match b.address.parse::<std::net::SocketAddr>() {
            Ok(std::net::SocketAddr::V4(a)) => (
                &flows,
                (
                    [lb_common::ipv4_to_wire(a.ip().octets()), 0, 0, 0],
                    a.port(),
                ),
            ),
            Ok(std::net::SocketAddr::V6(a)) => (
                &flows6,
                (lb_common::v6::ipv6_to_wire(a.ip().octets()), a.port()),
            ),
            Err(_) => continue,
        };
        let key = (key.0, lb_common::port_to_wire(key.1));
        b.active_flows = table.get(&key).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{CtEntry, FlowKey, Route, ct};

    use super::*;

    fn entry(backend: &str, dir: u8, state: u8) -> (FlowKey, CtEntry) {
        let b: std::net::SocketAddrV4 = backend.parse().unwrap();
        let e = CtEntry {
            nat_addr: lb_common::ipv4_to_wire(b.ip().octets()),
            nat_port: lb_common::port_to_wire(b.port()),
            dir,
            state,
            backend_id: 1,
            service_id: 1,
            last_seen_ns: 0,
            route: Route::NONE,
            backend_ack: 0,
            in_ifindex: 0,
            fnat_addr: 0,
            fnat_port: 0,
            flags: 0,
            lazy: 0,
            epoch: 0,
        };
        (FlowKey::new(1, 2, 3, 4, 6), e)
    }

    fn backend(address: &str) -> status::BackendStatus {
        status::BackendStatus {
            address: address.into(),
            container: None,
            engine: None,
            health: "unchecked".into(),
            weight: 1,
            in_pool: true,
            nat: "dnat".into(),
            active_flows: 99,
            packets: 0,
            bytes: 0,
            new_flows: 0,
        }
    }

    #[test]
    fn active_flows_are_open_forward_entries_per_backend() {
        let mut s = status::Status {
            services: vec![status::ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:8080".into(),
                protocol: "tcp".into(),
                backends: vec![
                    backend("10.0.0.1:80"),
                    backend("10.0.0.2:80"),
                    backend("10.0.0.3:80"),
                ],
            }],
            counters: vec![],
            etcd: None,
            engines: vec![],
        };
        let entries = [
            entry("10.0.0.1:80", ct::DIR_FORWARD, ct::STATE_OPEN),
            entry("10.0.0.1:80", ct::DIR_FORWARD, ct::STATE_OPEN),
            // A flow's reply half and a closing flow are not counted.
            entry("10.0.0.1:80", ct::DIR_REPLY, ct::STATE_OPEN),
            entry("10.0.0.2:80", ct::DIR_FORWARD, ct::STATE_CLOSING),
            entry("10.0.0.2:80", ct::DIR_FORWARD, ct::STATE_OPEN),
            // Same address, other port: another backend.
            entry("10.0.0.3:81", ct::DIR_FORWARD, ct::STATE_OPEN),
        ];
        fill_active_flows(&mut s, &entries, &[]);
        let flows: Vec<u64> = s.services[0]
            .backends
            .iter()
            .map(|b| b.active_flows)
            .collect();
        assert_eq!(flows, [2, 1, 0]);
    }
}
