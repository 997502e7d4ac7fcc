//! Full-NAT source-port claims (issue 14): how a new IPv4 full-NAT TCP flow holds its source
//! port while its handshake is pending, without an insert into an LRU map.
//!
//! A full-NAT flow's reply key is backend address and port -> berth's address and the flow's
//! source port; two flows must never share one. The reply entry's insert-if-absent into
//! `CT_NEW` used to be the reservation, and that insert was most of what full NAT added to a
//! new flow's cost. Now the port is reserved in [`MAP_SNAT_CLAIMS`], an array of 64-bit claim
//! words indexed by the reply key ([`claim_index`]), taken by one compare-and-swap; the reply
//! entry is written with the backend's first reply (or the client's next packet), from the
//! flow's pending forward entry in the handshake table (`syn`), which the claim names.
//!
//! A claim word holds when it was taken ([`CLAIM_TICK_SHIFT`]-ns ticks, high half) and the
//! handshake-table slot of its flow plus one (low half; 0 while the slot is being written). It
//! holds its port for [`crate::ct::UNCONFIRMED_PORT_HOLD_NS`] (the hold an unconfirmed reply
//! entry had), or until the flow's pair is in `CT_NEW` (the claim is released then; the reply
//! entry holds the port from there on). A claim word is for one reply key, but a slot of the
//! array may be the index of several (of different backends): a port held there is merely
//! tried by no other flow until it is free (the flow tries its next port).
//!
//! Nothing but a compare-and-swap takes a word, so two CPUs never take one; a flow that took
//! a word checks the conntrack maps only then (a flow whose pair reached `CT_NEW` releases its
//! word only after its reply entry is there), so a port is never held by two flows at once.

use crate::{FlowKey, ct::UNCONFIRMED_PORT_HOLD_NS};

/// The claim words: an array of `u64`, `snat_claims(..)` long (a power of two).
pub const MAP_SNAT_CLAIMS: &str = "SNAT_CLAIMS";

/// The reply index: an array of [`FlowKey`], as long as [`MAP_SNAT_CLAIMS`] and indexed as it
/// ([`claim_index`]): the forward key of the confirmed IPv4 TCP flow whose reply key has that
/// index (a full-NAT flow, or a DNAT flow to a service its backend does not serve lazily; named
/// for full NAT, where it began), written when the flow is confirmed (its forward entry is then
/// `ct::LAZY_INDEXED`), zero where none. Read by a reply that finds no reply half (derived from
/// the forward entry the index names, if that flow's reply key is the packet's), by the port
/// search (a port whose reply half is gone is still held while the indexed forward half lives)
/// and by a new flow's or a rebuilt reply half's claim of a reply key. Written only by a
/// CPU holding the slot's claim word, so two never write one slot; a slot naming a live flow is
/// never overwritten (a flow that finds its slot so taken is not indexed and takes the full
/// path).
pub const MAP_FNAT_INDEX: &str = "FNAT_INDEX";

/// Which reply-index slots name a flow: an array of `u64` bit words, bit `i % 64` of word
/// `i / 64` for slot `i` ([`named_words`] long). The port search reads a slot only where its bit
/// is set: the index is 16 bytes a slot, and a slot read on every try was a cache miss more per
/// new flow (+50 ns measured); the bits of the default size take 32 KiB. Set and cleared with
/// the slot, by a CPU holding the slot's claim word, and cleared without it where a new flow
/// finds the slot naming no indexed flow (the TC program's `forget_stale_slot`, which looks
/// again after); always atomically (a word's 64 bits are 64 slots').
pub const MAP_FNAT_NAMED: &str = "FNAT_NAMED";

/// Words of [`MAP_FNAT_NAMED`] for `claims` claim words (a power of two of at least 65,536).
pub const fn named_words(claims: u32) -> u32 {
    claims / 64
}

/// Where reply-index slot `i`'s bit is in [`MAP_FNAT_NAMED`]: its word's index and the bit's
/// mask in it.
#[inline(always)]
pub const fn named_bit(i: u32) -> (u32, u64) {
    (i / 64, 1 << (i % 64))
}

/// A claim's clock: `now_ns >> CLAIM_TICK_SHIFT` (~1 ms ticks; the 32-bit tick wraps in ~52
/// days, and a claim is judged by a wrapping difference).
pub const CLAIM_TICK_SHIFT: u32 = 20;

/// How many ticks a claim holds its port.
pub const CLAIM_HOLD_TICKS: u32 = (UNCONFIRMED_PORT_HOLD_NS >> CLAIM_TICK_SHIFT) as u32;

/// Number of claim words for an unconfirmed-flow capacity of `ct_new_size` entries: a power of
/// two, at least 65,536 (so the ports of one reply key never share a word) and at least four
/// per pending handshake (so reply keys of different backends seldom do).
pub const fn snat_claims(ct_new_size: u32) -> u32 {
    let want = ct_new_size.saturating_mul(4);
    if want <= 65_536 {
        65_536
    } else if want > 1 << 30 {
        1 << 30
    } else {
        want.next_power_of_two()
    }
}

/// The claim word of full-NAT reply key `rkey` (backend -> berth's address and port) in an
/// array of `claims` words (a power of two of at least 65,536): the key without its port
/// hashed, plus the port, so the ports of one backend take consecutive words. (A DNAT reply key,
/// backend -> client address and port, has its reply-index slot here too: a client's
/// consecutive ports take consecutive slots.)
#[inline(always)]
pub const fn claim_index(rkey: &FlowKey, claims: u32) -> u32 {
    let mut h = (rkey.proto as u32).wrapping_mul(0x9e37_79b9) ^ 0x2545_f491;
    h = crate::hash::mix(h, rkey.saddr);
    h = crate::hash::mix(h, rkey.daddr);
    h = crate::hash::mix(h, rkey.sport as u32);
    let port = u16::from_be(rkey.dport) as u32;
    (crate::hash::finalize(h).wrapping_add(port)) & claims.wrapping_sub(1)
}

/// The claim word that holds the [`time_wait`] mark of IPv6 full-NAT reply key `rkey` (backend
/// -> berth's address and port) in an array of `claims` words, laid out as [`claim_index`]'s.
/// IPv6 full NAT holds its ports by its reply entries, so its words carry marks only; they
/// share the array with IPv4's claims (a mark never overwrites a live claim, and a claim taken
/// over a mark loses it: either way a port only loses its preference).
#[inline(always)]
pub const fn claim_index6(rkey: &crate::v6::FlowKey6, claims: u32) -> u32 {
    claim_index6_at(claim_base6(rkey), rkey.dport, claims)
}

/// [`claim_index6`]'s hash of everything in `rkey` but its port: the same for every port a
/// flow's search tries, so computed once per search.
#[inline(always)]
pub const fn claim_base6(rkey: &crate::v6::FlowKey6) -> u32 {
    // Each address folded into a word first: three rounds instead of nine (the words only
    // spread marks, and a shared word costs a port its preference, nothing more).
    const fn fold(a: [u32; 4]) -> u32 {
        a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24)
    }
    let mut h = (rkey.proto as u32).wrapping_mul(0x9e37_79b9) ^ 0x7f4a_7c15;
    h = crate::hash::mix(h, fold(rkey.saddr));
    h = crate::hash::mix(h, fold(rkey.daddr));
    h = crate::hash::mix(h, rkey.sport as u32);
    crate::hash::finalize(h)
}

/// [`claim_index6`] from its [`claim_base6`] `base` and the port (network order).
#[inline(always)]
pub const fn claim_index6_at(base: u32, port: u16, claims: u32) -> u32 {
    base.wrapping_add(u16::from_be(port) as u32) & claims.wrapping_sub(1)
}

/// The tick of `now_ns`.
#[inline(always)]
pub const fn tick(now_ns: u64) -> u32 {
    (now_ns >> CLAIM_TICK_SHIFT) as u32
}

/// A claim word taken at `now_ns` for the flow recorded in handshake-table slot `slot`
/// (`None`: not recorded yet).
#[inline(always)]
pub const fn word(now_ns: u64, slot: Option<u32>) -> u64 {
    let low = match slot {
        Some(s) => s.wrapping_add(1),
        None => 0,
    };
    ((tick(now_ns) as u64) << 32) | low as u64
}

/// How far ahead of a CPU's clock a claim word's tick may be and still hold: another CPU took
/// it, and the coarse clock two CPUs read in the same instant can differ by a tick (each
/// caches it per jiffy; the tick updates it on one CPU). Without this slack a word taken a
/// tick "in the future" read as expired to the other CPU, which took the same port.
pub const CLAIM_SKEW_TICKS: u32 = 64;

/// Whether claim word `w` holds its port at `now_ns`. A [`time_wait`] mark holds nothing.
#[inline(always)]
pub const fn live(w: u64, now_ns: u64) -> bool {
    let age = tick(now_ns).wrapping_sub((w >> 32) as u32);
    w != 0
        && w as u32 != TIME_WAIT_MARK
        && (age <= CLAIM_HOLD_TICKS || age >= 0u32.wrapping_sub(CLAIM_SKEW_TICKS))
}

/// The handshake-table slot claim word `w` names, if its flow is recorded.
#[inline(always)]
pub const fn slot_of(w: u64) -> Option<u32> {
    match w as u32 {
        0 | TIME_WAIT_MARK => None,
        s => Some(s - 1),
    }
}

/// The low half of a claim word that marks its port's last connection as one its backend
/// closed first (see [`time_wait`]); it names no handshake-table slot.
pub const TIME_WAIT_MARK: u32 = u32::MAX;

/// How long a [`time_wait`] mark keeps a port from the port search's first pass: Linux keeps
/// a connection it closed first in TIME_WAIT for a fixed 60 s (`TCP_TIMEWAIT_LEN`), from the
/// other side's FIN on.
pub const TIME_WAIT_TICKS: u32 = (60_000_000_000u64 >> CLAIM_TICK_SHIFT) as u32;

/// A claim word marking, at `now_ns`, that the backend closed its connection on the word's
/// port first and holds it in TIME_WAIT: the client's FIN has just passed. To the backend a
/// reused port is the same 4-tuple, and a new SYN meeting the TIME_WAIT socket is taken only if
/// it is newer than the old connection (its timestamp, which clients offset at random per
/// address pair, or its sequence number); else the backend answers with the old connection's
/// ACK, which the new client resets before sending its SYN again (a Linux client ~10 ms later,
/// other stacks after their SYN timeout), and the TIME_WAIT's protection against the old
/// connection's late segments is gone. So the port search passes marked ports by (up to
/// [`TIME_WAIT_PASSES`] of them) while it finds others, and takes one when it finds none. The
/// mark holds no port: a live claim's word is never overwritten by it, and a new flow takes a
/// marked word as a free one.
#[inline(always)]
pub const fn time_wait(now_ns: u64) -> u64 {
    ((tick(now_ns) as u64) << 32) | TIME_WAIT_MARK as u64
}

/// How many marked ports one flow's port search passes by at most; past them it takes a marked
/// port as a free one. Where most ports are marked (past ~`range / 60` new connections per
/// second to one backend), reuse is unavoidable, and each port passed by is a try more (a BPF
/// call, ~11 ns on the slower machine measured); four bound that to ~45 ns. A flow takes a
/// marked port only when its first four tries (not counting held ports) all meet marks, or
/// every try is held or marked: with a quarter of the ports marked, 0.4% of flows; with half,
/// 6%.
pub const TIME_WAIT_PASSES: u32 = 4;

/// Whether a full-NAT flow's client segment that adds closing bits `bits` (`ct::close_bits`)
/// to a forward entry with flags `flags` leaves the backend in TIME_WAIT: a client's FIN (no
/// RST) after the backend's. The mark's first rule (the second is [`crossed_into_time_wait`]),
/// both families'; the programs' `enters_time_wait` applies them.
#[inline(always)]
pub const fn leaves_time_wait(flags: u8, bits: u8) -> bool {
    bits == crate::ct::CT_F_FIN_CLIENT && flags & crate::ct::CT_F_FIN_BACKEND != 0
}

/// Whether a full-NAT flow's backend segment that adds closing bits `bits` (`ct::close_bits`)
/// to a forward entry with flags `flags` and `backend_ack` `fin_end` leaves the backend in
/// TIME_WAIT though the client's FIN came first: a FIN (no RST) that does not acknowledge the
/// end of the client's (recorded: [`crate::ct::CT_F_FIN_SEQ`]). Its sender had not received the
/// client's FIN when it sent its own, so it closed actively too (the FINs crossed, a
/// simultaneous close) and goes through CLOSING to TIME_WAIT; a FIN that acknowledges exactly
/// the client's is a passive close (LAST_ACK, no TIME_WAIT). The mark's second rule (the first
/// is [`leaves_time_wait`]), both families'; the programs' `enters_time_wait` applies them.
#[inline(always)]
pub const fn crossed_into_time_wait(
    flags: u8,
    fin_end: u32,
    bits: u8,
    tcp_flags: u8,
    ack: u32,
) -> bool {
    bits == crate::ct::CT_F_FIN_BACKEND
        && flags & crate::ct::CT_F_CLOSED == crate::ct::CT_F_FIN_CLIENT
        && flags & crate::ct::CT_F_FIN_SEQ != 0
        && (tcp_flags & crate::ct::TCP_ACK == 0 || ack != fin_end)
}

/// Whether the port search still passes a marked port by: in its first pass (`second_pass`
/// false), having passed `passed` by so far (at most [`TIME_WAIT_PASSES`]). Both families'.
#[inline(always)]
pub const fn passes_marked(second_pass: bool, passed: u32) -> bool {
    !second_pass && passed < TIME_WAIT_PASSES
}

/// Whether claim word `w` is a [`time_wait`] mark still standing at `now_ns`.
#[inline(always)]
pub const fn in_time_wait(w: u64, now_ns: u64) -> bool {
    let age = tick(now_ns).wrapping_sub((w >> 32) as u32);
    w as u32 == TIME_WAIT_MARK
        && (age <= TIME_WAIT_TICKS || age >= 0u32.wrapping_sub(CLAIM_SKEW_TICKS))
}

/// The handshake-table slot of the flow whose claim word `w` holds its port at `now_ns`.
#[inline(always)]
pub const fn holder(w: u64, now_ns: u64) -> Option<u32> {
    if live(w, now_ns) { slot_of(w) } else { None }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::{IPPROTO_TCP, ipv4_to_wire, port_to_wire};

    fn rkey(backend: [u8; 4], port: u16) -> FlowKey {
        FlowKey::new(
            ipv4_to_wire(backend),
            ipv4_to_wire([10, 0, 0, 1]),
            port_to_wire(8000),
            port_to_wire(port),
            IPPROTO_TCP,
        )
    }

    #[test]
    fn a_claim_taken_a_tick_ahead_of_this_clock_holds() {
        // Taken on a CPU whose coarse clock had moved on a tick; judged on one that had not.
        let t0 = 1_000_000_000_000u64;
        let ahead = word(t0 + (1 << CLAIM_TICK_SHIFT), Some(3));
        assert!(live(ahead, t0));
        assert_eq!(holder(ahead, t0), Some(3));
        // A bounded slack: a word far "ahead" is a stale one whose tick wrapped, not held.
        assert!(!live(word(t0 + (1000 << CLAIM_TICK_SHIFT), Some(3)), t0));
    }

    #[test]
    fn a_claim_holds_for_the_unconfirmed_hold_and_names_its_slot() {
        let t0 = 1_000_000_000_000u64;
        let w = word(t0, Some(77));
        assert_eq!(holder(w, t0), Some(77));
        assert!(live(
            w,
            t0 + UNCONFIRMED_PORT_HOLD_NS - (2 << CLAIM_TICK_SHIFT)
        ));
        assert!(!live(
            w,
            t0 + UNCONFIRMED_PORT_HOLD_NS + (2 << CLAIM_TICK_SHIFT)
        ));
        assert_eq!(holder(w, t0 + 2 * UNCONFIRMED_PORT_HOLD_NS), None);
        // Slot 0 is named too; a word being written names none but holds.
        assert_eq!(holder(word(t0, Some(0)), t0), Some(0));
        let reserved = word(t0, None);
        assert!(live(reserved, t0) && holder(reserved, t0).is_none());
        assert!(!live(0, t0), "a word never taken holds nothing");
        // Across the tick counter's wrap.
        let wrap = (u32::MAX as u64) << CLAIM_TICK_SHIFT;
        assert!(live(word(wrap, Some(1)), wrap + (3 << CLAIM_TICK_SHIFT)));
    }

    #[test]
    fn a_time_wait_mark_stands_for_sixty_seconds_and_holds_nothing() {
        let t0 = 1_000_000_000_000u64;
        let w = time_wait(t0);
        assert!(in_time_wait(w, t0));
        assert!(in_time_wait(w, t0 + 59_000_000_000));
        assert!(!in_time_wait(w, t0 + 61_000_000_000));
        // A tick ahead of this CPU's clock (another CPU marked it): standing.
        assert!(in_time_wait(time_wait(t0 + (1 << CLAIM_TICK_SHIFT)), t0));
        // Not a claim: it holds no port, names no slot, has no holder.
        assert!(!live(w, t0));
        assert_eq!(slot_of(w), None);
        assert_eq!(holder(w, t0), None);
        // Claims are no marks, whatever their slot.
        for c in [word(t0, None), word(t0, Some(0)), word(t0, Some(12_345)), 0] {
            assert!(!in_time_wait(c, t0), "{c:#x}");
        }
        assert!(live(word(t0, Some(u32::MAX - 2)), t0));
    }

    #[test]
    fn only_a_clients_fin_after_the_backends_leaves_it_in_time_wait() {
        use crate::ct::{CT_F_CLOSED, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT};
        assert!(leaves_time_wait(CT_F_FIN_BACKEND, CT_F_FIN_CLIENT));
        // The client first, a RST, or no FIN from the backend yet: no TIME_WAIT there.
        assert!(!leaves_time_wait(0, CT_F_FIN_CLIENT));
        assert!(!leaves_time_wait(CT_F_FIN_BACKEND, CT_F_CLOSED));
        assert!(!leaves_time_wait(CT_F_FIN_CLIENT, CT_F_FIN_BACKEND));
        // Four marked ports passed by in the first pass, then none; none in the second.
        assert!(passes_marked(false, 0) && passes_marked(false, TIME_WAIT_PASSES - 1));
        assert!(!passes_marked(false, TIME_WAIT_PASSES) && !passes_marked(true, 0));
    }

    #[test]
    fn a_backends_fin_crossing_the_clients_leaves_it_in_time_wait() {
        use crate::ct::{
            CT_F_CLOSED, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, DIR_FORWARD, TCP_ACK, TCP_FIN, TCP_RST,
            track_close,
        };
        // The client's FIN ends at 1002 (seq 1001), recorded as the first.
        let (tracking, fin_end) = track_close(0, 0, TCP_FIN | TCP_ACK, DIR_FORWARD, 5001, 1002);
        let flags = tracking | CT_F_FIN_CLIENT;
        assert_eq!(fin_end, 1002);
        // The backend's FIN acknowledging up to the client's data, not its FIN: crossed.
        assert!(crossed_into_time_wait(
            flags,
            fin_end,
            CT_F_FIN_BACKEND,
            TCP_FIN | TCP_ACK,
            1001
        ));
        assert!(crossed_into_time_wait(
            flags,
            fin_end,
            CT_F_FIN_BACKEND,
            TCP_FIN,
            0
        ));
        // Acknowledging exactly the client's FIN: a passive close (LAST_ACK).
        assert!(!crossed_into_time_wait(
            flags,
            fin_end,
            CT_F_FIN_BACKEND,
            TCP_FIN | TCP_ACK,
            1002
        ));
        // A RST, no client FIN before, the backend's FIN again, or the client's FIN's end
        // unknown: nothing to tell.
        let rst = TCP_RST | TCP_ACK;
        assert!(!crossed_into_time_wait(
            flags,
            fin_end,
            CT_F_CLOSED,
            rst,
            1001
        ));
        assert!(!crossed_into_time_wait(
            0,
            0,
            CT_F_FIN_BACKEND,
            TCP_FIN | TCP_ACK,
            1001
        ));
        assert!(!crossed_into_time_wait(
            flags | CT_F_FIN_BACKEND,
            fin_end,
            CT_F_FIN_BACKEND,
            TCP_FIN | TCP_ACK,
            1001
        ));
        assert!(!crossed_into_time_wait(
            CT_F_FIN_CLIENT,
            0,
            CT_F_FIN_BACKEND,
            TCP_FIN | TCP_ACK,
            1001
        ));
    }

    #[test]
    fn one_backends_ports_never_share_a_word() {
        for claims in [65_536u32, 1 << 18] {
            let mut seen = std::collections::BTreeSet::new();
            for port in 0..=u16::MAX {
                assert!(seen.insert(claim_index(&rkey([10, 2, 0, 5], port), claims)));
            }
        }
        assert_eq!(snat_claims(1024), 65_536);
        assert_eq!(snat_claims(65_536), 262_144);
        assert_eq!(snat_claims(u32::MAX), 1 << 30);
    }

    #[test]
    fn one_ipv6_backends_ports_never_share_a_word() {
        let rkey6 = |last: u32, port: u16| crate::v6::FlowKey6 {
            saddr: [0xfd00_0050u32.to_be(), 0, 0, last.to_be()],
            daddr: [0xfd00_0060u32.to_be(), 0, 0, 1u32.to_be()],
            sport: port_to_wire(8000),
            dport: port_to_wire(port),
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad2: 0,
        };
        let claims = snat_claims(65_536);
        let mut seen = std::collections::BTreeSet::new();
        for port in 0..=u16::MAX {
            assert!(seen.insert(claim_index6(&rkey6(0x11, port), claims)));
        }
        // Another backend's default range shares few words (uniform placement: ~78).
        let a: std::collections::BTreeSet<u32> = (61_000..=65_535)
            .map(|p| claim_index6(&rkey6(0x11, p), claims))
            .collect();
        let b: std::collections::BTreeSet<u32> = (61_000..=65_535)
            .map(|p| claim_index6(&rkey6(0x12, p), claims))
            .collect();
        let met = a.intersection(&b).count();
        assert!(met < 400, "{met} shared words");
    }

    #[test]
    fn backends_spread_over_the_words() {
        // Two backends' default port ranges (61000-65535) seldom meet in the default array.
        let claims = snat_claims(65_536);
        let mut met = 0;
        for b in 1..=64u8 {
            let a: std::collections::BTreeSet<u32> = (61_000..=65_535)
                .map(|p| claim_index(&rkey([10, 2, 0, b], p), claims))
                .collect();
            let c: std::collections::BTreeSet<u32> = (61_000..=65_535)
                .map(|p| claim_index(&rkey([10, 2, 1, b], p), claims))
                .collect();
            met += a.intersection(&c).count();
        }
        // Uniform placement would share ~4536 * 4536 / 262144 = 78 words per pair.
        assert!(met < 64 * 300, "{met} shared words over 64 pairs");
    }
}
