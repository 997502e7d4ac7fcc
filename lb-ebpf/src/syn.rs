//! The pending-handshake table's reads and writes (see lb-common's `syn` for the design): a new
//! IPv4 TCP flow, DNAT of its backend's lazy service or full NAT, records its forward entry here
//! by a few stores instead of an insert into CT_NEW, and moves to CT_NEW (`promote`) with its backend's first reply or its
//! client's next packet.
//!
//! A slot is named by its set and way, `set << 2 | way` (`SYN_WAYS` is 4).

use core::ptr::{read_volatile, write_volatile};

use lb_common::{
    CFG_F_REDIRECT, CtEntry, FlowKey, Reason, Route,
    ct::TOUCH_INTERVAL_NS,
    syn::{SYN_BUSY, SYN_WAYS, SynSet, SynSlot, ports_of, set_of},
};

use crate::{
    config,
    maps::{BACKEND_ROUTES, CT_NEW, CT_SYN, SYN_SCRATCH, count},
};

const _: () = assert!(SYN_WAYS == 4);

/// Whether slot `s` is keyed `key` (`ports`: the key's ports as the slot packs them), judged in
/// place (whole or not).
#[inline(always)]
fn keyed(s: &SynSlot, key: &FlowKey, ports: u32) -> bool {
    s.saddr == key.saddr
        && s.daddr == key.daddr
        && s.ports == ports
        && s.proto == u32::from(key.proto)
}

/// `key`'s set (`hash`: its flow hash) and its index: one map lookup.
#[inline(always)]
fn set(hash: u32) -> Option<(u32, *mut SynSet)> {
    let i = set_of(hash, config().syn_sets);
    Some((i, CT_SYN.get_ptr_mut(i)?))
}

/// Finds `key`'s pending handshake (`hash`: its flow hash) and copies it, whole (see
/// `SynSlot::is_valid`), into this CPU's `SYN_SCRATCH` slot, returned with the slot's name.
/// A torn or cleared slot reads as absent.
#[inline(always)]
pub fn find(key: &FlowKey, hash: u32) -> Option<(u32, &'static SynSlot)> {
    let (i, set) = set(hash)?;
    // Looked up before the ways are (no helper call inside the loop: the key's words stay in
    // registers instead of spill slots the call chain's stack has no room for).
    let c = SYN_SCRATCH.get_ptr_mut(0)?;
    let ports = ports_of(key);
    for w in 0..SYN_WAYS as usize {
        // SAFETY: an array map's value pointer, valid for the run; another CPU may be writing
        // the slot, so it is only compared in place and judged on a copy.
        let s = unsafe { &(*set).ways[w] };
        if keyed(s, key, ports) {
            // SAFETY: this CPU's slot of a per-CPU array, valid for the run, used by nothing
            // else while the program runs; both are 64-byte, 8-aligned `SynSlot`s, copied as
            // eight words (volatile: a plain copy became a byte-wise `memmove` call).
            let c = unsafe {
                let (src, dst) = (s as *const SynSlot as *const u64, c as *mut u64);
                for n in 0..8 {
                    write_volatile(dst.add(n), read_volatile(src.add(n)));
                }
                &*(c as *const SynSlot)
            };
            if c.holds(key) && c.is_valid() {
                return Some(((i << 2) | w as u32, c));
            }
        }
    }
    None
}

/// Whether any slot of `key`'s set is keyed `key` and not cleared (whole or not, so maybe
/// being written): a handshake pending there.
#[inline(always)]
pub fn holds(key: &FlowKey, hash: u32) -> bool {
    let Some((_, set)) = set(hash) else {
        return false;
    };
    let ports = ports_of(key);
    for w in 0..SYN_WAYS as usize {
        // SAFETY: as in `find`; compared in place only.
        let s = unsafe { &(*set).ways[w] };
        if s.check & 1 != 0 && keyed(s, key, ports) {
            return true;
        }
    }
    false
}

/// The slot of `key`'s set keyed `key` and not cleared, in place (whole or not: maybe being
/// written), with its name: for a judgement that may err only towards a handshake being there
/// (the claims of `lazy_pending_holds`), without `find`'s copy (whose registers the frame under
/// `new_flow` has no room for).
#[inline(always)]
pub fn locate(key: &FlowKey, hash: u32) -> Option<(u32, &'static SynSlot)> {
    let (i, set) = set(hash)?;
    let ports = ports_of(key);
    for w in 0..SYN_WAYS as usize {
        // SAFETY: as in `find`; read in place only.
        let s = unsafe { &(*set).ways[w] };
        if s.check != 0 && keyed(s, key, ports) {
            return Some(((i << 2) | w as u32, s));
        }
    }
    None
}

/// Records the new flow keyed `key` (flow hash `hash`), forward entry `e`, in its set: in the
/// way that holds its key, else the least recently written one, reserved first by a
/// compare-and-swap of its check word ([`SYN_BUSY`] while written; the real one written
/// last). Returns the slot's name; None if the map has no such set, or if other CPUs held the
/// ways it picked twice (then the flow goes to CT_NEW).
#[inline(always)]
pub fn record(key: &FlowKey, hash: u32, e: &CtEntry) -> Option<u32> {
    let (i, set) = set(hash)?;
    let ports = ports_of(key);
    // Two tries: a way another CPU reserved first (it picked the same one) is passed over.
    for _ in 0..2 {
        let mut pick = SYN_WAYS as usize;
        let mut oldest = u64::MAX;
        let mut seen = 0;
        for w in 0..SYN_WAYS as usize {
            // SAFETY: as in `find`; a racing write makes this a choice on either version.
            let s = unsafe { &(*set).ways[w] };
            // SAFETY: as above.
            let c = unsafe { read_volatile(&s.check) };
            if c == SYN_BUSY {
                continue;
            }
            if keyed(s, key, ports) {
                (pick, seen) = (w, c);
                break;
            }
            let written = if c == 0 { 0 } else { s.last_seen_ns };
            if written < oldest {
                (oldest, pick, seen) = (written, w, c);
            }
        }
        if pick >= SYN_WAYS as usize {
            return None;
        }
        // SAFETY: a valid array value pointer, `pick` < SYN_WAYS.
        let s = unsafe { &mut (*set).ways[pick & (SYN_WAYS as usize - 1)] };
        // The way is this CPU's to write only if its check word is still what was read: two
        // CPUs recording into one set at once never write one way (the second would erase the
        // first's handshake while the first's claim names it, and its port go to a third flow).
        if !reserve(s, seen) {
            continue;
        }
        // Built once the way is reserved: built before the search, its fields stayed live
        // through it, spilled, and `new_flow`'s frame was 272 bytes, not 248 (the call chain
        // through it must leave the main program's inlined paths their room: 192 + 256 + 64).
        let v = SynSlot::of(key, e);
        // SAFETY: reserved above. Word by word (volatile: LLVM would merge plain stores into a
        // byte-wise `memcpy` call), the check word written last; a concurrent reader of the
        // slot is what it is for.
        unsafe {
            write_volatile(&mut s.saddr, v.saddr);
            write_volatile(&mut s.daddr, v.daddr);
            write_volatile(&mut s.ports, v.ports);
            write_volatile(&mut s.proto, v.proto);
            write_volatile(&mut s.nat_addr, v.nat_addr);
            write_volatile(&mut s.nat_port, v.nat_port);
            write_volatile(&mut s.backend_id, v.backend_id);
            write_volatile(&mut s.service_id, v.service_id);
            write_volatile(&mut s.in_ifindex, v.in_ifindex);
            write_volatile(&mut s.last_seen_ns, v.last_seen_ns);
            write_volatile(&mut s.fnat_addr, v.fnat_addr);
            write_volatile(&mut s.fnat_port, v.fnat_port);
            write_volatile(&mut s.flags, v.flags);
            write_volatile(&mut s.epoch, v.epoch);
            write_volatile(&mut s.check, v.check);
        }
        return Some((i << 2) | (pick & (SYN_WAYS as usize - 1)) as u32);
    }
    None
}

/// Marks slot `s` being written ([`SYN_BUSY`]) if its check word still holds `seen` (never
/// from `SYN_BUSY`).
#[inline(always)]
fn reserve(s: &mut SynSlot, seen: u32) -> bool {
    seen != SYN_BUSY && swap_check(s, |c| c == seen, SYN_BUSY)
}

/// Replaces slot `s`'s check word by `new` if `ok` accepts its current value: a
/// compare-and-swap of the 64-bit word holding `in_ifindex` and `check` (the program's CPU has
/// no 32-bit one).
#[inline(always)]
fn swap_check(s: &mut SynSlot, ok: impl Fn(u32) -> bool, new: u32) -> bool {
    const _: () = assert!(core::mem::offset_of!(SynSlot, in_ifindex) == 32);
    const _: () = assert!(core::mem::offset_of!(SynSlot, check) == 36);
    let w = &mut s.in_ifindex as *mut u32 as *mut u64;
    // SAFETY: bytes 32..40 of a 64-byte, 8-aligned array map value, valid for the run; other
    // CPUs write them by plain stores (a reserved way's fields) or this compare-and-swap.
    let cur = unsafe { read_volatile(w) };
    ok((cur >> 32) as u32)
        && crate::claim::swap(w, cur, (cur & 0xffff_ffff) | (u64::from(new) << 32))
}

/// Slot `slot` (as `find` names it), in place (whole or not: maybe being written).
#[inline(always)]
pub fn named(slot: u32) -> Option<&'static SynSlot> {
    let set = CT_SYN.get_ptr(slot >> 2)?;
    // SAFETY: a valid array value pointer, the way < SYN_WAYS; read in place only.
    Some(unsafe { &(*set).ways[(slot & (SYN_WAYS - 1)) as usize] })
}

/// Slot `slot` copied, whole (see `find`), into this CPU's `SYN_SCRATCH` slot; None if torn or
/// cleared.
#[inline(always)]
pub fn copy(slot: u32) -> Option<&'static SynSlot> {
    let s = named(slot)?;
    let c = SYN_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: as in `find`.
    let c = unsafe {
        let (src, dst) = (s as *const SynSlot as *const u64, c as *mut u64);
        for n in 0..8 {
            write_volatile(dst.add(n), read_volatile(src.add(n)));
        }
        &*(c as *const SynSlot)
    };
    c.is_valid().then_some(c)
}

/// Clears slot `slot` (as `find` names it) if it is still keyed `key` (another flow may have
/// taken it meanwhile) and written: by a compare-and-swap of its check word, so a way another
/// CPU has reserved for writing ([`SYN_BUSY`]) never reads as free while it is written.
#[inline(always)]
pub fn clear(slot: u32, key: &FlowKey) {
    if let Some(set) = CT_SYN.get_ptr_mut(slot >> 2) {
        // SAFETY: a valid array value pointer, the way < SYN_WAYS.
        let s = unsafe { &mut (*set).ways[(slot & (SYN_WAYS - 1)) as usize] };
        if keyed(s, key, ports_of(key)) {
            swap_check(s, |c| c & 1 != 0, 0);
        }
    }
}

/// The route a promoted forward entry starts with: its backend's cached route while fresh (what
/// the flow's first packet was sent along), else none (its next packet looks it up).
#[inline(always)]
pub fn route_of(backend_id: u32, now: u64) -> Route {
    if config().flags & CFG_F_REDIRECT != 0
        && let Some(c) = BACKEND_ROUTES.get_ptr(backend_id)
    {
        // SAFETY: a valid array value pointer; `Route` is `Copy` (a torn MAC is corrected at
        // the next refresh, as for the cache itself).
        let c = unsafe { &*c };
        if c.route.ifindex != 0 && now.wrapping_sub(c.stamp_ns) <= TOUCH_INTERVAL_NS {
            return c.route;
        }
    }
    Route::NONE
}

/// Moves `key`'s pending handshake, forward entry `fwd`, from slot `slot` to CT_NEW. The slot
/// is cleared only once the entry is there; if the insert fails the flow stays pending.
#[inline(always)]
pub fn promote(key: &FlowKey, slot: u32, fwd: &CtEntry) -> bool {
    if CT_NEW.insert(key, fwd, 0).is_err() {
        count(Reason::EventCtInsertFailed);
        return false;
    }
    clear(slot, key);
    true
}
