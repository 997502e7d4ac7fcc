//! IPv6 packet fixtures: each case loads a fresh dataplane, installs IPv6 services beside any
//! IPv4 ones, runs the TC program on a frame with BPF_PROG_TEST_RUN, and checks the action, the
//! output frame (addresses, ports, hop limit, MACs, extension headers, payload, and the L4 or
//! ICMPv6 checksum recomputed from scratch over the pseudo-header), the exit counter and the
//! conntrack state.

use std::net::{Ipv6Addr, SocketAddrV6};

use berth_tests::{
    fixture::*,
    fixture6::*,
    wire::{self, Ipv4Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN},
    wire6::{self, Ext, IPPROTO_DSTOPTS, IPPROTO_HOPOPTS, Ipv6Packet},
};
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, Reason, ct, port_to_wire,
    v6::{FlowKey6, ipv6_from_wire, ipv6_to_wire},
};
use lb_userspace::config::{Nat, Protocol};

fn b6(n: u8) -> SocketAddrV6 {
    sa6(backend6(n), 8000)
}

fn web6() -> Vec<SocketAddrV6> {
    vec![b6(1), b6(2), b6(3)]
}

/// A TCP service on the IPv6 VIP (id 0, backends 1-3 on :8000 with ids 1..=3), one on any
/// local IPv6 address :8080 (id 1, the same backends), and a UDP one on [::]:5353 (id 2,
/// backends 4 and 5 on :53 with ids 4 and 5).
fn standard6() -> Vec<Svc6> {
    let web: Vec<(SocketAddrV6, u32)> = web6().into_iter().map(|b| (b, 1)).collect();
    vec![
        Svc6 {
            id: 0,
            listen: sa6(VIP6, 80),
            proto: IPPROTO_TCP,
            backends: web.clone(),
            first_backend_id: 1,
            snat: None,
        },
        Svc6 {
            id: 1,
            listen: sa6(Ipv6Addr::UNSPECIFIED, 8080),
            proto: IPPROTO_TCP,
            backends: web,
            first_backend_id: 1,
            snat: None,
        },
        Svc6 {
            id: 2,
            listen: sa6(Ipv6Addr::UNSPECIFIED, 5353),
            proto: IPPROTO_UDP,
            backends: vec![(sa6(backend6(4), 53), 1), (sa6(backend6(5), 53), 1)],
            first_backend_id: 4,
            snat: None,
        },
    ]
}

fn standard() -> Fixture {
    fixture6(Vec::new(), &standard6())
}

fn syn(port: u16, to: SocketAddrV6) -> Vec<u8> {
    Ipv6Packet::tcp(client6(port), to, TCP_SYN).build()
}

/// Checks a forward translation: destination one of `backends`, source kept.
fn assert_fwd6(run: &Run, input: &[u8], backends: &[SocketAddrV6]) -> SocketAddrV6 {
    let o = wire6::parse6(&run.out);
    let dst = o.dst;
    assert!(
        backends.contains(&dst),
        "dst {dst} not a backend {backends:?}"
    );
    let o = assert_redirected6(run, input, Reason::FwdRedirect, backend6_mac(*dst.ip()));
    assert_eq!(o.src, wire6::parse6(input).src, "source kept");
    dst
}

#[test]
fn tcp_syn_to_vip_is_translated_and_tracked() {
    in_fixture6_netns(|| {
        let f = standard();
        let pkt = syn(40000, sa6(VIP6, 80));
        let run = f.run(&pkt);
        let be = assert_fwd6(&run, &pkt, &web6());
        let fkey = flow_key6(client6(40000), sa6(VIP6, 80), IPPROTO_TCP);
        let fwd = ct6(&f, &fkey).expect("forward entry");
        assert_eq!(fwd.ct.dir, ct::DIR_FORWARD);
        assert_eq!(fwd.ct.state, ct::STATE_OPEN);
        assert_eq!(ipv6_from_wire(fwd.nat_addr), be.ip().octets());
        assert_eq!(fwd.ct.nat_port, port_to_wire(8000));
        assert!(
            f.dp().conntrack6_unconfirmed(&fkey),
            "a SYN starts unconfirmed"
        );
        let rev = ct6(&f, &flow_key6(be, client6(40000), IPPROTO_TCP)).expect("reply entry");
        assert_eq!(rev.ct.dir, ct::DIR_REPLY);
        assert_eq!(ipv6_from_wire(rev.nat_addr), VIP6.octets());
        assert_eq!(rev.ct.nat_port, port_to_wire(80));
        assert_ne!(rev.ct.in_ifindex, 0, "the backend's interface is known");
        let sc = f.dp().service_counters(0).unwrap();
        assert_eq!(
            (sc.packets, sc.new_flows, sc.bytes),
            (1, 1, pkt.len() as u64)
        );
        let bc = f.dp().backend_counters(fwd.ct.backend_id).unwrap();
        assert_eq!((bc.packets, bc.new_flows), (1, 1));
    });
}

#[test]
fn a_flow_stays_on_its_backend_and_is_confirmed() {
    in_fixture6_netns(|| {
        let f = standard();
        let first = syn(40001, sa6(VIP6, 80));
        let be = assert_fwd6(&f.run(&first), &first, &web6());
        // The retransmitted SYN and the data after it go to the same backend.
        assert_eq!(assert_fwd6(&f.run(&first), &first, &web6()), be);
        let data = Ipv6Packet::tcp(client6(40001), sa6(VIP6, 80), TCP_ACK | TCP_PSH)
            .with_payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        // An ACK before any SYN-ACK (a blind spoofer's) goes through but confirms nothing.
        assert_eq!(assert_fwd6(&f.run(&data), &data, &web6()), be);
        let fkey = flow_key6(client6(40001), sa6(VIP6, 80), IPPROTO_TCP);
        assert!(f.dp().conntrack6_unconfirmed(&fkey));
        // The backend's SYN-ACK (the default sequence number, 1000), then the client's ACK of
        // it: confirmed.
        let synack = Ipv6Packet::tcp(be, client6(40001), TCP_SYN | TCP_ACK).build();
        f.run(&synack);
        let mut ack = Ipv6Packet::tcp(client6(40001), sa6(VIP6, 80), TCP_ACK);
        if let wire::L4::Tcp { ack: a, .. } = &mut ack.l4 {
            *a = 1001;
        }
        let ack = ack.build();
        assert_eq!(assert_fwd6(&f.run(&ack), &ack, &web6()), be);
        assert!(
            !f.dp().conntrack6_unconfirmed(&fkey),
            "confirmed by the client's ACK of the SYN-ACK"
        );
        assert!(ct6(&f, &flow_key6(be, client6(40001), IPPROTO_TCP)).is_some());
        // Many clients spread over all three backends.
        let mut seen = std::collections::BTreeSet::new();
        for port in 41000..41060 {
            let p = syn(port, sa6(VIP6, 80));
            seen.insert(assert_fwd6(&f.run(&p), &p, &web6()));
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    });
}

#[test]
fn replies_are_translated_back_and_close_the_flow() {
    in_fixture6_netns(|| {
        let f = standard();
        let s = syn(40002, sa6(VIP6, 80));
        let be = assert_fwd6(&f.run(&s), &s, &web6());
        let synack = Ipv6Packet::tcp(be, client6(40002), TCP_SYN | TCP_ACK)
            .with_payload(b"hello")
            .build();
        let run = f.run(&synack);
        let o = assert_redirected6(&run, &synack, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(o.src, sa6(VIP6, 80), "source back to the service");
        assert_eq!(o.dst, client6(40002));
        // The backend's FIN closes both halves.
        let fin = Ipv6Packet::tcp(be, client6(40002), TCP_FIN | TCP_ACK).build();
        let run = f.run(&fin);
        assert_redirected6(&run, &fin, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(run.counted(Reason::EventCtClosing), 1);
        let fwd = ct6(&f, &flow_key6(client6(40002), sa6(VIP6, 80), IPPROTO_TCP)).unwrap();
        assert_eq!(fwd.ct.state, ct::STATE_CLOSING);
        // A reply from the backend's address arriving on the other uplink is not translated.
        let forged = Ipv6Packet::tcp(be, client6(40002), TCP_ACK).build();
        assert_untouched(
            &f.run_on(&forged, "fx2"),
            &forged,
            Reason::PassReplyWrongIface,
        );
    });
}

#[test]
fn udp_to_any_local_address_and_back() {
    in_fixture6_netns(|| {
        let f = standard();
        let backends = [sa6(backend6(4), 53), sa6(backend6(5), 53)];
        let q = Ipv6Packet::udp(client6(5000), sa6(HOST6, 5353), b"query").build();
        let be = assert_fwd6(&f.run(&q), &q, &backends);
        let a = Ipv6Packet::udp(be, client6(5000), b"answer").build();
        let o = assert_redirected6(&f.run(&a), &a, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(o.src, sa6(HOST6, 5353));
        // Another address on the client's subnet is not this host's: not ours.
        let other = Ipv6Packet::udp(
            client6(5001),
            sa6("fd00:10::77".parse().unwrap(), 5353),
            b"q",
        )
        .build();
        assert_untouched(&f.run(&other), &other, Reason::PassNoService);
        // TCP to the UDP service's port is not the service either.
        let tcp = syn(5002, sa6(HOST6, 5353));
        assert_untouched(&f.run(&tcp), &tcp, Reason::PassNoService);
    });
}

#[test]
fn extension_headers_are_walked_and_kept() {
    in_fixture6_netns(|| {
        let f = standard();
        let pkt = Ipv6Packet::tcp(client6(40010), sa6(VIP6, 80), TCP_SYN)
            .with_ext(vec![
                Ext::options(IPPROTO_HOPOPTS, 6),
                Ext::routing(0),
                Ext::fragment(0, false),
                Ext::options(IPPROTO_DSTOPTS, 14),
            ])
            .build();
        let run = f.run(&pkt);
        assert_fwd6(&run, &pkt, &web6());
        assert_eq!(run.counted(Reason::EventIpOptions), 1);
        // UDP behind a destination-options header too.
        let q = Ipv6Packet::udp(client6(5010), sa6(HOST6, 5353), b"q")
            .with_ext(vec![Ext::options(IPPROTO_DSTOPTS, 6)])
            .build();
        assert_fwd6(
            &f.run(&q),
            &q,
            &[sa6(backend6(4), 53), sa6(backend6(5), 53)],
        );
    });
}

#[test]
fn headers_past_the_walk_pass_or_drop_as_documented() {
    in_fixture6_netns(|| {
        let f = standard();
        let base = Ipv6Packet::tcp(client6(40020), sa6(VIP6, 80), TCP_SYN);
        // Fragments: the first (more fragments) and a later one.
        for frag in [Ext::fragment(0, true), Ext::fragment(185, false)] {
            let p = base.clone().with_ext(vec![frag]).build();
            assert_untouched(&f.run(&p), &p, Reason::PassFragment);
        }
        // A routing header with segments left: this host is a waypoint.
        let p = base.clone().with_ext(vec![Ext::routing(2)]).build();
        assert_untouched(&f.run(&p), &p, Reason::PassIpv6);
        // More extension headers than the walk takes.
        let five = vec![Ext::options(IPPROTO_DSTOPTS, 6); 5];
        let p = base.clone().with_ext(five).build();
        assert_untouched(&f.run(&p), &p, Reason::PassIpv6);
        // The L4 header beyond the byte bound (one 248-byte destination-options header).
        let p = base
            .clone()
            .with_ext(vec![Ext::options(IPPROTO_DSTOPTS, 246)])
            .build();
        assert_untouched(&f.run(&p), &p, Reason::PassIpv6);
        // Hop-by-hop options anywhere but first: malformed.
        let p = base
            .clone()
            .with_ext(vec![
                Ext::options(IPPROTO_DSTOPTS, 6),
                Ext::options(IPPROTO_HOPOPTS, 6),
            ])
            .build();
        assert_dropped(&f.run(&p), Reason::DropIpMalformed);
        // A jumbogram's zero payload length.
        let mut p = base.clone().build();
        p[18..20].copy_from_slice(&[0, 0]);
        assert_untouched(&f.run(&p), &p, Reason::PassIpv6);
        assert!(
            f.dp().conntrack6_entries().is_empty(),
            "no state from any of them"
        );
    });
}

#[test]
fn truncation_at_every_offset() {
    in_fixture6_netns(|| {
        let f = standard();
        let full = Ipv6Packet::tcp(client6(40030), sa6(VIP6, 80), TCP_SYN)
            .with_ext(vec![
                Ext::options(IPPROTO_HOPOPTS, 6),
                Ext::options(IPPROTO_DSTOPTS, 14),
            ])
            .with_payload(b"data")
            .build();
        // Ethernet + IPv6 + 8 + 16 bytes of extension headers, then TCP's 20.
        let (ip_end, l4, tcp_end) = (54, 78, 98);
        let mut refused = 0;
        for cut in 0..full.len() {
            let cut_frame = full[..cut].to_vec();
            // The same, with the payload length made to fit the cut (so the walk and the L4
            // checks meet it rather than the length check).
            let mut fitted = cut_frame.clone();
            if cut >= 20 {
                let plen = cut.saturating_sub(ip_end) as u16;
                fitted[18..20].copy_from_slice(&plen.to_be_bytes());
            }
            for (p, is_fitted) in [(cut_frame, false), (fitted, true)] {
                let Some(run) = try_run(&f, &p) else {
                    assert!(cut < ip_end, "cut at {cut}: refused by the kernel");
                    refused += 1;
                    continue;
                };
                let want = match (is_fitted, cut) {
                    (_, c) if c < ip_end => Reason::DropIpMalformed,
                    (false, _) => Reason::DropIpMalformed,
                    (true, c) if c == ip_end => Reason::PassIpv6,
                    (true, c) if c < l4 => Reason::DropIpMalformed,
                    (true, c) if c < tcp_end => Reason::DropL4Malformed,
                    // Every header whole: a SYN whose payload was cut, translated.
                    (true, _) => Reason::FwdRedirect,
                };
                assert_eq!(
                    run.exits(),
                    [want.name()],
                    "cut at {cut}, fitted {is_fitted}"
                );
                if run.action == TC_ACT_OK {
                    assert_eq!(run.out, p, "cut at {cut}: passed packets are untouched");
                }
            }
        }
        println!("{refused} frames shorter than Ethernet + IPv6 refused by the kernel");
        // Only the flow of the whole-header SYNs has state.
        let entries = f.dp().conntrack6_entries();
        assert_eq!(entries.len(), 2, "{entries:?}");
    });
}

#[test]
fn packet_too_big_about_a_reply_goes_to_the_backend() {
    in_fixture6_netns(|| {
        let f = standard();
        let s = syn(40040, sa6(VIP6, 80));
        let be = assert_fwd6(&f.run(&s), &s, &web6());
        // The reply as berth sent it (service -> client), too big for a router on the way.
        let reply = Ipv6Packet::tcp(sa6(VIP6, 80), client6(40040), TCP_ACK)
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
        assert_eq!(*o.src.ip(), ROUTER6, "the router's address is kept");
        assert_eq!(*o.dst.ip(), *be.ip(), "to the backend");
        assert_eq!(o.dst_mac, backend6_mac(*be.ip()));
        let q = wire6::quoted(&run.out);
        let mut want = Ipv6Packet::tcp(be, client6(40040), TCP_ACK)
            .with_payload(&[7u8; 200])
            .ip();
        // The quote is the reply as the backend sent it.
        assert_eq!(q, &want[..]);
        assert_eq!(&run.out[58..62], &1280u32.to_be_bytes(), "MTU kept");
        // The same error about a flow berth does not know passes untouched.
        want = Ipv6Packet::tcp(sa6(VIP6, 80), client6(49999), TCP_ACK).ip();
        let stray = wire6::icmp6_error(ROUTER6, VIP6, wire6::ICMP6_PACKET_TOO_BIG, 0, 1280, &want);
        assert_untouched(&f.run(&stray), &stray, Reason::PassNotTcpUdp);
    });
}

#[test]
fn port_unreachable_from_a_backend_reaches_the_client_as_the_service() {
    in_fixture6_netns(|| {
        let f = standard();
        let backends = [sa6(backend6(4), 53), sa6(backend6(5), 53)];
        let q = Ipv6Packet::udp(client6(5020), sa6(HOST6, 5353), b"query").build();
        let be = assert_fwd6(&f.run(&q), &q, &backends);
        // What the backend got (client -> backend), quoted back whole by its stack.
        let got = Ipv6Packet::udp(client6(5020), be, b"query").ip();
        let err = wire6::icmp6_error(
            *be.ip(),
            CLIENT6,
            wire6::ICMP6_DST_UNREACH,
            wire6::ICMP6_PORT_UNREACH,
            0,
            &got,
        );
        let run = f.run(&err);
        assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
        wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("ICMPv6: {e}"));
        wire6::verify_quoted_checksum(&run.out).unwrap_or_else(|e| panic!("quoted: {e}"));
        let o = wire6::parse6(&run.out);
        assert_eq!(*o.src.ip(), HOST6, "from the service address");
        assert_eq!(*o.dst.ip(), CLIENT6);
        assert_eq!(
            wire6::quoted(&run.out),
            &Ipv6Packet::udp(client6(5020), sa6(HOST6, 5353), b"query").ip()[..],
            "quoting client -> service"
        );
        // From the wrong side: untouched.
        assert_untouched(&f.run_on(&err, "fx2"), &err, Reason::PassReplyWrongIface);
    });
}

#[test]
fn ndp_and_other_icmpv6_pass_untouched() {
    in_fixture6_netns(|| {
        let f = standard();
        let ns = wire6::neighbor_solicitation(CLIENT6, HOST6);
        assert_untouched(&f.run(&ns), &ns, Reason::PassNotTcpUdp);
        let ns = wire6::neighbor_solicitation(CLIENT6, VIP6);
        assert_untouched(&f.run(&ns), &ns, Reason::PassNotTcpUdp);
        // An echo request to the VIP (type 128, quoting nothing).
        let mut echo = wire6::icmp6_error(CLIENT6, VIP6, 128, 0, 0x0001_0001, b"ping");
        let l = echo.len();
        echo[l - 4..].copy_from_slice(b"pong");
        let run = f.run(&echo);
        assert_untouched(&run, &echo, Reason::PassNotTcpUdp);
    });
}

#[test]
fn hop_limit_one_is_left_to_the_stack_untranslated() {
    in_fixture6_netns(|| {
        let f = standard();
        let mut p = Ipv6Packet::tcp(client6(40050), sa6(VIP6, 80), TCP_SYN);
        p.hop_limit = 1;
        let p = p.build();
        assert_untouched(&f.run(&p), &p, Reason::PassTtlExpired);
        assert!(f.dp().conntrack6_entries().is_empty());
    });
}

/// A confirmed IPv6 DNAT flow from client port `port` to the VIP (fixture6's `handshake6`),
/// both halves in the main map. Returns its backend, its forward and reply keys.
fn confirmed6(f: &Fixture, port: u16) -> (SocketAddrV6, FlowKey6, FlowKey6) {
    let c = client6(port);
    let be = handshake6(f, c, &web6(), Nat::Dnat).backend;
    let (fkey, rkey) = (
        flow_key6(c, sa6(VIP6, 80), IPPROTO_TCP),
        flow_key6(be, c, IPPROTO_TCP),
    );
    assert!(f.dp().conntrack6_main_get(&fkey).is_some(), "confirmed");
    assert!(f.dp().conntrack6_main_get(&rkey).is_some(), "confirmed");
    (be, fkey, rkey)
}

/// Reinstalls the VIP service (id 0) with backend `gone` at weight 0: its slot stays
/// (draining), only the Maglev row changes, and the table epoch moves.
fn drain6(f: &mut Fixture, gone: SocketAddrV6) {
    let s0 = Svc6 {
        backends: web6()
            .into_iter()
            .map(|b| (b, u32::from(b != gone)))
            .collect(),
        ..standard6().remove(0)
    };
    install(f, &s0);
}

/// The backend's next data segment of a flow from `port` after `handshake6`.
fn push6(be: SocketAddrV6, port: u16) -> Vec<u8> {
    Ipv6Packet::tcp_seq(be, client6(port), TCP_ACK | TCP_PSH, 5001, 1001, b"tick").build()
}

/// A DNAT flow picked while the tables stand still carries their epoch in both halves
/// (lb-common's `epoch`), and its replies skip the forward half: one whose forward half was
/// evicted is translated without rebuilding it, until the flow's once-a-second refresh, which
/// looks it up and rebuilds it. Full NAT is never stamped in IPv6.
#[test]
fn an_ipv6_reply_of_the_current_epoch_skips_the_forward_half_until_its_refresh() {
    in_fixture6_netns(|| {
        let mut f = standard();
        let epoch = f.dp().epoch().unwrap();
        assert_ne!(epoch, 0, "the fixture's tables are settled");
        let (be, fkey, rkey) = confirmed6(&f, 40021);
        for k in [&fkey, &rkey] {
            assert_eq!(ct6(&f, k).map(|e| e.ct.epoch), Some(epoch), "stamped");
        }
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        let push = push6(be, 40021);
        let run = f.run(&push);
        let o = assert_redirected6(&run, &push, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(o.src, sa6(VIP6, 80));
        assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
        assert!(ct6(&f, &fkey).is_none(), "the forward half not looked up");
        // The refresh is due: the forward half is rebuilt, stamped as the reply half is.
        let mut r = ct6(&f, &rkey).expect("reply half");
        r.ct.last_seen_ns = lb_userspace::dataplane::monotonic_ns() - 2_000_000_000;
        f.rec.dataplane_mut().conntrack6_insert(rkey, r).unwrap();
        let run = f.run(&push);
        assert_redirected6(&run, &push, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let fwd = ct6(&f, &fkey).expect("forward half rebuilt");
        assert_eq!(fwd.ct.dir, ct::DIR_FORWARD);
        assert_eq!(fwd.nat_addr, ipv6_to_wire(be.ip().octets()));
    });
}

/// The tables' change ends the skipping: a DNAT flow whose forward half was evicted before
/// its backend left the service is rebuilt by the backend's next packet, so the client's next
/// one still reaches that backend.
#[test]
fn after_a_backend_change_an_ipv6_reply_rebuilds_an_evicted_forward_half() {
    in_fixture6_netns(|| {
        let mut f = standard();
        let epoch = f.dp().epoch().unwrap();
        let (be, fkey, _) = confirmed6(&f, 40022);
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        drain6(&mut f, be);
        assert!(f.dp().epoch().unwrap() > epoch, "a change moves the epoch");
        let push = push6(be, 40022);
        let run = f.run(&push);
        assert_redirected6(&run, &push, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let ack = Ipv6Packet::tcp(client6(40022), sa6(VIP6, 80), TCP_ACK).build();
        assert_eq!(assert_fwd6(&f.run(&ack), &ack, &web6()), be, "pinned");
    });
}

/// The leftover the forward lookup is for: a flow's forward half evicted, the backend set
/// changed, and the client's next connection on the tuple picked another backend. The old
/// backend's reply entry carries the epoch of before the change, so its next packet looks the
/// forward half up, finds the new flow, and is not translated (the entry goes). Were the
/// change not to move the epoch, it would reach the client as the service.
#[test]
fn an_ipv6_reply_entry_from_before_a_backend_change_is_a_leftover_once_its_client_moved_on() {
    in_fixture6_netns(|| {
        let mut f = standard();
        let (be, fkey, rkey) = confirmed6(&f, 40023);
        drain6(&mut f, be);
        // Evicted; the client connects again from the same port: another backend.
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        let s = syn(40023, sa6(VIP6, 80));
        let other = assert_fwd6(&f.run(&s), &s, &web6());
        assert_ne!(other, be);
        let stale = push6(be, 40023);
        assert_untouched(&f.run(&stale), &stale, Reason::PassNoService);
        assert!(ct6(&f, &rkey).is_none(), "{:?}", ct6(&f, &rkey));
    });
}

/// A leftover that finds no forward half to be checked against (IPv4's
/// `an_older_flows_reply_entry_never_takes_its_tuple_back_from_a_newer_flow`): a flow's forward
/// half evicted, the backend set changed, the client's next connection on the tuple picked
/// another backend (stamped with the new epoch), and its forward half evicted too. Rebuilt from
/// the old entry, the tuple's forward half would send the client to the old backend while the
/// new flow's replies, which skip the forward lookup, still reached the client: the old
/// segment is not translated, nothing is rebuilt, and the new backend's replies go on.
#[test]
fn an_older_ipv6_flows_reply_entry_never_takes_its_tuple_back_from_a_newer_flow() {
    in_fixture6_netns(|| {
        let mut f = standard();
        let (be, fkey, old_rkey) = confirmed6(&f, 40024);
        drain6(&mut f, be);
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        // The client's next connection on the tuple: another backend, confirmed, stamped.
        let (other, _, new_rkey) = confirmed6(&f, 40024);
        assert_ne!(other, be);
        let epoch = f.dp().epoch().unwrap();
        assert_eq!(ct6(&f, &new_rkey).map(|e| e.ct.epoch), Some(epoch));
        // Its forward half is evicted too.
        f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
        let stale = push6(be, 40024);
        let run = f.run(&stale);
        assert_untouched(&run, &stale, Reason::PassNoService);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
        assert!(ct6(&f, &old_rkey).is_none(), "{:?}", ct6(&f, &old_rkey));
        assert!(ct6(&f, &fkey).is_none(), "the tuple not taken back");
        // The new backend's segment still reaches the client.
        let push = push6(other, 40024);
        let run = f.run(&push);
        let o = assert_redirected6(&run, &push, Reason::ReplyRedirect, CLIENT_MAC);
        assert_eq!(o.src, sa6(VIP6, 80));
    });
}

#[test]
fn a_removed_backend_keeps_its_flows_and_gets_no_new_ones() {
    in_fixture6_netns(|| {
        let mut f = standard();
        // Flows to every backend.
        let mut flows = Vec::new();
        for port in 42000..42030 {
            let p = syn(port, sa6(VIP6, 80));
            flows.push((port, assert_fwd6(&f.run(&p), &p, &web6())));
        }
        let (_, gone) = flows[0];
        // The service with it at weight 0: its slot stays (draining), only the row changes.
        let left: Vec<SocketAddrV6> = web6().into_iter().filter(|b| *b != gone).collect();
        drain6(&mut f, gone);
        for (port, be) in &flows {
            let p = Ipv6Packet::tcp(client6(*port), sa6(VIP6, 80), TCP_ACK).build();
            assert_eq!(
                assert_fwd6(&f.run(&p), &p, &web6()),
                *be,
                "flow {port} pinned"
            );
        }
        for port in 43000..43040 {
            let p = syn(port, sa6(VIP6, 80));
            assert_ne!(assert_fwd6(&f.run(&p), &p, &left), gone);
        }
    });
}

#[test]
fn a_service_without_backends_refuses_like_a_host() {
    in_fixture6_netns(|| {
        let empty = |proto, port| Svc6 {
            id: if proto == IPPROTO_TCP { 0 } else { 1 },
            listen: sa6(VIP6, port),
            proto,
            backends: Vec::new(),
            first_backend_id: 1,
            snat: None,
        };
        let svcs = [empty(IPPROTO_TCP, 80), empty(IPPROTO_UDP, 53)];
        let f = fixture6(Vec::new(), &svcs);
        let mut p = Ipv6Packet::tcp(client6(40060), sa6(VIP6, 80), TCP_SYN);
        p.l4 = wire::L4::Tcp {
            flags: TCP_SYN,
            seq: 0x1234_5678,
            ack: 0,
            payload: Vec::new(),
        };
        let syn = p.build();
        let run = f.run(&syn);
        assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
        assert_eq!(run.exits(), [Reason::RejectNoBackend.name()]);
        assert_eq!(run.out.len(), 14 + 40 + 20);
        wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("RST: {e}"));
        let o = wire6::parse6(&run.out);
        assert_eq!((o.src, o.dst), (sa6(VIP6, 80), client6(40060)));
        assert_eq!(o.tcp_flags, wire::TCP_RST | TCP_ACK);
        assert_eq!(o.hop_limit, 64);
        assert_eq!(
            (o.dst_mac, o.src_mac),
            (wire6::parse6(&syn).src_mac, wire6::parse6(&syn).dst_mac)
        );
        let tcp = &run.out[54..74];
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0, "seq");
        assert_eq!(
            u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
            0x1234_5679,
            "ack of the SYN"
        );
        // A segment with payload: dropped.
        let data = Ipv6Packet::tcp(client6(40061), sa6(VIP6, 80), TCP_ACK)
            .with_payload(b"x")
            .build();
        assert_dropped(&f.run(&data), Reason::DropNoBackend);
        // A datagram: an ICMPv6 port unreachable from the service, quoting its headers.
        let udp = Ipv6Packet::udp(client6(40062), sa6(VIP6, 53), &[9u8; 300]).build();
        let run = f.run(&udp);
        assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
        assert_eq!(run.exits(), [Reason::RejectNoBackend.name()]);
        assert_eq!(run.out.len(), 14 + 40 + 8 + 40 + 8);
        wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("ICMPv6: {e}"));
        let o = wire6::parse6(&run.out);
        assert_eq!((*o.src.ip(), *o.dst.ip()), (VIP6, CLIENT6));
        assert_eq!(o.proto, wire6::IPPROTO_ICMPV6);
        assert_eq!(o.hop_limit, 64);
        assert_eq!(
            &run.out[54..56],
            &[1, 4],
            "destination unreachable, port unreachable"
        );
        assert_eq!(
            wire6::quoted(&run.out),
            &udp[14..14 + 48],
            "the datagram's headers"
        );
        assert!(f.dp().conntrack6_entries().is_empty());
        // Configured to drop: the SYN is dropped too.
        drop(f);
        let mut quiet = Fixture::new(
            lb_userspace::dataplane::DataplaneOptions {
                reject_no_backend: false,
                ..options()
            },
            Vec::new(),
        );
        for s in &svcs {
            install(&mut quiet, s);
        }
        assert_dropped(&quiet.run(&syn), Reason::DropNoBackend);
        assert_dropped(&quiet.run(&udp), Reason::DropNoBackend);
    });
}

#[test]
fn ipv4_and_ipv6_services_side_by_side() {
    in_fixture6_netns(|| {
        // IPv4 services through the reconciler (ids from 0), IPv6 ones installed at ids the
        // reconciler does not use.
        let be4 = [(backend(1), 8000, 1), (backend(2), 8000, 1)];
        let v4 = vec![svc("vip4", "10.99.0.1:80", Protocol::Tcp, &be4)];
        let v6 = Svc6 {
            id: 5,
            listen: sa6(VIP6, 80),
            proto: IPPROTO_TCP,
            backends: web6().into_iter().map(|b| (b, 1)).collect(),
            first_backend_id: 40,
            snat: None,
        };
        let f = fixture6(v4, &[v6]);
        let p4 = Ipv4Packet::tcp(client(40070), sa(VIP, 80), TCP_SYN).build();
        assert_dnat(&f.run(&p4), &p4, &[b8000(1), b8000(2)]);
        let p6 = syn(40070, sa6(VIP6, 80));
        let be = assert_fwd6(&f.run(&p6), &p6, &web6());
        let fwd = ct6(&f, &flow_key6(client6(40070), sa6(VIP6, 80), IPPROTO_TCP)).unwrap();
        assert_eq!(fwd.ct.service_id, 5);
        assert!(
            (40..43).contains(&fwd.ct.backend_id),
            "{}",
            fwd.ct.backend_id
        );
        assert_eq!(ipv6_to_wire(be.ip().octets()), fwd.nat_addr);
        // An IPv6 packet to the IPv4 service's port on an address no IPv6 service has.
        let stray = syn(40071, sa6(HOST6, 80));
        assert_untouched(&f.run(&stray), &stray, Reason::PassNoService);
        // And the legacy IPv6 frame of the IPv4 fixtures: no service, untouched.
        let legacy = wire::ipv6_tcp(8080);
        assert_untouched(&f.run(&legacy), &legacy, Reason::PassNoService);
    });
}

/// The port filter's address bits (lb-common's `service_lookups`) in the IPv6 program, and
/// across the families: an IPv6 port with a service of each kind or each alone, and a port
/// whose IPv4 service is at its own address and IPv6 one at any address. Then the same answers
/// from entries written as a berth before the bits did.
#[test]
fn a_port_asks_only_the_service_lookups_its_services_need() {
    use lb_common::PORT_F_TCP_SERVICE;
    in_fixture6_netns(|| {
        let one = |id: u32, listen: SocketAddrV6, to: SocketAddrV6| Svc6 {
            id,
            listen,
            proto: IPPROTO_TCP,
            backends: vec![(to, 1)],
            first_backend_id: 40 + id,
            snat: None,
        };
        let any = Ipv6Addr::UNSPECIFIED;
        let v4 = vec![svc(
            "own4",
            "10.99.0.1:9090",
            Protocol::Tcp,
            &[(backend(1), 8000, 1)],
        )];
        let v6 = [
            one(3, sa6(VIP6, 8080), b6(1)),
            one(4, sa6(any, 8080), b6(2)),
            one(5, sa6(VIP6, 80), b6(1)),
            one(6, sa6(any, 8081), b6(2)),
            one(7, sa6(any, 9090), b6(3)),
        ];
        let mut f = fixture6(v4, &v6);
        let check = |f: &Fixture, first: u16| {
            for (i, (dst, to)) in [
                (sa6(VIP6, 8080), b6(1)),
                (sa6(HOST6, 8080), b6(2)),
                (sa6(VIP6, 80), b6(1)),
                (sa6(HOST6, 8081), b6(2)),
                (sa6(HOST6, 9090), b6(3)),
            ]
            .into_iter()
            .enumerate()
            {
                let pkt = syn(first + i as u16, dst);
                assert_fwd6(&f.run(&pkt), &pkt, &[to]);
            }
            for (i, dst) in [sa6(HOST6, 80), sa6(VIP6, 8081)].into_iter().enumerate() {
                let pkt = syn(first + 10 + i as u16, dst);
                assert_untouched(&f.run(&pkt), &pkt, Reason::PassNoService);
            }
            // IPv4 on the mixed port: its own-address service, and nothing at a host address
            // (the any-address service there is IPv6's).
            let p4 = Ipv4Packet::tcp(client(first), sa(VIP, 9090), TCP_SYN).build();
            assert_dnat(&f.run(&p4), &p4, &[b8000(1)]);
            let p4 = Ipv4Packet::tcp(client(first + 1), sa(HOST, 9090), TCP_SYN).build();
            assert_untouched(&f.run(&p4), &p4, Reason::PassNoService);
        };
        check(&f, 41000);
        for p in [8080, 80, 8081, 9090] {
            f.rec
                .dataplane_mut()
                .set_port_flags(p, PORT_F_TCP_SERVICE)
                .unwrap();
        }
        check(&f, 42000);
    });
}

/// The IPv6 program's two ways of updating a rewritten packet's L4 checksum write the same
/// bytes: by hand from the skb's `ip_summed`, and through the kernel's helpers (the path of a
/// `CHECKSUM_COMPLETE` skb and of a kernel without the kfunc). DNAT and full NAT, a TCP SYN, a
/// data segment and a UDP datagram, each forward and its answer back.
#[test]
fn checksums_by_hand_and_through_the_helpers_write_the_same_ipv6_packets() {
    use lb_userspace::dataplane::{ChecksumMode, DataplaneOptions};
    in_fixture6_netns(|| {
        let runs = |by_hand: bool, snat: Option<Ipv6Addr>| {
            let o = DataplaneOptions {
                checksums_by_hand: by_hand,
                ..options()
            };
            let services: Vec<Svc6> = standard6()
                .into_iter()
                .map(|s| Svc6 { snat, ..s })
                .collect();
            let f = fixture6_with(o, Vec::new(), &services);
            assert_eq!(
                matches!(f.dp().checksum_mode(), ChecksumMode::ByHand(_)),
                by_hand,
                "{}",
                f.dp().checksum_mode()
            );
            let mut out = Vec::new();
            for pkt in [
                syn(40100, sa6(VIP6, 80)),
                Ipv6Packet::tcp(client6(40100), sa6(VIP6, 80), TCP_ACK)
                    .with_payload(b"GET")
                    .build(),
                Ipv6Packet::udp(client6(5001), sa6(HOST6, 5353), b"query").build(),
            ] {
                let run = f.run(&pkt);
                assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
                wire6::verify_checksums6(&run.out).unwrap_or_else(|e| panic!("{e}"));
                let o = wire6::parse6(&run.out);
                let mut answer = Ipv6Packet::tcp(o.dst, o.src, TCP_ACK).with_payload(b"200");
                if o.proto == IPPROTO_UDP {
                    answer = Ipv6Packet::udp(o.dst, o.src, b"answer");
                }
                answer.src_mac = backend6_mac(*o.dst.ip());
                let back = f.run(&answer.build());
                assert_eq!(back.action, TC_ACT_REDIRECT, "{back:?}");
                wire6::verify_checksums6(&back.out).unwrap_or_else(|e| panic!("{e}"));
                out.push((run.out, back.out));
            }
            out
        };
        for snat in [None, Some(HOST6)] {
            assert_eq!(runs(true, snat), runs(false, snat), "snat {snat:?}");
        }
    });
}
