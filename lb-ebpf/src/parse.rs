//! Bounds-checked header access and the parse of an Ethernet/IPv4/TCP-or-UDP packet, or of an
//! ICMP error quoting one, into the fields the dataplane needs.

use aya_ebpf::programs::TcContext;
use lb_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP, Reason};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
/// Largest header stack we look at: an ICMP error, with options in both IPv4 headers, quoting
/// a TCP base header (Ethernet + IPv4 + ICMP + IPv4 + TCP).
const MAX_HDRS: usize = ETH_HLEN + 60 + 8 + 60 + 20;

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
    pub ttl: u8,
    /// TCP sequence and acknowledgment numbers, host byte order (0 for UDP).
    pub seq: u32,
    pub ack: u32,
    /// IPv4 total length, host byte order.
    pub tot_len: u16,
    /// The skb's `ip_summed` (see `nat::ip_summed`), read by `process` once the packet may be
    /// translated (0 until then).
    pub summed: u8,
    /// Offset of the L4 header from the start of the frame (read it with [`Flow::l4`]).
    pub l4_off: usize,
}

impl Flow {
    /// The L4 header's offset, bounded for the verifier: a `Flow` lives in a map slot (the
    /// per-CPU scratch), and a value read back from a map has no known range. It is at most
    /// 14 + 60, so the mask changes nothing.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4_off & 0x7f
    }
}

/// Where an ICMP error (destination unreachable, time exceeded, parameter problem) quotes a TCP
/// or UDP packet, and that packet's tuple. (The outer packet is parsed into a [`Flow`] with
/// ports 0, for routing and the TTL.)
pub struct IcmpQuote {
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offsets of the quoted IPv4 header and of its L4 header.
    pub inner_off: usize,
    pub inner_l4_off: usize,
    /// The quoted packet's 5-tuple, as in the packet.
    pub inner: FlowKey,
}

impl IcmpQuote {
    /// The ICMP, quoted IPv4 and quoted L4 offsets, bounded for the verifier (see [`Flow::l4`]):
    /// at most 74, 82 and 142.
    #[inline(always)]
    pub fn offsets(&self) -> (usize, usize, usize) {
        (
            self.icmp_off & 0x7f,
            self.inner_off & 0x7f,
            self.inner_l4_off & 0xff,
        )
    }
}

/// Outcome of parsing: a flow to balance (in the [`Flow`] given to [`parse`]), an ICMP error to
/// match (the outer packet in the `Flow`, the quote in the [`IcmpQuote`]), or the exit the
/// packet takes right away.
pub enum Parsed {
    Flow,
    IcmpError,
    /// An IPv6 frame: the `v6` module's path takes it from here.
    Ipv6,
    Exit(Reason),
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Makes the first `need` bytes of the packet (or all of it, if shorter) linear where the skb
/// keeps some of them in fragments. Only what the headers need: pulling payload bytes into the
/// head of a locally sent segment, whose head has no room after its headers, reallocates and
/// copies the head (`pskb_expand_head`: ~20% of berth's samples in a profile of the load
/// benchmark). A failure leaves the skb as it was; the bounds checks after decide.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext, need: usize) {
    let len = ctx.len() as usize;
    let linear = ctx.data_end() - ctx.data();
    if linear < need && len > linear {
        let want = if len < need { len } else { need };
        let _ = ctx.pull_data(want as u32);
    }
}

/// The deepest header stack any path reads, made linear (an ICMP error's quote, a refusal).
#[inline(always)]
pub fn pull_all_headers(ctx: &TcContext) {
    pull_headers(ctx, MAX_HDRS);
}

/// Parses the packet into `out` (and `quote` for an ICMP error). Makes the header bytes it
/// reads linear first if the skb keeps them in fragments (see [`pull_headers`]).
#[inline(always)]
pub fn parse(ctx: &TcContext, out: &mut Flow, quote: &mut IcmpQuote) -> Parsed {
    let len = ctx.len() as usize;
    pull_headers(ctx, ETH_HLEN + 20);

    let Some(proto_ptr) = ptr_at::<u16>(ctx, 12) else {
        return Parsed::Exit(Reason::DropEthTruncated);
    };
    // SAFETY: `ptr_at` checked the two bytes lie inside the packet.
    let eth_proto = u16::from_be(unsafe { proto_ptr.read_unaligned() });
    if eth_proto == ETH_P_IPV6 {
        return Parsed::Ipv6;
    }
    if eth_proto != ETH_P_IP {
        return Parsed::Exit(Reason::PassNotIp);
    }
    // Then the IPv4 header with its options and the L4 header (TCP's 20 bytes, UDP's 8), or
    // for ICMP the whole stack an error's quote may need.
    if let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) {
        // SAFETY: `ptr_at` checked the 20 bytes lie inside the packet.
        let (vihl, proto) = unsafe { ((*ip)[0], (*ip)[9]) };
        let l4 = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
        let need = match proto {
            IPPROTO_TCP => l4 + 20,
            IPPROTO_UDP => l4 + 8,
            IPPROTO_ICMP => MAX_HDRS,
            // Not ours (`PassNotTcpUdp` below): nothing to pull.
            _ => 0,
        };
        pull_headers(ctx, need);
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
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    }
    // More-fragments set or a non-zero offset: any fragment.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Parsed::Exit(Reason::PassFragment);
    }
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let tos = ip[1];
    let ttl = ip[8];

    let l4_off = ETH_HLEN + ihl;
    let l4_room = tot_len as usize - ihl;
    if proto == IPPROTO_ICMP {
        *out = Flow {
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto,
            tos,
            tcp_flags: 0,
            ttl,
            seq: 0,
            ack: 0,
            tot_len,
            summed: 0,
            l4_off,
        };
        return parse_icmp_error(ctx, out, quote, l4_room);
    }
    let (sport, dport, tcp_flags, seq, ack) = if proto == IPPROTO_TCP {
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
            u32::from_be_bytes([th[4], th[5], th[6], th[7]]),
            u32::from_be_bytes([th[8], th[9], th[10], th[11]]),
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
            0,
            0,
        )
    };

    *out = Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tos,
        tcp_flags,
        ttl,
        seq,
        ack,
        tot_len,
        summed: 0,
        l4_off,
    };
    Parsed::Flow
}

/// The TCP data length of the parsed IPv4 segment `flow` (total length less both headers),
/// reading the header length from the packet again: only FINs need it (see `ct::seq_end`), so
/// the parse of every packet does not carry it. None if the header is not there.
#[inline(always)]
pub fn tcp_data_len(ctx: &TcContext, flow: &Flow) -> Option<u32> {
    let l4 = flow.l4();
    let doff = ptr_at::<u8>(ctx, l4 + 12)?;
    // SAFETY: `ptr_at` checked the byte lies inside the packet.
    let hdrs = (l4 - ETH_HLEN) as u32 + u32::from(unsafe { *doff } >> 4) * 4;
    u32::from(flow.tot_len).checked_sub(hdrs)
}

/// An ICMP error quoting the start of a TCP or UDP packet (its IPv4 header and at least the 8
/// bytes holding the ports, RFC 792); any other ICMP message is not ours. A truncated or
/// inconsistent quote is not ours either: the stack judges it as it would without berth.
#[inline(always)]
fn parse_icmp_error(
    ctx: &TcContext,
    outer: &Flow,
    quote: &mut IcmpQuote,
    l4_room: usize,
) -> Parsed {
    let icmp_off = outer.l4_off;
    let Some(h) = ptr_at::<[u8; 8]>(ctx, icmp_off) else {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    };
    // SAFETY: the 8-byte ICMP header is inside the packet (checked by `ptr_at`).
    let icmp_type = unsafe { (*h)[0] };
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETERPROB
    {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    }
    let inner_off = icmp_off + 8;
    let Some(ip) = ptr_at::<[u8; 20]>(ctx, inner_off) else {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    };
    // SAFETY: the quoted 20-byte IPv4 base header is inside the packet.
    let ip = unsafe { &*ip };
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let proto = ip[9];
    if ip[0] >> 4 != 4
        || ihl < 20
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0
        || 8 + ihl + 8 > l4_room
    {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    }
    let inner_l4_off = inner_off + ihl;
    let Some(l4) = ptr_at::<[u8; 8]>(ctx, inner_l4_off) else {
        return Parsed::Exit(Reason::PassNotTcpUdp);
    };
    // SAFETY: the quoted 8 bytes of L4 header are inside the packet.
    let l4 = unsafe { &*l4 };
    let inner = FlowKey::new(
        u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        u16::from_ne_bytes([l4[0], l4[1]]),
        u16::from_ne_bytes([l4[2], l4[3]]),
        proto,
    );
    *quote = IcmpQuote {
        icmp_off,
        inner_off,
        inner_l4_off,
        inner,
    };
    Parsed::IcmpError
}
