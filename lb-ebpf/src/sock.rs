//! Socket-level balancing for clients on the host itself, whose connections never cross the TC
//! hook: cgroup sock_addr programs rewrite the address a socket connects or sends to, from a
//! service to a backend picked from the same service table and Maglev rows, and show the
//! service address again where the application looks at its peer (`recvmsg` for UDP,
//! `getpeername`). Nothing is translated per packet: the socket talks to the backend directly.
//!
//! A wildcard service ("any address of this host") matches destinations in `LOCAL_ADDRS`
//! (`LOCAL_ADDRS6`), and loopback addresses (127/8, `::1`) for sockets of the host's own network
//! namespace (a container's 127.0.0.1 is the container's own).
//!
//! IPv6 sockets have hooks of their own over IPv6's maps (`SERVICES6`, `BACKENDS6`,
//! `SOCK_REVNAT6`; the Maglev rows are shared). A dual-stack IPv6 socket talking to an IPv4
//! peer names it IPv4-mapped (`::ffff:a.b.c.d`): the IPv6 hooks treat such a destination as
//! the IPv4 address it maps (IPv4's service, backend and reverse map) and write the backend
//! back mapped. The kernel runs the IPv6 hook for connect and getpeername and recvmsg of those
//! sockets, but IPv4's `sendmsg4` for their unconnected sends (`udpv6_sendmsg` hands a mapped
//! destination to `udp_sendmsg`), which the IPv4 program already serves.
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
    DpConfig, IPPROTO_TCP, IPPROTO_UDP, Reason, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    hash::cookie_hash,
    port_flag,
    v6::{LOOPBACK6, ServiceKey6, SockRevKey6, SockRevValue6, v4_mapped},
};

use crate::{
    config, find_service,
    maps::{BACKENDS, LOCAL_ADDRS, MAGLEV, SERVICES, SOCK_REVNAT, SOCK_REVNAT6, account, count},
    port_flags,
    v6::{BACKENDS6, LOCAL_ADDRS6, SERVICES6},
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

#[cgroup_sock_addr(connect6)]
pub fn berth_connect6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn berth_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn berth_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn berth_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
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

/// Whether the socket lives in the host's own network namespace (where berth's loopback
/// services are).
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext, host_netns: u64) -> bool {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) == host_netns }
}

/// Whether `addr` (network byte order) is an address of this host, seen from the socket.
#[inline(always)]
fn is_local(ctx: &SockAddrContext, addr: u32, host_netns: u64) -> bool {
    if u32::from_be(addr) >> 24 == 127 {
        return in_host_netns(ctx, host_netns);
    }
    LOCAL_ADDRS.get_ptr(&addr).is_some()
}

/// Whether the IPv6 `addr` is an address of this host, seen from the socket.
#[inline(always)]
fn is_local6(ctx: &SockAddrContext, addr: &[u32; 4], host_netns: u64) -> bool {
    if *addr == LOOPBACK6 {
        return in_host_netns(ctx, host_netns);
    }
    LOCAL_ADDRS6.get_ptr(addr).is_some()
}

/// The Maglev slot of this socket in the row of service `svc`: (backend id, socket cookie),
/// or None (counted) when the row cannot be read.
#[inline(always)]
fn pick(ctx: &SockAddrContext, cfg: &DpConfig, svc: &ServiceValue) -> Option<(u32, u64)> {
    if svc.id >= cfg.max_services {
        count(Reason::AbortMap);
        return None;
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let m = cfg.maglev_size;
    let Some(&backend_id) = MAGLEV.get(svc.id * m + cookie_hash(cookie, cfg.hash_seed) % m) else {
        count(Reason::AbortMap);
        return None;
    };
    Some((backend_id, cookie))
}

/// connect/sendmsg: a service destination becomes a backend.
#[inline(always)]
fn forward(ctx: &SockAddrContext, connect: bool) {
    // SAFETY: the kernel passes a valid context for the program's whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    // The port sits in the low 16 bits, in network byte order like the maps' ports.
    if let Some((addr, port)) = forward4(ctx, sa.user_ip4, sa.user_port as u16, proto, connect) {
        sa.user_ip4 = addr;
        sa.user_port = u32::from(port);
    }
}

/// The IPv4 service destination `daddr:dport` of a socket as the backend to send it to
/// (reverse translation recorded, counted), or None to leave it as it is.
#[inline(always)]
fn forward4(
    ctx: &SockAddrContext,
    daddr: u32,
    dport: u16,
    proto: u8,
    connect: bool,
) -> Option<(u32, u16)> {
    let flags = port_flags(u16::from_be(dport));
    if flags & port_flag(proto, false) == 0 {
        return None;
    }
    let cfg = config();
    if cfg.maglev_size == 0 {
        return None;
    }
    let svc = find_service!(
        flags,
        proto,
        SERVICES.get_ptr(&ServiceKey::new(daddr, dport, proto)),
        SERVICES.get_ptr(&ServiceKey::new(0, dport, proto)),
        is_local(ctx, daddr, cfg.host_netns_cookie)
    )?;
    let (backend_id, cookie) = pick(ctx, cfg, &svc)?;
    let Some(&backend) = BACKENDS.get(backend_id) else {
        count(Reason::AbortMap);
        return None;
    };
    if backend.addr == 0 {
        count(Reason::EventSockNoBackend);
        return None;
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
    count(Reason::EventSockTranslated);
    account(svc.id, backend_id, 0, connect);
    Some((backend.addr, backend.port))
}

/// recvmsg/getpeername: a backend's address, for a socket berth sent to it, shows as the
/// service address the socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    // SAFETY: as in `forward`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    if let Some(orig) = reverse4(ctx, sa.user_ip4, sa.user_port as u16, proto) {
        sa.user_ip4 = orig.addr;
        sa.user_port = u32::from(orig.port);
    }
}

/// The service address a socket asked for, if berth sent it to the backend `addr:port`
/// (counted).
#[inline(always)]
fn reverse4(ctx: &SockAddrContext, addr: u32, port: u16, proto: u8) -> Option<SockRevValue> {
    if port_flags(u16::from_be(port)) & port_flag(proto, true) == 0 {
        return None;
    }
    let key = SockRevKey {
        // SAFETY: the helper takes the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port,
        _pad: 0,
    };
    let orig = SOCK_REVNAT.get_ptr(&key)?;
    count(Reason::EventSockReverse);
    // SAFETY: valid map value pointer; the value is `Copy`.
    Some(unsafe { *orig })
}

/// The destination of an IPv6 socket. `user_ip6` allows 4-byte reads and writes, word by word.
#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ]
}

#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, a: &[u32; 4]) {
    sa.user_ip6[0] = a[0];
    sa.user_ip6[1] = a[1];
    sa.user_ip6[2] = a[2];
    sa.user_ip6[3] = a[3];
}

/// connect6/sendmsg6: an IPv6 service destination becomes an IPv6 backend; an IPv4-mapped one
/// is IPv4's (its backend written back mapped).
#[inline(always)]
fn forward6(ctx: &SockAddrContext, connect: bool) {
    // SAFETY: as in `forward`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    let daddr = user_ip6(sa);
    let dport = sa.user_port as u16;
    if let Some(v4) = v4_mapped(&daddr) {
        if let Some((addr, port)) = forward4(ctx, v4, dport, proto, connect) {
            // Words 0-2 stay the mapped prefix.
            sa.user_ip6[3] = addr;
            sa.user_port = u32::from(port);
        }
        return;
    }
    let flags = port_flags(u16::from_be(dport));
    if flags & port_flag(proto, false) == 0 {
        return;
    }
    let cfg = config();
    if cfg.maglev_size == 0 {
        return;
    }
    let Some(svc) = find_service!(
        flags,
        proto,
        SERVICES6.get_ptr(&ServiceKey6::new(daddr, dport, proto)),
        SERVICES6.get_ptr(&ServiceKey6::new([0; 4], dport, proto)),
        is_local6(ctx, &daddr, cfg.host_netns_cookie)
    ) else {
        return;
    };
    let Some((backend_id, cookie)) = pick(ctx, cfg, &svc) else {
        return;
    };
    let Some(backend) = BACKENDS6.get_ptr(backend_id) else {
        count(Reason::AbortMap);
        return;
    };
    // SAFETY: valid map value pointer; the value is `Copy`.
    let backend = unsafe { *backend };
    if backend.is_empty() {
        count(Reason::EventSockNoBackend);
        return;
    }
    let orig = SockRevValue6 {
        addr: daddr,
        port: dport,
        _pad: 0,
    };
    if SOCK_REVNAT6
        .insert(
            &SockRevKey6::new(cookie, backend.addr, backend.port),
            &orig,
            0,
        )
        .is_err()
    {
        count(Reason::EventSockRevnatFailed);
    }
    set_user_ip6(sa, &backend.addr);
    sa.user_port = u32::from(backend.port);
    count(Reason::EventSockTranslated);
    account(svc.id, backend_id, 0, connect);
}

/// recvmsg6/getpeername6: as `reverse`, for IPv6 backends and IPv4-mapped ones.
#[inline(always)]
fn reverse6(ctx: &SockAddrContext) {
    // SAFETY: as in `forward`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    let addr = user_ip6(sa);
    let port = sa.user_port as u16;
    if let Some(v4) = v4_mapped(&addr) {
        if let Some(orig) = reverse4(ctx, v4, port, proto) {
            sa.user_ip6[3] = orig.addr;
            sa.user_port = u32::from(orig.port);
        }
        return;
    }
    if port_flags(u16::from_be(port)) & port_flag(proto, true) == 0 {
        return;
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = SOCK_REVNAT6.get_ptr(&SockRevKey6::new(cookie, addr, port)) {
        // SAFETY: valid map value pointer; the value is `Copy`.
        let orig = unsafe { *orig };
        set_user_ip6(sa, &orig.addr);
        sa.user_port = u32::from(orig.port);
        count(Reason::EventSockReverse);
    }
}
