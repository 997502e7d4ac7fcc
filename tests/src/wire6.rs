//! Building and checking IPv6 test packets: Ethernet + IPv6 (with extension headers) + TCP/UDP,
//! ICMPv6 errors quoting a packet, and NDP neighbour solicitations, with checksums computed from
//! scratch over the IPv6 pseudo-header (RFC 8200 8.1).

use std::net::{Ipv6Addr, SocketAddrV6};

use crate::wire::{ETH_P_IPV6, L4, TCP_ACK, checksum, ethernet};

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const ICMP6_DST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_PORT_UNREACH: u8 = 4;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;

/// The checksum of `segment` (its checksum field zero) over the IPv6 pseudo-header.
pub fn l4_checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut buf = Vec::with_capacity(40 + segment.len());
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.octets());
    buf.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, proto]);
    buf.extend_from_slice(segment);
    checksum(&buf)
}

/// An extension header: its type and its body after the two-byte (next header, length) part,
/// padded by the builder to a multiple of 8 bytes (a fragment header's body is its 6 bytes).
#[derive(Clone, Debug)]
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Ext {
    /// Hop-by-hop or destination options holding `pad` bytes of PadN.
    pub fn options(kind: u8, pad: usize) -> Self {
        let mut body = vec![1, (pad - 2) as u8];
        body.resize(pad, 0);
        Self { kind, body }
    }

    /// A type-0-style routing header with `segments_left`.
    pub fn routing(segments_left: u8) -> Self {
        Self {
            kind: IPPROTO_ROUTING,
            body: vec![4, segments_left, 0, 0, 0, 0],
        }
    }

    /// A fragment header: `offset` in 8-byte units, more-fragments flag.
    pub fn fragment(offset: u16, more: bool) -> Self {
        let fo = (offset << 3) | u16::from(more);
        let mut body = fo.to_be_bytes().to_vec();
        body.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        Self {
            kind: IPPROTO_FRAGMENT,
            body,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        let mut b = vec![next, 0];
        b.extend_from_slice(&self.body);
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        if self.kind != IPPROTO_FRAGMENT {
            b[1] = (b.len() / 8 - 1) as u8;
        }
        b
    }
}

/// An Ethernet + IPv6 + TCP/UDP packet description.
#[derive(Clone, Debug)]
pub struct Ipv6Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub hop_limit: u8,
    pub flow_label: u32,
    pub ext: Vec<Ext>,
    pub l4: L4,
}

impl Ipv6Packet {
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0x0a, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0x0a, 0x01],
            src,
            dst,
            hop_limit: 64,
            flow_label: 0x12345,
            ext: Vec::new(),
            l4: L4::Tcp {
                flags,
                seq: 1000,
                ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
                payload: Vec::new(),
            },
        }
    }

    /// A TCP segment with explicit sequence and acknowledgment numbers and a payload (as
    /// IPv4's `Ipv4Packet::tcp_seq`).
    pub fn tcp_seq(
        src: SocketAddrV6,
        dst: SocketAddrV6,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: &[u8],
    ) -> Self {
        Self {
            l4: L4::Tcp {
                flags,
                seq,
                ack,
                payload: payload.to_vec(),
            },
            ..Self::tcp(src, dst, flags)
        }
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        Self {
            l4: L4::Udp {
                payload: payload.to_vec(),
                zero_csum: false,
            },
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, data: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } => *payload = data.to_vec(),
        }
        self
    }

    pub fn with_ext(mut self, ext: Vec<Ext>) -> Self {
        self.ext = ext;
        self
    }

    /// The IPv6 packet without its Ethernet header.
    pub fn ip(&self) -> Vec<u8> {
        let (proto, mut seg) = match &self.l4 {
            L4::Tcp {
                flags,
                seq,
                ack,
                payload,
            } => {
                let mut t = Vec::with_capacity(20 + payload.len());
                t.extend_from_slice(&self.src.port().to_be_bytes());
                t.extend_from_slice(&self.dst.port().to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push(5 << 4);
                t.push(*flags);
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]);
                t.extend_from_slice(payload);
                (6u8, t)
            }
            L4::Udp { payload, .. } => {
                let mut u = Vec::with_capacity(8 + payload.len());
                u.extend_from_slice(&self.src.port().to_be_bytes());
                u.extend_from_slice(&self.dst.port().to_be_bytes());
                u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u.extend_from_slice(payload);
                (17u8, u)
            }
        };
        let csum = l4_checksum6(self.src.ip(), self.dst.ip(), proto, &seg);
        match &self.l4 {
            L4::Tcp { .. } => seg[16..18].copy_from_slice(&csum.to_be_bytes()),
            L4::Udp {
                zero_csum: true, ..
            } => {}
            L4::Udp { .. } => {
                let c = if csum == 0 { 0xffff } else { csum };
                seg[6..8].copy_from_slice(&c.to_be_bytes());
            }
        }
        let mut chain = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(proto, |n| n.kind);
            chain.extend_from_slice(&e.bytes(next));
        }
        let first = self.ext.first().map_or(proto, |e| e.kind);
        let mut ip = header(
            self.src.ip(),
            self.dst.ip(),
            first,
            self.hop_limit,
            self.flow_label,
            chain.len() + seg.len(),
        );
        ip.extend_from_slice(&chain);
        ip.extend_from_slice(&seg);
        ip
    }

    pub fn build(&self) -> Vec<u8> {
        let mut pkt = ethernet(self.dst_mac, self.src_mac, ETH_P_IPV6);
        pkt.extend_from_slice(&self.ip());
        pkt
    }
}

fn header(
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    next: u8,
    hop_limit: u8,
    flow_label: u32,
    payload_len: usize,
) -> Vec<u8> {
    let mut ip = Vec::with_capacity(40);
    ip.extend_from_slice(&((6u32 << 28) | (flow_label & 0xfffff)).to_be_bytes());
    ip.extend_from_slice(&(payload_len as u16).to_be_bytes());
    ip.push(next);
    ip.push(hop_limit);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip
}

/// An ICMPv6 error from `src` to `dst` quoting (the start of) the IPv6 packet `quoted`;
/// `param` is the 4-byte field after the checksum (the MTU of Packet Too Big).
pub fn icmp6_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    param: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&param.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = l4_checksum6(&src, &dst, IPPROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut pkt = ethernet(
        [0x02, 0, 0, 0, 0x0a, 0x01],
        [0x02, 0, 0, 0, 0x0a, 0x02],
        ETH_P_IPV6,
    );
    pkt.extend_from_slice(&header(&src, &dst, IPPROTO_ICMPV6, 64, 0, m.len()));
    pkt.extend_from_slice(&m);
    pkt
}

/// An NDP neighbour solicitation from `src` for `target` (to its solicited-node address).
pub fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut m = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&t);
    m.extend_from_slice(&[1, 1, 0x02, 0, 0, 0, 0x0a, 0x02]); // source link-layer address
    let c = l4_checksum6(&src, &dst, IPPROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut pkt = ethernet(
        [0x33, 0x33, 0xff, t[13], t[14], t[15]],
        [0x02, 0, 0, 0, 0x0a, 0x02],
        ETH_P_IPV6,
    );
    pkt.extend_from_slice(&header(&src, &dst, IPPROTO_ICMPV6, 255, 0, m.len()));
    pkt.extend_from_slice(&m);
    pkt
}

/// What a test checks of an IPv6 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub proto: u8,
    pub hop_limit: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Offset of the L4 header in the IPv6 packet (after the extension headers).
    pub l4_off: usize,
}

/// Walks the extension headers of an IPv6 packet (no Ethernet): (L4 protocol, L4 offset).
fn walk(ip: &[u8]) -> (u8, usize) {
    let mut next = ip[6];
    let mut off = 40;
    while matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
    ) {
        let len = if next == IPPROTO_FRAGMENT {
            8
        } else {
            (usize::from(ip[off + 1]) + 1) * 8
        };
        next = ip[off];
        off += len;
    }
    (next, off)
}

pub fn parse6(p: &[u8]) -> Parsed6 {
    assert!(p.len() >= 54, "frame too short: {}", p.len());
    assert_eq!(u16::from_be_bytes([p[12], p[13]]), ETH_P_IPV6, "not IPv6");
    let ip = &p[14..];
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16"));
    let (proto, off) = walk(ip);
    let l4 = &ip[off..40 + plen];
    let (sport, dport) = if proto == 6 || proto == 17 {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    } else {
        (0, 0)
    };
    let (tcp_flags, payload) = match proto {
        6 => (l4[13], l4[usize::from(l4[12] >> 4) * 4..].to_vec()),
        17 => (0, l4[8..].to_vec()),
        _ => (0, l4.to_vec()),
    };
    Parsed6 {
        dst_mac: p[0..6].try_into().expect("6"),
        src_mac: p[6..12].try_into().expect("6"),
        src: SocketAddrV6::new(src, sport, 0, 0),
        dst: SocketAddrV6::new(dst, dport, 0, 0),
        proto,
        hop_limit: ip[7],
        tcp_flags,
        payload,
        l4_off: off,
    }
}

/// Recomputes the TCP, UDP or ICMPv6 checksum of a frame from scratch over the pseudo-header
/// and compares it with the packet's; for an ICMPv6 error, also the quoted packet's L4
/// checksum when the quote holds the whole segment.
pub fn verify_checksums6(p: &[u8]) -> Result<(), String> {
    if p.len() < 54 {
        return Err(format!("frame too short ({} bytes)", p.len()));
    }
    let ip = &p[14..];
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if 40 + plen > ip.len() {
        return Err(format!("payload length {plen} past the frame"));
    }
    check_l4(&ip[..40 + plen])
}

fn check_l4(ip: &[u8]) -> Result<(), String> {
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16"));
    let (proto, off) = walk(ip);
    let mut seg = ip[off..].to_vec();
    let at = match proto {
        6 => 16,
        17 => 6,
        58 => 2,
        _ => return Ok(()),
    };
    let got = u16::from_be_bytes([seg[at], seg[at + 1]]);
    seg[at] = 0;
    seg[at + 1] = 0;
    let mut want = l4_checksum6(&src, &dst, proto, &seg);
    if proto == 17 && want == 0 {
        want = 0xffff;
    }
    if got != want {
        return Err(format!(
            "L4 (proto {proto}) checksum {got:#06x}, computed {want:#06x}"
        ));
    }
    Ok(())
}

/// The quoted packet of an ICMPv6 error frame (IPv6 header on).
pub fn quoted(p: &[u8]) -> &[u8] {
    &p[14 + 40 + 8..]
}

/// Checks the quoted packet's own L4 checksum (the quote must hold the whole segment).
pub fn verify_quoted_checksum(p: &[u8]) -> Result<(), String> {
    let q = quoted(p);
    let plen = usize::from(u16::from_be_bytes([q[4], q[5]]));
    if 40 + plen > q.len() {
        return Err("quote truncated".into());
    }
    check_l4(&q[..40 + plen])
}
