//! Bounds-checked header access and the parse of an Ethernet/IPv4/TCP-or-UDP packet into the
//! fields the dataplane needs.

use aya_ebpf::programs::TcContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Reason};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Largest header stack we look at: Ethernet + IPv4 with 40 bytes of options + TCP base header.
const MAX_HDRS: usize = ETH_HLEN + 60 + 20;

/// A pointer to a `T` at `off` bytes into the packet, or `None` if it would run past the end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Everything about a TCP/UDP-over-IPv4 packet the rest of the program needs. Addresses and
/// ports are in network byte order (raw from the packet).
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tos: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 total length, host byte order.
    pub tot_len: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
}

/// Outcome of parsing: a flow to balance, or the exit the packet takes right away.
pub enum Parsed {
    Flow(Flow),
    Exit(Reason),
}

/// Parses the packet. Makes the header bytes linear first if the skb keeps them in fragments.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let len = ctx.len() as usize;
    let linear = ctx.data_end() - ctx.data();
    if linear < MAX_HDRS && len > linear {
        let want = if len < MAX_HDRS { len } else { MAX_HDRS };
        // A failure leaves the skb as it was; the bounds checks below then decide.
        let _ = ctx.pull_data(want as u32);
    }

    let Some(proto_ptr) = ptr_at::<u16>(ctx, 12) else {
        return Parsed::Exit(Reason::DropEthTruncated);
    };
    // SAFETY: `ptr_at` checked the two bytes lie inside the packet.
    let eth_proto = u16::from_be(unsafe { proto_ptr.read_unaligned() });
    if eth_proto == ETH_P_IPV6 {
        return Parsed::Exit(Reason::PassIpv6);
    }
    if eth_proto != ETH_P_IP {
        return Parsed::Exit(Reason::PassNotIp);
    }

    let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else {
        return Parsed::Exit(Reason::DropIpMalformed);
    };
    // SAFETY: the 20-byte base header is inside the packet (checked by `ptr_at`).
    let ip = unsafe { &*ip };
    let version = ip[0] >> 4;
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    if version != 4 || ihl < 20 || (tot_len as usize) < ihl || ETH_HLEN + tot_len as usize > len {
        return Parsed::Exit(Reason::DropIpMalformed);
    }
    if ihl > 20 {
        crate::maps::count(Reason::EventIpOptions);
    }
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    }
    // More-fragments set or a non-zero offset: any fragment.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Parsed::Exit(Reason::PassFragment);
    }
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let tos = ip[1];

    let l4_off = ETH_HLEN + ihl;
    let l4_room = tot_len as usize - ihl;
    let (sport, dport, tcp_flags) = if proto == IPPROTO_TCP {
        let Some(th) = ptr_at::<[u8; 20]>(ctx, l4_off) else {
            return Parsed::Exit(Reason::DropL4Malformed);
        };
        // SAFETY: 20 bytes at `l4_off` are inside the packet (checked by `ptr_at`).
        let th = unsafe { &*th };
        let doff = (th[12] >> 4) as usize * 4;
        if doff < 20 || doff > l4_room {
            return Parsed::Exit(Reason::DropL4Malformed);
        }
        (
            u16::from_ne_bytes([th[0], th[1]]),
            u16::from_ne_bytes([th[2], th[3]]),
            th[13],
        )
    } else {
        let Some(uh) = ptr_at::<[u8; 8]>(ctx, l4_off) else {
            return Parsed::Exit(Reason::DropL4Malformed);
        };
        // SAFETY: 8 bytes at `l4_off` are inside the packet (checked by `ptr_at`).
        let uh = unsafe { &*uh };
        let ulen = u16::from_be_bytes([uh[4], uh[5]]) as usize;
        if ulen < 8 || ulen > l4_room {
            return Parsed::Exit(Reason::DropL4Malformed);
        }
        (
            u16::from_ne_bytes([uh[0], uh[1]]),
            u16::from_ne_bytes([uh[2], uh[3]]),
            0,
        )
    };

    Parsed::Flow(Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tos,
        tcp_flags,
        tot_len,
        l4_off,
    })
}
