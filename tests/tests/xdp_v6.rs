//! The XDP fast path for IPv6 through BPF_PROG_TEST_RUN, by the method of `xdp.rs`: flows are
//! set up by the TC program (handshake, first reply), then each packet of the established flow
//! is run through the XDP program and through the TC program, and the two must produce the same
//! frame, byte for byte, with the L4 checksum recomputed from scratch over the pseudo-header.
//! Everything the fast path does not handle (extension headers, ICMPv6, state changes, a half
//! missing, a reply from elsewhere, a refresh due, a hop limit about to expire) must leave XDP
//! untouched (`XDP_PASS`, counted as `event_xdp_pass`) for TC to do the whole job.
//!
//! Clients and backends both sit behind `fx0` (the one-armed case: `XDP_TX`).

use std::net::{Ipv6Addr, SocketAddrV6};

use berth_tests::both_nat;
use berth_tests::{
    fixture::*,
    fixture6::*,
    wire::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    wire6::{self, Ext, IPPROTO_DSTOPTS, Ipv6Packet},
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Reason, ct, port_to_wire};
use lb_userspace::config::Nat;

both_nat!(
    tcp_forward_and_reply_of_an_established_flow_are_sent_by_xdp_as_tc_would,
    udp_forward_and_reply_are_sent_by_xdp_as_tc_would,
    closing_and_state_changing_segments_are_left_to_tc,
    a_flow_missing_half_its_pair_is_left_to_tc,
    a_reply_from_where_its_backend_does_not_live_is_left_to_tc,
    an_entry_due_for_its_refresh_or_without_a_route_is_left_to_tc,
    another_egress_is_redirected_only_when_marked,
);

fn web6() -> Vec<SocketAddrV6> {
    (1..=3).map(|n| sa6(backend6(n), 8000)).collect()
}

fn dns6() -> Vec<SocketAddrV6> {
    vec![sa6(backend6(4), 53), sa6(backend6(5), 53)]
}

/// A TCP service on the VIP :80 (backends 1-3 :8000) and a UDP one on [::]:5353 (backends 4
/// and 5 :53), reached by `nat` (full NAT from HOST6).
fn standard6(nat: Nat) -> Fixture {
    let snat = (nat == Nat::Full).then_some(HOST6);
    let svcs = [
        Svc6 {
            id: 0,
            listen: sa6(VIP6, 80),
            proto: IPPROTO_TCP,
            backends: web6().into_iter().map(|b| (b, 1)).collect(),
            first_backend_id: 1,
            snat,
        },
        Svc6 {
            id: 1,
            listen: sa6(Ipv6Addr::UNSPECIFIED, 5353),
            proto: IPPROTO_UDP,
            backends: dns6().into_iter().map(|b| (b, 1)).collect(),
            first_backend_id: 4,
            snat,
        },
    ];
    fixture6(Vec::new(), &svcs)
}

/// A TCP segment with explicit sequence and acknowledgment numbers and a payload.
fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8, seq: u32, ack: u32) -> Ipv6Packet {
    Ipv6Packet::tcp_seq(src, dst, flags, seq, ack, b"GET / HTTP/1.1\r\n\r\n")
}

/// [`berth_tests::fixture::xdp_equals_tc`] with IPv6's checksum check and parser.
fn xdp_equals_tc(f: &mut Fixture, pkt: &[u8], reason: Reason) -> Vec<u8> {
    berth_tests::fixture::xdp_equals_tc(f, pkt, reason, wire6::verify_checksums6, |p| {
        format!("{:?}", wire6::parse6(p))
    })
}

fn tcp_forward_and_reply_of_an_established_flow_are_sent_by_xdp_as_tc_would(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let c = client6(41000);
        let leg = handshake6(&f, c, &web6(), nat);
        let fkey = flow_key6(c, sa6(VIP6, 80), IPPROTO_TCP);
        let sid = ct6(&f, &fkey).expect("forward entry").ct.service_id;
        let before = f.dp().service_counters(sid).unwrap();
        let data = tcp6(c, sa6(VIP6, 80), TCP_ACK | TCP_PSH, 1001, 5001).build();
        let out = xdp_equals_tc(&mut f, &data, Reason::FwdRedirect);
        let o = wire6::parse6(&out);
        assert_eq!((o.src, o.dst), (leg.peer, leg.backend));
        assert_eq!(o.hop_limit, 63);
        assert_eq!(o.dst_mac, backend6_mac(*leg.backend.ip()));
        assert_eq!(o.src_mac, fx0_mac());
        assert_eq!(o.payload, b"GET / HTTP/1.1\r\n\r\n");
        // Counted on the service like TC's packets (one by XDP, one by TC).
        let after = f.dp().service_counters(sid).unwrap();
        assert_eq!(after.packets - before.packets, 2);
        assert_eq!(after.bytes - before.bytes, 2 * data.len() as u64);
        assert_eq!(after.new_flows, before.new_flows);

        // The backend's data acknowledging the client's: XDP records the acknowledgment as
        // TC does.
        let rkey = flow_key6(leg.backend, leg.peer, IPPROTO_TCP);
        let answer = tcp6(leg.backend, leg.peer, TCP_ACK | TCP_PSH, 5001, 1019).build();
        let x = f.run_xdp(&answer);
        assert_eq!(x.exits(), [Reason::XdpTx.name()], "{x:?}");
        assert_eq!(ct6(&f, &rkey).expect("reply entry").ct.backend_ack, 1019);
        let out = xdp_equals_tc(&mut f, &answer, Reason::ReplyRedirect);
        let o = wire6::parse6(&out);
        assert_eq!((o.src, o.dst), (sa6(VIP6, 80), c));
        assert_eq!(o.dst_mac, CLIENT_MAC);
        // An older acknowledgment does not move it back.
        let old = tcp6(leg.backend, leg.peer, TCP_ACK, 5001, 1001).build();
        assert_eq!(f.run_xdp(&old).action, XDP_TX);
        assert_eq!(ct6(&f, &rkey).unwrap().ct.backend_ack, 1019);
    });
}

fn udp_forward_and_reply_are_sent_by_xdp_as_tc_would(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let service = sa6(HOST6, 5353);
        let req = Ipv6Packet::udp(client6(50000), service, b"query").build();
        let leg = fwd6(&f, &req, &dns6(), nat);
        let answer = Ipv6Packet::udp(leg.backend, leg.peer, b"answer").build();
        let run = f.run(&answer);
        assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
        let out = xdp_equals_tc(&mut f, &req, Reason::FwdRedirect);
        assert_eq!(wire6::parse6(&out).dst, leg.backend);
        let out = xdp_equals_tc(&mut f, &answer, Reason::ReplyRedirect);
        let o = wire6::parse6(&out);
        assert_eq!((o.src, o.dst), (service, client6(50000)));
        assert_eq!(o.payload, b"answer");
    });
}

fn closing_and_state_changing_segments_are_left_to_tc(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let c = client6(41001);
        let leg = handshake6(&f, c, &web6(), nat);
        for flags in [TCP_SYN, TCP_FIN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK] {
            let p = tcp6(c, sa6(VIP6, 80), flags, 1001, 5001).build();
            assert_left_to_tc(&f.run_xdp(&p), &p);
            let p = tcp6(leg.backend, leg.peer, flags | TCP_ACK, 5001, 1001).build();
            assert_left_to_tc(&f.run_xdp(&p), &p);
        }
        // None of that changed the flow: it was never given to TC.
        let data = tcp6(c, sa6(VIP6, 80), TCP_ACK, 1001, 5001).build();
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        // Closed by the backend's FIN through TC: the flow's later packets are TC's too.
        let fin = tcp6(leg.backend, leg.peer, TCP_FIN | TCP_ACK, 5001, 1001).build();
        let run = f.run(&fin);
        assert_eq!(run.counted(Reason::EventCtClosing), 1, "{run:?}");
        assert_left_to_tc(&f.run_xdp(&data), &data);
    });
}

fn a_flow_missing_half_its_pair_is_left_to_tc(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let c = client6(41002);
        let leg = handshake6(&f, c, &web6(), nat);
        let fkey = flow_key6(c, sa6(VIP6, 80), IPPROTO_TCP);
        let rkey = flow_key6(leg.backend, leg.peer, IPPROTO_TCP);
        let data = tcp6(c, sa6(VIP6, 80), TCP_ACK, 1001, 5001).build();
        let answer = tcp6(leg.backend, leg.peer, TCP_ACK, 5001, 1001).build();
        let (fwd, rev) = (ct6(&f, &fkey).unwrap(), ct6(&f, &rkey).unwrap());
        // The reply half evicted: the forward packet is TC's (which rebuilds it).
        f.rec.dataplane_mut().conntrack6_remove(&rkey).unwrap();
        assert_left_to_tc(&f.run_xdp(&data), &data);
        let run = f.run(&data);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        assert_eq!(f.run_xdp(&data).action, XDP_TX, "rebuilt by TC");
        // The forward half evicted: a DNAT reply of the current table epoch needs none (XDP
        // sends it, as TC would: lb-common's `epoch`); one of an earlier epoch, and any
        // full-NAT one (IPv6 full NAT is never stamped), is TC's.
        f.rec.dataplane_mut().conntrack6_insert(rkey, rev).unwrap();
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        if nat == Nat::Dnat {
            assert_ne!(rev.ct.epoch, 0, "stamped");
            assert_eq!(f.run_xdp(&answer).action, XDP_TX);
            let mut earlier = rev;
            earlier.ct.epoch = rev.ct.epoch - 2;
            f.rec
                .dataplane_mut()
                .conntrack6_insert(rkey, earlier)
                .unwrap();
        } else {
            assert_eq!(rev.ct.epoch, 0, "never stamped");
        }
        assert_left_to_tc(&f.run_xdp(&answer), &answer);
        // A half whose partner names another flow: not a pair, either way.
        let mut other = fwd;
        other.ct.nat_port = port_to_wire(leg.backend.port() + 1);
        f.rec
            .dataplane_mut()
            .conntrack6_insert(fkey, other)
            .unwrap();
        assert_left_to_tc(&f.run_xdp(&answer), &answer);
        assert_left_to_tc(&f.run_xdp(&data), &data);
        // Put back, both go by XDP again.
        f.rec.dataplane_mut().conntrack6_insert(fkey, fwd).unwrap();
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        assert_eq!(f.run_xdp(&answer).action, XDP_TX);
    });
}

fn a_reply_from_where_its_backend_does_not_live_is_left_to_tc(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let c = client6(41003);
        let leg = handshake6(&f, c, &web6(), nat);
        let answer = tcp6(leg.backend, leg.peer, TCP_ACK, 5001, 1001).build();
        let rkey = flow_key6(leg.backend, leg.peer, IPPROTO_TCP);
        let before = ct6(&f, &rkey).unwrap();
        assert_left_to_tc(&f.run_xdp_on(&answer, "fx2"), &answer);
        assert_eq!(ct6(&f, &rkey).unwrap(), before, "no state change");
        let run = f.run_on(&answer, "fx2");
        assert_eq!(run.exits(), [Reason::PassReplyWrongIface.name()], "{run:?}");
    });
}

fn an_entry_due_for_its_refresh_or_without_a_route_is_left_to_tc(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let c = client6(41004);
        let leg = handshake6(&f, c, &web6(), nat);
        let fkey = flow_key6(c, sa6(VIP6, 80), IPPROTO_TCP);
        let rkey = flow_key6(leg.backend, leg.peer, IPPROTO_TCP);
        let data = tcp6(c, sa6(VIP6, 80), TCP_ACK, 1001, 5001).build();
        // Last seen over a second ago: TC refreshes both halves (and the route).
        for key in [fkey, rkey] {
            let mut e = ct6(&f, &key).unwrap();
            e.ct.last_seen_ns -= ct::TOUCH_INTERVAL_NS + 1_000_000;
            f.rec.dataplane_mut().conntrack6_insert(key, e).unwrap();
        }
        assert_left_to_tc(&f.run_xdp(&data), &data);
        f.run(&data);
        assert_eq!(f.run_xdp(&data).action, XDP_TX, "refreshed by TC");
        // No cached route: TC looks it up.
        let mut e = ct6(&f, &fkey).unwrap();
        let route = e.ct.route;
        e.ct.route = lb_common::Route::NONE;
        f.rec.dataplane_mut().conntrack6_insert(fkey, e).unwrap();
        assert_left_to_tc(&f.run_xdp(&data), &data);
        e.ct.route = route;
        f.rec.dataplane_mut().conntrack6_insert(fkey, e).unwrap();
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        // A hop limit that would expire here: the stack's (through TC).
        let mut p = tcp6(c, sa6(VIP6, 80), TCP_ACK, 1001, 5001);
        p.hop_limit = 1;
        let p = p.build();
        assert_left_to_tc(&f.run_xdp(&p), &p);
    });
}

fn another_egress_is_redirected_only_when_marked(nat: Nat) {
    in_fixture6_netns(move || {
        let mut f = standard6(nat);
        let c = client6(41005);
        let leg = handshake6(&f, c, &web6(), nat);
        // The client's packet arriving on fx2 (its route to the backend leaves by fx0).
        let data = tcp6(c, sa6(VIP6, 80), TCP_ACK, 1001, 5001).build();
        assert_left_to_tc(&f.run_xdp_on(&data, "fx2"), &data);
        f.rec
            .dataplane_mut()
            .set_xdp_target(ifindex("fx0"))
            .unwrap();
        let x = f.run_xdp_on(&data, "fx2");
        assert_eq!(x.action, XDP_REDIRECT, "{x:?}");
        assert_eq!(x.exits(), [Reason::XdpRedirect.name()], "{x:?}");
        wire6::verify_checksums6(&x.out).unwrap();
        let t = f.run_on(&data, "fx2");
        assert_eq!(t.exits(), [Reason::FwdRedirect.name()], "{t:?}");
        assert_eq!(x.out, t.out);
        assert_eq!(wire6::parse6(&x.out).dst, leg.backend);
    });
}

#[test]
fn what_the_ipv6_fast_path_does_not_handle_is_left_to_tc() {
    in_fixture6_netns(|| {
        let mut f = standard6(Nat::Dnat);
        // A new flow's SYN, a mid-stream packet of no flow, a flow still unconfirmed.
        let syn = Ipv6Packet::tcp(client6(42000), sa6(VIP6, 80), TCP_SYN).build();
        assert_left_to_tc(&f.run_xdp(&syn), &syn);
        let ack = Ipv6Packet::tcp(client6(42001), sa6(VIP6, 80), TCP_ACK).build();
        assert_left_to_tc(&f.run_xdp(&ack), &ack);
        fwd6(&f, &syn, &web6(), Nat::Dnat);
        let key = flow_key6(client6(42000), sa6(VIP6, 80), IPPROTO_TCP);
        assert!(f.dp().conntrack6_unconfirmed(&key));
        let ack = Ipv6Packet::tcp(client6(42000), sa6(VIP6, 80), TCP_ACK).build();
        assert_left_to_tc(&f.run_xdp(&ack), &ack);
        // Not a service; ICMPv6.
        let ssh = Ipv6Packet::tcp(client6(42002), sa6(HOST6, 22), TCP_ACK).build();
        assert_left_to_tc(&f.run_xdp(&ssh), &ssh);
        let ns = wire6::neighbor_solicitation(CLIENT6, HOST6);
        assert_left_to_tc(&f.run_xdp(&ns), &ns);
        // An established UDP flow's packet goes by XDP; with an extension header, or
        // truncated or with lengths past the frame, it is TC's.
        let service = sa6(HOST6, 5353);
        let req = Ipv6Packet::udp(client6(50005), service, b"query");
        let plain = req.build();
        let leg = fwd6(&f, &plain, &dns6(), Nat::Dnat);
        f.run(&Ipv6Packet::udp(leg.backend, leg.peer, b"answer").build());
        assert_eq!(f.run_xdp(&plain).action, XDP_TX);
        let ext = req
            .clone()
            .with_ext(vec![Ext::options(IPPROTO_DSTOPTS, 6)])
            .build();
        assert_left_to_tc(&f.run_xdp(&ext), &ext);
        let mut short = plain.clone();
        short.truncate(60);
        assert_left_to_tc(&f.run_xdp(&short), &short);
        let mut bad_len = plain.clone();
        bad_len[18] = 0x10; // payload length past the frame
        assert_left_to_tc(&f.run_xdp(&bad_len), &bad_len);
        let mut jumbo = plain.clone();
        (jumbo[18], jumbo[19]) = (0, 0);
        assert_left_to_tc(&f.run_xdp(&jumbo), &jumbo);
        let mut bad_udp = plain.clone();
        bad_udp[58] = 0x40; // UDP length past the payload
        assert_left_to_tc(&f.run_xdp(&bad_udp), &bad_udp);
    });
}

/// Frames of an established IPv6 flow with random header bytes changed: the XDP program either
/// leaves a frame to TC untouched or sends it with `XDP_TX` at its length, never anything else,
/// a frame whose checksum was right goes out with a right checksum, and the flow's entries
/// change in nothing but the backend's acknowledgment.
#[test]
fn mangled_ipv6_headers_never_crash_or_corrupt() {
    in_fixture6_netns(|| {
        let mut f = standard6(Nat::Dnat);
        let c = client6(43000);
        let leg = handshake6(&f, c, &web6(), Nat::Dnat);
        let fkey = flow_key6(c, sa6(VIP6, 80), IPPROTO_TCP);
        let rkey = flow_key6(leg.backend, leg.peer, IPPROTO_TCP);
        let (fwd, rev) = (ct6(&f, &fkey).unwrap(), ct6(&f, &rkey).unwrap());
        let base = [
            tcp6(c, sa6(VIP6, 80), TCP_ACK, 1001, 5001).build(),
            tcp6(leg.backend, leg.peer, TCP_ACK, 5001, 1019).build(),
        ];
        let (sent, passed) = mangle_through_xdp(&mut f, &base, 74, wire6::verify_checksums6);
        println!("3000 mangled IPv6 frames: {sent} sent, {passed} left to TC");
        assert!(sent > 0 && passed > 0);
        assert_eq!(ct6(&f, &fkey).unwrap(), fwd);
        let mut now = ct6(&f, &rkey).unwrap();
        now.ct.backend_ack = rev.ct.backend_ack;
        now.ct.flags = rev.ct.flags;
        assert_eq!(now, rev);
    });
}
