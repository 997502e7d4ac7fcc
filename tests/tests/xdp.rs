//! The XDP fast path (issue 14) through BPF_PROG_TEST_RUN: flows are set up by the TC program
//! (handshake, first reply), then each packet of the established flow is run through the XDP
//! program and through the TC program, and the two must produce the same frame, byte for byte,
//! with both checksums recomputed from scratch. Everything the fast path does not handle must
//! leave XDP untouched (`XDP_PASS`, counted as `event_xdp_pass`) for TC to do the whole job.
//!
//! In the fixture namespace clients and backends both sit behind `fx0`: the one-armed case,
//! where the XDP program sends with `XDP_TX`.

use std::net::SocketAddrV4;

use berth_tests::both_nat;
use berth_tests::{
    fixture::*,
    wire::{self, Ipv4Packet, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Reason, ct};
use lb_userspace::config::Nat;

both_nat!(
    tcp_forward_and_reply_of_an_established_flow_are_sent_by_xdp_as_tc_would,
    udp_forward_and_reply_are_sent_by_xdp_as_tc_would,
    a_zero_udp_checksum_stays_zero,
    closing_and_state_changing_segments_are_left_to_tc,
    a_flow_missing_half_its_pair_is_left_to_tc,
    a_reply_from_where_its_backend_does_not_live_is_left_to_tc,
    an_entry_due_for_its_refresh_or_without_a_route_is_left_to_tc,
    another_egress_is_redirected_only_when_marked,
);

/// A TCP segment with explicit sequence and acknowledgment numbers and a payload.
fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32, ack: u32) -> Ipv4Packet {
    Ipv4Packet::tcp_seq(src, dst, flags, seq, ack, b"GET / HTTP/1.1\r\n\r\n")
}

/// A completed handshake client -> VIP:80 through the TC program (client ISN 1000, backend
/// ISN 5000). Returns how the backend sees the flow.
fn handshake(f: &Fixture, c: SocketAddrV4, nat: Nat) -> Leg {
    let service = sa(VIP, 80);
    let mut syn = tcp(c, service, TCP_SYN, 1000, 0);
    syn.l4 = L4::Tcp {
        flags: TCP_SYN,
        seq: 1000,
        ack: 0,
        payload: Vec::new(),
    };
    let syn = syn.build();
    let leg = assert_fwd(&f.run(&syn), &syn, &web_backends(), nat);
    let mut synack = Ipv4Packet::tcp(leg.backend, leg.peer, TCP_SYN | TCP_ACK);
    synack.l4 = L4::Tcp {
        flags: TCP_SYN | TCP_ACK,
        seq: 5000,
        ack: 1001,
        payload: Vec::new(),
    };
    let run = f.run(&from_backend(synack));
    assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
    let ack = tcp(c, service, TCP_ACK, 1001, 5001).build();
    assert_eq!(assert_fwd(&f.run(&ack), &ack, &[leg.backend], nat), leg);
    leg
}

/// [`berth_tests::fixture::xdp_equals_tc`] with IPv4's checksum check and parser.
fn xdp_equals_tc(f: &mut Fixture, pkt: &[u8], reason: Reason) -> Vec<u8> {
    berth_tests::fixture::xdp_equals_tc(f, pkt, reason, wire::verify_checksums, |p| {
        format!("{:?}", wire::parse(p))
    })
}

fn tcp_forward_and_reply_of_an_established_flow_are_sent_by_xdp_as_tc_would(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(41000);
        let leg = handshake(&f, c, nat);
        let fwd_key = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let sid = f.ct(&fwd_key).expect("forward entry").service_id;
        let before = f.dp().service_counters(sid).unwrap();
        let data = tcp(c, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5001).build();
        let out = xdp_equals_tc(&mut f, &data, Reason::FwdRedirect);
        let o = wire::parse(&out);
        assert_eq!((o.src, o.dst), (leg.peer, leg.backend));
        assert_eq!(o.ttl, 63);
        assert_eq!(o.dst_mac, backend_mac(*leg.backend.ip()));
        assert_eq!(o.src_mac, fx0_mac());
        // Counted on the service like TC's packets (one by XDP, one by TC).
        let after = f.dp().service_counters(sid).unwrap();
        assert_eq!(after.packets - before.packets, 2);
        assert_eq!(after.bytes - before.bytes, 2 * data.len() as u64);
        assert_eq!(after.new_flows, before.new_flows);

        // The backend answers with data acknowledging the client's: XDP records the
        // acknowledgment as TC does (a client FIN is judged against it).
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let answer = from_backend(tcp(leg.backend, leg.peer, TCP_ACK | TCP_PSH, 5001, 1019));
        let x = f.run_xdp(&answer);
        assert_eq!(x.exits(), [Reason::XdpTx.name()], "{x:?}");
        assert_eq!(f.ct(&rkey).expect("reply entry").backend_ack, 1019);
        let out = xdp_equals_tc(&mut f, &answer, Reason::ReplyRedirect);
        let o = wire::parse(&out);
        assert_eq!((o.src, o.dst), (sa(VIP, 80), c));
        assert_eq!(o.dst_mac, CLIENT_MAC);
        // An older acknowledgment does not move it back.
        let old = from_backend(tcp(leg.backend, leg.peer, TCP_ACK, 5001, 1001));
        assert_eq!(f.run_xdp(&old).action, XDP_TX);
        assert_eq!(f.ct(&rkey).unwrap().backend_ack, 1019);
    });
}

fn udp_forward_and_reply_are_sent_by_xdp_as_tc_would(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let service = sa(HOST, 5353);
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let req = Ipv4Packet::udp(client(50000), service, b"query").build();
        let leg = assert_fwd(&f.run(&req), &req, &dns, nat);
        // Before the first answer a DNAT flow has no reply entry (recorded lazily): its
        // forward packets need none, so XDP sends them already.
        if nat == Nat::Dnat {
            let out = xdp_equals_tc(&mut f, &req, Reason::FwdRedirect);
            assert_eq!(wire::parse(&out).dst, leg.backend);
            assert!(
                f.ct(&flow_key(leg.backend, leg.peer, IPPROTO_UDP))
                    .is_none()
            );
        }
        let answer = from_backend(Ipv4Packet::udp(leg.backend, leg.peer, b"answer"));
        let run = f.run(&answer);
        assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
        let out = xdp_equals_tc(&mut f, &req, Reason::FwdRedirect);
        assert_eq!(wire::parse(&out).dst, leg.backend);
        assert_ne!(wire::parse(&out).l4_csum, 0);
        let out = xdp_equals_tc(&mut f, &answer, Reason::ReplyRedirect);
        let o = wire::parse(&out);
        assert_eq!((o.src, o.dst), (service, client(50000)));
    });
}

fn a_zero_udp_checksum_stays_zero(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let service = sa(HOST, 5353);
        let zero = |src, dst, payload: &[u8]| {
            let mut p = Ipv4Packet::udp(src, dst, payload);
            p.l4 = L4::Udp {
                payload: payload.to_vec(),
                zero_csum: true,
            };
            p
        };
        let req = zero(client(50001), service, b"zero").build();
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let leg = assert_fwd(&f.run(&req), &req, &dns, nat);
        let answer = from_backend(zero(leg.backend, leg.peer, b"zero back"));
        f.run(&answer);
        let out = xdp_equals_tc(&mut f, &req, Reason::FwdRedirect);
        assert_eq!(wire::parse(&out).l4_csum, 0, "no checksum stays none");
        let out = xdp_equals_tc(&mut f, &answer, Reason::ReplyRedirect);
        assert_eq!(wire::parse(&out).l4_csum, 0, "no checksum stays none");
    });
}

fn closing_and_state_changing_segments_are_left_to_tc(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(41001);
        let leg = handshake(&f, c, nat);
        for flags in [TCP_SYN, TCP_FIN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK] {
            let p = tcp(c, sa(VIP, 80), flags, 1001, 5001).build();
            assert_left_to_tc(&f.run_xdp(&p), &p);
            let p = from_backend(tcp(leg.backend, leg.peer, flags | TCP_ACK, 5001, 1001));
            assert_left_to_tc(&f.run_xdp(&p), &p);
        }
        // None of that changed the flow: it was never given to TC.
        let data = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        // Closed by the backend's FIN through TC: the flow's later packets are TC's too.
        let fin = from_backend(tcp(leg.backend, leg.peer, TCP_FIN | TCP_ACK, 5001, 1001));
        let run = f.run(&fin);
        assert_eq!(run.counted(Reason::EventCtClosing), 1, "{run:?}");
        assert_left_to_tc(&f.run_xdp(&data), &data);
    });
}

fn a_flow_missing_half_its_pair_is_left_to_tc(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(41002);
        let leg = handshake(&f, c, nat);
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let data = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
        let answer = from_backend(tcp(leg.backend, leg.peer, TCP_ACK, 5001, 1001));
        let rev = f.ct(&rkey).expect("reply entry");
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        // The reply half evicted, of a DNAT flow recorded lazily or a full-NAT flow indexed:
        // its forward packets need none (XDP sends them as before); the answer is TC's, which
        // derives it again.
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        assert_left_to_tc(&f.run_xdp(&answer), &answer);
        let run = f.run(&answer);
        assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
        if nat == Nat::Dnat {
            assert_eq!(f.ct(&rkey), Some(rev), "derived as it was");
        } else {
            // (Its window from the answer's acknowledgment on.)
            let derived = f.ct(&rkey).expect("derived");
            assert!(
                lb_common::ct::is_reply_of(&derived, &rkey, &fkey),
                "{derived:?}"
            );
            assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        }
        // The forward half evicted: a reply of the current table epoch needs none (XDP sends
        // it, as TC would: lb-common's `epoch`; full NAT: a flow at its first port, as this
        // one); one of an earlier epoch is TC's.
        f.rec.dataplane_mut().conntrack_insert(rkey, rev).unwrap();
        let fwd = f.ct(&fkey).expect("forward entry");
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        assert_ne!(rev.epoch, 0, "stamped");
        assert_eq!(f.run_xdp(&answer).action, XDP_TX);
        let earlier = lb_common::CtEntry {
            epoch: rev.epoch - 2,
            ..f.ct(&rkey).expect("reply entry")
        };
        f.rec
            .dataplane_mut()
            .conntrack_insert(rkey, earlier)
            .unwrap();
        assert_left_to_tc(&f.run_xdp(&answer), &answer);
        // A half whose partner names another flow: not a pair.
        let mut other = fwd;
        other.nat_port = lb_common::port_to_wire(leg.backend.port() + 1);
        f.rec.dataplane_mut().conntrack_insert(fkey, other).unwrap();
        assert_left_to_tc(&f.run_xdp(&answer), &answer);
        // A lazily recorded or indexed flow's forward entry alone decides where its packets go.
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        // Put back, both go by XDP again.
        f.rec.dataplane_mut().conntrack_insert(fkey, fwd).unwrap();
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        assert_eq!(f.run_xdp(&answer).action, XDP_TX);
    });
}

fn a_reply_from_where_its_backend_does_not_live_is_left_to_tc(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(41003);
        let leg = handshake(&f, c, nat);
        let answer = from_backend(tcp(leg.backend, leg.peer, TCP_ACK, 5001, 1001));
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let before = f.ct(&rkey).unwrap();
        assert_left_to_tc(&f.run_xdp_on(&answer, "fx2"), &answer);
        assert_eq!(f.ct(&rkey).unwrap(), before, "no state change");
        let run = f.run_on(&answer, "fx2");
        assert_eq!(run.exits(), [Reason::PassReplyWrongIface.name()], "{run:?}");
    });
}

fn an_entry_due_for_its_refresh_or_without_a_route_is_left_to_tc(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(41004);
        let leg = handshake(&f, c, nat);
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let data = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
        // Last seen over a second ago: TC refreshes both halves (and the route).
        for key in [fkey, rkey] {
            let mut e = f.ct(&key).unwrap();
            e.last_seen_ns -= ct::TOUCH_INTERVAL_NS + 1_000_000;
            f.rec.dataplane_mut().conntrack_update(key, e).unwrap();
        }
        assert_left_to_tc(&f.run_xdp(&data), &data);
        f.run(&data);
        assert_eq!(f.run_xdp(&data).action, XDP_TX, "refreshed by TC");
        // No cached route: TC looks it up.
        let mut e = f.ct(&fkey).unwrap();
        let route = e.route;
        e.route = lb_common::Route::NONE;
        f.rec.dataplane_mut().conntrack_update(fkey, e).unwrap();
        assert_left_to_tc(&f.run_xdp(&data), &data);
        e.route = route;
        f.rec.dataplane_mut().conntrack_update(fkey, e).unwrap();
        assert_eq!(f.run_xdp(&data).action, XDP_TX);
        // A TTL that would expire here: the stack's (through TC).
        let mut p = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001);
        p.ttl = 1;
        let p = p.build();
        assert_left_to_tc(&f.run_xdp(&p), &p);
    });
}

fn another_egress_is_redirected_only_when_marked(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(41005);
        let leg = handshake(&f, c, nat);
        // The client's packet arriving on fx2 (its route to the backend leaves by fx0).
        let data = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
        assert_left_to_tc(&f.run_xdp_on(&data, "fx2"), &data);
        f.rec
            .dataplane_mut()
            .set_xdp_target(ifindex("fx0"))
            .unwrap();
        let x = f.run_xdp_on(&data, "fx2");
        assert_eq!(x.action, XDP_REDIRECT, "{x:?}");
        assert_eq!(x.exits(), [Reason::XdpRedirect.name()], "{x:?}");
        wire::verify_checksums(&x.out).unwrap();
        let t = f.run_on(&data, "fx2");
        assert_eq!(t.exits(), [Reason::FwdRedirect.name()], "{t:?}");
        assert_eq!(x.out, t.out);
        assert_eq!(wire::parse(&x.out).dst, leg.backend);
    });
}

#[test]
fn what_the_fast_path_does_not_handle_is_left_to_tc() {
    in_fixture_netns(|| {
        let mut f = standard();
        // A new flow's SYN and a mid-stream packet of no flow.
        let syn = Ipv4Packet::tcp(client(42000), sa(VIP, 80), TCP_SYN).build();
        assert_left_to_tc(&f.run_xdp(&syn), &syn);
        let ack = Ipv4Packet::tcp(client(42001), sa(VIP, 80), TCP_ACK).build();
        assert_left_to_tc(&f.run_xdp(&ack), &ack);
        // A flow still unconfirmed (its pair in CT_NEW): the client's ACK confirms it in TC.
        assert_dnat(&f.run(&syn), &syn, &web_backends());
        let key = flow_key(client(42000), sa(VIP, 80), IPPROTO_TCP);
        assert!(f.dp().conntrack_unconfirmed(&key));
        let ack = Ipv4Packet::tcp(client(42000), sa(VIP, 80), TCP_ACK).build();
        assert_left_to_tc(&f.run_xdp(&ack), &ack);
        // Not a service.
        let ssh = Ipv4Packet::tcp(client(42002), sa(HOST, 22), TCP_ACK).build();
        assert_left_to_tc(&f.run_xdp(&ssh), &ssh);
        // IPv6, ARP.
        let v6 = wire::ipv6_tcp(80);
        assert_left_to_tc(&f.run_xdp(&v6), &v6);
        let arp = wire::arp_request(CLIENT, HOST);
        assert_left_to_tc(&f.run_xdp(&arp), &arp);
        // A fragment and a header with options, of an established UDP flow.
        let service = sa(HOST, 5353);
        let req = Ipv4Packet::udp(client(50005), service, b"query").build();
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let leg = assert_fwd(&f.run(&req), &req, &dns, Nat::Dnat);
        f.run(&from_backend(Ipv4Packet::udp(
            leg.backend,
            leg.peer,
            b"answer",
        )));
        assert_eq!(f.run_xdp(&req).action, XDP_TX);
        let mut frag = Ipv4Packet::udp(client(50005), service, b"query");
        frag.frag = 0x2000;
        let frag = frag.build();
        assert_left_to_tc(&f.run_xdp(&frag), &frag);
        let mut opts = Ipv4Packet::udp(client(50005), service, b"query");
        opts.options = vec![1, 1, 1, 1];
        let opts = opts.build();
        assert_left_to_tc(&f.run_xdp(&opts), &opts);
        // Truncated and malformed frames: TC judges them (and drops what is malformed).
        let mut short = req.clone();
        short.truncate(40);
        assert_left_to_tc(&f.run_xdp(&short), &short);
        let mut bad_len = req.clone();
        bad_len[16] = 0x10; // total length past the frame
        assert_left_to_tc(&f.run_xdp(&bad_len), &bad_len);
        let mut bad_udp = req.clone();
        bad_udp[38] = 0x40; // UDP length past the datagram
        assert_left_to_tc(&f.run_xdp(&bad_udp), &bad_udp);
    });
}

#[test]
fn without_redirect_everything_is_left_to_tc() {
    in_fixture_netns(|| {
        let mut o = options();
        o.redirect = false;
        let mut f = Fixture::new(o, standard().services.clone());
        let req = Ipv4Packet::udp(client(50006), sa(HOST, 5353), b"query").build();
        let run = f.run(&req);
        assert_eq!(run.exits(), [Reason::PassTranslatedToStack.name()]);
        assert_left_to_tc(&f.run_xdp(&req), &req);
    });
}

/// Frames of an established flow with random header bytes changed: the XDP program either
/// leaves a frame to TC untouched or sends it with `XDP_TX` at its length, never anything else,
/// a frame whose checksums were right goes out with right checksums, and the flow's entries
/// change in nothing but the backend's acknowledgment.
#[test]
fn mangled_headers_never_crash_or_corrupt() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(43000);
        let leg = handshake(&f, c, Nat::Dnat);
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        let (fwd, rev) = (f.ct(&fkey).unwrap(), f.ct(&rkey).unwrap());
        let base = [
            tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build(),
            from_backend(tcp(leg.backend, leg.peer, TCP_ACK, 5001, 1019)),
        ];
        let (sent, passed) = mangle_through_xdp(&mut f, &base, 54, wire::verify_checksums);
        println!("3000 mangled frames: {sent} sent, {passed} left to TC");
        assert!(sent > 0 && passed > 0);
        assert_eq!(f.ct(&fkey).unwrap(), fwd);
        let mut now = f.ct(&rkey).unwrap();
        now.backend_ack = rev.backend_ack;
        now.flags = rev.flags;
        assert_eq!(now, rev);
    });
}
