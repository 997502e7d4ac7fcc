//! The reconciler: the only writer of the dataplane's service, backend and Maglev maps (their
//! writers on `Dataplane` are `pub(crate)`). It takes the desired set of services (the config
//! file's plus what discovery adds, minus unhealthy backends) and makes the kernel match it,
//! writing only what changed, Maglev slots included.
//!
//! What is recorded as applied changes only after the kernel accepted the write, so a failed
//! update is reported to the caller and the next `apply` of the same desired state picks up
//! exactly where the failure left off.
//!
//! Both families go through the same code: a service's address picks its maps (`SERVICES` and
//! `BACKENDS`, or `SERVICES6` and `BACKENDS6`); ids, Maglev rows and counters are shared.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use lb_common::{
    Backend, ServiceKey, ServiceValue, ipv4_to_wire, port_to_wire,
    v6::{Backend6, ServiceKey6, ipv6_to_wire},
};
use tracing::{info, info_span};

use crate::{
    config::{Instance, Nat, Protocol, Service},
    dataplane::{Dataplane, DataplaneError},
    maglev,
};

/// Hands out ids, reusing released ones as late as possible (oldest first, and only once the
/// fresh ones ran out) so counters of a departed backend are not confused with a new one's.
#[derive(Debug)]
struct IdPool {
    next: u32,
    end: u32,
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(start: u32, end: u32) -> Self {
        Self {
            next: start,
            end,
            free: VecDeque::new(),
        }
    }

    /// A pool in which `used` are taken (state adopted from the kernel).
    fn with_used(start: u32, end: u32, used: &std::collections::BTreeSet<u32>) -> Self {
        let next = used.last().map_or(start, |m| (m + 1).max(start));
        Self {
            next,
            end,
            free: (start..next).filter(|i| !used.contains(i)).collect(),
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if self.next < self.end {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.free.pop_front()
        }
    }

    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no free {what} id (raise dataplane.{limit})")]
    OutOfIds {
        what: &'static str,
        limit: &'static str,
    },
    #[error("service {service}: kernel map update failed")]
    Map {
        service: String,
        #[source]
        source: Box<DataplaneError>,
    },
}

#[derive(Debug, Clone, Copy)]
struct AppliedBackend {
    id: u32,
    weight: u32,
    /// The container run the slot was written for (None: a configured backend, or one adopted
    /// and not yet claimed).
    instance: Option<Instance>,
    /// The full-NAT source address in the kernel's slot (`None`: DNAT).
    snat: Option<IpAddr>,
}

impl AppliedService {
    /// The service's entry as the kernel should hold it.
    fn value(&self) -> ServiceValue {
        ServiceValue {
            id: self.id,
            flags: self.flags,
            fallback: self.fallback,
            _pad: 0,
        }
    }
}

#[derive(Debug)]
struct AppliedService {
    id: u32,
    key: SvcKey,
    listen: SocketAddr,
    protocol: Protocol,
    /// Whether the service key is in the kernel's service table.
    installed: bool,
    backends: BTreeMap<SocketAddr, AppliedBackend>,
    /// Backend ids removed from the set but possibly still in the kernel's table.
    retired: Vec<u32>,
    /// The Maglev row as the kernel holds it (backend ids; 0 = no backend).
    table: Vec<u32>,
    /// Whether `table` is what the current backend set should produce.
    table_synced: bool,
    /// Adopted from the pinned dataplane and not yet claimed by a desired service (its name is
    /// a placeholder; its backends' weights are unknown).
    pinned: bool,
    /// The `ServiceValue::flags` the kernel holds ([`lb_common::SVC_F_EMPTY`]).
    flags: u32,
    /// The `ServiceValue::fallback` the kernel holds: a backend of the pool (0: none).
    fallback: u32,
}

/// A summary of one service after an apply, for logs and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub name: String,
    pub id: u32,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// (address, backend id, weight)
    pub backends: Vec<(SocketAddr, u32, u32)>,
    /// Full-NAT backends and the source address their flows get.
    pub full_nat: Vec<(SocketAddr, IpAddr)>,
}

pub struct Reconciler {
    dp: Dataplane,
    services: BTreeMap<String, AppliedService>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Backends that left, with when they left: their pinned flows drain until the drain
    /// timeout, then their conntrack entries are purged.
    draining: BTreeMap<(u8, SocketAddr), std::time::Instant>,
}

/// A service's key in its family's service map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SvcKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

fn service_key(listen: SocketAddr, protocol: Protocol) -> SvcKey {
    let port = port_to_wire(listen.port());
    match listen {
        SocketAddr::V4(a) => SvcKey::V4(ServiceKey::new(
            ipv4_to_wire(a.ip().octets()),
            port,
            protocol.ip_proto(),
        )),
        SocketAddr::V6(a) => SvcKey::V6(ServiceKey6::new(
            ipv6_to_wire(a.ip().octets()),
            port,
            protocol.ip_proto(),
        )),
    }
}

fn member_id(addr: SocketAddr) -> u64 {
    match addr {
        SocketAddr::V4(a) => (u64::from(u32::from(*a.ip())) << 16) | u64::from(a.port()),
        SocketAddr::V6(a) => crate::dataplane::member_id6(a),
    }
}

impl Dataplane {
    fn set_service_any(&mut self, key: SvcKey, value: ServiceValue) -> Result<(), DataplaneError> {
        match key {
            SvcKey::V4(k) => self.set_service(k, value),
            SvcKey::V6(k) => self.set_service6(k, value),
        }
    }

    fn remove_service_any(&mut self, key: &SvcKey) -> Result<(), DataplaneError> {
        match key {
            SvcKey::V4(k) => self.remove_service(k),
            SvcKey::V6(k) => self.remove_service6(k),
        }
    }

    /// Writes backend slot `id` for `addr` in its family's table (`snat`: full NAT from that
    /// address, of the backend's family).
    fn set_backend_any(
        &mut self,
        id: u32,
        addr: SocketAddr,
        snat: Option<IpAddr>,
    ) -> Result<(), DataplaneError> {
        let port = port_to_wire(addr.port());
        match addr {
            SocketAddr::V4(a) => self.set_backend(
                id,
                Backend {
                    snat_addr: match snat {
                        Some(IpAddr::V4(s)) => ipv4_to_wire(s.octets()),
                        _ => 0,
                    },
                    ..Backend::dnat(ipv4_to_wire(a.ip().octets()), port)
                },
            ),
            SocketAddr::V6(a) => {
                let addr = ipv6_to_wire(a.ip().octets());
                self.set_backend6(
                    id,
                    match snat {
                        Some(IpAddr::V6(s)) => {
                            Backend6::full_nat(addr, port, ipv6_to_wire(s.octets()))
                        }
                        _ => Backend6::dnat(addr, port),
                    },
                )
            }
        }
    }
}

impl Reconciler {
    pub fn new(dp: Dataplane) -> Self {
        let o = *dp.options();
        Self {
            dp,
            services: BTreeMap::new(),
            service_ids: IdPool::new(0, o.max_services),
            // Backend id 0 is reserved: an all-zero Maglev slot means "no backend".
            backend_ids: IdPool::new(1, o.max_backends),
            draining: BTreeMap::new(),
        }
    }

    /// A reconciler that starts from what the kernel's maps hold (a dataplane adopted from an
    /// earlier berth): services, their Maglev rows and backends become applied state, so the
    /// first `apply` writes only what differs, and established flows never see a gap. Pinned
    /// services no desired service claims (by address, port and protocol) are removed by the
    /// first `apply`.
    pub fn adopt(dp: Dataplane) -> Result<Self, DataplaneError> {
        let mut rec = Self::new(dp);
        let m = rec.dp.options().maglev_size;
        let mut used_services = std::collections::BTreeSet::new();
        let mut used_backends = std::collections::BTreeSet::new();
        // Both families' pinned services; they differ only in how addresses are read.
        let v4 = |addr: u32, port: u16| {
            SocketAddr::V4(SocketAddrV4::new(
                std::net::Ipv4Addr::from(u32::from_be(addr)),
                u16::from_be(port),
            ))
        };
        let v6 = |addr, port: u16| {
            SocketAddr::V6(SocketAddrV6::new(
                lb_common::v6::ipv6_from_wire(addr).into(),
                u16::from_be(port),
                0,
                0,
            ))
        };
        let pinned: Vec<(SvcKey, SocketAddr, u8, ServiceValue)> = rec
            .dp
            .services()
            .into_iter()
            .map(|(k, v)| (SvcKey::V4(k), v4(k.addr, k.port), k.proto, v))
            .chain(
                rec.dp
                    .services6()?
                    .into_iter()
                    .map(|(k, v)| (SvcKey::V6(k), v6(k.addr, k.port), k.proto, v)),
            )
            .collect();
        for (key, listen, proto, value) in pinned {
            let protocol = match proto {
                lb_common::IPPROTO_TCP => Protocol::Tcp,
                lb_common::IPPROTO_UDP => Protocol::Udp,
                _ => continue,
            };
            // A dataplane an older berth wrote has the service bit alone on the port (both
            // lookups, see `lb_common::service_lookups`): the address bit now.
            rec.dp.add_service_port(listen, proto)?;
            let table = (0..m)
                .map(|slot| rec.dp.maglev_slot(value.id, slot))
                .collect::<Result<Vec<u32>, _>>()?;
            let mut backends = BTreeMap::new();
            for &id in table.iter().filter(|id| **id != 0) {
                if used_backends.insert(id) {
                    let (addr, snat) = match key {
                        SvcKey::V4(_) => {
                            let b = rec.dp.backend(id)?;
                            let snat = (b.snat_addr != 0).then(|| {
                                IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(b.snat_addr)))
                            });
                            (v4(b.addr, b.port), snat)
                        }
                        SvcKey::V6(_) => {
                            let b = rec.dp.backend6(id)?;
                            let snat = (!lb_common::v6::is_zero(&b.snat_addr)).then(|| {
                                IpAddr::V6(lb_common::v6::ipv6_from_wire(b.snat_addr).into())
                            });
                            (v6(b.addr, b.port), snat)
                        }
                    };
                    backends.insert(
                        addr,
                        AppliedBackend {
                            id,
                            weight: 0,
                            instance: None,
                            snat,
                        },
                    );
                }
            }
            used_services.insert(value.id);
            let _service = service_span("(pinned)", protocol, listen).entered();
            info!(
                "adopted from the pinned dataplane: {protocol} {listen} with {} backends",
                backends.len()
            );
            rec.services.insert(
                format!("(pinned) {protocol} {listen}"),
                AppliedService {
                    id: value.id,
                    key,
                    listen,
                    protocol,
                    installed: true,
                    backends,
                    retired: Vec::new(),
                    table,
                    table_synced: false,
                    pinned: true,
                    flags: value.flags,
                    fallback: value.fallback,
                },
            );
        }
        let o = *rec.dp.options();
        rec.service_ids = IdPool::with_used(0, o.max_services, &used_services);
        rec.backend_ids = IdPool::with_used(1, o.max_backends, &used_backends);
        Ok(rec)
    }

    /// (service address, protocol, backend) of every adopted backend not yet claimed: they
    /// were serving a moment ago, so their health checks may start from healthy.
    pub fn pinned_backends(&self) -> Vec<(SocketAddr, Protocol, SocketAddr)> {
        self.services
            .values()
            .filter(|a| a.pinned)
            .flat_map(|a| a.backends.keys().map(|b| (a.listen, a.protocol, *b)))
            .collect()
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    pub fn into_dataplane(self) -> Dataplane {
        self.dp
    }

    /// The services as applied.
    pub fn state(&self) -> Vec<ServiceState> {
        self.services
            .iter()
            .map(|(name, s)| ServiceState {
                name: name.clone(),
                id: s.id,
                listen: s.listen,
                protocol: s.protocol,
                backends: s
                    .backends
                    .iter()
                    .map(|(a, b)| (*a, b.id, b.weight))
                    .collect(),
                full_nat: s
                    .backends
                    .iter()
                    .filter_map(|(a, b)| b.snat.map(|s| (*a, s)))
                    .collect(),
            })
            .collect()
    }

    /// Purges the conntrack entries of backends that left more than `drain` before `now` and
    /// have not come back (to any service); returns (backend, entries purged) for each.
    pub fn purge_drained(
        &mut self,
        now: std::time::Instant,
        drain: std::time::Duration,
    ) -> Result<Vec<(SocketAddr, usize)>, ReconcileError> {
        let in_use = |s: &BTreeMap<String, AppliedService>, proto: u8, addr: &SocketAddr| {
            s.values()
                .any(|a| a.protocol.ip_proto() == proto && a.backends.contains_key(addr))
        };
        let due: Vec<(u8, SocketAddr)> = self
            .draining
            .iter()
            .filter(|(_, left)| now.saturating_duration_since(**left) >= drain)
            .map(|(k, _)| *k)
            .collect();
        let mut purged = Vec::new();
        for (proto, addr) in due {
            if in_use(&self.services, proto, &addr) {
                self.draining.remove(&(proto, addr));
                continue; // it came back: its flows are welcome
            }
            let map_err = |source| ReconcileError::Map {
                service: format!("(drained backend {addr})"),
                source: Box::new(source),
            };
            let port = port_to_wire(addr.port());
            let purged_here = match addr {
                SocketAddr::V4(a) => {
                    let wire = (ipv4_to_wire(a.ip().octets()), port);
                    let doomed: Vec<lb_common::FlowKey> = self
                        .dp
                        .conntrack_entries()
                        .into_iter()
                        .filter(|(k, e)| {
                            k.proto == proto
                                && ((e.dir == lb_common::ct::DIR_FORWARD
                                    && (e.nat_addr, e.nat_port) == wire)
                                    || (e.dir == lb_common::ct::DIR_REPLY
                                        && (k.saddr, k.sport) == wire))
                        })
                        .map(|(k, _)| k)
                        .collect();
                    for k in &doomed {
                        self.dp.conntrack_remove(k).map_err(map_err)?;
                    }
                    // No flow to it is left: its lazy service (if any) is forgotten, so the
                    // next service it serves at this address may record its flows lazily.
                    self.dp.lazy_reply_remove(a, proto).map_err(map_err)?;
                    doomed.len()
                }
                SocketAddr::V6(a) => {
                    let wire = (ipv6_to_wire(a.ip().octets()), port);
                    let doomed: Vec<lb_common::v6::FlowKey6> = self
                        .dp
                        .conntrack6_entries()
                        .into_iter()
                        .filter(|(k, e)| {
                            k.proto == proto
                                && ((e.ct.dir == lb_common::ct::DIR_FORWARD
                                    && (e.nat_addr, e.ct.nat_port) == wire)
                                    || (e.ct.dir == lb_common::ct::DIR_REPLY
                                        && (k.saddr, k.sport) == wire))
                        })
                        .map(|(k, _)| k)
                        .collect();
                    for k in &doomed {
                        self.dp.conntrack6_remove(k).map_err(map_err)?;
                    }
                    doomed.len()
                }
            };
            // Only now: a failed removal above leaves it draining, to be retried.
            self.draining.remove(&(proto, addr));
            let _backend = info_span!("backend", %addr).entered();
            info!("backend {addr}: drain timeout over, purged {purged_here} conntrack entries");
            purged.push((addr, purged_here));
        }
        Ok(purged)
    }

    /// Makes the kernel serve exactly `desired`. `why` (e.g. "config", "health check: refused")
    /// ends each change's log line. Returns the number of map writes done. On error the kernel
    /// holds a consistent prefix of the change; call again to finish it.
    pub fn apply(&mut self, desired: &[Service], why: &str) -> Result<usize, ReconcileError> {
        let applied = self.apply_changes(desired, why);
        // All of it written or a consistent prefix: either way the tables stand still from here
        // to the next change, and new flows are stamped with the settled epoch (lb-common's
        // `epoch`; nothing happens if nothing was written).
        let settled = self.dp.settle().map_err(|source| ReconcileError::Map {
            service: "(table epoch)".to_string(),
            source: Box::new(source),
        });
        let writes = applied?;
        settled?;
        Ok(writes)
    }

    fn apply_changes(&mut self, desired: &[Service], why: &str) -> Result<usize, ReconcileError> {
        let mut writes = 0;

        // Pinned services are claimed by the desired service with their address and protocol.
        for svc in desired {
            if self.services.contains_key(&svc.name) {
                continue;
            }
            let key = service_key(svc.listen, svc.protocol);
            let Some(placeholder) = self
                .services
                .iter()
                .find(|(_, a)| a.pinned && a.key == key)
                .map(|(n, _)| n.clone())
            else {
                continue;
            };
            let mut a = self.services.remove(&placeholder).expect("found");
            a.pinned = false;
            for (addr, b) in &mut a.backends {
                if let Some(d) = svc.backends.iter().find(|d| d.addr == *addr) {
                    b.weight = d.weight;
                    // What the pinned slot was written for is not recorded: the container
                    // there now has been served by it all along.
                    b.instance = svc.instances.get(addr).copied();
                }
            }
            info!(
                "service {}: taken over from the pinned dataplane ({} {}, {} backends) ({why})",
                svc.name,
                a.protocol,
                a.listen,
                a.backends.len()
            );
            self.services.insert(svc.name.clone(), a);
        }

        // Services gone, or whose address/protocol changed (re-created below).
        let stale: Vec<String> = self
            .services
            .iter()
            .filter(|(name, a)| {
                !desired
                    .iter()
                    .any(|d| &d.name == *name && d.listen == a.listen && d.protocol == a.protocol)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            writes += self.remove_service(&name, why)?;
        }

        for svc in desired {
            writes += self.apply_service(svc, why)?;
        }
        Ok(writes)
    }

    fn remove_service(&mut self, name: &str, why: &str) -> Result<usize, ReconcileError> {
        let map_err = |source| ReconcileError::Map {
            service: name.to_owned(),
            source: Box::new(source),
        };
        let mut writes = 0;
        let a = self.services.get_mut(name).expect("caller found it");
        if a.installed {
            self.dp.remove_service_any(&a.key).map_err(map_err)?;
            a.installed = false;
            writes += 1;
        }
        for slot in 0..a.table.len() {
            if a.table[slot] != 0 {
                self.dp
                    .set_maglev_slot(a.id, slot as u32, 0)
                    .map_err(map_err)?;
                a.table[slot] = 0;
                writes += 1;
            }
        }
        let a = self.services.remove(name).expect("present");
        for addr in a.backends.keys() {
            self.draining
                .insert((a.protocol.ip_proto(), *addr), std::time::Instant::now());
        }
        for b in a.backends.values() {
            self.backend_ids.release(b.id);
        }
        for id in a.retired {
            self.backend_ids.release(id);
        }
        self.service_ids.release(a.id);
        let _service = service_span(name, a.protocol, a.listen).entered();
        info!(
            "service {name}: removed ({} {}) ({why})",
            a.protocol, a.listen
        );
        Ok(writes)
    }

    fn apply_service(&mut self, svc: &Service, why: &str) -> Result<usize, ReconcileError> {
        // Changes are logged once they are in the kernel (a "removed" line means no new flows),
        // and also when a later write fails (they are in the kernel all the same).
        let mut notes = Vec::new();
        let result = self.apply_service_inner(svc, why, &mut notes);
        let _service = service_span(&svc.name, svc.protocol, svc.listen).entered();
        for (backend, n) in notes {
            let _backend = backend.map(|addr| info_span!("backend", %addr).entered());
            info!("{n}");
        }
        result
    }

    fn apply_service_inner(
        &mut self,
        svc: &Service,
        why: &str,
        notes: &mut Vec<(Option<SocketAddr>, String)>,
    ) -> Result<usize, ReconcileError> {
        let map_err = |source| ReconcileError::Map {
            service: svc.name.clone(),
            source: Box::new(source),
        };
        let m = self.dp.options().maglev_size;
        let mut writes = 0;

        if !self.services.contains_key(&svc.name) {
            let id = self.service_ids.alloc().ok_or(ReconcileError::OutOfIds {
                what: "service",
                limit: "max_services",
            })?;
            if let Err(source) = self.dp.reset_service_counters(id) {
                self.service_ids.release(id);
                return Err(map_err(source));
            }
            self.services.insert(
                svc.name.clone(),
                AppliedService {
                    id,
                    key: service_key(svc.listen, svc.protocol),
                    listen: svc.listen,
                    protocol: svc.protocol,
                    installed: false,
                    backends: BTreeMap::new(),
                    retired: Vec::new(),
                    table: vec![0; m as usize],
                    table_synced: false,
                    pinned: false,
                    flags: 0,
                    fallback: 0,
                },
            );
            notes.push((
                None,
                format!(
                    "service {}: added ({} {}) ({why})",
                    svc.name, svc.protocol, svc.listen
                ),
            ));
        }
        let a = self.services.get_mut(&svc.name).expect("just ensured");

        // Backends that left, or whose address another container run took (a new backend
        // there, added below with a slot of its own: zeroed counters, no cached route): out of
        // the set now, their ids retire once the table is rewritten.
        let gone: Vec<(SocketAddr, bool)> = a
            .backends
            .iter()
            .filter_map(|(addr, b)| {
                let wanted = svc.backends.iter().any(|d| d.addr == *addr);
                let replaced = wanted && svc.instances.get(addr).copied() != b.instance;
                (!wanted || replaced).then_some((*addr, replaced))
            })
            .collect();
        for (addr, replaced) in gone {
            let b = a.backends.remove(&addr).expect("listed");
            a.retired.push(b.id);
            self.draining
                .insert((a.protocol.ip_proto(), addr), std::time::Instant::now());
            a.table_synced = false;
            let what = if replaced {
                "removed: another container run has its address"
            } else {
                "removed"
            };
            notes.push((
                Some(addr),
                format!("service {}: backend {addr} {what} ({why})", svc.name),
            ));
        }
        // New backends, weight and NAT changes. The backend slot is written before any table
        // slot points at it.
        for &crate::config::BackendSpec { addr, weight, nat } in &svc.backends {
            let snat = match nat {
                Nat::Dnat => None,
                Nat::Full => {
                    let o = self.dp.options();
                    match snat_source(o.snat_address, o.snat_address6, addr.ip()) {
                        Ok(ip) => Some(ip),
                        Err(e) => {
                            // Left out until a route to it exists (every apply tries again).
                            notes.push((
                                Some(addr),
                                format!(
                                    "service {}: backend {addr} left out: no source address for \
                                 full NAT toward it ({e}) ({why})",
                                    svc.name
                                ),
                            ));
                            continue;
                        }
                    }
                }
            };
            match a.backends.get_mut(&addr) {
                Some(b) => {
                    if b.snat != snat {
                        // For new flows: established ones keep the translation they started
                        // with.
                        self.dp.set_backend_any(b.id, addr, snat).map_err(map_err)?;
                        writes += 1;
                        notes.push((
                            Some(addr),
                            format!(
                                "service {}: backend {addr} now {} ({why})",
                                svc.name,
                                nat_note(snat)
                            ),
                        ));
                        b.snat = snat;
                    }
                    if b.weight != weight {
                        notes.push((
                            Some(addr),
                            format!(
                                "service {}: backend {addr} weight {} -> {weight} ({why})",
                                svc.name, b.weight
                            ),
                        ));
                        b.weight = weight;
                        a.table_synced = false;
                    }
                }
                None => {
                    let id = self.backend_ids.alloc().ok_or(ReconcileError::OutOfIds {
                        what: "backend",
                        limit: "max_backends",
                    })?;
                    let flag = lb_common::port_flag(svc.protocol.ip_proto(), true);
                    let written = self
                        .dp
                        .add_port_flags(addr.port(), flag)
                        .and_then(|()| self.dp.reset_backend_counters(id))
                        .and_then(|()| self.dp.set_backend_any(id, addr, snat));
                    if let Err(source) = written {
                        self.backend_ids.release(id);
                        return Err(map_err(source));
                    }
                    writes += 1;
                    a.backends.insert(
                        addr,
                        AppliedBackend {
                            id,
                            weight,
                            snat,
                            instance: svc.instances.get(&addr).copied(),
                        },
                    );
                    a.table_synced = false;
                    notes.push((
                        Some(addr),
                        if snat.is_none() {
                            format!(
                                "service {}: backend {addr} added (weight {weight}) ({why})",
                                svc.name
                            )
                        } else {
                            format!(
                                "service {}: backend {addr} added (weight {weight}, {}) ({why})",
                                svc.name,
                                nat_note(snat)
                            )
                        },
                    ));
                }
            }
        }

        // A pool known to be empty is marked in the service's entry, so the program refuses its
        // clients at once; an empty slot of a row being rewritten (one slot at a time) is not
        // refused, only dropped, and the client's retry finds it filled. The mark goes before a
        // row fills and comes after it empties.
        let empty = !a.backends.values().any(|b| b.weight > 0);
        // The fallback for slots not written yet: a backend of the new set (already in the
        // backend table), in place before the row changes; it stays valid until the next
        // apply, as retired ids are released only once the row no longer names them.
        let fallback = a
            .backends
            .values()
            .filter(|b| b.weight > 0)
            .map(|b| b.id)
            .min()
            .unwrap_or(0);
        let flags = if empty {
            a.flags
        } else {
            a.flags & !lb_common::SVC_F_EMPTY
        };
        if a.installed && (flags != a.flags || (fallback != a.fallback && fallback != 0)) {
            a.flags = flags;
            a.fallback = fallback;
            self.dp.set_service_any(a.key, a.value()).map_err(map_err)?;
            writes += 1;
        }
        if !a.installed {
            a.fallback = fallback;
        }
        if !a.table_synced {
            let members: Vec<(maglev::Member, u32)> = a
                .backends
                .iter()
                .map(|(addr, b)| {
                    (
                        maglev::Member {
                            id: member_id(*addr),
                            weight: b.weight,
                        },
                        b.id,
                    )
                })
                .collect();
            let only: Vec<maglev::Member> = members.iter().map(|(mm, _)| *mm).collect();
            let want = maglev::build(&only, m);
            let mut changed = 0;
            for (slot, &ix) in want.iter().enumerate() {
                let id = if ix == maglev::EMPTY {
                    0
                } else {
                    members[ix].1
                };
                if a.table[slot] != id {
                    self.dp
                        .set_maglev_slot(a.id, slot as u32, id)
                        .map_err(map_err)?;
                    a.table[slot] = id;
                    changed += 1;
                }
            }
            writes += changed;
            a.table_synced = true;
            for id in a.retired.drain(..) {
                self.backend_ids.release(id);
            }
            if changed > 0 {
                notes.push((
                    None,
                    format!(
                        "service {}: maglev table updated, {changed} of {m} slots changed, {} \
                         backends",
                        svc.name,
                        a.backends.len()
                    ),
                ));
            }
        }

        if !a.installed || (empty && (a.flags & lb_common::SVC_F_EMPTY == 0 || a.fallback != 0)) {
            if empty {
                // No fallback either: the retired ids were released above and may be reused.
                a.flags |= lb_common::SVC_F_EMPTY;
                a.fallback = 0;
            }
            if !a.installed {
                let proto = a.protocol.ip_proto();
                self.dp.add_service_port(a.listen, proto).map_err(map_err)?;
            }
            self.dp.set_service_any(a.key, a.value()).map_err(map_err)?;
            a.installed = true;
            writes += 1;
        }
        Ok(writes)
    }
}

/// The source address full-NAT flows toward `backend` get: the one configured for its family,
/// else the one the kernel would use toward it.
fn snat_source(
    configured: Option<std::net::Ipv4Addr>,
    configured6: Option<std::net::Ipv6Addr>,
    backend: IpAddr,
) -> std::io::Result<IpAddr> {
    match (backend, configured, configured6) {
        (IpAddr::V4(_), Some(a), _) => Ok(IpAddr::V4(a)),
        (IpAddr::V4(b), None, _) => crate::dataplane::source_toward(b).map(IpAddr::V4),
        (IpAddr::V6(_), _, Some(a)) => Ok(IpAddr::V6(a)),
        (IpAddr::V6(b), _, None) => crate::dataplane::source_toward6(b).map(IpAddr::V6),
    }
}

/// How a backend slot with full-NAT source `snat` (`None`: DNAT) is reached, for logs.
fn nat_note(snat: Option<IpAddr>) -> String {
    match snat {
        None => "dnat".into(),
        Some(a) => format!("full nat from {a}"),
    }
}

/// The span a service's change lines are logged in, so each carries the service's name,
/// address and protocol as fields (`--log-format json`).
pub(crate) fn service_span(name: &str, protocol: Protocol, listen: SocketAddr) -> tracing::Span {
    info_span!("service", service = %name, %listen, %protocol)
}
