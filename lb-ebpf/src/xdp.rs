//! The XDP fast path (issue 14): packets of established IPv4 TCP/UDP flows (IPv6's: `xdp6`),
//! translated and sent before the kernel builds an skb for them. It handles only the common
//! case and passes everything else (`XDP_PASS`) to the TC program, which then does the whole
//! job exactly as without XDP:
//!
//! - a packet whose own tuple has a forward or reply entry in CONNTRACK (never CT_NEW: the TC
//!   program confirms flows), open (not closing), refreshed less than a second ago (the TC
//!   program does the once-a-second refresh of both halves and of the cached route), not
//!   expired, with its pair's other half present and consistent (`ct::is_reply_of` /
//!   `ct::is_forward_of`; a forward packet of a lazily recorded flow, `CtEntry::lazy`, skips
//!   its reply half, and a reply of the current table epoch its forward half, as in the TC
//!   program), a reply only from the interface its backend lives behind, and a cached route
//!   (egress interface and MACs);
//! - TCP without SYN, FIN or RST (state changes stay with the TC program); UDP;
//! - an IPv4 header without options, not a fragment, TTL above 1; redirect enabled.
//!
//! It rewrites addresses and ports (DNAT or full NAT) with the checksums updated by hand
//! (RFC 1624; a frame in XDP has no skb and no `CHECKSUM_PARTIAL`: its checksums are complete,
//! see README "XDP fast path" for what a local sender's veth frames carry), decrements the TTL
//! like the TC path, writes the MACs, records the backend's acknowledgment on a reply (as the TC
//! path does), counts on the same per-CPU counters, and sends the frame: `XDP_TX` when the
//! cached route leaves by the interface it came in on (the one-armed case), a redirect into
//! `XDP_DEVS` when userspace marked the egress interface as taking XDP frames, otherwise it
//! passes it (untouched) to TC. Its own state is a few registers and keys on its own 512-byte
//! stack (a separate entry point); of the TC program's per-CPU `SCRATCH` slot it uses only the
//! clock cache.

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_REDIRECT, XDP_TX},
    macros::{map, xdp},
    maps::DevMapHash,
    programs::XdpContext,
};
use lb_common::{
    CFG_F_KEEP_TTL, CFG_F_REDIRECT, CtEntry, DpConfig, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Reason,
    csum::{add, apply, diff2, diff4, replace2},
    ct::{self, DIR_FORWARD, DIR_REPLY, STATE_OPEN},
    port_flag,
};

use crate::{
    config,
    maps::{CONNTRACK, SCRATCH, account, count},
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    port_flags,
};

/// Interfaces the XDP program may redirect into: ifindex -> the same ifindex. Userspace writes
/// the ones that take XDP frames (a veth whose peer runs an XDP program or has GRO on, a NIC
/// whose driver implements `ndo_xdp_xmit`); any other egress leaves the packet to TC.
#[map]
pub static XDP_DEVS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// The IPv4 header's size when it has no options: the only one the fast path handles, so the
/// L4 header sits at a constant offset.
const L4: usize = ETH_HLEN + 20;

#[xdp]
pub fn berth_xdp(ctx: XdpContext) -> u32 {
    let (act, reason) = fast(&ctx);
    count(reason);
    act
}

/// Does nothing: the floor `cargo xtask bench` measures an XDP test run's own cost against.
/// Never attached.
#[xdp]
pub fn berth_xdp_noop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[inline(always)]
pub(crate) fn pass() -> (u32, Reason) {
    (XDP_PASS, Reason::EventXdpPass)
}

/// A pointer to a `T` at `off` bytes into the frame, or `None` past its end.
#[inline(always)]
pub(crate) fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn fast(ctx: &XdpContext) -> (u32, Reason) {
    let cfg = config();
    if cfg.flags & CFG_F_REDIRECT == 0 || cfg.maglev_size == 0 {
        return pass();
    }
    // Ethernet + IPv4 without options + 8 bytes of L4 (the UDP header, the TCP ports and
    // sequence number); the rest of a TCP header is checked below.
    // (No IPv6 frame the fast path takes is shorter: it reads 62 bytes of its own.)
    let Some(h) = at::<[u8; L4 + 8]>(ctx, 0) else {
        return pass();
    };
    // SAFETY: `at` checked the bytes lie inside the frame.
    let h = unsafe { &mut *h };
    let ethertype = u16::from_be_bytes([h[12], h[13]]);
    if ethertype == ETH_P_IPV6 {
        return crate::xdp6::fast6(ctx);
    }
    if ethertype != ETH_P_IP || h[ETH_HLEN] != 0x45 {
        return pass();
    }
    let ip = &h[ETH_HLEN..L4];
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    let frame_len = ctx.data_end() - ctx.data();
    if tot_len < 20 + 8
        || ETH_HLEN + tot_len > frame_len
        || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
        || ip[8] <= 1
    {
        return pass();
    }
    let Some((csum, tcp_flags, ack)) = l4_fields(ctx, L4, tot_len - 20, proto) else {
        return pass();
    };
    let l4 = &h[L4..];
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let sport = u16::from_ne_bytes([l4[0], l4[1]]);
    let dport = u16::from_ne_bytes([l4[2], l4[3]]);
    if !ours(proto, sport, dport) {
        return pass();
    }
    let key = FlowKey::new(saddr, daddr, sport, dport, proto);
    let Some(e) = CONNTRACK.get_ptr_mut(&key) else {
        return pass();
    };
    // SAFETY: a value pointer returned by the map lookup stays valid for this run (RCU); the
    // one field written (`backend_ack`) races with other CPUs as in the TC program.
    let e = unsafe { &mut *e };
    let Some(now) = now() else {
        return pass();
    };
    if !usable(e, proto, tcp_flags, now, cfg) {
        return pass();
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let reply = e.dir == DIR_REPLY;
    if reply {
        if e.in_ifindex != 0 && e.in_ifindex != ingress {
            return pass();
        }
        // The TC program's rule for a flow picked in the current table epoch (lb-common's
        // `epoch`): its reply entry is its client's tuple's own.
        if !ct::reply_skips_forward(e, proto, tcp_flags, now, crate::current_epoch) {
            let fkey = ct::forward_key(&key, e);
            let Some(f) = CONNTRACK.get_ptr(&fkey) else {
                return pass();
            };
            // SAFETY: valid map value pointer, read in place.
            if !ct::is_forward_of(unsafe { &*f }, &fkey, &key) {
                return pass();
            }
        }
    } else if e.dir == DIR_FORWARD {
        // The TC program's rule for a lazily recorded flow (here its packets neither close nor
        // refresh the flow: those went to TC above).
        if !ct::forward_skips_reply(e, proto, tcp_flags, now) {
            let rkey = ct::reply_key(&key, e);
            let Some(r) = CONNTRACK.get_ptr(&rkey) else {
                return pass();
            };
            // SAFETY: as above.
            if !ct::is_reply_of(unsafe { &*r }, &rkey, &key) {
                return pass();
            }
        }
    } else {
        return pass();
    }
    // Where it goes, decided before anything is written: a pass leaves the frame untouched.
    let Some(tx) = egress(e.route.ifindex, ingress) else {
        return pass();
    };
    record_ack(e, reply, proto, tcp_flags, ack);

    // The new tuple, as the TC program's `translate` makes it.
    let nat = (e.nat_addr, e.nat_port);
    let (src, dst) = match (e.full_nat(), reply) {
        (false, false) => ((saddr, sport), nat),
        (false, true) => (nat, (daddr, dport)),
        (true, false) => ((e.fnat_addr, e.fnat_port), nat),
        (true, true) => (nat, (e.fnat_addr, e.fnat_port)),
    };
    let da = add(diff4(saddr, src.0), diff4(daddr, dst.0));
    let dp = add(diff2(sport, src.1), diff2(dport, dst.1));
    let mut ipc = u16::from_ne_bytes([h[ETH_HLEN + 10], h[ETH_HLEN + 11]]);
    ipc = apply(ipc, da);
    if cfg.flags & CFG_F_KEEP_TTL == 0 {
        // TTL is the first byte of the (TTL, protocol) word, in packet order.
        let old = u16::from_ne_bytes([h[ETH_HLEN + 8], h[ETH_HLEN + 9]]);
        h[ETH_HLEN + 8] -= 1;
        let new = u16::from_ne_bytes([h[ETH_HLEN + 8], h[ETH_HLEN + 9]]);
        ipc = replace2(ipc, old, new);
    }
    h[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ipc.to_ne_bytes());
    h[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&src.0.to_ne_bytes());
    h[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&dst.0.to_ne_bytes());
    h[L4..L4 + 2].copy_from_slice(&src.1.to_ne_bytes());
    h[L4 + 2..L4 + 4].copy_from_slice(&dst.1.to_ne_bytes());
    update_l4(csum, proto, add(da, dp));
    send(h, e, frame_len, tx)
}

/// The L4 header checks of both families, on the L4 header at `l4` of an IP payload of `len`
/// bytes: TCP with a data offset inside it and none of SYN, FIN, RST (state changes, the TC
/// program's), or UDP with a length inside it. The checksum field, the TCP flags and the
/// acknowledgment number; `None` for anything else (left to TC).
#[inline(always)]
pub(crate) fn l4_fields(
    ctx: &XdpContext,
    l4: usize,
    len: usize,
    proto: u8,
) -> Option<(*mut [u8; 2], u8, u32)> {
    if proto == IPPROTO_TCP {
        let t = at::<[u8; 20]>(ctx, l4)?;
        // SAFETY: `at` checked the bytes lie inside the frame.
        let t = unsafe { &*t };
        let doff = usize::from(t[12] >> 4) * 4;
        if doff < 20 || doff > len || t[13] & (ct::TCP_SYN | ct::TCP_FIN | ct::TCP_RST) != 0 {
            return None;
        }
        let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
        Some((at::<[u8; 2]>(ctx, l4 + 16)?, t[13], ack))
    } else if proto == IPPROTO_UDP {
        let u = at::<[u8; 8]>(ctx, l4)?;
        // SAFETY: as above.
        let ulen = usize::from(unsafe { u16::from_be_bytes([(*u)[4], (*u)[5]]) });
        if ulen < 8 || ulen > len {
            return None;
        }
        Some((at::<[u8; 2]>(ctx, l4 + 6)?, 0, 0))
    } else {
        None
    }
}

/// The L4 checksum field (from [`l4_fields`]) updated by the summed difference `diff` of the
/// fields it covers: a zero UDP checksum means "none" and stays so; a computed zero is sent as
/// all ones.
#[inline(always)]
pub(crate) fn update_l4(csum: *mut [u8; 2], proto: u8, diff: u16) {
    // SAFETY: `l4_fields` checked the field lies inside the frame; nothing else writes it.
    let old = u16::from_ne_bytes(unsafe { *csum });
    if !(proto == IPPROTO_UDP && old == 0) {
        let mut new = apply(old, diff);
        if proto == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        // SAFETY: as above.
        unsafe { *csum = new.to_ne_bytes() };
    }
}

/// The TC program's port filter: a packet on no service or backend port is not ours.
#[inline(always)]
pub(crate) fn ours(proto: u8, sport: u16, dport: u16) -> bool {
    port_flags(u16::from_be(dport)) & port_flag(proto, false) != 0
        || port_flags(u16::from_be(sport)) & port_flag(proto, true) != 0
}

/// The clock cached per jiffy in this CPU's TC slot (`crate::coarse_now`): XDP and TC run one
/// after the other in this CPU's softirq, never inside each other, and the cache is only a
/// cache (the value a read would return this jiffy).
#[inline(always)]
pub(crate) fn now() -> Option<u64> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run (see `SCRATCH`).
    Some(crate::coarse_now(unsafe { &mut *p }))
}

/// Whether entry `e` may be sent by XDP at all: open (not closing), refreshed less than a
/// second ago (TC does the refresh), not expired, with a cached route.
#[inline(always)]
pub(crate) fn usable(e: &CtEntry, proto: u8, tcp_flags: u8, now: u64, cfg: &DpConfig) -> bool {
    e.state == STATE_OPEN
        && now.wrapping_sub(e.last_seen_ns) <= ct::TOUCH_INTERVAL_NS
        && !ct::expired(e, proto, tcp_flags, now, cfg)
        && e.route.ifindex != 0
}

/// Where a frame for egress interface `out` that came in on `ingress` may go: `Some(true)` out
/// where it came in (`XDP_TX`), `Some(false)` redirected into an interface marked in
/// `XDP_DEVS`, `None` nowhere (left to TC).
#[inline(always)]
pub(crate) fn egress(out: u32, ingress: u32) -> Option<bool> {
    if out == ingress {
        Some(true)
    } else if XDP_DEVS.get_ifindex(out).is_some() {
        Some(false)
    } else {
        None
    }
}

/// A reply's acknowledgment recorded as the TC path records it (a client FIN or RST is judged
/// against it).
#[inline(always)]
pub(crate) fn record_ack(e: &mut CtEntry, reply: bool, proto: u8, tcp_flags: u8, ack: u32) {
    if reply && proto == IPPROTO_TCP && tcp_flags & ct::TCP_ACK != 0 {
        ct::record_backend_ack(e, ack);
    }
}

/// The last step of both families: the cached MACs into the frame's header bytes `h`, the
/// packet counted on its service and backend, and the frame sent (`tx`: see [`egress`]).
#[inline(always)]
pub(crate) fn send(h: &mut [u8], e: &CtEntry, frame_len: usize, tx: bool) -> (u32, Reason) {
    h[..6].copy_from_slice(&e.route.dmac);
    h[6..12].copy_from_slice(&e.route.smac);
    account(e.service_id, e.backend_id, frame_len as u64, false);
    if tx {
        return (XDP_TX, Reason::XdpTx);
    }
    match XDP_DEVS.redirect(e.route.ifindex, 0) {
        Ok(XDP_REDIRECT) => (XDP_REDIRECT, Reason::XdpRedirect),
        // Removed from the map since `egress` looked: the frame is already rewritten, so it
        // cannot go back to TC; sent out where it came in is wrong too. Dropped and counted.
        _ => (
            aya_ebpf::bindings::xdp_action::XDP_ABORTED,
            Reason::AbortMap,
        ),
    }
}
