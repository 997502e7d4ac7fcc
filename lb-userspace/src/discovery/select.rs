//! What the containers mean for services: the configured services' Docker selectors, and the
//! label services. Pure functions, whatever engines the containers come from.
//!
//! A container on this host's engine is a backend at its own address on its network (DNAT
//! unless the service says `mode = "fullnat"`); one on another host's engine is a backend at
//! the address its published port is reached at (full NAT unless the service says
//! `mode = "dnat"`), and is skipped, with a warning, when the port is not published.
//!
//! A service takes backends of its own family: an IPv6 service (`listen = "[::]:80"`, or the
//! `NAME.ipv6` half of a dual-stack one) gets its containers' IPv6 addresses on their network
//! (a Docker network made with `--ipv6`), an IPv4 one their IPv4 addresses; a container without
//! an address of that family is skipped with a warning. Published ports are reached over IPv4
//! only: an IPv6 service takes no containers of other hosts' engines.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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

/// Which label services the containers' `berth.*` labels make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelServices {
    /// None: labels are ignored.
    Off,
    /// One IPv4 service per label service, on `0.0.0.0:<berth.port>`.
    Ipv4,
    /// Dual stack: also its IPv6 half `NAME.ipv6` on `[::]:<berth.port>`, with the containers'
    /// IPv6 addresses, as soon as one of its containers has one (a service none of whose
    /// containers is on an IPv6 network stays IPv4 only, without warnings).
    DualStack,
}

/// Where container `c` serves `proto` port `port` over IPv6 if `v6` (else IPv4), on `network`
/// for a container of this host, and how it is reached by default; Err names why it cannot be.
fn backend_of(
    c: &ContainerInfo,
    engine: &EngineView,
    proto: Protocol,
    port: u16,
    network: Option<&str>,
    v6: bool,
) -> Result<(SocketAddr, Nat), String> {
    if engine.reach.local {
        return match c.address(network, v6) {
            Some(ip) => Ok((SocketAddr::new(ip, port), Nat::Dnat)),
            None if v6 => Err(format!(
                "container {}: no IPv6 address on {} (a Docker network created with --ipv6 \
                 gives one); not served over IPv6",
                c.name,
                network.unwrap_or("any network")
            )),
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
    if v6 {
        return Err(on(
            "other hosts' containers are reached at their published ports over IPv4 only, \
             not by an IPv6 service"
                .into(),
        ));
    }
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
    Ok((SocketAddr::new(IpAddr::V4(ip), host_port), Nat::Full))
}

/// Services for the containers: the configured `services` get the backends their Docker
/// selector matches added to their static ones (of the service's family: a dual-stack
/// service's `NAME.ipv6` half has the selector too, see
/// [`Config::selectors`](crate::config::Config::selectors)), and containers carrying
/// `berth.port` form services of their own as `labels` says. Containers of a lost engine are
/// left out of services without a health check. Returns the services and one message per
/// container whose labels were refused or which cannot be reached.
pub fn services(
    configured: &[Service],
    selectors: &HashMap<String, DockerSelector>,
    containers: &BTreeMap<ContainerKey, ContainerInfo>,
    engines: &BTreeMap<String, EngineView>,
    labels: LabelServices,
    host_ports: &std::collections::HashSet<(Protocol, u16)>,
) -> (Vec<Service>, Vec<String>) {
    let mut problems = Vec::new();
    let mut out: Vec<Service> = configured.to_vec();
    for svc in &mut out {
        let Some(sel) = selectors.get(&svc.name) else {
            continue;
        };
        let v6 = svc.listen.is_ipv6();
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
            match backend_of(
                c,
                engine,
                svc.protocol,
                sel.port,
                sel.network.as_deref(),
                v6,
            ) {
                Ok((addr, nat)) => {
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
    if labels != LabelServices::Off {
        let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
        let mut missing6: Vec<(String, String)> = Vec::new();
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
            let network = ls.network.as_deref();
            let (addr, nat) =
                match backend_of(c, engine, ls.protocol, ls.target_port, network, false) {
                    Ok(b) => b,
                    Err(p) => {
                        problems.push(p);
                        continue;
                    }
                };
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
            let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ls.port);
            if !label_backend(&mut v4, &mut problems, c, &ls, listen, addr, nat) {
                continue;
            }
            if labels == LabelServices::DualStack {
                match backend_of(c, engine, ls.protocol, ls.target_port, network, true) {
                    Ok((addr6, nat6)) => {
                        let listen6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), ls.port);
                        label_backend(&mut v6, &mut problems, c, &ls, listen6, addr6, nat6);
                    }
                    Err(p) => missing6.push((ls.service.clone(), p)),
                }
            }
        }
        // A container without IPv6 is worth a warning only beside others that have it.
        problems.extend(
            missing6
                .into_iter()
                .filter(|(name, _)| v6.contains_key(name))
                .map(|(_, p)| p),
        );
        for (name, mut s) in v4 {
            s.backends.sort();
            s.backends.dedup_by_key(|b| b.addr);
            out.push(s);
            if let Some(mut s6) = v6.remove(&name) {
                s6.name = format!("{name}.ipv6");
                s6.backends.sort();
                s6.backends.dedup_by_key(|b| b.addr);
                out.push(s6);
            }
        }
    }
    (out, problems)
}

/// Adds container `c` at `addr` to label service `ls` (listening on `listen`) in `by_name`;
/// false (and a problem) when the service is already elsewhere.
fn label_backend(
    by_name: &mut BTreeMap<String, Service>,
    problems: &mut Vec<String>,
    c: &ContainerInfo,
    ls: &super::LabelService,
    listen: SocketAddr,
    addr: SocketAddr,
    nat: Nat,
) -> bool {
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
    if entry.health != ls.health && listen.is_ipv4() {
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
        return false;
    }
    entry.backends.push(BackendSpec {
        addr,
        weight: ls.weight,
        nat,
    });
    entry.instances.insert(addr, c.instance());
    true
}

/// The host bridges behind the containers of this host that back `services`, over either
/// family (to attach the program to, so their replies are translated: a bridge carries both).
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
        for (net, addrs) in &c.networks {
            let backs = services
                .iter()
                .any(|s| s.backends.iter().any(|b| addrs.has(b.addr.ip())));
            if backs && let Some(br) = c.bridges.get(net) {
                out.insert(br.clone());
            }
        }
    }
    out
}

/// The container behind backend `addr`: on this host, the one with that address (of either
/// family); on another, the one whose port is published there.
pub fn container_at<'a>(
    containers: &'a BTreeMap<ContainerKey, ContainerInfo>,
    engines: &BTreeMap<String, EngineView>,
    addr: SocketAddr,
) -> Option<&'a ContainerInfo> {
    containers.values().find(|c| {
        let engine = view(engines, c);
        if engine.reach.local {
            c.networks.values().any(|a| a.has(addr.ip()))
        } else {
            let IpAddr::V4(ip) = addr.ip() else {
                return false;
            };
            c.published.values().any(|&(p_ip, port)| {
                port == addr.port()
                    && (p_ip == ip || (p_ip.is_unspecified() && engine.reach.address == Some(ip)))
            })
        }
    })
}
