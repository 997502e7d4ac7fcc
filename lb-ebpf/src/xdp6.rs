//! The XDP fast path for IPv6: the IPv4 fast path's rules (see `xdp`) applied to established
//! IPv6 flows in CONNTRACK6, so an IPv6 flow's packets skip the skb as IPv4's do. What it
//! handles beyond the IPv4 rules' IPv6 equivalents:
//!
//! - a fixed header followed directly by TCP or UDP (an extension header, a jumbogram or a
//!   BIG TCP aggregate with payload length 0, and ICMPv6 go to TC), hop limit above 1;
//! - the pair check always (IPv6 flows are never recorded lazily: both halves exist);
//! - no header checksum: the L4 one takes the addresses' and ports' differences (by hand, as
//!   the TC program's helper does on a frame with complete checksums); a zero UDP checksum
//!   stays zero, as TC leaves it (`BPF_F_MARK_MANGLED_0`).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    CFG_F_KEEP_TTL, Reason,
    csum::{add, diff2, diff16},
    ct::{DIR_FORWARD, DIR_REPLY},
    v6::{FlowKey6, forward_key6_of, is_forward_of6, is_reply_of6, reply_key6_of},
};

use crate::{
    parse::ETH_HLEN,
    v6::CONNTRACK6,
    xdp::{at, egress, l4_fields, now, ours, pass, record_ack, send, update_l4, usable},
};

/// The fixed IPv6 header; the fast path handles no extension header, so the L4 header sits at
/// a constant offset.
const L4: usize = ETH_HLEN + 40;

/// The 16-byte address at `off` of the header bytes, in the in-map representation.
#[inline(always)]
fn addr(h: &[u8], off: usize) -> [u32; 4] {
    let w =
        |i: usize| u32::from_ne_bytes([h[off + i], h[off + i + 1], h[off + i + 2], h[off + i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// A 16-byte address read word by word into registers: copied as an array from a map value,
/// it became a call to the byte-wise `memmove` subprogram (16 rounds, three per packet).
#[inline(always)]
fn load(a: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reads of a valid reference's words.
    let w = |i: usize| unsafe { core::ptr::read_volatile(&a[i]) };
    [w(0), w(1), w(2), w(3)]
}

/// Writes a 16-byte address into the header bytes at `off`.
#[inline(always)]
fn put(h: &mut [u8], off: usize, a: [u32; 4]) {
    for (i, w) in a.into_iter().enumerate() {
        let b = w.to_ne_bytes();
        for (j, x) in b.into_iter().enumerate() {
            h[off + 4 * i + j] = x;
        }
    }
}

/// An IPv6 frame (the ethertype checked by the caller): sent as the TC program would send it,
/// or passed untouched.
#[inline(always)]
pub fn fast6(ctx: &XdpContext) -> (u32, Reason) {
    let cfg = crate::config();
    // Ethernet + the fixed header + 8 bytes of L4 (the UDP header, the TCP ports and sequence
    // number); the rest of a TCP header is checked below.
    let Some(h) = at::<[u8; L4 + 8]>(ctx, 0) else {
        return pass();
    };
    // SAFETY: `at` checked the bytes lie inside the frame.
    let h = unsafe { &mut *h };
    let ip = &h[ETH_HLEN..L4];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let proto = ip[6];
    let frame_len = ctx.data_end() - ctx.data();
    if ip[0] >> 4 != 6 || payload_len < 8 || L4 + payload_len > frame_len || ip[7] <= 1 {
        return pass();
    }
    let Some((csum, tcp_flags, ack)) = l4_fields(ctx, L4, payload_len, proto) else {
        return pass();
    };
    let sport = u16::from_ne_bytes([h[L4], h[L4 + 1]]);
    let dport = u16::from_ne_bytes([h[L4 + 2], h[L4 + 3]]);
    if !ours(proto, sport, dport) {
        return pass();
    }
    let (saddr, daddr) = (addr(h, ETH_HLEN + 8), addr(h, ETH_HLEN + 24));
    let key = FlowKey6::new(saddr, daddr, sport, dport, proto);
    let Some(e) = CONNTRACK6.get_ptr_mut(&key) else {
        return pass();
    };
    // SAFETY: as in the IPv4 fast path: valid for the run; `backend_ack` races as in TC.
    let e = unsafe { &mut *e };
    let Some(now) = now() else {
        return pass();
    };
    if !usable(&e.ct, proto, tcp_flags, now, cfg) {
        return pass();
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let reply = e.ct.dir == DIR_REPLY;
    if reply {
        if e.ct.in_ifindex != 0 && e.ct.in_ifindex != ingress {
            return pass();
        }
        // The TC program's rule for a DNAT flow picked in the current table epoch (lb-common's
        // `epoch`): its reply entry is its client's tuple's own.
        if !lb_common::ct::reply_skips_forward(&e.ct, proto, tcp_flags, now, crate::current_epoch) {
            // The addresses loaded word by word (see `load`).
            let fkey = forward_key6_of(&key, load(&e.nat_addr), load(&e.fnat_addr), &e.ct);
            let Some(f) = CONNTRACK6.get_ptr(&fkey) else {
                return pass();
            };
            // SAFETY: valid map value pointer, read in place.
            if !is_forward_of6(unsafe { &*f }, &fkey, &key) {
                return pass();
            }
        }
    } else if e.ct.dir == DIR_FORWARD {
        let rkey = reply_key6_of(&key, load(&e.nat_addr), load(&e.fnat_addr), &e.ct);
        let Some(r) = CONNTRACK6.get_ptr(&rkey) else {
            return pass();
        };
        // SAFETY: as above.
        if !is_reply_of6(unsafe { &*r }, &rkey, &key) {
            return pass();
        }
    } else {
        return pass();
    }
    let Some(tx) = egress(e.ct.route.ifindex, ingress) else {
        return pass();
    };
    record_ack(&mut e.ct, reply, proto, tcp_flags, ack);

    // The new tuple, as the TC program's `translate6` makes it.
    let nat = (load(&e.nat_addr), e.ct.nat_port);
    let fnat = (load(&e.fnat_addr), e.ct.fnat_port);
    let (src, dst) = match (e.ct.full_nat(), reply) {
        (false, false) => ((saddr, sport), nat),
        (false, true) => (nat, (daddr, dport)),
        (true, false) => (fnat, nat),
        (true, true) => (nat, fnat),
    };
    let da = add(diff16(&saddr, &src.0), diff16(&daddr, &dst.0));
    let dp = add(diff2(sport, src.1), diff2(dport, dst.1));
    if cfg.flags & CFG_F_KEEP_TTL == 0 {
        h[ETH_HLEN + 7] -= 1;
    }
    put(h, ETH_HLEN + 8, src.0);
    put(h, ETH_HLEN + 24, dst.0);
    h[L4..L4 + 2].copy_from_slice(&src.1.to_ne_bytes());
    h[L4 + 2..L4 + 4].copy_from_slice(&dst.1.to_ne_bytes());
    update_l4(csum, proto, add(da, dp));
    send(h, &e.ct, frame_len, tx)
}
