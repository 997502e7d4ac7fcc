//! The IPv6 maps (lb-common's `v6`): typed reads and writes of the IPv6 services, backends,
//! conntrack and local addresses. The maps are reached through the loaded object by name (the
//! IPv4 handles stay as they are).
//!
//! The reconciler does not write IPv6 services yet (issue 12: the configuration takes IPv4
//! addresses only); [`Dataplane::install_service6`] is the writer until it does, used by the
//! IPv6 fixtures and the benchmark.

use std::net::{Ipv6Addr, SocketAddrV6};

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    BackendRoute, SVC_F_EMPTY, ServiceValue, port_flag, port_to_wire,
    v6::{
        Backend6, CtEntry6, FlowKey6, MAP_BACKENDS6, MAP_CONNTRACK6, MAP_CT_NEW6, MAP_LOCAL_ADDRS6,
        MAP_SERVICES6, ServiceKey6, ipv6_to_wire,
    },
};

use super::*;
use crate::maglev;

/// An IPv6 backend to install: its id (of the id space shared with IPv4), address, weight,
/// and for full NAT the source address its flows get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend6Spec {
    pub id: u32,
    pub addr: SocketAddrV6,
    pub weight: u32,
    pub snat: Option<Ipv6Addr>,
}

impl Dataplane {
    fn hash6<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    fn hash6_ro<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>> {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    pub(crate) fn set_service6(&mut self, key: ServiceKey6, value: ServiceValue) -> Result<()> {
        self.changing()?;
        self.hash6::<ServiceKey6, ServiceValue>(MAP_SERVICES6)?
            .insert(&key, &value, 0)
            .map_err(map_err(MAP_SERVICES6))
    }

    pub(crate) fn remove_service6(&mut self, key: &ServiceKey6) -> Result<()> {
        self.changing()?;
        absent_is_fine(
            self.hash6::<ServiceKey6, ServiceValue>(MAP_SERVICES6)?
                .remove(key),
            MAP_SERVICES6,
        )
    }

    /// The IPv6 services as the kernel holds them.
    pub fn services6(&self) -> Result<Vec<(ServiceKey6, ServiceValue)>> {
        Ok(self
            .hash6_ro::<ServiceKey6, ServiceValue>(MAP_SERVICES6)?
            .iter()
            .filter_map(|r| r.ok())
            .collect())
    }

    /// Writes an IPv6 backend slot, dropping any route cached for the id's previous occupant.
    pub(crate) fn set_backend6(&mut self, id: u32, backend: Backend6) -> Result<()> {
        self.changing()?;
        self.backend_routes
            .set(id, &BackendRoute::default(), 0)
            .map_err(map_err(lb_common::MAP_BACKEND_ROUTES))?;
        let map = self
            .ebpf
            .map_mut(MAP_BACKENDS6)
            .ok_or(DataplaneError::MissingMap {
                name: MAP_BACKENDS6,
            })?;
        Array::<&mut MapData, Backend6>::try_from(map)
            .map_err(map_err(MAP_BACKENDS6))?
            .set(id, &backend, 0)
            .map_err(map_err(MAP_BACKENDS6))
    }

    /// An IPv6 backend slot as the kernel holds it.
    pub fn backend6(&self, id: u32) -> Result<Backend6> {
        let map = self
            .ebpf
            .map(MAP_BACKENDS6)
            .ok_or(DataplaneError::MissingMap {
                name: MAP_BACKENDS6,
            })?;
        Array::<&MapData, Backend6>::try_from(map)
            .map_err(map_err(MAP_BACKENDS6))?
            .get(&id, 0)
            .map_err(map_err(MAP_BACKENDS6))
    }

    /// Installs an IPv6 service: its backends' slots first, then its Maglev row (the shared
    /// `MAGLEV` map, row `id`), the port filter, and the service entry last (the kernel never
    /// points at a slot not yet written), then settles the change (the table epoch, as the
    /// reconciler's `apply` does). Ids are of the spaces shared with IPv4; the caller keeps them
    /// apart from the reconciler's (tests and the benchmark install IPv6 services this way).
    pub fn install_service6(
        &mut self,
        id: u32,
        listen: SocketAddrV6,
        proto: u8,
        backends: &[Backend6Spec],
    ) -> Result<()> {
        for b in backends {
            let (addr, port) = (
                ipv6_to_wire(b.addr.ip().octets()),
                port_to_wire(b.addr.port()),
            );
            self.set_backend6(
                b.id,
                match b.snat {
                    None => Backend6::dnat(addr, port),
                    Some(s) => Backend6::full_nat(addr, port, ipv6_to_wire(s.octets())),
                },
            )?;
            self.add_port_flags(b.addr.port(), port_flag(proto, true))?;
        }
        let members: Vec<maglev::Member> = backends
            .iter()
            .map(|b| maglev::Member {
                id: member_id6(b.addr),
                weight: b.weight,
            })
            .collect();
        let m = self.options.maglev_size;
        let table = maglev::build(&members, m);
        for (slot, &ix) in table.iter().enumerate() {
            let bid = if ix == maglev::EMPTY {
                0
            } else {
                backends[ix].id
            };
            self.set_maglev_slot(id, slot as u32, bid)?;
        }
        self.add_service_port(listen.into(), proto)?;
        let live = backends.iter().filter(|b| b.weight > 0);
        let value = ServiceValue {
            id,
            flags: if backends.is_empty() { SVC_F_EMPTY } else { 0 },
            fallback: live.clone().next().map_or(0, |b| b.id),
            _pad: 0,
        };
        let key = ServiceKey6::new(
            ipv6_to_wire(listen.ip().octets()),
            port_to_wire(listen.port()),
            proto,
        );
        self.set_service6(key, value)?;
        // A whole change, as the reconciler's `apply` is: new flows are stamped from here on.
        self.settle()
    }

    /// An IPv6 flow's entry, from either conntrack map.
    pub fn conntrack6_get(&self, key: &FlowKey6) -> Option<CtEntry6> {
        [MAP_CONNTRACK6, MAP_CT_NEW6]
            .into_iter()
            .find_map(|name| self.conntrack6_in(name, key))
    }

    /// The IPv6 entry at `key` in the main map only (a confirmed flow's, or a UDP flow's).
    pub fn conntrack6_main_get(&self, key: &FlowKey6) -> Option<CtEntry6> {
        self.conntrack6_in(MAP_CONNTRACK6, key)
    }

    /// The IPv6 entry at `key` in conntrack map `name`.
    fn conntrack6_in(&self, name: &'static str, key: &FlowKey6) -> Option<CtEntry6> {
        self.hash6_ro::<FlowKey6, CtEntry6>(name)
            .ok()?
            .get(key, 0)
            .ok()
    }

    /// Whether the IPv6 flow's entry is in the unconfirmed map.
    pub fn conntrack6_unconfirmed(&self, key: &FlowKey6) -> bool {
        self.hash6_ro::<FlowKey6, CtEntry6>(MAP_CT_NEW6)
            .is_ok_and(|m| m.get(key, 0).is_ok())
    }

    /// Writes an IPv6 conntrack entry into the main map (tests stage flows with it).
    pub fn conntrack6_insert(&mut self, key: FlowKey6, entry: CtEntry6) -> Result<()> {
        self.hash6::<FlowKey6, CtEntry6>(MAP_CONNTRACK6)?
            .insert(&key, &entry, 0)
            .map_err(map_err(MAP_CONNTRACK6))
    }

    /// Removes an IPv6 conntrack entry from either map (absent is fine).
    pub fn conntrack6_remove(&mut self, key: &FlowKey6) -> Result<()> {
        for name in [MAP_CONNTRACK6, MAP_CT_NEW6] {
            absent_is_fine(self.hash6::<FlowKey6, CtEntry6>(name)?.remove(key), name)?;
        }
        Ok(())
    }

    /// Every IPv6 conntrack entry (both maps).
    pub fn conntrack6_entries(&self) -> Vec<(FlowKey6, CtEntry6)> {
        [MAP_CONNTRACK6, MAP_CT_NEW6]
            .into_iter()
            .filter_map(|name| self.hash6_ro::<FlowKey6, CtEntry6>(name).ok())
            .flat_map(|m| m.iter().filter_map(|r| r.ok()).collect::<Vec<_>>())
            .collect()
    }

    /// Makes the IPv6 local-address set exactly `addrs`; returns the number of writes.
    pub fn sync_local_addrs6(
        &mut self,
        addrs: &std::collections::BTreeSet<[u32; 4]>,
    ) -> Result<usize> {
        let name = MAP_LOCAL_ADDRS6;
        let have: std::collections::BTreeSet<[u32; 4]> = self
            .hash6::<[u32; 4], u8>(name)?
            .keys()
            .filter_map(|k| k.ok())
            .collect();
        if &have == addrs {
            return Ok(0);
        }
        // What a wildcard service's pick reads: a change of the tables (lb-common's `epoch`),
        // settled below whether or not every write succeeds (as IPv4's `sync_local_addrs`).
        self.changing()?;
        let written = self
            .hash6::<[u32; 4], u8>(name)
            .and_then(|mut map| super::attach::write_addr_set(&mut map, name, &have, addrs));
        self.settle()?;
        written
    }
}

/// The Maglev identity of an IPv6 backend (address and port; see the reconciler's
/// `member_id` for IPv4).
pub(crate) fn member_id6(addr: SocketAddrV6) -> u64 {
    let o = addr.ip().octets();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in o.iter().chain(&addr.port().to_be_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// This host's IPv6 addresses (in-map form), loopback excluded: what `[::]` services match.
pub fn host_ipv6_addrs() -> std::collections::BTreeSet<[u32; 4]> {
    let mut out = std::collections::BTreeSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET6 {
                let sin6 = &*a.cast::<libc::sockaddr_in6>();
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !ip.is_loopback() {
                    out.insert(ipv6_to_wire(ip.octets()));
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}
