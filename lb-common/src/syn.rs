//! The pending-handshake table (issue 14): where a new IPv4 DNAT TCP flow of its backend's lazy
//! service (see [`crate::MAP_LAZY_REPLY`]) records its forward entry until its backend answers,
//! instead of inserting it into `CT_NEW` (an LRU hash map, whose insert, evicting under a SYN
//! flood, was most of a new flow's cost).
//!
//! The table is an array of [`SynSlot`]s in sets of [`SYN_WAYS`]: a flow's set is picked by its
//! flow hash (the seeded hash its Maglev pick uses), and a new flow takes the way that holds its
//! own key, else the least recently written (an empty slot reads as written at time 0). So a
//! pending handshake is overwritten only once [`SYN_WAYS`] newer ones have landed in its set, the
//! way an LRU map evicts its oldest entries under a flood.
//!
//! Nothing serialises writers: two CPUs may write one slot at once, and a reader may copy a slot
//! while it is being written. A slot therefore carries a check word over everything else in it
//! ([`SynSlot::check_of`]), written last; a reader acts only on its own copy of a slot whose
//! check word matches that copy, so a torn slot (fields of two flows) reads as absent, never as
//! a flow to another service's backend. A cleared slot has check word 0, which no slot's
//! contents give.
//!
//! The flow leaves the table for `CT_NEW` (promoted, with every field an entry there has) with
//! its backend's first reply or its client's next packet, whichever comes first; from there on
//! it is handled as every unconfirmed flow is.

use crate::{CtEntry, FlowKey, IPPROTO_TCP, Route, ct};

/// The pending-handshake table: an array of `syn_sets(..)` [`SynSet`]s.
pub const MAP_CT_SYN: &str = "CT_SYN";

/// Ways per set.
pub const SYN_WAYS: u32 = 4;

/// The check word of a slot being written: even, so never a slot's own ([`SynSlot::check_of`]
/// is odd) nor a cleared one's (0). A writer takes a way by a compare-and-swap of its check
/// word to this, so two CPUs never write one way at once; readers treat an even check word as
/// "no flow here".
pub const SYN_BUSY: u32 = 2;

/// One pending handshake: the flow's key and what its forward entry needs that the program
/// cannot derive (its backend, service and the interface its backend's replies must arrive
/// on), stamped with the time it was written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SynSlot {
    pub saddr: u32,
    pub daddr: u32,
    /// The key's ports as one word (`sport` in the low half, as [`FlowKey`] lays them out).
    pub ports: u32,
    /// The key's protocol; 0 in a slot never written.
    pub proto: u32,
    pub nat_addr: u32,
    pub nat_port: u32,
    pub backend_id: u32,
    pub service_id: u32,
    pub in_ifindex: u32,
    /// [`SynSlot::check_of`] the rest, written last; 0: cleared.
    pub check: u32,
    pub last_seen_ns: u64,
    /// A full-NAT flow's source address and port towards its backend (0 for DNAT).
    pub fnat_addr: u32,
    pub fnat_port: u32,
    /// The entry's flags: `ct::CT_F_FULLNAT` or 0.
    pub flags: u32,
    /// The table epoch of the flow's pick, its low half (`epoch::slot_stamp`; 0: unknown).
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<SynSlot>() == 64);

/// One set of the table: one map value, so a reader or writer looks its set up once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SynSet {
    pub ways: [SynSlot; SYN_WAYS as usize],
}

/// Number of sets for an unconfirmed-flow capacity of `ct_new_size` entries: a power of two,
/// so that as many slots as `CT_NEW` has entries (or more) are there.
pub const fn syn_sets(ct_new_size: u32) -> u32 {
    let want = ct_new_size.div_ceil(SYN_WAYS);
    if want <= 1 {
        1
    } else {
        want.next_power_of_two()
    }
}

/// The set of a flow with flow hash `hash`.
#[inline(always)]
pub const fn set_of(hash: u32, sets: u32) -> u32 {
    hash & sets.wrapping_sub(1)
}

/// The key's ports packed as [`SynSlot::ports`] holds them.
#[inline(always)]
pub const fn ports_of(key: &FlowKey) -> u32 {
    (key.sport as u32) | ((key.dport as u32) << 16)
}

impl SynSlot {
    /// The slot recording new flow `key`, forward entry `fwd`, its check word computed.
    #[inline(always)]
    pub const fn of(key: &FlowKey, fwd: &CtEntry) -> Self {
        let mut s = SynSlot {
            saddr: key.saddr,
            daddr: key.daddr,
            ports: ports_of(key),
            proto: key.proto as u32,
            nat_addr: fwd.nat_addr,
            nat_port: fwd.nat_port as u32,
            backend_id: fwd.backend_id,
            service_id: fwd.service_id,
            in_ifindex: fwd.in_ifindex,
            check: 0,
            last_seen_ns: fwd.last_seen_ns,
            fnat_addr: fwd.fnat_addr,
            fnat_port: fwd.fnat_port as u32,
            flags: (fwd.flags & ct::CT_F_FULLNAT) as u32,
            epoch: crate::epoch::slot_stamp(fwd.epoch),
        };
        s.check = s.check_of();
        s
    }

    /// The check word of the slot's contents: each word folded in by an xor and a multiply by
    /// an odd constant (a bijection of the running value, so changing any one word changes the
    /// result), never 0.
    #[inline(always)]
    pub const fn check_of(&self) -> u32 {
        let mut h: u32 = 0x2545_f491;
        h = (h ^ self.saddr).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.daddr).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.ports).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.proto).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.nat_addr).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.nat_port).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.backend_id).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.service_id).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.in_ifindex).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.last_seen_ns as u32).wrapping_mul(0x9e37_79b1);
        h = (h ^ (self.last_seen_ns >> 32) as u32).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.fnat_addr).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.fnat_port).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.flags).wrapping_mul(0x9e37_79b1);
        h = (h ^ self.epoch).wrapping_mul(0x9e37_79b1);
        h | 1
    }

    /// Whether the slot holds a whole flow (written, not cleared, not torn).
    #[inline(always)]
    pub const fn is_valid(&self) -> bool {
        self.check != 0 && self.check == self.check_of()
    }

    /// Whether the slot is keyed `key` (whole or not).
    #[inline(always)]
    pub const fn holds(&self, key: &FlowKey) -> bool {
        self.saddr == key.saddr
            && self.daddr == key.daddr
            && self.ports == ports_of(key)
            && self.proto == key.proto as u32
    }

    /// The slot's key.
    #[inline(always)]
    pub const fn key(&self) -> FlowKey {
        FlowKey::new(
            self.saddr,
            self.daddr,
            self.ports as u16,
            (self.ports >> 16) as u16,
            self.proto as u8,
        )
    }

    /// [`ct::is_forward_of`] of the slot's forward entry ([`SynSlot::forward_entry`]) keyed
    /// `fkey`, judged on the slot: its reply key (backend -> client) would be `rkey`. (The
    /// program's `lazy_flow_holds` has no stack for the entry; a unit test holds the two equal.)
    #[inline(always)]
    pub const fn is_forward_of(&self, fkey: &FlowKey, rkey: &FlowKey) -> bool {
        // A full-NAT flow's replies come back to its source address and port, a DNAT flow's
        // to its client.
        if !self.full_nat() {
            return self.is_lazy_forward_of(fkey, rkey);
        }
        rkey.saddr == self.nat_addr
            && rkey.sport == self.nat_port as u16
            && rkey.daddr == self.fnat_addr
            && rkey.dport == self.fnat_port as u16
            && rkey.proto == fkey.proto
    }

    /// [`SynSlot::is_forward_of`] for a DNAT flow recorded lazily (what a lazy service's reply
    /// key can name): false for a full-NAT slot. (Fewer branches for the program's claims,
    /// which the verifier walks once per port tried.)
    #[inline(always)]
    pub const fn is_lazy_forward_of(&self, fkey: &FlowKey, rkey: &FlowKey) -> bool {
        self.flags == 0
            && rkey.saddr == self.nat_addr
            && rkey.sport == self.nat_port as u16
            && rkey.daddr == fkey.saddr
            && rkey.dport == fkey.sport
            && rkey.proto == fkey.proto
    }

    /// Whether the slot holds a full-NAT flow.
    #[inline(always)]
    pub const fn full_nat(&self) -> bool {
        self.flags & ct::CT_F_FULLNAT as u32 != 0
    }

    /// [`ct::expired`] of the slot's forward entry (open, so idle past the TCP timeout only).
    #[inline(always)]
    pub const fn idle_expired(&self, now_ns: u64, cfg: &crate::DpConfig) -> bool {
        self.idle_past(now_ns, cfg.tcp_idle_ns)
    }

    /// [`Self::idle_expired`] with the TCP idle timeout `tcp_idle_ns` given alone.
    #[inline(always)]
    pub const fn idle_past(&self, now_ns: u64, tcp_idle_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > tcp_idle_ns
    }

    /// The flow's forward entry as `CT_NEW` holds it, with route `route`: open, nothing learnt
    /// from its backend yet; a DNAT flow recorded lazily (of its backend's lazy service), a
    /// full-NAT flow with its source address and port; stamped with the table epoch `epoch`
    /// (the current one, `epoch::stable`) if the handshake was picked in it.
    #[inline(always)]
    pub const fn forward_entry(&self, route: Route, epoch: u64) -> CtEntry {
        CtEntry {
            nat_addr: self.nat_addr,
            nat_port: self.nat_port as u16,
            dir: ct::DIR_FORWARD,
            state: ct::STATE_OPEN,
            backend_id: self.backend_id,
            service_id: self.service_id,
            last_seen_ns: self.last_seen_ns,
            route,
            backend_ack: 0,
            in_ifindex: self.in_ifindex,
            fnat_addr: self.fnat_addr,
            fnat_port: self.fnat_port as u16,
            flags: self.flags as u8,
            lazy: if self.full_nat() {
                0
            } else {
                ct::LAZY_RECORDED
            },
            epoch: crate::epoch::from_slot(self.epoch, epoch),
        }
    }

    /// A full-NAT flow's reply key (backend -> berth's address and port): `ct::reply_key` of
    /// its key and forward entry, from the slot's fields.
    #[inline(always)]
    pub const fn full_nat_reply_key(&self) -> FlowKey {
        FlowKey::new(
            self.nat_addr,
            self.fnat_addr,
            self.nat_port as u16,
            self.fnat_port as u16,
            self.proto as u8,
        )
    }

    /// A full-NAT flow's reply entry as its first reply writes it into `CT_NEW`, from the
    /// pending forward entry (the one its first packet used to insert, which took its port):
    /// backend -> berth's address and port, translated back to the service address for the
    /// client; its route is learnt from its first packet. Stamped with the table epoch `epoch`
    /// (the current one, `epoch::stable`) if the handshake was picked in it (at its first port).
    #[inline(always)]
    pub const fn reply_entry(&self, epoch: u64) -> CtEntry {
        CtEntry {
            nat_addr: self.daddr,
            nat_port: (self.ports >> 16) as u16,
            dir: ct::DIR_REPLY,
            state: ct::STATE_OPEN,
            backend_id: self.backend_id,
            service_id: self.service_id,
            last_seen_ns: self.last_seen_ns,
            route: Route::NONE,
            backend_ack: 0,
            in_ifindex: self.in_ifindex,
            fnat_addr: self.saddr,
            fnat_port: self.ports as u16,
            flags: self.flags as u8,
            lazy: 0,
            epoch: crate::epoch::from_slot(self.epoch, epoch),
        }
    }
}

/// Whether a new flow of `proto` with forward entry `fwd` (of its backend's lazy service,
/// `lazy`) is recorded in the pending-handshake table: an open TCP flow, DNAT recorded lazily
/// or full NAT (whose reply entry, which takes its source port, is inserted as before).
#[inline(always)]
pub const fn goes_to_syn_table(proto: u8, lazy: bool, fwd: &CtEntry) -> bool {
    proto == IPPROTO_TCP && (lazy || fwd.full_nat()) && fwd.state == ct::STATE_OPEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{hash::flow_hash, ipv4_to_wire, port_to_wire};

    fn slot() -> SynSlot {
        let key = FlowKey::new(
            ipv4_to_wire([10, 0, 0, 1]),
            ipv4_to_wire([10, 9, 0, 1]),
            port_to_wire(40000),
            port_to_wire(80),
            IPPROTO_TCP,
        );
        let fwd = CtEntry {
            nat_addr: ipv4_to_wire([10, 2, 0, 5]),
            nat_port: port_to_wire(8000),
            backend_id: 3,
            service_id: 1,
            in_ifindex: 7,
            last_seen_ns: 123_456_789_000,
            ..SynSlot::default().forward_entry(Route::NONE, 0)
        };
        let s = SynSlot::of(&key, &fwd);
        assert_eq!(
            s.forward_entry(Route::NONE, 0),
            fwd,
            "the entry it was written from"
        );
        s
    }

    /// A full-NAT flow's slot: from berth's address and a port of its range.
    fn full_nat_slot() -> SynSlot {
        let s = slot();
        let fwd = CtEntry {
            fnat_addr: ipv4_to_wire([10, 2, 0, 1]),
            fnat_port: port_to_wire(30123),
            flags: ct::CT_F_FULLNAT,
            lazy: 0,
            ..s.forward_entry(Route::NONE, 0)
        };
        let f = SynSlot::of(&s.key(), &fwd);
        assert_eq!(
            f.forward_entry(Route::NONE, 0),
            fwd,
            "the entry it was written from"
        );
        assert!(f.full_nat() && f.is_valid() && f.check != s.check);
        f
    }

    #[test]
    fn a_written_slot_is_valid_and_gives_back_its_key_and_entry() {
        let s = slot();
        assert!(s.is_valid());
        let key = s.key();
        assert!(s.holds(&key));
        assert_eq!(key.sport, port_to_wire(40000));
        assert_eq!(key.dport, port_to_wire(80));
        let e = s.forward_entry(Route::NONE, 0);
        assert_eq!((e.nat_addr, e.nat_port), (s.nat_addr, port_to_wire(8000)));
        assert_eq!((e.backend_id, e.service_id, e.in_ifindex), (3, 1, 7));
        assert_eq!(e.lazy, ct::LAZY_RECORDED);
        assert_eq!(e.dir, ct::DIR_FORWARD);
        assert!(
            !SynSlot::default().is_valid(),
            "a slot never written is empty"
        );
        let mut cleared = s;
        cleared.check = 0;
        assert!(!cleared.is_valid());
    }

    #[test]
    fn a_slot_torn_between_two_flows_is_never_valid() {
        let a = slot();
        let mut b = slot();
        b.saddr = ipv4_to_wire([10, 0, 0, 2]);
        b.ports ^= 0x0101;
        b.nat_addr = ipv4_to_wire([10, 2, 0, 6]);
        b.backend_id = 4;
        b.service_id = 2;
        b.last_seen_ns += 1_000;
        b.fnat_addr = ipv4_to_wire([10, 2, 0, 1]);
        b.fnat_port = u32::from(port_to_wire(30123));
        b.flags = u32::from(ct::CT_F_FULLNAT);
        b.check = b.check_of();
        let wa = bytemuck::cast::<SynSlot, [u32; 16]>(a);
        let wb = bytemuck::cast::<SynSlot, [u32; 16]>(b);
        // Every mixture of the two slots' words (as a reader copying one while the other is
        // written over it may see them) other than the two slots themselves.
        for mask in 0u32..(1 << 16) {
            let mut w = [0u32; 16];
            for (i, x) in w.iter_mut().enumerate() {
                *x = if mask & (1 << i) != 0 { wb[i] } else { wa[i] };
            }
            let torn = bytemuck::cast::<[u32; 16], SynSlot>(w);
            if torn != a && torn != b {
                assert!(!torn.is_valid(), "torn slot {mask:#x} read as valid");
            }
        }
    }

    #[test]
    fn judged_on_the_slot_as_on_its_entry() {
        judged_as_its_entry(slot());
        judged_as_its_entry(full_nat_slot());
        // A full-NAT flow's replies come back to berth's address and port, not its client's.
        let (d, f) = (slot(), full_nat_slot());
        let (fkey, dnat_rkey) = (
            d.key(),
            ct::reply_key(&d.key(), &d.forward_entry(Route::NONE, 0)),
        );
        assert!(d.is_forward_of(&fkey, &dnat_rkey) && !f.is_forward_of(&fkey, &dnat_rkey));
        assert!(d.is_lazy_forward_of(&fkey, &dnat_rkey));
        let full_rkey = ct::reply_key(&fkey, &f.forward_entry(Route::NONE, 0));
        assert!(f.is_forward_of(&fkey, &full_rkey) && !f.is_lazy_forward_of(&fkey, &full_rkey));
    }

    fn judged_as_its_entry(s: SynSlot) {
        let fkey = s.key();
        let e = s.forward_entry(Route::NONE, 0);
        let cfg = crate::DpConfig {
            tcp_idle_ns: 1_000,
            tcp_closing_ns: 10,
            ..crate::DpConfig::zeroed()
        };
        let rkey = ct::reply_key(&fkey, &e);
        let mut others = [rkey; 6];
        others[0].saddr ^= 1;
        others[1].sport ^= 1;
        others[2].daddr ^= 1;
        others[3].dport ^= 1;
        others[4].proto = crate::IPPROTO_UDP;
        others[5].saddr = fkey.daddr;
        assert!(s.is_forward_of(&fkey, &rkey));
        assert_eq!(
            s.is_forward_of(&fkey, &rkey),
            ct::is_forward_of(&e, &fkey, &rkey)
        );
        for r in &others {
            assert!(!s.is_forward_of(&fkey, r));
            assert_eq!(s.is_forward_of(&fkey, r), ct::is_forward_of(&e, &fkey, r));
        }
        for now in [
            0,
            s.last_seen_ns,
            s.last_seen_ns + 1_000,
            s.last_seen_ns + 1_001,
        ] {
            for flags in [ct::TCP_SYN, ct::TCP_ACK, ct::TCP_FIN | ct::TCP_ACK] {
                assert_eq!(
                    s.idle_expired(now, &cfg),
                    ct::expired(&e, IPPROTO_TCP, flags, now, &cfg),
                    "now {now} flags {flags:#x}"
                );
            }
        }
    }

    #[test]
    fn a_full_nat_slots_reply_entry_is_the_reply_half_of_its_forward_entry() {
        let s = full_nat_slot();
        let (fkey, fwd) = (s.key(), s.forward_entry(Route::NONE, 0));
        let rkey = ct::reply_key(&fkey, &fwd);
        let r = s.reply_entry(0);
        assert!(ct::is_reply_of(&r, &rkey, &fkey) && ct::is_forward_of(&fwd, &fkey, &rkey));
        assert_eq!(ct::forward_key(&rkey, &r), fkey);
        assert_eq!(s.full_nat_reply_key(), rkey);
        // What the flow's first packet inserted when the reply entry took the port.
        let first = CtEntry {
            nat_addr: fkey.daddr,
            nat_port: fkey.dport,
            dir: ct::DIR_REPLY,
            fnat_addr: fkey.saddr,
            fnat_port: fkey.sport,
            lazy: 0,
            ..fwd
        };
        assert_eq!(r, first);
        assert!(r.full_nat() && r.state == ct::STATE_OPEN && r.route == Route::NONE);
        // A handshake stamped at its pick (its first port) gives both halves the stamp while
        // the epoch stands, neither once it moved.
        let stamped = SynSlot {
            epoch: crate::epoch::slot_stamp(6),
            ..s
        };
        assert_eq!(stamped.reply_entry(6).epoch, 6);
        assert_eq!(stamped.forward_entry(Route::NONE, 6).epoch, 6);
        assert_eq!(stamped.reply_entry(8).epoch, 0);
        assert_eq!(s.reply_entry(6).epoch, 0, "not stamped");
    }

    #[test]
    fn sets_are_powers_of_two_covering_the_unconfirmed_map() {
        assert_eq!(syn_sets(1024), 256);
        assert_eq!(syn_sets(1025), 512);
        assert_eq!(syn_sets(65_536), 16_384);
        assert_eq!(syn_sets(1), 1);
        let sets = syn_sets(1024);
        let mut used = [0u32; 256];
        for k in 0..4096u16 {
            let key = FlowKey::new(1, 2, k, 80, IPPROTO_TCP);
            let set = set_of(flow_hash(&key, 7), sets);
            assert!(set < sets);
            used[set as usize] += 1;
        }
        // 16 flows per set on average: the hash spreads them.
        assert!(used.iter().all(|&n| (2..=40).contains(&n)), "{used:?}");
    }
}
