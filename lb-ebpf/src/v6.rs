//! The IPv6 path of the TC program: the same balancing as IPv4's (conntrack pair, CT_NEW for
//! unconfirmed flows, Maglev, drain, the acknowledgment window), over maps of its own
//! (lb-common's `v6` module) so that IPv4's keys and per-packet cost stay as they are.
//!
//! Differences from IPv4, all from the protocol: there is no header checksum (only the L4 one,
//! whose pseudo-header holds the addresses, is updated), the hop limit is decremented like the
//! TTL, extension headers are walked (hop-by-hop, routing, destination options, fragment) within
//! [`MAX_EXT`] headers and the first [`MAX_L4_OFF`] bytes, ICMPv6 errors (destination
//! unreachable, Packet Too Big, time exceeded, parameter problem) quoting a balanced flow are
//! translated like the flow, and every other ICMPv6 message (NDP above all) passes untouched.
//! Full NAT works as IPv4's (lb-common's `ct` rules, source ports from the same tries taken
//! with `BPF_NOEXIST` on the reply half): a backend slot with a source address
//! (`Backend6::snat_addr`) gets its new flows from that address and a port of the configured
//! range.
//!
//! Policy for what is not walked, as for IPv4 options and fragments: a fragment (a fragment
//! header with an offset or more-fragments set) passes untouched (`pass_fragment`); a routing
//! header with segments left (the packet is not at its final destination), more extension
//! headers than the bound, or a zero payload length (jumbogram, BIG TCP) passes untouched
//! (`pass_ipv6`); a truncated header chain is dropped (`drop_ip_malformed`).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_F_IPV6, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use lb_common::{
    CFG_F_DROP_NO_BACKEND, CFG_F_KEEP_TTL, CFG_F_REDIRECT, DEFAULT_CONNTRACK_SIZE,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DpConfig, IPPROTO_TCP, IPPROTO_UDP, Reason, Route,
    SVC_F_EMPTY, ServiceValue,
    csum::{add, apply, diff2, diff16, replace2},
    ct::{self, CT_F_FULLNAT, DIR_FORWARD, DIR_REPLY, STATE_CLOSING, STATE_OPEN},
    port_flag, summed,
    v6::{
        Backend6, CtEntry6, FlowKey6, ServiceKey6, flow_hash6, forward_key6, is_forward_of6,
        is_reply_of6, is_zero, reply_key6, same_key,
    },
};

use crate::{
    CONFIRM, args, config, enters_time_wait, exit, last_ack,
    maps::{BACKEND_ROUTES, account, count},
    nat::{clear_route, ingress_ifindex, l4_update, set_addr, set_route, zero_addr},
    pack,
    parse::{ETH_HLEN, ptr_at, pull_headers},
    port_flags, raw, track_fin, ttl_expires, unpack,
};

#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend id -> IPv6 backend (ids shared with `BACKENDS`; see lb-common's `v6`).
#[map]
pub static BACKENDS6: Array<Backend6> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static CONNTRACK6: LruHashMap<FlowKey6, CtEntry6> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// IPv6 flows that have only sent a SYN (see lb-common's `MAP_CT_NEW`).
#[map]
pub static CT_NEW6: LruHashMap<FlowKey6, CtEntry6> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE / 4, 0);

/// This host's IPv6 addresses -> 1 (loopback excluded): what a `[::]` service matches.
#[map]
pub static LOCAL_ADDRS6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(1024, 0);

/// Per-CPU state of one IPv6 packet ([`Pkt6`]); same reasoning as `SCRATCH`.
#[map]
static SCRATCH6: PerCpuArray<Pkt6> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for what the IPv6 subprograms would otherwise build on the stack (16-byte
/// addresses make entries, keys and FIB tuples too large for the call chain's 512 bytes).
#[map]
static WORK6: PerCpuArray<Work6> = PerCpuArray::with_max_entries(1, 0);

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const AF_INET6: u8 = 10;
/// Extension headers walked before the L4 header at most.
pub const MAX_EXT: usize = 4;
/// The L4 header must start within this many bytes of the frame (a bound for the verifier, and
/// far above any real header chain: 14 + 40 + four 48-byte headers).
pub const MAX_L4_OFF: usize = 255;
/// Bytes made linear before parsing: an ICMPv6 error at the furthest L4 offset, quoting an
/// IPv6 header and a TCP base header.
const MAX_HDRS6: usize = MAX_L4_OFF + 8 + 40 + 20;

/// Everything about a TCP/UDP-over-IPv6 packet the rest of the path needs (addresses and ports
/// as in the packet).
pub struct Flow6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub hop_limit: u8,
    /// TCP sequence and acknowledgment numbers, host byte order (0 for UDP).
    pub seq: u32,
    pub ack: u32,
    /// The first word of the header (version, traffic class, flow label) as in the packet.
    pub flowinfo: u32,
    /// Payload length, host byte order.
    pub payload_len: u16,
    /// The skb's `ip_summed` (see `nat::ip_summed`), read by `process` once the packet may be
    /// translated (whatever the parse left until then).
    pub summed: u8,
    /// Offset of the L4 header (after any extension headers).
    pub l4_off: usize,
}

impl Flow6 {
    /// The L4 offset, bounded for the verifier (see `Flow::l4`); at most [`MAX_L4_OFF`].
    #[inline(always)]
    fn l4(&self) -> usize {
        self.l4_off & 0xff
    }
}

/// Where an ICMPv6 error quotes a TCP or UDP packet, and that packet's tuple.
pub struct Quote6 {
    pub icmp_off: usize,
    pub inner_off: usize,
    pub inner_l4_off: usize,
    pub inner: FlowKey6,
}

impl Quote6 {
    #[inline(always)]
    fn offsets(&self) -> (usize, usize, usize) {
        (
            self.icmp_off & 0xff,
            self.inner_off & 0x1ff,
            self.inner_l4_off & 0x1ff,
        )
    }
}

/// What an ICMPv6 error quoting a balanced flow becomes (see `IcmpNat`).
pub struct IcmpNat6 {
    pub q_src: [u32; 4],
    pub q_src_port: u16,
    pub q_dst: [u32; 4],
    pub q_dst_port: u16,
    pub o_src: [u32; 4],
    pub o_dst: [u32; 4],
}

/// A lookup tuple for the FIB: source and destination after translation.
pub struct Tuple6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

/// Built in the per-CPU `WORK6` slot: a new flow's entry and reply key, a FIB lookup's tuple
/// and result. Each is used by one subprogram (and the lookup it calls) at a time.
pub struct Work6 {
    half: CtEntry6,
    rkey: FlowKey6,
    tuple: Tuple6,
    fib: Fib6,
    /// A new full-NAT flow between its steps: the forward entry's route.
    route: Route,
    /// `claim6`'s forward key (used by that subprogram alone).
    claim_fkey: FlowKey6,
    /// A tracked flow's other key: the reply key of a forward packet (`forward6`), or of an
    /// expired forward entry (`process`).
    pair_key: FlowKey6,
    /// A new full-NAT flow's hash, for its port search's tries (`port_try6`).
    hash: u32,
    /// Its reply key's `claim::claim_base6`, for the TIME_WAIT marks of its tries.
    claim_base: u32,
    /// Whether the port search took a port (set by `port_try6`).
    taken: u32,
    /// The port search's pass and how many ports its first passed by for their TIME_WAIT
    /// marks (as IPv4's `NatScratch`).
    second_pass: u32,
    time_wait_seen: u32,
}

/// This CPU's `WORK6` slot.
#[inline(always)]
fn work() -> Option<&'static mut Work6> {
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; the program runs to
    // completion on its CPU, and the subprograms using the slot never overlap in what they use.
    WORK6.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

/// An IPv6 packet's state, in the per-CPU `SCRATCH6` slot.
pub struct Pkt6 {
    flow: Flow6,
    quote: Quote6,
    key: FlowKey6,
    now: u64,
    bytes: u64,
    nat: IcmpNat6,
    /// This CPU's last clock read and the jiffies it was made at (see `coarse_clock`), kept
    /// from packet to packet in the per-CPU slot.
    clock_jiffies: u64,
    clock_ns: u64,
}

type Table6 = LruHashMap<FlowKey6, CtEntry6>;

#[inline(always)]
fn other6(table: &'static Table6) -> &'static Table6 {
    if core::ptr::eq(table, &CONNTRACK6) {
        &CT_NEW6
    } else {
        &CONNTRACK6
    }
}

/// `table.get_ptr_mut(key)` with the map named at the call, for the established paths (see
/// IPv4's `ct_lookup`: the verifier inlines a lookup only at a call site that always sees one
/// map; through `table`, chosen at run time, it is a helper call).
#[inline(always)]
fn ct_lookup6(table: &'static Table6, key: &FlowKey6) -> Option<*mut CtEntry6> {
    if core::ptr::eq(table, &CONNTRACK6) {
        CONNTRACK6.get_ptr_mut(key)
    } else {
        CT_NEW6.get_ptr_mut(key)
    }
}

#[inline(always)]
fn is_ext(next: u8) -> bool {
    next == IPPROTO_HOPOPTS
        || next == IPPROTO_ROUTING
        || next == IPPROTO_DSTOPTS
        || next == IPPROTO_FRAGMENT
}

/// [`parse6`]'s answer for a flow to balance; [`PARSED_ICMP`] for an ICMPv6 error to match;
/// anything else is the `Reason` of the exit the packet takes.
const PARSED_FLOW: u32 = u32::MAX;
const PARSED_ICMP: u32 = u32::MAX - 1;

/// Reads a 16-byte address at `off`.
#[inline(always)]
fn addr_at(ctx: &TcContext, off: usize) -> Option<[u32; 4]> {
    let a = ptr_at::<[u32; 4]>(ctx, off)?;
    // SAFETY: `ptr_at` checked the 16 bytes lie inside the packet.
    Some(unsafe { a.read_unaligned() })
}

/// Parses an Ethernet/IPv6 frame into `p.flow` (and `p.quote` for an ICMPv6 error). A BPF
/// subprogram: its frame is gone before the balancing's call chain starts. Fields are written
/// in place (a `Flow6` built on the stack and copied would take that stack).
#[inline(never)]
fn parse6(ctx: &TcContext, p: &mut Pkt6) -> u32 {
    match parse6_inner(ctx, p) {
        Ok(v) => v,
        Err(r) => r as u32,
    }
}

#[inline(always)]
fn parse6_inner(ctx: &TcContext, p: &mut Pkt6) -> Result<u32, Reason> {
    let len = ctx.len() as usize;
    // Only the headers read made linear (see `parse::pull_headers`): the fixed header and the
    // TCP or UDP header right after it (the common case), or with extension headers or ICMPv6
    // the deepest stack any path reads.
    pull_headers(ctx, ETH_HLEN + 40);
    let need = match ptr_at::<[u8; 8]>(ctx, ETH_HLEN) {
        // SAFETY: `ptr_at` checked the 8 bytes lie inside the packet.
        Some(ip) => match unsafe { (*ip)[6] } {
            IPPROTO_TCP => ETH_HLEN + 40 + 20,
            IPPROTO_UDP => ETH_HLEN + 40 + 8,
            _ => MAX_HDRS6,
        },
        None => MAX_HDRS6,
    };
    pull_headers(ctx, need);
    let Some(ip) = ptr_at::<[u8; 8]>(ctx, ETH_HLEN) else {
        return Err(Reason::DropIpMalformed);
    };
    // SAFETY: the header's first 8 bytes are inside the packet (checked by `ptr_at`).
    let ip = unsafe { *ip };
    if ip[0] >> 4 != 6 {
        return Err(Reason::DropIpMalformed);
    }
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
    if payload_len == 0 {
        // A jumbogram (or a BIG TCP aggregate): its length is elsewhere; not ours.
        return Err(Reason::PassIpv6);
    }
    let end = ETH_HLEN + 40 + payload_len as usize;
    if end > len {
        return Err(Reason::DropIpMalformed);
    }
    let f = &mut p.flow;
    f.saddr = addr_at(ctx, ETH_HLEN + 8).ok_or(Reason::DropIpMalformed)?;
    f.daddr = addr_at(ctx, ETH_HLEN + 24).ok_or(Reason::DropIpMalformed)?;
    f.hop_limit = ip[7];
    f.flowinfo = u32::from_ne_bytes([ip[0], ip[1], ip[2], ip[3]]);
    f.payload_len = payload_len;
    let mut next = ip[6];

    let mut off = ETH_HLEN + 40;
    let mut walked = 0;
    while walked < MAX_EXT && is_ext(next) {
        let Some(h) = ptr_at::<[u8; 8]>(ctx, off & 0xff) else {
            return Err(Reason::DropIpMalformed);
        };
        // SAFETY: the header's first 8 bytes are inside the packet (checked by `ptr_at`).
        let h = unsafe { *h };
        let hlen = if next == IPPROTO_FRAGMENT {
            // Offset or more-fragments set: a real fragment, without ports to balance on
            // (an atomic fragment, RFC 6946, is a whole packet and walked past).
            if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                return Err(Reason::PassFragment);
            }
            8
        } else {
            if next == IPPROTO_HOPOPTS && walked != 0 {
                // Hop-by-hop options only ever come first (RFC 8200 4.1).
                return Err(Reason::DropIpMalformed);
            }
            if next == IPPROTO_ROUTING && h[3] != 0 {
                // Segments left: this host is a waypoint, not the destination.
                return Err(Reason::PassIpv6);
            }
            (h[1] as usize + 1) * 8
        };
        next = h[0];
        off = (off & 0xff) + hlen;
        if off > end {
            return Err(Reason::DropIpMalformed);
        }
        if off > MAX_L4_OFF {
            return Err(Reason::PassIpv6);
        }
        walked += 1;
    }
    if walked != 0 {
        count(Reason::EventIpOptions);
    }
    if is_ext(next) {
        // More extension headers than walked: left to the stack.
        return Err(Reason::PassIpv6);
    }
    let l4_off = off & 0xff;
    let l4_room = end - l4_off;
    f.l4_off = l4_off;
    f.proto = next;
    f.tcp_flags = 0;
    f.seq = 0;
    f.ack = 0;
    if next == IPPROTO_ICMPV6 {
        f.sport = 0;
        f.dport = 0;
        return parse_icmp6_error(ctx, l4_off, l4_room, &mut p.quote);
    }
    if next == IPPROTO_TCP {
        let Some(th) = ptr_at::<[u8; 20]>(ctx, l4_off) else {
            return Err(Reason::DropL4Malformed);
        };
        // SAFETY: 20 bytes at `l4_off` are inside the packet (checked by `ptr_at`).
        let th = unsafe { &*th };
        let doff = (th[12] >> 4) as usize * 4;
        if doff < 20 || doff > l4_room {
            return Err(Reason::DropL4Malformed);
        }
        f.sport = u16::from_ne_bytes([th[0], th[1]]);
        f.dport = u16::from_ne_bytes([th[2], th[3]]);
        f.tcp_flags = th[13];
        f.seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
        f.ack = u32::from_be_bytes([th[8], th[9], th[10], th[11]]);
    } else if next == IPPROTO_UDP {
        let Some(uh) = ptr_at::<[u8; 8]>(ctx, l4_off) else {
            return Err(Reason::DropL4Malformed);
        };
        // SAFETY: 8 bytes at `l4_off` are inside the packet (checked by `ptr_at`).
        let uh = unsafe { &*uh };
        let ulen = u16::from_be_bytes([uh[4], uh[5]]) as usize;
        if ulen < 8 || ulen > l4_room {
            return Err(Reason::DropL4Malformed);
        }
        f.sport = u16::from_ne_bytes([uh[0], uh[1]]);
        f.dport = u16::from_ne_bytes([uh[2], uh[3]]);
    } else {
        return Err(Reason::PassNotTcpUdp);
    }
    Ok(PARSED_FLOW)
}

/// An ICMPv6 error (types 1-4: destination unreachable, Packet Too Big, time exceeded,
/// parameter problem) quoting the start of a TCP or UDP packet whose header is followed
/// directly by its L4 header. Everything else of ICMPv6 (echo, NDP, MLD, ...) is not ours, nor
/// is a quote that is truncated or has extension headers: the stack judges those as it would
/// without berth.
#[inline(always)]
fn parse_icmp6_error(
    ctx: &TcContext,
    icmp_off: usize,
    room: usize,
    quote: &mut Quote6,
) -> Result<u32, Reason> {
    let Some(h) = ptr_at::<[u8; 8]>(ctx, icmp_off) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: the 8-byte ICMPv6 header is inside the packet (checked by `ptr_at`).
    let t = unsafe { (*h)[0] };
    if !(1..=4).contains(&t) {
        return Err(Reason::PassNotTcpUdp);
    }
    let inner_off = icmp_off + 8;
    let Some(hdr) = ptr_at::<[u8; 40]>(ctx, inner_off) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: the quoted 40-byte header is inside the packet (checked by `ptr_at`).
    let ip = unsafe { &*hdr };
    let proto = ip[6];
    if ip[0] >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || 8 + 40 + 8 > room {
        return Err(Reason::PassNotTcpUdp);
    }
    let inner_l4_off = inner_off + 40;
    let Some(l4) = ptr_at::<[u16; 2]>(ctx, inner_l4_off) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: the quoted ports are inside the packet.
    let ports = unsafe { l4.read_unaligned() };
    let q = &mut quote.inner;
    // SAFETY: both addresses lie within the 40 bytes `ptr_at` checked (one checked pointer:
    // the verifier cannot relate bounds checked on pointers LLVM derived separately).
    unsafe {
        q.saddr = (hdr as *const u8)
            .add(8)
            .cast::<[u32; 4]>()
            .read_unaligned();
        q.daddr = (hdr as *const u8)
            .add(24)
            .cast::<[u32; 4]>()
            .read_unaligned();
    }
    q.sport = ports[0];
    q.dport = ports[1];
    q.proto = proto;
    q._pad = 0;
    q._pad2 = 0;
    quote.icmp_off = icmp_off;
    quote.inner_off = inner_off;
    quote.inner_l4_off = inner_l4_off;
    Ok(PARSED_ICMP)
}

/// The IPv6 path, from the frame's EtherType on. A BPF subprogram returning a packed verdict.
#[inline(always)]
pub fn process(ctx: &TcContext) -> u64 {
    pack(process_inner(ctx))
}

#[inline(always)]
fn process_inner(ctx: &TcContext) -> (i32, Reason) {
    let Some(p) = SCRATCH6.get_ptr_mut(0) else {
        return exit(Reason::AbortMap);
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs.
    let p = unsafe { &mut *p };
    match parse6(ctx, p) {
        PARSED_FLOW => {}
        PARSED_ICMP => return unpack(icmp_error6(raw(ctx), p)),
        r => {
            return exit(Reason::from_index(r).unwrap_or(Reason::AbortMap));
        }
    }
    let flow = &p.flow;
    let service_port = port_flags(u16::from_be(flow.dport)) & port_flag(flow.proto, false) != 0;
    if !service_port && port_flags(u16::from_be(flow.sport)) & port_flag(flow.proto, true) == 0 {
        return exit(Reason::PassNoService);
    }
    if config().maglev_size == 0 {
        return exit(Reason::PassNoService);
    }
    if ttl_expires(p.flow.hop_limit, config()) {
        return exit(Reason::PassTtlExpired);
    }
    // Past the port filter: a non-service packet does not pay for it.
    p.flow.summed = crate::nat::ip_summed(ctx);
    let flow = &p.flow;
    let k = &mut p.key;
    k.saddr = flow.saddr;
    k.daddr = flow.daddr;
    k.sport = flow.sport;
    k.dport = flow.dport;
    k.proto = flow.proto;
    k._pad = 0;
    k._pad2 = 0;
    // The clock read once per jiffy on this CPU, as the IPv4 path does (a helper call on
    // every packet was ~13 ns of it).
    p.now = crate::coarse_clock(&mut p.clock_jiffies, &mut p.clock_ns);
    p.bytes = u64::from(ctx.len());
    let p = &*p;
    let (flow, key, cfg, now) = (&p.flow, &p.key, config(), p.now);

    let (e, table): (*mut CtEntry6, &'static Table6) = if let Some(e) = CONNTRACK6.get_ptr_mut(key)
    {
        (e, &CONNTRACK6)
    } else if let Some(e) = CT_NEW6.get_ptr_mut(key) {
        (e, &CT_NEW6)
    } else {
        (core::ptr::null_mut(), &CONNTRACK6)
    };
    if !e.is_null() {
        // SAFETY: a value pointer returned by the map lookup stays valid for this run (RCU);
        // racing writers store plain integers (see the IPv4 path).
        let e = unsafe { &mut *e };
        if e.ct.dir == DIR_REPLY {
            let v = reply6(ctx, p, e, table);
            if v & CONFIRM != 0 {
                confirm_by_reply6(key);
            }
            return unpack(v & !CONFIRM);
        }
        if ct::expired(&e.ct, flow.proto, flow.tcp_flags, now, cfg) {
            count(Reason::EventCtExpired);
            // In `WORK6` (see `forward6`).
            if let Some(w) = work() {
                w.pair_key = reply_key6(key, e);
                let rkey = &w.pair_key;
                if let Some(r) = table.get_ptr(rkey) {
                    // SAFETY: valid map value pointer.
                    if is_reply_of6(unsafe { &*r }, rkey, key) {
                        let _ = table.remove(rkey);
                    }
                }
            }
            let _ = table.remove(key);
        } else if core::ptr::eq(table, &CT_NEW6)
            && ct::handshake_confirms(&e.ct, flow.tcp_flags, flow.ack)
        {
            // The client's ACK of its backend's SYN-ACK (see `process`).
            if !confirm6(key, e) {
                count(Reason::EventCtInsertFailed);
                return unpack(forward6(ctx, p, e, &CT_NEW6));
            }
            if let Some(m) = CONNTRACK6.get_ptr_mut(key) {
                // SAFETY: as above.
                let m = unsafe { &mut *m };
                return unpack(forward6(ctx, p, m, &CONNTRACK6));
            }
        } else {
            return unpack(forward6(ctx, p, e, table));
        }
    }
    if !service_port {
        return exit(Reason::PassNoService);
    }
    let v = new_flow6(raw(ctx), p);
    if v & FULL_NAT6 != 0 {
        // Outside `new_flow6`'s frame, as IPv4's `new_full_nat_flow`, and in three steps, each
        // a frame of its own (the call chain's 512 bytes hold no more than one at a time under
        // this one's): route and build the reply entry, take a port, record and rewrite.
        let v = new_full_nat_flow6(raw(ctx), p, v);
        if v & FULL_NAT6 == 0 {
            return unpack(v);
        }
        if !take_port6(p) {
            return exit(Reason::DropSnatExhausted);
        }
        if !finish_full_nat6(raw(ctx), p) {
            return exit(Reason::AbortRewrite);
        }
        // The routing's verdict, kept here (one read back from a map would lose the bounds
        // the verifier knows it by).
        return unpack(v & !FULL_NAT6);
    }
    let verdict = unpack(v);
    if verdict.1 == Reason::RejectNoBackend {
        return unpack(tcp_reset6(raw(ctx), p));
    }
    verdict
}

/// Length of the RST frame: Ethernet, the 40-byte IPv6 header, a 20-byte TCP header.
const RST6_LEN: usize = ETH_HLEN + 40 + 20;

/// One's-complement sum of the 16-bit words of a TCP header, folded.
#[inline(always)]
fn sum20(b: &[u8; 20]) -> u16 {
    let mut s = 0u32;
    let mut i = 0;
    while i < 20 {
        s += u32::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Answers a packet for a service with no backend as a host with nothing listening would
/// (IPv4's `reject::refuse`): a TCP segment without payload (a SYN above all) with a RST, a UDP
/// datagram with an ICMPv6 port unreachable quoting it; a segment with payload or options, or
/// a packet with extension headers, is dropped. The answer is bounced out of the interface the
/// packet came in on. A global BPF function (see `crate::args`) returning a packed verdict.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn tcp_reset6(skb: *mut __sk_buff, p: *const Pkt6) -> u64 {
    let Some((ctx, p)) = args(skb, p) else {
        return pack(exit(Reason::AbortMap));
    };
    let ctx = &ctx;
    pack(if p.flow.proto == IPPROTO_TCP {
        tcp_reset6_inner(ctx, &p.flow)
    } else {
        udp_unreachable6(ctx, &p.flow)
    })
}

/// Room the ICMPv6 error needs in front of the datagram's own IPv6 header: a new IPv6 header
/// and the ICMPv6 header.
const ICMP6_ROOM: usize = 40 + 8;
/// Length of the ICMPv6 error frame: Ethernet, IPv6, ICMPv6, the quoted IPv6 and UDP headers.
const ICMP6_LEN: usize = ETH_HLEN + ICMP6_ROOM + 40 + 8;

/// Turns a UDP datagram into the ICMPv6 destination unreachable (port unreachable) a host with
/// nothing on the port sends: room after the Ethernet header for the new IPv6 and ICMPv6
/// headers, the datagram's own headers left in place as the quote, the rest cut off. The
/// ICMPv6 checksum is a complete one over its pseudo-header.
#[inline(always)]
fn udp_unreachable6(ctx: &TcContext, flow: &Flow6) -> (i32, Reason) {
    let drop = exit(Reason::DropNoBackend);
    if flow.l4() != ETH_HLEN + 40 {
        return drop;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return drop;
    };
    // SAFETY: the MACs are inside the packet (checked by `ptr_at`).
    let macs = unsafe { *eth };
    if ctx
        .adjust_room(ICMP6_ROOM as i32, BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return drop;
    }
    if (ctx.len() as usize) > ICMP6_LEN && ctx.change_tail(ICMP6_LEN as u32, 0).is_err() {
        return exit(Reason::AbortRewrite);
    }
    let (Some(eth), Some(hdrs)) = (
        ptr_at::<[u8; 12]>(ctx, 0),
        ptr_at::<[u8; 96]>(ctx, ETH_HLEN),
    ) else {
        return exit(Reason::AbortRewrite);
    };
    // SAFETY: `ptr_at` checked the MACs and the 96 bytes of headers (new IPv6 + ICMPv6, quoted
    // IPv6 + UDP) lie inside the packet; no helper runs between the checks and the writes.
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&macs[6..]);
        eth[6..].copy_from_slice(&macs[..6]);
        let h = &mut *hdrs;
        // Version 6, payload 56 bytes of ICMPv6, hop limit 64; from the service address (the
        // quote's destination) to the client (its source).
        h[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 56, IPPROTO_ICMPV6, 64]);
        h.copy_within(48 + 24..48 + 40, 8);
        h.copy_within(48 + 8..48 + 24, 24);
        // Destination unreachable, port unreachable.
        h[40..48].copy_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
        // Pseudo-header (addresses, length 56, next header 58), then the message.
        let mut sum = u32::from(56u16.to_be()) + u32::from(u16::from(IPPROTO_ICMPV6).to_be());
        let mut i = 8;
        while i < 96 {
            sum += u32::from(u16::from_ne_bytes([h[i], h[i + 1]]));
            i += 2;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        h[42..44].copy_from_slice(&(!(sum as u16)).to_ne_bytes());
    }
    // SAFETY: plain helper call with an interface index: out of the interface it came in on.
    let act = unsafe { bpf_redirect(ingress_ifindex(ctx), 0) } as i32;
    (act, Reason::RejectNoBackend)
}

#[inline(always)]
fn tcp_reset6_inner(ctx: &TcContext, flow: &Flow6) -> (i32, Reason) {
    let drop = exit(Reason::DropNoBackend);
    if flow.tcp_flags & ct::TCP_RST != 0 || flow.l4() != ETH_HLEN + 40 {
        return drop;
    }
    let Some(th) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN + 40) else {
        return drop;
    };
    // SAFETY: the 20-byte TCP header is inside the packet (checked by `ptr_at`).
    let old: [u8; 20] = unsafe { *th };
    if usize::from(old[12] >> 4) * 4 != 20 || flow.payload_len != 20 {
        return drop; // options or payload
    }
    // RFC 9293 3.10.7.1: answer an ACK with SEQ = its ACK; anything else with SEQ 0 and an ACK
    // of everything it occupied.
    let (seq, ack, flags) = if flow.tcp_flags & ct::TCP_ACK != 0 {
        (flow.ack, 0u32, ct::TCP_RST)
    } else {
        let occupied = u32::from(flow.tcp_flags & ct::TCP_SYN != 0)
            + u32::from(flow.tcp_flags & ct::TCP_FIN != 0);
        (
            0u32,
            flow.seq.wrapping_add(occupied),
            ct::TCP_RST | ct::TCP_ACK,
        )
    };
    let mut new = [0u8; 20];
    new[0..2].copy_from_slice(&old[2..4]);
    new[2..4].copy_from_slice(&old[0..2]);
    new[4..8].copy_from_slice(&seq.to_be_bytes());
    new[8..12].copy_from_slice(&ack.to_be_bytes());
    new[12] = 5 << 4;
    new[13] = flags;
    // The checksum field keeps its old value here so that it cancels out of the difference.
    new[16..18].copy_from_slice(&old[16..18]);
    let diff = add(!sum20(&old), sum20(&new));
    let (Some(eth), Some(ip), Some(th)) = (
        ptr_at::<[u8; 12]>(ctx, 0),
        ptr_at::<[u8; 40]>(ctx, ETH_HLEN),
        ptr_at::<[u8; 20]>(ctx, ETH_HLEN + 40),
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
        // Swapping the addresses leaves the pseudo-header's sum as it was; the payload length
        // stays 20.
        let mut a = [0u8; 16];
        a.copy_from_slice(&ip[8..24]);
        ip.copy_within(24..40, 8);
        ip[24..40].copy_from_slice(&a);
        ip[7] = 64;
        *th = new;
    }
    if ctx
        .l4_csum_replace(ETH_HLEN + 40 + 16, 0, u64::from(diff), 0)
        .is_err()
    {
        return exit(Reason::AbortRewrite);
    }
    if (ctx.len() as usize) > RST6_LEN && ctx.change_tail(RST6_LEN as u32, 0).is_err() {
        return exit(Reason::AbortRewrite);
    }
    // SAFETY: plain helper call with an interface index: out of the interface it came in on.
    let act = unsafe { bpf_redirect(ingress_ifindex(ctx), 0) } as i32;
    (act, Reason::RejectNoBackend)
}

/// Moves a confirmed flow's pair from CT_NEW6 to CONNTRACK6 (see `confirm`), the forward
/// entry's handshake bookkeeping cleared first, in place (its CT_NEW6 copy is about to go; a
/// copy would not fit the stack).
#[inline(never)]
fn confirm6(key: &FlowKey6, e: &mut CtEntry6) -> bool {
    ct::clear_handshake(&mut e.ct);
    let rkey = reply_key6(key, e);
    let rev = CT_NEW6
        .get_ptr(&rkey)
        .filter(|r| is_reply_of6(unsafe { &**r }, &rkey, key));
    // SAFETY (above and below): valid map value pointers, read in place.
    let moved = CONNTRACK6.insert(key, e, 0).is_ok()
        && rev.is_none_or(|r| CONNTRACK6.insert(&rkey, unsafe { &*r }, 0).is_ok());
    if !moved {
        return false;
    }
    let _ = CT_NEW6.remove(key);
    if rev.is_some() {
        let _ = CT_NEW6.remove(&rkey);
    }
    true
}

/// Confirms the unconfirmed flow whose reply half is at `rkey` in CT_NEW6 (see
/// `confirm_by_reply`). A BPF subprogram (own stack frame).
#[inline(never)]
fn confirm_by_reply6(rkey: &FlowKey6) {
    let Some(r) = CT_NEW6.get_ptr(rkey) else {
        return;
    };
    // SAFETY: valid map value pointer, read in place.
    let fkey = forward_key6(rkey, unsafe { &*r });
    let Some(f) = CT_NEW6.get_ptr_mut(&fkey) else {
        return;
    };
    // SAFETY: as above; the entry is about to move (its CT_NEW6 copy is removed).
    let f = unsafe { &mut *f };
    if is_forward_of6(f, &fkey, rkey) && !confirm6(&fkey, f) {
        count(Reason::EventCtInsertFailed);
    }
}

/// Writes a 16-byte address into the packet at `a` (checked by `ptr_at`), word by word: an
/// array store there became a call to the byte-wise `memmove` subprogram.
///
/// # Safety
/// `a` must point to 16 writable bytes of packet data.
#[inline(always)]
unsafe fn write_addr(a: *mut [u32; 4], v: &[u32; 4]) {
    let w = a.cast::<u32>();
    for (i, x) in v.iter().enumerate() {
        // SAFETY: the caller's 16 bytes; unaligned word stores are what the packet allows.
        unsafe { w.add(i).write_unaligned(*x) };
    }
}

/// Inserts the missing half of the flow whose other half is `from` (see `rebuild`): for full
/// NAT the other end too (the client a client -> service packet comes from; berth's address
/// and port a backend's packet was sent to).
#[inline(never)]
fn rebuild6(table: &Table6, key: &FlowKey6, from: &CtEntry6, flow: &Flow6, now: u64) -> bool {
    // Built in `WORK6` (an entry on the stack would not fit the call chain's 512 bytes); no
    // caller has anything there at this point.
    let Some(w) = work() else {
        return false;
    };
    let fwd = from.ct.dir == DIR_FORWARD;
    let full = from.ct.flags & CT_F_FULLNAT;
    let half = &mut w.half;
    half.ct = from.ct;
    half.nat_addr = if fwd { flow.daddr } else { flow.saddr };
    half.fnat_addr = if full == 0 {
        [0; 4]
    } else if fwd {
        flow.saddr
    } else {
        flow.daddr
    };
    half.ct.nat_port = if fwd { flow.dport } else { flow.sport };
    half.ct.dir = if fwd { DIR_REPLY } else { DIR_FORWARD };
    half.ct.route = Route::NONE;
    let unconfirmed = core::ptr::eq(table, &CT_NEW6);
    let (backend_ack, answered, lazy) = ct::rebuilt_window(
        half.ct.dir,
        flow.proto,
        flow.tcp_flags,
        flow.seq,
        unconfirmed,
    );
    half.ct.backend_ack = backend_ack;
    half.ct.flags = full | answered;
    // A confirmed flow's reply half has lost its window (`ct::rebuilt_window`).
    half.ct.lazy = lazy;
    half.ct.fnat_port = if full == 0 {
        0
    } else if fwd {
        flow.sport
    } else {
        flow.dport
    };
    half.ct.last_seen_ns = now;
    count(Reason::EventCtRebuilt);
    if table.insert(key, &w.half, 0).is_err() {
        count(Reason::EventCtInsertFailed);
        return false;
    }
    true
}

/// Whether reply key `rkey` of `table` may be taken by this packet's new flow (see `claim`: a
/// full-NAT reply key names berth's address, not a client, so a live flow keeps it against
/// everyone).
#[inline(never)]
fn claim6(table: &Table6, rkey: &FlowKey6, flow: &Flow6, now: u64, cfg: &DpConfig) -> bool {
    let Some(r) = table.get_ptr(rkey) else {
        return true;
    };
    // SAFETY: a valid map value pointer, read in place.
    let r = unsafe { &*r };
    if r.ct.dir != DIR_REPLY {
        return false;
    }
    // The forward key in `WORK6`, not on the stack (the call chains through here have no
    // room for 40 more bytes).
    let Some(w) = work() else {
        return false;
    };
    w.claim_fkey = forward_key6(rkey, r);
    let fkey = &w.claim_fkey;
    // SAFETY: as above.
    let partner = table
        .get_ptr(fkey)
        .is_some_and(|f| is_forward_of6(unsafe { &*f }, fkey, rkey));
    let names_client = !r.ct.full_nat() && rkey.daddr == flow.saddr && rkey.dport == flow.sport;
    if partner
        && !ct::expired(&r.ct, rkey.proto, flow.tcp_flags, now, cfg)
        && (flow.proto != IPPROTO_TCP
            || ct::is_bare_syn(flow.proto, flow.tcp_flags)
            || !names_client
            || !ct::in_window(&r.ct, flow.seq))
    {
        return false;
    }
    if partner {
        let _ = table.remove(fkey);
    }
    let _ = table.remove(rkey);
    true
}

#[inline(always)]
fn touch6(a: &mut CtEntry6, b: Option<*mut CtEntry6>, now: u64) {
    a.ct.last_seen_ns = now;
    if let Some(b) = b {
        // SAFETY: a valid map value pointer.
        unsafe { (*b).ct.last_seen_ns = now };
    }
}

/// Marks a flow closing, adding closing `bits` to both halves (see `close`).
#[inline(always)]
fn close6(e: &mut CtEntry6, other: Option<*mut CtEntry6>, bits: u8, now: u64) {
    if e.ct.state != STATE_CLOSING {
        count(Reason::EventCtClosing);
    }
    e.ct.state = STATE_CLOSING;
    e.ct.flags |= bits;
    if let Some(o) = other {
        // SAFETY: a valid map value pointer.
        unsafe {
            (*o).ct.state = STATE_CLOSING;
            (*o).ct.flags |= bits;
        }
    }
    touch6(e, other, now);
}

/// Where this IPv6 segment's sequence space ends (`ct::seq_end`): its payload less the
/// extension and TCP headers, the TCP header length read from the packet again (only FINs
/// need it).
#[inline(always)]
fn fin_end6(ctx: &TcContext, flow: &Flow6) -> Option<u32> {
    let l4 = flow.l4();
    let doff = ptr_at::<u8>(ctx, l4 + 12)?;
    // SAFETY: `ptr_at` checked the byte lies inside the packet.
    let hdrs = (l4 - ETH_HLEN - 40) as u32 + u32::from(unsafe { *doff } >> 4) * 4;
    let len = u32::from(flow.payload_len).checked_sub(hdrs)?;
    Some(ct::seq_end(flow.seq, len, flow.tcp_flags))
}

/// A packet client -> service of a tracked flow (see `forward`).
#[inline(never)]
fn forward6(ctx: &TcContext, p: &Pkt6, e: &mut CtEntry6, table: &'static Table6) -> u64 {
    pack(forward6_inner(ctx, p, e, table))
}

#[inline(always)]
fn forward6_inner(
    ctx: &TcContext,
    p: &Pkt6,
    e: &mut CtEntry6,
    table: &'static Table6,
) -> (i32, Reason) {
    let (flow, key, now, cfg) = (&p.flow, &p.key, p.now, config());
    // The reply key in `WORK6`, not on the stack: the call chains through this frame (down to
    // `claim6`) share 512 bytes with the IPv4 tracked path inlined into the main program.
    let Some(w) = work() else {
        return exit(Reason::AbortMap);
    };
    w.pair_key = reply_key6(key, e);
    let rkey = &w.pair_key;
    let mut rev = ct_lookup6(table, rkey);
    // SAFETY: valid map value pointer.
    if let Some(r) = rev
        && !is_reply_of6(unsafe { &*r }, rkey, key)
    {
        if !claim6(table, rkey, flow, now, cfg) {
            let _ = table.remove(key);
            return exit(Reason::DropFlowConflict);
        }
        rev = None;
    }
    if rev.is_none() {
        if !claim6(other6(table), rkey, flow, now, cfg) {
            let _ = table.remove(key);
            return exit(Reason::DropFlowConflict);
        }
        rebuild6(table, rkey, e, flow, now);
        rev = table.get_ptr_mut(rkey);
    }
    if ct::closes(flow.proto, flow.tcp_flags) {
        // SAFETY: valid map value pointer.
        if rev.is_none_or(|r| ct::in_window(unsafe { &(*r).ct }, flow.seq)) {
            let bits = ct::close_bits(flow.proto, flow.tcp_flags, DIR_FORWARD);
            if e.ct.full_nat() {
                let fwd = Some(&raw mut e.ct);
                if enters_time_wait(fwd, DIR_FORWARD, flow.tcp_flags, flow.ack) {
                    // The backend closed first (see IPv4's `forward_inner`).
                    crate::claim::mark_time_wait6(rkey, now);
                }
                let end = fin_end6(ctx, flow);
                // SAFETY: a valid map value pointer.
                let r = rev.map(|r| unsafe { &raw mut (*r).ct });
                track_fin(fwd, r, DIR_FORWARD, flow.tcp_flags, flow.ack, end);
            }
            close6(e, rev, bits, now);
        } else if e.ct.state != STATE_CLOSING {
            count(Reason::EventCtCloseIgnored);
        }
    } else if e.ct.flags & ct::CT_F_AWAIT_CLIENT_ACK != 0
        && ct::is_final_ack(
            e.ct.flags,
            e.ct.backend_ack,
            flow.tcp_flags,
            DIR_FORWARD,
            flow.ack,
        )
        // SAFETY: valid map value pointer.
        && rev.is_none_or(|r| ct::in_window(unsafe { &(*r).ct }, flow.seq))
    {
        // SAFETY: as above.
        last_ack(&mut e.ct, rev.map(|r| unsafe { &raw mut (*r).ct }));
    }
    translate6(ctx, p, e, rev, false)
}

/// A packet backend -> client of a tracked flow (see `reply`).
#[inline(never)]
fn reply6(ctx: &TcContext, p: &Pkt6, e: &mut CtEntry6, table: &'static Table6) -> u64 {
    reply6_inner(ctx, p, e, table)
}

/// A [`pack`]ed verdict of [`reply6`], with `CONFIRM` set where the packet confirms its flow.
#[inline(always)]
fn reply6_inner(ctx: &TcContext, p: &Pkt6, e: &mut CtEntry6, table: &'static Table6) -> u64 {
    let (flow, key, now, cfg) = (&p.flow, &p.key, p.now, config());
    if e.ct.in_ifindex != 0 && e.ct.in_ifindex != ingress_ifindex(ctx) {
        return pack(exit(Reason::PassReplyWrongIface));
    }
    let fkey = forward_key6(key, e);
    if ct::expired(&e.ct, flow.proto, flow.tcp_flags, now, cfg) {
        count(Reason::EventCtExpired);
        if let Some(f) = table.get_ptr(&fkey) {
            // SAFETY: valid map value pointer.
            if is_forward_of6(unsafe { &*f }, &fkey, key) {
                let _ = table.remove(&fkey);
            }
        }
        let _ = table.remove(key);
        return pack(exit(Reason::PassNoService));
    }
    // A DNAT flow picked in the current table epoch: its reply entry is the one its client's
    // tuple leads to (lb-common's `epoch`), and nothing below needs the forward half (IPv4's
    // `reply`).
    let skip = core::ptr::eq(table, &CONNTRACK6)
        && ct::reply_skips_forward(&e.ct, flow.proto, flow.tcp_flags, now, crate::current_epoch);
    let mut fwd = None;
    if !skip {
        fwd = ct_lookup6(table, &fkey);
        if let Some(f) = fwd {
            // SAFETY: valid map value pointer.
            if !is_forward_of6(unsafe { &*f }, &fkey, key) {
                count(Reason::EventCtExpired);
                let _ = table.remove(key);
                return pack(exit(Reason::PassNoService));
            }
        } else {
            // Or a newer flow on the tuple holds its reply entry, its forward half evicted
            // too: this entry, not stamped with the current epoch, would take the tuple from it
            // (IPv4's `reply`).
            if other6(table).get_ptr(&fkey).is_some() || newer_flow_holds6(&fkey, key, e.ct.epoch) {
                count(Reason::EventCtExpired);
                let _ = table.remove(key);
                return pack(exit(Reason::PassNoService));
            }
            rebuild6(table, &fkey, e, flow, now);
            fwd = table.get_ptr_mut(&fkey);
        }
    }
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & ct::TCP_ACK != 0 {
        ct::record_backend_ack(&mut e.ct, flow.ack);
    }
    if core::ptr::eq(table, &CT_NEW6)
        && flow.proto == IPPROTO_TCP
        && let Some(f) = fwd
    {
        // SAFETY: a valid map value pointer (see `process6`).
        ct::record_syn_ack(unsafe { &mut (*f).ct }, flow.tcp_flags, flow.seq);
    }
    if ct::closes(flow.proto, flow.tcp_flags) {
        let bits = ct::close_bits(flow.proto, flow.tcp_flags, DIR_REPLY);
        if e.ct.full_nat() {
            // SAFETY: a valid map value pointer.
            let f = fwd.map(|f| unsafe { &raw mut (*f).ct });
            if enters_time_wait(f, DIR_REPLY, flow.tcp_flags, flow.ack) {
                // The FINs crossed (see IPv4's `reply`).
                crate::claim::mark_time_wait6(key, now);
            }
            let end = fin_end6(ctx, flow);
            track_fin(f, Some(&mut e.ct), DIR_REPLY, flow.tcp_flags, flow.ack, end);
        }
        close6(e, fwd, bits, now);
    } else if e.ct.flags & ct::CT_F_AWAIT_BACKEND_ACK != 0
        && let Some(f) = fwd
        // SAFETY: a valid map value pointer.
        && ct::is_final_ack(
            unsafe { (*f).ct.flags },
            unsafe { (*f).ct.backend_ack },
            flow.tcp_flags,
            DIR_REPLY,
            flow.ack,
        )
    {
        // SAFETY: as above.
        last_ack(&mut e.ct, Some(unsafe { &raw mut (*f).ct }));
    }
    let verdict = pack(translate6(ctx, p, e, fwd, true));
    if core::ptr::eq(table, &CT_NEW6) && ct::reply_confirms(flow.proto, flow.tcp_flags) {
        // Confirmed by its backend (see `reply`), outside this frame: `confirm_by_reply6`.
        return verdict | CONFIRM;
    }
    verdict
}

/// The common end of a tracked flow's packet (see `translate`): refresh, count, rewrite the
/// destination (forward) or source (`reply`), and for full NAT the other end too, send along
/// the cached route.
#[inline(always)]
fn translate6(
    ctx: &TcContext,
    p: &Pkt6,
    e: &mut CtEntry6,
    other: Option<*mut CtEntry6>,
    reply: bool,
) -> (i32, Reason) {
    let (flow, now) = (&p.flow, p.now);
    let stale = now.wrapping_sub(e.ct.last_seen_ns) > ct::TOUCH_INTERVAL_NS;
    if stale {
        touch6(e, other, now);
    }
    account(e.ct.service_id, e.ct.backend_id, p.bytes, false);
    let full = e.ct.full_nat();
    let done = if !full {
        rewrite6(ctx, flow, reply, &e.nat_addr, e.ct.nat_port)
    } else if reply {
        rewrite_both6(
            ctx,
            flow,
            (&e.fnat_addr, e.ct.fnat_port),
            (&e.nat_addr, e.ct.nat_port),
        )
    } else {
        rewrite_both6(
            ctx,
            flow,
            (&e.nat_addr, e.ct.nat_port),
            (&e.fnat_addr, e.ct.fnat_port),
        )
    };
    if done.is_err() {
        return exit(Reason::AbortRewrite);
    }
    let redirect = config().flags & CFG_F_REDIRECT != 0;
    if !redirect {
        return (TC_ACT_OK as i32, Reason::PassTranslatedToStack);
    }
    if e.ct.route.ifindex != 0 && !stale {
        return redirect6_cached(ctx, &e.ct.route, reply);
    }
    let Some(w) = work() else {
        return exit(Reason::AbortMap);
    };
    let t = &mut w.tuple;
    if reply {
        t.src = e.nat_addr;
        t.sport = e.ct.nat_port;
        (t.dst, t.dport) = if full {
            (e.fnat_addr, e.ct.fnat_port)
        } else {
            (flow.daddr, flow.dport)
        };
    } else {
        t.dst = e.nat_addr;
        t.dport = e.ct.nat_port;
        (t.src, t.sport) = if full {
            (e.fnat_addr, e.ct.fnat_port)
        } else {
            (flow.saddr, flow.sport)
        };
    }
    fib6(ctx, flow, &w.tuple, &mut w.fib);
    e.ct.route = w.fib.route;
    let f = &w.fib;
    send6(ctx, &f, reply, true)
}

#[inline(always)]
fn lookup_service6(daddr: &[u32; 4], dport: u16, proto: u8) -> Option<ServiceValue> {
    // See IPv4's `lookup_service`.
    crate::find_service!(
        port_flags(u16::from_be(dport)),
        proto,
        SERVICES6.get_ptr(&ServiceKey6::new(*daddr, dport, proto)),
        SERVICES6.get_ptr(&ServiceKey6::new([0; 4], dport, proto)),
        LOCAL_ADDRS6.get_ptr(daddr).is_some()
    )
}

/// IPv4's `newer_flow_holds` for IPv6: whether the flow client -> service `fkey` picks in the
/// current table epoch has a reply entry in CONNTRACK6 stamped with that epoch, other than the
/// entry at `key` (stamped `stamp`) whose forward half the reply path is about to rebuild. Such
/// an entry is the tuple's newest flow's, whose replies skip the forward lookup: rebuilt from
/// the older entry, the tuple's forward half would send the client's packets to the older
/// flow's backend while the newer flow's replies still reached the client. DNAT only (IPv6 full
/// NAT is never stamped). A global BPF function, on the rebuild path only.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn newer_flow_holds6(fkey: *const FlowKey6, key: *const FlowKey6, stamp: u64) -> bool {
    // SAFETY: callers pass references (a global function: see `crate::args`).
    let (Some(fkey), Some(key)) = (unsafe { (fkey.as_ref(), key.as_ref()) }) else {
        return true;
    };
    let cur = crate::current_epoch();
    if cur == 0 || stamp == cur {
        // Nothing trusts a stamp, or this entry is the newest flow's.
        return false;
    }
    let cfg = config();
    let Some(svc) = lookup_service6(&fkey.daddr, fkey.dport, fkey.proto) else {
        return false;
    };
    // `maglev_pick`'s rule written out: called here, it grew this frame by 32 bytes and the
    // chain under `reply6` past the verifier's 512 (528).
    let m = cfg.maglev_size;
    if svc.id >= cfg.max_services || m == 0 {
        return false;
    }
    let slot = svc.id * m + flow_hash6(fkey, cfg.hash_seed) % m;
    let Some(&picked) = crate::maps::MAGLEV.get(slot) else {
        return false;
    };
    let id = if picked == 0 { svc.fallback } else { picked };
    let Some(b) = BACKENDS6.get_ptr(id) else {
        return false;
    };
    // SAFETY: a valid array value pointer, read in place.
    let b = unsafe { &*b };
    if b.is_empty() || !is_zero(&b.snat_addr) {
        return false;
    }
    let rkey = FlowKey6::new(b.addr, fkey.saddr, b.port, fkey.sport, fkey.proto);
    if same_key(&rkey, key) {
        return false;
    }
    CONNTRACK6.get_ptr(&rkey).is_some_and(|r| {
        // SAFETY: a valid map value pointer, read in place.
        let r = unsafe { &*r };
        r.ct.epoch == cur && is_reply_of6(r, &rkey, fkey)
    })
}

/// What `new_flow6` returns instead of a verdict when the backend it picked takes full NAT:
/// this bit, the service id << 32 and the backend id (see IPv4's `FULL_NAT`).
const FULL_NAT6: u64 = 1 << 63;

/// A packet client -> service with no flow: picks the backend (Maglev over the shared rows),
/// claims the reply key, translates and records the pair. A global BPF function (see
/// `crate::args`; with the five below, 282,198 -> 114,818 instructions), returning a packed
/// verdict, or [`FULL_NAT6`] and the ids when the backend takes full NAT.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn new_flow6(skb: *mut __sk_buff, p: *const Pkt6) -> u64 {
    let Some((ctx, p)) = args(skb, p) else {
        return pack(exit(Reason::AbortMap));
    };
    let ctx = &ctx;
    match new_flow6_inner(ctx, p) {
        Ok(v) => pack(v),
        Err(ids) => FULL_NAT6 | ids,
    }
}

/// `Err`: the service id << 32 | backend id of a full-NAT backend, for `new_full_nat_flow6`.
#[inline(always)]
fn new_flow6_inner(ctx: &TcContext, p: &Pkt6) -> Result<(i32, Reason), u64> {
    let (flow, key, cfg) = (&p.flow, &p.key, config());
    // The table epoch, read before the pick and again after it (lb-common's `epoch`).
    let before = crate::current_epoch();
    let Some(svc) = lookup_service6(&flow.daddr, flow.dport, flow.proto) else {
        return Ok(exit(Reason::PassNoService));
    };
    let Some(backend_id) = crate::maglev_pick(&svc, flow_hash6(key, cfg.hash_seed), cfg) else {
        return Ok(exit(Reason::AbortMap));
    };
    let Some(backend) = BACKENDS6.get_ptr(backend_id) else {
        return Ok(exit(Reason::AbortMap));
    };
    // SAFETY: a valid array value pointer, read in place (a reconciler write racing with it
    // gives either version of a field; the flow's retry finds the settled one).
    let backend = unsafe { &*backend };
    if backend.is_empty() {
        if cfg.flags & CFG_F_DROP_NO_BACKEND == 0 && svc.flags & SVC_F_EMPTY != 0 {
            // Answered by `process`, outside this frame (as IPv4's `reject`).
            return Ok((TC_ACT_SHOT as i32, Reason::RejectNoBackend));
        }
        return Ok(exit(Reason::DropNoBackend));
    }
    if !is_zero(&backend.snat_addr) {
        return Err((u64::from(svc.id) << 32) | u64::from(backend_id));
    }
    // The pick is made: the epoch's second read comes after every table read above.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    let stamp = lb_common::epoch::stamp(before, crate::current_epoch());
    Ok(new_dnat_flow6(ctx, p, (svc.id, backend_id, stamp), backend))
}

/// The rest of a new flow to a DNAT backend.
#[inline(always)]
fn new_dnat_flow6(
    ctx: &TcContext,
    p: &Pkt6,
    (service_id, backend_id, stamp): (u32, u32, u64),
    backend: &Backend6,
) -> (i32, Reason) {
    let (flow, key, now, cfg) = (&p.flow, &p.key, p.now, config());
    let Some(w) = work() else {
        return exit(Reason::AbortMap);
    };
    let rk = &mut w.rkey;
    set_addr(&mut rk.saddr, &backend.addr);
    set_addr(&mut rk.daddr, &flow.saddr);
    rk.sport = backend.port;
    rk.dport = flow.sport;
    rk.proto = flow.proto;
    rk._pad = 0;
    rk._pad2 = 0;
    // Usually neither map holds the key: two inlined lookups, and `claim6`'s call only where
    // one does.
    if (CONNTRACK6.get_ptr(&w.rkey).is_some() && !claim6(&CONNTRACK6, &w.rkey, flow, now, cfg))
        || (CT_NEW6.get_ptr(&w.rkey).is_some() && !claim6(&CT_NEW6, &w.rkey, flow, now, cfg))
    {
        return exit(Reason::DropFlowConflict);
    }
    let (baddr, bport) = (&backend.addr, backend.port);
    if rewrite6(ctx, flow, false, baddr, bport).is_err() {
        return exit(Reason::AbortRewrite);
    }
    let (act, reason, in_ifindex) =
        route_to_backend6(ctx, p, backend_id, (baddr, bport), &flow.saddr, w);

    let h = &mut w.half;
    set_addr(&mut h.nat_addr, baddr);
    zero_addr(&mut h.fnat_addr);
    h.ct.nat_addr = 0;
    h.ct.nat_port = bport;
    h.ct.dir = DIR_FORWARD;
    h.ct.state = if ct::closes(flow.proto, flow.tcp_flags) {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    h.ct.backend_id = backend_id;
    h.ct.service_id = service_id;
    h.ct.last_seen_ns = now;
    h.ct.backend_ack = 0;
    h.ct.in_ifindex = in_ifindex;
    h.ct.fnat_addr = 0;
    h.ct.fnat_port = 0;
    h.ct.flags = 0;
    h.ct.lazy = 0;
    // Both halves carry the pick's epoch: a reply of the current epoch skips the forward half
    // (`reply6`).
    h.ct.epoch = stamp;
    let table = if ct::starts_unconfirmed(flow.proto) {
        &CT_NEW6
    } else {
        &CONNTRACK6
    };
    let fwd_ok = table.insert(key, &w.half, 0).is_ok();
    let h = &mut w.half;
    set_addr(&mut h.nat_addr, &flow.daddr);
    h.ct.nat_port = flow.dport;
    h.ct.dir = DIR_REPLY;
    clear_route(&mut h.ct.route);
    if !fwd_ok || table.insert(&w.rkey, &w.half, 0).is_err() {
        count(Reason::EventCtInsertFailed);
    }
    if flow.proto == IPPROTO_TCP && !ct::is_bare_syn(flow.proto, flow.tcp_flags) {
        count(Reason::EventCtMidstreamPickup);
    }
    account(service_id, backend_id, p.bytes, true);
    (act, reason)
}

/// A new flow to a full-NAT backend (`ids`: [`FULL_NAT6`] | service id << 32 | backend id, as
/// `new_flow6` picked them), first step (IPv4's `new_full_nat_flow`): routes it and builds its
/// reply entry and key (port still 0) in `WORK6`. Returns the packed verdict of the routing
/// with [`FULL_NAT6`] to go on with [`take_port6`] and [`finish_full_nat6`], or a packed
/// verdict without it to stop at. A global BPF function (see `crate::args`).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn new_full_nat_flow6(skb: *mut __sk_buff, p: *const Pkt6, ids: u64) -> u64 {
    let Some((ctx, p)) = args(skb, p) else {
        return pack(exit(Reason::AbortMap));
    };
    let ctx = &ctx;
    match start_full_nat6(ctx, p, ids) {
        Ok(v) => FULL_NAT6 | pack(v),
        Err(v) => pack(v),
    }
}

/// The table a new flow's pair goes to: CT_NEW6 for one that starts unconfirmed
/// (`ct::starts_unconfirmed`: TCP), CONNTRACK6 otherwise.
#[inline(always)]
fn new_table6(flow: &Flow6) -> &'static Table6 {
    if ct::starts_unconfirmed(flow.proto) {
        &CT_NEW6
    } else {
        &CONNTRACK6
    }
}

#[inline(always)]
fn start_full_nat6(ctx: &TcContext, p: &Pkt6, ids: u64) -> Result<(i32, Reason), (i32, Reason)> {
    let (flow, now) = (&p.flow, p.now);
    let (service_id, backend_id) = (((ids >> 32) as u32) & 0x7fff_ffff, ids as u32);
    let Some(backend) = BACKENDS6.get_ptr(backend_id) else {
        return Err(exit(Reason::AbortMap));
    };
    // SAFETY: a valid array value pointer, read in place (see `new_flow6`).
    let backend = unsafe { &*backend };
    if backend.is_empty() || is_zero(&backend.snat_addr) {
        // The slot changed since `new_flow6` read it: the client's retry finds the new state.
        return Err(exit(Reason::DropNoBackend));
    }
    let Some(w) = work() else {
        return Err(exit(Reason::AbortMap));
    };
    // Routed first: the reply entry that takes the port records where replies must arrive.
    let (act, reason, in_ifindex) = route_to_backend6(
        ctx,
        p,
        backend_id,
        (&backend.addr, backend.port),
        &backend.snat_addr,
        w,
    );
    set_route(&mut w.route, &w.half.ct.route);
    let h = &mut w.half;
    set_addr(&mut h.nat_addr, &flow.daddr);
    set_addr(&mut h.fnat_addr, &flow.saddr);
    h.ct.nat_addr = 0;
    h.ct.nat_port = flow.dport;
    h.ct.dir = DIR_REPLY;
    h.ct.state = if ct::closes(flow.proto, flow.tcp_flags) {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    h.ct.backend_id = backend_id;
    h.ct.service_id = service_id;
    h.ct.last_seen_ns = now;
    clear_route(&mut h.ct.route);
    h.ct.backend_ack = 0;
    h.ct.in_ifindex = in_ifindex;
    h.ct.fnat_addr = 0;
    h.ct.fnat_port = flow.sport;
    h.ct.flags = CT_F_FULLNAT;
    h.ct.lazy = 0;
    // Never stamped: IPv6 full NAT has no first-port rule (IPv4's `unstamp_first_port`), so
    // its replies always look the forward half up.
    h.ct.epoch = 0;
    let rk = &mut w.rkey;
    set_addr(&mut rk.saddr, &backend.addr);
    set_addr(&mut rk.daddr, &backend.snat_addr);
    rk.sport = backend.port;
    rk.dport = 0;
    rk.proto = flow.proto;
    rk._pad = 0;
    rk._pad2 = 0;
    Ok((act, reason))
}

/// The last step of a new full-NAT flow, its port taken: turns `WORK6`'s reply entry into the
/// forward one (backend and berth's address and port are the reply key's), records it and
/// rewrites both ends. A global BPF function (see `crate::args`); false if the rewrite failed.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn finish_full_nat6(skb: *mut __sk_buff, p: *const Pkt6) -> bool {
    let Some((ctx, p)) = args(skb, p) else {
        return false;
    };
    let ctx = &ctx;
    let flow = &p.flow;
    let Some(w) = work() else {
        return false;
    };
    let h = &mut w.half;
    set_addr(&mut h.nat_addr, &w.rkey.saddr);
    set_addr(&mut h.fnat_addr, &w.rkey.daddr);
    h.ct.nat_port = w.rkey.sport;
    h.ct.dir = DIR_FORWARD;
    set_route(&mut h.ct.route, &w.route);
    h.ct.fnat_port = w.rkey.dport;
    if new_table6(flow).insert(&p.key, &w.half, 0).is_err() {
        // The reply entry stays: a reply rebuilds the forward half from it, and a new flow may
        // take its port (it has no forward half).
        count(Reason::EventCtInsertFailed);
    }
    let rk = &w.rkey;
    if rewrite_both6(ctx, flow, (&rk.saddr, rk.sport), (&rk.daddr, rk.dport)).is_err() {
        return false;
    }
    if flow.proto == IPPROTO_TCP && !ct::is_bare_syn(flow.proto, flow.tcp_flags) {
        count(Reason::EventCtMidstreamPickup);
    }
    account(w.half.ct.service_id, w.half.ct.backend_id, p.bytes, true);
    true
}

/// Finds a free source port for a new full-NAT flow and takes it, as IPv4's `take_port`: sets
/// `WORK6`'s reply key's destination port to each of the flow's tries (`ct::snat_port` of its
/// hash) in turn, until one is free in both maps and the `BPF_NOEXIST` insert of the reply
/// entry into the flow's table succeeds. False when every try found the port taken. A global
/// BPF function (see `crate::args`; own frame, under which `port_free6`'s fits).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn take_port6(p: *const Pkt6) -> bool {
    // SAFETY: null or the caller's reference (see `crate::args`).
    let Some(p) = (unsafe { p.as_ref() }) else {
        return false;
    };
    // The map a constant in each call (see `take_full_nat_port`): fewer instructions for the
    // verifier than the map chosen at run time by the protocol.
    if core::ptr::eq(new_table6(&p.flow), &CT_NEW6) {
        take_port6_in(&CT_NEW6, p)
    } else {
        take_port6_in(&CONNTRACK6, p)
    }
}

/// [`take_port6`]'s search, in `table`: the tries under `bpf_loop` (as IPv4's, see
/// `take_port`: the callback is verified once, not once per try).
#[inline(always)]
fn take_port6_in(table: &'static Table6, p: &Pkt6) -> bool {
    let cfg = config();
    if !ct::has_snat_range(cfg) {
        return false;
    }
    let Some(w) = work() else {
        return false;
    };
    w.hash = flow_hash6(&p.key, cfg.hash_seed);
    w.claim_base = lb_common::claim::claim_base6(&w.rkey);
    w.taken = 0;
    w.second_pass = 0;
    w.time_wait_seen = 0;
    let callback = if core::ptr::eq(table, &CT_NEW6) {
        port_try6::<true> as *mut core::ffi::c_void
    } else {
        port_try6::<false> as *mut core::ffi::c_void
    };
    crate::claim::port_search(callback);
    // SAFETY: volatile reads of this CPU's slot, written by the callback.
    unsafe {
        // Every port tried held, some only by a TIME_WAIT mark: those are taken (as IPv4's).
        if core::ptr::read_volatile(&w.taken) == 0
            && core::ptr::read_volatile(&w.time_wait_seen) != 0
        {
            w.second_pass = 1;
            crate::claim::port_search(callback);
        }
        core::ptr::read_volatile(&w.taken) != 0
    }
}

/// [`take_port6`]'s `bpf_loop` callback, try `i`, in CT_NEW6 if `NEW`, else CONNTRACK6: the
/// try's port into `WORK6`'s reply key; if it is free in both maps and the `BPF_NOEXIST`
/// insert of the reply entry succeeds, marks the search done and returns 1 (stop), else 0.
extern "C" fn port_try6<const NEW: bool>(i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let (Some(w), Some(p)) = (work(), SCRATCH6.get_ptr(0)) else {
        return 1;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run (see `work`).
    let now = unsafe { (*p).now };
    let cfg = config();
    let table: &Table6 = if NEW { &CT_NEW6 } else { &CONNTRACK6 };
    // SAFETY: a volatile read of this CPU's slot (written before the loop).
    let hash = unsafe { core::ptr::read_volatile(&w.hash) };
    w.rkey.dport = ct::snat_try(cfg, hash, i as u32);
    // SAFETY: a volatile read of this CPU's slot (`take_port6_in` writes it between passes).
    if lb_common::claim::passes_marked(
        unsafe { core::ptr::read_volatile(&w.second_pass) } != 0,
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&w.time_wait_seen) },
    )
        // SAFETY: as above.
        && crate::claim::in_time_wait6(
            unsafe { core::ptr::read_volatile(&w.claim_base) },
            w.rkey.dport,
            now,
        )
    {
        w.time_wait_seen += 1;
        count(Reason::EventSnatPortTaken);
        return 0;
    }
    if port_free6(other6(table), &w.rkey, now)
        && port_free6(table, &w.rkey, now)
        && table
            .insert(&w.rkey, &w.half, u64::from(BPF_NOEXIST))
            .is_ok()
    {
        w.taken = 1;
        return 1;
    }
    count(Reason::EventSnatPortTaken);
    0
}

/// Whether full-NAT reply key `rkey` may be taken by a new flow in `table` (IPv4's
/// `port_free`): free, or what holds it is over (idle past its timeout, its forward half gone
/// or moved on, unconfirmed in CT_NEW6 longer than `ct::UNCONFIRMED_PORT_HOLD_NS`, or closed
/// both ways longer ago than `ct::port_reusable`'s hold), in which case the leftovers go. A
/// forward entry is never overwritten. A BPF subprogram (own stack frame).
#[inline(never)]
fn port_free6(table: &Table6, rkey: &FlowKey6, now: u64) -> bool {
    let cfg = config();
    let Some(r) = table.get_ptr(rkey) else {
        return true;
    };
    // SAFETY: a valid map value pointer, read in place.
    let r = unsafe { &*r };
    if r.ct.dir != DIR_REPLY {
        return false;
    }
    let fkey = forward_key6(rkey, r);
    // SAFETY: as above.
    let partner = table
        .get_ptr(&fkey)
        .is_some_and(|f| is_forward_of6(unsafe { &*f }, &fkey, rkey));
    let abandoned = core::ptr::eq(table, &CT_NEW6)
        && now.saturating_sub(r.ct.last_seen_ns) > ct::UNCONFIRMED_PORT_HOLD_NS;
    if partner
        && !abandoned
        && !ct::idle_expired(&r.ct, rkey.proto, now, cfg)
        && !ct::port_reusable(&r.ct, now, cfg)
    {
        return false;
    }
    if partner {
        let _ = table.remove(&fkey);
    }
    let _ = table.remove(rkey);
    true
}

/// Routes a new flow's first packet (from `src`: the client, or berth's full-NAT address),
/// reusing the backend's cached route while fresh (the cache is shared with IPv4: backend ids
/// are one space). Sets `w.half.ct.route` to the route the forward entry keeps; returns the
/// action, reason and the interface the backend lives behind.
#[inline(always)]
fn route_to_backend6(
    ctx: &TcContext,
    p: &Pkt6,
    backend_id: u32,
    (baddr, bport): (&[u32; 4], u16),
    src: &[u32; 4],
    w: &mut Work6,
) -> (i32, Reason, u32) {
    let (flow, now, cfg) = (&p.flow, p.now, config());
    let redirect = cfg.flags & CFG_F_REDIRECT != 0;
    let t = &mut w.tuple;
    set_addr(&mut t.src, src);
    set_addr(&mut t.dst, baddr);
    t.sport = flow.sport;
    t.dport = bport;
    let Some(cached) = BACKEND_ROUTES.get_ptr_mut(backend_id) else {
        fib6(ctx, flow, &w.tuple, &mut w.fib);
        set_route(&mut w.half.ct.route, &w.fib.route);
        let (act, reason) = send6(ctx, &w.fib, false, redirect);
        return (act, reason, w.fib.ifindex);
    };
    // SAFETY: a value pointer of an array map, valid for the run (see the IPv4 path).
    let cached = unsafe { &mut *cached };
    let fresh = now.wrapping_sub(cached.stamp_ns) <= ct::TOUCH_INTERVAL_NS;
    if cached.route.ifindex != 0 && fresh {
        set_route(&mut w.half.ct.route, &cached.route);
        let (act, reason) = if redirect {
            redirect6_cached(ctx, &cached.route, false)
        } else {
            (TC_ACT_OK as i32, Reason::PassTranslatedToStack)
        };
        return (act, reason, cached.route.ifindex);
    }
    // Looked up even without redirect: the backend's interface guards its replies.
    fib6(ctx, flow, &w.tuple, &mut w.fib);
    set_route(&mut cached.route, &w.fib.route);
    cached.stamp_ns = now;
    let (act, reason) = send6(ctx, &w.fib, false, redirect);
    if redirect {
        set_route(&mut w.half.ct.route, &w.fib.route);
    } else {
        clear_route(&mut w.half.ct.route);
    }
    (act, reason, w.fib.ifindex)
}

/// Rewrites the destination (`src == false`) or source address and port, fixing the L4
/// checksum (pseudo-header included) by hand, or for a `CHECKSUM_COMPLETE` skb with the
/// kernel's helper (see nat.rs for why). IPv6 has no header checksum.
#[inline(always)]
fn rewrite6(
    ctx: &TcContext,
    flow: &Flow6,
    src: bool,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), ()> {
    let l4 = flow.l4();
    let (addr_off, port_off, old_addr, old_port) = if src {
        (ETH_HLEN + 8, l4, &flow.saddr, flow.sport)
    } else {
        (ETH_HLEN + 24, l4 + 2, &flow.daddr, flow.dport)
    };
    let (csum_off, mangled0) = if flow.proto == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let da = diff16(old_addr, addr);
    let a = ptr_at::<[u32; 4]>(ctx, addr_off).ok_or(())?;
    let p = ptr_at::<u16>(ctx, port_off).ok_or(())?;
    // SAFETY: `ptr_at` checked both fields lie inside the packet; the checksum helpers below
    // come after the last direct access.
    unsafe {
        write_addr(a, addr);
        p.write_unaligned(port);
    }
    if flow.summed != summed::COMPLETE {
        // By hand, as for IPv4 (see `nat::l4_update`): a partial field takes the addresses'
        // difference only, a complete one the ports' too.
        return l4_update(
            ctx,
            csum_off,
            flow.summed,
            da,
            diff2(old_port, port),
            mangled0 != 0,
        );
    }
    // The addresses' difference, as a difference (size 0) flagged IPv6: with no header
    // checksum to compensate it, a CHECKSUM_COMPLETE skb's sum must not move (which the flag
    // tells the kernel). Kernels older than the flag refuse it and change nothing: the
    // difference then goes in as a 4-byte field change, as for IPv4.
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled0;
    if ctx
        .l4_csum_replace(csum_off, 0, u64::from(da), pseudo | u64::from(BPF_F_IPV6))
        .is_err()
    {
        ctx.l4_csum_replace(csum_off, 0, u64::from(da), pseudo | 4)
            .map_err(|_| ())?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled0 | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Rewrites both ends of a full-NAT flow's packet: destination `dst` and source `src`
/// (address, port): the L4 checksum by hand by the summed differences (as in [`rewrite6`]), or
/// for a `CHECKSUM_COMPLETE` skb one helper call for the addresses (pseudo-header) and one for
/// the ports, each with the summed difference of its fields.
#[inline(always)]
fn rewrite_both6(
    ctx: &TcContext,
    flow: &Flow6,
    dst: (&[u32; 4], u16),
    src: (&[u32; 4], u16),
) -> Result<(), ()> {
    let l4 = flow.l4();
    let (csum_off, mangled0) = if flow.proto == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let da = add(diff16(&flow.saddr, src.0), diff16(&flow.daddr, dst.0));
    let dp = add(diff2(flow.sport, src.1), diff2(flow.dport, dst.1));
    let src_a = ptr_at::<[u32; 4]>(ctx, ETH_HLEN + 8).ok_or(())?;
    let dst_a = ptr_at::<[u32; 4]>(ctx, ETH_HLEN + 24).ok_or(())?;
    let ports = ptr_at::<[u16; 2]>(ctx, l4).ok_or(())?;
    // SAFETY: `ptr_at` checked the fields lie inside the packet; the checksum helpers below
    // come after the last direct access.
    unsafe {
        write_addr(src_a, src.0);
        write_addr(dst_a, dst.0);
        ports.write_unaligned([src.1, dst.1]);
    }
    if flow.summed != summed::COMPLETE {
        // By hand (see `rewrite6`).
        return l4_update(ctx, csum_off, flow.summed, da, dp, mangled0 != 0);
    }
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled0;
    if ctx
        .l4_csum_replace(csum_off, 0, u64::from(da), pseudo | u64::from(BPF_F_IPV6))
        .is_err()
    {
        ctx.l4_csum_replace(csum_off, 0, u64::from(da), pseudo | 4)
            .map_err(|_| ())?;
    }
    ctx.l4_csum_replace(csum_off, 0, u64::from(dp), mangled0 | 4)
        .map_err(|_| ())?;
    Ok(())
}

/// An ICMPv6 error quoting a packet of a balanced flow, translated like the flow (see
/// `icmp_error`, full NAT included): from the client's side (Packet Too Big, time exceeded) about a
/// reply berth sent as service -> client, to the backend, quoting backend -> client, so Path
/// MTU discovery works for the backend; from the backend's side (port unreachable, ...) about
/// a packet sent as client -> backend, to the client, quoting client -> service. A global BPF
/// function (see `crate::args`).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn icmp_error6(skb: *mut __sk_buff, p: *mut Pkt6) -> u64 {
    let Some((ctx, _)) = args(skb, p) else {
        return pack(exit(Reason::AbortMap));
    };
    // SAFETY: not null (`args`), the caller's own reference.
    pack(icmp_error6_inner(&ctx, unsafe { &mut *p }))
}

#[inline(always)]
fn icmp_error6_inner(ctx: &TcContext, p: &mut Pkt6) -> (i32, Reason) {
    let q = &p.quote.inner;
    if port_flags(u16::from_be(q.sport)) & port_flag(q.proto, false) == 0
        && port_flags(u16::from_be(q.dport)) & port_flag(q.proto, true) == 0
    {
        return exit(Reason::PassNotTcpUdp);
    }
    if config().maglev_size == 0 {
        return exit(Reason::PassNotTcpUdp);
    }
    // The quoted packet's reverse: the key of the flow's entry for the error's direction.
    let k = &mut p.key;
    set_addr(&mut k.saddr, &q.daddr);
    set_addr(&mut k.daddr, &q.saddr);
    k.sport = q.dport;
    k.dport = q.sport;
    k.proto = q.proto;
    k._pad = 0;
    k._pad2 = 0;
    let Some(ent) = CONNTRACK6
        .get_ptr(&p.key)
        .or_else(|| CT_NEW6.get_ptr(&p.key))
    else {
        return exit(Reason::PassNotTcpUdp);
    };
    // SAFETY: valid map value pointer, read in place.
    let ent = unsafe { &*ent };
    let o = &p.flow;
    let reply = ent.ct.dir == DIR_REPLY;
    if reply && ent.ct.in_ifindex != 0 && ent.ct.in_ifindex != ingress_ifindex(ctx) {
        return exit(Reason::PassReplyWrongIface);
    }
    // Either way the error is addressed to the quoted packet's source (the client, or the
    // service address berth answered from).
    if o.daddr != q.saddr {
        return exit(Reason::PassNotTcpUdp);
    }
    if ttl_expires(o.hop_limit, config()) {
        return exit(Reason::PassTtlExpired);
    }
    let n = &mut p.nat;
    set_addr(&mut n.q_src, &q.saddr);
    n.q_src_port = q.sport;
    set_addr(&mut n.q_dst, &q.daddr);
    n.q_dst_port = q.dport;
    set_addr(&mut n.o_src, &o.saddr);
    set_addr(&mut n.o_dst, &o.daddr);
    let full = ent.ct.full_nat();
    if reply {
        // The quoted destination (the backend) becomes the service, and so does the outer
        // source if the backend itself sent the error (a router's own address is kept). Full
        // NAT: the quoted source and the outer destination (berth's address) become the
        // client.
        if o.saddr == q.daddr {
            set_addr(&mut n.o_src, &ent.nat_addr);
        }
        set_addr(&mut n.q_dst, &ent.nat_addr);
        n.q_dst_port = ent.ct.nat_port;
        if full {
            set_addr(&mut n.q_src, &ent.fnat_addr);
            n.q_src_port = ent.ct.fnat_port;
            set_addr(&mut n.o_dst, &ent.fnat_addr);
        }
    } else {
        // The quoted source (the service) and the outer destination become the backend. Full
        // NAT: the quoted destination (the client) becomes berth's address and port, and the
        // outer source berth's address.
        set_addr(&mut n.q_src, &ent.nat_addr);
        n.q_src_port = ent.ct.nat_port;
        set_addr(&mut n.o_dst, &ent.nat_addr);
        if full {
            set_addr(&mut n.q_dst, &ent.fnat_addr);
            n.q_dst_port = ent.ct.fnat_port;
            set_addr(&mut n.o_src, &ent.fnat_addr);
        }
    }
    if !rewrite_icmp6(ctx, p) {
        return exit(Reason::AbortRewrite);
    }
    count(Reason::EventIcmpTranslated);
    if config().flags & CFG_F_REDIRECT == 0 {
        return (TC_ACT_OK as i32, Reason::PassTranslatedToStack);
    }
    let Some(w) = work() else {
        return exit(Reason::AbortMap);
    };
    let t = &mut w.tuple;
    set_addr(&mut t.src, &p.nat.o_src);
    set_addr(&mut t.dst, &p.nat.o_dst);
    t.sport = 0;
    t.dport = 0;
    fib6(ctx, &p.flow, &w.tuple, &mut w.fib);
    send6(ctx, &w.fib, reply, true)
}

/// Rewrites an ICMPv6 error as `n` says. There is no IPv6 header checksum; the quoted L4
/// checksum is updated incrementally when the quote holds it (it covers data not quoted), and
/// the ICMPv6 checksum over all of it and over its pseudo-header (the outer addresses). Fields
/// are written directly, each checksum compensating its own change.
/// A BPF subprogram (own frame, beside the FIB lookup's).
#[inline(never)]
fn rewrite_icmp6(ctx: &TcContext, p: &Pkt6) -> bool {
    rewrite_icmp6_inner(ctx, &p.flow, &p.quote, &p.nat).is_ok()
}

#[inline(always)]
fn rewrite_icmp6_inner(ctx: &TcContext, o: &Flow6, e: &Quote6, n: &IcmpNat6) -> Result<(), ()> {
    let (icmp_off, inner_off, inner_l4_off) = e.offsets();
    let q = &e.inner;
    // Each field is written as soon as its difference is known (fewer live values: the
    // verifier's stack is what the spills take).
    let da = add(
        replace_addr(ctx, inner_off + 8, &q.saddr, &n.q_src)?,
        replace_addr(ctx, inner_off + 24, &q.daddr, &n.q_dst)?,
    );
    let qp = ptr_at::<[u16; 2]>(ctx, inner_l4_off).ok_or(())?;
    // SAFETY: `ptr_at` checked the two ports lie inside the packet.
    unsafe { qp.write_unaligned([n.q_src_port, n.q_dst_port]) };
    let dq = add(
        da,
        add(diff2(q.sport, n.q_src_port), diff2(q.dport, n.q_dst_port)),
    );
    let douter = add(
        replace_addr(ctx, ETH_HLEN + 8, &o.saddr, &n.o_src)?,
        replace_addr(ctx, ETH_HLEN + 24, &o.daddr, &n.o_dst)?,
    );
    let udp = q.proto != IPPROTO_TCP;
    let l4c_off = inner_l4_off + if udp { 6 } else { 16 };
    let icmpc = ptr_at::<u16>(ctx, icmp_off + 2).ok_or(())?;
    // SAFETY: `ptr_at` checked the field lies inside the packet.
    let mut icmp = apply(unsafe { icmpc.read_unaligned() }, add(dq, douter));
    // The quoted L4 checksum only if it lies inside the ICMPv6 message (not in padding).
    if l4c_off + 2 <= ETH_HLEN + 40 + usize::from(o.payload_len)
        && let Some(c) = ptr_at::<u16>(ctx, l4c_off)
    {
        // SAFETY: `ptr_at` checked the field lies inside the packet.
        unsafe {
            let old = c.read_unaligned();
            // A zero UDP checksum means "none" and stays so.
            if !(udp && old == 0) {
                let mut new = apply(old, dq);
                if udp && new == 0 {
                    new = 0xffff;
                }
                c.write_unaligned(new);
                icmp = replace2(icmp, old, new);
            }
        }
    }
    let icmpc = ptr_at::<u16>(ctx, icmp_off + 2).ok_or(())?;
    // SAFETY: as above.
    unsafe { icmpc.write_unaligned(icmp) };
    Ok(())
}

/// Writes the address at `off` (`old` there) as `new`; returns the checksum difference.
#[inline(always)]
fn replace_addr(ctx: &TcContext, off: usize, old: &[u32; 4], new: &[u32; 4]) -> Result<u16, ()> {
    let a = ptr_at::<[u32; 4]>(ctx, off).ok_or(())?;
    // SAFETY: `ptr_at` checked the 16 bytes lie inside the packet; TC programs may write packet
    // data directly.
    unsafe { write_addr(a, new) };
    Ok(diff16_sub(old, new))
}

/// [`diff16`] as a BPF subprogram: inlined four times in a row, LLVM interleaves the four and
/// spills what it cannot hold, more than the call chain's stack has.
#[inline(never)]
fn diff16_sub(old: &[u32; 4], new: &[u32; 4]) -> u16 {
    diff16(old, new)
}

/// What the FIB said about a translated IPv6 packet's next hop (see `nat::Fib`).
pub struct Fib6 {
    rc: i64,
    route: Route,
    ifindex: u32,
}

/// Looks up the next hop of a translated packet with tuple `t` into `out`. A BPF subprogram
/// (the parameter block lives in the per-CPU `FIB_SCRATCH` slot).
#[inline(never)]
fn fib6(ctx: &TcContext, flow: &Flow6, t: &Tuple6, out: &mut Fib6) {
    out.rc = -1;
    out.route = Route::NONE;
    out.ifindex = 0;
    // The parameter block in the per-CPU `FIB_SCRATCH` slot, not on the stack (see
    // `nat::fib_into`).
    let Some(p) = crate::maps::FIB_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs.
    let p = unsafe { &mut *p };
    // SAFETY: `bpf_fib_lookup` is a plain C struct of integers and unions of integers; all-zero
    // is a valid (empty) value.
    *p = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = flow.proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.__bindgen_anon_1.tot_len = flow.payload_len.saturating_add(40);
    // Traffic class and flow label (the version nibble masked off).
    p.__bindgen_anon_2.flowinfo = flow.flowinfo & u32::from_be(0x0fff_ffff);
    p.__bindgen_anon_3.ipv6_src = t.src;
    p.__bindgen_anon_4.ipv6_dst = t.dst;
    p.ifindex = ingress_ifindex(ctx);
    // SAFETY: `p` is a valid, writable `bpf_fib_lookup` of the size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    out.rc = rc;
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // SAFETY: on success the kernel filled the MAC member of this union.
        let macs = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
        out.route = Route {
            ifindex: p.ifindex,
            dmac: macs.dmac,
            smac: macs.smac,
        };
        out.ifindex = p.ifindex;
    } else if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        out.ifindex = p.ifindex;
    }
}

#[inline(always)]
fn reasons(reply: bool) -> (Reason, Reason) {
    if reply {
        (Reason::ReplyRedirect, Reason::ReplyRedirectNeigh)
    } else {
        (Reason::FwdRedirect, Reason::FwdRedirectNeigh)
    }
}

/// Decrements the hop limit of a packet berth forwards itself (no checksum covers it).
/// `Ok(false)`: it would expire here, so the packet goes to the stack instead.
#[inline(always)]
fn hop6(ctx: &TcContext) -> Result<bool, ()> {
    if crate::config_flags() & CFG_F_KEEP_TTL != 0 {
        return Ok(true);
    }
    let h = ptr_at::<u8>(ctx, ETH_HLEN + 7).ok_or(())?;
    // SAFETY: `ptr_at` checked the byte lies inside the packet.
    unsafe {
        if *h <= 1 {
            return Ok(false);
        }
        *h -= 1;
    }
    Ok(true)
}

/// Redirects along a known route: hop limit, MACs, egress device.
#[inline(always)]
fn redirect6_cached(ctx: &TcContext, route: &Route, reply: bool) -> (i32, Reason) {
    match hop6(ctx) {
        Ok(true) => {}
        Ok(false) => return (TC_ACT_OK as i32, Reason::PassTtlExpired),
        Err(()) => return (TC_ACT_SHOT as i32, Reason::AbortRewrite),
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return (TC_ACT_SHOT as i32, Reason::AbortRewrite);
    };
    // SAFETY: the 12 MAC bytes are inside the packet (checked by `ptr_at`).
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&route.dmac);
        eth[6..].copy_from_slice(&route.smac);
    }
    // SAFETY: plain helper call with an interface index.
    let act = unsafe { bpf_redirect(route.ifindex, 0) } as i32;
    (act, reasons(reply).0)
}

/// Sends a translated packet as the FIB said (see `nat::send`).
#[inline(always)]
fn send6(ctx: &TcContext, f: &Fib6, reply: bool, redirect: bool) -> (i32, Reason) {
    if !redirect {
        return (TC_ACT_OK as i32, Reason::PassTranslatedToStack);
    }
    if f.rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        redirect6_cached(ctx, &f.route, reply)
    } else if f.rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        match hop6(ctx) {
            Ok(true) => {}
            Ok(false) => return (TC_ACT_OK as i32, Reason::PassTtlExpired),
            Err(()) => return (TC_ACT_SHOT as i32, Reason::AbortRewrite),
        }
        // SAFETY: a null `params` asks the kernel to resolve the next hop itself.
        let act = unsafe { bpf_redirect_neigh(f.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
        (act, reasons(reply).1)
    } else if f.rc == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED) {
        (TC_ACT_OK as i32, Reason::PassTranslatedToStack)
    } else {
        (TC_ACT_OK as i32, Reason::PassFibFailed)
    }
}
