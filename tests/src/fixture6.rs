//! The IPv6 side of the fixture harness: the fixture namespace of [`crate::fixture`] with IPv6
//! addresses, routes and permanent neighbours added (client network fd00:10::/64 on `fx0`, this
//! host fd00:10::1; backends fd00:20::11..=19 behind `fx0`; fd00:30::1/64 on `fx2`), and IPv6
//! services installed beside the IPv4 ones the reconciler writes.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{
    IPPROTO_TCP, Reason, port_to_wire,
    v6::{CtEntry6, FlowKey6, ipv6_to_wire},
};
use lb_userspace::{
    config::Nat,
    dataplane::{Backend6Spec, host_ipv6_addrs},
};

use crate::{
    fixture::{BACKEND_MAC_BASE, CLIENT_MAC, Fixture, Run, fx0_mac, in_fixture_netns, options},
    topo::sh,
    wire::{TCP_ACK, TCP_SYN},
    wire6::{self, Ipv6Packet},
};

pub const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
/// A router on the client's side (the source of ICMPv6 errors about replies).
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0xfe);

pub fn backend6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x10 + u16::from(n))
}

pub fn backend6_mac(addr: Ipv6Addr) -> [u8; 6] {
    let mut m = BACKEND_MAC_BASE;
    m[4] = 0x20;
    m[5] = addr.octets()[15];
    m
}

pub fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

pub fn client6(port: u16) -> SocketAddrV6 {
    sa6(CLIENT6, port)
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// [`in_fixture_netns`] with the IPv6 side configured.
pub fn in_fixture6_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_fixture_netns(move || {
        sh(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"]);
        sh(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:10::1/64",
            "dev",
            "fx0",
            "nodad",
        ]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:30::1/64",
            "dev",
            "fx2",
            "nodad",
        ]);
        sh(&["ip", "-6", "route", "add", "fd00:20::/64", "dev", "fx0"]);
        sh(&[
            "ip",
            "-6",
            "route",
            "add",
            "unreachable",
            "2001:db8:dead::/48",
        ]);
        for (a, m) in [(CLIENT6, CLIENT_MAC), (ROUTER6, CLIENT_MAC)]
            .into_iter()
            .chain((1..=9).map(|n| (backend6(n), backend6_mac(backend6(n)))))
        {
            sh(&[
                "ip",
                "-6",
                "neigh",
                "add",
                &a.to_string(),
                "lladdr",
                &mac(m),
                "dev",
                "fx0",
                "nud",
                "permanent",
            ]);
        }
        f()
    })
}

/// An IPv6 service to install: its id, listen address, protocol and backends (address,
/// weight); backend ids are given in order from `first_backend_id`.
pub struct Svc6 {
    pub id: u32,
    pub listen: SocketAddrV6,
    pub proto: u8,
    pub backends: Vec<(SocketAddrV6, u32)>,
    pub first_backend_id: u32,
    /// Full NAT from this address (`None`: DNAT).
    pub snat: Option<Ipv6Addr>,
}

impl Svc6 {
    pub fn specs(&self) -> Vec<Backend6Spec> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, &(addr, weight))| Backend6Spec {
                id: self.first_backend_id + i as u32,
                addr,
                weight,
                snat: self.snat,
            })
            .collect()
    }
}

/// A fresh dataplane with IPv4 services through the reconciler (possibly none) and IPv6
/// services installed beside them, the namespace's IPv6 addresses recorded.
pub fn fixture6(v4: Vec<lb_userspace::config::Service>, v6: &[Svc6]) -> Fixture {
    fixture6_with(options(), v4, v6)
}

/// [`fixture6`] with dataplane options `o`.
pub fn fixture6_with(
    o: lb_userspace::dataplane::DataplaneOptions,
    v4: Vec<lb_userspace::config::Service>,
    v6: &[Svc6],
) -> Fixture {
    let mut f = Fixture::new(o, v4);
    let dp = f.rec.dataplane_mut();
    dp.sync_local_addrs6(&host_ipv6_addrs())
        .expect("local IPv6 addresses");
    for s in v6 {
        install(&mut f, s);
    }
    f
}

/// (Re)installs one IPv6 service.
pub fn install(f: &mut Fixture, s: &Svc6) {
    f.rec
        .dataplane_mut()
        .install_service6(s.id, s.listen, s.proto, &s.specs())
        .expect("install IPv6 service");
}

pub fn flow_key6(src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> FlowKey6 {
    FlowKey6::new(
        ipv6_to_wire(src.ip().octets()),
        ipv6_to_wire(dst.ip().octets()),
        port_to_wire(src.port()),
        port_to_wire(dst.port()),
        proto,
    )
}

pub fn ct6(f: &Fixture, key: &FlowKey6) -> Option<CtEntry6> {
    f.dp().conntrack6_get(key)
}

/// Checks a translated IPv6 packet leaving by redirect as `exit`: checksums recomputed from
/// scratch, one hop taken, MACs from the FIB (`dst_mac`), length and payload intact. Returns
/// the output parsed.
pub fn assert_redirected6(
    run: &Run,
    input: &[u8],
    exit: lb_common::Reason,
    dst_mac: [u8; 6],
) -> wire6::Parsed6 {
    assert_eq!(run.action, crate::fixture::TC_ACT_REDIRECT, "{run:?}");
    assert_eq!(run.exits(), [exit.name()], "{run:?}");
    wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("rewritten packet: {e}"));
    let i = wire6::parse6(input);
    let o = wire6::parse6(&run.out);
    assert_eq!(o.payload, i.payload, "payload");
    assert_eq!(o.tcp_flags, i.tcp_flags);
    assert_eq!(o.l4_off, i.l4_off, "extension headers kept");
    assert_eq!(o.hop_limit, i.hop_limit - 1, "one hop");
    assert_eq!(o.dst_mac, dst_mac, "destination MAC from the FIB");
    assert_eq!(o.src_mac, fx0_mac(), "source MAC of the egress device");
    assert_eq!(run.out.len(), input.len());
    // Everything before the L4 header but the addresses, hop limit and MACs is as it was.
    assert_eq!(
        run.out[14..21],
        input[14..21],
        "version, class, label, length, next"
    );
    assert_eq!(
        run.out[54..14 + o.l4_off],
        input[54..14 + i.l4_off],
        "extension headers"
    );
    o
}

/// Runs the program once on `pkt` as if it arrived on `fx0`, like [`Fixture::run`], or `None`
/// when the kernel refuses the frame before the program runs (BPF_PROG_TEST_RUN takes no IPv6
/// frame shorter than Ethernet + the fixed IPv6 header).
pub fn try_run(f: &Fixture, pkt: &[u8]) -> Option<Run> {
    use aya::programs::{TestRun, TestRunOptions};
    let counters = || -> Vec<u64> {
        f.dp()
            .reason_counters()
            .expect("reason counters")
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    };
    let before = counters();
    let mut out = vec![0u8; pkt.len() + 256];
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&crate::fixture::ifindex("fx0").to_ne_bytes());
    let res = f
        .dp()
        .program()
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .ok()?;
    out.truncate(res.data_size_out as usize);
    let after = counters();
    let reasons = lb_common::Reason::ALL
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a != b)
        .map(|(r, (b, a))| (r.name(), a - b))
        .collect();
    let run = Run {
        action: res.return_value,
        out,
        reasons,
    };
    assert_eq!(run.exits().len(), 1, "exactly one exit: {run:?}");
    Some(run)
}

/// How the backend sees a flow: its own address and the peer's (the client, or for full NAT
/// this host's address and port).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Leg6 {
    pub backend: SocketAddrV6,
    pub peer: SocketAddrV6,
}

/// A forward packet through TC: translated to one of `backends`, from the client (DNAT) or
/// from HOST6 (full NAT).
pub fn fwd6(f: &Fixture, pkt: &[u8], backends: &[SocketAddrV6], nat: Nat) -> Leg6 {
    let run = f.run(pkt);
    let o = wire6::parse6(&run.out);
    assert!(backends.contains(&o.dst), "{} not in {backends:?}", o.dst);
    let o = assert_redirected6(&run, pkt, Reason::FwdRedirect, backend6_mac(*o.dst.ip()));
    if nat == Nat::Full {
        assert_eq!(*o.src.ip(), HOST6, "full NAT: from this host");
    } else {
        assert_eq!(o.src, wire6::parse6(pkt).src, "DNAT: source kept");
    }
    Leg6 {
        backend: o.dst,
        peer: o.src,
    }
}

/// A completed handshake client -> VIP:80 (a service with `backends`) through the TC program
/// (client ISN 1000, backend ISN 5000).
pub fn handshake6(f: &Fixture, c: SocketAddrV6, backends: &[SocketAddrV6], nat: Nat) -> Leg6 {
    let service = sa6(VIP6, 80);
    let syn = Ipv6Packet::tcp_seq(c, service, TCP_SYN, 1000, 0, &[]).build();
    let leg = fwd6(f, &syn, backends, nat);
    let synack = Ipv6Packet::tcp_seq(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 5000, 1001, &[]);
    let run = f.run(&synack.build());
    assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
    let ack =
        Ipv6Packet::tcp_seq(c, service, TCP_ACK, 1001, 5001, b"GET / HTTP/1.1\r\n\r\n").build();
    assert_eq!(fwd6(f, &ack, &[leg.backend], nat), leg);
    let key = flow_key6(c, service, IPPROTO_TCP);
    assert!(!f.dp().conntrack6_unconfirmed(&key), "confirmed");
    leg
}
