//! The table epoch (issue 14): how a reply packet of a confirmed flow knows, without
//! looking its forward half up, that its reply entry is the one the client's tuple leads to.
//!
//! The reply path used to look the forward half up with every packet (~23 ns of a ~110-ns
//! reply in `berth-bench`) to catch a leftover: a reply entry whose client's tuple now belongs
//! to a flow to another backend (the forward half evicted, and the client's next flow on the
//! tuple picked elsewhere). A DNAT flow's reply key is (backend, client); its backend is the
//! Maglev pick of its forward key. So while the tables a pick reads (services, Maglev rows,
//! backends, this host's addresses) stay the same, and the same program picks (its hash seed
//! and hash), every flow on a tuple picks the same backend and has the same reply key: a reply entry
//! written in that time can only ever be the tuple's own, and a leftover needs a change of the
//! tables in between.
//!
//! [`MAP_EPOCH`] numbers those times. Userspace makes it odd before it writes any of those
//! tables ([`begin`]) and even, a value never used before, once it is done ([`settle`]); it
//! writes its program's instance (a random token of each load) beside it. A new flow is stamped with the epoch it picked in
//! ([`stable`], read before and after the pick: unchanged and even, or 0 for "unknown"), both
//! halves carry the stamp (`CtEntry::epoch`), and a reply whose entry carries the current
//! epoch skips the forward lookup where nothing else needs the forward half
//! (`ct::reply_skips_forward`). Any change of the tables since the flow started makes its
//! replies check the slow way again, for good.
//!
//! Full NAT: a flow's reply key is (backend, berth's address and the flow's source port), and
//! the port depends on which ports other flows hold when it is picked, except at the flow's
//! first try (`ct::snat_port(hash, 0, ..)`), a pure function of the tuple like the backend. So
//! a full-NAT flow is stamped only if it took its first port, and while the tables stand still
//! every later flow on its tuple picks the same backend and tries that same reply key first.
//! There the port search meets the stamped entry, its forward half gone (the later flow is a new
//! flow on the tuple): it removes it before taking the port (the program's `port_free`), or, when
//! the port's claim word is busy (a handshake of another key sharing the word) and the search
//! moves on, clears the entry's stamp in place (`unstamp_first_port`). Either way, no stamped
//! full-NAT reply entry outlives its tuple's next flow. A flow that took a later port (the first
//! was held) is never stamped, and its replies look the forward half up as before.
//!
//! Ordering: the program reads the epoch, then the tables, then the epoch again (volatile
//! loads, in that order); userspace's writes are separate system calls, the odd epoch before
//! the first table write and the even one after the last. On x86 (loads are not reordered with
//! loads, stores become visible in order) a pick that read any table write of a change reads
//! the odd epoch (or a later one) the second time, and is stamped 0. Where loads may be
//! reordered, userspace also leaves a millisecond between the odd write and the first table
//! write and between the last table write and the even write: a pick (microseconds) cannot
//! straddle either gap.

/// The epoch: an array of one [`Epoch`].
pub const MAP_EPOCH: &str = "EPOCH";

/// [`MAP_EPOCH`]'s value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Epoch {
    /// Even: the tables have not changed since it was written; odd: they are being written.
    pub epoch: u64,
    /// The instance (`DpConfig::instance`) of the program userspace runs: another program (the
    /// one a restarting berth replaces, still running for a moment, with another hash seed or
    /// hash) may pick differently, and neither stamps nor trusts a stamp.
    pub instance: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Epoch>() == 16);

/// The epoch the program loaded as `instance` may stamp a flow with or trust a stamp of: the
/// current one if it is even, nonzero and written for that instance; else 0 (never a stamp).
#[inline(always)]
pub const fn stable(e: &Epoch, instance: u32) -> u64 {
    if e.epoch != 0 && e.epoch & 1 == 0 && e.instance == instance && instance != 0 {
        e.epoch
    } else {
        0
    }
}

/// The stamp of a pick that read epoch `before` (by [`stable`]) before the tables and `after`
/// after them: `before` if it did not move, else 0.
#[inline(always)]
pub const fn stamp(before: u64, after: u64) -> u64 {
    if before == after { before } else { 0 }
}

/// The epoch userspace writes before changing the tables, from the current one: odd and never
/// used before (an odd one left by a change that did not settle moves on too).
#[inline(always)]
pub const fn begin(current: u64) -> u64 {
    next(current, 1)
}

/// The epoch userspace writes once a change is written: even and never used before.
#[inline(always)]
pub const fn settle(current: u64) -> u64 {
    next(current, 0)
}

/// The least value past `current` whose low bit is `parity`.
#[inline(always)]
const fn next(current: u64, parity: u64) -> u64 {
    let n = current + 1;
    n + ((n ^ parity) & 1)
}

/// The stamp a pending handshake keeps (`SynSlot::epoch`, 32 bits): the epoch's low half.
#[inline(always)]
pub const fn slot_stamp(epoch: u64) -> u32 {
    epoch as u32
}

/// The stamp of a flow promoted from a pending handshake stamped `slot` (see [`slot_stamp`]),
/// the current epoch being `current` (by [`stable`]): the current epoch if the handshake was
/// stamped with it, else 0. A handshake lives seconds; the epoch cannot move by 2^32 changes
/// (system calls) in that time.
#[inline(always)]
pub const fn from_slot(slot: u32, current: u64) -> u64 {
    if slot != 0 && current != 0 && slot == current as u32 {
        current
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn only_an_even_settled_epoch_of_this_instance_is_stable() {
        let e = |epoch, instance| Epoch {
            epoch,
            instance,
            _pad: 0,
        };
        assert_eq!(stable(&e(4, 7), 7), 4);
        assert_eq!(stable(&e(5, 7), 7), 0, "being written");
        assert_eq!(stable(&e(4, 8), 7), 0, "another program's");
        assert_eq!(stable(&e(0, 7), 7), 0, "never settled");
        assert_eq!(stable(&e(4, 0), 0), 0, "no instance");
    }

    #[test]
    fn every_change_moves_to_values_never_used_before() {
        let mut seen = std::collections::HashSet::new();
        let mut e = 0;
        for i in 0..100 {
            e = begin(e);
            assert_eq!(e & 1, 1);
            assert!(seen.insert(e));
            if i % 7 != 3 {
                // (some changes never settle: the next one moves on from the odd value)
                e = settle(e);
                assert_eq!(e & 1, 0);
                assert!(seen.insert(e));
            }
        }
        assert_eq!(settle(4), 6, "settling a settled epoch still moves it");
    }

    #[test]
    fn a_pick_that_saw_the_epoch_move_is_not_stamped() {
        assert_eq!(stamp(6, 6), 6);
        assert_eq!(stamp(6, 0), 0);
        assert_eq!(stamp(6, 8), 0);
    }

    #[test]
    fn a_handshake_keeps_its_stamp_only_within_its_epoch() {
        assert_eq!(from_slot(slot_stamp(6), 6), 6);
        assert_eq!(from_slot(slot_stamp(6), 8), 0);
        assert_eq!(from_slot(0, 6), 0);
        assert_eq!(from_slot(slot_stamp(6), 0), 0);
        let big = (7u64 << 32) | 6;
        assert_eq!(from_slot(slot_stamp(big), big), big);
    }
}
