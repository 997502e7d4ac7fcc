//! The full-NAT source-port claims' reads and writes (see lb-common's `claim` for the design):
//! a new IPv4 full-NAT TCP flow holds its port by one compare-and-swap of a claim word instead
//! of inserting its reply entry into CT_NEW.

use core::{
    intrinsics::{AtomicOrdering, atomic_and, atomic_cxchg, atomic_or},
    ptr::{read_volatile, write_volatile},
};

use lb_common::{
    FlowKey,
    claim::{claim_index, holder, in_time_wait, live, named_bit, slot_of, time_wait, word},
};

use aya_ebpf::helpers::generated::bpf_loop;

use crate::{
    config,
    maps::{FNAT_INDEX, FNAT_NAMED, SNAT_CLAIMS},
    syn,
};

/// Whether `port` (network order) is one full NAT takes its source ports from: only a reply
/// key with such a destination port can be claimed.
#[inline(always)]
pub fn in_range(port: u16) -> bool {
    let (cfg, p) = (config(), u16::from_be(port));
    cfg.snat_port_first != 0 && p >= cfg.snat_port_first && p <= cfg.snat_port_last
}

/// Whether reply key `rkey` may be held by something other than a conntrack entry at it: a
/// pending full-NAT handshake's claim (a port of the range), or a confirmed flow through the
/// reply index (its slot's bit set; the slot itself is read only then, see `index_named`).
#[inline(always)]
pub fn may_hold(rkey: &FlowKey) -> bool {
    in_range(rkey.dport) || index_named(index(rkey))
}

/// The claim word's (and reply-index slot's) index of `rkey`.
#[inline(always)]
pub fn index(rkey: &FlowKey) -> u32 {
    claim_index(rkey, config().snat_claims)
}

/// The claim word of reply key `rkey`.
#[inline(always)]
fn at(rkey: &FlowKey) -> Option<*mut u64> {
    SNAT_CLAIMS.get_ptr_mut(index(rkey))
}

/// Replaces `old` by `new` at `w` if `w` still holds `old`.
#[inline(always)]
pub(crate) fn swap(w: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: an array map's value pointer, valid and 8-aligned for the run; other CPUs (and
    // userspace, through its mapping) reach the word only by atomic operations or reads.
    // (The value compared rather than the intrinsic's flag, and `SeqCst` both ways: the other
    // forms made bitcode bpf-linker's LLVM refused to read, "Invalid br record".)
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(w, old, new).0
            == old
    }
}

/// Why [`take`] did not take a claim word.
pub enum Busy {
    /// A live claim holds it (maybe another reply key's sharing the word), or another CPU
    /// wrote it first.
    Held,
    /// A standing TIME_WAIT mark (lb-common's `claim::time_wait`), left for the second pass.
    TimeWait,
}

/// Takes claim word `i` (a reply key's [`index`]) at `now` for a flow not recorded yet, unless
/// a live claim holds it (maybe another reply key's sharing the word) for a flow still pending,
/// or (`pass_marked`) a TIME_WAIT mark stands on it. Returns the word taken.
#[inline(always)]
pub fn take(i: u32, now: u64, pass_marked: bool) -> Result<u64, Busy> {
    let Some(w) = SNAT_CLAIMS.get_ptr_mut(i) else {
        return Err(Busy::Held);
    };
    // SAFETY: see `swap`; a racing write makes the swap below fail.
    let cur = unsafe { read_volatile(w) };
    if pass_marked && in_time_wait(cur, now) {
        return Err(Busy::TimeWait);
    }
    let mine = word(now, None);
    if (live(cur, now) && !abandoned(cur, i)) || !swap(w, cur, mine) {
        return Err(Busy::Held);
    }
    Ok(mine)
}

/// Marks `rkey`'s claim word at `now`: the backend closed the connection on that port first,
/// and the client's FIN has just passed (lb-common's `claim::time_wait`). A live claim (a
/// handshake of this reply key or of another sharing the word) is never overwritten. A BPF
/// subprogram: called on the forward path's close only, outside the main frame.
#[inline(never)]
pub fn mark_time_wait(rkey: &FlowKey, now: u64) {
    if in_range(rkey.dport) {
        mark_word(index(rkey), now);
    }
}

/// Writes a TIME_WAIT mark at `now` into claim word `i` unless a live claim holds it.
#[inline(always)]
fn mark_word(i: u32, now: u64) {
    let Some(w) = SNAT_CLAIMS.get_ptr_mut(i) else {
        return;
    };
    // SAFETY: see `swap`.
    let cur = unsafe { read_volatile(w) };
    if !live(cur, now) {
        swap(w, cur, time_wait(now));
    }
}

/// Whether live claim word `cur`, at index `i`, names a handshake-table slot that holds no
/// full-NAT flow claiming that word any more (a newer handshake took the slot, or it was
/// cleared): the claim went with its handshake, as an unconfirmed reply entry went with the
/// LRU's eviction, so the claims held at once are bounded by the table's size rather than by
/// the new-flow rate. Judged in place (a slot being written reads as abandoned: it is another
/// flow's then; a flow settles its claim only once its slot is written). A BPF subprogram (its
/// branches are not carried through the port search).
#[inline(never)]
fn abandoned(cur: u64, i: u32) -> bool {
    let Some(slot) = slot_of(cur) else {
        // Being recorded.
        return false;
    };
    let Some(s) = syn::named(slot) else {
        return true;
    };
    s.check & 1 == 0 || !s.full_nat() || index(&s.full_nat_reply_key()) != i
}

/// Marks IPv6 full-NAT reply key `rkey`'s word at `now` (as [`mark_time_wait`]: the backend
/// closed first, the client's FIN has just passed; lb-common's `claim::claim_index6`). A BPF
/// subprogram, as [`mark_time_wait`].
#[inline(never)]
pub fn mark_time_wait6(rkey: &lb_common::v6::FlowKey6, now: u64) {
    if in_range(rkey.dport) {
        mark_word(
            lb_common::claim::claim_index6(rkey, config().snat_claims),
            now,
        );
    }
}

/// Whether a TIME_WAIT mark stands at `now` on the word of the IPv6 full-NAT reply key whose
/// `claim_base6` is `base` and whose port (network order) is `port`.
#[inline(always)]
pub fn in_time_wait6(base: u32, port: u16, now: u64) -> bool {
    let i = lb_common::claim::claim_index6_at(base, port, config().snat_claims);
    SNAT_CLAIMS
        .get_ptr(i)
        // SAFETY: see `swap`.
        .is_some_and(|w| in_time_wait(unsafe { read_volatile(w) }, now))
}

/// Gives back the claim word `mine` that `take` returned for `rkey` (the port was held
/// elsewhere after all).
#[inline(always)]
pub fn give_back(rkey: &FlowKey, mine: u64) {
    if let Some(w) = at(rkey) {
        swap(w, mine, 0);
    }
}

/// Names handshake-table slot `slot` in the claim word `mine` that `take` returned for `rkey`.
/// A plain store: a word naming no slot yet holds its port and is never judged abandoned, so no
/// other CPU takes it meanwhile.
#[inline(always)]
pub fn settle(rkey: &FlowKey, mine: u64, slot: u32) {
    if let Some(w) = at(rkey) {
        // SAFETY: see `swap`.
        unsafe { write_volatile(w, (mine & !0xffff_ffff) | u64::from(slot.wrapping_add(1))) };
    }
}

/// The handshake-table slot of the flow whose live claim holds `rkey`'s word, if recorded.
#[inline(always)]
pub fn slot_holding(rkey: &FlowKey, now: u64) -> Option<u32> {
    let w = at(rkey)?;
    // SAFETY: see `swap`.
    holder(unsafe { read_volatile(w) }, now)
}

/// Runs the port search's tries (`ct::SNAT_TRIES`) through `bpf_loop` with `callback` (a
/// static `extern "C" fn(u64, *mut c_void) -> i64` of the family's, which reads its state from
/// the per-CPU scratch slots): verified once, where a loop's body is walked once per try.
#[inline(always)]
pub fn port_search(callback: *mut core::ffi::c_void) {
    // SAFETY: a helper taking a static callback and no context.
    unsafe {
        bpf_loop(
            lb_common::ct::SNAT_TRIES,
            callback,
            core::ptr::null_mut(),
            0,
        )
    };
}

/// Releases `rkey`'s claim word if it names handshake-table slot `slot` (the flow's pair is in
/// CT_NEW: its reply entry holds the port from now on).
#[inline(always)]
pub fn release(rkey: &FlowKey, slot: u32) {
    if let Some(w) = at(rkey) {
        // SAFETY: see `swap`.
        let cur = unsafe { read_volatile(w) };
        if cur as u32 == slot.wrapping_add(1) {
            swap(w, cur, 0);
        }
    }
}

/// Takes claim word `i` at `now` to write the reply-index slot of the same index (lb-common's
/// `claim::MAP_FNAT_INDEX`), unless a live claim holds it (a handshake of a reply key sharing
/// the word, or another CPU's write of the slot). Returns the word's value before and the word
/// taken, for [`unlock`].
#[inline(always)]
pub fn lock(i: u32, now: u64) -> Option<(u64, u64)> {
    let w = SNAT_CLAIMS.get_ptr_mut(i)?;
    // SAFETY: see `swap`; a racing write makes the swap fail.
    let cur = unsafe { read_volatile(w) };
    let mine = word(now, None);
    if live(cur, now) || !swap(w, cur, mine) {
        return None;
    }
    Some((cur, mine))
}

/// Gives back claim word `i`, which [`lock`] took, as it was before (a TIME_WAIT mark stands
/// again).
#[inline(always)]
pub fn unlock(i: u32, (before, mine): (u64, u64)) {
    if let Some(w) = SNAT_CLAIMS.get_ptr_mut(i) {
        swap(w, mine, before);
    }
}

/// Reply-index slot `i` (a reply key's [`index`]).
#[inline(always)]
pub fn index_slot(i: u32) -> Option<*mut FlowKey> {
    FNAT_INDEX.get_ptr_mut(i)
}

/// Whether reply-index slot `i` names a flow (lb-common's `claim::MAP_FNAT_NAMED`). Exact
/// under the slot's claim word, which its writers hold; without it, a hint its reader checks
/// against the flow the slot names.
#[inline(always)]
pub fn index_named(i: u32) -> bool {
    let (word, bit) = named_bit(i);
    FNAT_NAMED
        .get_ptr(word)
        // SAFETY: an array map's value pointer; other CPUs change its other bits atomically.
        .is_some_and(|w| unsafe { read_volatile(w) } & bit != 0)
}

/// Marks reply-index slot `i` as naming a flow (`named`) or none (the caller holds its claim
/// word, or clears a bit it found stale and looks again: `forget_stale_slot`).
#[inline(always)]
pub fn set_named(i: u32, named: bool) {
    let (word, bit) = named_bit(i);
    let Some(w) = FNAT_NAMED.get_ptr_mut(word) else {
        return;
    };
    // SAFETY: an array map's value pointer, 8-aligned; its bits are only changed atomically.
    unsafe {
        if named {
            atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(w, bit);
        } else {
            atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(w, !bit);
        }
    }
}
