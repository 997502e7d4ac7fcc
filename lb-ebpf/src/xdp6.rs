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

use aya_ebpf::{
    bindings::xdp_action::{XDP_REDIRECT, XDP_TX},
    programs::XdpContext,
};
use lb_common::{
    CFG_F_KEEP_TTL, IPPROTO_TCP, IPPROTO_UDP, Reason,
    csum::{add, apply, diff2, diff4},
    ct::{self, DIR_FORWARD, DIR_REPLY, STATE_OPEN},
    port_flag,
    v6::{FlowKey6, is_forward_of6, is_reply_of6},
};

use crate::{
    maps::{SCRATCH, account},
    parse::ETH_HLEN,
    port_flags,
    v6::CONNTRACK6,
    xdp::{XDP_DEVS, at, pass},
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

/// The one's-complement difference of a 16-byte address's change.
#[inline(always)]
fn diff16(from: &[u32; 4], to: &[u32; 4]) -> u16 {
    add(
        add(diff4(from[0], to[0]), diff4(from[1], to[1])),
        add(diff4(from[2], to[2]), diff4(from[3], to[3])),
    )
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
    let (csum, tcp_flags, ack) = if proto == IPPROTO_TCP {
        let Some(t) = at::<[u8; 20]>(ctx, L4) else {
            return pass();
        };
        // SAFETY: `at` checked the bytes lie inside the frame.
        let t = unsafe { &mut *t };
        let doff = usize::from(t[12] >> 4) * 4;
        if doff < 20 || doff > payload_len {
            return pass();
        }
        if t[13] & (ct::TCP_SYN | ct::TCP_FIN | ct::TCP_RST) != 0 {
            return pass();
        }
        let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
        let Some(c) = at::<[u8; 2]>(ctx, L4 + 16) else {
            return pass();
        };
        (c, t[13], ack)
    } else if proto == IPPROTO_UDP {
        let ulen = usize::from(u16::from_be_bytes([h[L4 + 4], h[L4 + 5]]));
        if ulen < 8 || ulen > payload_len {
            return pass();
        }
        let Some(c) = at::<[u8; 2]>(ctx, L4 + 6) else {
            return pass();
        };
        (c, 0, 0)
    } else {
        return pass();
    };
    let sport = u16::from_ne_bytes([h[L4], h[L4 + 1]]);
    let dport = u16::from_ne_bytes([h[L4 + 2], h[L4 + 3]]);
    if port_flags(u16::from_be(dport)) & port_flag(proto, false) == 0
        && port_flags(u16::from_be(sport)) & port_flag(proto, true) == 0
    {
        return pass();
    }
    let (saddr, daddr) = (addr(h, ETH_HLEN + 8), addr(h, ETH_HLEN + 24));
    let key = FlowKey6::new(saddr, daddr, sport, dport, proto);
    let Some(e) = CONNTRACK6.get_ptr_mut(&key) else {
        return pass();
    };
    // SAFETY: as in the IPv4 fast path: valid for the run; `backend_ack` races as in TC.
    let e = unsafe { &mut *e };
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return pass();
    };
    // SAFETY: this CPU's slot of a per-CPU array (see the IPv4 fast path).
    let now = crate::coarse_now(unsafe { &mut *p });
    if e.ct.state != STATE_OPEN
        || now.wrapping_sub(e.ct.last_seen_ns) > ct::TOUCH_INTERVAL_NS
        || ct::expired(&e.ct, proto, tcp_flags, now, cfg)
        || e.ct.route.ifindex == 0
    {
        return pass();
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let reply = e.ct.dir == DIR_REPLY;
    if reply {
        if e.ct.in_ifindex != 0 && e.ct.in_ifindex != ingress {
            return pass();
        }
        // `forward_key6`, its addresses loaded word by word (see `load`).
        let fkey = if e.ct.full_nat() {
            FlowKey6::new(
                load(&e.fnat_addr),
                load(&e.nat_addr),
                e.ct.fnat_port,
                e.ct.nat_port,
                proto,
            )
        } else {
            FlowKey6::new(daddr, load(&e.nat_addr), dport, e.ct.nat_port, proto)
        };
        let Some(f) = CONNTRACK6.get_ptr(&fkey) else {
            return pass();
        };
        // SAFETY: valid map value pointer, read in place.
        if !is_forward_of6(unsafe { &*f }, &fkey, &key) {
            return pass();
        }
    } else if e.ct.dir == DIR_FORWARD {
        // `reply_key6`, as above.
        let rkey = if e.ct.full_nat() {
            FlowKey6::new(
                load(&e.nat_addr),
                load(&e.fnat_addr),
                e.ct.nat_port,
                e.ct.fnat_port,
                proto,
            )
        } else {
            FlowKey6::new(load(&e.nat_addr), saddr, e.ct.nat_port, sport, proto)
        };
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
    let out = e.ct.route.ifindex;
    let tx = out == ingress;
    if !tx && XDP_DEVS.get_ifindex(out).is_none() {
        return pass();
    }

    if reply && proto == IPPROTO_TCP && tcp_flags & ct::TCP_ACK != 0 {
        if e.ct.flags & ct::CT_F_ACK_KNOWN == 0 || ct::seq_after(ack, e.ct.backend_ack) {
            e.ct.backend_ack = ack;
            e.ct.flags |= ct::CT_F_ACK_KNOWN;
        }
    }

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
    // SAFETY: `at` checked the field lies inside the frame; nothing else writes it.
    let old = u16::from_ne_bytes(unsafe { *csum });
    if !(proto == IPPROTO_UDP && old == 0) {
        let mut new = apply(old, add(da, dp));
        if proto == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        // SAFETY: as above.
        unsafe { *csum = new.to_ne_bytes() };
    }
    h[..6].copy_from_slice(&e.ct.route.dmac);
    h[6..12].copy_from_slice(&e.ct.route.smac);
    account(e.ct.service_id, e.ct.backend_id, frame_len as u64, false);
    if tx {
        return (XDP_TX, Reason::XdpTx);
    }
    match XDP_DEVS.redirect(out, 0) {
        Ok(XDP_REDIRECT) => (XDP_REDIRECT, Reason::XdpRedirect),
        // As in the IPv4 fast path: already rewritten, so dropped and counted.
        _ => (
            aya_ebpf::bindings::xdp_action::XDP_ABORTED,
            Reason::AbortMap,
        ),
    }
}
