//! Refusing traffic to a service with no backend as a host with nothing listening would, so
//! clients fail at once instead of waiting for their timeouts (HAProxy refuses at once too): a
//! TCP segment is turned into a RST, a UDP datagram into an ICMP port unreachable quoting it,
//! and either is bounced back out of the interface it came in on. Only TCP segments without
//! payload are answered (a SYN above all; never a RST), and only packets with a plain 20-byte
//! IPv4 header; anything else is dropped as before.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::bpf_redirect,
    programs::TcContext,
};
use lb_common::{
    IPPROTO_TCP, Reason,
    csum::replace2,
    ct::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    nat::ingress_ifindex,
    parse::{ETH_HLEN, Flow, ptr_at},
};

/// Length of the RST frame: Ethernet, a 20-byte IPv4 header, a 20-byte TCP header.
const RST_LEN: usize = ETH_HLEN + 20 + 20;
/// TTL of the RST (a fresh packet of this host's).
const RST_TTL: u8 = 64;

/// One's-complement sum of 16-bit words, folded.
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[inline(always)]
fn sum_words(bytes: &[u8; 20]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < 20 {
        s += u64::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    s
}

/// Answers `flow` (to a service with no backend): a TCP segment with a RST, a UDP datagram
/// with an ICMP port unreachable, or drops it. A global BPF function (see `crate::args`),
/// returning a packed verdict.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn refuse(skb: *mut __sk_buff, flow: *const Flow) -> u64 {
    let Some((ctx, flow)) = crate::args(skb, flow) else {
        return crate::pack(crate::exit(lb_common::Reason::AbortMap));
    };
    let ctx = &ctx;
    // The parse made only the headers it reads linear; a refusal reads the TCP options too.
    crate::parse::pull_all_headers(ctx);
    crate::pack(if flow.proto == IPPROTO_TCP {
        tcp_reset_inner(ctx, flow)
    } else {
        udp_unreachable(ctx, flow)
    })
}

/// Length of the ICMP error frame: Ethernet, IPv4, ICMP header, the quoted IPv4 header and the
/// quoted 8 bytes of UDP header.
const ICMP_LEN: usize = ETH_HLEN + 20 + 8 + 20 + 8;
/// Room the ICMP error needs in front of the datagram's own IPv4 header.
const ICMP_ROOM: usize = 20 + 8;

/// Turns a UDP datagram into the ICMP port unreachable a host with nothing on the port sends:
/// 28 bytes of room after the Ethernet header for the new IPv4 and ICMP headers, the datagram's
/// own headers left in place as the quote, the rest cut off. The checksums of the new headers
/// are complete ones (ICMP is never offloaded).
#[inline(always)]
fn udp_unreachable(ctx: &TcContext, flow: &Flow) -> (i32, Reason) {
    let drop = crate::exit(Reason::DropNoBackend);
    if flow.l4() != ETH_HLEN + 20 {
        return drop;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return drop;
    };
    // SAFETY: the MACs are inside the packet (checked by `ptr_at`).
    let macs = unsafe { *eth };
    if ctx
        .adjust_room(ICMP_ROOM as i32, BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return drop;
    }
    if (ctx.len() as usize) > ICMP_LEN && ctx.change_tail(ICMP_LEN as u32, 0).is_err() {
        return crate::exit(Reason::AbortRewrite);
    }
    let (Some(eth), Some(hdrs)) = (
        ptr_at::<[u8; 12]>(ctx, 0),
        ptr_at::<[u8; 56]>(ctx, ETH_HLEN),
    ) else {
        return crate::exit(Reason::AbortRewrite);
    };
    // SAFETY: `ptr_at` checked the MACs and the 56 bytes of headers (new IPv4 + ICMP, quoted
    // IPv4 + UDP) lie inside the packet; no helper runs between the checks and the writes.
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&macs[6..]);
        eth[6..].copy_from_slice(&macs[..6]);
        let h = &mut *hdrs;
        // From the service address (the quote's destination) to the client (its source).
        let (to, from) = ([h[40], h[41], h[42], h[43]], [h[44], h[45], h[46], h[47]]);
        h[..20].copy_from_slice(&[
            0x45, 0, 0, 56, 0, 0, 0, 0, RST_TTL, 1, 0, 0, from[0], from[1], from[2], from[3],
            to[0], to[1], to[2], to[3],
        ]);
        let mut s = 0u64;
        let mut i = 0;
        while i < 20 {
            s += u64::from(u16::from_ne_bytes([h[i], h[i + 1]]));
            i += 2;
        }
        h[10..12].copy_from_slice(&(!fold(s)).to_ne_bytes());
        // Destination unreachable, port unreachable.
        h[20..28].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        let mut s = 0u64;
        let mut i = 20;
        while i < 56 {
            s += u64::from(u16::from_ne_bytes([h[i], h[i + 1]]));
            i += 2;
        }
        h[22..24].copy_from_slice(&(!fold(s)).to_ne_bytes());
    }
    // SAFETY: plain helper call with an interface index: out of the interface it came in on.
    let act = unsafe { bpf_redirect(ingress_ifindex(ctx), 0) } as i32;
    (act, Reason::RejectNoBackend)
}

#[inline(always)]
fn tcp_reset_inner(ctx: &TcContext, flow: &Flow) -> (i32, Reason) {
    let drop = crate::exit(Reason::DropNoBackend);
    let l4 = flow.l4();
    if flow.tcp_flags & TCP_RST != 0 || l4 != ETH_HLEN + 20 {
        return drop;
    }
    let Some(th) = ptr_at::<[u8; 20]>(ctx, l4) else {
        return drop;
    };
    // SAFETY: the 20-byte TCP header is inside the packet (checked by `ptr_at`).
    let old: [u8; 20] = unsafe { *th };
    let doff = usize::from(old[12] >> 4) * 4;
    let seg_len = usize::from(flow.tot_len) - 20;
    if seg_len != doff {
        return drop; // carries payload
    }
    // The options (at most 40 bytes, whole words) go: their sum leaves the checksum.
    let mut removed = 0u64;
    let mut i = 0usize;
    while i < 10 {
        if 20 + i * 4 >= doff {
            break;
        }
        let Some(w) = ptr_at::<[u8; 4]>(ctx, l4 + 20 + i * 4) else {
            return drop;
        };
        // SAFETY: the 4 option bytes are inside the packet (checked by `ptr_at`).
        let w = unsafe { *w };
        removed += u64::from(u16::from_ne_bytes([w[0], w[1]]));
        removed += u64::from(u16::from_ne_bytes([w[2], w[3]]));
        i += 1;
    }
    // RFC 9293 3.10.7.1: answer an ACK with SEQ = its ACK; anything else with SEQ 0 and an ACK
    // of everything it occupied.
    let (seq, ack, flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (flow.ack, 0u32, TCP_RST)
    } else {
        let occupied =
            u32::from(flow.tcp_flags & TCP_SYN != 0) + u32::from(flow.tcp_flags & TCP_FIN != 0);
        (0u32, flow.seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let mut new = [0u8; 20];
    new[0..2].copy_from_slice(&old[2..4]);
    new[2..4].copy_from_slice(&old[0..2]);
    new[4..8].copy_from_slice(&seq.to_be_bytes());
    new[8..12].copy_from_slice(&ack.to_be_bytes());
    new[12] = 5 << 4;
    new[13] = flags;
    // Window and urgent pointer 0; the checksum field keeps its old value here so that it
    // cancels out of the difference below.
    new[16..18].copy_from_slice(&old[16..18]);
    let before = fold(sum_words(&old) + removed);
    let after = fold(sum_words(&new));
    let diff = u32::from(fold(u64::from(after) + u64::from(!before)));

    let (Some(eth), Some(ip), Some(th)) = (
        ptr_at::<[u8; 12]>(ctx, 0),
        ptr_at::<[u8; 20]>(ctx, ETH_HLEN),
        ptr_at::<[u8; 20]>(ctx, l4),
    ) else {
        return drop;
    };
    // SAFETY: `ptr_at` checked all three headers lie inside the packet; TC programs may write
    // packet data directly; no helper runs between the checks and the writes.
    unsafe {
        let eth = &mut *eth;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&eth[6..]);
        macs[6..].copy_from_slice(&eth[..6]);
        *eth = macs;
        let ip = &mut *ip;
        // Swapping the addresses leaves the header's sum (and the pseudo-header's) as it was.
        let (src, dst) = (
            [ip[12], ip[13], ip[14], ip[15]],
            [ip[16], ip[17], ip[18], ip[19]],
        );
        ip[12..16].copy_from_slice(&dst);
        ip[16..20].copy_from_slice(&src);
        let mut c = u16::from_ne_bytes([ip[10], ip[11]]);
        let old_len = u16::from_ne_bytes([ip[2], ip[3]]);
        let new_len = (40u16).to_be();
        c = replace2(c, old_len, new_len);
        let old_ttl = u16::from_ne_bytes([ip[8], ip[9]]);
        let new_ttl = u16::from_ne_bytes([RST_TTL, ip[9]]);
        c = replace2(c, old_ttl, new_ttl);
        ip[2..4].copy_from_slice(&new_len.to_ne_bytes());
        ip[8] = RST_TTL;
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        *th = new;
    }
    let csum_off = l4 + 16;
    // The header's change, then the pseudo-header's TCP length; the helper knows whether the
    // field holds a full checksum or only the pseudo-header's (CHECKSUM_PARTIAL).
    if ctx
        .l4_csum_replace(csum_off, 0, u64::from(diff), 0)
        .is_err()
        || ctx
            .l4_csum_replace(
                csum_off,
                u64::from(((seg_len as u16).to_be()) as u32),
                u64::from(((20u16).to_be()) as u32),
                u64::from(BPF_F_PSEUDO_HDR) | 2,
            )
            .is_err()
    {
        return crate::exit(Reason::AbortRewrite);
    }
    if (ctx.len() as usize) > RST_LEN && ctx.change_tail(RST_LEN as u32, 0).is_err() {
        return crate::exit(Reason::AbortRewrite);
    }
    // SAFETY: plain helper call with an interface index: out of the interface it came in on.
    let act = unsafe { bpf_redirect(ingress_ifindex(ctx), 0) } as i32;
    (act, Reason::RejectNoBackend)
}
