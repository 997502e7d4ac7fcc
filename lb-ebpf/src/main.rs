//! berth's TC ingress program: Maglev-hashed DNAT of client -> service packets to a backend,
//! with LRU connection tracking, and the reverse translation of backend -> client replies.
//!
//! One conntrack lookup keyed by the packet's own 5-tuple serves both directions: a forward
//! entry (client -> service) says which backend to rewrite to, a reply entry (backend -> client)
//! says which service address to rewrite the source back to. New flows go through the service
//! table and the service's Maglev row. Every exit is counted by reason (see lb-common's
//! `reason` module for the action policy).
#![no_std]
#![no_main]

mod maps;
mod nat;
mod parse;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::classifier,
    maps::LruHashMap,
    programs::TcContext,
};
use lb_common::{
    CFG_F_REDIRECT, CtEntry, DpConfig, FlowKey, Reason, Route, ServiceKey, ServiceValue,
    ct::{self, DIR_FORWARD, DIR_REPLY, STATE_OPEN},
    hash::flow_hash,
    port_flag,
};

use crate::{
    maps::{
        BACKEND_ROUTES, BACKENDS, CONNTRACK, CT_NEW, LOCAL_ADDRS, MAGLEV, PORTS, SERVICES, account,
        count,
    },
    nat::{Side, redirect_cached, rewrite, route},
    parse::{Flow, Parsed, parse},
};

/// Written by userspace at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static BERTH_CONFIG: DpConfig = DpConfig::zeroed();

/// Only the `CFG_F_*` bits of the config: for per-packet checks that need nothing else (the
/// whole config is a 48-byte volatile copy).
#[inline(always)]
pub(crate) fn config_flags() -> u32 {
    // SAFETY: as in `config`.
    unsafe { core::ptr::read_volatile(&BERTH_CONFIG.flags) }
}

#[inline(always)]
pub(crate) fn config() -> DpConfig {
    // SAFETY: a read of a static; volatile so the compiler does not fold the zeroed initial
    // value that userspace overrides before loading.
    unsafe { core::ptr::read_volatile(&BERTH_CONFIG) }
}

#[classifier]
pub fn berth_tc_ingress(ctx: TcContext) -> i32 {
    let (action, reason) = process(&ctx);
    count(reason);
    action
}

/// Does nothing: the floor `cargo xtask bench` measures BPF_PROG_TEST_RUN's own per-run cost
/// against. Never attached.
#[classifier]
pub fn berth_tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[inline(always)]
fn exit(reason: Reason) -> (i32, Reason) {
    let act = match reason {
        Reason::DropEthTruncated
        | Reason::DropIpMalformed
        | Reason::DropL4Malformed
        | Reason::DropNoBackend
        | Reason::AbortRewrite
        | Reason::AbortMap => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    };
    (act as i32, reason)
}

#[inline(always)]
fn process(ctx: &TcContext) -> (i32, Reason) {
    let flow = match parse(ctx) {
        Parsed::Flow(f) => f,
        Parsed::Exit(r) => return exit(r),
    };
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
    let key = FlowKey::new(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let bytes = u64::from(ctx.len());

    if let Some(e) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a value pointer returned by the map lookup stays valid for this run (RCU).
        // Other CPUs may update the same entry; the fields we race on (state, last_seen_ns) are
        // plain integers where either write is acceptable.
        let e = unsafe { &mut *e };
        if e.dir == DIR_REPLY {
            return established(ctx, &flow, e, now, bytes, &cfg, Side::Src, &CONNTRACK);
        }
        if !ct::forward_expired(e, flow.proto, flow.tcp_flags, now, &cfg) {
            return established(ctx, &flow, e, now, bytes, &cfg, Side::Dst, &CONNTRACK);
        }
        count(Reason::EventCtExpired);
        if ct::is_bare_syn(flow.proto, flow.tcp_flags) {
            // The new connection starts unconfirmed: the closed flow's entries must not shadow
            // it from the main map.
            let rkey = paired_key(&flow, e);
            let _ = CONNTRACK.remove(&rkey);
            let _ = CONNTRACK.remove(&key);
        }
    } else if let Some(e) = CT_NEW.get_ptr_mut(&key) {
        // SAFETY: as above.
        let e = unsafe { &mut *e };
        if e.dir == DIR_REPLY {
            return established(ctx, &flow, e, now, bytes, &cfg, Side::Src, &CT_NEW);
        }
        if !ct::forward_expired(e, flow.proto, flow.tcp_flags, now, &cfg) {
            if ct::is_bare_syn(flow.proto, flow.tcp_flags) {
                // A retransmitted SYN: still unconfirmed.
                return established(ctx, &flow, e, now, bytes, &cfg, Side::Dst, &CT_NEW);
            }
            // The client's first packet after its SYN: the flow is confirmed and both of its
            // entries move to the main map, out of reach of SYN floods.
            let fwd = *e;
            let rkey = paired_key(&flow, &fwd);
            let rev = CT_NEW.get_ptr(&rkey).map(|r| {
                // SAFETY: valid map value pointer; `CtEntry` is `Copy`.
                unsafe { *r }
            });
            let moved = CONNTRACK.insert(&key, &fwd, 0).is_ok()
                && rev.is_none_or(|r| CONNTRACK.insert(&rkey, &r, 0).is_ok());
            if !moved {
                count(Reason::EventCtInsertFailed);
                return established(ctx, &flow, e, now, bytes, &cfg, Side::Dst, &CT_NEW);
            }
            let _ = CT_NEW.remove(&key);
            let _ = CT_NEW.remove(&rkey);
            if let Some(m) = CONNTRACK.get_ptr_mut(&key) {
                // SAFETY: as above.
                let m = unsafe { &mut *m };
                return established(ctx, &flow, m, now, bytes, &cfg, Side::Dst, &CONNTRACK);
            }
            // Evicted at once by a concurrent insert: the Maglev pick below is the same.
        } else {
            count(Reason::EventCtExpired);
        }
    }
    if !service_port {
        return exit(Reason::PassNoService);
    }
    new_flow(ctx, &flow, &key, now, bytes, &cfg)
}

/// Routes a new flow's first packet, reusing the backend's cached route while it is fresh (the
/// FIB lookup is the most expensive step of a new flow). The cache ignores the client address:
/// source-based policy routing towards backends is not supported.
#[inline(always)]
fn route_to_backend(
    ctx: &TcContext,
    flow: &Flow,
    backend_id: u32,
    backend: &lb_common::Backend,
    now: u64,
    cfg: &DpConfig,
) -> (i32, Reason, Route) {
    let redirect = cfg.flags & CFG_F_REDIRECT != 0;
    let tuple = (flow.saddr, backend.addr, flow.sport, backend.port);
    let Some(cached) = BACKEND_ROUTES.get_ptr_mut(backend_id) else {
        return route(ctx, flow, tuple, false, redirect);
    };
    // SAFETY: a value pointer of an array map is valid for the run; racing writers on other CPUs
    // store the same kind of data, and a torn MAC is corrected at the next refresh.
    let cached = unsafe { &mut *cached };
    let fresh = now.wrapping_sub(cached.stamp_ns) <= ct::TOUCH_INTERVAL_NS;
    if redirect && cached.route.ifindex != 0 && fresh {
        let (act, reason) = redirect_cached(ctx, &cached.route, false);
        return (act, reason, cached.route);
    }
    let (act, reason, r) = route(ctx, flow, tuple, false, redirect);
    cached.route = r;
    cached.stamp_ns = now;
    (act, reason, r)
}

#[inline(always)]
pub(crate) fn port_flags(port: u16) -> u8 {
    PORTS.get(u32::from(port)).copied().unwrap_or(0)
}

/// The key of the other entry of the pair `e` belongs to.
#[inline(always)]
fn paired_key(flow: &Flow, e: &CtEntry) -> FlowKey {
    if e.dir == DIR_FORWARD {
        // Forward: client -> service; the reply entry is backend -> client.
        FlowKey::new(e.nat_addr, flow.saddr, e.nat_port, flow.sport, flow.proto)
    } else {
        // Reply: backend -> client; the forward entry is client -> service.
        FlowKey::new(flow.daddr, e.nat_addr, flow.dport, e.nat_port, flow.proto)
    }
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into the hot path")]
fn established(
    ctx: &TcContext,
    flow: &Flow,
    e: &mut CtEntry,
    now: u64,
    bytes: u64,
    cfg: &DpConfig,
    side: Side,
    table: &LruHashMap<FlowKey, CtEntry>,
) -> (i32, Reason) {
    let touch = now.wrapping_sub(e.last_seen_ns) > ct::TOUCH_INTERVAL_NS;
    let state = ct::next_state(e.state, flow.proto, flow.tcp_flags);
    if state != e.state {
        e.state = state;
        e.last_seen_ns = now;
        count(Reason::EventCtClosing);
        if let Some(other) = table.get_ptr_mut(&paired_key(flow, e)) {
            // SAFETY: as for the entry in `process`.
            unsafe {
                (*other).state = state;
                (*other).last_seen_ns = now;
            }
        }
    } else if touch {
        e.last_seen_ns = now;
    }
    account(e.service_id, e.backend_id, bytes, false);
    let (addr, port) = (e.nat_addr, e.nat_port);
    if rewrite(ctx, flow, side, addr, port).is_err() {
        return exit(Reason::AbortRewrite);
    }
    let reply = side == Side::Src;
    let redirect = cfg.flags & CFG_F_REDIRECT != 0;
    // The cached route is used until the entry's once-a-second touch, which looks it up again.
    if redirect && e.route.ifindex != 0 && !touch {
        return redirect_cached(ctx, &e.route, reply);
    }
    let tuple = match side {
        Side::Dst => (flow.saddr, addr, flow.sport, port),
        Side::Src => (addr, flow.daddr, port, flow.dport),
    };
    let (act, reason, r) = route(ctx, flow, tuple, reply, redirect);
    e.route = r;
    (act, reason)
}

#[inline(always)]
fn lookup_service(flow: &Flow) -> Option<ServiceValue> {
    if let Some(v) = SERVICES.get_ptr(&ServiceKey::new(flow.daddr, flow.dport, flow.proto)) {
        // SAFETY: valid map value pointer; `ServiceValue` is `Copy`.
        return Some(unsafe { *v });
    }
    let v = SERVICES.get_ptr(&ServiceKey::new(0, flow.dport, flow.proto))?;
    // SAFETY: as above.
    let v = unsafe { *v };
    // "Any address of this host": the addresses userspace keeps in LOCAL_ADDRS.
    if LOCAL_ADDRS.get_ptr(&flow.daddr).is_some() {
        Some(v)
    } else {
        None
    }
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    flow: &Flow,
    key: &FlowKey,
    now: u64,
    bytes: u64,
    cfg: &DpConfig,
) -> (i32, Reason) {
    let Some(svc) = lookup_service(flow) else {
        return exit(Reason::PassNoService);
    };
    if svc.id >= cfg.max_services {
        return exit(Reason::AbortMap);
    }
    let m = cfg.maglev_size;
    let slot = svc.id * m + flow_hash(key, cfg.hash_seed) % m;
    let Some(&backend_id) = MAGLEV.get(slot) else {
        return exit(Reason::AbortMap);
    };
    let Some(&backend) = BACKENDS.get(backend_id) else {
        return exit(Reason::AbortMap);
    };
    if backend.addr == 0 {
        return exit(Reason::DropNoBackend);
    }

    if rewrite(ctx, flow, Side::Dst, backend.addr, backend.port).is_err() {
        return exit(Reason::AbortRewrite);
    }
    let (act, reason, route) = route_to_backend(ctx, flow, backend_id, &backend, now, cfg);

    let state = ct::next_state(STATE_OPEN, flow.proto, flow.tcp_flags);
    let fwd = CtEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        dir: DIR_FORWARD,
        state,
        backend_id,
        service_id: svc.id,
        last_seen_ns: now,
        route,
    };
    // The reply direction's route is learnt from its first packet.
    let rev = CtEntry {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        dir: DIR_REPLY,
        route: Route::NONE,
        ..fwd
    };
    let rev_key = FlowKey::new(
        backend.addr,
        flow.saddr,
        backend.port,
        flow.sport,
        flow.proto,
    );
    // A bare SYN starts unconfirmed (CT_NEW); anything else picked up mid-stream is established.
    let table = if ct::is_bare_syn(flow.proto, flow.tcp_flags) {
        &CT_NEW
    } else {
        &CONNTRACK
    };
    if table.insert(&rev_key, &rev, 0).is_err() || table.insert(key, &fwd, 0).is_err() {
        // The packet is still balanced: the Maglev pick is a pure function of the tuple.
        count(Reason::EventCtInsertFailed);
    }
    if flow.proto == lb_common::IPPROTO_TCP && !ct::is_bare_syn(flow.proto, flow.tcp_flags) {
        count(Reason::EventCtMidstreamPickup);
    }
    account(svc.id, backend_id, bytes, true);
    (act, reason)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic; this is never called.
    unsafe { core::hint::unreachable_unchecked() }
}
