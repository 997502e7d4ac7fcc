//! Address/port rewriting with checksum fix-ups, and routing of the rewritten packet.
//!
//! The TCP/UDP checksum is updated by hand when the program knows the skb's `ip_summed`
//! ([`ip_summed`], see lb-common's `summed`): a complete checksum takes every field's change, a
//! `CHECKSUM_PARTIAL` field (a local sender's or a veth's packet) only the addresses' (it holds
//! the pseudo-header's sum). A `CHECKSUM_COMPLETE` skb, or a kernel where the program could not
//! be given `ip_summed`, takes the kernel's `bpf_l4_csum_replace` (which also adjusts the
//! skb's own sum). A zero UDP checksum stays zero either way (`BPF_F_MARK_MANGLED_0`'s rule).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::{
    IPPROTO_TCP, Reason, Route,
    csum::{add, apply, diff2, diff4, replace2, replace4},
    summed,
};

use crate::{
    maps::FIB_SCRATCH,
    parse::{ETH_HLEN, Flow, IcmpQuote, ptr_at},
};

const AF_INET: u8 = 2;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client -> service becomes client -> backend.
    Dst,
    /// Backend -> client becomes service -> client.
    Src,
}

/// Rewrites the address and port on `side`, fixing the IPv4 and L4 checksums.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, side: Side, addr: u32, port: u16) -> Result<(), ()> {
    let l4 = flow.l4();
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Dst => (ETH_HLEN + 16, l4 + 2, flow.daddr, flow.dport),
        Side::Src => (ETH_HLEN + 12, l4, flow.saddr, flow.sport),
    };
    let (csum_off, mangled0) = if flow.proto == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };

    // Direct writes first: the checksum helpers below invalidate packet pointers. The IPv4
    // header checksum is always complete (never CHECKSUM_PARTIAL), so it is updated by hand.
    let a = ptr_at::<u32>(ctx, addr_off).ok_or(())?;
    let p = ptr_at::<u16>(ctx, port_off).ok_or(())?;
    let ipc = ptr_at::<u16>(ctx, ETH_HLEN + 10).ok_or(())?;
    // SAFETY: `ptr_at` checked all three fields lie inside the packet; TC programs may write
    // packet data directly (the verifier un-clones the skb head first).
    unsafe {
        a.write_unaligned(addr);
        p.write_unaligned(port);
        ipc.write_unaligned(replace4(ipc.read_unaligned(), old_addr, addr));
    }

    if flow.summed != summed::COMPLETE {
        return l4_update(
            ctx,
            csum_off,
            flow.summed,
            diff4(old_addr, addr),
            diff2(old_port, port),
            mangled0 != 0,
        );
    }
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled0 | 4,
        )
        .map_err(|_| ())?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled0 | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// The skb's `ip_summed` (lb-common's `summed`): the kernel's `struct sk_buff` by the kfunc
/// `bpf_cast_to_kern_ctx`, then the byte holding the bitfield, shifted. The three instructions
/// are raw words whose placeholders userspace patches at load time (the kfunc's BTF id, the
/// byte, the bit); on a kernel without them they yield `COMPLETE` (the helpers' path).
#[inline(always)]
pub fn ip_summed(ctx: &TcContext) -> u8 {
    let r0: u64;
    // SAFETY: the call takes the context in r1 and returns a pointer the verifier types as the
    // kernel's `struct sk_buff`, of which one byte is read; r1-r5 are clobbered as by any call.
    unsafe {
        core::arch::asm!(
            ".8byte {call}",
            ".8byte {load}",
            ".8byte {shift}",
            call = const summed::CALL,
            load = const summed::LOAD,
            shift = const summed::SHIFT,
            inout("r1") ctx.as_ptr() => _,
            lateout("r0") r0,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly),
        );
    }
    (r0 & 3) as u8
}

/// The L4 checksum field at `off` after changes whose summed difference is `addrs` (fields of
/// the pseudo-header) and `ports` (fields the checksum covers in the segment itself), by hand:
/// a `CHECKSUM_PARTIAL` field holds the pseudo-header's sum, not inverted, and takes only
/// `addrs`; a complete one takes both. Zero UDP checksums stay zero, and an update that makes
/// one zero writes 0xffff (`mangled0`: the helpers' `BPF_F_MARK_MANGLED_0`).
#[inline(always)]
pub(crate) fn l4_update(
    ctx: &TcContext,
    off: usize,
    summed: u8,
    addrs: u16,
    ports: u16,
    mangled0: bool,
) -> Result<(), ()> {
    let c = ptr_at::<u16>(ctx, off).ok_or(())?;
    // SAFETY: `ptr_at` checked the field lies inside the packet; TC programs may write packet
    // data directly (no helper call since the pointers were checked).
    unsafe {
        let v = c.read_unaligned();
        if mangled0 && v == 0 {
            return Ok(());
        }
        let v = if summed == summed::PARTIAL {
            add(v, addrs)
        } else {
            apply(v, add(addrs, ports))
        };
        c.write_unaligned(if mangled0 && v == 0 { 0xffff } else { v });
    }
    Ok(())
}

/// Rewrites both ends of a full-NAT flow's packet: destination `dst` and source `src` (address,
/// port), fixing the IPv4 checksum by hand and the L4 one by the summed differences of the
/// addresses (part of the pseudo-header, which a `CHECKSUM_PARTIAL` field holds) and of the
/// ports: by hand ([`l4_update`]), or for a `CHECKSUM_COMPLETE` skb with two helper calls, one
/// per kind (`bpf_l4_csum_replace` with `from = 0` adds `to` as a difference).
#[inline(always)]
pub fn rewrite_both(
    ctx: &TcContext,
    flow: &Flow,
    dst: (u32, u16),
    src: (u32, u16),
) -> Result<(), ()> {
    let l4 = flow.l4();
    let (csum_off, mangled0) = if flow.proto == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let addrs = ptr_at::<[u32; 2]>(ctx, ETH_HLEN + 12).ok_or(())?;
    let ports = ptr_at::<[u16; 2]>(ctx, l4).ok_or(())?;
    let ipc = ptr_at::<u16>(ctx, ETH_HLEN + 10).ok_or(())?;
    let da = add(diff4(flow.saddr, src.0), diff4(flow.daddr, dst.0));
    // SAFETY: `ptr_at` checked all three fields lie inside the packet; TC programs may write
    // packet data directly (the checksum helpers below come after the last direct access).
    unsafe {
        addrs.write_unaligned([src.0, dst.0]);
        ports.write_unaligned([src.1, dst.1]);
        ipc.write_unaligned(apply(ipc.read_unaligned(), da));
    }
    let dp = add(diff2(flow.sport, src.1), diff2(flow.dport, dst.1));
    if flow.summed != summed::COMPLETE {
        return l4_update(ctx, csum_off, flow.summed, da, dp, mangled0 != 0);
    }
    ctx.l4_csum_replace(
        csum_off,
        0,
        u64::from(da),
        u64::from(BPF_F_PSEUDO_HDR) | mangled0 | 4,
    )
    .map_err(|_| ())?;
    ctx.l4_csum_replace(csum_off, 0, u64::from(dp), mangled0 | 4)
        .map_err(|_| ())?;
    Ok(())
}

/// What an ICMP error quoting a balanced flow becomes: the quoted packet's source and
/// destination (address, port), and the outer source and destination addresses. Fields that
/// stay the same are given their old values.
pub struct IcmpNat {
    pub q_src: (u32, u16),
    pub q_dst: (u32, u16),
    pub o_src: u32,
    pub o_dst: u32,
}

/// Rewrites an ICMP error quoting a balanced flow as `n` says. Every checksum is updated
/// incrementally: the outer and quoted IPv4 headers', the quoted L4 one when the quote holds it
/// (it covers data not quoted, so it cannot be recomputed), and the ICMP one over all of it.
/// All fields are written directly: each checksum update compensates its own change, so a
/// `CHECKSUM_COMPLETE` sum of the whole packet stays right.
#[inline(always)]
pub fn rewrite_icmp(ctx: &TcContext, o: &Flow, e: &IcmpQuote, n: &IcmpNat) -> Result<(), ()> {
    let (icmp_off, inner_off, inner_l4_off) = e.offsets();
    let q = &e.inner;
    let udp = q.proto != IPPROTO_TCP;
    let l4c_off = inner_l4_off + if udp { 6 } else { 16 };
    let qa = ptr_at::<[u32; 2]>(ctx, inner_off + 12).ok_or(())?;
    let qp = ptr_at::<[u16; 2]>(ctx, inner_l4_off).ok_or(())?;
    let ic = ptr_at::<u16>(ctx, inner_off + 10).ok_or(())?;
    let icmpc = ptr_at::<u16>(ctx, icmp_off + 2).ok_or(())?;
    let oa = ptr_at::<[u32; 2]>(ctx, ETH_HLEN + 12).ok_or(())?;
    let oc = ptr_at::<u16>(ctx, ETH_HLEN + 10).ok_or(())?;
    // The quoted L4 checksum only if it lies inside the ICMP message (not in frame padding).
    let l4c = if l4c_off + 2 <= ETH_HLEN + usize::from(o.tot_len) {
        ptr_at::<u16>(ctx, l4c_off)
    } else {
        None
    };
    let da = add(diff4(q.saddr, n.q_src.0), diff4(q.daddr, n.q_dst.0));
    let dp = add(diff2(q.sport, n.q_src.1), diff2(q.dport, n.q_dst.1));
    let douter = add(diff4(o.saddr, n.o_src), diff4(o.daddr, n.o_dst));
    // SAFETY: `ptr_at` checked every field lies inside the packet; TC programs may write packet
    // data directly; no helper runs between the checks and the writes.
    unsafe {
        let mut icmp = icmpc.read_unaligned();
        qa.write_unaligned([n.q_src.0, n.q_dst.0]);
        icmp = apply(icmp, da);
        let old_ic = ic.read_unaligned();
        let new_ic = apply(old_ic, da);
        ic.write_unaligned(new_ic);
        icmp = replace2(icmp, old_ic, new_ic);
        qp.write_unaligned([n.q_src.1, n.q_dst.1]);
        icmp = apply(icmp, dp);
        if let Some(c) = l4c {
            let old = c.read_unaligned();
            // A zero UDP checksum means "none" and stays so.
            if !(udp && old == 0) {
                let mut new = apply(old, add(da, dp));
                if udp && new == 0 {
                    new = 0xffff;
                }
                c.write_unaligned(new);
                icmp = replace2(icmp, old, new);
            }
        }
        icmpc.write_unaligned(icmp);
        oa.write_unaligned([n.o_src, n.o_dst]);
        oc.write_unaligned(apply(oc.read_unaligned(), douter));
    }
    Ok(())
}

/// The interface a packet arrived on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `as_ptr` is the program's `__sk_buff` context, valid for the whole run.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}

#[inline(always)]
fn fib_params(
    ctx: &TcContext,
    flow: &Flow,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
) -> bpf_fib_lookup {
    // SAFETY: `bpf_fib_lookup` is a plain C struct of integers and unions of integers; all-zero is
    // a valid (empty) value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = flow.proto;
    p.sport = sport;
    p.dport = dport;
    p.__bindgen_anon_1.tot_len = flow.tot_len;
    p.__bindgen_anon_2.tos = flow.tos;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    p.ifindex = ingress_ifindex(ctx);
    p
}

#[inline(always)]
fn reasons(reply: bool) -> (Reason, Reason) {
    if reply {
        (Reason::ReplyRedirect, Reason::ReplyRedirectNeigh)
    } else {
        (Reason::FwdRedirect, Reason::FwdRedirectNeigh)
    }
}

/// Decrements the TTL of a packet berth forwards itself (the stack's forwarding would have),
/// fixing the IPv4 header checksum. `Ok(false)`: the TTL would expire here, so the packet must
/// go to the stack instead (which drops it and sends ICMP time exceeded).
#[inline(always)]
fn hop(ctx: &TcContext) -> Result<bool, ()> {
    if crate::config_flags() & lb_common::CFG_F_KEEP_TTL != 0 {
        return Ok(true);
    }
    let word = ptr_at::<u16>(ctx, ETH_HLEN + 8).ok_or(())?;
    let ipc = ptr_at::<u16>(ctx, ETH_HLEN + 10).ok_or(())?;
    // SAFETY: `ptr_at` checked both fields lie inside the packet; TC programs may write packet
    // data directly.
    unsafe {
        let old = word.read_unaligned();
        // TTL is the first byte of the (TTL, protocol) word, in packet order.
        let mut b = old.to_ne_bytes();
        if b[0] <= 1 {
            return Ok(false);
        }
        b[0] -= 1;
        let new = u16::from_ne_bytes(b);
        word.write_unaligned(new);
        ipc.write_unaligned(replace2(ipc.read_unaligned(), old, new));
    }
    Ok(true)
}

/// Redirects along a known route: writes the MACs and hands the packet to the egress device.
#[inline(always)]
pub fn redirect_cached(ctx: &TcContext, route: &Route, reply: bool) -> (i32, Reason) {
    match hop(ctx) {
        Ok(true) => {}
        Ok(false) => return (TC_ACT_OK as i32, Reason::PassTtlExpired),
        Err(()) => return (aya_ebpf::bindings::TC_ACT_SHOT as i32, Reason::AbortRewrite),
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return (aya_ebpf::bindings::TC_ACT_SHOT as i32, Reason::AbortRewrite);
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

/// What the FIB said about a translated packet's next hop.
pub struct Fib {
    rc: i64,
    /// The route to cache (`Route::NONE` unless the lookup gave MACs).
    pub route: Route,
    /// The egress interface, when the FIB knows one (0 when the destination is local or
    /// unroutable).
    pub ifindex: u32,
}

/// Looks up the next hop of a translated packet with `tuple` (saddr, daddr, sport, dport).
#[inline(always)]
pub fn fib(ctx: &TcContext, flow: &Flow, tuple: (u32, u32, u16, u16)) -> Fib {
    let mut f = Fib {
        rc: 0,
        route: Route::NONE,
        ifindex: 0,
    };
    fib_into(ctx, flow, &tuple, &mut f);
    f
}

/// [`fib`] as a BPF subprogram. The lookup's 64-byte parameter block lives in the per-CPU
/// `FIB_SCRATCH` slot, not on the stack: every call chain that routes a packet ends here, and
/// the chain of a new full-NAT flow had no room left for an inlined tracked path above it.
#[inline(never)]
fn fib_into(ctx: &TcContext, flow: &Flow, tuple: &(u32, u32, u16, u16), out: &mut Fib) {
    // Written field by field into `out` (a `Fib` built here and copied took 32 more bytes of
    // this frame).
    out.rc = -1;
    out.route = Route::NONE;
    out.ifindex = 0;
    let (saddr, daddr, sport, dport) = *tuple;
    let Some(p) = FIB_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs (see `FIB_SCRATCH`).
    let p = unsafe { &mut *p };
    *p = fib_params(ctx, flow, saddr, daddr, sport, dport);
    // SAFETY: `p` is a valid, writable `bpf_fib_lookup` of the size we pass (a map value).
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

/// Sends a rewritten packet on its way as the FIB said: straight to the egress device when it
/// knows the route (bypassing netfilter, whose FORWARD policy on Docker hosts is DROP), else
/// back to the stack.
#[inline(always)]
pub fn send(ctx: &TcContext, f: &Fib, reply: bool, redirect: bool) -> (i32, Reason) {
    if !redirect {
        return (TC_ACT_OK as i32, Reason::PassTranslatedToStack);
    }
    if f.rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        redirect_cached(ctx, &f.route, reply)
    } else if f.rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        match hop(ctx) {
            Ok(true) => {}
            Ok(false) => return (TC_ACT_OK as i32, Reason::PassTtlExpired),
            Err(()) => return (aya_ebpf::bindings::TC_ACT_SHOT as i32, Reason::AbortRewrite),
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

/// Looks up and sends a rewritten packet (see [`fib`] and [`send`]). Returns the TC action, the
/// exit reason to count, and the route to cache (`Route::NONE` when there is nothing to cache).
#[inline(always)]
pub fn route(
    ctx: &TcContext,
    flow: &Flow,
    tuple: (u32, u32, u16, u16),
    reply: bool,
    redirect: bool,
) -> (i32, Reason, Route) {
    if !redirect {
        return (TC_ACT_OK as i32, Reason::PassTranslatedToStack, Route::NONE);
    }
    let f = fib(ctx, flow, tuple);
    let (act, reason) = send(ctx, &f, reply, true);
    (act, reason, f.route)
}

/// `*dst = *src` for 16 bytes of four words (an IPv6 address), word by word. A plain assignment
/// between two map values (which LLVM cannot prove apart) became a call to the eBPF build's
/// byte-wise `memmove` subprogram, and a zeroing store (`[0; 4]`, `Route::NONE`) a call to
/// `memset`: 16 loop rounds each, several per new flow.
#[inline(always)]
pub(crate) fn set_addr(dst: &mut [u32; 4], src: &[u32; 4]) {
    // Volatile stores: plain ones were merged back into the `memmove` call.
    for (d, s) in dst.iter_mut().zip(src) {
        // SAFETY: `d` is a valid, aligned, exclusive reference.
        unsafe { core::ptr::write_volatile(d, *s) };
    }
}

/// `*dst = *src` for a route, word by word (see [`set_addr`]; a `Route` is four aligned words).
#[inline(always)]
pub(crate) fn set_route(dst: &mut Route, src: &Route) {
    // SAFETY: `Route` is `repr(C)`, 16 bytes, 4-aligned: valid as `[u32; 4]` both ways.
    let (d, s) = unsafe {
        (
            &mut *(dst as *mut Route).cast::<[u32; 4]>(),
            &*(src as *const Route).cast::<[u32; 4]>(),
        )
    };
    set_addr(d, s);
}

/// `*dst = Route::NONE` without the `memset` call (see [`set_addr`]).
#[inline(always)]
pub(crate) fn clear_route(dst: &mut Route) {
    // SAFETY: as in `set_route`.
    zero_addr(unsafe { &mut *(dst as *mut Route).cast::<[u32; 4]>() });
}

/// `*dst = [0; 4]` without the `memset` call (see [`set_addr`]).
#[inline(always)]
pub(crate) fn zero_addr(dst: &mut [u32; 4]) {
    for d in dst.iter_mut() {
        // SAFETY: as in `set_addr`.
        unsafe { core::ptr::write_volatile(d, 0) };
    }
}
