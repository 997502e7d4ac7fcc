//! Full NAT through BPF_PROG_TEST_RUN (issue 11): backends whose replies would not come back
//! through this host get flows from its own address and a port of `dataplane.snat_ports`.
//! Each case from fresh maps, every rewritten packet's checksums recomputed from scratch: a new
//! flow and its two entries, the established hit, the reply, UDP, IP options, distinct ports per
//! flow, a taken port never overwritten (nor one a lazily recorded DNAT flow holds at the same
//! backend), an exhausted range, a flow whose port another flow took
//! while its reply half was evicted, a backend switched from DNAT to full NAT, and the port of
//! a flow closed both ways taken over after a short hold (a half-closed flow's is not). (The
//! conntrack-integrity rules shared with DNAT run over both in `ct_integrity.rs`, the hostile
//! suite in `hostile.rs`.)

use std::net::SocketAddrV4;

use aya::programs::{TestRun, TestRunOptions};

use berth_tests::{
    fixture::*,
    wire::{self, Ipv4Packet, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};
use lb_common::{
    CtEntry, IPPROTO_TCP, IPPROTO_UDP, LAZY_OWNERS, Reason, claim, ct, hash::flow_hash,
    ipv4_to_wire, port_to_wire,
};
use lb_userspace::{
    config::{Nat, PortRange, Protocol},
    dataplane::{DataplaneOptions, monotonic_ns},
};

const FULL: Nat = Nat::Full;

/// One TCP service on the VIP and one UDP service on :5353, backend 1 only, full NAT, with
/// `ports` as the source range.
fn one_backend(ports: PortRange) -> Fixture {
    one_backend_with(DataplaneOptions {
        snat_ports: ports,
        ..options()
    })
}

/// [`one_backend`] with `o` as the options.
fn one_backend_with(o: DataplaneOptions) -> Fixture {
    Fixture::new(
        o,
        with_nat(
            vec![
                svc("v", "10.99.0.1:80", Protocol::Tcp, &[(backend(1), 8000, 1)]),
                svc("u", "0.0.0.0:5353", Protocol::Udp, &[(backend(1), 53, 1)]),
            ],
            FULL,
        ),
    )
}

/// A DNAT service on the VIP and a full-NAT one on 10.99.0.2, both TCP :80 to backend 1, full
/// NAT from the one port 61000: the fixture and the two service addresses.
fn dnat_and_full_nat_on_one_port() -> (Fixture, SocketAddrV4, SocketAddrV4) {
    let (f, dnat_vip, fnat_vip, _) = two_dnat_and_full_nat_on_one_port(LAZY_OWNERS as u32);
    (f, dnat_vip, fnat_vip)
}

/// [`dnat_and_full_nat_on_one_port`] with a second DNAT service on 10.99.0.3:80 (the fourth
/// address returned), backend 1 serving `lazy_services` of the two lazily.
fn two_dnat_and_full_nat_on_one_port(
    lazy_services: u32,
) -> (Fixture, SocketAddrV4, SocketAddrV4, SocketAddrV4) {
    let vip = |last| sa(std::net::Ipv4Addr::new(10, 99, 0, last), 80);
    let (dnat_vip, fnat_vip, dnat_vip2) = (sa(VIP, 80), vip(2), vip(3));
    let dnat = |name, at: SocketAddrV4| {
        svc(
            name,
            &at.to_string(),
            Protocol::Tcp,
            &[(backend(1), 8000, 1)],
        )
    };
    let mut services = vec![dnat("d", dnat_vip), dnat("e", dnat_vip2)];
    services.extend(with_nat(vec![dnat("n", fnat_vip)], FULL));
    let f = Fixture::new(
        DataplaneOptions {
            snat_ports: PortRange {
                first: 61000,
                last: 61000,
            },
            lazy_services,
            ..options()
        },
        services,
    );
    (f, dnat_vip, fnat_vip, dnat_vip2)
}

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32, ack: u32) -> Ipv4Packet {
    Ipv4Packet::tcp_seq(src, dst, flags, seq, ack, &[])
}

/// Checks a reply translated back to the client: from `service`, to `to`, checksums right.
fn assert_reply(run: &Run, service: SocketAddrV4, to: SocketAddrV4) {
    assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
    assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
    wire::verify_checksums(&run.out).unwrap_or_else(|e| panic!("rewritten reply: {e}"));
    let o = wire::parse(&run.out);
    assert_eq!((o.src, o.dst), (service, to));
    assert_eq!(o.dst_mac, CLIENT_MAC, "to the client's MAC, from the FIB");
}

/// Checks a reply translated back to a client on this host (`to`, an address of its own): from
/// `service`, handed to the stack, checksums right.
fn assert_reply_to_host(run: &Run, service: SocketAddrV4, to: SocketAddrV4) {
    assert_eq!(
        run.exits(),
        [Reason::PassTranslatedToStack.name()],
        "{run:?}"
    );
    wire::verify_checksums(&run.out).unwrap_or_else(|e| panic!("rewritten reply: {e}"));
    let o = wire::parse(&run.out);
    assert_eq!((o.src, o.dst), (service, to));
}

/// The source port flow `client -> service` tries first (see `ct::snat_port`).
fn first_try(client: SocketAddrV4, service: SocketAddrV4, proto: u8, ports: PortRange) -> u16 {
    let h = flow_hash(&flow_key(client, service, proto), options().hash_seed);
    ct::snat_port(h, 0, ports.first, ports.last)
}

/// Stages a live established pair for flow `client -> service` to backend 1 on source port
/// `port`, as the program would have written it.
fn stage_pair(f: &mut Fixture, client: SocketAddrV4, service: SocketAddrV4, port: u16, proto: u8) {
    let e = |dir, nat: SocketAddrV4, fnat: SocketAddrV4| CtEntry {
        nat_addr: ipv4_to_wire(nat.ip().octets()),
        nat_port: port_to_wire(nat.port()),
        dir,
        state: ct::STATE_OPEN,
        backend_id: 1,
        service_id: 0,
        last_seen_ns: monotonic_ns(),
        route: lb_common::Route::NONE,
        backend_ack: 0,
        in_ifindex: 0,
        fnat_addr: ipv4_to_wire(fnat.ip().octets()),
        fnat_port: port_to_wire(fnat.port()),
        flags: ct::CT_F_FULLNAT,
        lazy: 0,
        epoch: 0,
    };
    let be = sa(backend(1), if proto == IPPROTO_TCP { 8000 } else { 53 });
    let snat = sa(HOST, port);
    let dp = f.rec.dataplane_mut();
    dp.conntrack_insert(
        flow_key(client, service, proto),
        e(ct::DIR_FORWARD, be, snat),
    )
    .unwrap();
    dp.conntrack_insert(flow_key(be, snat, proto), e(ct::DIR_REPLY, service, client))
        .unwrap();
}

#[test]
fn a_new_flow_leaves_from_this_host_and_its_two_halves_name_each_other() {
    in_fixture_netns(|| {
        let f = standard_nat(FULL);
        let c = client(40001);
        let svc_addr = sa(VIP, 80);
        let syn = tcp(c, svc_addr, TCP_SYN, 1000, 0).build();
        let run = f.run(&syn);
        let leg = assert_fwd(&run, &syn, &web_backends(), FULL);
        assert_eq!(run.counted(Reason::EventSnatPortTaken), 0, "{run:?}");
        // The forward half: client -> service, to the backend from HOST:port.
        let fkey = flow_key(c, svc_addr, IPPROTO_TCP);
        let fwd = f.ct(&fkey).expect("forward half");
        assert_eq!(fwd.dir, ct::DIR_FORWARD);
        assert!(fwd.full_nat());
        assert_eq!(
            (fwd.nat_addr, fwd.nat_port, fwd.fnat_addr, fwd.fnat_port),
            (
                ipv4_to_wire(leg.backend.ip().octets()),
                port_to_wire(leg.backend.port()),
                ipv4_to_wire(HOST.octets()),
                port_to_wire(leg.peer.port())
            )
        );
        // The reply half: backend -> HOST:port, back to the service and the client.
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let rev = f.ct(&rkey).expect("reply half keyed backend -> HOST:port");
        assert_eq!(rev.dir, ct::DIR_REPLY);
        assert!(rev.full_nat());
        assert_eq!(
            (rev.nat_addr, rev.nat_port, rev.fnat_addr, rev.fnat_port),
            (
                ipv4_to_wire(VIP.octets()),
                port_to_wire(80),
                ipv4_to_wire(CLIENT.octets()),
                port_to_wire(40001)
            )
        );
        assert_eq!(rev.in_ifindex, ifindex("fx0"), "replies only from fx0");
        assert_eq!(ct::reply_key(&fkey, &fwd), rkey);
        assert_eq!(ct::forward_key(&rkey, &rev), fkey);
        // Unconfirmed (a SYN) until the client's next packet.
        assert!(f.dp().conntrack_unconfirmed(&fkey) && f.dp().conntrack_unconfirmed(&rkey));

        // The SYN-ACK from the backend goes to the client from the service.
        let synack = from_backend(tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), svc_addr, c);
        // The client's ACK: the same backend and port, and the flow is confirmed.
        let ack = tcp(c, svc_addr, TCP_ACK, 1001, 5001).build();
        assert_eq!(assert_fwd(&f.run(&ack), &ack, &[leg.backend], FULL), leg);
        assert!(!f.dp().conntrack_unconfirmed(&fkey) && !f.dp().conntrack_unconfirmed(&rkey));
        assert!(f.ct(&fkey).is_some() && f.ct(&rkey).is_some());
        // Data with IP and TCP options both ways; payload intact, checksums recomputed.
        let mut data = tcp(c, svc_addr, TCP_ACK | TCP_PSH, 1001, 5001).with_payload(b"GET /x");
        data.options = vec![0x94, 4, 0, 0];
        data.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let data = data.build();
        let run = f.run(&data);
        assert_eq!(assert_fwd(&run, &data, &[leg.backend], FULL), leg);
        assert_eq!(wire::parse(&run.out).payload, b"GET /x");
        let mut answer =
            tcp(leg.backend, leg.peer, TCP_ACK | TCP_PSH, 5001, 1007).with_payload(b"200 ok");
        answer.options = vec![0x94, 4, 0, 0];
        let run = f.run(&from_backend(answer));
        assert_reply(&run, svc_addr, c);
        assert_eq!(wire::parse(&run.out).payload, b"200 ok");
        // Both directions are counted for the service and the backend.
        assert_eq!(f.dp().service_counters(fwd.service_id).unwrap().packets, 5);
    });
}

#[test]
fn udp_flows_are_translated_both_ways_and_a_zero_checksum_stays_zero() {
    in_fixture_netns(|| {
        let f = standard_nat(FULL);
        let service = sa(HOST, 5353);
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let req = Ipv4Packet::udp(client(50001), service, b"query").build();
        let leg = assert_fwd(&f.run(&req), &req, &dns, FULL);
        let answer = from_backend(Ipv4Packet::udp(leg.backend, leg.peer, b"answer"));
        assert_reply(&f.run(&answer), service, client(50001));
        // "No checksum" survives the rewrite of both ends.
        let mut p = Ipv4Packet::udp(client(50002), service, b"zero");
        p.l4 = L4::Udp {
            payload: b"zero".to_vec(),
            zero_csum: true,
        };
        let run = f.run(&p.build());
        let leg2 = assert_fwd(&run, &p.build(), &dns, FULL);
        assert_eq!(wire::parse(&run.out).l4_csum, 0);
        let mut a = Ipv4Packet::udp(leg2.backend, leg2.peer, b"zero back");
        a.l4 = L4::Udp {
            payload: b"zero back".to_vec(),
            zero_csum: true,
        };
        let run = f.run(&from_backend(a));
        assert_reply(&run, service, client(50002));
        assert_eq!(wire::parse(&run.out).l4_csum, 0);
    });
}

#[test]
fn flows_to_one_backend_get_distinct_ports_and_a_taken_port_is_never_overwritten() {
    in_fixture_netns(|| {
        let ports = SNAT_PORTS;
        let mut f = one_backend(ports);
        let vip = sa(VIP, 80);
        // Another flow holds the port client 41000's flow tries first.
        let c = client(41000);
        let taken = first_try(c, vip, IPPROTO_TCP, ports);
        let holder = client(5555);
        stage_pair(&mut f, holder, vip, taken, IPPROTO_TCP);
        let held = flow_key(sa(backend(1), 8000), sa(HOST, taken), IPPROTO_TCP);
        let before = f.ct(&held).unwrap();
        let syn = tcp(c, vip, TCP_SYN, 1, 0).build();
        let run = f.run(&syn);
        let leg = assert_fwd(&run, &syn, &[b8000(1)], FULL);
        assert_ne!(leg.peer.port(), taken, "a live flow's port is not taken");
        assert_eq!(
            leg.peer.port(),
            ct::snat_port(
                flow_hash(&flow_key(c, vip, IPPROTO_TCP), options().hash_seed),
                1,
                ports.first,
                ports.last
            ),
            "the second try"
        );
        assert_eq!(run.counted(Reason::EventSnatPortTaken), 1, "{run:?}");
        assert_eq!(f.ct(&held), Some(before), "the holder's entry is untouched");
        let answer = from_backend(tcp(sa(backend(1), 8000), sa(HOST, taken), TCP_ACK, 9, 9));
        assert_reply(&f.run(&answer), vip, holder);

        // A leftover (a reply half without its forward half) does not hold a port.
        let c2 = client(41001);
        let port2 = first_try(c2, vip, IPPROTO_TCP, ports);
        stage_pair(&mut f, holder, sa(VIP, 81), port2, IPPROTO_TCP);
        f.rec
            .dataplane_mut()
            .conntrack_remove(&flow_key(holder, sa(VIP, 81), IPPROTO_TCP))
            .unwrap();
        let syn = tcp(c2, vip, TCP_SYN, 1, 0).build();
        let run = f.run(&syn);
        assert_eq!(
            assert_fwd(&run, &syn, &[b8000(1)], FULL).peer.port(),
            port2,
            "the leftover's port is reused"
        );
        assert_eq!(run.counted(Reason::EventSnatPortTaken), 0, "{run:?}");

        // Many flows to the one backend: each its own port, each reply to its own client.
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..300u16 {
            let c = client(42000 + i);
            let p = Ipv4Packet::udp(c, sa(HOST, 5353), b"q").build();
            let leg = assert_fwd(&f.run(&p), &p, &[sa(backend(1), 53)], FULL);
            assert!(
                seen.insert(leg.peer.port(), c).is_none(),
                "port {} given twice",
                leg.peer.port()
            );
        }
        for (port, c) in seen {
            let a = from_backend(Ipv4Packet::udp(sa(backend(1), 53), sa(HOST, port), b"a"));
            assert_reply(&f.run(&a), sa(HOST, 5353), c);
        }
    });
}

#[test]
fn an_exhausted_range_drops_and_counts_until_a_port_is_free_again() {
    in_fixture_netns(|| {
        let ports = PortRange {
            first: 61000,
            last: 61001,
        };
        let mut f = one_backend(ports);
        let service = sa(HOST, 5353);
        let be = sa(backend(1), 53);
        let mut legs = Vec::new();
        for i in 0..2 {
            let p = Ipv4Packet::udp(client(43000 + i), service, b"q").build();
            legs.push(assert_fwd(&f.run(&p), &p, &[be], FULL));
        }
        assert_ne!(legs[0].peer, legs[1].peer);
        // A third flow finds both ports held by live flows.
        let third = Ipv4Packet::udp(client(43002), service, b"q").build();
        let run = f.run(&third);
        assert_dropped(&run, Reason::DropSnatExhausted);
        assert_eq!(
            run.counted(Reason::EventSnatPortTaken),
            u64::from(ct::SNAT_TRIES)
        );
        assert!(
            f.ct(&flow_key(client(43002), service, IPPROTO_UDP))
                .is_none()
        );
        assert_eq!(
            f.dp().reason_counters().unwrap()[Reason::DropSnatExhausted as usize].1,
            1,
            "the counter behind berth status and the metric"
        );
        // The first flow goes idle past the UDP timeout: its port is free for the third.
        for key in [
            flow_key(client(43000), service, IPPROTO_UDP),
            flow_key(legs[0].backend, legs[0].peer, IPPROTO_UDP),
        ] {
            let mut e = f.ct(&key).unwrap();
            e.last_seen_ns = 0;
            f.rec.dataplane_mut().conntrack_update(key, e).unwrap();
        }
        let run = f.run(&third);
        assert_eq!(assert_fwd(&run, &third, &[be], FULL).peer, legs[0].peer);
        // The second flow still answers.
        let a = from_backend(Ipv4Packet::udp(be, legs[1].peer, b"a"));
        assert_reply(&f.run(&a), service, client(43001));

        // TCP: a SYN nobody confirms holds its port only for a while (a flood of spoofed SYNs
        // cannot hold the range).
        let one = PortRange {
            first: 61005,
            last: 61005,
        };
        let mut f = one_backend(one);
        let vip = sa(VIP, 80);
        let syn_a = tcp(client(44000), vip, TCP_SYN, 1, 0).build();
        let leg_a = assert_fwd(&f.run(&syn_a), &syn_a, &[b8000(1)], FULL);
        let syn_b = tcp(client(44001), vip, TCP_SYN, 1, 0).build();
        assert_dropped(&f.run(&syn_b), Reason::DropSnatExhausted);
        let rkey = flow_key(leg_a.backend, leg_a.peer, IPPROTO_TCP);
        let mut e = f.ct(&rkey).unwrap();
        e.last_seen_ns = monotonic_ns() - ct::UNCONFIRMED_PORT_HOLD_NS - 1_000_000_000;
        f.rec.dataplane_mut().conntrack_update(rkey, e).unwrap();
        let run = f.run(&syn_b);
        assert_eq!(assert_fwd(&run, &syn_b, &[b8000(1)], FULL).peer, leg_a.peer);
        assert!(
            f.ct(&flow_key(client(44000), vip, IPPROTO_TCP)).is_none(),
            "the abandoned flow went with its port"
        );
        // A confirmed flow (its client acknowledged the backend's SYN-ACK) keeps its port
        // however quiet (up to the idle timeout).
        let synack = from_backend(tcp(b8000(1), leg_a.peer, TCP_SYN | TCP_ACK, 7000, 2));
        assert_reply(&f.run(&synack), vip, client(44001));
        let ack_b = tcp(client(44001), vip, TCP_ACK, 2, 7001).build();
        assert_fwd(&f.run(&ack_b), &ack_b, &[b8000(1)], FULL);
        let mut e = f.ct(&rkey).unwrap();
        e.last_seen_ns = monotonic_ns() - ct::UNCONFIRMED_PORT_HOLD_NS - 1_000_000_000;
        f.rec.dataplane_mut().conntrack_update(rkey, e).unwrap();
        let syn_c = tcp(client(44002), vip, TCP_SYN, 1, 0).build();
        assert_dropped(&f.run(&syn_c), Reason::DropSnatExhausted);
    });
}

#[test]
fn a_flow_whose_port_another_flow_took_while_its_reply_half_was_evicted_is_over() {
    in_fixture_netns(|| {
        let ports = SNAT_PORTS;
        let mut f = one_backend(ports);
        let vip = sa(VIP, 80);
        let c = client(45000);
        let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
        let leg = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], FULL);
        let ack = tcp(c, vip, TCP_ACK, 1001, 1).build();
        assert_fwd(&f.run(&ack), &ack, &[b8000(1)], FULL);
        // A flood evicts the reply half; another flow is given the port meanwhile.
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let other = client(6000);
        stage_pair(&mut f, other, vip, leg.peer.port(), IPPROTO_TCP);
        let other_rev = f.ct(&rkey).unwrap();
        // The first flow cannot have it back (the backend would see one connection for two):
        // its packet is dropped and its forward half removed.
        let data = tcp(c, vip, TCP_ACK | TCP_PSH, 1001, 1)
            .with_payload(b"x")
            .build();
        assert_dropped(&f.run(&data), Reason::DropFlowConflict);
        assert!(f.ct(&flow_key(c, vip, IPPROTO_TCP)).is_none());
        assert_eq!(f.ct(&rkey), Some(other_rev), "the new holder keeps it");
        // Its next packet starts over, on another port (the backend will refuse the
        // connection it does not know, and the client learns at once).
        let run = f.run(&data);
        let again = assert_fwd(&run, &data, &[b8000(1)], FULL);
        assert_ne!(again.peer, leg.peer);
        assert_eq!(run.counted(Reason::EventCtMidstreamPickup), 1, "{run:?}");
    });
}

#[test]
fn a_port_a_lazily_recorded_dnat_flow_holds_at_the_same_backend_is_not_taken() {
    in_fixture_netns(|| {
        let (mut f, dnat_vip, fnat_vip) = dnat_and_full_nat_on_one_port();
        // A SYN to the DNAT service from this host's own address and the range's only port
        // (no real client has that source: a spoofer). The backend serves that service
        // lazily, so the flow is recorded without a reply entry: its reply key (backend ->
        // HOST:61000) is held by its forward entry alone.
        let spoof = sa(HOST, 61000);
        let syn = tcp(spoof, dnat_vip, TCP_SYN, 7000, 0).build();
        let leg = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], Nat::Dnat);
        assert_eq!(leg.peer, spoof);
        let rkey = flow_key(b8000(1), spoof, IPPROTO_TCP);
        assert!(f.ct(&rkey).is_none(), "recorded lazily");
        // A full-NAT flow to the same backend must not leave from HOST:61000 as well (the
        // backend would see one connection for two, and the spoofer's packets would land in
        // it): the range is exhausted while the spoofed flow lives.
        let c = client(45100);
        let syn2 = tcp(c, fnat_vip, TCP_SYN, 1000, 0).build();
        let run = f.run(&syn2);
        assert_dropped(&run, Reason::DropSnatExhausted);
        assert!(f.ct(&rkey).is_none() && f.ct(&flow_key(c, fnat_vip, IPPROTO_TCP)).is_none());
        // Once that flow is gone, the port is free again.
        f.rec
            .dataplane_mut()
            .conntrack_remove(&flow_key(spoof, dnat_vip, IPPROTO_TCP))
            .unwrap();
        let leg2 = assert_fwd(&f.run(&syn2), &syn2, &[b8000(1)], FULL);
        assert_eq!(leg2.peer, spoof, "from HOST:61000 now");
    });
}

/// The same for a DNAT flow that keeps a reply half (its service is not one of the backend's
/// lazy ones) and is indexed once confirmed: with its reply half evicted, its forward half
/// holds the port through the reply index, and the backend's next segment derives the half.
#[test]
fn a_port_an_indexed_dnat_flow_holds_without_its_reply_half_is_not_taken() {
    in_fixture_netns(|| {
        let (mut f, dnat_vip, fnat_vip, dnat_vip2) = two_dnat_and_full_nat_on_one_port(1);
        // The first DNAT service takes the backend's one lazy slot.
        let c = client(45110);
        let syn = tcp(c, dnat_vip, TCP_SYN, 1000, 0).build();
        assert_fwd(&f.run(&syn), &syn, &[b8000(1)], Nat::Dnat);
        // A handshake to the second from this host's address and the range's only port.
        let spoof = sa(HOST, 61000);
        let syn = tcp(spoof, dnat_vip2, TCP_SYN, 7000, 0).build();
        assert_fwd(&f.run(&syn), &syn, &[b8000(1)], Nat::Dnat);
        let synack = from_backend(tcp(b8000(1), spoof, TCP_SYN | TCP_ACK, 3000, 7001));
        assert_reply_to_host(&f.run(&synack), dnat_vip2, spoof);
        let ack = tcp(spoof, dnat_vip2, TCP_ACK, 7001, 3001).build();
        assert_fwd(&f.run(&ack), &ack, &[b8000(1)], Nat::Dnat);
        let (fkey, rkey) = (
            flow_key(spoof, dnat_vip2, IPPROTO_TCP),
            flow_key(b8000(1), spoof, IPPROTO_TCP),
        );
        assert_eq!(f.ct(&fkey).unwrap().lazy, ct::LAZY_INDEXED);
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let c2 = client(45111);
        let syn2 = tcp(c2, fnat_vip, TCP_SYN, 1000, 0).build();
        assert_dropped(&f.run(&syn2), Reason::DropSnatExhausted);
        let answer = from_backend(tcp(b8000(1), spoof, TCP_ACK, 3001, 7001));
        let run = f.run(&answer);
        assert_reply_to_host(&run, dnat_vip2, spoof);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        // Once that flow is gone, the port is free again.
        let dp = f.rec.dataplane_mut();
        dp.conntrack_remove(&fkey).unwrap();
        dp.conntrack_remove(&rkey).unwrap();
        assert_eq!(
            assert_fwd(&f.run(&syn2), &syn2, &[b8000(1)], FULL).peer,
            spoof
        );
    });
}

#[test]
fn a_backend_switched_to_full_nat_keeps_its_established_flows_as_they_were() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(46000);
        let vip = sa(VIP, 80);
        let syn = tcp(c, vip, TCP_SYN, 1, 0).build();
        let dnat = assert_fwd(&f.run(&syn), &syn, &web_backends(), Nat::Dnat);
        let ack = tcp(c, vip, TCP_ACK, 2, 1).build();
        assert_fwd(&f.run(&ack), &ack, &[dnat.backend], Nat::Dnat);
        // The config says full NAT now: the backend slots are rewritten...
        f.apply(with_nat(f.services.clone(), FULL));
        let state = f.rec.state();
        assert!(
            state.iter().all(|s| s.full_nat.len() == s.backends.len()),
            "{state:?}"
        );
        // ...the established flow keeps its DNAT translation...
        assert_eq!(
            assert_fwd(&f.run(&ack), &ack, &[dnat.backend], Nat::Dnat),
            dnat
        );
        // ...and new flows take full NAT.
        let syn2 = tcp(client(46001), vip, TCP_SYN, 1, 0).build();
        assert_fwd(&f.run(&syn2), &syn2, &web_backends(), FULL);
        // And back.
        f.apply(with_nat(f.services.clone(), Nat::Dnat));
        let syn3 = tcp(client(46002), vip, TCP_SYN, 1, 0).build();
        assert_fwd(&f.run(&syn3), &syn3, &web_backends(), Nat::Dnat);
    });
}

/// Backdates both halves of the full-NAT flow `client -> service` (reply key `rkey`) by `ago`.
fn age_flow(f: &mut Fixture, fkey: lb_common::FlowKey, rkey: lb_common::FlowKey, ago: u64) {
    for key in [fkey, rkey] {
        let mut e = f.ct(&key).expect("both halves");
        e.last_seen_ns = monotonic_ns() - ago;
        f.rec.dataplane_mut().conntrack_update(key, e).unwrap();
    }
}

#[test]
fn a_port_whose_flow_closed_both_ways_is_reused_after_the_hold_and_a_half_closed_one_is_not() {
    in_fixture_netns(|| {
        // One source port, so every flow wants the same one.
        let one = PortRange {
            first: 61007,
            last: 61007,
        };
        let mut f = one_backend(one);
        let hold_ns = f.dp().options().snat_reuse.as_nanos() as u64;
        assert!(
            hold_ns > 0 && hold_ns < 10_000_000_000,
            "a short hold: {hold_ns}"
        );
        let vip = sa(VIP, 80);
        let be = b8000(1);
        // Flow A opens, exchanges, and closes both ways: client FIN, backend FIN, last ACK.
        let a = client(46000);
        let syn = tcp(a, vip, TCP_SYN, 1000, 0).build();
        let leg = assert_fwd(&f.run(&syn), &syn, &[be], FULL);
        let port = leg.peer;
        let synack = from_backend(tcp(be, port, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), vip, a);
        for (flags, seq, ack) in [(TCP_ACK, 1001, 5001), (TCP_FIN | TCP_ACK, 1001, 5001)] {
            let p = tcp(a, vip, flags, seq, ack).build();
            assert_eq!(assert_fwd(&f.run(&p), &p, &[be], FULL).peer, port);
        }
        let fin = from_backend(tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1002));
        assert_reply(&f.run(&fin), vip, a);
        // The client's final ACK is lost before berth (with it the port would be free at
        // once: `a_port_is_free_as_soon_as_the_final_ack_of_its_flow_passed`).
        let (fkey_a, rkey) = (
            flow_key(a, vip, IPPROTO_TCP),
            flow_key(be, port, IPPROTO_TCP),
        );
        let rev = f.ct(&rkey).unwrap();
        assert_eq!(rev.state, ct::STATE_CLOSING);
        assert_eq!(rev.flags & ct::CT_F_CLOSED, ct::CT_F_CLOSED, "{rev:?}");

        // Within the hold, a new flow B finds the port still A's.
        let b = client(46001);
        let syn_b = tcp(b, vip, TCP_SYN, 7000, 0).build();
        assert_dropped(&f.run(&syn_b), Reason::DropSnatExhausted);
        assert!(f.ct(&fkey_a).is_some());

        // Past the hold (still well inside the 10 s linger), B takes the port over: A's two
        // entries are replaced, not left pointing at it.
        age_flow(&mut f, fkey_a, rkey, hold_ns + 500_000_000);
        let run = f.run(&syn_b);
        assert_eq!(assert_fwd(&run, &syn_b, &[be], FULL).peer, port, "{run:?}");
        assert!(
            f.ct(&fkey_a).is_none(),
            "A's forward half went with its port"
        );
        let rev_b = f.ct(&rkey).expect("B's reply half");
        assert_eq!(
            (
                rev_b.fnat_addr,
                rev_b.fnat_port,
                rev_b.state,
                rev_b.flags & ct::CT_F_CLOSED
            ),
            (
                ipv4_to_wire(b.ip().octets()),
                port_to_wire(b.port()),
                ct::STATE_OPEN,
                0
            )
        );
        // The backend's answer on the port goes to B alone.
        let synack_b = from_backend(tcp(be, port, TCP_SYN | TCP_ACK, 9000, 7001));
        assert_reply(&f.run(&synack_b), vip, b);
        // A late packet of A does not reach B's connection: it has no entry leading to the
        // port, and the only port is B's.
        let held = f.ct(&rkey);
        let late = tcp(a, vip, TCP_ACK, 1002, 5002).build();
        assert_dropped(&f.run(&late), Reason::DropSnatExhausted);
        assert_eq!(f.ct(&rkey), held, "B keeps the port");
        assert!(f.ct(&fkey_a).is_none());

        // B confirms, then is reset by the backend: a RST closes both ways at once.
        let ack_b = tcp(b, vip, TCP_ACK, 7001, 9001).build();
        assert_fwd(&f.run(&ack_b), &ack_b, &[be], FULL);
        let rst = from_backend(tcp(be, port, TCP_RST | TCP_ACK, 9001, 7001));
        assert_reply(&f.run(&rst), vip, b);
        let fkey_b = flow_key(b, vip, IPPROTO_TCP);
        age_flow(&mut f, fkey_b, rkey, hold_ns + 500_000_000);
        // C takes it, then half-closes: only its client sent a FIN.
        let c = client(46002);
        let syn_c = tcp(c, vip, TCP_SYN, 100, 0).build();
        assert_eq!(assert_fwd(&f.run(&syn_c), &syn_c, &[be], FULL).peer, port);
        assert!(f.ct(&fkey_b).is_none());
        let synack_c = from_backend(tcp(be, port, TCP_SYN | TCP_ACK, 300, 101));
        assert_reply(&f.run(&synack_c), vip, c);
        for (flags, seq) in [(TCP_ACK, 101), (TCP_FIN | TCP_ACK, 101)] {
            let p = tcp(c, vip, flags, seq, 301).build();
            assert_fwd(&f.run(&p), &p, &[be], FULL);
        }
        let fkey_c = flow_key(c, vip, IPPROTO_TCP);
        assert_eq!(f.ct(&rkey).unwrap().state, ct::STATE_CLOSING);
        // Long past the hold, inside the linger: the backend may still be answering C, so a
        // new flow D does not get the port, and C's answer still reaches C.
        age_flow(&mut f, fkey_c, rkey, hold_ns + 3_000_000_000);
        let d = client(46003);
        let syn_d = tcp(d, vip, TCP_SYN, 1, 0).build();
        assert_dropped(&f.run(&syn_d), Reason::DropSnatExhausted);
        let data = from_backend(tcp(be, port, TCP_ACK | TCP_PSH, 301, 102).with_payload(b"late"));
        assert_reply(&f.run(&data), vip, c);
        // Once the backend closes its side too, the hold runs from that FIN.
        let fin_c = from_backend(tcp(be, port, TCP_FIN | TCP_ACK, 305, 102));
        assert_reply(&f.run(&fin_c), vip, c);
        assert_dropped(&f.run(&syn_d), Reason::DropSnatExhausted);
        age_flow(&mut f, fkey_c, rkey, hold_ns + 500_000_000);
        assert_eq!(assert_fwd(&f.run(&syn_d), &syn_d, &[be], FULL).peer, port);
        assert!(f.ct(&fkey_c).is_none());
    });
}

/// Flow `c -> vip` to the one backend opened on `f` (SYN with sequence 1000, SYN-ACK 5000,
/// ACK); returns berth's source for it.
fn open_flow(f: &Fixture, c: SocketAddrV4) -> SocketAddrV4 {
    let (vip, be) = (sa(VIP, 80), b8000(1));
    let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
    let port = assert_fwd(&f.run(&syn), &syn, &[be], FULL).peer;
    let synack = from_backend(tcp(be, port, TCP_SYN | TCP_ACK, 5000, 1001));
    assert_reply(&f.run(&synack), vip, c);
    let ack = tcp(c, vip, TCP_ACK, 1001, 5001).build();
    assert_fwd(&f.run(&ack), &ack, &[be], FULL);
    port
}

/// A segment of flow `c -> vip`'s connection through `f`, from the client (`client`) or the
/// backend, checked to be translated.
fn pass(f: &Fixture, c: SocketAddrV4, port: SocketAddrV4, client: bool, p: Ipv4Packet) {
    let (vip, be) = (sa(VIP, 80), b8000(1));
    if client {
        let p = p.build();
        assert_eq!(assert_fwd(&f.run(&p), &p, &[be], FULL).peer, port);
    } else {
        assert_reply(&f.run(&from_backend(p)), vip, c);
    }
}

/// Whether a new flow from `c` takes `port` (the only one) now: taken (and checked to be its),
/// or dropped as `drop_snat_exhausted`.
fn new_flow_takes(f: &Fixture, c: SocketAddrV4, port: SocketAddrV4) -> bool {
    let syn = tcp(c, sa(VIP, 80), TCP_SYN, 77, 0).build();
    let run = f.run(&syn);
    if run.action == TC_ACT_SHOT {
        assert_eq!(run.exits(), [Reason::DropSnatExhausted.name()], "{run:?}");
        return false;
    }
    assert_eq!(assert_fwd(&run, &syn, &[b8000(1)], FULL).peer, port);
    true
}

const ONE_PORT: PortRange = PortRange {
    first: 61007,
    last: 61007,
};

#[test]
fn a_port_is_free_as_soon_as_the_final_ack_of_its_flow_passed() {
    in_fixture_netns(|| {
        let f = one_backend(ONE_PORT);
        let (vip, be) = (sa(VIP, 80), b8000(1));
        let hold_ns = f.dp().options().snat_reuse.as_nanos() as u64;
        assert!(hold_ns >= 100_000_000, "a hold this test can run inside");
        // The client closes first, the backend second; the client's ACK of the backend's FIN
        // is the last packet of the connection.
        let a = client(47000);
        let port = open_flow(&f, a);
        pass(
            &f,
            a,
            port,
            true,
            tcp(a, vip, TCP_FIN | TCP_ACK, 1001, 5001),
        );
        pass(
            &f,
            a,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1002),
        );
        let rkey = flow_key(be, port, IPPROTO_TCP);
        assert_eq!(f.ct(&rkey).unwrap().flags & ct::CT_F_LAST_ACK, 0);
        pass(&f, a, port, true, tcp(a, vip, TCP_ACK, 1002, 5002));
        let rev = f.ct(&rkey).unwrap();
        assert_eq!(
            rev.flags & (ct::CT_F_CLOSED | ct::CT_F_LAST_ACK),
            ct::CT_F_CLOSED | ct::CT_F_LAST_ACK,
            "{rev:?}"
        );
        // A new flow takes the port at once, well inside the hold; A's entries go.
        let b = client(47001);
        assert!(new_flow_takes(&f, b, port));
        assert!(f.ct(&flow_key(a, vip, IPPROTO_TCP)).is_none());
        let rev_b = f.ct(&rkey).expect("B's reply half");
        assert_eq!(
            (
                rev_b.fnat_port,
                rev_b.state,
                rev_b.flags & !ct::CT_F_FULLNAT
            ),
            (port_to_wire(b.port()), ct::STATE_OPEN, 0)
        );
        let synack_b = from_backend(tcp(be, port, TCP_SYN | TCP_ACK, 9000, 78));
        assert_reply(&f.run(&synack_b), vip, b);

        // The backend closes first, with data on its FIN, the client second (its FIN carrying
        // data too, behind IP and TCP options): the backend's ACK of the client's FIN is last.
        drop(f);
        let f = one_backend(ONE_PORT);
        let c = client(47002);
        let port = open_flow(&f, c);
        pass(
            &f,
            c,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"bye!"),
        );
        let mut fin = tcp(c, vip, TCP_FIN | TCP_ACK | TCP_PSH, 1001, 5006).with_payload(b"ok");
        fin.options = vec![1, 1, 1, 1]; // IP: four no-op options
        fin.tcp_options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // TCP: timestamps
        pass(&f, c, port, true, fin);
        // Short of the client's FIN (its data only), then exactly it.
        pass(&f, c, port, false, tcp(be, port, TCP_ACK, 5006, 1003));
        let d = client(47003);
        assert!(!new_flow_takes(&f, d, port), "the FIN is not acknowledged");
        pass(&f, c, port, false, tcp(be, port, TCP_ACK, 5006, 1004));
        assert!(new_flow_takes(&f, d, port));
        assert!(f.ct(&flow_key(c, vip, IPPROTO_TCP)).is_none());
    });
}

/// FINs that cross (a simultaneous close: the backend sends its FIN before the client's has
/// reached it, so its FIN does not acknowledge the client's) leave the backend in TIME_WAIT
/// too (through CLOSING): the port is marked as when the backend closes first, and a new flow
/// trying it first passes it by. A backend FIN that acknowledges the client's is a passive
/// close, and marks nothing (the last part of the test before).
#[test]
fn a_port_whose_fins_crossed_is_marked_for_the_backends_time_wait() {
    in_fixture_netns(|| {
        let ports = PortRange {
            first: 61010,
            last: 61011,
        };
        let (vip, be) = (sa(VIP, 80), b8000(1));
        let mut f = one_backend(ports);
        let a = client_trying_first(61010, ports, 48000);
        let port = open_flow(&f, a);
        let rkey = flow_key(be, port, IPPROTO_TCP);
        // The client's FIN (ends at 1002), and the backend's sent before it had it (it
        // acknowledges 1001); then each side's ACK of the other's FIN.
        pass(
            &f,
            a,
            port,
            true,
            tcp(a, vip, TCP_FIN | TCP_ACK, 1001, 5001),
        );
        pass(
            &f,
            a,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1001),
        );
        let w = f.dp().claim_word(&rkey);
        assert!(claim::in_time_wait(w, monotonic_ns()), "{w:#x}");
        pass(&f, a, port, true, tcp(a, vip, TCP_ACK, 1002, 5002));
        pass(&f, a, port, false, tcp(be, port, TCP_ACK, 5002, 1002));
        let w = f.dp().claim_word(&rkey);
        assert!(claim::in_time_wait(w, monotonic_ns()), "{w:#x}");
        // Past the closed flow's hold (`snat_port_reuse_ms`: berth saw no final ACK it could
        // tell), the port is free by its entries; a new flow trying it first still passes it by
        // for the mark, and takes its next try, the other port.
        age_flow(&mut f, flow_key(a, vip, IPPROTO_TCP), rkey, 2_000_000_000);
        let b = client_trying_first(61010, ports, 49000);
        let syn = tcp(b, vip, TCP_SYN, 77, 0).build();
        let run = f.run(&syn);
        let leg = assert_fwd(&run, &syn, &[be], FULL);
        assert_eq!(
            leg.peer.port(),
            61011,
            "the marked port is passed by: {run:?}"
        );
        // Unmarked (sixty seconds on), the port goes to the next flow that tries it first.
        f.rec
            .dataplane_mut()
            .claim_store(&rkey, claim::time_wait(monotonic_ns() - 61_000_000_000));
        let c = client_trying_first(61010, ports, 50000);
        assert!(new_flow_takes_port(&f, c, 61010));
    });
}

/// A client whose flow to the VIP tries `port` first in `ports`, from port `from` up.
fn client_trying_first(port: u16, ports: PortRange, from: u16) -> SocketAddrV4 {
    (from..u16::MAX)
        .map(client)
        .find(|&c| first_try(c, sa(VIP, 80), IPPROTO_TCP, ports) == port)
        .expect("a client trying the port first")
}

/// Closes flow `c -> vip` (source `port`), the backend's FIN first, then the client's (which
/// acknowledges it), then the backend's final ACK: the backend holds the connection in
/// TIME_WAIT.
fn close_backend_first(f: &Fixture, c: SocketAddrV4, port: SocketAddrV4) {
    let (vip, be) = (sa(VIP, 80), b8000(1));
    pass(
        f,
        c,
        port,
        false,
        tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1001),
    );
    pass(f, c, port, true, tcp(c, vip, TCP_FIN | TCP_ACK, 1001, 5002));
    pass(f, c, port, false, tcp(be, port, TCP_ACK, 5002, 1002));
}

#[test]
fn a_port_whose_backend_closed_first_is_taken_only_when_no_other_is_free() {
    in_fixture_netns(|| {
        let ports = PortRange {
            first: 61010,
            last: 61011,
        };
        let vip = sa(VIP, 80);
        let hash = |c: SocketAddrV4| flow_hash(&flow_key(c, vip, IPPROTO_TCP), options().hash_seed);
        // The backend closes first: once the client's FIN passed, its port is marked for the
        // backend's TIME_WAIT (a new SYN there would meet the old connection's socket).
        let mut f = one_backend(ports);
        let a = client_trying_first(61010, ports, 48000);
        let port = open_flow(&f, a);
        assert_eq!(port.port(), 61010);
        close_backend_first(&f, a, port);
        let rkey = flow_key(b8000(1), port, IPPROTO_TCP);
        let rev = f.ct(&rkey).expect("the closed flow's reply half");
        assert_ne!(
            rev.flags & ct::CT_F_LAST_ACK,
            0,
            "its final ACK passed: {rev:?}"
        );
        let w = f.dp().claim_word(&rkey);
        assert!(claim::in_time_wait(w, monotonic_ns()), "{w:#x}");
        // A new flow trying that port first takes its next try, the other port.
        let b = client_trying_first(61010, ports, 49000);
        let syn = tcp(b, vip, TCP_SYN, 77, 0).build();
        let run = f.run(&syn);
        let leg = assert_fwd(&run, &syn, &[b8000(1)], FULL);
        assert_ne!(
            leg.peer.port(),
            61010,
            "the marked port is passed by: {run:?}"
        );
        assert_eq!(
            leg.peer.port(),
            ct::snat_port(hash(b), 1, ports.first, ports.last)
        );
        assert_eq!(run.counted(Reason::EventSnatPortTaken), 1, "{run:?}");
        // Sixty seconds on, the mark is gone: the next flow trying the port first takes it.
        f.rec
            .dataplane_mut()
            .claim_store(&rkey, claim::time_wait(monotonic_ns() - 61_000_000_000));
        let c = client_trying_first(61010, ports, 50000);
        assert!(new_flow_takes_port(&f, c, 61010));

        // Every port tried held, one only by the mark: that one is taken (the second pass).
        let mut f = one_backend(ports);
        let a = client_trying_first(61010, ports, 48000);
        let port = open_flow(&f, a);
        close_backend_first(&f, a, port);
        stage_pair(&mut f, client(5555), vip, 61011, IPPROTO_TCP);
        let b = client_trying_first(61010, ports, 49000);
        assert!(new_flow_takes_port(&f, b, 61010));
        assert!(
            f.ct(&flow_key(a, vip, IPPROTO_TCP)).is_none(),
            "the old flow's entries go"
        );

        // The client closes first: the backend's socket is gone with the final ACK, nothing
        // is marked, and the port is taken at once.
        let f = one_backend(ports);
        let a = client_trying_first(61010, ports, 48000);
        let port = open_flow(&f, a);
        let be = b8000(1);
        pass(
            &f,
            a,
            port,
            true,
            tcp(a, vip, TCP_FIN | TCP_ACK, 1001, 5001),
        );
        pass(
            &f,
            a,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1002),
        );
        pass(&f, a, port, true, tcp(a, vip, TCP_ACK, 1002, 5002));
        assert!(!claim::in_time_wait(
            f.dp().claim_word(&rkey),
            monotonic_ns()
        ));
        let b = client_trying_first(61010, ports, 49000);
        assert!(new_flow_takes_port(&f, b, 61010));
    });
}

#[test]
fn a_flow_passes_at_most_four_marked_ports_by() {
    in_fixture_netns(|| {
        let ports = PortRange {
            first: 61020,
            last: 61025,
        };
        let vip = sa(VIP, 80);
        let c = client(48100);
        let h = flow_hash(&flow_key(c, vip, IPPROTO_TCP), options().hash_seed);
        // A six-port range is walked port by port from the flow's first try.
        let try_ = |i| ct::snat_port(h, i, ports.first, ports.last);
        let mark = |f: &mut Fixture, i| {
            let rkey = flow_key(b8000(1), sa(HOST, try_(i)), IPPROTO_TCP);
            f.rec
                .dataplane_mut()
                .claim_store(&rkey, claim::time_wait(monotonic_ns()));
        };
        let leaves_from = |f: &Fixture| {
            let syn = tcp(c, vip, TCP_SYN, 77, 0).build();
            let run = f.run(&syn);
            let port = assert_fwd(&run, &syn, &[b8000(1)], FULL).peer.port();
            (port, run.counted(Reason::EventSnatPortTaken))
        };
        // Its first four tries marked: it passes them by and takes the fifth, free.
        let mut f = one_backend(ports);
        for i in 0..4 {
            mark(&mut f, i);
        }
        assert_eq!(leaves_from(&f), (try_(4), 4));
        // Every port marked: past four, it takes the fifth, marked.
        let mut f = one_backend(ports);
        for i in 0..6 {
            mark(&mut f, i);
        }
        assert_eq!(leaves_from(&f), (try_(4), 4));
    });
}

/// Whether a new flow from `c` leaves from `port` (checked to be translated either way).
fn new_flow_takes_port(f: &Fixture, c: SocketAddrV4, port: u16) -> bool {
    let syn = tcp(c, sa(VIP, 80), TCP_SYN, 77, 0).build();
    let run = f.run(&syn);
    assert_fwd(&run, &syn, &[b8000(1)], FULL).peer.port() == port
}

#[test]
fn without_its_final_ack_a_closed_flows_port_is_held() {
    in_fixture_netns(|| {
        let (vip, be) = (sa(VIP, 80), b8000(1));
        // Each case closes a flow both ways (client FIN, then the backend's acknowledging
        // it) and then sends what must not count as the final ACK.
        let cases: [(&str, Option<Ipv4Packet>); 6] = [
            ("no final ACK", None),
            (
                "short of the FIN",
                Some(tcp(client(0), vip, TCP_ACK, 1002, 5001)),
            ),
            (
                "beyond the FIN",
                Some(tcp(client(0), vip, TCP_ACK, 1002, 5003)),
            ),
            (
                "out of the window",
                Some(tcp(client(0), vip, TCP_ACK, 1002 + 70_000, 5002)),
            ),
            (
                "from the backend",
                Some(tcp(be, sa(HOST, 0), TCP_ACK, 5002, 1002)),
            ),
            (
                "with a RST",
                Some(tcp(client(0), vip, TCP_RST | TCP_ACK, 1002, 5002)),
            ),
        ];
        for (i, (name, after)) in cases.into_iter().enumerate() {
            let mut f = one_backend(ONE_PORT);
            let a = client(47100 + i as u16);
            let port = open_flow(&f, a);
            pass(
                &f,
                a,
                port,
                true,
                tcp(a, vip, TCP_FIN | TCP_ACK, 1001, 5001),
            );
            pass(
                &f,
                a,
                port,
                false,
                tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1002),
            );
            if let Some(mut p) = after {
                if p.src == be {
                    p.dst = port;
                    pass(&f, a, port, false, p);
                } else {
                    p.src = a;
                    pass(&f, a, port, true, p);
                }
            }
            let b = client(47200 + i as u16);
            assert!(!new_flow_takes(&f, b, port), "{name}: held");
            let (fkey, rkey) = (
                flow_key(a, vip, IPPROTO_TCP),
                flow_key(be, port, IPPROTO_TCP),
            );
            assert_eq!(f.ct(&rkey).unwrap().flags & ct::CT_F_LAST_ACK, 0, "{name}");
            let hold_ns = f.dp().options().snat_reuse.as_nanos() as u64;
            age_flow(&mut f, fkey, rkey, hold_ns + 500_000_000);
            assert!(new_flow_takes(&f, b, port), "{name}: free after the hold");
        }

        // FINs crossing (a simultaneous close: the backend's does not acknowledge the
        // client's), then both ACKs: no final ACK is awaited, the hold applies.
        let f = one_backend(ONE_PORT);
        let a = client(47300);
        let port = open_flow(&f, a);
        pass(
            &f,
            a,
            port,
            true,
            tcp(a, vip, TCP_FIN | TCP_ACK, 1001, 5001),
        );
        pass(
            &f,
            a,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1001),
        );
        pass(&f, a, port, true, tcp(a, vip, TCP_ACK, 1002, 5002));
        pass(&f, a, port, false, tcp(be, port, TCP_ACK, 5002, 1002));
        assert!(!new_flow_takes(&f, client(47301), port), "crossing FINs");

        // The final ACK passed, then the backend retransmits its FIN (the ACK was lost
        // beyond berth): the port is held again, until the client's TIME_WAIT answers it.
        drop(f);
        let f = one_backend(ONE_PORT);
        let a = client(47400);
        let port = open_flow(&f, a);
        pass(
            &f,
            a,
            port,
            true,
            tcp(a, vip, TCP_FIN | TCP_ACK, 1001, 5001),
        );
        pass(
            &f,
            a,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1002),
        );
        pass(&f, a, port, true, tcp(a, vip, TCP_ACK, 1002, 5002));
        pass(
            &f,
            a,
            port,
            false,
            tcp(be, port, TCP_FIN | TCP_ACK, 5001, 1002),
        );
        assert!(!new_flow_takes(&f, client(47401), port), "FIN again");
        pass(&f, a, port, true, tcp(a, vip, TCP_ACK, 1002, 5002));
        assert!(new_flow_takes(&f, client(47401), port), "answered");
    });
}

/// A new TCP flow's forward entry waits in the handshake table (no insert: issue 14), its reply
/// entry, which took the port, in CT_NEW; the backend's SYN-ACK moves the forward entry beside
/// it and the client's ACK confirms both. A pending handshake whose port went to another flow
/// after the hold is over: never sent on with that port.
#[test]
fn a_handshake_waits_in_the_handshake_table_with_its_port_held_by_its_claim() {
    in_fixture_netns(|| {
        let one = PortRange {
            first: 61007,
            last: 61007,
        };
        let f = one_backend(one);
        let vip = sa(VIP, 80);
        let (a, b) = (client(45000), client(45001));
        let syn_a = tcp(a, vip, TCP_SYN, 1, 0).build();
        let leg = assert_fwd(&f.run(&syn_a), &syn_a, &[b8000(1)], FULL);
        let fkey = flow_key(a, vip, IPPROTO_TCP);
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        assert!(
            f.dp().conntrack_pending(&fkey),
            "the forward entry waits in the table"
        );
        // Nothing inserted: the port is held by its claim (lb-common's `claim`), and the reply
        // half, written with the backend's first reply, is listed from the pending flow.
        assert_eq!(f.dp().ct_new_len(), 0, "no entry in CT_NEW");
        assert!(f.dp().conntrack_pending(&rkey) && f.dp().conntrack_unconfirmed(&rkey));
        let rev = f.ct(&rkey).expect("the reply half, listed");
        assert_eq!(ct::forward_key(&rkey, &rev), fkey);
        let fwd = f.ct(&fkey).expect("listed as the entry it becomes");
        assert!(fwd.full_nat());
        assert_eq!(
            (fwd.fnat_addr, fwd.fnat_port),
            (ipv4_to_wire(HOST.octets()), port_to_wire(leg.peer.port()))
        );
        // The port is held: a second client finds none.
        let syn_b = tcp(b, vip, TCP_SYN, 1, 0).build();
        assert_dropped(&f.run(&syn_b), Reason::DropSnatExhausted);
        // The SYN-ACK moves the forward entry to CT_NEW; the ACK confirms the pair.
        let synack = from_backend(tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 7000, 2));
        assert_reply(&f.run(&synack), vip, a);
        assert!(!f.dp().conntrack_pending(&fkey) && f.dp().conntrack_unconfirmed(&fkey));
        // The pair is in CT_NEW (the reply entry written from the pending one, the claim
        // given up: the reply entry holds the port from here on).
        assert!(!f.dp().conntrack_pending(&rkey) && f.dp().conntrack_unconfirmed(&rkey));
        assert_eq!(f.dp().ct_new_len(), 2);
        assert_dropped(&f.run(&syn_b), Reason::DropSnatExhausted);
        let ack = tcp(a, vip, TCP_ACK, 2, 7001).build();
        assert_fwd(&f.run(&ack), &ack, &[b8000(1)], FULL);
        assert!(!f.dp().conntrack_unconfirmed(&fkey) && !f.dp().conntrack_unconfirmed(&rkey));
        assert!(f.ct(&fkey).is_some() && f.ct(&rkey).is_some());

        // Another handshake, never answered: its port goes after the hold to a new flow, and
        // then its client's next packet finds it over (and no port left) rather than sent
        // from the port the other flow holds.
        let mut f = one_backend(one);
        let leg = assert_fwd(&f.run(&syn_a), &syn_a, &[b8000(1)], FULL);
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let mut e = f.ct(&rkey).unwrap();
        e.last_seen_ns = monotonic_ns() - ct::UNCONFIRMED_PORT_HOLD_NS - 1_000_000_000;
        f.rec.dataplane_mut().conntrack_update(rkey, e).unwrap();
        let run = f.run(&syn_b);
        assert_eq!(assert_fwd(&run, &syn_b, &[b8000(1)], FULL).peer, leg.peer);
        assert!(
            f.ct(&fkey).is_none(),
            "the abandoned flow went with its port"
        );
        let again = tcp(a, vip, TCP_ACK, 2, 7001).build();
        let run = f.run(&again);
        assert_dropped(&run, Reason::DropSnatExhausted);
        assert_eq!(
            f.ct(&rkey).map(|r| ct::forward_key(&rkey, &r)),
            Some(flow_key(b, vip, IPPROTO_TCP)),
            "the port stays the second flow's"
        );
    });
}

/// The options of the burst tests below: the default range, and a handshake table whose sets
/// (16,384) hold every handshake of a burst (a claim whose handshake a newer one overwrote
/// frees its port, as an unconfirmed reply entry the LRU evicted did).
fn roomy(first: u16, last: u16) -> DataplaneOptions {
    DataplaneOptions {
        snat_ports: PortRange { first, last },
        conntrack_size: 1 << 18,
        ..options()
    }
}

/// A full-NAT SYN holds its source port by a claim (lb-common's `claim`), not by an insert:
/// a burst of unanswered SYNs (a flood's) leaves CT_NEW as it was, so it evicts no unconfirmed
/// flow there, while every SYN is sent from a port no other pending one has, and a handshake
/// among them still completes, its reply entry written with its backend's SYN-ACK.
#[test]
fn unanswered_full_nat_syns_insert_nothing_and_hold_distinct_ports() {
    in_fixture_netns(|| {
        let f = one_backend_with(roomy(61000, 65535));
        let vip = sa(VIP, 80);
        // An unconfirmed flow already in CT_NEW: the legitimate one the burst must
        // not push out. (Its SYN-ACK moved it there; no ACK yet.)
        let legit = client(39000);
        let syn = tcp(legit, vip, TCP_SYN, 1, 0).build();
        let leg = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], FULL);
        let synack = from_backend(tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 7000, 2));
        assert_reply(&f.run(&synack), vip, legit);
        assert_eq!(f.dp().ct_new_len(), 2, "the legitimate flow's pair");
        // Distinct while held: a claim holds its port for `UNCONFIRMED_PORT_HOLD_NS` (5 s),
        // and on a busy machine this debug-built loop can take longer than that, so a port
        // may come round again only once its first claim is that old (less 50 ms for the
        // coarse clock's jiffy and the claim's tick).
        let hold = std::time::Duration::from_nanos(ct::UNCONFIRMED_PORT_HOLD_NS);
        let mut ports =
            std::collections::HashMap::from([(leg.peer.port(), std::time::Instant::now())]);
        for i in 0..1500u16 {
            let p = tcp(client(40000 + i), vip, TCP_SYN, 1, 0).build();
            let sent = std::time::Instant::now();
            let run = f.run(&p);
            let l = assert_fwd(&run, &p, &[b8000(1)], FULL);
            if let Some(first) = ports.insert(l.peer.port(), sent) {
                let age = sent - first;
                assert!(
                    age + std::time::Duration::from_millis(50) >= hold,
                    "port {} taken twice, {age:?} apart",
                    l.peer.port()
                );
            }
        }
        assert_eq!(
            f.dp().ct_new_len(),
            2,
            "a pending full-NAT SYN inserts nothing (the legitimate pair is all there is)"
        );
        assert!(
            f.dp()
                .conntrack_unconfirmed(&flow_key(legit, vip, IPPROTO_TCP))
        );
        // The last one's handshake completes.
        let c = client(40000 + 1499);
        let rkey = f
            .dp()
            .conntrack_entries()
            .into_iter()
            .find(|(k, e)| {
                e.dir == ct::DIR_REPLY && ct::forward_key(k, e) == flow_key(c, vip, IPPROTO_TCP)
            })
            .map(|(k, _)| k)
            .expect("its reply half listed from its claim");
        let be = SocketAddrV4::new(
            std::net::Ipv4Addr::from(rkey.saddr.to_ne_bytes()),
            u16::from_be(rkey.sport),
        );
        let peer = SocketAddrV4::new(
            std::net::Ipv4Addr::from(rkey.daddr.to_ne_bytes()),
            u16::from_be(rkey.dport),
        );
        let synack = from_backend(tcp(be, peer, TCP_SYN | TCP_ACK, 9000, 2));
        assert_reply(&f.run(&synack), vip, c);
        assert_eq!(
            f.dp().ct_new_len(),
            4,
            "its pair joined CT_NEW with the SYN-ACK"
        );
    });
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a cpu_set_t built on the stack, passed with its size, for this thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
}

/// Two CPUs taking source ports at once never take one port twice: a port is taken by a
/// compare-and-swap of its claim word (lb-common's `claim`). In each of many rounds, two
/// threads, one per CPU, started together, send SYNs of distinct clients to one full-NAT
/// backend with a range of 64 ports (unanswered: each keeps its port), more than the range
/// holds, so the two meet on the same free ports; every port sent from in a round is another.
/// Between rounds the handshake table is emptied, which frees every port (a claim goes with
/// its handshake).
#[test]
fn two_cpus_taking_ports_at_once_never_share_one() {
    in_fixture_netns(|| {
        let f = one_backend_with(roomy(61000, 61063));
        let vip = sa(VIP, 80);
        let prog = f.dp().program();
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex("fx0").to_ne_bytes());
        let (ctx, dp) = (&ctx, f.dp());
        const ROUNDS: u16 = 200;
        const PER: u16 = 50;
        let sync = &std::sync::Barrier::new(3);
        let taken: Vec<Vec<Vec<u16>>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..2u16)
                .map(|cpu| {
                    s.spawn(move || {
                        pin_to(usize::from(cpu));
                        let mut out = vec![0u8; 256];
                        let mut rounds = Vec::new();
                        for round in 0..ROUNDS {
                            let syns: Vec<Vec<u8>> = (0..PER)
                                .map(|i| {
                                    let c = client(2000 + round * 2 * PER + cpu * PER + i);
                                    tcp(c, vip, TCP_SYN, 1, 0).build()
                                })
                                .collect();
                            let mut ports = Vec::new();
                            sync.wait();
                            for syn in &syns {
                                let r = prog
                                    .test_run(TestRunOptions {
                                        data_in: Some(syn),
                                        data_out: Some(&mut out),
                                        ctx_in: Some(ctx),
                                        ..Default::default()
                                    })
                                    .expect("BPF_PROG_TEST_RUN");
                                if r.return_value == TC_ACT_REDIRECT {
                                    let o = wire::parse(&out[..r.data_size_out as usize]);
                                    ports.push(o.src.port());
                                }
                            }
                            rounds.push(ports);
                            sync.wait();
                        }
                        rounds
                    })
                })
                .collect();
            for _ in 0..ROUNDS {
                dp.pending_clear_all();
                sync.wait();
                sync.wait();
            }
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let (mut twice, mut both) = (0, 0);
        for (a, b) in taken[0].iter().zip(&taken[1]) {
            let all: Vec<u16> = [&a[..], &b[..]].concat();
            let distinct: std::collections::BTreeSet<u16> = all.iter().copied().collect();
            twice += all.len() - distinct.len();
            both += usize::from(!a.is_empty() && !b.is_empty());
        }
        assert_eq!(twice, 0, "ports sent from twice in a round");
        assert!(
            both > usize::from(ROUNDS) / 2,
            "both CPUs took ports in {both} of {ROUNDS} rounds"
        );
    });
}

/// A full-NAT SYN whose handshake-table set has every way being written by other CPUs
/// (`SYN_BUSY`: each way is reserved by a compare-and-swap before it is written) cannot record
/// its handshake, and goes to CT_NEW instead: with its reply entry, inserted while its port's
/// claim still held the port, so the port stays held once the claim is given back. (Before,
/// that fallback inserted the forward entry alone and gave the claim back: nothing held the
/// port its SYN was sent from.)
#[test]
fn a_full_nat_syn_whose_set_is_being_written_holds_its_port_by_its_reply_entry() {
    in_fixture_netns(|| {
        let o = DataplaneOptions {
            snat_ports: PortRange {
                first: 61000,
                last: 61063,
            },
            ..options()
        };
        let mut f = one_backend_with(o);
        let vip = sa(VIP, 80);
        let set = |k: &lb_common::FlowKey| {
            lb_common::syn::set_of(flow_hash(k, o.hash_seed), o.syn_sets())
        };
        let target = set(&flow_key(client(30000), vip, IPPROTO_TCP));
        let same: Vec<SocketAddrV4> = (30000..u16::MAX)
            .map(client)
            .filter(|c| set(&flow_key(*c, vip, IPPROTO_TCP)) == target)
            .take(5)
            .collect();
        assert_eq!(same.len(), 5, "five flows of one set");
        for c in &same[..4] {
            let syn = tcp(*c, vip, TCP_SYN, 1, 0).build();
            assert_eq!(f.run(&syn).action, TC_ACT_REDIRECT);
            let k = flow_key(*c, vip, IPPROTO_TCP);
            assert!(f.dp().conntrack_pending(&k), "recorded");
            let e = f.ct(&k).expect("pending entry");
            let busy = lb_common::syn::SynSlot {
                check: lb_common::syn::SYN_BUSY,
                ..lb_common::syn::SynSlot::of(&k, &e)
            };
            f.rec.dataplane_mut().pending_write(busy).unwrap();
        }
        let c = same[4];
        let syn = tcp(c, vip, TCP_SYN, 1, 0).build();
        let run = f.run(&syn);
        assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
        let port = wire::parse(&run.out).src.port();
        let k = flow_key(c, vip, IPPROTO_TCP);
        assert!(!f.dp().conntrack_pending(&k), "no way to record it in");
        assert!(
            f.dp().conntrack_unconfirmed(&k),
            "its forward entry in CT_NEW"
        );
        let rkey = flow_key(sa(backend(1), 8000), sa(HOST, port), IPPROTO_TCP);
        let rev = f.ct(&rkey).expect("its reply entry holds its port");
        assert_eq!(rev.dir, ct::DIR_REPLY);
        assert!(f.dp().conntrack_unconfirmed(&rkey));
    });
}

/// A completed full-NAT handshake `c -> vip` (client ISN 1000, backend ISN 5000) to backend 1:
/// SYN (pending, its port held by its claim), the backend's SYN-ACK (the pair in CT_NEW), the
/// client's ACK (confirmed: the pair in the main map). Returns how the backend sees the flow.
fn full_handshake(f: &Fixture, c: SocketAddrV4, vip: SocketAddrV4) -> Leg {
    let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
    let leg = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], FULL);
    let synack = from_backend(tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 5000, 1001));
    assert_reply(&f.run(&synack), vip, c);
    let ack = tcp(c, vip, TCP_ACK, 1001, 5001).build();
    assert_eq!(assert_fwd(&f.run(&ack), &ack, &[b8000(1)], FULL), leg);
    let (fkey, rkey) = (
        flow_key(c, vip, IPPROTO_TCP),
        flow_key(leg.backend, leg.peer, IPPROTO_TCP),
    );
    assert!(!f.dp().conntrack_unconfirmed(&fkey) && !f.dp().conntrack_unconfirmed(&rkey));
    leg
}

/// A backend segment of flow `leg` whose reply entry is a leftover: not translated, nothing
/// rebuilt, the entry gone.
fn assert_leftover_goes(f: &Fixture, leg: Leg) {
    let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
    assert!(f.ct(&rkey).is_some(), "the reply entry, until this segment");
    let stale = from_backend(
        tcp(leg.backend, leg.peer, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"old"),
    );
    let run = f.run(&stale);
    assert_untouched(&run, &stale, Reason::PassNoService);
    assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
    assert!(f.ct(&rkey).is_none(), "{:?}", f.ct(&rkey));
}

/// Issue 14: a full-NAT flow that took its first port (`ct::snat_port(hash, 0, ..)`, a pure
/// function of its tuple, as its backend is while the tables stand still) is stamped with the
/// table epoch, both halves, through the handshake table and CT_NEW; its replies then skip the
/// forward lookup (a backend's segment with the forward half gone is translated and rebuilds
/// nothing within the second). A flow whose first port was held is never stamped: its replies
/// look the forward half up, and rebuild it.
#[test]
fn a_full_nat_flow_is_stamped_only_at_its_first_port() {
    in_fixture_netns(|| {
        let ports = SNAT_PORTS;
        let mut f = one_backend(ports);
        let vip = sa(VIP, 80);
        let epoch = f.dp().epoch().unwrap();
        assert_ne!(epoch, 0, "the fixture's tables are settled");

        // Flow `c`'s halves carry `stamp`; with its forward half evicted, its backend's
        // segment is translated, rebuilding the forward half `rebuilt` times.
        let check = |f: &mut Fixture, c: SocketAddrV4, leg: Leg, stamp: u64, rebuilt: u64| {
            let (fkey, rkey) = (
                flow_key(c, vip, IPPROTO_TCP),
                flow_key(leg.backend, leg.peer, IPPROTO_TCP),
            );
            assert_eq!(f.ct(&fkey).map(|e| e.epoch), Some(stamp), "forward half");
            assert_eq!(f.ct(&rkey).map(|e| e.epoch), Some(stamp), "reply half");
            f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
            let push = from_backend(
                tcp(leg.backend, leg.peer, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"tick"),
            );
            let run = f.run(&push);
            assert_reply(&run, vip, c);
            assert_eq!(run.counted(Reason::EventCtRebuilt), rebuilt, "{run:?}");
            assert_eq!(f.ct(&fkey).is_some(), rebuilt == 1, "looked up iff rebuilt");
        };

        let c = client(45100);
        let leg = full_handshake(&f, c, vip);
        assert_eq!(leg.peer.port(), first_try(c, vip, IPPROTO_TCP, ports));
        check(&mut f, c, leg, epoch, 0);

        // Another client's first port is held by a third flow: it takes a later one, unstamped,
        // and its replies look the forward half up.
        let c2 = client(45101);
        let first = first_try(c2, vip, IPPROTO_TCP, ports);
        stage_pair(&mut f, client(45102), vip, first, IPPROTO_TCP);
        let leg2 = full_handshake(&f, c2, vip);
        assert_ne!(leg2.peer.port(), first);
        check(&mut f, c2, leg2, 0, 1);
    });
}

/// The leftover a stamped full-NAT reply entry must never become (lb-common's `epoch`): its
/// flow's forward half evicted, the client's next flow on the tuple could not take the first
/// port, whose claim word a handshake of another key held, and went to a later one. The port
/// search cleared the old reply entry's stamp on its way, so the old backend connection's next
/// segment looks the forward half up, finds the new handshake, and is not translated into the
/// client's new connection (the entry goes). Without the clearing it skipped the lookup and
/// reached the client. With the first port's claim free, the new flow takes the first port
/// back over the old entry instead (the previous test's rule, `port_free`).
#[test]
fn a_stamped_reply_entry_is_unstamped_when_its_clients_next_flow_passes_its_port_by() {
    in_fixture_netns(|| {
        let ports = SNAT_PORTS;
        let mut f = one_backend(ports);
        let vip = sa(VIP, 80);
        let epoch = f.dp().epoch().unwrap();
        let c = client(45110);
        let leg = full_handshake(&f, c, vip);
        let (fkey, rkey) = (
            flow_key(c, vip, IPPROTO_TCP),
            flow_key(leg.backend, leg.peer, IPPROTO_TCP),
        );
        assert_eq!(f.ct(&rkey).map(|e| e.epoch), Some(epoch), "stamped");
        // Evicted; the first port's claim word busy; the client connects again from its port.
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        f.rec.dataplane_mut().claim_hold(&rkey);
        let syn = tcp(c, vip, TCP_SYN, 90_000, 0).build();
        let again = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], FULL);
        assert_ne!(again.peer, leg.peer, "a later port");
        let old = f
            .ct(&rkey)
            .expect("the old reply entry, until its next segment");
        assert_eq!(old.epoch, 0, "unstamped");
        // The old connection's segment: not translated, its entry gone.
        assert_leftover_goes(&f, leg);

        // The claim free: the client's next flow on the tuple takes its first port back over
        // the stamped entry whose forward half was evicted.
        let mut f = one_backend(ports);
        let leg = full_handshake(&f, c, vip);
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        let run = f.run(&syn);
        assert_eq!(assert_fwd(&run, &syn, &[b8000(1)], FULL), leg);
        assert!(
            f.dp().conntrack_pending(&rkey),
            "the port is the new handshake's: the old reply entry went"
        );
    });
}

/// The full-NAT case of `ct_integrity`'s `an_older_flows_reply_entry_never_takes_its_tuple_back_from_a_newer_flow`:
/// a flow at a later port (its first held by another flow: unstamped), its forward half
/// evicted; the client's next flow on the tuple takes the first port, free again (stamped),
/// and its forward half is evicted too. The older flow's backend segment finds the newer flow's
/// stamped reply entry where the tuple's pick and first port lead (`newer_flow_holds`): it is
/// not translated and does not take the tuple back (before, it rebuilt the forward half to its
/// port while the newer flow's replies, skipping the forward lookup, still reached the client).
#[test]
fn an_older_flow_at_a_later_port_never_takes_its_tuple_back_from_a_newer_flow() {
    in_fixture_netns(|| {
        let ports = SNAT_PORTS;
        let mut f = one_backend(ports);
        let vip = sa(VIP, 80);
        let epoch = f.dp().epoch().unwrap();
        let c = client(45120);
        let fkey = flow_key(c, vip, IPPROTO_TCP);
        let first = first_try(c, vip, IPPROTO_TCP, ports);
        let holder = client(45121);
        stage_pair(&mut f, holder, vip, first, IPPROTO_TCP);
        let old = full_handshake(&f, c, vip);
        assert_ne!(old.peer.port(), first);
        let old_rkey = flow_key(old.backend, old.peer, IPPROTO_TCP);
        assert_eq!(f.ct(&old_rkey).map(|e| e.epoch), Some(0), "a later port");
        // The holder's flow ends; the older flow's forward half is evicted.
        let dp = f.rec.dataplane_mut();
        dp.conntrack_remove(&flow_key(holder, vip, IPPROTO_TCP))
            .unwrap();
        dp.conntrack_remove(&flow_key(b8000(1), sa(HOST, first), IPPROTO_TCP))
            .unwrap();
        dp.conntrack_remove(&fkey).unwrap();
        // The client's next connection on the tuple: the first port, stamped.
        let new = full_handshake(&f, c, vip);
        assert_eq!(new.peer.port(), first);
        let new_rkey = flow_key(new.backend, new.peer, IPPROTO_TCP);
        assert_eq!(f.ct(&new_rkey).map(|e| e.epoch), Some(epoch));
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        // The older flow's backend segment: not translated, nothing rebuilt, its entry gone.
        assert_leftover_goes(&f, old);
        assert!(f.ct(&fkey).is_none(), "the tuple not taken back");
        // The newer flow's replies still reach the client.
        let push = from_backend(
            tcp(new.backend, new.peer, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"new"),
        );
        assert_reply(&f.run(&push), vip, c);
    });
}

/// A confirmed TCP flow to backend 1 through the program (SYN, the backend's SYN-ACK, the
/// client's ACK) from `c` to `vip`; its leg.
fn confirmed(f: &Fixture, c: SocketAddrV4, vip: SocketAddrV4) -> Leg {
    let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
    let leg = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], FULL);
    let synack = from_backend(tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 7000, 1001));
    assert_reply(&f.run(&synack), vip, c);
    let ack = tcp(c, vip, TCP_ACK, 1001, 7001).build();
    assert_fwd(&f.run(&ack), &ack, &[b8000(1)], FULL);
    leg
}

#[test]
fn a_confirmed_flow_is_indexed_and_a_reply_derives_its_evicted_reply_half() {
    in_fixture_netns(|| {
        let mut f = one_backend(SNAT_PORTS);
        let (vip, c) = (sa(VIP, 80), client(46000));
        let leg = confirmed(&f, c, vip);
        let (fkey, rkey) = (
            flow_key(c, vip, IPPROTO_TCP),
            flow_key(leg.backend, leg.peer, IPPROTO_TCP),
        );
        let fwd = f.ct(&fkey).expect("confirmed forward half");
        assert_eq!(fwd.lazy, ct::LAZY_INDEXED, "{fwd:?}");
        // A flood evicts the reply half. The client's segments go on without it (not rebuilt:
        // they skip it), the backend's next segment derives it from the index.
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let data = tcp(c, vip, TCP_ACK | TCP_PSH, 1001, 7001)
            .with_payload(b"GET")
            .build();
        let run = f.run(&data);
        assert_fwd(&run, &data, &[b8000(1)], FULL);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
        assert!(
            f.ct(&rkey).is_none(),
            "the forward packet skipped the reply half"
        );
        let answer = from_backend(
            tcp(leg.backend, leg.peer, TCP_ACK | TCP_PSH, 7001, 1004).with_payload(b"200"),
        );
        let run = f.run(&answer);
        assert_reply(&run, vip, c);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let rev = f.ct(&rkey).expect("derived reply half");
        assert!(ct::is_reply_of(&rev, &rkey, &fkey), "{rev:?}");
        assert_eq!(
            rev.backend_ack, 1004,
            "its window from the reply's acknowledgment"
        );
        // Once a second the client's segment looks the reply half up (and rebuilds it if gone).
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let mut e = f.ct(&fkey).unwrap();
        e.last_seen_ns = monotonic_ns() - 2 * ct::TOUCH_INTERVAL_NS;
        f.rec.dataplane_mut().conntrack_update(fkey, e).unwrap();
        let run = f.run(&data);
        assert_fwd(&run, &data, &[b8000(1)], FULL);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        assert!(f.ct(&rkey).is_some());
    });
}

#[test]
fn the_port_of_an_indexed_flow_whose_reply_half_was_evicted_is_not_taken() {
    in_fixture_netns(|| {
        let one = PortRange {
            first: 61010,
            last: 61010,
        };
        // An idle timeout shorter than the machine's uptime (the flow is aged by its stamp).
        let mut f = one_backend_with(DataplaneOptions {
            snat_ports: one,
            tcp_idle: std::time::Duration::from_secs(30),
            ..options()
        });
        let vip = sa(VIP, 80);
        let (a, b) = (client(46100), client(46101));
        let leg = confirmed(&f, a, vip);
        let (fkey, rkey) = (
            flow_key(a, vip, IPPROTO_TCP),
            flow_key(leg.backend, leg.peer, IPPROTO_TCP),
        );
        assert_eq!(f.ct(&fkey).unwrap().lazy, ct::LAZY_INDEXED);
        // Its reply half evicted, the flow's forward half still holds the port: a new flow
        // given it would share the tuple at the backend, and the first flow's segments, which
        // no longer look at the reply key, would land in the other's connection.
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let syn_b = tcp(b, vip, TCP_SYN, 5000, 0).build();
        assert_dropped(&f.run(&syn_b), Reason::DropSnatExhausted);
        let data = tcp(a, vip, TCP_ACK | TCP_PSH, 1001, 7001)
            .with_payload(b"x")
            .build();
        assert_fwd(&f.run(&data), &data, &[b8000(1)], FULL);
        let answer = from_backend(tcp(leg.backend, leg.peer, TCP_ACK, 7001, 1002));
        assert_reply(&f.run(&answer), vip, a);
        // Over (idle past its timeout), the flow leaves the port to the next one, and goes
        // with it.
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let mut e = f.ct(&fkey).unwrap();
        e.last_seen_ns = monotonic_ns() - 31_000_000_000;
        f.rec.dataplane_mut().conntrack_update(fkey, e).unwrap();
        let run = f.run(&syn_b);
        assert_eq!(assert_fwd(&run, &syn_b, &[b8000(1)], FULL).peer, leg.peer);
        assert!(
            f.ct(&fkey).is_none(),
            "the flow that was over went with its port"
        );
    });
}

#[test]
fn a_flow_whose_index_slot_a_live_flow_holds_is_not_indexed_and_keeps_its_reply_half() {
    in_fixture_netns(|| {
        let mut f = one_backend(SNAT_PORTS);
        let vip = sa(VIP, 80);
        let c = client(46200);
        let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
        let leg = assert_fwd(&f.run(&syn), &syn, &[b8000(1)], FULL);
        let (fkey, rkey) = (
            flow_key(c, vip, IPPROTO_TCP),
            flow_key(leg.backend, leg.peer, IPPROTO_TCP),
        );
        // Another backend's reply key with the same slot (the slots of a backend's ports are
        // consecutive, so one of its ports lands on any slot), held by a live indexed flow.
        let claims = claim::snat_claims(options().ct_new_size());
        let slot = claim::claim_index(&rkey, claims);
        let be2 = b8000(2);
        let port = (0..=u16::MAX)
            .find(|&p| claim::claim_index(&flow_key(be2, sa(HOST, p), IPPROTO_TCP), claims) == slot)
            .expect("a port of backend 2 on the slot");
        let other = flow_key(client(46201), vip, IPPROTO_TCP);
        let live = CtEntry {
            nat_addr: ipv4_to_wire(be2.ip().octets()),
            nat_port: port_to_wire(be2.port()),
            dir: ct::DIR_FORWARD,
            state: ct::STATE_OPEN,
            backend_id: 2,
            service_id: 0,
            last_seen_ns: monotonic_ns(),
            route: lb_common::Route::NONE,
            backend_ack: 0,
            in_ifindex: 0,
            fnat_addr: ipv4_to_wire(HOST.octets()),
            fnat_port: port_to_wire(port),
            flags: ct::CT_F_FULLNAT,
            lazy: ct::LAZY_INDEXED,
            epoch: 0,
        };
        let other_rkey = ct::reply_key(&other, &live);
        let dp = f.rec.dataplane_mut();
        dp.conntrack_insert(other, live).unwrap();
        dp.fnat_index_store(&other_rkey, other).unwrap();
        // The first flow's handshake completes: it is confirmed, not indexed (the slot stays
        // the other flow's), so its segments look its reply half up as before.
        let synack = from_backend(tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK, 7000, 1001));
        assert_reply(&f.run(&synack), vip, c);
        let ack = tcp(c, vip, TCP_ACK, 1001, 7001).build();
        assert_fwd(&f.run(&ack), &ack, &[b8000(1)], FULL);
        assert_eq!(f.ct(&fkey).unwrap().lazy, 0, "{:?}", f.ct(&fkey));
        assert_eq!(f.dp().fnat_index(&rkey).unwrap(), other);
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let data = tcp(c, vip, TCP_ACK | TCP_PSH, 1001, 7001)
            .with_payload(b"x")
            .build();
        let run = f.run(&data);
        assert_fwd(&run, &data, &[b8000(1)], FULL);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        assert!(f.ct(&rkey).is_some(), "rebuilt by the client's segment");
    });
}

#[test]
fn a_spoofer_cannot_take_the_reply_key_of_an_indexed_flow_whose_reply_half_was_evicted() {
    in_fixture_netns(|| {
        let (mut f, dnat_vip, fnat_vip) = dnat_and_full_nat_on_one_port();
        let c = client(46300);
        let leg = confirmed(&f, c, fnat_vip);
        assert_eq!(leg.peer, sa(HOST, 61000));
        let (fkey, rkey) = (
            flow_key(c, fnat_vip, IPPROTO_TCP),
            flow_key(leg.backend, leg.peer, IPPROTO_TCP),
        );
        assert_eq!(f.ct(&fkey).unwrap().lazy, ct::LAZY_INDEXED);
        // A flood evicts the reply half; a spoofer from this host's address and the flow's
        // port to the DNAT service on the same backend would share its tuple there, and take
        // its replies (the DNAT service is recorded lazily: the backend's next segment would
        // derive the spoofer's reply half).
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let spoof = tcp(sa(HOST, 61000), dnat_vip, TCP_SYN, 7000, 0).build();
        assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
        assert!(
            f.ct(&flow_key(sa(HOST, 61000), dnat_vip, IPPROTO_TCP))
                .is_none()
        );
        let answer = from_backend(tcp(leg.backend, leg.peer, TCP_ACK, 7001, 1001));
        assert_reply(&f.run(&answer), fnat_vip, c);
    });
}
