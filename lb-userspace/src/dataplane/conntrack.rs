//! Reading the conntrack maps: in place, or through a second descriptor off the event loop
//! ([`ConntrackReader`]), and the sweep of expired entries.

use super::*;

impl Dataplane {
    // ---- conntrack ----

    /// An independent handle on the conntrack map, to walk it off the daemon's event loop (a
    /// full walk costs two syscalls per entry).
    pub fn conntrack_reader(&self) -> Result<ConntrackReader> {
        let data = |fd: &std::os::fd::OwnedFd| -> Result<aya::maps::Map> {
            let fd = fd
                .try_clone()
                .map_err(|e| map_err(MAP_CONNTRACK)(MapError::IoError(e)))?;
            let md = MapData::from_fd(fd).map_err(map_err(MAP_CONNTRACK))?;
            Ok(aya::maps::Map::LruHashMap(md))
        };
        let mut maps = Vec::new();
        for fd in &self.conntrack_fds[..2] {
            maps.push(HashMap::try_from(data(fd)?).map_err(map_err(MAP_CONNTRACK))?);
        }
        let mut maps6 = Vec::new();
        for fd in &self.conntrack_fds[2..] {
            maps6.push(
                HashMap::try_from(data(fd)?).map_err(map_err(lb_common::v6::MAP_CONNTRACK6))?,
            );
        }
        Ok(ConntrackReader {
            maps,
            maps6,
            cfg: self.options.dp_config(),
        })
    }

    /// Every conntrack entry: established flows, then unconfirmed ones.
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, CtEntry)> {
        count_walk();
        self.conntrack
            .iter()
            .chain(self.ct_new.iter())
            .filter_map(|r| r.ok())
            .collect()
    }

    pub fn conntrack_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack
            .get(key, 0)
            .ok()
            .or_else(|| self.ct_new.get(key, 0).ok())
    }

    pub fn conntrack_insert(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        self.conntrack
            .insert(&key, &entry, 0)
            .map_err(map_err(MAP_CONNTRACK))
    }

    /// Rewrites the entry at `key` in the map that holds it (unconfirmed flows' or the main
    /// one), or inserts it into the main map. For tests that stage or age flows.
    pub fn conntrack_update(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        if self.ct_new.get(&key, 0).is_ok() {
            return self
                .ct_new
                .insert(&key, &entry, 0)
                .map_err(map_err(lb_common::MAP_CT_NEW));
        }
        self.conntrack_insert(key, entry)
    }

    /// Whether `key` is in the unconfirmed-flow map (CT_NEW) rather than the main one.
    pub fn conntrack_unconfirmed(&self, key: &FlowKey) -> bool {
        self.ct_new.get(key, 0).is_ok()
    }

    /// The service address whose flows to IPv4 DNAT backend `backend` (`proto`) are recorded
    /// without their reply entry until the first reply (lb-common's `MAP_LAZY_REPLY`).
    pub fn lazy_reply_service(
        &self,
        backend: std::net::SocketAddrV4,
        proto: u8,
    ) -> Option<std::net::SocketAddrV4> {
        let k = ServiceKey::new(
            lb_common::ipv4_to_wire(backend.ip().octets()),
            lb_common::port_to_wire(backend.port()),
            proto,
        );
        let v = self.lazy_reply.get(&k, 0).ok()?;
        Some(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::from(v.addr.to_ne_bytes()),
            u16::from_be(v.port),
        ))
    }

    /// Forgets a backend's lazy service: only once no flow to it is left (a flow recorded
    /// lazily would lose its replies), i.e. after the drain purge of a backend no service has.
    pub fn lazy_reply_remove(&mut self, backend: std::net::SocketAddrV4, proto: u8) -> Result<()> {
        let k = ServiceKey::new(
            lb_common::ipv4_to_wire(backend.ip().octets()),
            lb_common::port_to_wire(backend.port()),
            proto,
        );
        absent_is_fine(self.lazy_reply.remove(&k), lb_common::MAP_LAZY_REPLY)
    }

    pub fn conntrack_remove(&mut self, key: &FlowKey) -> Result<()> {
        absent_is_fine(self.conntrack.remove(key), MAP_CONNTRACK)?;
        absent_is_fine(self.ct_new.remove(key), lb_common::MAP_CT_NEW)
    }
}

/// Full walks of the conntrack maps since the process started (each costs two syscalls per
/// entry): what the metrics cache and the sweep's interval keep rare.
pub(super) static CONNTRACK_WALKS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// How many full conntrack walks this process has made.
pub fn conntrack_walks() -> u64 {
    CONNTRACK_WALKS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(super) fn count_walk() {
    CONNTRACK_WALKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The conntrack map through its own descriptor (`Send`: for `spawn_blocking`).
pub struct ConntrackReader {
    /// The main map and the unconfirmed-flow map.
    maps: Vec<HashMap<MapData, FlowKey, CtEntry>>,
    /// IPv6's two.
    maps6: Vec<HashMap<MapData, lb_common::v6::FlowKey6, lb_common::v6::CtEntry6>>,
    cfg: DpConfig,
}

impl ConntrackReader {
    pub fn entries(&self) -> Vec<(FlowKey, CtEntry)> {
        count_walk();
        self.maps
            .iter()
            .flat_map(|m| m.iter().filter_map(|r| r.ok()))
            .collect()
    }

    /// Every IPv6 conntrack entry (part of the same walk's count as [`Self::entries`]).
    pub fn entries6(&self) -> Vec<(lb_common::v6::FlowKey6, lb_common::v6::CtEntry6)> {
        self.maps6
            .iter()
            .flat_map(|m| m.iter().filter_map(|r| r.ok()))
            .collect()
    }

    /// Removes entries idle past their timeout (the rule the program applies), returning how
    /// many were removed. `now_ns` is CLOCK_MONOTONIC, the clock of `bpf_ktime_get_coarse_ns`.
    pub fn gc(&mut self, now_ns: u64) -> Result<usize> {
        let stale: Vec<FlowKey> = self
            .entries()
            .into_iter()
            .filter(|(k, e)| lb_common::ct::idle_expired(e, k.proto, now_ns, &self.cfg))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            for m in &mut self.maps {
                absent_is_fine(m.remove(k), MAP_CONNTRACK)?;
            }
        }
        // IPv6: the same rule (an IPv6 entry's `ct` is an IPv4 entry).
        let stale6: Vec<lb_common::v6::FlowKey6> = self
            .entries6()
            .into_iter()
            .filter(|(k, e)| lb_common::ct::idle_expired(&e.ct, k.proto, now_ns, &self.cfg))
            .map(|(k, _)| k)
            .collect();
        for k in &stale6 {
            for m in &mut self.maps6 {
                absent_is_fine(m.remove(k), lb_common::v6::MAP_CONNTRACK6)?;
            }
        }
        Ok(stale.len() + stale6.len())
    }
}
