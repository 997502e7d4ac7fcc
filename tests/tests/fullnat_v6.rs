//! IPv6 full NAT through BPF_PROG_TEST_RUN (issue 12, the full-NAT path of issue 11 over
//! IPv6): backends whose replies would not come back through this host get flows from its own
//! IPv6 address and a port of `dataplane.snat_ports`, by the same rules as IPv4's
//! (`fullnat.rs`). Each case from fresh maps, every rewritten packet's checksums recomputed from
//! scratch: a new flow and its two entries, the reply, the confirmation, UDP, a taken port never
//! overwritten, an exhausted range, ICMPv6 errors quoting a full-NAT flow either way, a port
//! given up after a close both ways (and kept by a half-close): at once when the final ACK
//! passed, after the hold when it did not.

use std::{net::SocketAddrV6, time::Duration};

use berth_tests::{
    fixture::*,
    fixture6::*,
    wire::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    wire6::{self, Ipv6Packet},
};
use lb_common::{
    CtEntry, IPPROTO_TCP, IPPROTO_UDP, Reason, ct, port_to_wire,
    v6::{CtEntry6, flow_hash6, forward_key6, ipv6_from_wire, ipv6_to_wire, reply_key6},
};
use lb_userspace::{
    config::PortRange,
    dataplane::{DataplaneOptions, monotonic_ns},
};

const PORTS: PortRange = PortRange {
    first: 61000,
    last: 65535,
};

fn b6(n: u8) -> SocketAddrV6 {
    sa6(backend6(n), 8000)
}

fn web6() -> Vec<SocketAddrV6> {
    vec![b6(1), b6(2), b6(3)]
}

/// A TCP service on the VIP (id 0, backends 1-3 on :8000, ids 1..=3) and a UDP one on
/// [::]:5353 (id 1, backends 4 and 5 on :53, ids 4 and 5), both full NAT from HOST6.
fn services(web: Vec<SocketAddrV6>) -> Vec<Svc6> {
    vec![
        Svc6 {
            id: 0,
            listen: sa6(VIP6, 80),
            proto: IPPROTO_TCP,
            backends: web.into_iter().map(|b| (b, 1)).collect(),
            first_backend_id: 1,
            snat: Some(HOST6),
        },
        Svc6 {
            id: 1,
            listen: sa6(std::net::Ipv6Addr::UNSPECIFIED, 5353),
            proto: IPPROTO_UDP,
            backends: vec![(sa6(backend6(4), 53), 1), (sa6(backend6(5), 53), 1)],
            first_backend_id: 4,
            snat: Some(HOST6),
        },
    ]
}

fn standard() -> Fixture {
    fixture6(Vec::new(), &services(web6()))
}

/// One backend (1) behind the VIP, `ports` as the source range, `reuse` as the port hold.
fn one_backend(ports: PortRange, reuse: Duration) -> Fixture {
    let mut f = Fixture::new(
        DataplaneOptions {
            snat_ports: ports,
            snat_reuse: reuse,
            ..options()
        },
        Vec::new(),
    );
    f.rec
        .dataplane_mut()
        .sync_local_addrs6(&lb_userspace::dataplane::host_ipv6_addrs())
        .expect("local IPv6 addresses");
    for s in services(vec![b6(1)]) {
        install(&mut f, &s);
    }
    f
}

fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8, seq: u32, ack: u32) -> Ipv6Packet {
    Ipv6Packet::tcp_seq(src, dst, flags, seq, ack, &[])
}

/// Checks a full-NAT forward translation: to one of `backends`, from HOST6 and a port of
/// `ports`; returns (backend, berth's source).
fn assert_fwd(
    run: &Run,
    input: &[u8],
    backends: &[SocketAddrV6],
    ports: PortRange,
) -> (SocketAddrV6, SocketAddrV6) {
    let o = wire6::parse6(&run.out);
    assert!(backends.contains(&o.dst), "{} not in {backends:?}", o.dst);
    let o = assert_redirected6(run, input, Reason::FwdRedirect, backend6_mac(*o.dst.ip()));
    assert_eq!(*o.src.ip(), HOST6, "from this host's address");
    assert!(
        (ports.first..=ports.last).contains(&o.src.port()),
        "source port {} outside {ports}",
        o.src.port()
    );
    (o.dst, o.src)
}

/// Checks a reply translated back: from `service` to `to`.
fn assert_reply(run: &Run, input: &[u8], service: SocketAddrV6, to: SocketAddrV6) {
    let o = assert_redirected6(run, input, Reason::ReplyRedirect, CLIENT_MAC);
    assert_eq!((o.src, o.dst), (service, to));
}

/// The source port flow `client -> service` tries first (see `ct::snat_port`).
fn first_try(client: SocketAddrV6, service: SocketAddrV6, proto: u8) -> u16 {
    let h = flow_hash6(&flow_key6(client, service, proto), options().hash_seed);
    ct::snat_port(h, 0, PORTS.first, PORTS.last)
}

#[test]
fn a_new_flow_leaves_from_this_host_and_its_halves_name_each_other() {
    in_fixture6_netns(|| {
        let f = standard();
        let (c, svc) = (client6(40001), sa6(VIP6, 80));
        let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
        let run = f.run(&syn);
        let (be, snat) = assert_fwd(&run, &syn, &web6(), PORTS);
        assert_eq!(run.counted(Reason::EventSnatPortTaken), 0, "{run:?}");
        let fkey = flow_key6(c, svc, IPPROTO_TCP);
        let fwd = ct6(&f, &fkey).expect("forward half");
        assert_eq!(fwd.ct.dir, ct::DIR_FORWARD);
        assert!(fwd.ct.full_nat());
        assert_eq!(ipv6_from_wire(fwd.nat_addr), be.ip().octets());
        assert_eq!(fwd.ct.nat_port, port_to_wire(be.port()));
        assert_eq!(ipv6_from_wire(fwd.fnat_addr), HOST6.octets());
        assert_eq!(fwd.ct.fnat_port, port_to_wire(snat.port()));
        let rkey = flow_key6(be, snat, IPPROTO_TCP);
        let rev = ct6(&f, &rkey).expect("reply half keyed backend -> HOST6:port");
        assert_eq!(rev.ct.dir, ct::DIR_REPLY);
        assert!(rev.ct.full_nat());
        assert_eq!(ipv6_from_wire(rev.nat_addr), VIP6.octets());
        assert_eq!(rev.ct.nat_port, port_to_wire(80));
        assert_eq!(ipv6_from_wire(rev.fnat_addr), CLIENT6.octets());
        assert_eq!(rev.ct.fnat_port, port_to_wire(40001));
        assert_eq!(rev.ct.in_ifindex, ifindex("fx0"), "replies only from fx0");
        assert_eq!(reply_key6(&fkey, &fwd), rkey);
        assert_eq!(forward_key6(&rkey, &rev), fkey);
        assert!(f.dp().conntrack6_unconfirmed(&fkey) && f.dp().conntrack6_unconfirmed(&rkey));

        // The SYN-ACK goes to the client from the service.
        let synack = tcp6(be, snat, TCP_SYN | TCP_ACK, 5000, 1001).build();
        assert_reply(&f.run(&synack), &synack, svc, c);
        // The client's ACK: same backend and port; the flow is confirmed.
        let ack = tcp6(c, svc, TCP_ACK, 1001, 5001).build();
        assert_eq!(assert_fwd(&f.run(&ack), &ack, &[be], PORTS), (be, snat));
        assert!(!f.dp().conntrack6_unconfirmed(&fkey) && !f.dp().conntrack6_unconfirmed(&rkey));
        assert!(ct6(&f, &fkey).is_some() && ct6(&f, &rkey).is_some());
        // Data both ways, payload intact, checksums recomputed.
        let data = tcp6(c, svc, TCP_ACK | TCP_PSH, 1001, 5001)
            .with_payload(b"GET /x")
            .build();
        let run = f.run(&data);
        assert_eq!(assert_fwd(&run, &data, &[be], PORTS), (be, snat));
        assert_eq!(wire6::parse6(&run.out).payload, b"GET /x");
        let answer = tcp6(be, snat, TCP_ACK | TCP_PSH, 5001, 1007)
            .with_payload(b"200 ok")
            .build();
        let run = f.run(&answer);
        assert_reply(&run, &answer, svc, c);
        assert_eq!(wire6::parse6(&run.out).payload, b"200 ok");
        assert_eq!(f.dp().service_counters(0).unwrap().packets, 5);
        // A reply from the backend's address on the other uplink is not translated.
        assert_untouched(
            &f.run_on(&answer, "fx2"),
            &answer,
            Reason::PassReplyWrongIface,
        );
        // Flows from other clients get other ports.
        let mut ports = std::collections::BTreeSet::from([snat.port()]);
        for p in 41000..41040 {
            let s = tcp6(client6(p), svc, TCP_SYN, 1, 0).build();
            ports.insert(assert_fwd(&f.run(&s), &s, &web6(), PORTS).1.port());
        }
        assert!(ports.len() > 35, "{} distinct ports of 41", ports.len());
    });
}

#[test]
fn udp_flows_are_translated_both_ways() {
    in_fixture6_netns(|| {
        let f = standard();
        let service = sa6(HOST6, 5353);
        let dns = [sa6(backend6(4), 53), sa6(backend6(5), 53)];
        let req = Ipv6Packet::udp(client6(50001), service, b"query").build();
        let (be, snat) = assert_fwd(&f.run(&req), &req, &dns, PORTS);
        let fwd = ct6(&f, &flow_key6(client6(50001), service, IPPROTO_UDP)).unwrap();
        assert!(fwd.ct.full_nat());
        assert!(
            !f.dp()
                .conntrack6_unconfirmed(&flow_key6(client6(50001), service, IPPROTO_UDP))
        );
        let answer = Ipv6Packet::udp(be, snat, b"answer").build();
        assert_reply(&f.run(&answer), &answer, service, client6(50001));
        // The same client again: the same backend and port.
        assert_eq!(assert_fwd(&f.run(&req), &req, &dns, PORTS), (be, snat));
    });
}

/// A live pair for flow `client -> VIP:80` to backend 1 on source port `port`, staged as the
/// program would have written it.
fn stage_pair(f: &mut Fixture, client: SocketAddrV6, port: u16) {
    let e = |dir, nat: SocketAddrV6, fnat: SocketAddrV6| CtEntry6 {
        nat_addr: ipv6_to_wire(nat.ip().octets()),
        fnat_addr: ipv6_to_wire(fnat.ip().octets()),
        ct: CtEntry {
            nat_addr: 0,
            nat_port: port_to_wire(nat.port()),
            dir,
            state: ct::STATE_OPEN,
            backend_id: 1,
            service_id: 0,
            last_seen_ns: monotonic_ns(),
            route: lb_common::Route::NONE,
            backend_ack: 0,
            in_ifindex: 0,
            fnat_addr: 0,
            fnat_port: port_to_wire(fnat.port()),
            flags: ct::CT_F_FULLNAT,
            lazy: 0,
            epoch: 0,
        },
    };
    let (svc, snat) = (sa6(VIP6, 80), sa6(HOST6, port));
    let dp = f.rec.dataplane_mut();
    dp.conntrack6_insert(
        flow_key6(client, svc, IPPROTO_TCP),
        e(ct::DIR_FORWARD, b6(1), snat),
    )
    .unwrap();
    dp.conntrack6_insert(
        flow_key6(b6(1), snat, IPPROTO_TCP),
        e(ct::DIR_REPLY, svc, client),
    )
    .unwrap();
}

#[test]
fn a_taken_port_is_never_overwritten() {
    in_fixture6_netns(|| {
        let mut f = one_backend(PORTS, Duration::from_millis(1000));
        let (c, svc) = (client6(40100), sa6(VIP6, 80));
        let port = first_try(c, svc, IPPROTO_TCP);
        // Another client's live flow holds the port this flow tries first (a client on the
        // client network with a known neighbour entry).
        let other = sa6(ROUTER6, 12345);
        stage_pair(&mut f, other, port);
        let rkey = flow_key6(b6(1), sa6(HOST6, port), IPPROTO_TCP);
        let before = ct6(&f, &rkey).unwrap();
        let syn = tcp6(c, svc, TCP_SYN, 1, 0).build();
        let run = f.run(&syn);
        let (_, snat) = assert_fwd(&run, &syn, &[b6(1)], PORTS);
        assert_ne!(snat.port(), port, "the taken port is not reused");
        assert!(run.counted(Reason::EventSnatPortTaken) >= 1, "{run:?}");
        assert_eq!(
            ct6(&f, &rkey),
            Some(before),
            "the other flow's reply half intact"
        );
        // The other flow still works both ways.
        let back = tcp6(b6(1), sa6(HOST6, port), TCP_ACK, 9, 9).build();
        assert_reply(&f.run(&back), &back, svc, other);
    });
}

#[test]
fn an_exhausted_range_drops_and_counts_and_a_closed_flow_gives_its_port_up() {
    in_fixture6_netns(|| {
        let one = PortRange {
            first: 61000,
            last: 61000,
        };
        let f = one_backend(one, Duration::from_millis(2));
        let svc = sa6(VIP6, 80);
        let (c1, c2, c3) = (client6(40200), client6(40201), client6(40202));
        let syn = tcp6(c1, svc, TCP_SYN, 1000, 0).build();
        let (be, snat) = assert_fwd(&f.run(&syn), &syn, &[b6(1)], one);
        assert_eq!(snat.port(), 61000);
        // Unconfirmed, the port is still held against a new flow.
        let syn2 = tcp6(c2, svc, TCP_SYN, 1, 0).build();
        let run = f.run(&syn2);
        assert_eq!(run.action, TC_ACT_SHOT, "{run:?}");
        assert_eq!(run.exits(), [Reason::DropSnatExhausted.name()], "{run:?}");
        assert_eq!(
            run.counted(Reason::EventSnatPortTaken),
            u64::from(ct::SNAT_TRIES)
        );
        assert!(ct6(&f, &flow_key6(c2, svc, IPPROTO_TCP)).is_none());
        // Established, closed by the client only: still held (the backend may still send).
        let synack = tcp6(be, snat, TCP_SYN | TCP_ACK, 5000, 1001).build();
        assert_reply(&f.run(&synack), &synack, svc, c1);
        let ack = tcp6(c1, svc, TCP_ACK, 1001, 5001).build();
        assert_fwd(&f.run(&ack), &ack, &[be], one);
        let fin = tcp6(c1, svc, TCP_FIN | TCP_ACK, 1001, 5001).build();
        let run = f.run(&fin);
        assert_fwd(&run, &fin, &[be], one);
        assert_eq!(run.counted(Reason::EventCtClosing), 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            f.run(&syn2).exits(),
            [Reason::DropSnatExhausted.name()],
            "half-closed"
        );
        // The backend's FIN too: after the hold the port goes to a new flow, the old flow's
        // entries with it.
        let fin2 = tcp6(be, snat, TCP_FIN | TCP_ACK, 5001, 1002).build();
        assert_reply(&f.run(&fin2), &fin2, svc, c1);
        std::thread::sleep(Duration::from_millis(50));
        let syn3 = tcp6(c3, svc, TCP_SYN, 7, 0).build();
        let (_, snat3) = assert_fwd(&f.run(&syn3), &syn3, &[b6(1)], one);
        assert_eq!(snat3, snat);
        assert!(ct6(&f, &flow_key6(c1, svc, IPPROTO_TCP)).is_none());
        let rev = ct6(&f, &flow_key6(be, snat, IPPROTO_TCP)).unwrap();
        assert_eq!(ipv6_from_wire(rev.fnat_addr), c3.ip().octets());
        assert_eq!(rev.ct.fnat_port, port_to_wire(c3.port()));
    });
}

#[test]
fn packet_too_big_about_a_reply_reaches_the_backend_from_this_host() {
    in_fixture6_netns(|| {
        let f = standard();
        let (c, svc) = (client6(40300), sa6(VIP6, 80));
        let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
        let (be, snat) = assert_fwd(&f.run(&syn), &syn, &web6(), PORTS);
        // The reply as berth sent it (service -> client), too big for a router on the way.
        let reply = tcp6(svc, c, TCP_ACK, 5001, 1001)
            .with_payload(&[7u8; 200])
            .ip();
        let ptb = wire6::icmp6_error(ROUTER6, VIP6, wire6::ICMP6_PACKET_TOO_BIG, 0, 1280, &reply);
        let run = f.run(&ptb);
        assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
        assert_eq!(run.exits(), [Reason::FwdRedirect.name()]);
        assert_eq!(run.counted(Reason::EventIcmpTranslated), 1);
        wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("ICMPv6: {e}"));
        wire6::verify_quoted_checksum(&run.out).unwrap_or_else(|e| panic!("quoted: {e}"));
        let o = wire6::parse6(&run.out);
        assert_eq!(
            *o.src.ip(),
            HOST6,
            "from berth's address: the router is nobody the backend knows"
        );
        assert_eq!(*o.dst.ip(), *be.ip(), "to the backend");
        assert_eq!(o.dst_mac, backend6_mac(*be.ip()));
        // The quote is the reply as the backend sent it: backend -> HOST6:port.
        let want = tcp6(be, snat, TCP_ACK, 5001, 1001)
            .with_payload(&[7u8; 200])
            .ip();
        assert_eq!(wire6::quoted(&run.out), &want[..]);
        assert_eq!(&run.out[58..62], &1280u32.to_be_bytes(), "MTU kept");
    });
}

#[test]
fn port_unreachable_from_a_backend_reaches_the_client_as_the_service() {
    in_fixture6_netns(|| {
        let f = standard();
        let service = sa6(HOST6, 5353);
        let dns = [sa6(backend6(4), 53), sa6(backend6(5), 53)];
        let q = Ipv6Packet::udp(client6(5020), service, b"query").build();
        let (be, snat) = assert_fwd(&f.run(&q), &q, &dns, PORTS);
        // What the backend got (HOST6:port -> backend), quoted back by its stack.
        let got = Ipv6Packet::udp(snat, be, b"query").ip();
        let err = wire6::icmp6_error(
            *be.ip(),
            HOST6,
            wire6::ICMP6_DST_UNREACH,
            wire6::ICMP6_PORT_UNREACH,
            0,
            &got,
        );
        let run = f.run(&err);
        assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
        assert_eq!(run.counted(Reason::EventIcmpTranslated), 1);
        wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("ICMPv6: {e}"));
        wire6::verify_quoted_checksum(&run.out).unwrap_or_else(|e| panic!("quoted: {e}"));
        let o = wire6::parse6(&run.out);
        assert_eq!(*o.src.ip(), HOST6, "from the service address");
        assert_eq!(*o.dst.ip(), CLIENT6, "to the client");
        assert_eq!(o.dst_mac, CLIENT_MAC);
        assert_eq!(
            wire6::quoted(&run.out),
            &Ipv6Packet::udp(client6(5020), service, b"query").ip()[..],
            "quoting client -> service"
        );
        // From the wrong side: untouched.
        assert_untouched(&f.run_on(&err, "fx2"), &err, Reason::PassReplyWrongIface);
    });
}

/// The IPv6 side of `ct_integrity`'s `a_blind_rst_or_fin_after_an_evicted_reply_half_does_not_close_the_flow`:
/// a reply half rebuilt from a client's segment after a flood evicted it has no window until
/// its backend's next acknowledgment, so a blind RST (after a blind segment of its own, or a
/// bare SYN, that rebuilt the half) closes nothing; once the backend has acknowledged, a RST in
/// the window does.
#[test]
fn a_blind_rst_after_an_evicted_reply_half_does_not_close_the_flow() {
    in_fixture6_netns(|| {
        let mut f = standard();
        let (c, svc) = (client6(40410), sa6(VIP6, 80));
        let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
        let (be, snat) = assert_fwd(&f.run(&syn), &syn, &web6(), PORTS);
        let syn_ack = tcp6(be, snat, TCP_SYN | TCP_ACK, 5000, 1001).build();
        assert_reply(&f.run(&syn_ack), &syn_ack, svc, c);
        let ack = tcp6(c, svc, TCP_ACK, 1001, 5001).build();
        assert_eq!(assert_fwd(&f.run(&ack), &ack, &[be], PORTS), (be, snat));
        let (fkey, rkey) = (
            flow_key6(c, svc, IPPROTO_TCP),
            flow_key6(be, snat, IPPROTO_TCP),
        );
        // Rebuilt by a blind segment, or by a bare SYN as the client.
        for first in [TCP_ACK, TCP_SYN] {
            f.rec.dataplane_mut().conntrack6_remove(&rkey).unwrap();
            let blind = tcp6(c, svc, first, 7_000_000, 0).build();
            let run = f.run(&blind);
            assert_eq!(assert_fwd(&run, &blind, &[be], PORTS), (be, snat));
            assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
            assert_eq!(ct6(&f, &rkey).unwrap().ct.lazy, ct::WINDOW_LOST, "{first}");
            let rst = tcp6(c, svc, TCP_RST, 7_000_000, 0).build();
            let run = f.run(&rst);
            assert_eq!(assert_fwd(&run, &rst, &[be], PORTS), (be, snat));
            assert_eq!(run.counted(Reason::EventCtCloseIgnored), 1, "{run:?}");
            assert_eq!(run.counted(Reason::EventCtClosing), 0, "{run:?}");
            assert_eq!(ct6(&f, &fkey).unwrap().ct.state, ct::STATE_OPEN);
        }
        let back = tcp6(be, snat, TCP_ACK, 5001, 1001).build();
        assert_reply(&f.run(&back), &back, svc, c);
        let rev = ct6(&f, &rkey).unwrap();
        assert_eq!((rev.ct.lazy, rev.ct.backend_ack), (0, 1001));
        let rst = tcp6(c, svc, TCP_RST, 1001, 0).build();
        let run = f.run(&rst);
        assert_eq!(assert_fwd(&run, &rst, &[be], PORTS), (be, snat));
        assert_eq!(run.counted(Reason::EventCtClosing), 1, "{run:?}");
        assert_eq!(ct6(&f, &fkey).unwrap().ct.state, ct::STATE_CLOSING);
    });
}

#[test]
fn a_flow_whose_reply_half_was_evicted_gets_it_back() {
    in_fixture6_netns(|| {
        let mut f = standard();
        let (c, svc) = (client6(40400), sa6(VIP6, 80));
        let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
        let (be, snat) = assert_fwd(&f.run(&syn), &syn, &web6(), PORTS);
        let rkey = flow_key6(be, snat, IPPROTO_TCP);
        let before = ct6(&f, &rkey).unwrap();
        f.rec.dataplane_mut().conntrack6_remove(&rkey).unwrap();
        let ack = tcp6(c, svc, TCP_ACK, 1001, 5001).build();
        let run = f.run(&ack);
        assert_eq!(assert_fwd(&run, &ack, &[be], PORTS), (be, snat));
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let rev = ct6(&f, &rkey).expect("rebuilt");
        assert_eq!(
            (
                rev.nat_addr,
                rev.fnat_addr,
                rev.ct.nat_port,
                rev.ct.fnat_port,
                rev.ct.flags & !ct::CT_F_ACK_KNOWN
            ),
            (
                before.nat_addr,
                before.fnat_addr,
                before.ct.nat_port,
                before.ct.fnat_port,
                before.ct.flags
            )
        );
        // Rebuilt from the client's segment past the handshake of a flow still unconfirmed:
        // with that segment's sequence number for the backend's acknowledgment
        // (`ct::rebuilt_window`; a confirmed flow's half would have lost its window: the test
        // above).
        assert_ne!(rev.ct.flags & ct::CT_F_ACK_KNOWN, 0);
        assert_eq!((rev.ct.backend_ack, rev.ct.lazy), (1001, 0));
        // And the forward half, from a reply, the same way.
        let fkey = flow_key6(c, svc, IPPROTO_TCP);
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        let back = tcp6(be, snat, TCP_ACK, 5001, 1001).build();
        let run = f.run(&back);
        assert_reply(&run, &back, svc, c);
        let fwd = ct6(&f, &fkey).expect("rebuilt forward half");
        assert!(fwd.ct.full_nat());
        assert_eq!(ipv6_from_wire(fwd.fnat_addr), HOST6.octets());
        assert_eq!(fwd.ct.fnat_port, port_to_wire(snat.port()));
    });
}

/// Whether a new flow from `c` takes `port` (the only one) now; else it is dropped as
/// `drop_snat_exhausted`.
fn new_flow_takes(f: &Fixture, c: SocketAddrV6, port: SocketAddrV6) -> bool {
    let syn = tcp6(c, sa6(VIP6, 80), TCP_SYN, 77, 0).build();
    let run = f.run(&syn);
    if run.action == TC_ACT_SHOT {
        assert_eq!(run.exits(), [Reason::DropSnatExhausted.name()], "{run:?}");
        return false;
    }
    let one = PortRange {
        first: port.port(),
        last: port.port(),
    };
    assert_eq!(assert_fwd(&run, &syn, &[b6(1)], one).1, port);
    true
}

/// Backdates the entries at `keys` (a closed flow's two halves) past the port hold `reuse`.
fn past_the_hold(f: &mut Fixture, keys: [lb_common::v6::FlowKey6; 2], reuse: Duration) {
    for key in keys {
        let mut e = ct6(f, &key).unwrap();
        e.ct.last_seen_ns = monotonic_ns() - reuse.as_nanos() as u64 - 500_000_000;
        f.rec.dataplane_mut().conntrack6_insert(key, e).unwrap();
    }
}

#[test]
fn a_port_is_free_once_the_final_ack_passed_and_held_until_then() {
    in_fixture6_netns(|| {
        let one = PortRange {
            first: 61000,
            last: 61000,
        };
        let svc = sa6(VIP6, 80);
        // The default hold (1 s): everything below runs well inside it.
        let reuse = Duration::from_secs(1);
        for final_ack_passes in [true, false] {
            let f = one_backend(one, reuse);
            let c = client6(40300);
            let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
            let (be, snat) = assert_fwd(&f.run(&syn), &syn, &[b6(1)], one);
            let fwd = |p: Ipv6Packet| {
                let p = p.build();
                assert_fwd(&f.run(&p), &p, &[be], one);
            };
            let back = |p: Ipv6Packet| {
                let p = p.build();
                assert_reply(&f.run(&p), &p, svc, c);
            };
            back(tcp6(be, snat, TCP_SYN | TCP_ACK, 5000, 1001));
            fwd(tcp6(c, svc, TCP_ACK, 1001, 5001));
            // The backend closes first, its FIN carrying data; the client's FIN (with data,
            // behind a hop-by-hop header) acknowledges all of it.
            back(tcp6(be, snat, TCP_FIN | TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"bye!"));
            fwd(tcp6(c, svc, TCP_FIN | TCP_ACK | TCP_PSH, 1001, 5006)
                .with_payload(b"ok")
                .with_ext(vec![wire6::Ext::options(wire6::IPPROTO_HOPOPTS, 6)]));
            // An ACK of the client's data only is not the final ACK.
            back(tcp6(be, snat, TCP_ACK, 5006, 1003));
            assert!(!new_flow_takes(&f, client6(40301), snat), "not yet");
            if final_ack_passes {
                back(tcp6(be, snat, TCP_ACK, 5006, 1004));
                assert!(new_flow_takes(&f, client6(40301), snat), "free at once");
                assert!(ct6(&f, &flow_key6(c, svc, IPPROTO_TCP)).is_none());
            } else {
                // Held until the hold runs out.
                let (fkey, rkey) = (
                    flow_key6(c, svc, IPPROTO_TCP),
                    flow_key6(be, snat, IPPROTO_TCP),
                );
                let rev = ct6(&f, &rkey).unwrap();
                assert_eq!(rev.ct.flags & ct::CT_F_CLOSED, ct::CT_F_CLOSED, "{rev:?}");
                assert_eq!(rev.ct.flags & ct::CT_F_LAST_ACK, 0, "{rev:?}");
                let mut f = f;
                past_the_hold(&mut f, [fkey, rkey], reuse);
                assert!(new_flow_takes(&f, client6(40301), snat), "after the hold");
            }
        }
    });
}

/// A client whose flow to the VIP's port 80 tries `port` first in `ports`, from port `from` up.
fn client6_trying_first(port: u16, ports: PortRange, from: u16) -> SocketAddrV6 {
    let svc = sa6(VIP6, 80);
    (from..u16::MAX)
        .map(client6)
        .find(|&c| {
            let h = flow_hash6(&flow_key6(c, svc, IPPROTO_TCP), options().hash_seed);
            ct::snat_port(h, 0, ports.first, ports.last) == port
        })
        .expect("a client trying the port first")
}

#[test]
fn a_port_whose_backend_closed_first_is_taken_only_when_no_other_is_free() {
    in_fixture6_netns(|| {
        let two = PortRange {
            first: 61010,
            last: 61011,
        };
        let svc = sa6(VIP6, 80);
        let tries_first = |port: u16, from: u16| client6_trying_first(port, two, from);
        let leaves_from = |f: &Fixture, c: SocketAddrV6| {
            let syn = tcp6(c, svc, TCP_SYN, 77, 0).build();
            assert_fwd(&f.run(&syn), &syn, &[b6(1)], two).1.port()
        };
        // A connection on 61010 that its backend closes first: the client's FIN after the
        // backend's, then the backend's final ACK (it is in TIME_WAIT from the FIN on).
        let closed_by_backend = |f: &Fixture| {
            let c = tries_first(61010, 42000);
            let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
            let (be, snat) = assert_fwd(&f.run(&syn), &syn, &[b6(1)], two);
            assert_eq!(snat.port(), 61010);
            let fwd = |p: Ipv6Packet| {
                let p = p.build();
                assert_fwd(&f.run(&p), &p, &[be], two);
            };
            let back = |p: Ipv6Packet| {
                let p = p.build();
                assert_reply(&f.run(&p), &p, svc, c);
            };
            back(tcp6(be, snat, TCP_SYN | TCP_ACK, 5000, 1001));
            fwd(tcp6(c, svc, TCP_ACK, 1001, 5001));
            back(tcp6(be, snat, TCP_FIN | TCP_ACK, 5001, 1001));
            fwd(tcp6(c, svc, TCP_FIN | TCP_ACK, 1001, 5002));
            back(tcp6(be, snat, TCP_ACK, 5002, 1002));
            let rev = ct6(f, &flow_key6(be, snat, IPPROTO_TCP)).unwrap();
            assert_ne!(rev.ct.flags & ct::CT_F_LAST_ACK, 0, "{rev:?}");
            c
        };
        // Another port free: a new flow trying 61010 first leaves from 61011.
        let f = one_backend(two, Duration::from_secs(1));
        closed_by_backend(&f);
        assert_eq!(leaves_from(&f, tries_first(61010, 43000)), 61011);
        // 61011 held by a live flow: 61010 is taken after all (the second pass), and the old
        // connection's entries go.
        let mut f = one_backend(two, Duration::from_secs(1));
        let old = closed_by_backend(&f);
        stage_pair(&mut f, client6(5555), 61011);
        assert_eq!(leaves_from(&f, tries_first(61010, 43000)), 61010);
        assert!(ct6(&f, &flow_key6(old, svc, IPPROTO_TCP)).is_none());
    });
}

/// FINs that cross (the backend's sent before the client's reached it: it does not acknowledge
/// the client's FIN) leave the backend in TIME_WAIT too: past the closed flow's hold, its port
/// is passed by for the mark as when the backend closes first (IPv4: `fullnat.rs`).
#[test]
fn a_port_whose_fins_crossed_is_passed_by_after_the_hold() {
    in_fixture6_netns(|| {
        let two = PortRange {
            first: 61010,
            last: 61011,
        };
        let svc = sa6(VIP6, 80);
        let reuse = Duration::from_secs(1);
        let tries_first = |port: u16, from: u16| client6_trying_first(port, two, from);
        let mut f = one_backend(two, reuse);
        let c = tries_first(61010, 42000);
        let syn = tcp6(c, svc, TCP_SYN, 1000, 0).build();
        let (be, snat) = assert_fwd(&f.run(&syn), &syn, &[b6(1)], two);
        assert_eq!(snat.port(), 61010);
        let fwd = |f: &Fixture, p: Ipv6Packet| {
            let p = p.build();
            assert_fwd(&f.run(&p), &p, &[be], two);
        };
        let back = |f: &Fixture, p: Ipv6Packet| {
            let p = p.build();
            assert_reply(&f.run(&p), &p, svc, c);
        };
        back(&f, tcp6(be, snat, TCP_SYN | TCP_ACK, 5000, 1001));
        fwd(&f, tcp6(c, svc, TCP_ACK, 1001, 5001));
        // The client's FIN (ends at 1002), the backend's acknowledging 1001 only, then each
        // side's ACK of the other's.
        fwd(&f, tcp6(c, svc, TCP_FIN | TCP_ACK, 1001, 5001));
        back(&f, tcp6(be, snat, TCP_FIN | TCP_ACK, 5001, 1001));
        fwd(&f, tcp6(c, svc, TCP_ACK, 1002, 5002));
        back(&f, tcp6(be, snat, TCP_ACK, 5002, 1002));
        // Past the hold (no final ACK berth could tell), free by its entries.
        let keys = [
            flow_key6(c, svc, IPPROTO_TCP),
            flow_key6(be, snat, IPPROTO_TCP),
        ];
        past_the_hold(&mut f, keys, reuse);
        let syn = tcp6(tries_first(61010, 43000), svc, TCP_SYN, 77, 0).build();
        let run = f.run(&syn);
        assert_eq!(
            assert_fwd(&run, &syn, &[b6(1)], two).1.port(),
            61011,
            "the marked port is passed by: {run:?}"
        );
    });
}
