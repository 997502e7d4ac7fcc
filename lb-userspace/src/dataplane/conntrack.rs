//! Reading the conntrack maps: in place, or through a second descriptor off the event loop
//! ([`ConntrackReader`]), and the sweep of expired entries.

use super::*;
use lb_common::{
    Route,
    hash::flow_hash,
    syn::{SynSet, SynSlot, set_of},
};

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
        for fd in &self.conntrack_fds[2..4] {
            maps6.push(
                HashMap::try_from(data(fd)?).map_err(map_err(lb_common::v6::MAP_CONNTRACK6))?,
            );
        }
        let view = SynView::of(self.conntrack_fds[4].as_fd(), self.syn_view.sets)?;
        let claims = ClaimView::of(self.conntrack_fds[5].as_fd(), self.claim_view.words)?;
        Ok(ConntrackReader {
            maps,
            maps6,
            view,
            claims,
            hash_seed: self.options.hash_seed,
            cfg: self.options.dp_config(),
        })
    }

    /// Every conntrack entry: established flows, then unconfirmed ones (pending handshakes
    /// last, as the forward entries they become in CT_NEW).
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, CtEntry)> {
        count_walk();
        self.conntrack
            .iter()
            .chain(self.ct_new.iter())
            .filter_map(|r| r.ok())
            .chain({
                // One route read per backend, not per pending handshake.
                let (now, mut routes) = (monotonic_ns(), std::collections::HashMap::new());
                // Stamped as the program would stamp it moving to CT_NEW now.
                let epoch = self.epoch().unwrap_or(0);
                self.syn_view
                    .pending()
                    .filter(move |(n, s)| self.pending_live(*n, s, now))
                    .flat_map(move |(n, s)| {
                        let route = *routes
                            .entry(s.backend_id)
                            .or_insert_with(|| self.pending_route(s.backend_id, now));
                        let reply = self.claimed_reply(n, &s, now, epoch);
                        std::iter::once((s.key(), s.forward_entry(route, epoch))).chain(reply)
                    })
            })
            .collect()
    }

    /// The route a pending handshake's forward entry gets when the program moves it to CT_NEW:
    /// its backend's cached route while that is fresh at `now` (see the program's
    /// `syn::route_of`).
    fn pending_route(&self, backend_id: u32, now: u64) -> Route {
        self.backend_routes
            .get(&backend_id, 0)
            .ok()
            .filter(|r| {
                self.options.redirect
                    && r.route.ifindex != 0
                    && now.wrapping_sub(r.stamp_ns) <= lb_common::ct::TOUCH_INTERVAL_NS
            })
            .map_or(Route::NONE, |r| r.route)
    }

    /// The entry at `key` in the main map only (a confirmed flow's, or a UDP flow's), where
    /// [`Self::conntrack_get`] looks everywhere a flow's entry may be.
    pub fn conntrack_main_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack.get(key, 0).ok()
    }

    pub fn conntrack_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack_main_get(key)
            .or_else(|| self.ct_new.get(key, 0).ok())
            .or_else(|| {
                let now = monotonic_ns();
                self.pending_slot(key)
                    .filter(|(i, set, w)| self.pending_live(slot_name(*i, *w), &set.ways[*w], now))
                    .map(|(_, set, w)| set.ways[w])
                    .map(|s| {
                        let route = self.pending_route(s.backend_id, now);
                        s.forward_entry(route, self.epoch().unwrap_or(0))
                    })
            })
            .or_else(|| self.pending_reply(key, monotonic_ns()))
    }

    /// The reply half of a pending full-NAT handshake whose port its claim holds (lb-common's
    /// `claim`): the program writes it with the backend's first reply, and until then it is
    /// listed as that will be, so both halves of the flow show. `key` is its reply key.
    fn pending_reply(&self, key: &FlowKey, now: u64) -> Option<CtEntry> {
        let name = lb_common::claim::holder(self.claim_view.word(key), now)?;
        let s = self.syn_view.set(name >> 2)?.ways[(name & 3) as usize];
        self.claimed_reply(name, &s, now, self.epoch().unwrap_or(0))
            .filter(|(k, _)| k == key)
            .map(|(_, e)| e)
    }

    /// Pending handshake `s` (in slot `name`)'s reply half, keyed, if it is a full-NAT one
    /// whose port its live claim holds (see [`Self::pending_reply`]), stamped as the program
    /// would at the table epoch `epoch` (read once by the caller, not per handshake).
    fn claimed_reply(
        &self,
        name: u32,
        s: &SynSlot,
        now: u64,
        epoch: u64,
    ) -> Option<(FlowKey, CtEntry)> {
        claimed_reply((name, s), now, epoch, |k| self.claim_view.word(k))
    }

    /// Whether pending handshake `s`, in slot `name`, is a flow at `now` (see
    /// [`pending_live`]).
    fn pending_live(&self, name: u32, s: &SynSlot, now: u64) -> bool {
        let idle = self.options.tcp_idle.as_nanos() as u64;
        pending_live(
            (name, s),
            now,
            idle,
            |k| self.ct_new.get(k, 0).ok(),
            |k| self.claim_view.word(k),
        )
    }

    /// The set of the handshake table `key` lands in (see [`SynView::set_of`]).
    fn syn_set_of(&self, key: &FlowKey) -> u32 {
        self.syn_view.set_of(key, self.options.hash_seed)
    }

    /// `key`'s pending handshake (lb-common's `syn`): its set's index, the set, and the way
    /// holding it, whole.
    fn pending_slot(&self, key: &FlowKey) -> Option<(u32, SynSet, usize)> {
        let i = self.syn_set_of(key);
        let set = self.syn_view.set(i)?;
        let w = set.ways.iter().position(|s| s.holds(key) && s.is_valid())?;
        Some((i, set, w))
    }

    /// Writes `slot` into its key's set of the handshake table (the way holding its key, else
    /// the first), whatever its check word: for tests that forge or tear a pending handshake.
    pub fn pending_write(&mut self, slot: SynSlot) -> Result<()> {
        let key = slot.key();
        let i = self.syn_set_of(&key);
        if let Some(set) = self.syn_view.set(i) {
            let w = set.ways.iter().position(|s| s.holds(&key)).unwrap_or(0);
            self.syn_view.write(i, w, slot);
        }
        Ok(())
    }

    /// Holds full-NAT reply key `rkey`'s port claim word as a handshake being recorded holds
    /// it (live, naming no slot yet), so the program's port search passes that port by: for
    /// tests of a busy claim word (one another reply key's handshake shares).
    pub fn claim_hold(&mut self, rkey: &FlowKey) {
        self.claim_view.hold(rkey, monotonic_ns());
    }

    /// Full-NAT reply key `rkey`'s port claim word as it stands (lb-common's `claim`).
    pub fn claim_word(&self, rkey: &FlowKey) -> u64 {
        self.claim_view.word(rkey)
    }

    /// Stores `w` into full-NAT reply key `rkey`'s port claim word: for tests that age a
    /// TIME_WAIT mark (`claim::time_wait`).
    pub fn claim_store(&mut self, rkey: &FlowKey, w: u64) {
        self.claim_view.store(rkey, w);
    }

    /// The forward key reply key `rkey`'s reply-index slot names (lb-common's
    /// `claim::MAP_FNAT_INDEX`; all zero: none).
    pub fn fnat_index(&self, rkey: &FlowKey) -> Result<FlowKey> {
        let i = lb_common::claim::claim_index(rkey, self.claim_view.words);
        self.fnat_index
            .get(&i, 0)
            .map_err(map_err(lb_common::claim::MAP_FNAT_INDEX))
    }

    /// Whether reply key `rkey`'s reply-index slot is marked as naming a flow (its bit in
    /// lb-common's `claim::MAP_FNAT_NAMED`).
    pub fn fnat_named(&self, rkey: &FlowKey) -> Result<bool> {
        let i = lb_common::claim::claim_index(rkey, self.claim_view.words);
        let (word, bit) = lb_common::claim::named_bit(i);
        let w = self
            .fnat_named
            .get(&word, 0)
            .map_err(map_err(lb_common::claim::MAP_FNAT_NAMED))?;
        Ok(w & bit != 0)
    }

    /// Stores forward key `fkey` into reply key `rkey`'s reply-index slot and marks it named,
    /// as the program does when it confirms a flow: for tests and benchmarks that stage an
    /// indexed flow's entries (not atomic: nothing else may write the index meanwhile).
    pub fn fnat_index_store(&mut self, rkey: &FlowKey, fkey: FlowKey) -> Result<()> {
        let i = lb_common::claim::claim_index(rkey, self.claim_view.words);
        self.fnat_index
            .set(i, &fkey, 0)
            .map_err(map_err(lb_common::claim::MAP_FNAT_INDEX))?;
        let named = lb_common::claim::MAP_FNAT_NAMED;
        let (word, bit) = lb_common::claim::named_bit(i);
        let w = self.fnat_named.get(&word, 0).map_err(map_err(named))?;
        self.fnat_named
            .set(word, &(w | bit), 0)
            .map_err(map_err(named))
    }

    /// Clears every pending handshake of the table (each way's check word stored 0), leaving
    /// the conntrack maps as they are: for benchmarks whose flows would otherwise meet
    /// handshakes of their earlier runs.
    pub fn pending_clear_all(&self) {
        self.syn_view.clear_all();
    }

    /// Clears `key`'s pending handshake, if any, in place (see [`SynView::clear`]): nothing
    /// else in its set is touched.
    fn pending_remove(&mut self, key: &FlowKey) -> Result<()> {
        self.syn_view.clear(self.syn_set_of(key), key);
        Ok(())
    }

    pub fn conntrack_insert(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        self.conntrack
            .insert(&key, &entry, 0)
            .map_err(map_err(MAP_CONNTRACK))
    }

    /// Rewrites the entry at `key` in the map that holds it (unconfirmed flows' or the main
    /// one), or inserts it into the main map. For tests that stage or age flows.
    pub fn conntrack_update(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        if self.pending_reply(&key, monotonic_ns()).is_some() {
            // The reply half of a pending full-NAT handshake is its port's claim: its time is
            // the claim's (what ages the hold).
            self.claim_view.restamp(&key, entry.last_seen_ns);
            return Ok(());
        }
        if self.pending_slot(&key).is_some() {
            // A pending handshake's entry as written goes where the program moves it.
            self.ct_new
                .insert(&key, &entry, 0)
                .map_err(map_err(lb_common::MAP_CT_NEW))?;
            return self.pending_remove(&key);
        }
        if self.ct_new.get(&key, 0).is_ok() {
            return self
                .ct_new
                .insert(&key, &entry, 0)
                .map_err(map_err(lb_common::MAP_CT_NEW));
        }
        self.conntrack_insert(key, entry)
    }

    /// How many entries CT_NEW itself holds (pending handshakes, and the reply halves their
    /// claims stand for, not counted): what the program inserted there.
    pub fn ct_new_len(&self) -> usize {
        self.ct_new.keys().filter(|k| k.is_ok()).count()
    }

    /// Whether `key` is an unconfirmed flow (in CT_NEW, or a handshake pending) rather than
    /// one of the main map.
    pub fn conntrack_unconfirmed(&self, key: &FlowKey) -> bool {
        self.ct_new.get(key, 0).is_ok() || self.conntrack_pending(key)
    }

    /// Whether `key` is a handshake pending in the handshake table (lb-common's `syn`), or the
    /// reply key of a full-NAT one whose claim holds its port (no reply entry yet).
    pub fn conntrack_pending(&self, key: &FlowKey) -> bool {
        let now = monotonic_ns();
        self.pending_slot(key)
            .is_some_and(|(i, set, w)| self.pending_live(slot_name(i, w), &set.ways[w], now))
            || self.pending_reply(key, now).is_some()
    }

    /// The service addresses whose flows to IPv4 DNAT backend `backend` (`proto`) are recorded
    /// without their reply entry until the first reply (lb-common's `MAP_LAZY_REPLY`), in the
    /// order the program took them; empty if none.
    pub fn lazy_reply_services(
        &self,
        backend: std::net::SocketAddrV4,
        proto: u8,
    ) -> Vec<std::net::SocketAddrV4> {
        let k = ServiceKey::new(
            lb_common::ipv4_to_wire(backend.ip().octets()),
            lb_common::port_to_wire(backend.port()),
            proto,
        );
        let Ok(v) = self.lazy_reply.get(&k, 0) else {
            return Vec::new();
        };
        v.iter()
            .map(|(addr, port)| {
                std::net::SocketAddrV4::new(
                    std::net::Ipv4Addr::from(addr.to_ne_bytes()),
                    u16::from_be(port),
                )
            })
            .collect()
    }

    /// Forgets a backend's lazy services: only once no flow to it is left (a flow recorded
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
        absent_is_fine(self.ct_new.remove(key), lb_common::MAP_CT_NEW)?;
        self.pending_remove(key)
    }
}

/// The handshake table mapped into this process (the map is `BPF_F_MMAPABLE`), for writes
/// that must not touch the rest of a set: a set written back whole through the map (a syscall
/// copies all four ways) undoes a handshake the program records in another way of it between
/// the read and the write.
pub(super) struct SynView {
    base: std::ptr::NonNull<SynSet>,
    /// The table's sets (the map's size, which userspace set from the same options as the
    /// program's `syn_sets`).
    sets: u32,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until `drop` unmaps it; every access goes
// through volatile reads or an atomic on a 4-aligned word.
unsafe impl Send for SynView {}

impl SynView {
    /// Maps the table of `sets` sets behind descriptor `fd`.
    pub(super) fn of(fd: std::os::fd::BorrowedFd<'_>, sets: u32) -> Result<Self> {
        let bytes = sets as usize * std::mem::size_of::<SynSet>();
        let (p, len) = map_shared(fd, bytes, true, lb_common::syn::MAP_CT_SYN)?;
        Ok(Self {
            base: p.cast(),
            sets,
            len,
        })
    }

    /// The set `key` lands in, as the program picks it (flow hash with `hash_seed`).
    pub(super) fn set_of(&self, key: &FlowKey, hash_seed: u32) -> u32 {
        set_of(flow_hash(key, hash_seed), self.sets)
    }

    /// Writes `slot` whole into way `way` of set `set` (for tests that forge or tear a pending
    /// handshake; nothing else in the set is written).
    pub(super) fn write(&self, set: u32, way: usize, slot: SynSlot) {
        if set < self.sets && way < lb_common::syn::SYN_WAYS as usize {
            // SAFETY: inside the mapping (checked above).
            unsafe {
                std::ptr::write_volatile(
                    std::ptr::addr_of_mut!((*self.base.as_ptr().add(set as usize)).ways[way]),
                    slot,
                );
            }
        }
    }

    /// Set `set`, copied whole from the mapping (volatile: the program may be writing it; a
    /// torn slot fails `SynSlot::is_valid`, as one copied by a map lookup would). None past the
    /// table.
    pub(super) fn set(&self, set: u32) -> Option<SynSet> {
        // SAFETY: `set` < `sets`, inside the mapping.
        (set < self.sets)
            .then(|| unsafe { std::ptr::read_volatile(self.base.as_ptr().add(set as usize)) })
    }

    /// Every whole pending handshake of the table with its slot's name, read in place (no
    /// syscall per set).
    pub(super) fn pending(&self) -> impl Iterator<Item = (u32, SynSlot)> + '_ {
        (0..self.sets)
            .filter_map(|i| self.set(i).map(|set| (i, set)))
            .flat_map(|(i, set)| {
                set.ways
                    .into_iter()
                    .enumerate()
                    .map(move |(w, s)| (slot_name(i, w), s))
            })
            .filter(|(_, s)| s.is_valid())
    }

    /// Clears every way of the table (its check word stored 0).
    pub(super) fn clear_all(&self) {
        for set in 0..self.sets as usize {
            for w in 0..lb_common::syn::SYN_WAYS as usize {
                // SAFETY: inside the mapping; a 4-aligned u32 the program writes with plain
                // stores.
                unsafe {
                    let check =
                        std::ptr::addr_of_mut!((*self.base.as_ptr().add(set)).ways[w].check);
                    std::sync::atomic::AtomicU32::from_ptr(check)
                        .store(0, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    }

    /// Clears the way of set `set` that holds `key`'s pending handshake, if one does, by a
    /// compare-and-swap of that way's check word from the value read with it to 0: if the
    /// program rewrote the way meanwhile (another handshake, whose check differs), it stays.
    /// Returns whether a way was cleared.
    pub(super) fn clear(&self, set: u32, key: &FlowKey) -> bool {
        if set >= self.sets {
            return false;
        }
        let mut cleared = false;
        for w in 0..lb_common::syn::SYN_WAYS as usize {
            // SAFETY: `set` < `sets`, inside the mapping; a volatile copy (the program may be
            // writing the way: a torn copy fails `is_valid`).
            let (slot, check) = unsafe {
                let s = std::ptr::addr_of_mut!((*self.base.as_ptr().add(set as usize)).ways[w]);
                (
                    std::ptr::read_volatile(s),
                    std::ptr::addr_of_mut!((*s).check),
                )
            };
            if !(slot.holds(key) && slot.is_valid()) {
                continue;
            }
            // SAFETY: `check` is a 4-aligned u32 of the shared mapping, which the program
            // writes with plain stores and compare-and-swaps of the 8-byte word holding it
            // (from a valid check word only this swap's expected value matches).
            let atomic = unsafe { std::sync::atomic::AtomicU32::from_ptr(check) };
            cleared |= atomic
                .compare_exchange(
                    slot.check,
                    0,
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                )
                .is_ok();
        }
        cleared
    }
}

impl Drop for SynView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A handshake-table slot's name as the program's claims hold it: its set, then its way.
fn slot_name(set: u32, way: usize) -> u32 {
    (set << 2) | way as u32
}

/// Maps `bytes` of the `BPF_F_MMAPABLE` array behind `fd` (`name`, for the error), shared,
/// writable if `write`: the base and the mapping's length (whole pages).
fn map_shared(
    fd: std::os::fd::BorrowedFd<'_>,
    bytes: usize,
    write: bool,
    name: &'static str,
) -> Result<(std::ptr::NonNull<u8>, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1);
    let len = bytes.div_ceil(page) * page;
    let prot = if write {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of the map's memory; nothing else is mapped there.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(map_err(name)(MapError::IoError(
            std::io::Error::last_os_error(),
        )));
    }
    Ok((
        std::ptr::NonNull::new(p.cast()).expect("mmap returned null"),
        len,
    ))
}

/// The full-NAT port claims (lb-common's `claim`) mapped into this process: which pending
/// full-NAT handshake holds its port by its claim rather than its reply entry. Written only by
/// [`ClaimView::restamp`] and [`ClaimView::hold`], for tests that age or hold a claim.
pub(super) struct ClaimView {
    base: std::ptr::NonNull<u64>,
    /// The array's words (its size, which userspace set from the same options as the
    /// program's `snat_claims`).
    pub(super) words: u32,
    len: usize,
}

// SAFETY: as for `SynView`; volatile reads and compare-and-swaps of 8-aligned words.
unsafe impl Send for ClaimView {}

impl ClaimView {
    /// Maps the `words` claim words behind descriptor `fd`.
    pub(super) fn of(fd: std::os::fd::BorrowedFd<'_>, words: u32) -> Result<Self> {
        let bytes = words as usize * 8;
        let (p, len) = map_shared(fd, bytes, true, lb_common::claim::MAP_SNAT_CLAIMS)?;
        Ok(Self {
            base: p.cast(),
            words,
            len,
        })
    }

    /// The claim word of full-NAT reply key `rkey`.
    pub(super) fn word(&self, rkey: &FlowKey) -> u64 {
        let i = lb_common::claim::claim_index(rkey, self.words);
        if i >= self.words {
            return 0;
        }
        // SAFETY: `i` < `words`, inside the mapping.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(i as usize)) }
    }

    /// `rkey`'s claim word, for the tests' writes.
    fn atomic(&self, rkey: &FlowKey) -> Option<&std::sync::atomic::AtomicU64> {
        let i = lb_common::claim::claim_index(rkey, self.words);
        if i >= self.words {
            return None;
        }
        // SAFETY: inside the mapping (checked above), an 8-aligned u64 the program reaches
        // only by atomics and reads, valid as long as `self`.
        Some(unsafe { std::sync::atomic::AtomicU64::from_ptr(self.base.as_ptr().add(i as usize)) })
    }

    /// Stores into `rkey`'s claim word a claim taken at `at_ns` for a handshake being recorded
    /// (naming no slot yet). For tests that hold a port's claim.
    pub(super) fn hold(&self, rkey: &FlowKey, at_ns: u64) {
        self.store(rkey, lb_common::claim::word(at_ns, None));
    }

    /// Stores `w` into `rkey`'s claim word. For tests.
    pub(super) fn store(&self, rkey: &FlowKey, w: u64) {
        if let Some(atomic) = self.atomic(rkey) {
            atomic.store(w, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Gives `rkey`'s claim word the time `at_ns`, naming what it named, by a compare-and-swap
    /// (a word the program rewrote meanwhile stays). For tests that age a pending handshake.
    pub(super) fn restamp(&self, rkey: &FlowKey, at_ns: u64) {
        let Some(atomic) = self.atomic(rkey) else {
            return;
        };
        let cur = atomic.load(std::sync::atomic::Ordering::SeqCst);
        let new = lb_common::claim::word(at_ns, lb_common::claim::slot_of(cur));
        let _ = atomic.compare_exchange(
            cur,
            new,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

impl Drop for ClaimView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Whether pending handshake `s`, in slot `name`, is a flow at `now` (CT_NEW read through
/// `ct_new`, the claim word of a reply key through `claim`), by the program's rules (its
/// `pending`): not idle past the TCP timeout `tcp_idle_ns`, and a full-NAT one only while its
/// port is held for it, by its live claim naming its slot (before its backend answers) or by
/// its reply entry in CT_NEW (a new flow may have taken the port once the hold passed, leaving
/// the slot). A slot that is over stays in the table
/// until the program records a new handshake over it (the oldest way of a set goes first): the
/// daemon's sweep does not write the table (see [`ConntrackReader::gc`]), and the drain purge
/// clears one way in place ([`SynView::clear`]).
fn pending_live(
    (name, s): (u32, &SynSlot),
    now: u64,
    tcp_idle_ns: u64,
    ct_new: impl Fn(&FlowKey) -> Option<CtEntry>,
    claim: impl Fn(&FlowKey) -> u64,
) -> bool {
    if s.idle_past(now, tcp_idle_ns) {
        return false;
    }
    if !s.full_nat() {
        return true;
    }
    let (key, rkey) = (s.key(), s.full_nat_reply_key());
    claimed_reply((name, s), now, 0, claim).is_some()
        || ct_new(&rkey).is_some_and(|r| lb_common::ct::is_reply_of(&r, &rkey, &key))
}

/// Pending handshake `s` (in slot `name`)'s reply half, keyed, if it is a full-NAT flow whose
/// port its live claim (read through `claim`) holds, naming its slot, at `now`: written by the
/// program with the backend's first reply, listed as that will be until then (stamped as the
/// program would stamp it at the table epoch `epoch`; 0: shown as none).
fn claimed_reply(
    (name, s): (u32, &SynSlot),
    now: u64,
    epoch: u64,
    claim: impl Fn(&FlowKey) -> u64,
) -> Option<(FlowKey, CtEntry)> {
    if !s.full_nat() || !s.is_valid() {
        return None;
    }
    let rkey = s.full_nat_reply_key();
    (lb_common::claim::holder(claim(&rkey), now) == Some(name))
        .then(|| (rkey, s.reply_entry(epoch)))
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
    /// The handshake table, mapped (read in place; one way cleared in place).
    view: SynView,
    /// The full-NAT port claims, mapped (read only here).
    claims: ClaimView,
    hash_seed: u32,
    cfg: DpConfig,
}

impl ConntrackReader {
    pub fn entries(&self) -> Vec<(FlowKey, CtEntry)> {
        count_walk();
        self.map_entries()
            .chain({
                let now = monotonic_ns();
                self.view
                    .pending()
                    .filter(move |(n, s)| self.pending_live(*n, s, now))
                    .flat_map(move |(n, s)| {
                        let reply = claimed_reply((n, &s), now, 0, |k| self.claims.word(k));
                        // (The epoch stamp is not known here: shown as none.)
                        let fwd = s.forward_entry(Route::NONE, 0);
                        std::iter::once((s.key(), fwd)).chain(reply)
                    })
            })
            .collect()
    }

    /// Clears `key`'s pending handshake, if any, without touching the rest of its set (see
    /// [`SynView::clear`]; the drain purge's way, through the dataplane's own descriptor).
    pub fn pending_remove(&self, key: &FlowKey) -> bool {
        self.view.clear(self.view.set_of(key, self.hash_seed), key)
    }

    /// [`pending_live`] with CT_NEW read through this reader's descriptor.
    fn pending_live(&self, name: u32, s: &SynSlot, now: u64) -> bool {
        pending_live(
            (name, s),
            now,
            self.cfg.tcp_idle_ns,
            |k| self.maps[1].get(k, 0).ok(),
            |k| self.claims.word(k),
        )
    }

    /// The entries of the two conntrack maps (not the handshake table).
    fn map_entries(&self) -> impl Iterator<Item = (FlowKey, CtEntry)> + '_ {
        self.maps
            .iter()
            .flat_map(|m| m.iter().filter_map(|r| r.ok()))
    }

    /// Every IPv6 conntrack entry (part of the same walk's count as [`Self::entries`]).
    pub fn entries6(&self) -> Vec<(lb_common::v6::FlowKey6, lb_common::v6::CtEntry6)> {
        self.maps6
            .iter()
            .flat_map(|m| m.iter().filter_map(|r| r.ok()))
            .collect()
    }

    /// Removes the entry at `key` from both conntrack maps (absent is fine), leaving the other
    /// half of its flow: the sweep's removal, and a test's way to evict one half alone as the
    /// LRU may while packets run through the dataplane's own handle.
    pub fn remove(&mut self, key: &FlowKey) -> Result<()> {
        for m in &mut self.maps {
            absent_is_fine(m.remove(key), MAP_CONNTRACK)?;
        }
        Ok(())
    }

    /// [`Self::remove`] for an IPv6 key.
    pub fn remove6(&mut self, key: &lb_common::v6::FlowKey6) -> Result<()> {
        for m in &mut self.maps6 {
            absent_is_fine(m.remove(key), lb_common::v6::MAP_CONNTRACK6)?;
        }
        Ok(())
    }

    /// Removes the conntrack maps' entries idle past their timeout (the rule the program
    /// applies), returning how many were removed; the handshake table is the program's alone
    /// (below). `now_ns` is CLOCK_MONOTONIC, the clock of `bpf_ktime_get_coarse_ns`.
    pub fn gc(&mut self, now_ns: u64) -> Result<usize> {
        count_walk();
        let stale: Vec<FlowKey> = self
            .map_entries()
            .filter(|(k, e)| lb_common::ct::idle_expired(e, k.proto, now_ns, &self.cfg))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            self.remove(k)?;
        }
        // The handshake table is not written: a set written back whole (to clear a slot that is
        // over) would undo a handshake the program recorded in it between the read and the
        // write, and the backend's answer would find no flow. A slot that is over is not listed
        // (`pending_live`), and the program records a new handshake over the oldest way of its
        // set first, which a slot idle past the timeout is.
        // IPv6: the same rule (an IPv6 entry's `ct` is an IPv4 entry).
        let stale6: Vec<lb_common::v6::FlowKey6> = self
            .entries6()
            .into_iter()
            .filter(|(k, e)| lb_common::ct::idle_expired(&e.ct, k.proto, now_ns, &self.cfg))
            .map(|(k, _)| k)
            .collect();
        for k in &stale6 {
            self.remove6(k)?;
        }
        Ok(stale.len() + stale6.len())
    }
}
