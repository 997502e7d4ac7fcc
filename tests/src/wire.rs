//! Building test packets and checking packets the program wrote: Ethernet, IPv4 (with options and
//! fragments), TCP, UDP, IPv6 and ARP, with checksums computed from scratch (RFC 791/768/793).

use std::net::{Ipv4Addr, SocketAddrV4};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub use lb_common::ct::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
pub const TCP_PSH: u8 = 0x08;

/// The one's-complement sum of 16-bit big-endian words (odd length padded with zero).
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        acc += u32::from(u16::from_be_bytes(*w));
    }
    if let [last] = rest {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (whose checksum field must be 0).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum16(&src.octets(), 0);
    acc = sum16(&dst.octets(), acc);
    acc += u32::from(proto);
    acc += segment.len() as u32;
    fold(sum16(segment, acc))
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        flags: u8,
        seq: u32,
        ack: u32,
        payload: Vec<u8>,
    },
    /// `zero_csum`: send with checksum 0 ("no checksum", legal for UDP over IPv4).
    Udp { payload: Vec<u8>, zero_csum: bool },
}

/// An Ethernet + IPv4 + TCP/UDP packet description.
#[derive(Clone, Debug)]
pub struct Ipv4Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset, as the 16-bit header field (e.g. 0x4000 = DF, 0x2000 = MF).
    pub frag: u16,
    /// IP options, padded to a multiple of 4 bytes by the builder.
    pub options: Vec<u8>,
    /// TCP options (ignored for UDP), padded to a multiple of 4 bytes by the builder.
    pub tcp_options: Vec<u8>,
    pub l4: L4,
}

impl Ipv4Packet {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0x0a, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0x0a, 0x01],
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            options: Vec::new(),
            tcp_options: Vec::new(),
            l4: L4::Tcp {
                flags,
                seq: 1000,
                ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
                payload: Vec::new(),
            },
        }
    }

    /// A TCP segment with explicit sequence and acknowledgment numbers and `payload`.
    pub fn tcp_seq(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: &[u8],
    ) -> Self {
        let mut p = Self::tcp(src, dst, flags);
        p.l4 = L4::Tcp {
            flags,
            seq,
            ack,
            payload: payload.to_vec(),
        };
        p
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            l4: L4::Udp {
                payload: payload.to_vec(),
                zero_csum: false,
            },
            frag: 0,
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, data: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } => *payload = data.to_vec(),
        }
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0); // end-of-options padding
        }
        let ihl = 20 + opts.len();
        let (proto, mut seg) = match &self.l4 {
            L4::Tcp {
                flags,
                seq,
                ack,
                payload,
            } => {
                let mut topts = self.tcp_options.clone();
                while !topts.len().is_multiple_of(4) {
                    topts.push(0); // end-of-options padding
                }
                let mut t = Vec::with_capacity(20 + topts.len() + payload.len());
                t.extend_from_slice(&self.src.port().to_be_bytes());
                t.extend_from_slice(&self.dst.port().to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push((((20 + topts.len()) / 4) << 4) as u8);
                t.push(*flags);
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                t.extend_from_slice(&topts);
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
        let csum = l4_checksum(*self.src.ip(), *self.dst.ip(), proto, &seg);
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

        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + seg.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&opts);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut pkt = ethernet(self.dst_mac, self.src_mac, ETH_P_IP);
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&seg);
        pkt
    }
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&src);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v
}

/// An IPv6 + TCP SYN frame (checksum not meaningful: the program must not touch it).
pub fn ipv6_tcp(dport: u16) -> Vec<u8> {
    let mut p = ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], ETH_P_IPV6);
    p.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[
        0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p
}

/// ICMP error types berth translates.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Destination unreachable codes.
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// An Ethernet + IPv4 + ICMP error frame from `src` to `dst` quoting `offending` (a frame as
/// [`Ipv4Packet::build`] makes it; its IP header and the first `quote` bytes after it are quoted,
/// as RFC 792 asks at the least; Linux quotes more). `rest` is the ICMP header's second word
/// (the next-hop MTU for "fragmentation needed").
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
    offending: &[u8],
    quote: usize,
) -> Vec<u8> {
    let inner = &offending[14..];
    let ihl = usize::from(inner[0] & 0xf) * 4;
    let quoted = &inner[..(ihl + quote).min(inner.len())];
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = ethernet(
        [0x02, 0, 0, 0, 0x0a, 0x01],
        [0x02, 0, 0, 0, 0x0a, 0x02],
        ETH_P_IP,
    );
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&icmp);
    pkt
}

/// The fields of an ICMP error frame and of the packet it quotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpError {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub icmp_type: u8,
    pub code: u8,
    pub rest: u32,
    /// The quoted packet's addresses and ports.
    pub inner_src: SocketAddrV4,
    pub inner_dst: SocketAddrV4,
    pub inner_proto: u8,
    /// The quoted L4 checksum field, if quoted.
    pub inner_l4_csum: Option<u16>,
}

/// Parses an ICMP error frame (panics with a message on anything else).
pub fn parse_icmp_error(p: &[u8]) -> IcmpError {
    assert_eq!(u16::from_be_bytes([p[12], p[13]]), ETH_P_IP, "not IPv4");
    let ip = &p[14..];
    assert_eq!(ip[9], 1, "not ICMP");
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let icmp = &ip[ihl..];
    let inner = &icmp[8..];
    let iihl = usize::from(inner[0] & 0xf) * 4;
    let l4 = &inner[iihl..];
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let inner_proto = inner[9];
    let csum_off = if inner_proto == 6 { 16 } else { 6 };
    IcmpError {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        icmp_type: icmp[0],
        code: icmp[1],
        rest: u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        inner_src: SocketAddrV4::new(
            Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
            port(0),
        ),
        inner_dst: SocketAddrV4::new(
            Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
            port(2),
        ),
        inner_proto,
        inner_l4_csum: (l4.len() >= csum_off + 2).then(|| port(csum_off)),
    }
}

/// The ICMP checksum of a message, and for an error quoting a whole IPv4 header, that header's.
fn verify_icmp(icmp: &[u8]) -> Result<(), String> {
    if icmp.len() < 8 {
        return Err(format!("ICMP message of {} bytes", icmp.len()));
    }
    if checksum(icmp) != 0 {
        return Err("ICMP checksum".into());
    }
    if matches!(icmp[0], 3 | 11 | 12) && icmp.len() >= 8 + 20 {
        let inner = &icmp[8..];
        let iihl = usize::from(inner[0] & 0xf) * 4;
        if inner[0] >> 4 == 4 && iihl >= 20 && inner.len() >= iihl && checksum(&inner[..iihl]) != 0
        {
            return Err("quoted IPv4 header checksum".into());
        }
    }
    Ok(())
}

/// Checks an ICMP error frame's checksums from scratch: the outer IPv4 header, the ICMP message,
/// and the quoted IPv4 header. (The quoted L4 checksum covers data that was not quoted, so it
/// cannot be recomputed; [`icmp_inner_l4_consistent`] checks it against the original instead.)
pub fn verify_icmp_checksums(p: &[u8]) -> Result<(), String> {
    let ip = &p[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if checksum(&ip[..ihl]) != 0 {
        return Err("outer IPv4 header checksum".into());
    }
    let icmp = &ip[ihl..tot];
    if checksum(icmp) != 0 {
        return Err("ICMP checksum".into());
    }
    let inner = &icmp[8..];
    let iihl = usize::from(inner[0] & 0xf) * 4;
    if checksum(&inner[..iihl]) != 0 {
        return Err("quoted IPv4 header checksum".into());
    }
    Ok(())
}

/// Whether the quoted L4 checksum of `after` is what a full recomputation would give for the
/// quoted packet of `before` with the addresses and ports of `after` (checksums are linear, so
/// the difference of the two pseudo-headers and port fields must be all that changed).
pub fn icmp_inner_l4_consistent(before: &[u8], after: &[u8]) -> bool {
    let (b, a) = (parse_icmp_error(before), parse_icmp_error(after));
    let (Some(cb), Some(ca)) = (b.inner_l4_csum, a.inner_l4_csum) else {
        return b.inner_l4_csum == a.inner_l4_csum;
    };
    let words = |x: &IcmpError| {
        let mut v = Vec::new();
        v.extend_from_slice(&x.inner_src.ip().octets());
        v.extend_from_slice(&x.inner_dst.ip().octets());
        v.extend_from_slice(&x.inner_src.port().to_be_bytes());
        v.extend_from_slice(&x.inner_dst.port().to_be_bytes());
        v
    };
    // The field holds the complement of the sum S it covers; only these fields changed, so
    // S_after = S_before - before + after, i.e. ~ca + before == ~cb + after (one's complement).
    let lhs = sum16(&words(&b), u32::from(!ca));
    let rhs = sum16(&words(&a), u32::from(!cb));
    fold(lhs) == fold(rhs)
}

/// An ARP request for `target`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = ethernet([0xff; 6], [2, 0, 0, 0, 0, 2], ETH_P_ARP);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    p
}

/// The fields of an Ethernet/IPv4/TCP-or-UDP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ttl: u8,
    pub ihl: usize,
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers (0 for UDP).
    pub seq: u32,
    pub ack: u32,
    pub l4_csum: u16,
    pub payload: Vec<u8>,
}

/// Parses a frame the program produced (panics with a message on anything malformed).
pub fn parse(p: &[u8]) -> Parsed {
    assert!(p.len() >= 34, "frame too short: {}", p.len());
    assert_eq!(u16::from_be_bytes([p[12], p[13]]), ETH_P_IP, "not IPv4");
    let ip = &p[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..tot];
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let (tcp_flags, l4_csum, payload) = if proto == 6 {
        let doff = usize::from(l4[12] >> 4) * 4;
        (
            l4[13],
            u16::from_be_bytes([l4[16], l4[17]]),
            l4[doff..].to_vec(),
        )
    } else {
        (0, u16::from_be_bytes([l4[6], l4[7]]), l4[8..].to_vec())
    };
    let (seq, ack) = if proto == 6 {
        (
            u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
            u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
        )
    } else {
        (0, 0)
    };
    Parsed {
        dst_mac: p[0..6].try_into().expect("6"),
        src_mac: p[6..12].try_into().expect("6"),
        src: SocketAddrV4::new(src_ip, sport),
        dst: SocketAddrV4::new(dst_ip, dport),
        proto,
        ttl: ip[8],
        ihl,
        tcp_flags,
        seq,
        ack,
        l4_csum,
        payload,
    }
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum of a frame from scratch and
/// compares them with the packet's. A UDP checksum of 0 means "none" and is accepted.
pub fn verify_checksums(p: &[u8]) -> Result<(), String> {
    if p.len() < 34 {
        return Err(format!("frame too short ({} bytes)", p.len()));
    }
    let ip = &p[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || tot < ihl || tot > ip.len() {
        return Err(format!(
            "bad IPv4 lengths ihl={ihl} tot={tot} have={}",
            ip.len()
        ));
    }
    let mut hdr = ip[..ihl].to_vec();
    let got = u16::from_be_bytes([hdr[10], hdr[11]]);
    hdr[10] = 0;
    hdr[11] = 0;
    let want = checksum(&hdr);
    if got != want {
        return Err(format!(
            "IPv4 header checksum {got:#06x}, computed {want:#06x}"
        ));
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let mut seg = ip[ihl..tot].to_vec();
    let off = match proto {
        6 => 16,
        17 => 6,
        1 => return verify_icmp(&seg),
        _ => return Ok(()),
    };
    let got = u16::from_be_bytes([seg[off], seg[off + 1]]);
    if proto == 17 && got == 0 {
        return Ok(());
    }
    seg[off] = 0;
    seg[off + 1] = 0;
    let mut want = l4_checksum(src, dst, proto, &seg);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 -> sum ddf2, checksum 220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }

    #[test]
    fn known_ipv4_header() {
        // A widely used worked example: 4500 0073 0000 4000 4011 [b861] c0a8 0001 c0a8 00c7.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn quoted_l4_checksum_consistency_is_checked() {
        let c: SocketAddrV4 = "10.0.0.1:1234".parse().unwrap();
        let svc: SocketAddrV4 = "10.9.9.9:80".parse().unwrap();
        let be: SocketAddrV4 = "10.2.2.2:8000".parse().unwrap();
        for (x, y) in [
            (
                Ipv4Packet::udp(c, svc, b"q").build(),
                Ipv4Packet::udp(c, be, b"q").build(),
            ),
            (
                Ipv4Packet::tcp(c, svc, TCP_ACK).with_payload(b"x").build(),
                Ipv4Packet::tcp(c, be, TCP_ACK).with_payload(b"x").build(),
            ),
        ] {
            let r: Ipv4Addr = "10.0.0.254".parse().unwrap();
            let qx = icmp_error(r, *c.ip(), 3, 3, 0, &x, 64);
            let qy = icmp_error(r, *c.ip(), 3, 3, 0, &y, 64);
            verify_icmp_checksums(&qx).unwrap();
            assert!(icmp_inner_l4_consistent(&qx, &qy));
            let mut bad = qy.clone();
            let n = bad.len();
            // The quoted L4 checksum sits 8 bytes before the quote's end only for UDP; flip a
            // port byte instead (covered by the check, not by the ICMP checksum test here).
            bad[14 + 20 + 8 + 20] ^= 1;
            assert!(!icmp_inner_l4_consistent(&qx, &bad), "{n}");
        }
    }

    #[test]
    fn built_packets_verify_and_corruption_is_caught() {
        let a: SocketAddrV4 = "10.0.0.1:1234".parse().unwrap();
        let b: SocketAddrV4 = "10.0.0.2:80".parse().unwrap();
        for p in [
            Ipv4Packet::tcp(a, b, TCP_SYN).with_payload(b"abc").build(),
            Ipv4Packet::udp(a, b, b"hello").build(),
            {
                let mut t = Ipv4Packet::tcp(a, b, TCP_ACK);
                t.options = vec![1, 1, 1, 0];
                t.build()
            },
        ] {
            verify_checksums(&p).unwrap();
            for i in [14 + 15, 14 + 19, p.len() - 1] {
                let mut bad = p.clone();
                bad[i] ^= 0x40;
                assert!(verify_checksums(&bad).is_err(), "flip at {i} not detected");
            }
        }
        let parsed = parse(&Ipv4Packet::udp(a, b, b"x").build());
        assert_eq!(
            (parsed.src, parsed.dst, parsed.payload),
            (a, b, b"x".to_vec())
        );
    }
}
