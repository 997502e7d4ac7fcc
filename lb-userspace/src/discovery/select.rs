//! What the containers mean for services: the configured services' Docker selectors, and the
//! label services. Pure functions, whatever source the containers come from.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use super::{ContainerInfo, parse_labels};
use crate::config::{DockerSelector, Protocol, Service};

/// Services for the containers: the configured `services` get the backends their Docker
/// selector matches added to their static ones, and (when `label_services` is on) containers
/// carrying `berth.port` form services of their own on `0.0.0.0:<port>`. Returns the services and
/// one message per container whose labels were refused or which has no usable address.
pub fn services(
    configured: &[Service],
    selectors: &HashMap<String, DockerSelector>,
    containers: &BTreeMap<String, ContainerInfo>,
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
            if !image_ok || !labels_ok {
                continue;
            }
            match c.address(sel.network.as_deref()) {
                Some(ip) => {
                    let addr = SocketAddrV4::new(ip, sel.port);
                    svc.backends.push((addr, 1));
                    svc.instances.insert(addr, c.instance());
                }
                None => problems.push(format!(
                    "container {}: no IPv4 address on {}",
                    c.name,
                    sel.network.as_deref().unwrap_or("any network")
                )),
            }
        }
        svc.backends.sort();
        svc.backends.dedup_by_key(|(a, _)| *a);
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
            let Some(ip) = c.address(ls.network.as_deref()) else {
                problems.push(format!(
                    "container {}: no IPv4 address to serve from",
                    c.name
                ));
                continue;
            };
            let listen = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ls.port);
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
            let addr = SocketAddrV4::new(ip, ls.target_port);
            entry.backends.push((addr, ls.weight));
            entry.instances.insert(addr, c.instance());
        }
        for (_, mut s) in by_name {
            s.backends.sort();
            s.backends.dedup_by_key(|(a, _)| *a);
            out.push(s);
        }
    }
    (out, problems)
}

/// The host bridges behind the containers that back `services` (to attach the program to, so
/// their replies are translated).
pub fn backend_bridges(
    services: &[Service],
    containers: &BTreeMap<String, ContainerInfo>,
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for c in containers.values().filter(|c| c.serving()) {
        for (net, ip) in &c.networks {
            let backs = services
                .iter()
                .any(|s| s.backends.iter().any(|(a, _)| a.ip() == ip));
            if backs && let Some(br) = c.bridges.get(net) {
                out.insert(br.clone());
            }
        }
    }
    out
}
