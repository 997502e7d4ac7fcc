//! IPv6 beside IPv4: the types of the IPv6 service, backend and conntrack maps, and the pure
//! conntrack and hash functions over them.
//!
//! Each family has maps of its own (IPv4's keys stay 8 and 16 bytes, so its per-packet cost does
//! not grow with IPv6's 16-byte addresses). What does not depend on the address is shared: the
//! Maglev rows, the per-service and per-backend counters, the backend route cache and the port
//! filter. Service and backend ids are one id space across both families, so a Maglev row of an
//! IPv6 service holds ids that index [`MAP_BACKENDS6`], and the counters of an id are those of
//! whichever family holds it.
//!
//! Addresses are `[u32; 4]`, each word read natively from the packet's bytes (network byte
//! order, as for IPv4): see [`ipv6_to_wire`].

use crate::{CtEntry, FlowKey, ct};

/// IPv6 service table: [`ServiceKey6`] -> [`crate::ServiceValue`].
pub const MAP_SERVICES6: &str = "SERVICES6";
/// IPv6 backend array: backend id -> [`Backend6`] (ids shared with [`crate::MAP_BACKENDS`]).
pub const MAP_BACKENDS6: &str = "BACKENDS6";
/// IPv6 connection tracking: [`FlowKey6`] -> [`CtEntry6`].
pub const MAP_CONNTRACK6: &str = "CONNTRACK6";
/// IPv6 flows not yet confirmed (see [`crate::MAP_CT_NEW`]).
pub const MAP_CT_NEW6: &str = "CT_NEW6";
/// This host's IPv6 addresses -> 1 (what a wildcard `[::]` service matches).
pub const MAP_LOCAL_ADDRS6: &str = "LOCAL_ADDRS6";
/// Reverse translation for balanced IPv6 sockets: [`SockRevKey6`] -> [`SockRevValue6`]
/// (capacity [`crate::DEFAULT_SOCK_REVNAT_SIZE`]). IPv4-mapped destinations of dual-stack
/// sockets use IPv4's [`crate::MAP_SOCK_REVNAT`].
pub const MAP_SOCK_REVNAT6: &str = "SOCK_REVNAT6";

/// Key of the IPv6 service table. An all-zero `addr` means "any local address of this host".
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable,
)]
pub struct ServiceKey6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);

impl ServiceKey6 {
    pub const fn new(addr: [u32; 4], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// An IPv6 backend slot. An all-zero `addr` marks an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Backend6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    /// Full NAT: the source address new flows to this backend get (with a port of the
    /// configured range, as IPv4's [`crate::Backend::snat_addr`]). All zero: DNAT.
    pub snat_addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Backend6>() == 36);

impl Backend6 {
    /// A backend reached by DNAT.
    pub const fn dnat(addr: [u32; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
            snat_addr: [0; 4],
        }
    }

    /// A backend reached by full NAT from `snat_addr`.
    pub const fn full_nat(addr: [u32; 4], port: u16, snat_addr: [u32; 4]) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
            snat_addr,
        }
    }

    pub const fn is_empty(&self) -> bool {
        is_zero(&self.addr)
    }
}

/// Key of the IPv6 socket reverse-translation map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevKey6 {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    // Scalars rather than `[u16; 3]` (the same bytes), for the reason given at `FlowKey6`.
    pub _pad: u16,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevKey6>() == 32);
const _: () = assert!(core::mem::offset_of!(SockRevKey6, _pad2) == 28);

impl SockRevKey6 {
    pub const fn new(cookie: u64, addr: [u32; 4], port: u16) -> Self {
        Self {
            cookie,
            addr,
            port,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// The IPv6 service address a socket asked for, to show it instead of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevValue6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevValue6>() == 20);

/// `::1` in the in-map representation.
pub const LOOPBACK6: [u32; 4] = ipv6_to_wire([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

/// Word 2 of an IPv4-mapped address (`::ffff:a.b.c.d`): bytes 8..12 are `00 00 ff ff`.
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address (network byte order, as IPv4's maps hold it) of an IPv4-mapped IPv6
/// address, the form a dual-stack socket gives an IPv4 peer.
#[inline(always)]
pub const fn v4_mapped(a: &[u32; 4]) -> Option<u32> {
    if a[0] == 0 && a[1] == 0 && a[2] == MAPPED_WORD {
        Some(a[3])
    } else {
        None
    }
}

/// IPv6 conntrack key: the 5-tuple exactly as it appears in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKey6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Two scalar fields rather than `[u8; 3]` (the same bytes): zeroing an array became a call
    // to a `memset` subprogram in the eBPF build, once per key built (several per packet).
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);
const _: () = assert!(core::mem::offset_of!(FlowKey6, _pad2) == 38);

impl FlowKey6 {
    pub const fn new(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// IPv6 conntrack value: an IPv4 entry whose `nat_addr` and `fnat_addr` are unused, with the
/// 16-byte addresses beside it. Every rule of `ct` that reads an entry (expiry, state, the
/// acknowledgment window, the closing bits, full-NAT port reuse) reads `ct` and so applies to
/// both families unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtEntry6 {
    /// Forward entries: the backend to rewrite the destination to; reply entries: the service
    /// address to rewrite the source back to.
    pub nat_addr: [u32; 4],
    /// Full NAT only ([`ct::CT_F_FULLNAT`] in `ct.flags`; port in `ct.fnat_port`): the forward
    /// entry's new source (berth's address), the reply entry's new destination (the client).
    pub fnat_addr: [u32; 4],
    /// Everything else, as for IPv4 (`ct.nat_addr` and `ct.fnat_addr` are 0).
    pub ct: CtEntry,
}
const _: () = assert!(core::mem::size_of::<CtEntry6>() == 32 + core::mem::size_of::<CtEntry>());
const _: () = assert!(core::mem::size_of::<CtEntry6>().is_multiple_of(8));

/// Converts an IPv6 address's octets to the in-map representation.
#[inline(always)]
pub const fn ipv6_to_wire(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets of an in-map IPv6 address.
#[inline(always)]
pub const fn ipv6_from_wire(a: [u32; 4]) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

#[inline(always)]
pub const fn is_zero(a: &[u32; 4]) -> bool {
    (a[0] | a[1] | a[2] | a[3]) == 0
}

/// Folds an address to 32 bits for the flow hash: every word rotated by a different amount, so
/// clients differing in any bits (the interface identifier above all) hash apart.
#[inline(always)]
const fn fold(a: &[u32; 4]) -> u32 {
    a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24)
}

/// The flow hash of an IPv6 5-tuple: IPv4's [`crate::hash::flow_hash`] over the folded
/// addresses (the Maglev index of a new flow).
#[inline(always)]
pub const fn flow_hash6(key: &FlowKey6, seed: u32) -> u32 {
    crate::hash::flow_hash(
        &FlowKey::new(
            fold(&key.saddr),
            fold(&key.daddr),
            key.sport,
            key.dport,
            key.proto,
        ),
        seed,
    )
}

/// The key of the reply half of the flow whose forward half is `fwd` at `fkey`: backend ->
/// client, or for full NAT backend -> berth's source address and port (IPv4's
/// [`ct::reply_key`]).
#[inline(always)]
pub const fn reply_key6(fkey: &FlowKey6, fwd: &CtEntry6) -> FlowKey6 {
    reply_key6_of(fkey, fwd.nat_addr, fwd.fnat_addr, &fwd.ct)
}

/// [`reply_key6`] from the forward half's addresses given by value (`nat_addr`, `fnat_addr`)
/// and the rest of it (`ct`): a caller that loads them into registers first keeps the eBPF
/// build from copying them out of the map value with a byte-wise `memmove` call.
#[inline(always)]
pub const fn reply_key6_of(
    fkey: &FlowKey6,
    nat_addr: [u32; 4],
    fnat_addr: [u32; 4],
    ct: &CtEntry,
) -> FlowKey6 {
    if ct.full_nat() {
        FlowKey6::new(nat_addr, fnat_addr, ct.nat_port, ct.fnat_port, fkey.proto)
    } else {
        FlowKey6::new(nat_addr, fkey.saddr, ct.nat_port, fkey.sport, fkey.proto)
    }
}

/// The key of the forward half (client -> service) of the flow whose reply half is `rev` at
/// `rkey` (IPv4's [`ct::forward_key`]).
#[inline(always)]
pub const fn forward_key6(rkey: &FlowKey6, rev: &CtEntry6) -> FlowKey6 {
    forward_key6_of(rkey, rev.nat_addr, rev.fnat_addr, &rev.ct)
}

/// [`forward_key6`] from the reply half's addresses given by value (see [`reply_key6_of`]).
#[inline(always)]
pub const fn forward_key6_of(
    rkey: &FlowKey6,
    nat_addr: [u32; 4],
    fnat_addr: [u32; 4],
    ct: &CtEntry,
) -> FlowKey6 {
    if ct.full_nat() {
        FlowKey6::new(fnat_addr, nat_addr, ct.fnat_port, ct.nat_port, rkey.proto)
    } else {
        FlowKey6::new(rkey.daddr, nat_addr, rkey.dport, ct.nat_port, rkey.proto)
    }
}

#[inline(always)]
const fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> u32 {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])
}

/// Key equality as one test (IPv4's `ct::same_key`).
#[inline(always)]
pub const fn same_key(a: &FlowKey6, b: &FlowKey6) -> bool {
    let diff = same_addr(&a.saddr, &b.saddr)
        | same_addr(&a.daddr, &b.daddr)
        | ((a.sport ^ b.sport) as u32)
        | ((a.dport ^ b.dport) as u32)
        | ((a.proto ^ b.proto) as u32);
    diff == 0
}

/// Whether `rev`, found at `rkey`, is the reply half of the flow keyed `fkey`.
#[inline(always)]
pub const fn is_reply_of6(rev: &CtEntry6, rkey: &FlowKey6, fkey: &FlowKey6) -> bool {
    rev.ct.dir == ct::DIR_REPLY && same_key(&forward_key6(rkey, rev), fkey)
}

/// Whether `fwd`, found at `fkey`, is the forward half of the flow whose reply key is `rkey`.
#[inline(always)]
pub const fn is_forward_of6(fwd: &CtEntry6, fkey: &FlowKey6, rkey: &FlowKey6) -> bool {
    fwd.ct.dir == ct::DIR_FORWARD && same_key(&reply_key6(fkey, fwd), rkey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP, Route, port_to_wire};

    fn a(last: u8) -> [u32; 4] {
        let mut o = [0u8; 16];
        o[0] = 0xfd;
        o[15] = last;
        ipv6_to_wire(o)
    }

    fn entry(nat: [u32; 4], port: u16, dir: u8) -> CtEntry6 {
        CtEntry6 {
            nat_addr: nat,
            fnat_addr: [0; 4],
            ct: CtEntry {
                nat_addr: 0,
                nat_port: port_to_wire(port),
                dir,
                state: ct::STATE_OPEN,
                backend_id: 1,
                service_id: 0,
                last_seen_ns: 0,
                route: Route::NONE,
                backend_ack: 0,
                in_ifindex: 0,
                fnat_addr: 0,
                fnat_port: 0,
                flags: 0,
                lazy: 0,
                epoch: 0,
            },
        }
    }

    #[test]
    fn mapped_and_loopback_addresses_read_as_the_socket_gives_them() {
        let v6 = |s: &str| ipv6_to_wire(s.parse::<core::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(
            v4_mapped(&v6("::ffff:10.1.2.3")),
            Some(crate::ipv4_to_wire([10, 1, 2, 3]))
        );
        assert_eq!(
            v4_mapped(&v6("::ffff:127.0.0.1")),
            Some(crate::ipv4_to_wire([127, 0, 0, 1]))
        );
        // IPv4-compatible (deprecated), NAT64 and plain addresses are not IPv4-mapped.
        for s in [
            "::10.1.2.3",
            "64:ff9b::10.1.2.3",
            "::1",
            "::",
            "fd00::ffff:a01:203",
        ] {
            assert_eq!(v4_mapped(&v6(s)), None, "{s}");
        }
        assert_eq!(LOOPBACK6, v6("::1"));
        assert_eq!(
            bytemuck::bytes_of(&SockRevKey6::new(1, a(1), 2)).len(),
            32,
            "no hidden padding"
        );
    }

    #[test]
    fn the_two_halves_find_each_other() {
        let (client, vip, backend) = (a(1), a(2), a(3));
        let fkey = FlowKey6::new(
            client,
            vip,
            port_to_wire(40000),
            port_to_wire(80),
            IPPROTO_TCP,
        );
        let fwd = entry(backend, 8000, ct::DIR_FORWARD);
        let rkey = reply_key6(&fkey, &fwd);
        assert_eq!(
            rkey,
            FlowKey6::new(
                backend,
                client,
                port_to_wire(8000),
                port_to_wire(40000),
                IPPROTO_TCP
            )
        );
        let rev = entry(vip, 80, ct::DIR_REPLY);
        assert_eq!(forward_key6(&rkey, &rev), fkey);
        assert!(is_reply_of6(&rev, &rkey, &fkey));
        assert!(is_forward_of6(&fwd, &fkey, &rkey));
        // Another client's flow, differing only in the last byte of the address.
        let other = FlowKey6::new(a(9), vip, fkey.sport, fkey.dport, IPPROTO_TCP);
        assert!(!is_reply_of6(&rev, &rkey, &other));
        // A reply entry is never a forward one.
        assert!(!is_forward_of6(&rev, &fkey, &rkey));
    }

    /// Full NAT: the reply key is backend -> berth's address and port, and the entries name
    /// the other end (the client in the reply half, berth's source in the forward half).
    #[test]
    fn full_nat_halves_find_each_other() {
        let (client, vip, backend, snat) = (a(1), a(2), a(3), a(4));
        let fkey = FlowKey6::new(
            client,
            vip,
            port_to_wire(40000),
            port_to_wire(80),
            IPPROTO_TCP,
        );
        let mut fwd = entry(backend, 8000, ct::DIR_FORWARD);
        fwd.ct.flags = ct::CT_F_FULLNAT;
        fwd.fnat_addr = snat;
        fwd.ct.fnat_port = port_to_wire(61005);
        let rkey = reply_key6(&fkey, &fwd);
        assert_eq!(
            rkey,
            FlowKey6::new(
                backend,
                snat,
                port_to_wire(8000),
                port_to_wire(61005),
                IPPROTO_TCP
            )
        );
        let mut rev = entry(vip, 80, ct::DIR_REPLY);
        rev.ct.flags = ct::CT_F_FULLNAT;
        rev.fnat_addr = client;
        rev.ct.fnat_port = port_to_wire(40000);
        assert_eq!(forward_key6(&rkey, &rev), fkey);
        assert!(is_reply_of6(&rev, &rkey, &fkey));
        assert!(is_forward_of6(&fwd, &fkey, &rkey));
        // The reply key does not hold the client: the entry must name it.
        let other = FlowKey6::new(a(9), vip, fkey.sport, fkey.dport, IPPROTO_TCP);
        assert!(!is_reply_of6(&rev, &rkey, &other));
        let mut moved = rev;
        moved.ct.fnat_port = port_to_wire(40001);
        assert!(!is_reply_of6(&moved, &rkey, &fkey));
        // A DNAT half never pairs with a full-NAT one.
        let dnat = entry(backend, 8000, ct::DIR_FORWARD);
        assert_ne!(reply_key6(&fkey, &dnat), rkey);
    }

    #[test]
    fn every_address_word_changes_the_hash() {
        let k = FlowKey6::new(a(1), a(2), 1, 2, IPPROTO_TCP);
        let h = flow_hash6(&k, 7);
        assert_ne!(h, flow_hash6(&k, 8));
        for w in 0..4 {
            let mut s = k;
            s.saddr[w] ^= 0x0100_0000;
            assert_ne!(h, flow_hash6(&s, 7), "source word {w}");
            let mut d = k;
            d.daddr[w] ^= 1;
            assert_ne!(h, flow_hash6(&d, 7), "destination word {w}");
        }
    }

    #[test]
    fn wire_round_trip_and_layout() {
        let o: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(ipv6_from_wire(ipv6_to_wire(o)), o);
        let k = FlowKey6::new(ipv6_to_wire(o), a(2), port_to_wire(1), 0, IPPROTO_TCP);
        assert_eq!(&bytemuck::bytes_of(&k)[..16], &o);
        assert!(Backend6::default().is_empty());
        assert!(!Backend6::dnat(a(1), 1).is_empty());
        assert_eq!(Backend6::dnat(a(1), 1).snat_addr, [0; 4]);
        assert_eq!(Backend6::full_nat(a(1), 1, a(5)).snat_addr, a(5));
    }
}
