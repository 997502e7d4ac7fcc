//! Socket-level balancing for clients on the host itself, whose connections never cross the TC
//! hook: cgroup sock_addr programs rewrite the address a socket connects or sends to, from a
//! service to a backend picked from the same service table and Maglev rows, and show the
//! service address again where the application looks at its peer (`recvmsg` for UDP,
//! `getpeername`). Nothing is translated per packet: the socket talks to the backend directly.
//!
//! A wildcard service ("any address of this host") matches destinations in `LOCAL_ADDRS`, and
//! loopback addresses for sockets of the host's own network namespace (a container's 127.0.0.1
//! is the container's own).
//!
//! Every hook returns 1 (allow): berth never refuses a socket operation.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, Reason, ServiceKey, SockRevKey, SockRevValue, hash::cookie_hash,
    port_flag,
};

use crate::{
    config,
    maps::{BACKENDS, LOCAL_ADDRS, MAGLEV, SERVICES, SOCK_REVNAT, account, count},
    port_flags,
};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn berth_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn berth_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn berth_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn berth_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        p if p == u32::from(IPPROTO_TCP) => Some(IPPROTO_TCP),
        p if p == u32::from(IPPROTO_UDP) => Some(IPPROTO_UDP),
        _ => None,
    }
}

/// Whether `addr` (network byte order) is an address of this host, seen from the socket.
#[inline(always)]
fn is_local(ctx: &SockAddrContext, addr: u32, host_netns: u64) -> bool {
    if u32::from_be(addr) >> 24 == 127 {
        // SAFETY: the helper takes the program's own context.
        return unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host_netns;
    }
    LOCAL_ADDRS.get_ptr(&addr).is_some()
}

/// connect/sendmsg: a service destination becomes a backend.
#[inline(always)]
fn forward(ctx: &SockAddrContext, connect: bool) {
    // SAFETY: the kernel passes a valid context for the program's whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    let daddr = sa.user_ip4;
    // The port sits in the low 16 bits, in network byte order like the maps' ports.
    let dport = sa.user_port as u16;
    if port_flags(u16::from_be(dport)) & port_flag(proto, false) == 0 {
        return;
    }
    let cfg = config();
    if cfg.maglev_size == 0 {
        return;
    }
    let svc = match SERVICES.get_ptr(&ServiceKey::new(daddr, dport, proto)) {
        // SAFETY: valid map value pointer; the value is `Copy`.
        Some(v) => unsafe { *v },
        None => {
            let Some(v) = SERVICES.get_ptr(&ServiceKey::new(0, dport, proto)) else {
                return;
            };
            if !is_local(ctx, daddr, cfg.host_netns_cookie) {
                return;
            }
            // SAFETY: as above.
            unsafe { *v }
        }
    };
    if svc.id >= cfg.max_services {
        count(Reason::AbortMap);
        return;
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let m = cfg.maglev_size;
    let Some(&backend_id) = MAGLEV.get(svc.id * m + cookie_hash(cookie, cfg.hash_seed) % m) else {
        count(Reason::AbortMap);
        return;
    };
    let Some(&backend) = BACKENDS.get(backend_id) else {
        count(Reason::AbortMap);
        return;
    };
    if backend.addr == 0 {
        count(Reason::EventSockNoBackend);
        return;
    }
    let key = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let orig = SockRevValue {
        addr: daddr,
        port: dport,
        _pad: 0,
    };
    if SOCK_REVNAT.insert(&key, &orig, 0).is_err() {
        count(Reason::EventSockRevnatFailed);
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    count(Reason::EventSockTranslated);
    account(svc.id, backend_id, 0, connect);
}

/// recvmsg/getpeername: a backend's address, for a socket berth sent to it, shows as the
/// service address the socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    // SAFETY: as in `forward`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    let port = sa.user_port as u16;
    if port_flags(u16::from_be(port)) & port_flag(proto, true) == 0 {
        return;
    }
    let key = SockRevKey {
        // SAFETY: the helper takes the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4,
        port,
        _pad: 0,
    };
    if let Some(orig) = SOCK_REVNAT.get_ptr(&key) {
        // SAFETY: valid map value pointer; the value is `Copy`.
        let orig = unsafe { *orig };
        sa.user_ip4 = orig.addr;
        sa.user_port = u32::from(orig.port);
        count(Reason::EventSockReverse);
    }
}
