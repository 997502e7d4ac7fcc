//! What the containers mean for services: the configured services' Docker selectors, and the
//! label services. Pure functions, whatever engines the containers come from.
//!
//! A container on this host's engine is a backend at its own address on its network (DNAT
//! unless the service says `mode = "fullnat"`); one on another host's engine is a backend at
//! the address its published port is reached at (full NAT unless the service says
//! `mode = "dnat"`), and is skipped, with a warning, when the port is not published.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use super::{ContainerInfo, ContainerKey, Reach, parse_labels};
use crate::config::{BackendSpec, DockerSelector, Nat, Protocol, Service};

/// What the selection needs to know of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineView {
    /// Where its containers are reached (as found at its last connection).
    pub reach: Reach,
    /// Unreachable for longer than the grace: its containers back only services whose health
    /// checks judge them.
    pub lost: bool,
}

/// An engine nothing is known of yet counts as this host, unjudged (as a single local engine
/// always was).
const UNKNOWN_ENGINE: EngineView = EngineView {
    reach: Reach {
        address: None,
        local: true,
    },
    lost: false,
};

fn view<'a>(engines: &'a BTreeMap<String, EngineView>, c: &ContainerInfo) -> &'a EngineView {
    engines.get(&c.engine).unwrap_or(&UNKNOWN_ENGINE)
}

/// Where container `c` serves `proto` port `port` (on `network`, for a container of this host),
/// and how it is reached by default; Err names why it cannot be.
fn backend_of(
    c: &ContainerInfo,
    engine: &EngineView,
    proto: Protocol,
    port: u16,
    network: Option<&str>,
) -> Result<(SocketAddrV4, Nat), String> {
    if engine.reach.local {
        return match c.address(network) {
            Some(ip) => Ok((SocketAddrV4::new(ip, port), Nat::Dnat)),
            None => Err(format!(
                "container {}: no IPv4 address on {}",
                c.name,
                network.unwrap_or("any network")
            )),
        };
    }
    let on = |what: String| {
        format!(
            "container {} on engine {}: {what}; not served",
            c.name, c.engine
        )
    };
    let Some(&(host_ip, host_port)) = c.published.get(&(proto, port)) else {
        return Err(on(format!(
            "{proto} port {port} is not published (docker run -p {port}{})",
            if proto == Protocol::Udp { "/udp" } else { "" }
        )));
    };
    let ip = if host_ip.is_unspecified() {
        engine.reach.address.ok_or_else(|| {
            on("the engine's address is unknown (set address in its [[docker.engine]])".into())
        })?
    } else if host_ip.is_loopback() {
        return Err(on(format!(
            "{proto} port {port} is published on {host_ip} only, which other hosts cannot reach"
        )));
    } else {
        host_ip
    };
    Ok((SocketAddrV4::new(ip, host_port), Nat::Full))
}

/// Services for the containers: the configured `services` get the backends their Docker
/// selector matches added to their static ones, and (when `label_services` is on) containers
/// carrying `berth.port` form services of their own on `0.0.0.0:<port>`. Containers of a lost
/// engine are left out of services without a health check. Returns the services and one
/// message per container whose labels were refused or which cannot be reached.
pub fn services(
    configured: &[Service],
    selectors: &HashMap<String, DockerSelector>,
    containers: &BTreeMap<ContainerKey, ContainerInfo>,
    engines: &BTreeMap<String, EngineView>,
    label_services: bool,
    host_ports: &std::collections::HashSet<(Protocol, u16)>,
) -> (Vec<Service>, Vec<String>) {
    let mut problems = Vec::new();
    let mut out: Vec<Service> = configured.to_vec();
    for svc in &mut out {
        let Some(sel) = selectors.get(&svc.name) else {
            continue;
        };
        for c in containers.values().filter(|c| c.serving()) {
            let image_ok = sel.image.as_deref().is_none_or(|i| c.runs_image(i));
            let labels_ok = sel.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v));
            let engine_ok = sel.engines.is_empty() || sel.engines.contains(&c.engine);
            if !image_ok || !labels_ok || !engine_ok {
                continue;
            }
            let engine = view(engines, c);
            if engine.lost && svc.health.is_none() {
                continue;
            }
            match backend_of(c, engine, svc.protocol, sel.port, sel.network.as_deref()) {
                Ok((addr, nat)) => {
                    let addr = SocketAddr::V4(addr);
                    svc.backends.push(BackendSpec {
                        addr,
                        weight: 1,
                        nat: svc.nat_or(nat),
                    });
                    svc.instances.insert(addr, c.instance());
                }
                Err(p) => problems.push(p),
            }
        }
        svc.backends.sort();
        svc.backends.dedup_by_key(|b| b.addr);
    }
    if label_services {
        let mut by_name: BTreeMap<String, Service> = BTreeMap::new();
        for c in containers.values().filter(|c| c.serving()) {
            let ls = match parse_labels(&c.labels) {
                Ok(Some(ls)) => ls,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(format!("container {}: {e}; not served", c.name));
                    continue;
                }
            };
            let engine = view(engines, c);
            if engine.lost && ls.health.is_none() {
                continue;
            }
            let (addr, nat) = match backend_of(
                c,
                engine,
                ls.protocol,
                ls.target_port,
                ls.network.as_deref(),
            ) {
                Ok(b) => b,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            let listen = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ls.port));
            // A label must not capture traffic for a port the host itself serves (e.g. 22).
            if host_ports.contains(&(ls.protocol, ls.port)) {
                problems.push(format!(
                    "container {}: {} port {} is in use by a process on this host; labels cannot take it",
                    c.name, ls.protocol, ls.port
                ));
                continue;
            }
            if out
                .iter()
                .any(|s| s.listen.port() == ls.port && s.protocol == ls.protocol)
            {
                problems.push(format!(
                    "container {}: {} port {} belongs to a configured service; labels cannot take it",
                    c.name, ls.protocol, ls.port
                ));
                continue;
            }
            let entry = by_name
                .entry(ls.service.clone())
                .or_insert_with(|| Service {
                    name: ls.service.clone(),
                    listen,
                    protocol: ls.protocol,
                    backends: Vec::new(),
                    health: ls.health.clone(),
                    instances: BTreeMap::new(),
                    mode: None,
                });
            if entry.health != ls.health {
                problems.push(format!(
                    "container {}: its berth.health labels differ from the rest of service {}; \
                     the first container's check applies",
                    c.name, ls.service
                ));
            }
            if entry.listen != listen || entry.protocol != ls.protocol {
                problems.push(format!(
                    "container {}: service {} is already on {} {}; not served",
                    c.name, ls.service, entry.protocol, entry.listen
                ));
                continue;
            }
            let addr = SocketAddr::V4(addr);
            entry.backends.push(BackendSpec {
                addr,
                weight: ls.weight,
                nat,
            });
            entry.instances.insert(addr, c.instance());
        }
        for (_, mut s) in by_name {
            s.backends.sort();
            s.backends.dedup_by_key(|b| b.addr);
            out.push(s);
        }
    }
    (out, problems)
}

/// The host bridges behind the containers of this host that back `services` (to attach the
/// program to, so their replies are translated).
pub fn backend_bridges(
    services: &[Service],
    containers: &BTreeMap<ContainerKey, ContainerInfo>,
    engines: &BTreeMap<String, EngineView>,
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for c in containers
        .values()
        .filter(|c| c.serving() && view(engines, c).reach.local)
    {
        for (net, ip) in &c.networks {
            let backs = services.iter().any(|s| {
                s.backends
                    .iter()
                    .any(|b| b.addr.ip() == std::net::IpAddr::V4(*ip))
            });
            if backs && let Some(br) = c.bridges.get(net) {
                out.insert(br.clone());
            }
        }
    }
    out
}

/// The container behind backend `addr`: on this host, the one with that address; on another,
/// the one whose port is published there. Containers are found by their IPv4 addresses only.
pub fn container_at<'a>(
    containers: &'a BTreeMap<ContainerKey, ContainerInfo>,
    engines: &BTreeMap<String, EngineView>,
    addr: SocketAddr,
) -> Option<&'a ContainerInfo> {
    let SocketAddr::V4(addr) = addr else {
        return None;
    };
    containers.values().find(|c| {
        let engine = view(engines, c);
        if engine.reach.local {
            c.networks.values().any(|ip| ip == addr.ip())
        } else {
            c.published.values().any(|&(ip, port)| {
                port == addr.port()
                    && (ip == *addr.ip()
                        || (ip.is_unspecified() && engine.reach.address == Some(*addr.ip())))
            })
        }
    })
}
