//! berth's TC ingress program: Maglev-hashed DNAT of client -> service packets to a backend,
//! with LRU connection tracking, and the reverse translation of backend -> client replies.
//! Backends that are not behind this host (their replies would not come back through it) get
//! full NAT: the source becomes berth's own address and a port allocated per flow.
//!
//! One conntrack lookup keyed by the packet's own 5-tuple serves both directions: a forward
//! entry (client -> service) says which backend to rewrite to, a reply entry (backend -> client,
//! or backend -> berth's address and port) says which service address to rewrite the source back
//! to (and, for full NAT, which client to send to). New flows go through the service table and
//! the service's Maglev row; the usual new TCP flow waits for its backend's first reply in the
//! handshake table (`syn`) rather than in an LRU map. Every exit is counted by reason (see
//! lb-common's `reason` module for the action policy).
#![no_std]
#![no_main]
// `atomic_cxchg`: the target's `atomic-cas` is off (no compare-and-swap before BPF's v3 CPU in
// general), but the kernel verifies a 64-bit `BPF_CMPXCHG` on a map value for any program,
// and LLVM emits it for the default CPU.
#![feature(core_intrinsics, asm_experimental_arch)]
#![allow(internal_features)]

mod claim;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod syn;
mod v6;
mod xdp;
mod xdp6;

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::classifier,
    maps::LruHashMap,
    programs::TcContext,
};
use core::ptr::NonNull;
use lb_common::{
    Backend, CFG_F_DROP_NO_BACKEND, CFG_F_KEEP_TTL, CFG_F_REDIRECT, CtEntry, DpConfig, FlowKey,
    LazyOwners, Reason, Route, ServiceKey, ServiceValue,
    ct::{
        self, CT_F_FINAL, CT_F_FULLNAT, CT_F_LAST_ACK, DIR_FORWARD, DIR_REPLY, STATE_CLOSING,
        STATE_OPEN,
    },
    epoch,
    hash::flow_hash,
    port_flag,
};

use crate::{
    maps::{
        BACKEND_ROUTES, BACKENDS, CONNTRACK, CT_NEW, EPOCH, LAZY_REPLY, LOCAL_ADDRS, MAGLEV,
        NAT_SCRATCH, PORTS, SCRATCH, SERVICES, TC_V6, account, count,
    },
    nat::{
        IcmpNat, Side, clear_route, fib, ingress_ifindex, redirect_cached, rewrite, rewrite_both,
        rewrite_icmp, route, send, set_route,
    },
    parse::{Flow, IcmpQuote, Parsed, parse, tcp_data_len},
};

/// Written by userspace at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static BERTH_CONFIG: DpConfig = DpConfig::zeroed();

/// Only the `CFG_F_*` bits of the config.
#[inline(always)]
pub(crate) fn config_flags() -> u32 {
    config().flags
}

/// The config, read in place: each use loads only the fields it needs (a copy of the whole
/// 56-byte block per packet cost as many loads and stores).
#[inline(always)]
pub(crate) fn config() -> &'static DpConfig {
    let p: *const DpConfig = &BERTH_CONFIG;
    // SAFETY: `p` points to a static, valid for the program's life. The pointer goes through a
    // volatile read so the compiler cannot see which static it points to, and does not fold
    // the zeroed initial value that userspace overrides before loading.
    unsafe { &*core::ptr::read_volatile(&p) }
}

#[classifier]
pub fn berth_tc_ingress(ctx: TcContext) -> i32 {
    let (action, reason) = process(&ctx);
    count(reason);
    action
}

/// The IPv6 path (see `v6`), tail-called by [`berth_tc_ingress`] for IPv6 frames.
#[classifier]
pub fn berth_tc_ingress6(ctx: TcContext) -> i32 {
    let (action, reason) = unpack(v6::process(&ctx));
    count(reason);
    action
}

/// Does nothing: the floor `cargo xtask bench` measures BPF_PROG_TEST_RUN's own per-run cost
/// against. Never attached.
#[classifier]
pub fn berth_tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// A verdict packed into one register, for the BPF subprograms below (a BPF function returns one
/// 64-bit value): the TC action in the high half, the exit reason in the low half.
#[inline(always)]
fn pack((act, reason): (i32, Reason)) -> u64 {
    (u64::from(act as u32) << 32) | u64::from(reason as u32)
}

#[inline(always)]
fn unpack(v: u64) -> (i32, Reason) {
    // The low half is always a `Reason` written by `pack`; `AbortMap` guards the conversion
    // anyway.
    let reason = Reason::from_index(v as u32).unwrap_or(Reason::AbortMap);
    ((v >> 32) as u32 as i32, reason)
}

#[inline(always)]
fn exit(reason: Reason) -> (i32, Reason) {
    let act = if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    };
    (act as i32, reason)
}

type Table = LruHashMap<FlowKey, CtEntry>;

/// What every step of a packet's handling needs, built once in `process` in the per-CPU
/// `SCRATCH` slot and passed by reference to the BPF subprograms (a BPF function takes at most
/// five arguments, and the frames of a call chain share one 512-byte stack).
pub struct Pkt {
    flow: Flow,
    quote: IcmpQuote,
    key: FlowKey,
    now: u64,
    bytes: u64,
    /// This CPU's last clock read and the jiffies it was made at (see [`coarse_now`]); kept
    /// from packet to packet in the per-CPU slot.
    clock_jiffies: u64,
    clock_ns: u64,
}

/// `bpf_ktime_get_coarse_ns`, read at most once per jiffy on this CPU. The coarse clock only
/// advances with the tick that advances jiffies, so the value cached for the current jiffy is
/// what a read would return (at worst one tick old, if read on another CPU while the tick was
/// updating both). `bpf_jiffies64` is a plain load once the verifier inlines it; the clock read
/// is a helper call (~13 ns on every packet here).
#[inline(always)]
fn coarse_now(p: &mut Pkt) -> u64 {
    coarse_clock(&mut p.clock_jiffies, &mut p.clock_ns)
}

/// [`coarse_now`] with the per-CPU cache in `jiffies` and `ns` (the IPv6 path has its own).
#[inline(always)]
pub(crate) fn coarse_clock(jiffies: &mut u64, ns: &mut u64) -> u64 {
    // SAFETY: helper without arguments.
    let j = unsafe { bpf_jiffies64() };
    if j != *jiffies || *ns == 0 {
        // SAFETY: helper without arguments.
        *ns = unsafe { bpf_ktime_get_coarse_ns() };
        *jiffies = j;
    }
    *ns
}

/// A new full-NAT flow's entry (built as the reply half, then turned into the forward half)
/// and reply key, in the per-CPU `NAT_SCRATCH` slot.
pub struct NatScratch {
    half: CtEntry,
    rkey: FlowKey,
    /// The new full-NAT flow's route, kept here (read back with a volatile load) rather than
    /// in spill slots across the port search. (Not its verdict: a reason read back from a map
    /// loses the bound the verifier checks `unpack`'s index by.)
    route: Route,
    /// The new flow's flow hash (its source ports' tries, its set in the handshake table),
    /// written by `new_flow`.
    hash: u32,
    /// The port claim the port search took (`claim::take`), settled or given back by
    /// `finish_full_nat`; 0: none.
    claim: u64,
    /// The table epoch `new_flow` read before its pick (the first of the two reads a stamp
    /// needs; the second follows the backend's read in `new_full_nat_flow`).
    before: u64,
    /// The port search's pass: 0 the first (ports under a TIME_WAIT mark are passed by, up to
    /// `claim::TIME_WAIT_PASSES` of them), 1 the second (they are taken like free ones).
    second_pass: u32,
    /// How many ports the first pass passed by for their TIME_WAIT marks.
    time_wait_seen: u32,
}

/// A function the verifier would walk again at every call site, made one global BPF function
/// per conntrack map (`$ct` with CONNTRACK, `$new` with CT_NEW), each checked once, on its own
/// (global linkage in the program's BTF: `no_mangle`), around `$inner(table, ..)` inlined into
/// each; `$name(table, ..)` calls the one for `table` (a map cannot be an argument). The
/// reference arguments (`$p`) pass as raw pointers, tested for null (all the verifier knows of a
/// global function's pointer: null or valid for its size), `$none` the answer then (callers
/// pass references, so never); the rest (`$s`) as they are.
macro_rules! per_map {
    ($name:ident, $ct:ident, $new:ident, $inner:ident, ($($p:ident: $pt:ty),*), ($($s:ident: $st:ty),*), $none:expr) => {
        #[inline(always)]
        fn $name(table: &Table, $($p: &$pt,)* $($s: $st),*) -> bool {
            if core::ptr::eq(table, &CONNTRACK) {
                $ct($($p,)* $($s),*)
            } else {
                $new($($p,)* $($s),*)
            }
        }
        per_map!(@global $ct, CONNTRACK, $inner, ($($p: $pt),*), ($($s: $st),*), $none);
        per_map!(@global $new, CT_NEW, $inner, ($($p: $pt),*), ($($s: $st),*), $none);
    };
    (@global $fn:ident, $map:ident, $inner:ident, ($($p:ident: $pt:ty),*), ($($s:ident: $st:ty),*), $none:expr) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        extern "C" fn $fn($($p: *const $pt,)* $($s: $st),*) -> bool {
            $(
                // SAFETY: callers pass references (see the macro).
                let Some($p) = (unsafe { $p.as_ref() }) else {
                    return $none;
                };
            )*
            $inner(&$map, $($p,)* $($s),*)
        }
    };
}

/// A global BPF function's view of its context and packet-state arguments (see [`per_map!`] for
/// global functions): the verifier knows a `__sk_buff` pointer argument as the program's
/// context, and a pointer to the packet's state (`Pkt`, IPv6's `Pkt6`, a `Flow`) as null or
/// valid for its size. Callers pass [`raw`] and their own reference, so never `None`.
///
/// The subprograms `process` calls on the rarer paths (`pending`, `new_full_nat_flow`,
/// `finish_full_nat`, `lazy_reply`, `unrecorded_reply`, `icmp_error`, `reject::refuse`) are
/// global functions for the verifier's sake: static, each was walked again for every state its
/// call site was reached with (482,089 instructions for this program; with these global,
/// 254,411). What a global function returns is a scalar the verifier knows no bound of, which
/// is why [`unpack`] converts its reason rather than indexing a table by it. The established
/// paths (`forward_inner`, `reply`, `translate`) stay inlined, and `new_flow` static (see it).
#[inline(always)]
pub(crate) fn args<'a, T>(skb: *mut __sk_buff, p: *const T) -> Option<(TcContext, &'a T)> {
    // SAFETY: null or the caller's reference (see above).
    Some((TcContext::new(NonNull::new(skb)?), unsafe { p.as_ref() }?))
}

/// The context's `__sk_buff` pointer, for a global BPF function's argument (see [`args`]).
#[inline(always)]
pub(crate) fn raw(ctx: &TcContext) -> *mut __sk_buff {
    EbpfContext::as_ptr(ctx).cast()
}

/// The conntrack map a flow's pair does not live in.
#[inline(always)]
fn other(table: &'static Table) -> &'static Table {
    if core::ptr::eq(table, &CONNTRACK) {
        &CT_NEW
    } else {
        &CONNTRACK
    }
}

/// The table epoch this program may stamp a pick with or trust a stamp of (lb-common's
/// `epoch::stable`: even, settled for this program's instance), 0 if none. A volatile read:
/// a new flow reads it before and after its pick, and the two reads must stay two, in order.
#[inline(always)]
pub(crate) fn current_epoch() -> u64 {
    match EPOCH.get_ptr(0) {
        // SAFETY: a valid map value pointer; `Epoch` is `Copy`.
        Some(e) => epoch::stable(&unsafe { core::ptr::read_volatile(e) }, config().instance),
        None => 0,
    }
}

/// `table.get_ptr_mut(key)` with the map named at the call: the verifier inlines a map lookup
/// only where one call site always sees the same map, and a helper call through a map pointer
/// chosen at run time costs more than the lookup's own hashing.
#[inline(always)]
fn ct_lookup(table: &'static Table, key: &FlowKey) -> Option<*mut CtEntry> {
    if core::ptr::eq(table, &CONNTRACK) {
        CONNTRACK.get_ptr_mut(key)
    } else {
        CT_NEW.get_ptr_mut(key)
    }
}

/// Whether berth must not forward this packet because its TTL would expire on this hop. It is
/// then handed to the stack *untranslated*, so the ICMP time exceeded the stack sends quotes the
/// service address, never the backend's. Without redirect the stack forwards (and decrements)
/// every translated packet; with redirect berth does, unless told to keep the TTL.
#[inline(always)]
fn ttl_expires(ttl: u8, cfg: &DpConfig) -> bool {
    ttl <= 1 && (cfg.flags & CFG_F_REDIRECT == 0 || cfg.flags & CFG_F_KEEP_TTL == 0)
}

#[inline(always)]
fn process(ctx: &TcContext) -> (i32, Reason) {
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return exit(Reason::AbortMap);
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs (see `SCRATCH`).
    let p = unsafe { &mut *p };
    match parse(ctx, &mut p.flow, &mut p.quote) {
        Parsed::Flow => {}
        Parsed::IcmpError => {
            // The lazy service the quoted flow may be of, found here: under `icmp_error` the
            // call chain has no room for `lazy_owner_of`'s frame. The quote's reverse (the key
            // of the flow's entry for the direction the error travels) goes into the scratch
            // slot's key, where `icmp_error` reads it.
            let q = &p.quote.inner;
            p.key = FlowKey::new(q.daddr, q.saddr, q.dport, q.sport, q.proto);
            let owner = if port_flags(u16::from_be(q.dport)) & port_flag(q.proto, true) != 0 {
                lazy_owner_of(&p.key)
            } else {
                0
            };
            return unpack(icmp_error(raw(ctx), p, owner));
        }
        // IPv6 is a program of its own (the verifier's budget is per program): a tail call
        // never returns; if it fails (nothing at index 0) the frame is counted here.
        // SAFETY: the context is this program's own.
        Parsed::Ipv6 => {
            let _ = unsafe { TC_V6.tail_call(ctx, 0) };
            return exit(Reason::AbortMap);
        }
        Parsed::Exit(r) => return exit(r),
    }
    let flow = &p.flow;
    // A packet is possibly ours only if some service listens on its destination port (client ->
    // service) or some backend on its source port (a reply); everything else leaves here,
    // without a hash lookup.
    let service_port = port_flags(u16::from_be(flow.dport)) & port_flag(flow.proto, false) != 0;
    if !service_port && port_flags(u16::from_be(flow.sport)) & port_flag(flow.proto, true) == 0 {
        return exit(Reason::PassNoService);
    }
    let cfg = config();
    if cfg.maglev_size == 0 {
        return exit(Reason::PassNoService);
    }
    if ttl_expires(p.flow.ttl, cfg) {
        return exit(Reason::PassTtlExpired);
    }
    p.flow.summed = nat::ip_summed(ctx);
    let flow = &p.flow;
    p.key = FlowKey::new(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    p.now = coarse_now(p);
    p.bytes = u64::from(ctx.len());
    let p = &*p;
    let (flow, key, now) = (&p.flow, &p.key, p.now);

    let (mut e, mut table): (*mut CtEntry, &'static Table) =
        if let Some(e) = CONNTRACK.get_ptr_mut(&key) {
            (e, &CONNTRACK)
        } else if let Some(e) = CT_NEW.get_ptr_mut(&key) {
            (e, &CT_NEW)
        } else {
            (core::ptr::null_mut(), &CONNTRACK)
        };
    // A flow pending in the handshake table (TCP only) moves to CT_NEW with this packet;
    // either way the flow hash comes back for `new_flow`.
    let mut hashed = 0;
    if e.is_null() && service_port && flow.proto == lb_common::IPPROTO_TCP {
        hashed = pending(p);
        if hashed & SYN_PROMOTED != 0
            && let Some(m) = CT_NEW.get_ptr_mut(key)
        {
            (e, table) = (m, &CT_NEW);
        }
    }
    // The reply entry this packet is translated by, if it is a reply: found at once, or
    // written now for a flow recorded lazily or a pending full-NAT handshake.
    let mut rev: (*mut CtEntry, &'static Table) = (core::ptr::null_mut(), &CONNTRACK);
    // Or the forward entry of an established flow this packet is sent on by.
    let mut fwd: (*mut CtEntry, &'static Table) = (core::ptr::null_mut(), &CONNTRACK);
    if !e.is_null() {
        // SAFETY: a value pointer returned by the map lookup stays valid for this run (RCU).
        // Other CPUs may update the same entry; the fields we race on (state, last_seen_ns,
        // backend_ack) are plain integers where either write is acceptable.
        let f = unsafe { &mut *e };
        if f.dir == DIR_REPLY {
            rev = (e, table);
        } else if ct::expired(f, flow.proto, flow.tcp_flags, now, cfg) {
            // Idle past its timeout, or a bare SYN reusing a closed flow's tuple: the flow is
            // over, both halves go, and this packet starts anew.
            count(Reason::EventCtExpired);
            let rkey = ct::reply_key(key, f);
            remove_reply_of(table, &rkey, key);
            let _ = table.remove(key);
        } else if core::ptr::eq(table, &CT_NEW)
            && ct::handshake_confirms(f, flow.tcp_flags, flow.ack)
        {
            // The client's ACK of its backend's SYN-ACK: the flow is confirmed and its pair
            // moves to the main map, out of reach of floods of flows that prove nothing.
            if !confirm(key, f, core::ptr::null()) {
                count(Reason::EventCtInsertFailed);
                return unpack(forward(ctx, p, f, &CT_NEW));
            }
            if let Some(m) = CONNTRACK.get_ptr_mut(key) {
                // A flow that keeps a reply half (full NAT, or DNAT to a backend's service
                // beyond its lazy ones) goes into the reply index: its forward packets then
                // skip it.
                // SAFETY: as above.
                if unsafe { (*m).lazy } == 0 {
                    let _ = index_flow(key, m);
                }
                // SAFETY: as above.
                let m = unsafe { &mut *m };
                return unpack(forward(ctx, p, m, &CONNTRACK));
            }
            // Evicted at once by a concurrent insert: handled as a new flow (the same Maglev
            // pick while the backend set is unchanged).
        } else {
            fwd = (e, table);
        }
    } else if port_flags(u16::from_be(flow.sport)) & port_flag(flow.proto, true) != 0 {
        // Maybe the first reply of a flow recorded without its reply entry (see
        // `lazy_reply`), or of a pending full-NAT handshake (see `claimed_reply`): the entry is
        // written now and the packet handled as a reply.
        let code = match lazy_owner_of(key) {
            0 => LAZY_NONE,
            owner => lazy_reply(raw(ctx), p, owner),
        };
        let code = match code {
            LAZY_NONE => unrecorded_reply(raw(ctx), p),
            code => code,
        };
        match code {
            LAZY_NONE => {}
            LAZY_WRONG_IFACE => return exit(Reason::PassReplyWrongIface),
            code => {
                let table = if code == LAZY_IN_CT_NEW {
                    &CT_NEW
                } else {
                    &CONNTRACK
                };
                if let Some(e) = ct_lookup(table, key) {
                    rev = (e, table);
                }
            }
        }
    }
    // Both tracked paths inlined: a BPF subprogram call and return cost ~11 ns here (the
    // forward path measured as a call: 89 -> 101 ns). Their checks first, then `translate`,
    // with the side a constant in each of its two copies (one copy taking the side at run time
    // cost the forward path ~6 ns; the side taken from which path ran rather than carried in
    // the `Step` made this frame 200 bytes). With `reply` translating inside and deciding the
    // flow's confirmation after, what stayed live across its translation grew this frame from
    // 168 to 216 bytes, and the call chains under it (`pending`, `new_flow`) past the
    // verifier's 512 (each frame counts rounded up to 32); decided before, the frame is 184.
    let step = if !rev.0.is_null() {
        // SAFETY: a value pointer returned by a map lookup (see above).
        reply(ctx, p, unsafe { &mut *rev.0 }, rev.1)
    } else if !fwd.0.is_null() {
        // SAFETY: as above.
        forward_inner(ctx, p, unsafe { &mut *fwd.0 }, fwd.1)
    } else {
        Step::Untracked
    };
    match step {
        Step::Verdict(v) => return v,
        Step::Translate {
            e,
            other,
            side,
            confirm,
        } => {
            // SAFETY: a map value pointer from `reply` or `forward_inner`.
            let e = unsafe { &mut *e };
            let v = if side == Side::Dst {
                translate(ctx, p, e, other, Side::Dst)
            } else {
                translate(ctx, p, e, other, Side::Src)
            };
            if confirm {
                // Once the translation has written the route into the entry (see `reply`);
                // outside this frame: the stack of the call chain is shared.
                confirm_by_reply(key);
            }
            return v;
        }
        Step::Untracked => {}
    }
    if !service_port {
        return exit(Reason::PassNoService);
    }
    let v = new_flow(ctx, p, hashed);
    if v & FULL_NAT != 0 {
        // Outside `new_flow`'s frame (the stack of the call chain is shared).
        let v = new_full_nat_flow(raw(ctx), p, v);
        if v & FULL_NAT == 0 {
            return unpack(v);
        }
        if !take_full_nat_port(p) {
            return exit(Reason::DropSnatExhausted);
        }
        if !finish_full_nat(raw(ctx), p) {
            return exit(Reason::AbortRewrite);
        }
        // The routing's verdict, kept in a register (read back from a map, the verifier would
        // know no bound of its reason).
        return unpack(v & !FULL_NAT);
    }
    let verdict = unpack(v);
    if verdict.1 == Reason::RejectNoBackend {
        return unpack(reject::refuse(raw(ctx), &p.flow));
    }
    verdict
}

/// [`pending_at`]: no handshake keyed so is pending.
const PENDING_NONE: u64 = 0;
/// [`pending_at`]: another flow's handshake is pending at the key (a newer flow of the client).
const PENDING_OTHER: u64 = 1;
/// [`pending_at`]: the reply entry's own full-NAT flow was pending, and is in CT_NEW now.
const PENDING_MOVED: u64 = 2;

/// The handshake table at forward key `fkey`, for the reply entry at `rkey` whose forward half
/// is in neither conntrack map: a full-NAT flow's forward entry waits there until its backend
/// answers (`finish_full_nat`), and moves to CT_NEW now if that reply entry is in CT_NEW
/// (`in_ct_new`) and the slot's flow is the entry's own ([`PENDING_MOVED`]); any other
/// handshake pending there (or being written) is a newer flow on the tuple
/// ([`PENDING_OTHER`]). A global BPF function (see `per_map`): inlined into `reply`, the
/// check's code on a rare branch cost the reply path's common one registers.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn pending_at(
    fkey: *const FlowKey,
    rkey: *const FlowKey,
    now: u64,
    in_ct_new: bool,
) -> u64 {
    // SAFETY: callers pass references (a global function: see `per_map`).
    let (Some(fkey), Some(rkey)) = (unsafe { (fkey.as_ref(), rkey.as_ref()) }) else {
        return PENDING_NONE;
    };
    let hash = flow_hash(fkey, config().hash_seed);
    // One pass over the set when nothing is pending there (the usual case of this branch).
    if !syn::holds(fkey, hash) {
        return PENDING_NONE;
    }
    let Some((idx, s)) = syn::find(fkey, hash) else {
        return PENDING_OTHER;
    };
    if !in_ct_new || !s.full_nat() || !s.is_forward_of(fkey, rkey) {
        return PENDING_OTHER;
    }
    // The entry built in the per-CPU `NAT_SCRATCH` slot (free on the reply path): on this
    // frame it took the call chain under `reply` past 512 bytes.
    let Some(n) = NAT_SCRATCH.get_ptr_mut(0) else {
        return PENDING_OTHER;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs (see `NAT_SCRATCH`).
    let n = unsafe { &mut *n };
    n.half = s.forward_entry(Route::NONE, 0);
    // (Stamped apart: with the epoch read before the entry is built, this frame took the
    // call chain under `reply` past 512 bytes.)
    n.half.epoch = epoch::from_slot(s.epoch, current_epoch());
    set_route(&mut n.half.route, &syn::route_of(n.half.backend_id, now));
    if syn::promote(fkey, idx, &n.half) {
        // The pair is in CT_NEW: its reply entry holds the port from now on.
        claim::release(rkey, idx);
        PENDING_MOVED
    } else {
        PENDING_OTHER
    }
}

/// Whether the flow client -> service key `fkey` picks in the current table epoch (lb-common's
/// `epoch`) has a reply entry in the main map stamped with that epoch, other than the entry at
/// `key` (stamped `stamp`) whose forward half the reply path is about to rebuild. The pick's
/// reply key: the backend and the client's tuple; for full NAT the backend and berth's address
/// with the first source port the flow tries. Such an entry is the tuple's newest flow's: no
/// flow on the tuple started after it (a new flow on the tuple in the epoch has the same reply
/// key, and takes it over, or, full NAT, removes the entry or clears its stamp when it passes
/// the port by, see `unstamp_first_port`), and a flow not stamped with the current epoch
/// started before it (or it would be stamped, or would have taken its port over). The entry at
/// `key` is then an older flow's leftover, both forward halves evicted: rebuilt, it would send
/// the client's packets to its backend again while the newer flow's replies, which skip the
/// forward lookup, still reached the client. (Not CT_NEW: its entries never skip, and one of
/// them may be stamped without being the newest, see `port_free`'s hold.) A global BPF function, on
/// the rebuild path only.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn newer_flow_holds(fkey: *const FlowKey, key: *const FlowKey, stamp: u64) -> bool {
    // SAFETY: callers pass references (a global function: see `per_map`).
    let (Some(fkey), Some(key)) = (unsafe { (fkey.as_ref(), key.as_ref()) }) else {
        return true;
    };
    let cur = current_epoch();
    if cur == 0 || stamp == cur {
        // Nothing trusts a stamp, or this entry is the newest flow's (its pick's key is its own).
        return false;
    }
    let cfg = config();
    let hash = flow_hash(fkey, cfg.hash_seed);
    let Some(b) = lookup_service(&fkey.daddr, fkey.dport, fkey.proto)
        .and_then(|svc| maglev_pick(&svc, hash, cfg))
        .and_then(|id| BACKENDS.get(id))
    else {
        return false;
    };
    if b.addr == 0 {
        return false;
    }
    let rkey = if b.snat_addr == 0 {
        FlowKey::new(b.addr, fkey.saddr, b.port, fkey.sport, fkey.proto)
    } else if ct::has_snat_range(cfg) {
        FlowKey::new(
            b.addr,
            b.snat_addr,
            b.port,
            ct::snat_try(cfg, hash, 0),
            fkey.proto,
        )
    } else {
        return false;
    };
    if ct::same_key(&rkey, key) {
        return false;
    }
    CONNTRACK.get_ptr(&rkey).is_some_and(|r| {
        // SAFETY: a valid map value pointer, read in place.
        let r = unsafe { &*r };
        r.epoch == cur && ct::is_reply_of(r, &rkey, fkey)
    })
}

/// [`pending`]: the low half of its result is the packet's flow hash.
const SYN_HASHED: u64 = 1 << 32;
/// [`pending`]: the packet's flow was pending in the handshake table and is in CT_NEW now.
const SYN_PROMOTED: u64 = 1 << 33;

/// A client -> service packet of no tracked flow: if its flow is pending in the handshake table
/// (`syn`: a flow recorded there by its first packet) and not over, the flow moves to CT_NEW
/// and the packet is handled as one of an unconfirmed flow. Returns the flow hash
/// ([`SYN_HASHED`]) and whether the flow moved ([`SYN_PROMOTED`]). A global BPF function (see
/// [`args`]).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn pending(p: *const Pkt) -> u64 {
    // SAFETY: null or the caller's reference.
    let Some(p) = (unsafe { p.as_ref() }) else {
        return 0;
    };
    let cfg = config();
    let hash = flow_hash(&p.key, cfg.hash_seed);
    let v = SYN_HASHED | u64::from(hash);
    let Some((idx, s)) = syn::find(&p.key, hash) else {
        return v;
    };
    // (`ct::expired` of the entry it becomes: an open entry's rule, see lb-common.)
    if s.idle_expired(p.now, cfg) {
        // Over: the packet starts a new flow, which `new_flow` records in this slot.
        count(Reason::EventCtExpired);
        return v;
    }
    let fwd = s.forward_entry(syn::route_of(s.backend_id, p.now), current_epoch());
    if !fwd.full_nat() {
        return if syn::promote(&p.key, idx, &fwd) {
            v | SYN_PROMOTED
        } else {
            v
        };
    }
    // A full-NAT handshake's port is held by its claim, which names this slot, until its
    // backend answers, then by its reply entry in CT_NEW: with neither (a new flow took the
    // port after the hold, or a flood evicted the entry), the handshake is over. Moved on, the
    // pair goes to CT_NEW, its reply entry written now if its backend has not answered yet.
    let rkey = ct::reply_key(&p.key, &fwd);
    // SAFETY: a valid map value pointer, read in place.
    if !CT_NEW
        .get_ptr(&rkey)
        .is_some_and(|r| ct::is_reply_of(unsafe { &*r }, &rkey, &p.key))
    {
        if claim::slot_holding(&rkey, p.now) != Some(idx) {
            syn::clear(idx, &p.key);
            count(Reason::EventCtExpired);
            return v;
        }
        let _ = CT_NEW.insert(&rkey, &s.reply_entry(fwd.epoch), u64::from(BPF_NOEXIST));
    }
    if syn::promote(&p.key, idx, &fwd) {
        claim::release(&rkey, idx);
        v | SYN_PROMOTED
    } else {
        v
    }
}

/// A packet to berth's address and a port of the full-NAT range that found no conntrack entry:
/// if the port's claim (lb-common's `claim`) names a pending full-NAT handshake whose reply key
/// is the packet's, this is its backend's first reply, and the flow's reply entry is written
/// into CT_NEW now, from the pending forward entry (the reply path then moves that one beside
/// it: `pending_at`). True if the reply entry is there to be looked up.
#[inline(always)]
fn claimed_reply(p: &Pkt) -> bool {
    let Some(rev) = pending_full_nat_reply(&p.key, p.now) else {
        return false;
    };
    // Not inserted if there (a concurrent reply on another CPU wrote it first).
    let _ = CT_NEW.insert(&p.key, &rev, u64::from(BPF_NOEXIST));
    true
}

/// The reply entry of the pending full-NAT handshake whose port's claim holds reply key `key`
/// (lb-common's `claim`), as the handshake's first reply writes it (`claimed_reply`); not
/// written here.
#[inline(always)]
fn pending_full_nat_reply(key: &FlowKey, now: u64) -> Option<CtEntry> {
    let s = syn::copy(claim::slot_holding(key, now)?)?;
    if !s.full_nat() || !s.is_forward_of(&s.key(), key) || s.idle_expired(now, config()) {
        return None;
    }
    Some(s.reply_entry(current_epoch()))
}

/// The forward entry in CONNTRACK of the confirmed flow whose forward key `fkey` the reply
/// index names at slot `i`, if that flow relies on the index (its entry is
/// `ct::LAZY_INDEXED`) and its reply key's slot is `i`; and whether that reply key is `rkey`.
#[inline(always)]
fn indexed_flow(fkey: &FlowKey, i: u32, rkey: &FlowKey) -> Option<(*mut CtEntry, bool)> {
    let f = CONNTRACK.get_ptr_mut(fkey)?;
    // SAFETY: a valid map value pointer, read in place.
    let fe = unsafe { &*f };
    if fe.dir != DIR_FORWARD || fe.lazy != ct::LAZY_INDEXED {
        return None;
    }
    let r = ct::reply_key(fkey, fe);
    (claim::index(&r) == i).then_some((f, ct::same_key(&r, rkey)))
}

/// Whether the flow at `f` (found by [`indexed_flow`]) is over (`ct::port_lapsed`, the rule
/// `port_free_in` judges a reply half by).
#[inline(always)]
fn indexed_flow_ended(fkey: &FlowKey, f: *mut CtEntry, now: u64) -> bool {
    // SAFETY: a valid map value pointer, read in place.
    ct::port_lapsed(unsafe { &*f }, fkey.proto, now, config())
}

/// [`indexed_flow_ended`], and if so its halves are removed, so that its packets no longer
/// lead to the port.
#[inline(always)]
fn indexed_flow_over(fkey: &FlowKey, f: *mut CtEntry, now: u64) -> bool {
    if !indexed_flow_ended(fkey, f, now) {
        return false;
    }
    // SAFETY: a valid map value pointer, read in place.
    let fe = unsafe { &*f };
    remove_reply_of(&CONNTRACK, &ct::reply_key(fkey, fe), fkey);
    let _ = CONNTRACK.remove(fkey);
    true
}

/// Writes the forward key `key` of a TCP flow just confirmed (its forward entry in CONNTRACK)
/// that keeps a reply half (full NAT, or DNAT to a service its backend does not serve lazily)
/// into the reply index (lb-common's `claim::MAP_FNAT_INDEX`) under the slot's claim
/// word, unless the word is busy or the slot names another live flow that relies on it; the
/// forward entry `f` (the caller's CONNTRACK value at `key`) becomes `ct::LAZY_INDEXED` then
/// (its forward packets skip the reply half). A global BPF function, called once `confirm` has
/// moved the pair (on its frame, the chain under it passed 512 bytes); the caller's pointer
/// spares it a lookup of its own.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn index_flow(key: *const FlowKey, f: *mut CtEntry) -> bool {
    // SAFETY: callers pass a reference and a map value pointer (a global function: see
    // `per_map`), valid for the run.
    let (Some(key), Some(fe)) = (unsafe { (key.as_ref(), f.as_mut()) }) else {
        return false;
    };
    let Some(p) = SCRATCH.get_ptr(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot, written by `process`.
    let now = unsafe { (*p).now };
    // A lazily recorded flow has its own way back (`lazy_reply`).
    if fe.dir != DIR_FORWARD
        || !matches!(fe.lazy, 0 | ct::LAZY_INDEXED)
        || key.proto != lb_common::IPPROTO_TCP
    {
        return false;
    }
    let rkey = ct::reply_key(key, fe);
    let i = claim::index(&rkey);
    let (Some(s), Some(held)) = (claim::index_slot(i), claim::lock(i, now)) else {
        return false;
    };
    // SAFETY: the slot's value pointer (a key to look up in place); only a CPU holding the
    // claim word writes it.
    let cur = unsafe { &*s };
    let free = ct::same_key(cur, key)
        || indexed_flow(cur, i, &rkey).is_none_or(|(g, _)| indexed_flow_over(cur, g, now));
    if free {
        // In this order (the entry, the slot, its bit): a reader that clears a bit it found
        // stale without the claim word looks at the slot again after (`forget_stale_slot`).
        fe.lazy = ct::LAZY_INDEXED;
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(s, *key) };
        claim::set_named(i, true);
    }
    claim::unlock(i, held);
    free
}

/// Whether full-NAT reply key `rkey`, whose claim word `i` the port search holds and whose
/// reply-index slot names a flow, is held by that flow: a live confirmed flow with that reply
/// key whose reply half may be gone (evicted) while its forward half lives and skips it. A slot
/// naming no such flow is cleared (and an indexed flow that is over, removed). A global BPF
/// function (the port search's callback calls it only where a slot names a flow).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn index_holds(rkey: *const FlowKey, i: u32, now: u64) -> bool {
    // SAFETY: callers pass a reference (a global function: see `per_map`).
    let Some(rkey) = (unsafe { rkey.as_ref() }) else {
        return true;
    };
    let Some(s) = claim::index_slot(i) else {
        return false;
    };
    // SAFETY: the slot's value pointer (a key to look up in place); the caller holds its claim
    // word.
    let cur = unsafe { &*s };
    if let Some((f, mine)) = indexed_flow(cur, i, rkey)
        && !indexed_flow_over(cur, f, now)
    {
        // Another reply key's live flow keeps the slot, not this key.
        return mine;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(s, FlowKey::new(0, 0, 0, 0, 0)) };
    claim::set_named(i, false);
    false
}

/// A packet from a backend port that found no conntrack entry, no lazily recorded flow and no
/// pending full-NAT handshake: if the reply index names a confirmed flow whose reply key is the
/// packet's (its reply half evicted while its forward half, which skips it, lives; the slot's
/// bit is read first, the slot only where it is set), the reply half is written into CONNTRACK
/// now from the forward entry (closing bits and last-seen time with it; the window from this
/// reply's acknowledgment on). One of the `LAZY_*` codes of [`lazy_reply`].
#[inline(always)]
fn indexed_reply(ctx: &TcContext, p: &Pkt) -> u64 {
    let key = &p.key;
    let Some(half) = indexed_half(key) else {
        return LAZY_NONE;
    };
    // Checked before anything is written: a forged reply from elsewhere leaves no trace.
    if half.in_ifindex != 0 && half.in_ifindex != ingress_ifindex(ctx) {
        return LAZY_WRONG_IFACE;
    }
    count(Reason::EventCtRebuilt);
    // Not inserted if there (a concurrent reply on another CPU wrote it first).
    let _ = CONNTRACK.insert(key, &half, u64::from(BPF_NOEXIST));
    LAZY_IN_CONNTRACK
}

/// The reply half of the confirmed flow that the reply index names for reply key `key` (the
/// slot's bit read first, the slot only where it is set), derived from its forward entry as
/// `indexed_reply` writes it; not written here.
#[inline(always)]
fn indexed_half(key: &FlowKey) -> Option<CtEntry> {
    let i = claim::index(key);
    let s = claim::index_slot(i).filter(|_| claim::index_named(i))?;
    // SAFETY: the slot's value pointer; a torn read (a concurrent write) names no flow whose
    // reply key is this one.
    let fkey = unsafe { core::ptr::read_volatile(s) };
    let Some((f, true)) = indexed_flow(&fkey, i, key) else {
        return None;
    };
    // SAFETY: a valid map value pointer; `CtEntry` is `Copy`.
    Some(ct::derived_reply(&fkey, unsafe { &*f }))
}

/// A packet from a backend port that found no conntrack entry and no lazily recorded flow: the
/// first reply of a pending full-NAT handshake ([`claimed_reply`], a port of the range), or a
/// reply of an indexed flow whose reply half was evicted ([`indexed_reply`]). One of the
/// `LAZY_*` codes of [`lazy_reply`]. A global BPF function (see [`args`]) holding both: inlined
/// into `process`, the second's call site alone cost the established forward path ~10 ns
/// (measured: the main frame's code laid out around it).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn unrecorded_reply(skb: *mut __sk_buff, p: *const Pkt) -> u64 {
    let Some((ctx, p)) = args(skb, p) else {
        return LAZY_NONE;
    };
    let ctx = &ctx;
    if claim::in_range(p.key.dport) && claimed_reply(p) {
        return LAZY_IN_CT_NEW;
    }
    indexed_reply(ctx, p)
}

/// [`lazy_reply`]: not the reply of a lazily recorded flow.
const LAZY_NONE: u64 = 0;
/// [`lazy_reply`]: the reply entry was written into CONNTRACK.
const LAZY_IN_CONNTRACK: u64 = 1;
/// [`lazy_reply`]: the reply entry was written into CT_NEW.
const LAZY_IN_CT_NEW: u64 = 2;
/// [`lazy_reply`]: the flow's reply, but from an interface its backend is not behind.
const LAZY_WRONG_IFACE: u64 = 3;

/// A packet that may be a backend's reply and found no conntrack entry: if its backend has a
/// lazy service (`LAZY_REPLY`) and the forward entry of that service's flow from the packet's
/// destination exists and sends to this backend, the flow's reply entry is written now, built
/// from the forward entry (its state, closing bits and last-seen time, so it expires with it),
/// in the map the forward entry is in. Only a DNAT forward entry keyed exactly so can match:
/// the backend serves that service address lazily, and no other flow's forward entry has that
/// key. A global BPF function (see [`args`]) returning one of the `LAZY_*` codes.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn lazy_reply(skb: *mut __sk_buff, p: *const Pkt, owner: u64) -> u64 {
    let Some((ctx, p)) = args(skb, p) else {
        return LAZY_NONE;
    };
    let ctx = &ctx;
    let key = &p.key;
    let Some((half, at, fwd)) = lazy_half(key, owner) else {
        return LAZY_NONE;
    };
    let code = if at == IN_CONNTRACK {
        LAZY_IN_CONNTRACK
    } else {
        LAZY_IN_CT_NEW
    };
    // Checked before anything is written: a forged reply from elsewhere leaves no trace.
    if half.in_ifindex != 0 && half.in_ifindex != ingress_ifindex(ctx) {
        return LAZY_WRONG_IFACE;
    }
    if at & 0xffff_ffff == IN_SYN {
        // The backend answers a handshake pending in the handshake table: its forward entry
        // moves to CT_NEW first (answered: see below), and the reply half joins it there.
        let fwd = CtEntry {
            nat_addr: key.saddr,
            nat_port: key.sport,
            dir: DIR_FORWARD,
            route: syn::route_of(half.backend_id, p.now),
            lazy: ct::LAZY_ANSWERED,
            ..half
        };
        if !syn::promote(&ct::forward_key(key, &half), (at >> 32) as u32, &fwd) {
            return LAZY_NONE;
        }
    }
    let ok = if code == LAZY_IN_CT_NEW {
        CT_NEW.insert(key, &half, 0).is_ok()
    } else {
        CONNTRACK.insert(key, &half, 0).is_ok()
    };
    if !ok {
        count(Reason::EventCtInsertFailed);
        return LAZY_NONE;
    }
    // The backend has answered: the flow keeps its key even while this half is missing again
    // (`ct::lazy_flow_keeps`).
    // SAFETY: a valid map value pointer (see `lazy_half`), or null for a flow that was
    // pending (answered above); a racing writer stores the same.
    unsafe {
        if !fwd.is_null() && (*fwd).lazy != 0 {
            (*fwd).lazy = ct::LAZY_ANSWERED;
        }
    }
    code
}

/// [`lazy_half`]: the forward entry is in CONNTRACK.
const IN_CONNTRACK: u64 = 0;
/// [`lazy_half`]: the forward entry is in CT_NEW.
const IN_CT_NEW: u64 = 1;
/// [`lazy_half`]: the flow is pending in the handshake table, at the slot in the high half.
const IN_SYN: u64 = 2;

/// Which of its backend's lazy services (`LAZY_REPLY`) reply key `key` may belong to, packed;
/// 0: none. A backend of one lazy service names it; of two, the first if `lazy_half` finds its
/// flow, else the second (whose flow the caller's `lazy_half` then looks for). A new flow of
/// one is refused while a live flow of the other holds its reply key (`lazy_others_hold`), so
/// at most one is the key's flow. A global BPF function (what follows is walked once, whichever it
/// was).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn lazy_owner_of(key: *const FlowKey) -> u64 {
    // SAFETY: callers pass a reference (a global function: see `per_map`).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 0;
    };
    const _: () = assert!(
        lb_common::LAZY_OWNERS == 2,
        "one slot to test, the other the rest"
    );
    let Some(s) = LAZY_REPLY.get_ptr(&ServiceKey::new(key.saddr, key.sport, key.proto)) else {
        return 0;
    };
    // SAFETY: a valid map value pointer; a slot is a word other CPUs only fill from 0.
    let (first, second) = unsafe {
        (
            core::ptr::read_volatile(&(*s).owners[0]),
            core::ptr::read_volatile(&(*s).owners[1]),
        )
    };
    if second == 0 {
        return first;
    }
    if lazy_half(key, first).is_some() {
        first
    } else {
        second
    }
}

/// The reply half of the lazily recorded flow of lazy service `owner` (packed, see
/// [`lazy_owner_of`]) whose reply key is `key` (backend -> client), built from its forward
/// entry, where that is (`IN_*`: CONNTRACK, CT_NEW, or pending in the handshake table with the
/// slot's index << 32), and the forward entry (a map value pointer, valid for the run; null
/// for a pending flow); None if there is no such flow.
#[inline(always)]
fn lazy_half(key: &FlowKey, owner: u64) -> Option<(CtEntry, u64, *mut CtEntry)> {
    let fkey = lazy_key(key, owner);
    let (f, at, fwd) = if let Some(f) = CONNTRACK.get_ptr_mut(&fkey) {
        // SAFETY: valid map value pointer; `CtEntry` is `Copy`.
        (unsafe { *f }, IN_CONNTRACK, f)
    } else if let Some(f) = CT_NEW.get_ptr_mut(&fkey) {
        // SAFETY: as above.
        (unsafe { *f }, IN_CT_NEW, f)
    } else {
        let (idx, slot) = syn::find(&fkey, flow_hash(&fkey, config().hash_seed))?;
        (
            slot.forward_entry(Route::NONE, current_epoch()),
            IN_SYN | (u64::from(idx) << 32),
            core::ptr::null_mut(),
        )
    };
    if !ct::is_forward_of(&f, &fkey, key) {
        return None;
    }
    Some((ct::derived_reply(&fkey, &f), at, fwd))
}

/// DNAT backend `bkey`'s LAZY_REPLY entry, and whether this flow's service (`mine`, packed) is
/// one of its lazy services: claimed into the first free slot if it is not yet and one of the
/// config's `lazy_owners` slots is free (a compare-and-swap from 0: a concurrent claim of that
/// slot on another CPU wins, and the search goes on past it). A backend without an entry gets
/// an empty one first (`BPF_NOEXIST`: a concurrent insert wins). None: the map is full (the
/// flow then keeps its reply entry).
#[inline(always)]
fn lazy_owners(bkey: &ServiceKey, mine: u64, cfg: &DpConfig) -> (Option<*mut LazyOwners>, bool) {
    let v = match LAZY_REPLY.get_ptr_mut(bkey) {
        Some(v) => v,
        None => {
            // From a global, not the stack: this frame is on the program's deepest call chain.
            let _ = LAZY_REPLY.insert(bkey, &NO_OWNERS, u64::from(BPF_NOEXIST));
            match LAZY_REPLY.get_ptr_mut(bkey) {
                Some(v) => v,
                None => return (None, false),
            }
        }
    };
    for i in 0..lb_common::LAZY_OWNERS {
        if i as u32 >= cfg.lazy_owners {
            break;
        }
        // SAFETY: a valid map value pointer, 8-aligned; its slots are read and filled
        // atomically (the one write is `claim::swap`'s).
        let w = unsafe { &raw mut (*v).owners[i] };
        // SAFETY: as above.
        let o = unsafe { core::ptr::read_volatile(w) };
        if o == mine
            || (o == 0
                // SAFETY: as above.
                && (claim::swap(w, 0, mine) || unsafe { core::ptr::read_volatile(w) } == mine))
        {
            return (Some(v), true);
        }
    }
    (Some(v), false)
}

/// A LAZY_REPLY entry with every slot free.
static NO_OWNERS: LazyOwners = LazyOwners {
    owners: [0; lb_common::LAZY_OWNERS],
};

/// Whether `owners` names a lazy service other than `mine`: `new_flow`'s test before
/// [`lazy_others_hold`], whose loop makes the same exits but whose paths the verifier then
/// walks with both slots unknown (the test first took 40,000 verifier instructions off the
/// IPv4 program).
#[inline(always)]
fn names_others(owners: *const LazyOwners, mine: u64) -> bool {
    // SAFETY: a valid map value pointer (see `lazy_owners`).
    let (a, b) = unsafe {
        (
            core::ptr::read_volatile(&(*owners).owners[0]),
            core::ptr::read_volatile(&(*owners).owners[1]),
        )
    };
    (a != 0 && a != mine) || (b != 0 && b != mine)
}

/// Whether a live flow of one of the lazy services in `owners` (a backend's LAZY_REPLY value)
/// other than `mine` holds reply key `rkey` without a reply entry (`lazy_flow_holds`, in slot
/// order), for a packet with `tcp_flags` at `now`. `mine`: the new DNAT flow's service
/// (packed), its packet from the reply key's client; 0 for a full-NAT flow's port search, whose
/// packet is not. Inlined: as a BPF subprogram its frame did not fit the call chain between
/// `new_flow` and `lazy_entry_holds`.
#[inline(always)]
fn lazy_others_hold(
    rkey: &FlowKey,
    owners: *const LazyOwners,
    mine: u64,
    tcp_flags: u8,
    now: u64,
) -> bool {
    for i in 0..lb_common::LAZY_OWNERS {
        // SAFETY: a valid map value pointer (see `lazy_owners`).
        let o = unsafe { core::ptr::read_volatile(&(*owners).owners[i]) };
        if o == 0 {
            return false;
        }
        if o != mine && lazy_flow_holds(rkey, o, tcp_flags, now, mine != 0) {
            return true;
        }
    }
    false
}

/// Whether a live flow of lazy service `owner` holds reply key `rkey` without a reply entry
/// (its forward entry, keyed from the reply key's client to the service, sends to the
/// backend): then no flow of another service may take the key, as if that reply entry were
/// there (see `claim`), unless the lazy flow is over for this packet (`ct::expired`) or has
/// proved nothing (`ct::lazy_flow_keeps`): then its forward entry is removed and the key is
/// free (a pending one judged expired is left: its slot's next packet finds it over too).
/// `names_client`: the new flow's packet comes from the reply key's client (a DNAT flow's).
/// The owner comes packed (`owner.addr << 16 | owner.port`): LLVM turns a reference to a
/// struct of two loaded fields into two arguments, and a sixth argument does not pass the
/// verifier. Two BPF subprograms called one after the other (the conntrack maps, then the
/// handshake table): one frame holding both did not fit the call chain's 512 bytes under
/// `new_flow`.
#[inline(always)]
fn lazy_flow_holds(
    rkey: &FlowKey,
    owner: u64,
    tcp_flags: u8,
    now: u64,
    names_client: bool,
) -> bool {
    match lazy_entry_holds(rkey, owner, tcp_flags, now, names_client) {
        LAZY_ABSENT => lazy_pending_holds(rkey, owner, tcp_flags, now, names_client),
        v => v == LAZY_HOLDS,
    }
}

/// [`lazy_entry_holds`]: the lazy flow holds the key.
const LAZY_HOLDS: u64 = 1;
/// [`lazy_entry_holds`]: no forward entry of the lazy flow in either conntrack map.
const LAZY_ABSENT: u64 = 2;

/// [`lazy_flow_holds`] in the conntrack maps: [`LAZY_HOLDS`], 0 (the key is free), or
/// [`LAZY_ABSENT`]. A global BPF function (`no_mangle`: global linkage in the program's BTF):
/// the verifier checks it once, on its own, where a static subprogram is walked again at each
/// of its call sites (six, inlined into `new_flow` and `held_lazily`'s callers). Its key comes
/// as a raw pointer the verifier may call with null, so it is tested.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn lazy_entry_holds(
    rkey: *const FlowKey,
    owner: u64,
    tcp_flags: u8,
    now: u64,
    names_client: bool,
) -> u64 {
    // SAFETY: callers pass a reference; a global function's pointer argument is only known
    // to be null or valid for its size.
    let Some(rkey) = (unsafe { rkey.as_ref() }) else {
        return LAZY_HOLDS;
    };
    let lkey = lazy_key(rkey, owner);
    let (f, table): (*const CtEntry, &Table) = if let Some(f) = CONNTRACK.get_ptr(&lkey) {
        (f, &CONNTRACK)
    } else if let Some(f) = CT_NEW.get_ptr(&lkey) {
        (f, &CT_NEW)
    } else {
        return LAZY_ABSENT;
    };
    // SAFETY: valid map value pointer, read in place.
    let f = unsafe { &*f };
    if !ct::is_forward_of(f, &lkey, rkey) {
        return 0;
    }
    if !ct::expired(f, rkey.proto, tcp_flags, now, config())
        && ct::lazy_flow_keeps(f, rkey.proto, tcp_flags, names_client)
    {
        return LAZY_HOLDS;
    }
    // The key goes to the new flow, and the lazy flow goes with it, expired or not: its
    // forward packets skip the reply half (`ct::forward_skips_reply`) on the promise that no
    // other flow holds its key while this entry lives. (Expired for a bare SYN only, a closing
    // flow's entry would still take its client's next segment.)
    let _ = table.remove(&lkey);
    0
}

/// [`lazy_flow_holds`] in the handshake table: the same rules, judged on the slot (an entry
/// built from it would not fit the frame, see lb-common's `SynSlot::is_forward_of`).
/// A global BPF function, checked once by the verifier (see [`lazy_entry_holds`]).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn lazy_pending_holds(
    rkey: *const FlowKey,
    owner: u64,
    tcp_flags: u8,
    now: u64,
    names_client: bool,
) -> bool {
    // SAFETY: as in `lazy_entry_holds`.
    let Some(rkey) = (unsafe { rkey.as_ref() }) else {
        return true;
    };
    let lkey = lazy_key(rkey, owner);
    // In place: a slot being written may count as the lazy flow's (the key stays held a
    // moment longer), never the other way round.
    let Some((slot, s)) = syn::locate(&lkey, flow_hash(&lkey, config().hash_seed)) else {
        return false;
    };
    if !s.is_lazy_forward_of(&lkey, rkey) || s.idle_expired(now, config()) {
        return false;
    }
    if ct::lazy_keeps(ct::LAZY_RECORDED, rkey.proto, tcp_flags, names_client) {
        return true;
    }
    syn::clear(slot, &lkey);
    false
}

/// The forward key of lazy service `owner`'s (packed) flow whose reply key is `rkey`.
#[inline(always)]
fn lazy_key(rkey: &FlowKey, owner: u64) -> FlowKey {
    let (addr, port) = LazyOwners::unpack(owner);
    FlowKey::new(rkey.daddr, addr, rkey.dport, port, rkey.proto)
}

/// Moves a confirmed flow's pair (forward entry `e` at `key`, and its reply half if present)
/// from CT_NEW to the main map. With `rkey` (may be null), only if the copy of `e` taken here
/// is the forward half of the flow whose reply key that is (`ct::is_forward_of`): a caller
/// holding `e` as a map value pointer then needs no copy of its own in its frame. A global BPF
/// function (see `per_map`).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn confirm(key: *const FlowKey, e: *const CtEntry, rkey: *const FlowKey) -> bool {
    // SAFETY: callers pass references (a global function: see `per_map`).
    let (Some(key), Some(e)) = (unsafe { (key.as_ref(), e.as_ref()) }) else {
        return false;
    };
    let mut fwd = *e;
    // SAFETY: as above; null where the caller has nothing to check.
    if let Some(rkey) = unsafe { rkey.as_ref() }
        && !ct::is_forward_of(&fwd, key, rkey)
    {
        return false;
    }
    ct::clear_handshake(&mut fwd);
    let rkey = ct::reply_key(key, &fwd);
    let rev = CT_NEW
        .get_ptr(&rkey)
        // SAFETY: valid map value pointer; `CtEntry` is `Copy`.
        .map(|r| unsafe { *r })
        .filter(|r| ct::is_reply_of(r, &rkey, key));
    let moved = CONNTRACK.insert(key, &fwd, 0).is_ok()
        && rev.is_none_or(|r| CONNTRACK.insert(&rkey, &r, 0).is_ok());
    if !moved {
        return false;
    }
    let _ = CT_NEW.remove(key);
    if rev.is_some() {
        let _ = CT_NEW.remove(&rkey);
    }
    true
}

/// What is left to do for a packet of a tracked flow once [`forward_inner`] or [`reply`] has
/// checked and updated its entries.
enum Step {
    /// Nothing: this is the packet's verdict.
    Verdict((i32, Reason)),
    /// [`translate`] it by entry `e` (`other`: its pair's other half, if looked up), then, if
    /// `confirm`, confirm its flow (`confirm_by_reply`).
    Translate {
        e: *mut CtEntry,
        other: Option<*mut CtEntry>,
        side: Side,
        confirm: bool,
    },
    /// No tracked flow: handled as a new one.
    Untracked,
}

/// Confirms the unconfirmed flow whose reply half is at `rkey` in CT_NEW, on its backend's
/// segment of an established connection (`ct::reply_confirms`): its pair moves to the main map
/// (`confirm`), if its forward half is there and still its own. A BPF subprogram (own stack
/// frame).
#[inline(never)]
fn confirm_by_reply(rkey: &FlowKey) {
    let Some(r) = CT_NEW.get_ptr(rkey) else {
        return;
    };
    // SAFETY: valid map value pointer, read in place.
    let fkey = ct::forward_key(rkey, unsafe { &*r });
    let Some(f) = CT_NEW.get_ptr(&fkey) else {
        return;
    };
    // `confirm` copies the entry and checks the copy is this flow's forward half: no copy
    // here (with one in this frame the chain through it took 536 of the verifier's 512 bytes).
    // SAFETY: as above.
    if ct::is_forward_of(unsafe { &*f }, &fkey, rkey) {
        if !confirm(&fkey, f, rkey) {
            count(Reason::EventCtInsertFailed);
        } else if rkey.proto == lb_common::IPPROTO_TCP
            && let Some(m) = CONNTRACK.get_ptr_mut(&fkey)
        {
            // As `process` does for a flow its client confirms.
            let _ = index_flow(&fkey, m);
        }
    }
}

// Inserts into `table` at `key` the missing half of the flow whose other half is `from`, as
// seen by this packet: a reply half for a forward entry (translating back to the service this
// client -> service packet is for, and for full NAT to the client it comes from), or a forward
// half for a reply entry (sending to the backend this backend -> client packet came from, and
// for full NAT from the address and port it was sent to). A global BPF function per map
// (see `per_map`).
per_map!(
    rebuild,
    rebuild_in_conntrack,
    rebuild_in_ct_new,
    rebuild_in,
    (key: FlowKey, from: CtEntry, flow: Flow),
    (now: u64),
    false
);

/// [`rebuild`]'s work, inlined into its two global functions.
#[inline(always)]
fn rebuild_in(table: &Table, key: &FlowKey, from: &CtEntry, flow: &Flow, now: u64) -> bool {
    let (nat_addr, nat_port, fnat_addr, fnat_port, dir) = if from.dir == DIR_FORWARD {
        (flow.daddr, flow.dport, flow.saddr, flow.sport, DIR_REPLY)
    } else {
        (flow.saddr, flow.sport, flow.daddr, flow.dport, DIR_FORWARD)
    };
    let full = from.flags & CT_F_FULLNAT;
    let unconfirmed = core::ptr::eq(table, &CT_NEW);
    let (backend_ack, answered, lazy) =
        ct::rebuilt_window(dir, flow.proto, flow.tcp_flags, flow.seq, unconfirmed);
    let half = CtEntry {
        nat_addr,
        nat_port,
        dir,
        route: Route::NONE,
        backend_ack,
        flags: full | answered,
        fnat_addr: if full != 0 { fnat_addr } else { 0 },
        fnat_port: if full != 0 { fnat_port } else { 0 },
        last_seen_ns: now,
        // A forward half rebuilt from its reply half takes the full path (conservative); a
        // confirmed flow's reply half has lost its window.
        lazy,
        ..*from
    };
    count(Reason::EventCtRebuilt);
    if table.insert(key, &half, 0).is_err() {
        count(Reason::EventCtInsertFailed);
        return false;
    }
    true
}

/// Routes a new flow's first packet, reusing the backend's cached route while it is fresh (the
/// FIB lookup is the most expensive step of a new flow). The cache ignores the client address:
/// source-based policy routing towards backends is not supported. Also returns the interface
/// the backend lives behind (0 if unknown), which its replies must arrive on.
#[inline(always)]
fn route_to_backend(
    ctx: &TcContext,
    flow: &Flow,
    backend_id: u32,
    backend: &Backend,
    now: u64,
    cfg: &DpConfig,
) -> (i32, Reason, Route, u32) {
    let redirect = cfg.flags & CFG_F_REDIRECT != 0;
    let saddr = if backend.snat_addr != 0 {
        backend.snat_addr
    } else {
        flow.saddr
    };
    let tuple = (saddr, backend.addr, flow.sport, backend.port);
    let Some(cached) = BACKEND_ROUTES.get_ptr_mut(backend_id) else {
        let f = fib(ctx, flow, tuple);
        let (act, reason) = send(ctx, &f, false, redirect);
        return (act, reason, f.route, f.ifindex);
    };
    // SAFETY: a value pointer of an array map is valid for the run; racing writers on other CPUs
    // store the same kind of data, and a torn MAC is corrected at the next refresh.
    let cached = unsafe { &mut *cached };
    let fresh = now.wrapping_sub(cached.stamp_ns) <= ct::TOUCH_INTERVAL_NS;
    if cached.route.ifindex != 0 && fresh {
        let (act, reason) = if redirect {
            redirect_cached(ctx, &cached.route, false)
        } else {
            (TC_ACT_OK as i32, Reason::PassTranslatedToStack)
        };
        return (act, reason, cached.route, cached.route.ifindex);
    }
    // Looked up even without redirect: the backend's interface guards its replies.
    let f = fib(ctx, flow, tuple);
    cached.route = f.route;
    cached.stamp_ns = now;
    let (act, reason) = send(ctx, &f, false, redirect);
    let route = if redirect { f.route } else { Route::NONE };
    (act, reason, route, f.ifindex)
}

#[inline(always)]
pub(crate) fn port_flags(port: u16) -> u8 {
    PORTS.get(u32::from(port)).copied().unwrap_or(0)
}

/// Removes the reply half at `rkey` if it belongs to the flow keyed `key`.
#[inline(always)]
fn remove_reply_of(table: &Table, rkey: &FlowKey, key: &FlowKey) {
    if let Some(r) = table.get_ptr(rkey) {
        // SAFETY: valid map value pointer; `CtEntry` is `Copy`.
        if ct::is_reply_of(unsafe { &*r }, rkey, key) {
            let _ = table.remove(rkey);
        }
    }
}

// Makes reply key `rkey` of `table` free for this packet's new flow, unless a live flow holds
// it. An entry there is live if it has not expired by the conntrack rules and its forward half
// exists and still sends to this backend; anything else (a closed flow's leftover, an orphan
// whose forward half was evicted or moved on) is removed with its forward half. A live flow
// keeps its key against everything but a TCP segment (not a bare SYN) in the window its
// backend acknowledged: the backend sees one connection per key, and such a segment comes from
// its actual peer (whose own entries a flood evicted), not from a blind spoofer. A full-NAT
// reply key names berth's address, not a client, so no client proves itself that way: a live
// flow keeps it against everyone. Returns false if the new flow must not take the key. A
// global BPF function per map (`claim_in_conntrack`, `claim_in_ct_new`, see `per_map`): the
// verifier checks each once, where a static subprogram was walked again at each of its call
// sites (six, with `forward_inner` both inlined and a subprogram).
per_map!(
    claim,
    claim_in_conntrack,
    claim_in_ct_new,
    claim_in,
    (rkey: FlowKey, flow: Flow),
    (now: u64),
    false
);

/// [`claim`]'s rules, inlined into its two global functions.
#[inline(always)]
fn claim_in(table: &Table, rkey: &FlowKey, flow: &Flow, now: u64) -> bool {
    let cfg = config();
    let Some(r) = table.get_ptr(rkey) else {
        return true;
    };
    // SAFETY: a valid map value pointer, read in place (copies of the two entries took 112
    // bytes of the call chain's stack); a concurrent update makes this a judgement on either
    // version.
    let r = unsafe { &*r };
    if r.dir != DIR_REPLY {
        // Some flow's forward entry: never overwritten.
        return false;
    }
    let fkey = ct::forward_key(rkey, r);
    // SAFETY: as above.
    let mut partner = table
        .get_ptr(&fkey)
        .is_some_and(|f| ct::is_forward_of(unsafe { &*f }, &fkey, rkey));
    // A full-NAT flow's forward half may wait in the handshake table (see `port_free`).
    partner |= ct::pending_full_nat_holds(r, core::ptr::eq(table, &CT_NEW), now);
    let names_client = !r.full_nat() && rkey.daddr == flow.saddr && rkey.dport == flow.sport;
    if partner
        && !ct::expired(r, rkey.proto, flow.tcp_flags, now, cfg)
        && (flow.proto != lb_common::IPPROTO_TCP
            || ct::is_bare_syn(flow.proto, flow.tcp_flags)
            || !names_client
            || !ct::in_window(r, flow.seq))
    {
        return false;
    }
    if partner {
        let _ = table.remove(&fkey);
    }
    let _ = table.remove(rkey);
    true
}

/// Whether a pending full-NAT handshake holds reply key `rkey` by its port claim (see
/// lb-common's `claim`; its reply entry is written only with its backend's first reply; `rkey`
/// in the range), or a live indexed flow other than `key`'s through the reply index (its reply
/// half maybe evicted): a new flow whose reply key it is (a DNAT flow of another service on the
/// backend from the same client address and port, or a spoofer's from berth's own address and
/// a port of the range) must not take the key, nor a flow whose reply half was evicted rebuild
/// it. Called by a new flow where `claim::may_hold`, by the rebuild of a reply half on its
/// rare branch; one of the `CLAIMED_*` codes. Judged on the claimed
/// slot and the index in place (a slot being written may count as holding). A global BPF
/// function (see `per_map`).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn claimed(rkey: *const FlowKey, key: *const FlowKey, now: u64) -> u64 {
    // SAFETY: callers pass references (a global function: see `per_map`).
    let (Some(rkey), Some(key)) = (unsafe { (rkey.as_ref(), key.as_ref()) }) else {
        return CLAIMED_HELD;
    };
    if claim::in_range(rkey.dport)
        && claim::slot_holding(rkey, now)
            .and_then(syn::named)
            .is_some_and(|s| s.check & 1 != 0 && s.full_nat() && s.is_forward_of(&s.key(), rkey))
    {
        return CLAIMED_HELD;
    }
    let i = claim::index(rkey);
    let Some(s) = claim::index_slot(i).filter(|_| claim::index_named(i)) else {
        return CLAIMED_FREE;
    };
    // SAFETY: the slot's value pointer (a key to look up in place); a racing clear (by a port
    // search, of a slot naming a flow that is over) names no live flow either way.
    let cur = unsafe { &*s };
    if ct::same_key(cur, key) {
        return CLAIMED_FREE;
    }
    match indexed_flow(cur, i, rkey) {
        Some((f, mine)) => u64::from(mine && !indexed_flow_ended(cur, f, now)),
        // With the slot's index, for `forget_stale_slot` (not hashed again).
        None => CLAIMED_STALE | u64::from(i) << 32,
    }
}

/// Whether [`claimed`] says a new flow's reply key `rkey` is held; a stale reply-index slot it
/// met is forgotten on the way.
#[inline(always)]
fn held_or_forgotten(rkey: &FlowKey, key: &FlowKey, now: u64) -> bool {
    let v = claimed(rkey, key, now);
    if v & 0xffff_ffff == CLAIMED_STALE {
        let _ = forget_stale_slot((v >> 32) as u32);
    }
    v == CLAIMED_HELD
}

/// [`claimed`]: nothing holds the key.
const CLAIMED_FREE: u64 = 0;
/// [`claimed`]: a pending handshake or a live indexed flow holds the key.
const CLAIMED_HELD: u64 = 1;
/// [`claimed`]: nothing holds the key, and its reply-index slot's bit is set though the slot
/// names no indexed flow (its forward entry gone, or no longer indexed; see
/// [`forget_stale_slot`]); the slot's index in the high half.
const CLAIMED_STALE: u64 = 2;

/// Clears the bit of reply-index slot `i`, which [`claimed`] found naming no live flow (a DNAT
/// flow's that ended: nothing else clears those, where the port search clears a full-NAT
/// flow's), so that new flows whose reply keys share the slot stop reading it. Without the
/// claim word: a flow indexed there meanwhile (its entry marked, then the slot written, then
/// the bit set) is found by the second look, and its bit set again (a look at the entry's mark
/// alone: a bit set for a slot naming no live flow costs a read, nothing more). Returns whether
/// the bit stays cleared. A global BPF function (inlined into `claimed`, that frame grew from
/// 56 to 112 bytes, past the 512 of the chain under `new_flow`), with a result (one without
/// was refused by the verifier: "Caller passes invalid args").
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn forget_stale_slot(i: u32) -> bool {
    let Some(s) = claim::index_slot(i) else {
        return false;
    };
    claim::set_named(i, false);
    // SAFETY: the slot's value pointer, its key looked up where it is (a torn read, a write
    // under way, names no entry, and that flow's bit is set after it anyway).
    let named = CONNTRACK
        .get_ptr(unsafe { &*s })
        // SAFETY: a valid map value pointer, read in place.
        .is_some_and(|f| unsafe { (*f).lazy == ct::LAZY_INDEXED });
    if named {
        claim::set_named(i, true);
    }
    !named
}

/// Stamps both halves of a flow with `now` (they expire together).
#[inline(always)]
fn touch(a: &mut CtEntry, b: Option<*mut CtEntry>, now: u64) {
    a.last_seen_ns = now;
    if let Some(b) = b {
        // SAFETY: a valid map value pointer (see `process`).
        unsafe { (*b).last_seen_ns = now };
    }
}

/// A packet client -> service of a tracked flow (forward entry `e` in `table`). A BPF
/// subprogram returning a [`pack`]ed verdict.
#[inline(never)]
fn forward(ctx: &TcContext, p: &Pkt, e: &mut CtEntry, table: &'static Table) -> u64 {
    match forward_inner(ctx, p, e, table) {
        Step::Verdict(v) => pack(v),
        // SAFETY: `forward_inner`'s map value pointer (`e` itself); its side is the
        // destination.
        Step::Translate { e, other, .. } => {
            pack(translate(ctx, p, unsafe { &mut *e }, other, Side::Dst))
        }
        // (Never: `forward_inner` always has an entry.)
        Step::Untracked => pack(exit(Reason::AbortMap)),
    }
}

#[inline(always)]
fn forward_inner(ctx: &TcContext, p: &Pkt, e: &mut CtEntry, table: &'static Table) -> Step {
    let (flow, key, now) = (&p.flow, &p.key, p.now);
    // A lazily recorded or indexed flow's plain packets skip its reply half
    // (`ct::forward_skips_reply`): its backend's replies derive a missing one (`lazy_reply`,
    // `indexed_reply`), and no other flow can take its reply key while this entry lives
    // (`claim`, `lazy_flow_holds`, `claimed` and the full-NAT port search all respect it). One
    // hash lookup per packet instead of two.
    let skip = ct::forward_skips_reply(e, flow.proto, flow.tcp_flags, now);
    // The reply half, looked up with every other packet: that keeps it as recent as this half
    // in the LRU, and a half evicted anyway is rebuilt here before the backend answers.
    let rkey = ct::reply_key(key, e);
    let mut rev = if skip { None } else { ct_lookup(table, &rkey) };
    // SAFETY: valid map value pointer.
    if let Some(r) = rev
        && !ct::is_reply_of(unsafe { &*r }, &rkey, key)
    {
        // Another flow holds the key (this flow's half was evicted and the key taken). If that
        // flow is live it keeps it and this one is over.
        if !claim(table, &rkey, flow, now) {
            let _ = table.remove(key);
            return Step::Verdict(exit(Reason::DropFlowConflict));
        }
        rev = None;
    }
    if rev.is_none() && !skip {
        // Rebuilt (or, for a flow recorded lazily, written) here, unless a live flow holds the
        // key: with its reply entry (`claim`), or recorded lazily for another service its
        // backend serves lazily.
        let mine = LazyOwners::pack(flow.daddr, flow.dport);
        if (!e.full_nat() && held_lazily(&rkey, mine, flow.tcp_flags, now))
            || !claim(other(table), &rkey, flow, now)
            || claimed(&rkey, key, now) == CLAIMED_HELD
        {
            let _ = table.remove(key);
            return Step::Verdict(exit(Reason::DropFlowConflict));
        }
        rebuild(table, &rkey, e, flow, now);
        rev = table.get_ptr_mut(&rkey);
    }

    if ct::closes(flow.proto, flow.tcp_flags) {
        // SAFETY: valid map value pointer.
        if rev.is_none_or(|r| ct::in_window(unsafe { &*r }, flow.seq)) {
            let bits = ct::close_bits(flow.proto, flow.tcp_flags, DIR_FORWARD);
            if e.full_nat() {
                if enters_time_wait(Some(e), DIR_FORWARD, flow.tcp_flags, flow.ack) {
                    // The client's FIN after the backend's: the backend closed first and holds
                    // the connection in TIME_WAIT from now on.
                    claim::mark_time_wait(&rkey, now);
                }
                let end = fin_end(ctx, flow);
                track_fin(Some(e), rev, DIR_FORWARD, flow.tcp_flags, flow.ack, end);
            }
            close(e, rev, bits, now);
        } else if e.state != STATE_CLOSING {
            count(Reason::EventCtCloseIgnored);
        }
    } else if e.flags & ct::CT_F_AWAIT_CLIENT_ACK != 0
        && ct::is_final_ack(e.flags, e.backend_ack, flow.tcp_flags, DIR_FORWARD, flow.ack)
        // SAFETY: valid map value pointer.
        && rev.is_none_or(|r| ct::in_window(unsafe { &*r }, flow.seq))
    {
        last_ack(e, rev);
    }
    Step::Translate {
        e,
        other: rev,
        side: Side::Dst,
        confirm: false,
    }
}

/// The final-ACK tracking of a full-NAT flow for a FIN or RST from `dir`'s side, before its
/// closing bits are added (see `ct::track_close`): the state and the FIN's end go into the
/// forward half `fwd`, the bits into both (the reply half's are what `ct::port_reusable` and
/// the reply path test). A flow whose forward half is gone, or whose header cannot be read,
/// tracks nothing: its port keeps the hold.
///
/// `end`: where the segment's sequence space ends (`ct::seq_end`), None if unknown. Shared
/// with the IPv6 path (the IPv4 part of its entries).
#[inline(always)]
pub(crate) fn track_fin(
    fwd: Option<*mut CtEntry>,
    rev: Option<*mut CtEntry>,
    dir: u8,
    tcp_flags: u8,
    ack: u32,
    end: Option<u32>,
) {
    let mut bits = 0;
    if let Some(f) = fwd {
        // SAFETY: a valid map value pointer (see `process`).
        let f = unsafe { &mut *f };
        if let Some(end) = end {
            let (b, fin_end) = ct::track_close(f.flags, f.backend_ack, tcp_flags, dir, ack, end);
            bits = b;
            f.backend_ack = fin_end;
        }
        f.flags = (f.flags & !CT_F_FINAL) | bits;
    }
    if let Some(r) = rev {
        // SAFETY: as above.
        unsafe { (*r).flags = ((*r).flags & !CT_F_FINAL) | bits };
    }
}

/// Whether a full-NAT flow's FIN or RST from `dir`'s side leaves its backend in TIME_WAIT, by
/// the forward half `fwd` before [`track_fin`] takes the segment in: the client's FIN after the
/// backend's (`claim::leaves_time_wait`), or the backend's crossing the client's
/// (`claim::crossed_into_time_wait`). The caller marks the port's claim word. Shared with the
/// IPv6 path. (Before `track_fin`, not returned by it: a decision kept live through the
/// tracking's branches cost the verifier ~2,400 more instructions here and ~8,800 in IPv6.)
#[inline(always)]
pub(crate) fn enters_time_wait(
    fwd: Option<*mut CtEntry>,
    dir: u8,
    tcp_flags: u8,
    ack: u32,
) -> bool {
    let Some(f) = fwd else {
        return false;
    };
    // SAFETY: a valid map value pointer (see `process`).
    let f = unsafe { &*f };
    let closing = ct::close_bits(lb_common::IPPROTO_TCP, tcp_flags, dir);
    if dir == DIR_FORWARD {
        lb_common::claim::leaves_time_wait(f.flags, closing)
    } else {
        lb_common::claim::crossed_into_time_wait(f.flags, f.backend_ack, closing, tcp_flags, ack)
    }
}

/// Where this IPv4 segment's sequence space ends (`ct::seq_end`).
#[inline(always)]
fn fin_end(ctx: &TcContext, flow: &Flow) -> Option<u32> {
    tcp_data_len(ctx, flow).map(|len| ct::seq_end(flow.seq, len, flow.tcp_flags))
}

/// The final ACK of a full-NAT flow closed both ways passed (see `ct::is_final_ack`): both
/// halves are marked, and its port is free at once (`ct::port_reusable`).
#[inline(always)]
pub(crate) fn last_ack(e: &mut CtEntry, other: Option<*mut CtEntry>) {
    e.flags |= CT_F_LAST_ACK;
    if let Some(o) = other {
        // SAFETY: a valid map value pointer (see `process`).
        unsafe { (*o).flags |= CT_F_LAST_ACK };
    }
}

/// Marks a flow closing (a FIN or RST of it, adding closing `bits`, see `ct::close_bits`):
/// both halves, stamped, so a flow closed both ways keeps its full-NAT port for
/// `ct::port_reusable`'s hold after its last FIN or RST.
#[inline(always)]
fn close(e: &mut CtEntry, other: Option<*mut CtEntry>, bits: u8, now: u64) {
    if e.state != STATE_CLOSING {
        count(Reason::EventCtClosing);
    }
    e.state = STATE_CLOSING;
    e.flags |= bits;
    if let Some(o) = other {
        // SAFETY: a valid map value pointer (see `process`).
        unsafe {
            (*o).state = STATE_CLOSING;
            (*o).flags |= bits;
        }
    }
    touch(e, other, now);
}

/// The common end of a tracked flow's packet, either way: refreshes both halves once a
/// second, counts, rewrites the `side` the entry translates (and for full NAT the other one
/// too), and sends it along the entry's cached route.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    p: &Pkt,
    e: &mut CtEntry,
    other: Option<*mut CtEntry>,
    side: Side,
) -> (i32, Reason) {
    let (flow, now) = (&p.flow, p.now);
    let stale = now.wrapping_sub(e.last_seen_ns) > ct::TOUCH_INTERVAL_NS;
    if stale {
        touch(e, other, now);
    }
    account(e.service_id, e.backend_id, p.bytes, false);
    let (addr, port) = (e.nat_addr, e.nat_port);
    let reply = side == Side::Src;
    let tuple = if e.full_nat() {
        let (f_addr, f_port) = (e.fnat_addr, e.fnat_port);
        let (dst, src) = if reply {
            ((f_addr, f_port), (addr, port))
        } else {
            ((addr, port), (f_addr, f_port))
        };
        if rewrite_both(ctx, flow, dst, src).is_err() {
            return exit(Reason::AbortRewrite);
        }
        (src.0, dst.0, src.1, dst.1)
    } else {
        if rewrite(ctx, flow, side, addr, port).is_err() {
            return exit(Reason::AbortRewrite);
        }
        if reply {
            (addr, flow.daddr, port, flow.dport)
        } else {
            (flow.saddr, addr, flow.sport, port)
        }
    };
    finish(ctx, flow, e, tuple, reply, stale, config())
}

/// Sends a translated packet of a tracked flow, along the entry's cached route until its
/// once-a-second refresh (`stale`), which looks the route up again.
#[inline(always)]
fn finish(
    ctx: &TcContext,
    flow: &Flow,
    e: &mut CtEntry,
    tuple: (u32, u32, u16, u16),
    reply: bool,
    stale: bool,
    cfg: &DpConfig,
) -> (i32, Reason) {
    let redirect = cfg.flags & CFG_F_REDIRECT != 0;
    if redirect && e.route.ifindex != 0 && !stale {
        return redirect_cached(ctx, &e.route, reply);
    }
    let (act, reason, r) = route(ctx, flow, tuple, reply, redirect);
    e.route = r;
    (act, reason)
}

/// A packet backend -> client of a tracked flow (reply entry `e`, keyed by the packet's tuple,
/// in `table`), inlined into `process`: what is left to do ([`Step`]).
#[inline(always)]
fn reply(ctx: &TcContext, p: &Pkt, e: &mut CtEntry, table: &'static Table) -> Step {
    let (flow, key, now, cfg) = (&p.flow, &p.key, p.now, config());
    // Only from where the backend lives: a "reply" forged elsewhere (the uplink) must neither
    // be translated towards the client nor move the flow's state.
    if e.in_ifindex != 0 && e.in_ifindex != ingress_ifindex(ctx) {
        return Step::Verdict(exit(Reason::PassReplyWrongIface));
    }
    let fkey = ct::forward_key(key, e);
    if ct::expired(e, flow.proto, flow.tcp_flags, now, cfg) {
        count(Reason::EventCtExpired);
        if let Some(f) = table.get_ptr(&fkey) {
            // SAFETY: valid map value pointer.
            if ct::is_forward_of(unsafe { &*f }, &fkey, key) {
                let _ = table.remove(&fkey);
            }
        }
        let _ = table.remove(key);
        return Step::Verdict(exit(Reason::PassNoService));
    }
    // A flow picked in the current table epoch (full NAT: at its first port): its reply entry
    // is the one its client's tuple leads to (lb-common's `epoch`), and nothing below needs
    // the forward half.
    let skip = core::ptr::eq(table, &CONNTRACK)
        && ct::reply_skips_forward(e, flow.proto, flow.tcp_flags, now, current_epoch);
    let mut fwd = None;
    if !skip {
        fwd = ct_lookup(table, &fkey);
        if let Some(f) = fwd {
            // SAFETY: valid map value pointer.
            if !ct::is_forward_of(unsafe { &*f }, &fkey, key) {
                // The client's flow to this service goes to another backend now: this half is
                // a leftover.
                count(Reason::EventCtExpired);
                let _ = table.remove(key);
                return Step::Verdict(exit(Reason::PassNoService));
            }
        } else {
            // The forward half was evicted, or (full NAT) waits in the handshake table: moved
            // from there, else rebuilt from this one, unless the client has started a newer
            // flow on the tuple meanwhile (then this half is a leftover).
            let at = if other(table).get_ptr(&fkey).is_some() {
                PENDING_OTHER
            } else {
                pending_at(&fkey, key, now, core::ptr::eq(table, &CT_NEW))
            };
            // Or a newer flow on the tuple holds its reply entry, its forward half evicted too:
            // this entry, not stamped with the current epoch, would take the tuple from it.
            if at == PENDING_OTHER || (at == PENDING_NONE && newer_flow_holds(&fkey, key, e.epoch))
            {
                count(Reason::EventCtExpired);
                let _ = table.remove(key);
                return Step::Verdict(exit(Reason::PassNoService));
            }
            if at == PENDING_NONE {
                rebuild(table, &fkey, e, flow, now);
            }
            fwd = table.get_ptr_mut(&fkey);
        }
    }

    if flow.proto == lb_common::IPPROTO_TCP && flow.tcp_flags & ct::TCP_ACK != 0 {
        ct::record_backend_ack(e, flow.ack);
        let unconfirmed = core::ptr::eq(table, &CT_NEW);
        if unconfirmed && let Some(f) = fwd {
            // SAFETY: a valid map value pointer (see `process`).
            ct::record_syn_ack(unsafe { &mut *f }, flow.tcp_flags, flow.seq);
        }
    }
    // The backend's side cannot be forged (see above): its FIN or RST closes the flow.
    if ct::closes(flow.proto, flow.tcp_flags) {
        if e.full_nat() {
            if enters_time_wait(fwd, DIR_REPLY, flow.tcp_flags, flow.ack) {
                // The FINs crossed: the backend holds the connection in TIME_WAIT too.
                claim::mark_time_wait(key, now);
            }
            let end = fin_end(ctx, flow);
            track_fin(fwd, Some(e), DIR_REPLY, flow.tcp_flags, flow.ack, end);
        }
        close(
            e,
            fwd,
            ct::close_bits(flow.proto, flow.tcp_flags, DIR_REPLY),
            now,
        );
    } else if e.flags & ct::CT_F_AWAIT_BACKEND_ACK != 0
        && let Some(f) = fwd
        // SAFETY: a valid map value pointer (see `process`).
        && ct::is_final_ack(
            unsafe { (*f).flags },
            unsafe { (*f).backend_ack },
            flow.tcp_flags,
            DIR_REPLY,
            flow.ack,
        )
    {
        last_ack(e, fwd);
    }
    // The backend sent a segment of an established connection: the flow (picked up
    // mid-stream, or whose handshake ACK berth did not see) is to be confirmed, once the
    // translation has written the route into this half.
    let confirm = core::ptr::eq(table, &CT_NEW) && ct::reply_confirms(flow.proto, flow.tcp_flags);
    Step::Translate {
        e,
        other: fwd,
        side: Side::Src,
        confirm,
    }
}

/// The service a packet to `daddr`, `dport` (network order) of `proto` is for. The address by
/// reference: the "any address" check looks it up where it is (a copy on the stack cost the
/// new-flow path spills). Only the lookups the port's services need (lb-common's
/// `service_lookups`): a service on any address alone on its port costs no lookup of the
/// packet's own address first.
#[inline(always)]
fn lookup_service(daddr: &u32, dport: u16, proto: u8) -> Option<ServiceValue> {
    find_service!(
        port_flags(u16::from_be(dport)),
        proto,
        SERVICES.get_ptr(&ServiceKey::new(*daddr, dport, proto)),
        SERVICES.get_ptr(&ServiceKey::new(0, dport, proto)),
        // "Any address of this host": the addresses userspace keeps in LOCAL_ADDRS.
        LOCAL_ADDRS.get_ptr(daddr).is_some()
    )
}

/// The service for a packet or a socket's address, on a port whose filter entry is `$flags`:
/// the one listening at the destination address (`$own`, a map lookup), else the one at any
/// address (`$any`) if the destination is this host's (`$local`), each looked up only where a
/// service on the port needs it (lb-common's `service_lookups`). The one rule of both
/// families' TC programs and the socket hooks, each with its own maps' lookups. A macro, not a
/// function taking closures: with closures the IPv4 new-flow frame grew and the call chain
/// under it passed the verifier's 512 bytes (528).
macro_rules! find_service {
    ($flags:expr, $proto:expr, $own:expr, $any:expr, $local:expr) => {
        'found: {
            let (at_own, at_any) = lb_common::service_lookups($flags, $proto);
            if at_own && let Some(v) = $own {
                // SAFETY: a valid map value pointer; `ServiceValue` is `Copy`.
                break 'found Some(unsafe { *v });
            }
            if !at_any {
                break 'found None;
            }
            let Some(v) = $any else {
                break 'found None;
            };
            // SAFETY: as above.
            let v = unsafe { *v };
            if $local { Some(v) } else { None }
        }
    };
}
pub(crate) use find_service;

/// The backend id the Maglev row of service `svc` gives a flow with flow hash `hash`; None for
/// a service id or slot outside the maps. A slot not written yet (the row of a pool's first
/// backend fills one slot at a time) sends the flow to the service's fallback backend instead
/// of dropping it. `new_flow`'s pick, and `newer_flow_holds`'s replay of it. (`process` has left
/// already when the Maglev table size is 0.)
#[inline(always)]
pub(crate) fn maglev_pick(svc: &ServiceValue, hash: u32, cfg: &DpConfig) -> Option<u32> {
    if svc.id >= cfg.max_services {
        return None;
    }
    let m = cfg.maglev_size;
    let &picked = MAGLEV.get(svc.id * m + hash % m)?;
    Some(if picked == 0 { svc.fallback } else { picked })
}

/// What `new_flow` returns instead of a verdict when the backend it picked takes full NAT:
/// this bit, the service id << 32 and the backend id (a [`pack`]ed verdict never has it: TC
/// actions are small).
const FULL_NAT: u64 = 1 << 63;

/// Set in a [`pack`]ed verdict of `v6`'s `reply6`: the packet confirms its flow (see
/// `confirm_by_reply6`).
pub(crate) const CONFIRM: u64 = 1 << 62;

/// What `new_flow_inner` decided.
enum Pick {
    Done((i32, Reason)),
    /// Service id << 32 | backend id, for `new_full_nat_flow`.
    FullNat(u64),
}

/// A packet client -> service with no flow: picks the backend, claims the reply key, translates
/// and records the pair. A BPF subprogram (own stack frame), returning a [`pack`]ed verdict, or
/// [`FULL_NAT`] and the ids when the backend takes full NAT (`process` hands it on). Static on
/// purpose, unlike the subprograms around it (see [`args`]): as a global function the verifier
/// walked 108,207 fewer instructions, but a new flow cost ~10 ns more (8 interleaved rounds,
/// minimum 344 -> 360 ns, median 356 -> 369).
#[inline(never)]
fn new_flow(ctx: &TcContext, p: &Pkt, hashed: u64) -> u64 {
    match new_flow_inner(ctx, p, hashed) {
        Pick::Done(v) => pack(v),
        Pick::FullNat(ids) => FULL_NAT | ids,
    }
}

#[inline(always)]
fn new_flow_inner(ctx: &TcContext, p: &Pkt, hashed: u64) -> Pick {
    let (flow, key, now, bytes, cfg) = (&p.flow, &p.key, p.now, p.bytes, config());
    // The table epoch, read before the pick and again after it (lb-common's `epoch`).
    let before = current_epoch();
    // `pending`'s, where it ran.
    let hash = if hashed & SYN_HASHED != 0 {
        hashed as u32
    } else {
        flow_hash(key, cfg.hash_seed)
    };
    let Some(svc) = lookup_service(&flow.daddr, flow.dport, flow.proto) else {
        return Pick::Done(exit(Reason::PassNoService));
    };
    let Some(backend_id) = maglev_pick(&svc, hash, cfg) else {
        return Pick::Done(exit(Reason::AbortMap));
    };
    let Some(&backend) = BACKENDS.get(backend_id) else {
        return Pick::Done(exit(Reason::AbortMap));
    };
    if backend.addr == 0 {
        if cfg.flags & CFG_F_DROP_NO_BACKEND == 0 && svc.flags & lb_common::SVC_F_EMPTY != 0 {
            // Answered by `process`, outside this frame (the stack of the call chain is shared).
            return Pick::Done((TC_ACT_SHOT as i32, Reason::RejectNoBackend));
        }
        return Pick::Done(exit(Reason::DropNoBackend));
    }
    if backend.snat_addr != 0 {
        // The flow hash goes to the port search through the per-CPU scratch slot (read back
        // there as a value the verifier knows nothing of: passed as an argument, it put the
        // verifier over 1,000,000 instructions).
        // So does the epoch read before the pick (the second read follows the backend's
        // addresses' read in `new_full_nat_flow`).
        if let Some(n) = NAT_SCRATCH.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array (see `NAT_SCRATCH`).
            unsafe {
                core::ptr::write_volatile(&mut (*n).hash, hash);
                core::ptr::write_volatile(&mut (*n).before, before);
            }
        }
        return Pick::FullNat((u64::from(svc.id) << 32) | u64::from(backend_id));
    }
    // The pick is made: the epoch's second read comes after every table read above.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    let stamp = epoch::stamp(before, current_epoch());
    // The reply key and the entry are built in the per-CPU NAT_SCRATCH slot (unused by a DNAT
    // flow), not on the stack: the call chain through this frame has to leave room for the
    // tracked paths inlined into the main program.
    let Some(s) = NAT_SCRATCH.get_ptr_mut(0) else {
        return Pick::Done(exit(Reason::AbortMap));
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs (see `NAT_SCRATCH`).
    let s = unsafe { &mut *s };
    // The reply key must be free in both maps: a live flow of another service on this backend
    // from the same client address and port keeps it (never overwritten: the backend could not
    // tell the two flows apart, and a spoofed packet must not take a victim's replies).
    s.rkey = FlowKey::new(
        backend.addr,
        flow.saddr,
        backend.port,
        flow.sport,
        flow.proto,
    );
    let rev_key = &s.rkey;
    // Usually neither map holds the key: two inlined lookups, and `claim`'s call only where one
    // does.
    if (CONNTRACK.get_ptr(rev_key).is_some() && !claim(&CONNTRACK, rev_key, flow, now))
        || (CT_NEW.get_ptr(rev_key).is_some() && !claim(&CT_NEW, rev_key, flow, now))
        || (claim::may_hold(rev_key) && held_or_forgotten(rev_key, &p.key, now))
    {
        return Pick::Done(exit(Reason::DropFlowConflict));
    }
    // One insert per new flow where the backend serves this service address lazily (the reply
    // entry comes with the first reply, see `lazy_reply`); the key may also be held by a lazily
    // recorded flow of another service the backend serves lazily.
    let mine = LazyOwners::pack(flow.daddr, flow.dport);
    let (owners, lazy) = lazy_owners(
        &ServiceKey::new(backend.addr, backend.port, flow.proto),
        mine,
        cfg,
    );
    if owners.is_some_and(|o| {
        names_others(o, mine) && lazy_others_hold(rev_key, o, mine, flow.tcp_flags, now)
    }) {
        return Pick::Done(exit(Reason::DropFlowConflict));
    }

    if rewrite(ctx, flow, Side::Dst, backend.addr, backend.port).is_err() {
        return Pick::Done(exit(Reason::AbortRewrite));
    }
    let (act, reason, route, in_ifindex) =
        route_to_backend(ctx, flow, backend_id, &backend, now, cfg);

    let state = if ct::closes(flow.proto, flow.tcp_flags) {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    s.half = CtEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        dir: DIR_FORWARD,
        state,
        backend_id,
        service_id: svc.id,
        last_seen_ns: now,
        route,
        backend_ack: 0,
        in_ifindex,
        fnat_addr: 0,
        fnat_port: 0,
        flags: 0,
        lazy: if lazy { ct::LAZY_RECORDED } else { 0 },
        epoch: stamp,
    };
    // Unconfirmed (`ct::starts_unconfirmed`): a TCP flow in CT_NEW, a UDP flow established.
    let table = if ct::starts_unconfirmed(flow.proto) {
        &CT_NEW
    } else {
        &CONNTRACK
    };
    let (half, rev_key) = (&mut s.half, &s.rkey);
    // A handshake of a lazily recorded flow waits in the handshake table (a few stores, where
    // an insert into CT_NEW evicting under a flood cost ~150 ns); anything else goes to CT_NEW.
    let fwd_ok = (lb_common::syn::goes_to_syn_table(flow.proto, lazy, half)
        && syn::record(key, hash, half).is_some())
        || table.insert(key, half, 0).is_ok();
    if !fwd_ok {
        // The packet is still balanced: the Maglev pick is a pure function of the tuple.
        count(Reason::EventCtInsertFailed);
    } else if !lazy {
        // The reply half, built in place; its route is learnt from its first packet.
        half.nat_addr = flow.daddr;
        half.nat_port = flow.dport;
        half.dir = DIR_REPLY;
        clear_route(&mut half.route);
        if table.insert(rev_key, half, 0).is_err() {
            count(Reason::EventCtInsertFailed);
        }
    }
    if flow.proto == lb_common::IPPROTO_TCP && !ct::is_bare_syn(flow.proto, flow.tcp_flags) {
        count(Reason::EventCtMidstreamPickup);
    }
    account(svc.id, backend_id, bytes, true);
    Pick::Done((act, reason))
}

/// A new flow to a full-NAT backend (`ids`: [`FULL_NAT`] | service id << 32 | backend id, as
/// `new_flow` picked them): routes it, takes a source port for it (tries from the flow hash,
/// see `ct::snat_port`) by inserting its reply entry, records the forward entry and rewrites
/// both ends. A global BPF function (see [`args`]), returning a [`pack`]ed verdict.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn new_full_nat_flow(skb: *mut __sk_buff, p: *const Pkt, ids: u64) -> u64 {
    let Some((ctx, p)) = args(skb, p) else {
        return pack(exit(Reason::AbortMap));
    };
    match new_full_nat_flow_inner(&ctx, p, ids) {
        Ok(v) => FULL_NAT | pack(v),
        Err(v) => pack(v),
    }
}

/// The first of a new full-NAT flow's three steps (the first and the last subprograms called
/// from `process`, one after the other: one frame holding all three did not fit the call
/// chain's 512 bytes under the inlined tracked paths): routes the flow and builds its reply
/// entry and key in `NAT_SCRATCH`. `Ok`: the routing's verdict, for after `take_full_nat_port` and
/// `finish_full_nat`; `Err`: the flow's verdict now.
#[inline(always)]
fn new_full_nat_flow_inner(
    ctx: &TcContext,
    p: &Pkt,
    ids: u64,
) -> Result<(i32, Reason), (i32, Reason)> {
    let (flow, now, cfg) = (&p.flow, p.now, config());
    let (service_id, backend_id) = (((ids >> 32) as u32) & 0x7fff_ffff, ids as u32);
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Err(exit(Reason::AbortMap));
    };
    if backend.addr == 0 || backend.snat_addr == 0 {
        // The slot changed since `new_flow` read it (a reconciler write in between): the
        // client's retry finds the new state.
        return Err(exit(Reason::DropNoBackend));
    }
    let state = if ct::closes(flow.proto, flow.tcp_flags) {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    let Some(s) = NAT_SCRATCH.get_ptr_mut(0) else {
        return Err(exit(Reason::AbortMap));
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run; nothing else on this CPU
    // uses it while the program runs (see `NAT_SCRATCH`).
    let s = unsafe { &mut *s };
    // The pick is made (service, Maglev row, and the backend's addresses the reply key is
    // made of): the epoch's second read. The stamp stays only if the flow takes its first
    // port (`port_try`).
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // SAFETY: a volatile read of this CPU's scratch slot, written by `new_flow`.
    let stamp = epoch::stamp(
        unsafe { core::ptr::read_volatile(&s.before) },
        current_epoch(),
    );
    // Routed first: the reply entry that takes the port records where replies must arrive.
    let (act, reason, route, in_ifindex) =
        route_to_backend(ctx, flow, backend_id, backend, now, cfg);
    s.route = route;
    s.half = CtEntry {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        dir: DIR_REPLY,
        state,
        backend_id,
        service_id,
        last_seen_ns: now,
        route,
        backend_ack: 0,
        in_ifindex,
        fnat_addr: flow.saddr,
        fnat_port: flow.sport,
        flags: CT_F_FULLNAT,
        lazy: 0,
        epoch: stamp,
    };
    // Not `route: Route::NONE` above: a zeroing store of it became a `memset` call.
    clear_route(&mut s.half.route);
    // The backend's address, berth's address, the backend's port; the port is taken next.
    s.rkey = FlowKey::new(backend.addr, backend.snat_addr, backend.port, 0, flow.proto);
    Ok((act, reason))
}

/// The map a new flow starts in: CT_NEW for one that starts unconfirmed
/// (`ct::starts_unconfirmed`: TCP), CONNTRACK otherwise.
#[inline(always)]
fn new_flow_table(flow: &Flow) -> &'static Table {
    if ct::starts_unconfirmed(flow.proto) {
        &CT_NEW
    } else {
        &CONNTRACK
    }
}

/// The second step of a new full-NAT flow: takes a source port for the reply key in
/// `NAT_SCRATCH` (see `take_port`). False: none free. Inlined into `process` (its frame was 8
/// bytes; the call cost ~11 ns).
#[inline(always)]
fn take_full_nat_port(p: &Pkt) -> bool {
    let Some(s) = NAT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as in `new_full_nat_flow`.
    let s = unsafe { &mut *s };
    // The port search's callback for the map the flow starts in, chosen here (the callback
    // reads `new_flow`'s flow hash, left in the slot, itself).
    if core::ptr::eq(new_flow_table(&p.flow), &CT_NEW) {
        take_port(&CT_NEW, s, p)
    } else {
        take_port(&CONNTRACK, s, p)
    }
}

/// The last step of a new full-NAT flow, its port taken: turns `NAT_SCRATCH`'s reply entry into
/// the forward entry, records it, rewrites both ends and counts. False: the rewrite failed.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn finish_full_nat(skb: *mut __sk_buff, p: *const Pkt) -> bool {
    let Some((ctx, p)) = args(skb, p) else {
        return false;
    };
    let ctx = &ctx;
    let Some(s) = NAT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as in `new_full_nat_flow`.
    let s = unsafe { &mut *s };
    let (flow, key) = (&p.flow, &p.key);
    let table = new_flow_table(flow);
    let (half, rkey) = (&mut s.half, &s.rkey);
    // The reply key holds the backend (source) and berth's address and port (destination).
    half.nat_addr = rkey.saddr;
    half.nat_port = rkey.sport;
    half.dir = DIR_FORWARD;
    half.route = s.route;
    half.fnat_addr = rkey.daddr;
    half.fnat_port = rkey.dport;
    // An open TCP flow's forward entry waits in the handshake table (a few stores, no insert),
    // named by its port's claim, until its backend answers (its reply entry is written then,
    // and the pair moves to CT_NEW: `claimed_reply`) or its client sends again (`pending`).
    // Any other flow's reply entry, which took the port, is in its map.
    // SAFETY: volatile reads of this CPU's scratch slot (see above): a plain one was folded
    // into a spill slot.
    let (hash, mine) = unsafe {
        (
            core::ptr::read_volatile(&s.hash),
            core::ptr::read_volatile(&s.claim),
        )
    };
    let slot = if mine != 0 {
        syn::record(key, hash, half)
    } else {
        None
    };
    if let Some(slot) = slot {
        claim::settle(rkey, mine, slot);
    } else {
        if mine != 0 {
            // Not recorded (other CPUs were writing the ways it picked, twice; or the table
            // has no such set): the flow goes to CT_NEW, its port held by its reply entry,
            // inserted while the claim still holds the port (a word naming no slot yet), then
            // the claim is given back.
            let rev = CtEntry {
                nat_addr: flow.daddr,
                nat_port: flow.dport,
                dir: DIR_REPLY,
                fnat_addr: flow.saddr,
                fnat_port: flow.sport,
                route: Route::NONE,
                ..*half
            };
            if CT_NEW.insert(rkey, &rev, u64::from(BPF_NOEXIST)).is_err() {
                count(Reason::EventCtInsertFailed);
            }
            claim::give_back(rkey, mine);
        }
        if table.insert(key, half, 0).is_err() {
            // The reply entry stays: a reply rebuilds the forward half from it, and a new
            // flow may take its port (it has no forward half).
            count(Reason::EventCtInsertFailed);
        }
    }
    if rewrite_both(
        ctx,
        flow,
        (rkey.saddr, rkey.sport),
        (rkey.daddr, rkey.dport),
    )
    .is_err()
    {
        return false;
    }
    if flow.proto == lb_common::IPPROTO_TCP && !ct::is_bare_syn(flow.proto, flow.tcp_flags) {
        count(Reason::EventCtMidstreamPickup);
    }
    account(half.service_id, half.backend_id, p.bytes, true);
    true
}

/// Finds a free source port for a new full-NAT flow and takes it: sets the reply key's
/// destination port (backend -> berth's address and port) to each of the flow's tries in turn,
/// until one whose claim word (lb-common's `claim`) it takes is also free in both conntrack
/// maps. The claim is a compare-and-swap, so two CPUs never take one port, and the maps are
/// looked at only once it is taken (a flow releases its claim only once its reply entry is
/// there). A flow recorded in the handshake table (open TCP) keeps the claim, which
/// `finish_full_nat` settles, and has no reply entry until its backend answers; any other
/// inserts its reply entry now (`BPF_NOEXIST`) and gives the claim back. Returns false when
/// every try found the port taken.
///
/// The tries run under `bpf_loop`: its callback is verified once, where a loop's body was
/// walked once per try (the port search was most of the IPv4 program's verifier count).
#[inline(always)]
fn take_port(table: &'static Table, s: &mut NatScratch, p: &Pkt) -> bool {
    if !ct::has_snat_range(config()) {
        return false;
    }
    s.claim = 0;
    s.second_pass = 0;
    s.time_wait_seen = 0;
    let callback = if core::ptr::eq(table, &CT_NEW) {
        port_try::<true> as *mut core::ffi::c_void
    } else {
        port_try::<false> as *mut core::ffi::c_void
    };
    claim::port_search(callback);
    // SAFETY: volatile reads of this CPU's scratch slot, written by the callback.
    let mut mine = unsafe { core::ptr::read_volatile(&s.claim) };
    // Every port tried held, some only by a TIME_WAIT mark: a marked one is better than none
    // (the backend takes a newer SYN at once; an older one costs the client a SYN retry).
    // SAFETY: as above.
    if mine == 0 && unsafe { core::ptr::read_volatile(&s.time_wait_seen) } != 0 {
        s.second_pass = 1;
        claim::port_search(callback);
        // SAFETY: as above.
        mine = unsafe { core::ptr::read_volatile(&s.claim) };
    }
    if !lb_common::syn::goes_to_syn_table(p.flow.proto, false, &s.half) {
        s.claim = 0;
    }
    mine != 0
}

/// [`take_port`]'s `bpf_loop` callback, try `i` (for a flow starting in CT_NEW if `NEW`, else
/// CONNTRACK): the try's port into `NAT_SCRATCH`'s reply key, then [`try_port`]; the claim
/// word taken (non-zero) into `NAT_SCRATCH`'s `claim`, and 1 (stop), or 0 (next try).
extern "C" fn port_try<const NEW: bool>(i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let (Some(s), Some(p)) = (NAT_SCRATCH.get_ptr_mut(0), SCRATCH.get_ptr(0)) else {
        return 1;
    };
    // SAFETY: this CPU's slots of per-CPU arrays, valid for the run: the packet's (`process`)
    // and the new full-NAT flow's (`new_full_nat_flow`); nothing else on this CPU uses them
    // meanwhile.
    let (s, p) = unsafe { (&mut *s, &*p) };
    let cfg = config();
    // `new_flow`'s flow hash (its Maglev pick's), left there for the port search and the
    // handshake table's set (`finish_full_nat`).
    // SAFETY: a volatile read of this CPU's scratch slot.
    let hash = unsafe { core::ptr::read_volatile(&s.hash) };
    s.rkey.dport = ct::snat_try(cfg, hash, i as u32);
    let pending = lb_common::syn::goes_to_syn_table(p.flow.proto, false, &s.half);
    if i != 0 {
        // A flow is stamped with the table epoch only at its first port (lb-common's `epoch`).
        s.half.epoch = 0;
    }
    // SAFETY: a volatile read of this CPU's scratch slot (`take_port` writes it between the
    // passes).
    let (second, passed) = unsafe {
        (
            core::ptr::read_volatile(&s.second_pass),
            core::ptr::read_volatile(&s.time_wait_seen),
        )
    };
    let pass_marked = lb_common::claim::passes_marked(second != 0, passed);
    let mine = try_port::<NEW>(&s.rkey, &s.half, pending, p, pass_marked);
    if mine == PASSED_FOR_TIME_WAIT {
        s.time_wait_seen = passed + 1;
    } else if mine != 0 {
        s.claim = mine;
        return 1;
    }
    count(Reason::EventSnatPortTaken);
    0
}

/// [`try_port`]: the port was passed by for its TIME_WAIT mark (never a claim word: `take`'s
/// words name no slot, their low half is 0).
const PASSED_FOR_TIME_WAIT: u64 = 1;

/// One try of `take_port` at reply key `rkey` (for a flow starting in CT_NEW if `NEW`, else
/// CONNTRACK): takes the port's claim, then checks the port is free in both conntrack maps and
/// not held by a lazily recorded flow; if not, gives the claim back. A flow recorded in the
/// handshake table (`pending`) keeps the claim; any other inserts its reply entry `half` now
/// (`BPF_NOEXIST`) and gives the claim back. Returns the claim word taken (non-zero), or 0. One
/// per map (a map passed at run time is a lookup the verifier does not inline); inlined into
/// the search's callback (`port_try`: one BPF call fewer per try).
#[inline(always)]
fn try_port<const NEW: bool>(
    rkey: &FlowKey,
    half: &CtEntry,
    pending: bool,
    p: &Pkt,
    pass_marked: bool,
) -> u64 {
    let i = claim::index(rkey);
    let mine = match claim::take(i, p.now, pass_marked) {
        Ok(mine) => mine,
        Err(busy) => {
            if half.epoch != 0 {
                let _ = unstamp_first_port(rkey, &p.key);
            }
            return match busy {
                claim::Busy::Held => 0,
                claim::Busy::TimeWait => PASSED_FOR_TIME_WAIT,
            };
        }
    };
    let table: &'static Table = if NEW { &CT_NEW } else { &CONNTRACK };
    // Usually no map holds the key: an inlined lookup each, and a call of the global function
    // that judges a holder (and looks it up again) only where there is one. (Three calls on
    // every try were ~30 ns of a new full-NAT flow: a BPF call and return is ~11 ns here.)
    let held_in = |t: &'static Table| ct_lookup(t, rkey).is_some();
    let lazy_here = || {
        LAZY_REPLY
            .get_ptr(&ServiceKey::new(rkey.saddr, rkey.sport, rkey.proto))
            .is_some()
    };
    let free = (!held_in(other(table)) || port_free(other(table), rkey, p.now))
        && (!held_in(table) || port_free(table, rkey, p.now))
        && !(lazy_here() && held_lazily(rkey, 0, p.flow.tcp_flags, p.now))
        && !(claim::index_named(i) && index_holds(rkey, i, p.now));
    if free && pending {
        return mine;
    }
    let inserted = free && table.insert(rkey, half, u64::from(BPF_NOEXIST)).is_ok();
    claim::give_back(rkey, mine);
    if inserted { mine } else { 0 }
}

/// The first try of a new full-NAT flow stamped with the table epoch (`half.epoch` of
/// `try_port`) found its port's claim word busy (a handshake of another reply key sharing the
/// word) and moves on to a later port. A reply entry at that key whose forward key is this
/// packet's tuple (its forward half gone: this is a new flow on the tuple) was perhaps stamped
/// at its own first port in this epoch: its replies must not skip the forward lookup any more,
/// for the tuple's flow is this one now (lb-common's `epoch`). Any other way the try ends, such
/// an entry is gone (`port_free` removes it before the port is taken). Cleared in place, in
/// both maps (a racing rewrite of the entry loses at worst another flow's stamp: its replies
/// then look the forward half up). A global BPF function (see `per_map`); it returns true only
/// because a global function must return a scalar.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn unstamp_first_port(rkey: *const FlowKey, key: *const FlowKey) -> bool {
    // SAFETY: callers pass references (a global function: see `per_map`).
    let (Some(rkey), Some(key)) = (unsafe { (rkey.as_ref(), key.as_ref()) }) else {
        return false;
    };
    if let Some(r) = CONNTRACK.get_ptr_mut(rkey) {
        // SAFETY: a valid map value pointer (see `process`).
        let r = unsafe { &mut *r };
        if ct::is_reply_of(r, rkey, key) {
            r.epoch = 0;
        }
    }
    if let Some(r) = CT_NEW.get_ptr_mut(rkey) {
        // SAFETY: as above.
        let r = unsafe { &mut *r };
        if ct::is_reply_of(r, rkey, key) {
            r.epoch = 0;
        }
    }
    true
}

/// Whether reply key `rkey` is held by a live DNAT flow of a service its backend serves lazily
/// (`lazy_others_hold`, whose arguments these are), which has no reply entry to find. For the
/// port search (`mine` 0): one from this host's address and a port of the range (a spoofer's)
/// keeps that port from a full-NAT flow, which would share its tuple at the backend. A global
/// BPF function, checked once (see [`lazy_entry_holds`]): three call sites.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn held_lazily(rkey: *const FlowKey, mine: u64, tcp_flags: u8, now: u64) -> bool {
    // SAFETY: as in `lazy_entry_holds`.
    let Some(rkey) = (unsafe { rkey.as_ref() }) else {
        return true;
    };
    LAZY_REPLY
        .get_ptr(&ServiceKey::new(rkey.saddr, rkey.sport, rkey.proto))
        .is_some_and(|o| lazy_others_hold(rkey, o, mine, tcp_flags, now))
}

// `port_free_in`, one global function per map.
per_map!(
    port_free,
    port_free_in_conntrack,
    port_free_in_ct_new,
    port_free_in,
    (rkey: FlowKey),
    (now: u64),
    false
);

/// Whether full-NAT reply key `rkey` may be taken by a new flow in `table`: it is free there, or
/// what holds it is over (its flow idle past its timeout, its forward half gone or moved on,
/// in CT_NEW, unconfirmed for longer than `ct::UNCONFIRMED_PORT_HOLD_NS`, or closed both ways
/// longer ago than `ct::port_reusable`'s hold); such leftovers are removed with their forward
/// half, so the old flow's packets no longer lead to the port. Anything else keeps it, a
/// forward entry above all (never overwritten). Unlike `claim`, a flow closed on one side only
/// keeps its port for its linger, whatever the new packet: the backend may still be sending on
/// that connection. Inlined into `port_free_in_conntrack` and `port_free_in_ct_new` (see
/// `per_map`), which `port_free(table, ..)` chooses between.
#[inline(always)]
fn port_free_in(table: &Table, rkey: &FlowKey, now: u64) -> bool {
    let cfg = config();
    let Some(r) = table.get_ptr(rkey) else {
        return true;
    };
    // SAFETY: a valid map value pointer, read in place (a copy would take stack the call
    // chain does not have); a concurrent update makes this a judgement on either version.
    let r = unsafe { &*r };
    if r.dir != DIR_REPLY {
        return false;
    }
    let fkey = ct::forward_key(rkey, r);
    // SAFETY: as above.
    let mut partner = table
        .get_ptr(&fkey)
        .is_some_and(|f| ct::is_forward_of(unsafe { &*f }, &fkey, rkey));
    // A full-NAT flow's forward half may wait in the handshake table (`finish_full_nat`),
    // where this lookup does not see it: its unconfirmed reply entry keeps the port for the
    // hold below all the same. Its slot is not looked for here (the verifier walks this
    // function once per port tried): a pending forward half whose reply entry is gone is over,
    // never moved on (`pending` checks) nor listed (userspace checks). (The hold's age is
    // judged below, `abandoned`: the rule of `ct::pending_full_nat_holds` in two steps, one
    // comparison fewer in a function the verifier walks once per port tried.)
    partner |= r.full_nat() && core::ptr::eq(table, &CT_NEW);
    let abandoned = core::ptr::eq(table, &CT_NEW)
        && now.saturating_sub(r.last_seen_ns) > ct::UNCONFIRMED_PORT_HOLD_NS;
    if partner && !abandoned && !ct::port_lapsed(r, rkey.proto, now, cfg) {
        return false;
    }
    if partner {
        let _ = table.remove(&fkey);
    }
    let _ = table.remove(rkey);
    true
}

/// An ICMP error quoting a packet of a balanced flow, translated like the flow so that each
/// end sees only the addresses it knows:
/// - from the client's side (a router there: "fragmentation needed", "time exceeded") about a
///   reply berth sent as service -> client: to the backend, quoting backend -> client (full
///   NAT: backend -> berth's address and port, and from berth's address, the client side's
///   router being nobody the backend knows), so Path MTU discovery works for the backend;
/// - from the backend's side (port unreachable, ...) about a packet berth sent as client ->
///   backend (full NAT: berth's address and port -> backend): to the client, quoting client ->
///   service, the backend's address gone from both headers.
///
/// The quoted packet's reverse is the tuple of the flow's entry for the direction the error
/// travels, so one lookup finds it. A global BPF function (see [`args`]) returning a [`pack`]ed
/// verdict.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn icmp_error(skb: *mut __sk_buff, p: *mut Pkt, owner: u64) -> u64 {
    let Some((ctx, _)) = args(skb, p) else {
        return pack(exit(Reason::AbortMap));
    };
    // SAFETY: not null (`args`), the caller's own reference.
    pack(icmp_error_inner(&ctx, unsafe { &mut *p }, owner))
}

/// `owner`: the lazy service the quoted flow may be of (`lazy_owner_of` of its reply key).
#[inline(always)]
fn icmp_error_inner(ctx: &TcContext, p: &mut Pkt, owner: u64) -> (i32, Reason) {
    let e = &p.quote;
    let q = &e.inner;
    // The quoted packet left as service -> client (source is a service port) or as client ->
    // backend (destination is a backend port).
    if port_flags(u16::from_be(q.sport)) & port_flag(q.proto, false) == 0
        && port_flags(u16::from_be(q.dport)) & port_flag(q.proto, true) == 0
    {
        return exit(Reason::PassNotTcpUdp);
    }
    let cfg = config();
    if cfg.maglev_size == 0 {
        return exit(Reason::PassNotTcpUdp);
    }
    // The quote's reverse, which `process` left in the scratch slot.
    let key = p.key;
    let ent = if let Some(ent) = CONNTRACK.get_ptr(&key).or_else(|| CT_NEW.get_ptr(&key)) {
        // SAFETY: valid map value pointer; `CtEntry` is `Copy`.
        unsafe { *ent }
    } else if let Some((ent, _, _)) = match owner {
        0 => None,
        owner => lazy_half(&key, owner),
    } {
        // About a packet of a flow recorded lazily (no reply yet): its reply half as it would
        // be written, not written (an error creates no state).
        ent
    } else if let Some(ent) =
        // The clock for the claim (the ICMP path has not read it): this CPU's cache, fields
        // of their own beside the quote.
        pending_full_nat_reply(
            &key,
            coarse_clock(&mut p.clock_jiffies, &mut p.clock_ns),
        )
    {
        // About a full-NAT handshake's SYN, the flow pending (its backend refused it): the
        // same, from the handshake table.
        ent
    } else if let Some(ent) = indexed_half(&key) {
        // About a packet of an indexed flow whose reply half was evicted: the same, from its
        // forward entry.
        ent
    } else {
        return exit(Reason::PassNotTcpUdp);
    };
    let o = &p.flow;
    let reply = ent.dir == DIR_REPLY;
    if reply {
        // About client -> backend, sent to the client: from the backend's side only.
        if ent.in_ifindex != 0 && ent.in_ifindex != ingress_ifindex(ctx) {
            return exit(Reason::PassReplyWrongIface);
        }
        if o.daddr != q.saddr {
            return exit(Reason::PassNotTcpUdp);
        }
    } else if o.daddr != q.saddr {
        // About service -> client, so addressed to the service.
        return exit(Reason::PassNotTcpUdp);
    }
    if ttl_expires(o.ttl, cfg) {
        return exit(Reason::PassTtlExpired);
    }
    let full = ent.full_nat();
    let n = if reply {
        // The quoted destination (the backend) becomes the service; so does the outer source
        // if the backend itself sent the error (a router's own address is kept). Full NAT: the
        // quoted source and the outer destination (berth's address) become the client.
        let o_src = if o.saddr == q.daddr {
            ent.nat_addr
        } else {
            o.saddr
        };
        let (q_src, o_dst) = if full {
            ((ent.fnat_addr, ent.fnat_port), ent.fnat_addr)
        } else {
            ((q.saddr, q.sport), o.daddr)
        };
        IcmpNat {
            q_src,
            q_dst: (ent.nat_addr, ent.nat_port),
            o_src,
            o_dst,
        }
    } else {
        // The quoted source (the service) and the outer destination become the backend. Full
        // NAT: the quoted destination (the client) becomes berth's address and port, and the
        // outer source berth's address.
        let (q_dst, o_src) = if full {
            ((ent.fnat_addr, ent.fnat_port), ent.fnat_addr)
        } else {
            ((q.daddr, q.dport), o.saddr)
        };
        IcmpNat {
            q_src: (ent.nat_addr, ent.nat_port),
            q_dst,
            o_src,
            o_dst: ent.nat_addr,
        }
    };
    if rewrite_icmp(ctx, o, e, &n).is_err() {
        return exit(Reason::AbortRewrite);
    }
    count(Reason::EventIcmpTranslated);
    let tuple = (n.o_src, n.o_dst, 0, 0);
    let redirect = cfg.flags & CFG_F_REDIRECT != 0;
    let (act, reason, _) = route(ctx, o, tuple, reply, redirect);
    (act, reason)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic; this is never called.
    unsafe { core::hint::unreachable_unchecked() }
}
