//! Conntrack integrity under attack and eviction (issue 9): packet fixtures through
//! BPF_PROG_TEST_RUN, each from fresh maps, for the ways a flow's translation could be hijacked,
//! stranded or leaked: a missing half of a flow's entry pair, two services sharing a backend,
//! a closed flow's leftovers, FIN/RST out of the window, replies arriving where their backend
//! does not live, TTL expiry, and ICMP errors quoting a balanced flow.
//!
//! The rules that do not depend on how the backend is reached run twice (`both_nat!`): over
//! DNAT and over full NAT, where the backend's packets go to berth's address and port (the
//! flow's [`Leg::peer`]) rather than to the client.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::TestRun;

use berth_tests::both_nat;
use berth_tests::{
    fixture::*,
    wire::{self, Ipv4Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};
use lb_common::{
    CtEntry, IPPROTO_TCP, IPPROTO_UDP, Reason, ct,
    hash::flow_hash,
    syn::{SynSlot, set_of},
};
use lb_userspace::config::{Nat, Protocol};
use lb_userspace::dataplane::{DataplaneOptions, monotonic_ns};

both_nat!(
    udp_flow_whose_reply_entry_was_evicted_is_repaired_before_its_next_answer,
    tcp_flow_whose_reply_entry_was_evicted_is_repaired_by_its_next_packet,
    tcp_flow_whose_forward_entry_was_evicted_is_repaired_by_the_backends_next_packet,
    rst_or_fin_outside_the_window_keep_a_draining_flow_on_its_backend,
    a_blind_rst_or_fin_after_an_evicted_reply_half_does_not_close_the_flow,
    a_reply_arriving_where_its_backend_does_not_live_is_not_translated,
    a_packet_whose_ttl_would_expire_is_handed_to_the_stack_untranslated,
    fragmentation_needed_from_the_client_side_reaches_the_backend,
    icmp_errors_from_a_backend_reach_the_client_with_the_service_address,
    an_icmp_error_about_a_pending_handshake_reaches_the_client_and_writes_nothing,
);

/// A TCP segment with explicit sequence and acknowledgment numbers.
fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32, ack: u32) -> Ipv4Packet {
    Ipv4Packet::tcp_seq(src, dst, flags, seq, ack, &[])
}

/// A TCP segment of the backend side of flow `leg` (from its backend to its peer).
fn back(leg: Leg, flags: u8, seq: u32, ack: u32) -> Ipv4Packet {
    tcp(leg.backend, leg.peer, flags, seq, ack)
}

/// Checks a reply translation: source rewritten to `service`, sent to `to`, checksums right.
fn assert_reply(run: &Run, service: SocketAddrV4, to: SocketAddrV4) {
    assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
    assert_eq!(run.exits(), [Reason::ReplyRedirect.name()], "{run:?}");
    wire::verify_checksums(&run.out).unwrap_or_else(|e| panic!("rewritten reply: {e}"));
    let o = wire::parse(&run.out);
    assert_eq!(o.src, service, "the client must see the service it used");
    assert_eq!(o.dst, to);
}

/// Two services on one backend: the VIP on :80 and any host address on :8080. Flows to the
/// backend are recorded lazily for one of them only (the first whose flow reaches it); the
/// other's keep their reply entry from their first packet, as a further service's beyond
/// `LAZY_OWNERS` do.
fn shared_backend() -> Fixture {
    shared_backend_with(1)
}

/// [`shared_backend`] with the flows of both services recorded lazily.
fn shared_backend_lazily() -> Fixture {
    shared_backend_with(lb_common::LAZY_OWNERS as u32)
}

fn shared_backend_with(lazy_services: u32) -> Fixture {
    let be = [(backend(1), 8000, 1)];
    Fixture::new(
        DataplaneOptions {
            lazy_services,
            ..options()
        },
        vec![
            svc("vip", "10.99.0.1:80", Protocol::Tcp, &be),
            svc("any", "0.0.0.0:8080", Protocol::Tcp, &be),
        ],
    )
}

/// A completed handshake client -> service (client ISN 1000, backend ISN 5000); returns the
/// backend chosen.
fn handshake(f: &Fixture, c: SocketAddrV4, service: SocketAddrV4) -> SocketAddrV4 {
    handshake_nat(f, c, service, Nat::Dnat).backend
}

/// [`handshake`] over `nat`: returns how the backend sees the flow (the same leg throughout).
fn handshake_nat(f: &Fixture, c: SocketAddrV4, service: SocketAddrV4, nat: Nat) -> Leg {
    let syn = tcp(c, service, TCP_SYN, 1000, 0).build();
    let leg = assert_fwd(&f.run(&syn), &syn, &web_backends(), nat);
    let synack = from_backend(back(leg, TCP_SYN | TCP_ACK, 5000, 1001));
    assert_reply(&f.run(&synack), service, c);
    let ack = tcp(c, service, TCP_ACK, 1001, 5001).build();
    assert_eq!(assert_fwd(&f.run(&ack), &ack, &[leg.backend], nat), leg);
    leg
}

/// Applies the fixture's services without backend `be` (it leaves every service).
fn drop_backend(f: &mut Fixture, be: SocketAddrV4) {
    let mut services = f.services.clone();
    for s in &mut services {
        s.backends.retain(|b| b.addr != be.into());
    }
    f.apply(services);
}

// ---- 1. a flow has both halves of its entry pair or neither ----

fn udp_flow_whose_reply_entry_was_evicted_is_repaired_before_its_next_answer(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let service = sa(HOST, 5353);
        let req = Ipv4Packet::udp(client(50000), service, b"q1").build();
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let leg = assert_fwd(&f.run(&req), &req, &dns, nat);
        // DNAT: the reply entry comes with the first answer (issue 14).
        let answer = from_backend(Ipv4Packet::udp(leg.backend, leg.peer, b"a0"));
        assert_reply(&f.run(&answer), service, client(50000));
        // A flood evicts the reply entry; the client keeps its forward entry fresh.
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_UDP);
        assert!(
            f.ct(&rkey).is_some(),
            "the reply half is keyed backend -> peer"
        );
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let run = f.run(&req);
        assert_eq!(
            assert_fwd(&run, &req, &dns, nat),
            leg,
            "same backend, same peer"
        );
        // Full NAT: rebuilt by the request. DNAT, recorded lazily: the request needs no reply
        // half (one lookup per packet), the answer derives it again.
        let rebuilt = u64::from(nat == Nat::Full);
        assert_eq!(run.counted(Reason::EventCtRebuilt), rebuilt, "{run:?}");
        assert_eq!(f.ct(&rkey).is_some(), nat == Nat::Full, "{run:?}");
        let answer = from_backend(Ipv4Packet::udp(leg.backend, leg.peer, b"a1"));
        assert_reply(&f.run(&answer), service, client(50000));
        assert!(f.ct(&rkey).is_some(), "the reply half is back");
    });
}

/// A DNAT flow recorded lazily (`CtEntry::lazy`) does not look its reply half up with each
/// forward packet, but the once-a-second refresh still stamps both halves: a flow whose client
/// only sends keeps the reply half alive for the backend's next answer.
#[test]
fn a_lazily_recorded_flow_that_only_sends_keeps_its_reply_half_fresh() {
    in_fixture_netns(|| {
        let mut f = standard();
        let service = sa(HOST, 5353);
        let c = client(50002);
        let req = Ipv4Packet::udp(c, service, b"q").build();
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let leg = assert_fwd(&f.run(&req), &req, &dns, Nat::Dnat);
        let answer = from_backend(Ipv4Packet::udp(leg.backend, leg.peer, b"a0"));
        assert_reply(&f.run(&answer), service, c);
        let (fkey, rkey) = (
            flow_key(c, service, IPPROTO_UDP),
            flow_key(leg.backend, leg.peer, IPPROTO_UDP),
        );
        assert_eq!(f.ct(&fkey).expect("forward half").lazy, ct::LAZY_ANSWERED);
        // Both halves last seen 2 s ago (past the refresh interval, within the UDP timeout).
        let then = lb_userspace::dataplane::monotonic_ns() - 2_000_000_000;
        for key in [fkey, rkey] {
            let mut e = f.ct(&key).expect("both halves");
            e.last_seen_ns = then;
            f.rec.dataplane_mut().conntrack_update(key, e).unwrap();
        }
        assert_fwd(&f.run(&req), &req, &[leg.backend], Nat::Dnat);
        let (fwd, rev) = (f.ct(&fkey).unwrap(), f.ct(&rkey).unwrap());
        assert!(fwd.last_seen_ns > then, "the forward half refreshed");
        assert_eq!(
            rev.last_seen_ns, fwd.last_seen_ns,
            "and its reply half with it"
        );
        // Within the second, the forward packets leave the reply half alone.
        assert_fwd(&f.run(&req), &req, &[leg.backend], Nat::Dnat);
        assert_eq!(f.ct(&rkey), Some(rev));
    });
}

fn tcp_flow_whose_reply_entry_was_evicted_is_repaired_by_its_next_packet(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(40010);
        let leg = handshake_nat(&f, c, sa(VIP, 80), nat);
        f.rec
            .dataplane_mut()
            .conntrack_remove(&flow_key(leg.backend, leg.peer, IPPROTO_TCP))
            .unwrap();
        let data = tcp(c, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5001)
            .with_payload(b"GET /")
            .build();
        assert_eq!(assert_fwd(&f.run(&data), &data, &[leg.backend], nat), leg);
        let answer = from_backend(back(leg, TCP_ACK | TCP_PSH, 5001, 1006).with_payload(b"200"));
        assert_reply(&f.run(&answer), sa(VIP, 80), c);
    });
}

/// A flow whose forward half was evicted is repaired from its reply half by the backend's next
/// packet that looks the forward half up: its replies skip the forward lookup while the tables
/// stand still (lb-common's `epoch`; full NAT: a flow at its first port, as this one), so with
/// the flow's once-a-second refresh, or at once after any change of the tables (the next
/// test). (A full-NAT flow at a later port looks it up with every reply: `fullnat.rs`.)
fn tcp_flow_whose_forward_entry_was_evicted_is_repaired_by_the_backends_next_packet(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(40011);
        let leg = handshake_nat(&f, c, sa(VIP, 80), nat);
        let be = leg.backend;
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let rkey = flow_key(be, leg.peer, IPPROTO_TCP);
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        let push = from_backend(back(leg, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"tick"));
        // Translated without the forward lookup: nothing rebuilt yet...
        let run = f.run(&push);
        assert_reply(&run, sa(VIP, 80), c);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
        assert!(f.ct(&fkey).is_none());
        // ...until the flow's refresh is due.
        let mut r = f.ct(&rkey).expect("reply half");
        r.last_seen_ns = monotonic_ns() - 2_000_000_000;
        f.rec.dataplane_mut().conntrack_update(rkey, r).unwrap();
        // The backend pushes data: translated, and the forward half is rebuilt from the reply
        // half.
        let run = f.run(&push);
        assert_reply(&run, sa(VIP, 80), c);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let fwd = f.ct(&fkey).expect("forward half rebuilt");
        assert_eq!(fwd.dir, ct::DIR_FORWARD);
        assert_eq!(fwd.nat_addr, lb_common::ipv4_to_wire(be.ip().octets()));
        assert_eq!(fwd.full_nat(), nat == Nat::Full);
        // So the flow keeps its backend (and its port) even after the backend set changed.
        drop_backend(&mut f, be);
        let ack = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5005).build();
        assert_eq!(assert_fwd(&f.run(&ack), &ack, &web_backends(), nat), leg);
    });
}

/// The tables' change ends every reply's skipping of the forward lookup (lb-common's `epoch`):
/// a DNAT flow whose forward half was evicted before its backend left the service is rebuilt
/// by the backend's next packet, so the client's next one still reaches that backend.
#[test]
fn after_a_backend_change_the_backends_next_packet_rebuilds_an_evicted_forward_half() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(40012);
        let be = handshake(&f, c, sa(VIP, 80));
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let epoch = f.dp().epoch().unwrap();
        assert_ne!(epoch, 0, "the fixture's tables are settled");
        assert_eq!(f.ct(&fkey).map(|e| e.epoch), Some(epoch), "stamped");
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        drop_backend(&mut f, be);
        assert!(f.dp().epoch().unwrap() > epoch, "a change moves the epoch");
        let push = from_backend(tcp(be, c, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"tick"));
        let run = f.run(&push);
        assert_reply(&run, sa(VIP, 80), c);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let ack = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5005).build();
        assert_eq!(assert_dnat(&f.run(&ack), &ack, &web_backends()), be);
    });
}

/// The leftover the forward lookup is for: a flow's forward half evicted, the backend set
/// changed, and the client's next connection on the tuple picked another backend. The old
/// backend's reply entry carries the epoch of before the change, so its next packet looks the
/// forward half up, finds the new flow's handshake, and is not translated (the entry goes).
/// Were the change not to move the epoch, the reply would skip the lookup and reach the client
/// as the service.
#[test]
fn a_reply_entry_from_before_a_backend_change_is_a_leftover_once_its_client_moved_on() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(40013);
        let be = handshake(&f, c, sa(VIP, 80));
        let (fkey, rkey) = (
            flow_key(c, sa(VIP, 80), IPPROTO_TCP),
            flow_key(be, c, IPPROTO_TCP),
        );
        assert!(f.ct(&rkey).is_some(), "the reply half");
        drop_backend(&mut f, be);
        // Evicted; the client connects again from the same port: another backend.
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 90_000, 0).build();
        let other = assert_dnat(&f.run(&syn), &syn, &web_backends());
        assert_ne!(other, be);
        // The old backend's segment: not translated, its entry gone.
        let stale = from_backend(tcp(be, c, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"old"));
        assert_untouched(&f.run(&stale), &stale, Reason::PassNoService);
        assert!(f.ct(&rkey).is_none(), "{:?}", f.ct(&rkey));
    });
}

/// A leftover that finds no forward half to be checked against: a flow's forward half evicted,
/// the backend set changed, the client's next connection on the tuple picked another backend
/// (stamped with the new epoch), and its forward half evicted too. The old backend's segment
/// used to rebuild the tuple's forward half from its old entry, taking the client's tuple back
/// to the old backend while the new flow's replies, which skip the forward lookup, still
/// reached the client. The reply path now finds the newer flow's stamped entry where the
/// tuple's pick leads (`newer_flow_holds`): the old segment is not translated, its entry goes,
/// and the new backend's replies keep reaching the client.
#[test]
fn an_older_flows_reply_entry_never_takes_its_tuple_back_from_a_newer_flow() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(40016);
        let service = sa(VIP, 80);
        let be = handshake(&f, c, service);
        let fkey = flow_key(c, service, IPPROTO_TCP);
        let old_rkey = flow_key(be, c, IPPROTO_TCP);
        drop_backend(&mut f, be);
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        // The client's next connection on the tuple: another backend, stamped.
        let syn = tcp(c, service, TCP_SYN, 90_000, 0).build();
        let other = assert_dnat(&f.run(&syn), &syn, &web_backends());
        assert_ne!(other, be);
        let synack = from_backend(tcp(other, c, TCP_SYN | TCP_ACK, 7000, 90_001));
        assert_reply(&f.run(&synack), service, c);
        let ack = tcp(c, service, TCP_ACK, 90_001, 7001).build();
        assert_eq!(assert_dnat(&f.run(&ack), &ack, &web_backends()), other);
        let new_rkey = flow_key(other, c, IPPROTO_TCP);
        let epoch = f.dp().epoch().unwrap();
        assert_eq!(f.ct(&new_rkey).map(|e| e.epoch), Some(epoch));
        // Its forward half is evicted too.
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        // The old backend's segment: not translated, nothing rebuilt, its entry gone.
        let stale = from_backend(tcp(be, c, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"old"));
        let run = f.run(&stale);
        assert_untouched(&run, &stale, Reason::PassNoService);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
        assert!(f.ct(&old_rkey).is_none(), "{:?}", f.ct(&old_rkey));
        assert!(f.ct(&fkey).is_none(), "the tuple not taken back");
        // The new backend's segment still reaches the client.
        let push =
            from_backend(tcp(other, c, TCP_ACK | TCP_PSH, 7001, 90_001).with_payload(b"new"));
        assert_reply(&f.run(&push), service, c);
    });
}

/// A flow picked while the tables change is never stamped (its replies always look the forward
/// half up); once the change settles, new flows are.
#[test]
fn a_flow_picked_while_the_tables_change_is_not_stamped() {
    in_fixture_netns(|| {
        let mut f = standard();
        let settled = f.dp().epoch().unwrap();
        // A write of the tables (here: a backend slot rewritten as it is) starts a change.
        let slot = f.dp().backend(1).unwrap();
        f.rec.dataplane_mut().set_backend(1, slot).unwrap();
        assert_eq!(f.dp().epoch().unwrap(), 0, "a change is under way");
        let c = client(40014);
        handshake(&f, c, sa(VIP, 80));
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        assert_eq!(f.ct(&fkey).map(|e| e.epoch), Some(0));
        f.rec.dataplane_mut().settle().unwrap();
        let now = f.dp().epoch().unwrap();
        assert!(now > settled, "{now} after {settled}");
        let c = client(40015);
        let be = handshake(&f, c, sa(VIP, 80));
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        assert_eq!(f.ct(&fkey).map(|e| e.epoch), Some(now));
        assert_eq!(
            f.ct(&flow_key(be, c, IPPROTO_TCP)).map(|e| e.epoch),
            Some(now)
        );
    });
}

/// The epoch is trusted only by the program of the load whose daemon wrote it (its instance
/// token beside it, lb-common's `epoch`): once another load's daemon writes it (as the berth
/// replacing this one does, for its own program), this program stamps no new flow and trusts
/// no stamp (a reply whose forward half was evicted rebuilds it at once); written for this
/// load again, it does both.
#[test]
fn a_program_stamps_and_trusts_only_the_epoch_written_for_its_own_load() {
    in_fixture_netns(|| {
        let mut f = standard();
        let service = sa(VIP, 80);
        let c = client(40018);
        let be = handshake(&f, c, service);
        let (fkey, rkey) = (
            flow_key(c, service, IPPROTO_TCP),
            flow_key(be, c, IPPROTO_TCP),
        );
        let epoch = f.dp().epoch().unwrap();
        assert_eq!(f.ct(&rkey).map(|e| e.epoch), Some(epoch), "stamped");
        let own = f.dp().instance();
        let push = from_backend(tcp(be, c, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"tick"));
        // Written for another load's program, then for this one again.
        for (i, (instance, trusted)) in [(own ^ 2, 0), (own, epoch)].into_iter().enumerate() {
            f.rec.dataplane_mut().write_epoch_as(instance).unwrap();
            assert_eq!(f.dp().epoch().unwrap(), trusted, "this load's epoch");
            // A reply whose forward half was evicted looks it up, and rebuilds it, unless its
            // stamp is trusted.
            f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
            let run = f.run(&push);
            assert_reply(&run, service, c);
            let rebuilt = u64::from(trusted == 0);
            assert_eq!(run.counted(Reason::EventCtRebuilt), rebuilt, "{run:?}");
            // A new flow is stamped only with a trusted epoch.
            let next = client(40019 + i as u16);
            handshake(&f, next, service);
            assert_eq!(
                f.ct(&flow_key(next, service, IPPROTO_TCP)).map(|e| e.epoch),
                Some(trusted)
            );
        }
    });
}

// ---- 2. a new flow never overwrites another flow's live entry ----

/// Segments spoofed as `victim` (ACK, SYN, data) to `other`, a second service on the victim's
/// backend `be`, are refused (`drop_flow_conflict`) and leave no entry; the backend's next
/// answer still reaches the victim from `service`, the one it asked.
fn assert_spoofs_refused(
    f: &Fixture,
    victim: SocketAddrV4,
    other: SocketAddrV4,
    be: SocketAddrV4,
    service: SocketAddrV4,
) {
    for flags in [TCP_ACK, TCP_SYN, TCP_ACK | TCP_PSH] {
        let spoof = tcp(victim, other, flags, 77, 88).build();
        assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
    }
    assert!(
        f.ct(&flow_key(victim, other, IPPROTO_TCP)).is_none(),
        "the refused flow leaves no entry"
    );
    let answer = from_backend(tcp(be, victim, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"x"));
    assert_reply(&f.run(&answer), service, victim);
}

#[test]
fn a_spoofed_packet_to_a_second_service_cannot_take_a_live_flows_reply_entry() {
    in_fixture_netns(|| {
        let f = shared_backend();
        let victim = client(40100);
        let be = handshake(&f, victim, sa(VIP, 80));
        // The attacker sends as the victim to the other service on the same backend: the reply
        // key (backend -> victim) is taken by a live flow, so the new flow is refused.
        assert_spoofs_refused(&f, victim, sa(HOST, 8080), be, sa(VIP, 80));
        let more = tcp(victim, sa(VIP, 80), TCP_ACK, 1001, 5002).build();
        assert_eq!(assert_dnat(&f.run(&more), &more, &[be]), be);
    });
}

#[test]
fn a_flow_whose_entries_were_evicted_takes_its_key_back_from_a_spoofer() {
    in_fixture_netns(|| {
        let mut f = shared_backend();
        let victim = client(40110);
        let be = handshake(&f, victim, sa(VIP, 80));
        // A flood evicts both halves of the victim's flow; the spoofer gets in first.
        let dp = f.rec.dataplane_mut();
        dp.conntrack_remove(&flow_key(victim, sa(VIP, 80), IPPROTO_TCP))
            .unwrap();
        dp.conntrack_remove(&flow_key(be, victim, IPPROTO_TCP))
            .unwrap();
        let spoof = tcp(victim, sa(HOST, 8080), TCP_ACK, 77, 88).build();
        assert_eq!(assert_dnat(&f.run(&spoof), &spoof, &[be]), be);
        // The victim's next segment is where its backend expects it: the key is the victim's
        // again (the spoofer's entry had no answer from the backend to hold it with).
        let data = tcp(victim, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5001)
            .with_payload(b"GET /")
            .build();
        assert_eq!(assert_dnat(&f.run(&data), &data, &[be]), be);
        assert!(
            f.ct(&flow_key(victim, sa(HOST, 8080), IPPROTO_TCP))
                .is_none()
        );
        let answer =
            from_backend(tcp(be, victim, TCP_ACK | TCP_PSH, 5001, 1006).with_payload(b"200"));
        assert_reply(&f.run(&answer), sa(VIP, 80), victim);
        // Now answered, the flow keeps its key against the next blind try.
        let spoof = tcp(victim, sa(HOST, 8080), TCP_ACK, 999_999, 88).build();
        assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
        let answer = from_backend(tcp(be, victim, TCP_ACK, 5004, 1006));
        assert_reply(&f.run(&answer), sa(VIP, 80), victim);
    });
}

/// The mirror of the test above: the spoofer's flow is the one recorded lazily (no reply half,
/// so no window to judge the victim's segment against). Unanswered, it proved nothing: the
/// victim's next segment takes the key back, as from a spoofer holding an unanswered reply half.
/// Answered by the backend, it keeps the key, as a flow holding an answered reply half does.
/// For the test below: evicts both halves of `victim`'s flow to the VIP on backend `be` (as a
/// flood would), then sends a spoofed segment with `flags` as the victim to :8080, which must
/// reach `be`. Returns the victim's reply key and the spoofed flow's forward key.
fn evict_and_spoof(
    f: &mut Fixture,
    victim: SocketAddrV4,
    be: SocketAddrV4,
    flags: u8,
) -> (lb_common::FlowKey, lb_common::FlowKey) {
    let (fkey, rkey) = (
        flow_key(victim, sa(VIP, 80), IPPROTO_TCP),
        flow_key(be, victim, IPPROTO_TCP),
    );
    let dp = f.rec.dataplane_mut();
    dp.conntrack_remove(&fkey).unwrap();
    dp.conntrack_remove(&rkey).unwrap();
    let spoof = tcp(victim, sa(HOST, 8080), flags, 77, 88).build();
    assert_eq!(assert_dnat(&f.run(&spoof), &spoof, &[be]), be);
    (rkey, flow_key(victim, sa(HOST, 8080), IPPROTO_TCP))
}

#[test]
fn a_flow_whose_entries_were_evicted_takes_its_key_back_from_a_lazily_recorded_spoofer() {
    in_fixture_netns(|| {
        let mut f = shared_backend();
        // Another client's flow to :8080 first: :8080 is the backend's lazy service, the
        // victims' flows to the VIP record both halves.
        let be = handshake(&f, client(40130), sa(HOST, 8080));
        for (i, flags) in [TCP_ACK, TCP_SYN, TCP_ACK | TCP_PSH]
            .into_iter()
            .enumerate()
        {
            let victim = client(40131 + i as u16);
            assert_eq!(handshake(&f, victim, sa(VIP, 80)), be);
            let answer =
                from_backend(tcp(be, victim, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"x"));
            assert_reply(&f.run(&answer), sa(VIP, 80), victim);
            // A flood evicts both halves; a spoofer sends as the victim to :8080 first.
            let (rkey, skey) = evict_and_spoof(&mut f, victim, be, flags);
            assert_eq!(f.ct(&skey).expect("recorded").lazy, ct::LAZY_RECORDED);
            assert!(f.ct(&rkey).is_none(), "recorded lazily: no reply half");
            // The victim's next segment gets through, and the spoofer's entry is gone.
            let data = tcp(victim, sa(VIP, 80), TCP_ACK | TCP_PSH, 1002, 5002)
                .with_payload(b"GET /")
                .build();
            let run = f.run(&data);
            assert_eq!(
                assert_dnat(&run, &data, &[be]),
                be,
                "spoofed with {flags:#x}"
            );
            assert!(f.ct(&skey).is_none(), "spoofed with {flags:#x}");
            let answer = from_backend(tcp(be, victim, TCP_ACK, 5002, 1007));
            assert_reply(&f.run(&answer), sa(VIP, 80), victim);
        }
        // The same spoof, but its backend answers it before the victim's next segment: the
        // answer is translated as :8080 (nothing tells the two apart). The victim's segment in
        // the window the backend acknowledged takes the key back; once the spoofer's reply
        // half is gone again, its flow, answered, keeps the key against every segment.
        for (i, evict) in [false, true].into_iter().enumerate() {
            let victim = client(40140 + i as u16);
            handshake(&f, victim, sa(VIP, 80));
            let (rkey, skey) = evict_and_spoof(&mut f, victim, be, TCP_ACK);
            let answer = from_backend(tcp(be, victim, TCP_ACK, 5001, 1001));
            assert_reply(&f.run(&answer), sa(HOST, 8080), victim);
            assert_eq!(f.ct(&skey).expect("recorded").lazy, ct::LAZY_ANSWERED);
            if evict {
                f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
            }
            let data = tcp(victim, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
            let run = f.run(&data);
            if evict {
                assert_dropped(&run, Reason::DropFlowConflict);
                assert!(f.ct(&skey).is_some());
            } else {
                assert_eq!(assert_dnat(&run, &data, &[be]), be);
                assert!(f.ct(&skey).is_none());
                let answer = from_backend(tcp(be, victim, TCP_ACK, 5001, 1001));
                assert_reply(&f.run(&answer), sa(VIP, 80), victim);
            }
        }
    });
}

#[test]
fn a_live_flow_whose_reply_half_was_rebuilt_keeps_its_key_against_a_blind_segment() {
    in_fixture_netns(|| {
        let mut f = shared_backend();
        let victim = client(40121);
        let (be, _, _) = further_service_flow(&f, client(40120), victim);
        let answer =
            from_backend(tcp(be, victim, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(b"x"));
        assert_reply(&f.run(&answer), sa(VIP, 80), victim);
        // A flood evicts only the reply half; the victim's next segment, its flow's
        // once-a-second refresh, rebuilds it (between refreshes the segments of the flow,
        // which is indexed, skip it: the next test).
        f.rec
            .dataplane_mut()
            .conntrack_remove(&flow_key(be, victim, IPPROTO_TCP))
            .unwrap();
        due_for_refresh(&mut f, flow_key(victim, sa(VIP, 80), IPPROTO_TCP));
        let data = tcp(victim, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5002)
            .with_payload(b"GET /")
            .build();
        let run = f.run(&data);
        assert_eq!(assert_dnat(&run, &data, &[be]), be);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        // Its backend had answered: a blind segment as the victim to the other service does
        // not take the key.
        let spoof = tcp(victim, sa(HOST, 8080), TCP_ACK, 999_999, 88).build();
        assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
        let answer = from_backend(tcp(be, victim, TCP_ACK, 5002, 1006));
        assert_reply(&f.run(&answer), sa(VIP, 80), victim);
    });
}

/// On [`shared_backend`]: another client's flow (`first`) to :8080 takes the backend's one
/// lazy slot, then `victim` completes a handshake to the VIP, a further service there (its flow
/// records both halves, and goes into the reply index once confirmed). The backend, and the
/// victim flow's forward and reply keys.
fn further_service_flow(
    f: &Fixture,
    first: SocketAddrV4,
    victim: SocketAddrV4,
) -> (SocketAddrV4, lb_common::FlowKey, lb_common::FlowKey) {
    let be = handshake(f, first, sa(HOST, 8080));
    assert_eq!(handshake(f, victim, sa(VIP, 80)), be);
    (
        be,
        flow_key(victim, sa(VIP, 80), IPPROTO_TCP),
        flow_key(be, victim, IPPROTO_TCP),
    )
}

/// Makes the flow whose forward half is at `fkey` due for its once-a-second refresh (its
/// next segment looks its reply half up, and rebuilds it if missing).
fn due_for_refresh(f: &mut Fixture, fkey: lb_common::FlowKey) {
    let mut e = f.ct(&fkey).expect("forward half");
    e.last_seen_ns = monotonic_ns() - 2 * ct::TOUCH_INTERVAL_NS;
    f.rec.dataplane_mut().conntrack_update(fkey, e).unwrap();
}

/// A flow to a backend's service that is not one of its lazy ones keeps a reply half, and
/// once confirmed goes into the reply index (as a full-NAT flow does, `fullnat.rs`): its
/// segments skip the reply half, its backend's next segment derives one that was evicted, and
/// while its forward half lives no flow of another service takes its reply key.
#[test]
fn a_confirmed_flow_of_a_further_service_is_indexed_and_holds_its_key_without_its_reply_half() {
    in_fixture_netns(|| {
        let mut f = shared_backend();
        let victim = client(40126);
        let (be, fkey, rkey) = further_service_flow(&f, client(40125), victim);
        let fwd = f.ct(&fkey).expect("confirmed forward half");
        assert_eq!(fwd.lazy, ct::LAZY_INDEXED, "{fwd:?}");
        assert_eq!(f.dp().fnat_index(&rkey).unwrap(), fkey);
        // A flood evicts the reply half: the victim's segments go on without it.
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        let data = tcp(victim, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5001)
            .with_payload(b"GET /")
            .build();
        let run = f.run(&data);
        assert_eq!(assert_dnat(&run, &data, &[be]), be);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 0, "{run:?}");
        assert!(f.ct(&rkey).is_none(), "the segment skipped the reply half");
        // Segments as the victim to the other service would share its tuple at the backend:
        // refused, and the backend's next answer derives the reply half from the index and
        // comes from the service the victim asked.
        for flags in [TCP_ACK, TCP_SYN, TCP_ACK | TCP_PSH] {
            let spoof = tcp(victim, sa(HOST, 8080), flags, 77, 88).build();
            assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
        }
        assert!(
            f.ct(&flow_key(victim, sa(HOST, 8080), IPPROTO_TCP))
                .is_none()
        );
        let answer =
            from_backend(tcp(be, victim, TCP_ACK | TCP_PSH, 5001, 1006).with_payload(b"200"));
        let run = f.run(&answer);
        assert_reply(&run, sa(VIP, 80), victim);
        assert_eq!(run.counted(Reason::EventCtRebuilt), 1, "{run:?}");
        let rev = f.ct(&rkey).expect("derived reply half");
        assert!(ct::is_reply_of(&rev, &rkey, &fkey), "{rev:?}");
        assert_eq!(
            rev.backend_ack, 1006,
            "its window from the answer's acknowledgment"
        );
        // Over (its forward half gone), the flow no longer holds the key.
        let dp = f.rec.dataplane_mut();
        dp.conntrack_remove(&fkey).unwrap();
        dp.conntrack_remove(&rkey).unwrap();
        let syn = tcp(victim, sa(HOST, 8080), TCP_SYN, 9000, 0).build();
        assert_eq!(assert_dnat(&f.run(&syn), &syn, &[be]), be);
    });
}

/// A flow whose reply half was evicted, not indexed (its slot is another live flow's), and
/// due for its refresh, does not rebuild its reply half over an indexed flow that holds the
/// key without one: it is over, and the indexed flow's answers still reach its client.
#[test]
fn a_flow_cannot_rebuild_its_reply_half_over_an_indexed_flow_holding_the_key() {
    in_fixture_netns(|| {
        let mut f = shared_backend();
        let victim = client(40128);
        let (be, fkey, rkey) = further_service_flow(&f, client(40127), victim);
        assert_eq!(f.ct(&fkey).unwrap().lazy, ct::LAZY_INDEXED);
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        // A forward half of the same client tuple to :8080 on the same backend, neither lazy
        // nor indexed (an older flow's leftover, say, whose slot was another flow's), with the
        // same reply key and no reply half either.
        let other = flow_key(victim, sa(HOST, 8080), IPPROTO_TCP);
        let e = CtEntry {
            lazy: 0,
            ..f.ct(&fkey).unwrap()
        };
        f.rec.dataplane_mut().conntrack_insert(other, e).unwrap();
        due_for_refresh(&mut f, other);
        let seg = tcp(victim, sa(HOST, 8080), TCP_ACK, 77, 88).build();
        assert_dropped(&f.run(&seg), Reason::DropFlowConflict);
        assert!(
            f.ct(&other).is_none() && f.ct(&rkey).is_none(),
            "nothing rebuilt"
        );
        let answer = from_backend(tcp(be, victim, TCP_ACK, 5001, 1001));
        assert_reply(&f.run(&answer), sa(VIP, 80), victim);
    });
}

/// A reply-index slot whose flow is gone (a DNAT flow's, ended and swept: nothing clears those
/// as the port search clears a full-NAT flow's) is forgotten by the first new flow whose reply
/// key shares it: its bit cleared, so later flows do not read the slot; the new flow is not
/// held up by it. A slot naming a live indexed flow keeps its bit.
#[test]
fn a_new_flow_forgets_a_reply_index_slot_whose_flow_is_gone() {
    in_fixture_netns(|| {
        let mut f = shared_backend();
        let be = handshake(&f, client(40129), sa(HOST, 8080));
        let c = client(40130);
        let rkey = flow_key(be, c, IPPROTO_TCP);
        // The slot of the new flow's reply key names a flow that is gone.
        let gone = flow_key(client(40131), sa(VIP, 80), IPPROTO_TCP);
        f.rec.dataplane_mut().fnat_index_store(&rkey, gone).unwrap();
        assert!(f.dp().fnat_named(&rkey).unwrap());
        let syn = tcp(c, sa(HOST, 8080), TCP_SYN, 1000, 0).build();
        assert_eq!(assert_dnat(&f.run(&syn), &syn, &[be]), be);
        assert!(
            !f.dp().fnat_named(&rkey).unwrap(),
            "the stale slot's bit is cleared"
        );
        // A live indexed flow's bit stays: a flow of its client to the other service is
        // refused.
        let victim = client(40132);
        assert_eq!(handshake(&f, victim, sa(VIP, 80)), be);
        let vkey = flow_key(be, victim, IPPROTO_TCP);
        f.rec.dataplane_mut().conntrack_remove(&vkey).unwrap();
        let spoof = tcp(victim, sa(HOST, 8080), TCP_SYN, 77, 0).build();
        assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
        assert!(f.dp().fnat_named(&vkey).unwrap());
    });
}

/// A backend serving two services records the flows of both lazily (`LAZY_OWNERS`): each
/// flow one insert, its reply entry written by its first reply, translated from the service
/// its client asked (the reply finds its flow's forward entry under either service).
#[test]
fn flows_of_two_services_on_one_backend_are_both_recorded_lazily() {
    in_fixture_netns(|| {
        let f = shared_backend_lazily();
        let be = sa(backend(1), 8000);
        for (c, service) in [
            (client(40150), sa(HOST, 8080)),
            (client(40151), sa(VIP, 80)),
        ] {
            let syn = tcp(c, service, TCP_SYN, 1000, 0).build();
            let run = f.run(&syn);
            assert_eq!(assert_dnat(&run, &syn, &[be]), be);
            let fwd = f.ct(&flow_key(c, service, IPPROTO_TCP)).expect("forward");
            assert_eq!(fwd.lazy, ct::LAZY_RECORDED, "to {service}");
            assert!(
                f.ct(&flow_key(be, c, IPPROTO_TCP)).is_none(),
                "to {service}"
            );
            // An ICMP error from the backend about the SYN finds the flow the same way.
            let out = f.run(&port_unreachable(be, *c.ip(), &run.out));
            assert_eq!(out.counted(Reason::EventIcmpTranslated), 1, "{out:?}");
            let e = wire::parse_icmp_error(&out.out);
            assert_eq!(
                (e.src, e.inner_src, e.inner_dst),
                (*service.ip(), c, service)
            );
            let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
            assert_reply(&f.run(&synack), service, c);
            let rev = f
                .ct(&flow_key(be, c, IPPROTO_TCP))
                .expect("written by the reply");
            assert_eq!(
                (rev.nat_addr, rev.nat_port),
                (
                    lb_common::ipv4_to_wire(service.ip().octets()),
                    lb_common::port_to_wire(service.port())
                )
            );
        }
        assert_eq!(
            f.dp().lazy_reply_services(be, IPPROTO_TCP),
            vec![sa(HOST, 8080), sa(VIP, 80)]
        );
    });
}

/// Two lazily recorded services on one backend hold their flows' reply keys against each
/// other (`lazy_others_hold`), as a reply entry would: a packet as the victim to the other
/// service is refused while the victim's flow lives, unanswered (no reply entry yet) or
/// answered with its reply entry evicted, whichever service holds the backend's first slot.
#[test]
fn a_spoofed_packet_to_another_lazy_service_cannot_take_a_lazily_recorded_flows_replies() {
    in_fixture_netns(|| {
        let mut f = shared_backend_lazily();
        // :8080 takes the backend's first slot, the VIP the second.
        let be = handshake(&f, client(40160), sa(HOST, 8080));
        assert_eq!(handshake(&f, client(40161), sa(VIP, 80)), be);
        for (i, (service, other)) in [(sa(VIP, 80), sa(HOST, 8080)), (sa(HOST, 8080), sa(VIP, 80))]
            .into_iter()
            .enumerate()
        {
            let victim = client(40162 + i as u16);
            let rkey = flow_key(be, victim, IPPROTO_TCP);
            let syn = tcp(victim, service, TCP_SYN, 1000, 0).build();
            assert_eq!(assert_dnat(&f.run(&syn), &syn, &[be]), be);
            let spoof = tcp(victim, other, TCP_SYN, 77, 0).build();
            assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
            assert!(f.ct(&rkey).is_none(), "victim to {service}");
            let synack = from_backend(tcp(be, victim, TCP_SYN | TCP_ACK, 5000, 1001));
            assert_reply(&f.run(&synack), service, victim);
            let ack = tcp(victim, service, TCP_ACK, 1001, 5001).build();
            assert_eq!(assert_dnat(&f.run(&ack), &ack, &[be]), be);
            // Answered; a flood evicts its reply entry: the flow still holds the key.
            f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
            assert_spoofs_refused(&f, victim, other, be, service);
        }
    });
}

/// The lazily recorded spoofer of the tests above, when the victim's flow is recorded lazily
/// too: with both the victim's entries evicted, a segment as the victim to the other lazy
/// service gets in, unanswered; the victim's next segment takes the key back and the
/// spoofer's entry goes (it proved nothing), and the backend's answer comes from the service
/// the victim asked.
#[test]
fn an_evicted_lazy_flow_takes_its_key_back_from_a_spoofer_of_another_lazy_service() {
    in_fixture_netns(|| {
        let mut f = shared_backend_lazily();
        let be = handshake(&f, client(40170), sa(HOST, 8080));
        let victim = client(40171);
        assert_eq!(handshake(&f, victim, sa(VIP, 80)), be);
        let (rkey, skey) = evict_and_spoof(&mut f, victim, be, TCP_ACK);
        assert_eq!(f.ct(&skey).expect("recorded").lazy, ct::LAZY_RECORDED);
        assert!(f.ct(&rkey).is_none(), "recorded lazily: no reply half");
        let data = tcp(victim, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5001)
            .with_payload(b"GET /")
            .build();
        assert_eq!(assert_dnat(&f.run(&data), &data, &[be]), be);
        assert!(f.ct(&skey).is_none(), "the spoofer's entry is gone");
        assert_eq!(
            f.ct(&flow_key(victim, sa(VIP, 80), IPPROTO_TCP))
                .expect("the victim's flow")
                .lazy,
            ct::LAZY_RECORDED
        );
        let answer = from_backend(tcp(be, victim, TCP_ACK, 5001, 1006));
        assert_reply(&f.run(&answer), sa(VIP, 80), victim);
    });
}

// ---- 3. a closed flow's reply entry expires by the same rules as its forward entry ----

#[test]
fn a_closed_flows_reply_entry_does_not_catch_the_next_connection_to_another_service() {
    in_fixture_netns(|| {
        let f = shared_backend();
        let c = client(40200);
        let be = handshake(&f, c, sa(VIP, 80));
        // Connection A closes (client FIN, backend FIN).
        let fin = tcp(c, sa(VIP, 80), TCP_FIN | TCP_ACK, 1001, 5001).build();
        assert_dnat(&f.run(&fin), &fin, &[be]);
        let bfin = from_backend(tcp(be, c, TCP_FIN | TCP_ACK, 5001, 1002));
        assert_reply(&f.run(&bfin), sa(VIP, 80), c);
        // Connection B from the same port to the other service, inside A's linger period.
        let syn = tcp(c, sa(HOST, 8080), TCP_SYN, 90_000, 0).build();
        assert_eq!(assert_dnat(&f.run(&syn), &syn, &[be]), be);
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 70_000, 90_001));
        assert_reply(&f.run(&synack), sa(HOST, 8080), c);
        // A's leftovers are gone: its forward half would otherwise rebuild the reply half.
        assert!(f.ct(&flow_key(c, sa(VIP, 80), IPPROTO_TCP)).is_none());
    });
}

/// The lazily recorded counterpart of the test above, as the long flood soak met it: a closing
/// flow of the backend's lazy service, recorded without a reply half (here from a blind RST
/// after a flood evicted everything), gives its reply key to a SYN to the other service, and
/// must go with it. Its forward packets skip the reply half (`ct::forward_skips_reply`), so
/// left behind it would forward its client's next segment and let the other service's reply
/// entry translate the backend's answer.
#[test]
fn a_closing_lazily_recorded_flow_that_gives_its_key_to_a_new_connection_is_gone() {
    in_fixture_netns(|| {
        let f = shared_backend();
        // Another client's flow to :8080 first: :8080 is the backend's lazy service.
        let be = handshake(&f, client(40210), sa(HOST, 8080));
        let c = client(40211);
        let lazy_key = flow_key(c, sa(HOST, 8080), IPPROTO_TCP);
        let rst = tcp(c, sa(HOST, 8080), TCP_RST, 123_456, 0).build();
        assert_eq!(assert_dnat(&f.run(&rst), &rst, &[be]), be);
        let recorded = f.ct(&lazy_key).expect("picked up mid-stream");
        assert_eq!(
            (recorded.lazy, recorded.state),
            (ct::LAZY_RECORDED, ct::STATE_CLOSING)
        );
        // A new connection from the same port to the VIP takes the reply key...
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 1000, 0).build();
        assert_eq!(assert_dnat(&f.run(&syn), &syn, &[be]), be);
        assert_eq!(
            f.ct(&flow_key(be, c, IPPROTO_TCP)).map(|r| r.nat_port),
            Some(lb_common::port_to_wire(80))
        );
        // ...and the closing flow is gone with it.
        assert!(f.ct(&lazy_key).is_none(), "{:?}", f.ct(&lazy_key));
        // A segment to :8080 from that tuple now starts a flow which proves itself against
        // the unanswered VIP flow (the rule of the tests above), and the backend's answer to
        // it comes from :8080.
        let data = tcp(c, sa(HOST, 8080), TCP_ACK | TCP_PSH, 2000, 3000)
            .with_payload(b"GET /")
            .build();
        assert_eq!(assert_dnat(&f.run(&data), &data, &[be]), be);
        let answer = from_backend(tcp(be, c, TCP_ACK, 3000, 2005));
        assert_reply(&f.run(&answer), sa(HOST, 8080), c);
    });
}

// ---- 4. FIN and RST count only inside the window ----

/// A confirmed TCP flow from `c` to the VIP's port 80 that sent 10 bytes, which the backend
/// acknowledged (up to 1011: the window FINs and RSTs are judged by).
fn answered_flow(f: &Fixture, c: SocketAddrV4, nat: Nat) -> Leg {
    let leg = handshake_nat(f, c, sa(VIP, 80), nat);
    let data = tcp(c, sa(VIP, 80), TCP_ACK | TCP_PSH, 1001, 5001)
        .with_payload(b"0123456789")
        .build();
    assert_fwd(&f.run(&data), &data, &[leg.backend], nat);
    let ack = from_backend(back(leg, TCP_ACK, 5001, 1011));
    assert_reply(&f.run(&ack), sa(VIP, 80), c);
    leg
}

fn rst_or_fin_outside_the_window_keep_a_draining_flow_on_its_backend(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(40300);
        let leg = answered_flow(&f, c, nat);
        let be = leg.backend;
        // The backend leaves (draining: established flows stay).
        drop_backend(&mut f, be);
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        // Blind RST and FIN with sequence numbers outside the window: forwarded (the backend's
        // stack judges them too) but they do not close the flow.
        for (flags, seq) in [(TCP_RST, 7_000_000), (TCP_FIN | TCP_ACK, 3_000_000_000)] {
            let spoof = tcp(c, sa(VIP, 80), flags, seq, 0).build();
            let run = f.run(&spoof);
            assert_eq!(assert_fwd(&run, &spoof, &[be], nat), leg);
            assert_eq!(run.counted(Reason::EventCtCloseIgnored), 1, "{run:?}");
            assert_eq!(f.ct(&fkey).unwrap().state, ct::STATE_OPEN);
        }
        // So a bare SYN on the tuple is a retransmission, not a new connection: same backend.
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 123_456, 0).build();
        assert_eq!(assert_fwd(&f.run(&syn), &syn, &[be], nat), leg);
        // A RST at the backend's acknowledged position closes the flow...
        let rst = tcp(c, sa(VIP, 80), TCP_RST, 1011, 0).build();
        let run = f.run(&rst);
        assert_fwd(&run, &rst, &[be], nat);
        assert_eq!(run.counted(Reason::EventCtClosing), 1, "{run:?}");
        assert_eq!(f.ct(&fkey).unwrap().state, ct::STATE_CLOSING);
        // ...and a new connection on the tuple goes to a backend still in the table.
        let rest: Vec<_> = web_backends().into_iter().filter(|b| *b != be).collect();
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 200_000, 0).build();
        assert_fwd(&f.run(&syn), &syn, &rest, nat);
    });
}

/// A confirmed flow's window is in its reply half. A flood that evicts only that half leaves the
/// forward entry, and the client's next segment rebuilds it: with no window until the backend's
/// next acknowledgment (`ct::rebuilt_window`). Judged by a window taken from the segment itself,
/// a blind RST or FIN as the client would close the flow, and so would one after a blind
/// segment of its own that rebuilt the half (or a bare SYN, which rebuilt it as never
/// answered). Both are forwarded (the backend's stack judges them) and ignored; the backend's
/// next packet gives the half its window back, and a RST in it closes the flow.
fn a_blind_rst_or_fin_after_an_evicted_reply_half_does_not_close_the_flow(nat: Nat) {
    in_fixture_netns(move || {
        let mut f = standard_nat(nat);
        let c = client(40310);
        let leg = answered_flow(&f, c, nat);
        let be = leg.backend;
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        let rkey = flow_key(be, leg.peer, IPPROTO_TCP);
        for (flags, seq) in [(TCP_RST, 7_000_000), (TCP_FIN | TCP_ACK, 3_000_000_000)] {
            // Rebuilt by the RST or FIN itself, or first by a blind segment of the spoofer's
            // at the same number, or by a bare SYN as the client.
            for first in [None, Some(TCP_ACK), Some(TCP_SYN)] {
                // The flood's eviction of the reply half (the forward entry stays).
                f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
                // (A DNAT flow recorded lazily, as this one, leaves its reply half alone but to
                // close or refresh: there the RST rebuilds it either way.)
                let mut rebuilt = 0;
                if let Some(first) = first {
                    let blind = tcp(c, sa(VIP, 80), first, seq, 0).build();
                    let run = f.run(&blind);
                    assert_eq!(assert_fwd(&run, &blind, &[be], nat), leg);
                    rebuilt += run.counted(Reason::EventCtRebuilt);
                }
                let spoof = tcp(c, sa(VIP, 80), flags, seq, 0).build();
                let run = f.run(&spoof);
                assert_eq!(assert_fwd(&run, &spoof, &[be], nat), leg);
                rebuilt += run.counted(Reason::EventCtRebuilt);
                assert_eq!(rebuilt, 1, "{run:?}");
                assert_eq!(run.counted(Reason::EventCtCloseIgnored), 1, "{run:?}");
                assert_eq!(run.counted(Reason::EventCtClosing), 0, "{run:?}");
                assert_eq!(f.ct(&fkey).unwrap().state, ct::STATE_OPEN);
                let rev = f.ct(&rkey).unwrap();
                assert_eq!(rev.state, ct::STATE_OPEN);
                assert_eq!(rev.flags & ct::CT_F_CLOSED, 0);
                assert_eq!(rev.lazy, ct::WINDOW_LOST);
            }
        }
        // The connection goes on both ways, and the backend's acknowledgment is the window again.
        let more = tcp(c, sa(VIP, 80), TCP_ACK | TCP_PSH, 1011, 5001)
            .with_payload(b"abc")
            .build();
        assert_eq!(assert_fwd(&f.run(&more), &more, &[be], nat), leg);
        let ack = from_backend(back(leg, TCP_ACK, 5001, 1014));
        assert_reply(&f.run(&ack), sa(VIP, 80), c);
        let rev = f.ct(&rkey).unwrap();
        assert_eq!((rev.lazy, rev.backend_ack), (0, 1014));
        let rst = tcp(c, sa(VIP, 80), TCP_RST, 1014, 0).build();
        let run = f.run(&rst);
        assert_fwd(&run, &rst, &[be], nat);
        assert_eq!(run.counted(Reason::EventCtClosing), 1, "{run:?}");
        assert_eq!(f.ct(&fkey).unwrap().state, ct::STATE_CLOSING);
    });
}

// ---- 5. replies only from where their backend lives ----

fn a_reply_arriving_where_its_backend_does_not_live_is_not_translated(nat: Nat) {
    in_fixture_netns(move || {
        let f = standard_nat(nat);
        let c = client(40400);
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 1000, 0).build();
        let leg = assert_fwd(&f.run(&syn), &syn, &web_backends(), nat);
        // A forged "backend reply" on the second uplink (no backend lives behind fx2).
        let fake = from_backend(back(leg, TCP_SYN | TCP_ACK | TCP_RST, 1, 1001));
        let run = f.run_on(&fake, "fx2");
        assert_untouched(&run, &fake, Reason::PassReplyWrongIface);
        let fkey = flow_key(c, sa(VIP, 80), IPPROTO_TCP);
        assert_eq!(
            f.ct(&fkey).unwrap().state,
            ct::STATE_OPEN,
            "no state change"
        );
        // The real one, behind fx0, is translated.
        let synack = from_backend(back(leg, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), sa(VIP, 80), c);
    });
}

// ---- 6. the backend's address never reaches the client ----

fn a_packet_whose_ttl_would_expire_is_handed_to_the_stack_untranslated(nat: Nat) {
    in_fixture_netns(move || {
        let f = standard_nat(nat);
        let c = client(40500);
        let mut p = tcp(c, sa(VIP, 80), TCP_SYN, 1000, 0);
        p.ttl = 1;
        let pkt = p.build();
        // The stack answers with ICMP time exceeded quoting what it got: the service address.
        assert_untouched(&f.run(&pkt), &pkt, Reason::PassTtlExpired);
        assert!(f.ct(&flow_key(c, sa(VIP, 80), IPPROTO_TCP)).is_none());
        // An established flow's packet likewise.
        let leg = handshake_nat(&f, client(40501), sa(VIP, 80), nat);
        let mut p = tcp(client(40501), sa(VIP, 80), TCP_ACK, 1001, 5001);
        p.ttl = 1;
        let pkt = p.build();
        assert_untouched(&f.run(&pkt), &pkt, Reason::PassTtlExpired);
        // And a reply with TTL 1 (its ICMP goes back to the backend, untranslated).
        let mut r = back(leg, TCP_ACK, 5001, 1001);
        r.ttl = 1;
        r.src_mac = backend_mac(*leg.backend.ip());
        let pkt = r.build();
        assert_untouched(&f.run(&pkt), &pkt, Reason::PassTtlExpired);
    });
}

fn fragmentation_needed_from_the_client_side_reaches_the_backend(nat: Nat) {
    in_fixture_netns(move || {
        let f = standard_nat(nat);
        let c = client(40600);
        let leg = handshake_nat(&f, c, sa(VIP, 80), nat);
        let be = leg.backend;
        // The backend's large segment, as it left berth (translated)...
        let big = from_backend(back(leg, TCP_ACK | TCP_PSH, 5001, 1001).with_payload(&[7; 1400]));
        let run = f.run(&big);
        assert_reply(&run, sa(VIP, 80), c);
        // ...meets a router with MTU 1280 on the client's side, which answers the service.
        let router = Ipv4Addr::new(10, 10, 0, 254);
        for quote in [8, 64] {
            let icmp = wire::icmp_error(
                router,
                VIP,
                wire::ICMP_DEST_UNREACH,
                wire::ICMP_FRAG_NEEDED,
                1280,
                &run.out,
                quote,
            );
            let out = f.run(&icmp);
            assert_eq!(out.action, TC_ACT_REDIRECT, "{out:?}");
            assert_eq!(out.exits(), [Reason::FwdRedirect.name()], "{out:?}");
            assert_eq!(out.counted(Reason::EventIcmpTranslated), 1, "{out:?}");
            wire::verify_icmp_checksums(&out.out).unwrap_or_else(|e| panic!("{e}"));
            assert!(wire::icmp_inner_l4_consistent(&icmp, &out.out));
            let e = wire::parse_icmp_error(&out.out);
            // Full NAT: from berth's address (the client side's router is nobody the backend
            // knows).
            let from = if nat == Nat::Full { HOST } else { router };
            assert_eq!((e.src, e.dst), (from, *be.ip()), "to the backend");
            assert_eq!(
                (e.inner_src, e.inner_dst),
                (be, leg.peer),
                "quoting what it sent"
            );
            assert_eq!((e.icmp_type, e.code, e.rest), (3, 4, 1280));
            assert_eq!(e.ttl, 63);
        }
    });
}

/// Backend `be`'s port unreachable to `to`, quoting (64 bytes of) the frame it received, as it
/// arrives from the backend's side.
fn port_unreachable(be: SocketAddrV4, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = wire::icmp_error(
        *be.ip(),
        to,
        wire::ICMP_DEST_UNREACH,
        wire::ICMP_PORT_UNREACH,
        0,
        quoted,
        64,
    );
    icmp[6..12].copy_from_slice(&backend_mac(*be.ip()));
    icmp
}

/// Checks that ICMP error `icmp` from a backend's side went to the client: redirected as a
/// reply, counted, checksums right (outer and quoted), from `from` to `to`, quoting `quoting`.
fn assert_icmp_to_client(
    f: &Fixture,
    icmp: &[u8],
    from: Ipv4Addr,
    to: Ipv4Addr,
    quoting: (SocketAddrV4, SocketAddrV4),
) {
    let out = f.run(icmp);
    assert_eq!(out.action, TC_ACT_REDIRECT, "{out:?}");
    assert_eq!(out.exits(), [Reason::ReplyRedirect.name()], "{out:?}");
    assert_eq!(out.counted(Reason::EventIcmpTranslated), 1, "{out:?}");
    wire::verify_icmp_checksums(&out.out).unwrap_or_else(|e| panic!("{e}"));
    assert!(wire::icmp_inner_l4_consistent(icmp, &out.out));
    let e = wire::parse_icmp_error(&out.out);
    assert_eq!((e.src, e.dst), (from, to), "from the service address");
    assert_eq!(
        (e.inner_src, e.inner_dst),
        quoting,
        "quoting what the client sent"
    );
}

fn icmp_errors_from_a_backend_reach_the_client_with_the_service_address(nat: Nat) {
    in_fixture_netns(move || {
        let f = standard_nat(nat);
        let c = client(50600);
        let service = sa(HOST, 5353);
        let req = Ipv4Packet::udp(c, service, b"query").build();
        let dns = [sa(backend(4), 53), sa(backend(5), 53)];
        let run = f.run(&req);
        let leg = assert_fwd(&run, &req, &dns, nat);
        let be = leg.backend;
        // The backend's port is closed: it answers port unreachable quoting the translated
        // request (to whom it came from).
        let icmp = port_unreachable(be, *leg.peer.ip(), &run.out);
        assert_icmp_to_client(&f, &icmp, HOST, *c.ip(), (c, service));
        // The same error arriving where the backend does not live is not translated.
        let out = f.run_on(&icmp, "fx2");
        assert_untouched(&out, &icmp, Reason::PassReplyWrongIface);
        // An error quoting no flow passes untouched.
        let other = Ipv4Packet::udp(leg.peer, sa(backend(4), 9999), b"x").build();
        let stray = wire::icmp_error(
            *be.ip(),
            *leg.peer.ip(),
            wire::ICMP_DEST_UNREACH,
            wire::ICMP_PORT_UNREACH,
            0,
            &other,
            8,
        );
        assert_untouched(&f.run(&stray), &stray, Reason::PassNotTcpUdp);
    });
}

/// A backend that refuses a handshake's SYN with an ICMP error (a port unreachable from a REJECT
/// rule, a router's host unreachable) while the flow waits in the handshake table (no reply
/// entry yet; full NAT: only its port's claim names it): the error reaches the client as from
/// the service, quoting what the client sent, so its connect fails at once instead of retrying
/// SYNs; and the error writes no state (the flow stays pending, no reply entry appears).
fn an_icmp_error_about_a_pending_handshake_reaches_the_client_and_writes_nothing(nat: Nat) {
    in_fixture_netns(move || {
        let f = standard_nat(nat);
        let (c, vip) = (client(50700), sa(VIP, 80));
        let fkey = flow_key(c, vip, IPPROTO_TCP);
        let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
        let run = f.run(&syn);
        let leg = assert_fwd(&run, &syn, &web_backends(), nat);
        assert!(f.dp().conntrack_pending(&fkey), "pending after its SYN");
        let entries = f.dp().conntrack_entries();
        let icmp = port_unreachable(leg.backend, *leg.peer.ip(), &run.out);
        assert_icmp_to_client(&f, &icmp, VIP, *c.ip(), (c, vip));
        assert!(f.dp().conntrack_pending(&fkey), "still pending");
        assert_eq!(
            f.dp().conntrack_entries(),
            entries,
            "no entry written or moved"
        );
        // The same error arriving where the backend does not live is not translated.
        assert_untouched(&f.run_on(&icmp, "fx2"), &icmp, Reason::PassReplyWrongIface);
        // Nor one quoting a port no handshake holds.
        let sent = wire::parse(&run.out).src;
        let other = SocketAddrV4::new(*sent.ip(), sent.port().wrapping_add(1));
        let quoted = tcp(other, leg.backend, TCP_SYN, 1000, 0).build();
        let stray = port_unreachable(leg.backend, *leg.peer.ip(), &quoted);
        assert_untouched(&f.run(&stray), &stray, Reason::PassNotTcpUdp);
    });
}

/// An ICMP error from the backend's side about an indexed flow (a further service's DNAT flow,
/// a full-NAT flow) whose reply half a flood evicted: the forward packets skip that half, so
/// nothing brings it back before the error, which reaches the client as from the service all
/// the same (derived from the index, as the backend's next segment derives the half), writing
/// nothing; from where the backend does not live, it passes untranslated.
#[test]
fn an_icmp_error_about_an_indexed_flow_without_its_reply_half_reaches_the_client() {
    let check = |f: &mut Fixture, c: SocketAddrV4, service: SocketAddrV4, leg: Leg, nat: Nat| {
        let fkey = flow_key(c, service, IPPROTO_TCP);
        let rkey = flow_key(leg.backend, leg.peer, IPPROTO_TCP);
        assert_eq!(f.ct(&fkey).expect("confirmed").lazy, ct::LAZY_INDEXED);
        f.rec.dataplane_mut().conntrack_remove(&rkey).unwrap();
        // A segment the client sent on, as it left berth, and its backend's host refusing it.
        let data = tcp(c, service, TCP_ACK | TCP_PSH, 1001, 5001)
            .with_payload(b"GET /")
            .build();
        let run = f.run(&data);
        assert_eq!(assert_fwd(&run, &data, &[leg.backend], nat), leg);
        assert!(f.ct(&rkey).is_none(), "the segment skipped the reply half");
        let entries = f.dp().conntrack_entries();
        let icmp = port_unreachable(leg.backend, *leg.peer.ip(), &run.out);
        assert_icmp_to_client(f, &icmp, *service.ip(), *c.ip(), (c, service));
        assert_eq!(f.dp().conntrack_entries(), entries, "nothing written");
        assert_untouched(&f.run_on(&icmp, "fx2"), &icmp, Reason::PassReplyWrongIface);
    };
    in_fixture_netns(move || {
        // DNAT to a backend's service beyond its lazy one.
        let mut f = shared_backend();
        let c = client(40140);
        let (be, _, _) = further_service_flow(&f, client(40139), c);
        let leg = Leg {
            backend: be,
            peer: c,
        };
        check(&mut f, c, sa(VIP, 80), leg, Nat::Dnat);
        // Full NAT.
        let mut f = standard_nat(Nat::Full);
        let c = client(40141);
        let leg = handshake_nat(&f, c, sa(VIP, 80), Nat::Full);
        check(&mut f, c, sa(VIP, 80), leg, Nat::Full);
    });
}

// ---- issue 14: handshakes pending in the handshake table (lb-common's `syn`) ----

/// A new DNAT flow of its backend's lazy service waits in the handshake table (no CT_NEW
/// insert) until its backend answers or its client sends again; either moves it to CT_NEW on
/// the same backend, and the handshake goes on as before.
#[test]
fn a_handshake_waits_in_the_handshake_table_until_its_backend_answers_or_its_client_sends() {
    in_fixture_netns(|| {
        let f = standard();
        let vip = sa(VIP, 80);
        // Answered by its backend.
        let c = client(41700);
        let fkey = flow_key(c, vip, IPPROTO_TCP);
        let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
        let be = assert_dnat(&f.run(&syn), &syn, &web_backends());
        assert!(f.dp().conntrack_pending(&fkey), "pending after its SYN");
        assert!(f.dp().conntrack_unconfirmed(&fkey));
        assert_eq!(f.dp().conntrack_entries().len(), 1);
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), vip, c);
        let rkey = flow_key(be, c, IPPROTO_TCP);
        assert!(
            !f.dp().conntrack_pending(&fkey) && f.dp().conntrack_unconfirmed(&fkey),
            "moved to CT_NEW by the SYN-ACK"
        );
        assert!(f.dp().conntrack_unconfirmed(&rkey), "beside its reply half");
        assert_eq!(f.dp().conntrack_entries().len(), 2, "the slot was cleared");
        let ack = tcp(c, vip, TCP_ACK, 1001, 5001).build();
        assert_eq!(assert_dnat(&f.run(&ack), &ack, &[be]), be);
        assert!(!f.dp().conntrack_unconfirmed(&fkey) && f.ct(&fkey).is_some());
        // Its client sends again first (a retransmitted SYN): the same backend, in CT_NEW.
        let c = client(41701);
        let fkey = flow_key(c, vip, IPPROTO_TCP);
        let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
        let be = assert_dnat(&f.run(&syn), &syn, &web_backends());
        assert!(f.dp().conntrack_pending(&fkey));
        assert_eq!(assert_dnat(&f.run(&syn), &syn, &[be]), be);
        assert!(!f.dp().conntrack_pending(&fkey) && f.dp().conntrack_unconfirmed(&fkey));
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), vip, c);
    });
}

/// The program acts only on a whole slot: a pending handshake written with its check word
/// sends its client's next packet to the backend it names, even one the flow hash would not
/// pick; the same slot torn (its backend's address from one write, its check word from another,
/// as two CPUs writing one slot at once can leave it) reads as absent, and the packet is
/// balanced as a new flow, never sent where the torn slot points.
#[test]
fn a_torn_pending_handshake_is_never_followed() {
    in_fixture_netns(|| {
        let mut f = standard();
        let vip = sa(VIP, 80);
        let c = client(41710);
        let fkey = flow_key(c, vip, IPPROTO_TCP);
        let seg = tcp(c, vip, TCP_ACK, 1001, 5001).build();
        // Where the flow hash sends this flow, and a flow of another backend (for its ids).
        let picked = assert_dnat(&f.run(&seg), &seg, &web_backends());
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        let (other_key, other) = (41711..42000)
            .map(|p| {
                let k = flow_key(client(p), vip, IPPROTO_TCP);
                let syn = tcp(client(p), vip, TCP_SYN, 1000, 0).build();
                (k, assert_dnat(&f.run(&syn), &syn, &web_backends()))
            })
            .find(|(_, be)| *be != picked)
            .expect("a flow of another backend");
        let e = f.ct(&other_key).unwrap();
        let slot = write_pending(&mut f, &fkey, e, monotonic_ns());
        assert!(f.dp().conntrack_pending(&fkey));
        assert_eq!(
            assert_dnat(&f.run(&seg), &seg, &[other]),
            other,
            "a whole slot is followed"
        );
        f.rec.dataplane_mut().conntrack_remove(&fkey).unwrap();
        assert!(f.ct(&fkey).is_none());
        let other_write = SynSlot {
            nat_addr: wire_addr(backend(9)),
            ..slot
        };
        let torn = SynSlot {
            check: other_write.check_of(),
            ..slot
        };
        f.rec.dataplane_mut().pending_write(torn).unwrap();
        assert!(!f.dp().conntrack_pending(&fkey));
        let run = f.run(&seg);
        assert_eq!(assert_dnat(&run, &seg, &web_backends()), picked, "{run:?}");
        assert_eq!(run.counted(Reason::EventCtMidstreamPickup), 1, "a new flow");
    });
}

/// The drain purge clears a doomed backend's pending handshakes one by one. It used to write
/// the handshake's set back whole, undoing a handshake the program recorded in another way of
/// it between the read and the write; it clears the one way in place now (a compare-and-swap
/// of its check word in the mapped table). Here one flow's handshake is cleared in a loop while
/// 20,000 others land in its set, each right behind the doomed one's next write.
#[test]
fn clearing_a_pending_handshake_never_loses_another_recorded_in_its_set_meanwhile() {
    in_fixture_netns(|| {
        let o = options();
        let (vip, be) = (sa(VIP, 80), sa(backend(1), 8000));
        let mut f = vip_on_one_backend(o);
        let set = |k: &lb_common::FlowKey| set_of(flow_hash(k, o.hash_seed), o.syn_sets());
        let doomed_client = client(20000);
        let doomed = flow_key(doomed_client, vip, IPPROTO_TCP);
        let syn = tcp(doomed_client, vip, TCP_SYN, 1000, 0).build();
        assert_dnat(&f.run(&syn), &syn, &[be]);
        let template = f.ct(&doomed).expect("pending");
        let n = 20_000;
        let others: Vec<SocketAddrV4> = (0..=255u8)
            .flat_map(|a| (1024..24000u16).map(move |p| sa(Ipv4Addr::new(10, 10, 1, a), p)))
            .filter(|c| set(&flow_key(*c, vip, IPPROTO_TCP)) == set(&doomed))
            .take(n)
            .collect();
        assert_eq!(others.len(), n);
        let reader = f.dp().conntrack_reader().unwrap();
        let purger = Beside::run(move || reader.pending_remove(&doomed));
        let mut lost = Vec::new();
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex("fx0").to_ne_bytes());
        let mut out = vec![0u8; 256];
        for c in &others {
            // Built first: the SYN follows the doomed handshake's write at once, into the
            // window where the clear reads the set.
            let syn = tcp(*c, vip, TCP_SYN, 1000, 0).build();
            write_pending(&mut f, &doomed, template, monotonic_ns());
            let run = f
                .dp()
                .program()
                .test_run(aya::programs::TestRunOptions {
                    data_in: Some(&syn),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(run.return_value, TC_ACT_REDIRECT);
            // A write of the set that read it before the SYN lands within microseconds.
            std::thread::sleep(std::time::Duration::from_micros(50));
            if !f.dp().conntrack_pending(&flow_key(*c, vip, IPPROTO_TCP)) {
                lost.push(*c);
            }
        }
        let (tries, cleared) = purger.stop();
        assert!(
            cleared >= 100,
            "the doomed handshake was cleared {cleared} times"
        );
        assert!(
            lost.is_empty(),
            "{} of {n} handshakes lost to {tries} clears ({cleared} clearing one): {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    });
}

/// The daemon's sweep beside a stream of handshakes: each lands on a slot of its own key that
/// is over (idle past the TCP timeout), which the sweep, reading the table meanwhile, finds.
/// The sweep used to clear such a slot by writing its set back whole, undoing a handshake the
/// program recorded there between the read and the write (its backend's answer then found no
/// flow: a reply stranded). It no longer writes the table: no handshake is lost.
#[test]
fn the_sweep_never_loses_a_handshake_the_program_records_while_it_runs() {
    in_fixture_netns(|| {
        let o = DataplaneOptions {
            tcp_idle: std::time::Duration::from_secs(1),
            ..options()
        };
        let vip = sa(VIP, 80);
        let be = sa(backend(1), 8000);
        let mut f = vip_on_one_backend(o);
        let first = tcp(client(20000), vip, TCP_SYN, 1000, 0).build();
        assert_dnat(&f.run(&first), &first, &[be]);
        let template = f
            .ct(&flow_key(client(20000), vip, IPPROTO_TCP))
            .expect("pending");
        assert!(
            f.dp()
                .conntrack_pending(&flow_key(client(20000), vip, IPPROTO_TCP))
        );
        let mut reader = f.dp().conntrack_reader().unwrap();
        let sweeper = Beside::run(move || reader.gc(monotonic_ns()).unwrap() > 0);
        let n = 4_000u16;
        let mut lost = Vec::new();
        for i in 1..=n {
            let c = client(20000 + i);
            let key = flow_key(c, vip, IPPROTO_TCP);
            // Over: idle past the TCP timeout.
            write_pending(&mut f, &key, template, monotonic_ns() - 10_000_000_000);
            let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
            assert_dnat(&f.run(&syn), &syn, &[be]);
            if !f.dp().conntrack_pending(&key) {
                lost.push(c.port());
            }
        }
        let (sweeps, _) = sweeper.stop();
        assert!(sweeps >= 100, "the sweep ran {sweeps} times");
        assert!(
            lost.is_empty(),
            "{} of {n} handshakes lost to {sweeps} sweeps: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    });
}

/// The handshake table's sets hold four pending handshakes each, the way an LRU map keeps its
/// newest entries: a fifth landing in the set takes the oldest's slot, the four newer ones are
/// still answered, and the first one's retry is recorded again on the same backend.
#[test]
fn four_handshakes_pending_in_one_set_survive_a_fifth() {
    in_fixture_netns(|| {
        let f = standard();
        let vip = sa(VIP, 80);
        let cfg = f.dp().options().dp_config();
        let key = |p: u16| flow_key(client(p), vip, IPPROTO_TCP);
        let set = |p: u16| set_of(flow_hash(&key(p), cfg.hash_seed), cfg.syn_sets);
        let ports: Vec<u16> = (42001..60000)
            .filter(|&p| set(p) == set(42000))
            .take(4)
            .collect();
        let ports: Vec<u16> = [42000].into_iter().chain(ports).collect();
        assert_eq!(ports.len(), 5);
        let bes: Vec<SocketAddrV4> = ports
            .iter()
            .map(|&p| {
                let syn = tcp(client(p), vip, TCP_SYN, 1000, 0).build();
                assert_dnat(&f.run(&syn), &syn, &web_backends())
            })
            .collect();
        let pending: Vec<bool> = ports
            .iter()
            .map(|&p| f.dp().conntrack_pending(&key(p)))
            .collect();
        assert_eq!(
            pending,
            [false, true, true, true, true],
            "the oldest made room"
        );
        for (&p, &be) in ports.iter().zip(&bes).skip(1) {
            let synack = from_backend(tcp(be, client(p), TCP_SYN | TCP_ACK, 5000, 1001));
            assert_reply(&f.run(&synack), vip, client(p));
        }
        let synack = from_backend(tcp(bes[0], client(42000), TCP_SYN | TCP_ACK, 5000, 1001));
        assert_untouched(&f.run(&synack), &synack, Reason::PassNoService);
        let syn = tcp(client(42000), vip, TCP_SYN, 1000, 0).build();
        assert_eq!(assert_dnat(&f.run(&syn), &syn, &web_backends()), bes[0]);
        assert!(f.dp().conntrack_pending(&key(42000)));
    });
}

/// An address in network byte order, as the maps hold it.
/// A step run in a loop on another thread, beside the test's own work, until stopped.
struct Beside {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Beside {
    /// Starts looping `step` (true: it did something).
    fn run(mut step: impl FnMut() -> bool + Send + 'static) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut runs, mut hits) = (0u64, 0u64);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                hits += u64::from(step());
                runs += 1;
            }
            (runs, hits)
        });
        Self { stop, thread }
    }

    /// Stops the loop: how many times the step ran, and how many of those did something.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The VIP on :80 with one backend (its lazy service: new flows' handshakes wait in the
/// handshake table), over options `o`.
/// A way of the handshake table another CPU is writing (its check word `SYN_BUSY`, taken by a
/// compare-and-swap before the write) is passed over by a new flow's record, even as the least
/// recently written way: two CPUs recording into one set at once used to write the same way,
/// the later erasing the earlier's handshake while the earlier's full-NAT port claim named it.
/// Here four handshakes fill a set, the first's way is marked being written with the oldest
/// time, and a fifth flow of the set takes the way of the oldest *written* handshake instead.
#[test]
fn a_handshake_way_being_written_is_never_picked_by_another_flow() {
    in_fixture_netns(|| {
        let o = options();
        let vip = sa(VIP, 80);
        let mut f = vip_on_one_backend(o);
        let set = |k: &lb_common::FlowKey| set_of(flow_hash(k, o.hash_seed), o.syn_sets());
        let target = set(&flow_key(client(30000), vip, IPPROTO_TCP));
        let same: Vec<_> = (30000..u16::MAX)
            .map(|p| flow_key(client(p), vip, IPPROTO_TCP))
            .filter(|k| set(k) == target)
            .take(5)
            .collect();
        assert_eq!(same.len(), 5, "five flows of one set");
        // The SYN of flow `k` (client -> vip).
        let syn = |k: &lb_common::FlowKey| {
            let c = SocketAddrV4::new(Ipv4Addr::from(k.saddr.to_ne_bytes()), u16::from_be(k.sport));
            tcp(c, vip, TCP_SYN, 1000, 0).build()
        };
        for k in &same[..4] {
            f.run(&syn(k));
            assert!(f.dp().conntrack_pending(k), "recorded");
        }
        let e = f.ct(&same[0]).expect("the first handshake's entry");
        let busy = SynSlot {
            check: lb_common::syn::SYN_BUSY,
            ..SynSlot::of(
                &same[0],
                &CtEntry {
                    last_seen_ns: 1,
                    ..e
                },
            )
        };
        f.rec.dataplane_mut().pending_write(busy).unwrap();
        let k = same[4];
        f.run(&syn(&k));
        assert!(f.dp().conntrack_pending(&k), "the fifth flow recorded");
        let evicted = same[1..4]
            .iter()
            .filter(|k| !f.dp().conntrack_pending(k))
            .count();
        assert_eq!(
            evicted, 1,
            "the fifth took a written handshake's way, not the one being written"
        );
    });
}

fn vip_on_one_backend(o: DataplaneOptions) -> Fixture {
    let be = [(backend(1), 8000, 1)];
    Fixture::new(o, vec![svc("vip", "10.99.0.1:80", Protocol::Tcp, &be)])
}

/// Writes a handshake of `key` into the handshake table, pending as `e` (a flow's entry) last
/// seen at `last_seen_ns`, and returns its slot.
fn write_pending(
    f: &mut Fixture,
    key: &lb_common::FlowKey,
    e: CtEntry,
    last_seen_ns: u64,
) -> SynSlot {
    let slot = SynSlot::of(key, &CtEntry { last_seen_ns, ..e });
    f.rec.dataplane_mut().pending_write(slot).unwrap();
    slot
}

fn wire_addr(a: Ipv4Addr) -> u32 {
    lb_common::ipv4_to_wire(a.octets())
}

// ---- issue 14: a new DNAT flow's reply entry is written by its first reply ----

#[test]
fn a_syn_flood_leaves_one_entry_per_flow_and_each_answered_flow_gets_its_reply_entry() {
    in_fixture_netns(|| {
        let f = standard();
        let n = 64u16;
        for i in 0..n {
            let syn = tcp(client(41000 + i), sa(VIP, 80), TCP_SYN, 1000, 0).build();
            assert_dnat(&f.run(&syn), &syn, &web_backends());
        }
        let entries = f.dp().conntrack_entries();
        assert_eq!(entries.len(), usize::from(n), "one entry per SYN");
        assert!(entries.iter().all(|(_, e)| e.dir == ct::DIR_FORWARD));
        assert!(
            entries.iter().all(|(k, _)| f.dp().conntrack_unconfirmed(k)),
            "unconfirmed flows stay out of the main map (pending, see lb-common's `syn`)"
        );
        // The one the backend answers gets its reply entry, in CT_NEW beside its forward one,
        // and both move to the main map with the client's ACK.
        let c = client(41000);
        let fwd = f.ct(&flow_key(c, sa(VIP, 80), IPPROTO_TCP)).unwrap();
        let be = SocketAddrV4::new(
            Ipv4Addr::from(fwd.nat_addr.to_ne_bytes()),
            u16::from_be(fwd.nat_port),
        );
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), sa(VIP, 80), c);
        let rkey = flow_key(be, c, IPPROTO_TCP);
        assert!(f.dp().conntrack_unconfirmed(&rkey));
        assert_eq!(f.dp().conntrack_entries().len(), usize::from(n) + 1);
        let ack = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
        assert_eq!(assert_dnat(&f.run(&ack), &ack, &[be]), be);
        assert!(!f.dp().conntrack_unconfirmed(&rkey) && f.ct(&rkey).is_some());
        assert!(
            !f.dp()
                .conntrack_unconfirmed(&flow_key(c, sa(VIP, 80), IPPROTO_TCP))
        );
    });
}

/// What moves a flow to the main map (`ct::starts_unconfirmed`): its client's ACK of the
/// backend's SYN-ACK, or its backend's segment of an established connection; never a segment
/// a blind spoofer can send, nor a backend's RST.
#[test]
fn only_what_a_blind_spoofer_cannot_send_confirms_a_flow() {
    in_fixture_netns(|| {
        let f = standard();
        let vip = sa(VIP, 80);
        // An ACK right behind the SYN, and one with a guessed number after the SYN-ACK.
        let c = client(41400);
        let syn = tcp(c, vip, TCP_SYN, 1000, 0).build();
        let be = assert_dnat(&f.run(&syn), &syn, &web_backends());
        let blind = tcp(c, vip, TCP_ACK, 1001, 77).build();
        assert_dnat(&f.run(&blind), &blind, &[be]);
        let fkey = flow_key(c, vip, IPPROTO_TCP);
        assert!(
            f.dp().conntrack_unconfirmed(&fkey),
            "an ACK before any SYN-ACK"
        );
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), vip, c);
        assert_dnat(&f.run(&blind), &blind, &[be]);
        assert!(
            f.dp().conntrack_unconfirmed(&fkey),
            "a guessed acknowledgment"
        );
        let ack = tcp(c, vip, TCP_ACK, 1001, 5001).build();
        assert_dnat(&f.run(&ack), &ack, &[be]);
        assert!(!f.dp().conntrack_unconfirmed(&fkey) && f.ct(&fkey).is_some());
        // Picked up mid-stream: unconfirmed; the backend's RST confirms nothing, its ACK does.
        for (port, flags, confirms) in [(41401, TCP_RST, false), (41402, TCP_ACK, true)] {
            let c = client(port);
            let seg = tcp(c, vip, TCP_ACK | TCP_PSH, 3000, 9000)
                .with_payload(b"x")
                .build();
            let be = assert_dnat(&f.run(&seg), &seg, &web_backends());
            let (fkey, rkey) = (flow_key(c, vip, IPPROTO_TCP), flow_key(be, c, IPPROTO_TCP));
            assert!(f.dp().conntrack_unconfirmed(&fkey));
            let answer = from_backend(tcp(be, c, flags, 9000, 3001));
            assert_reply(&f.run(&answer), vip, c);
            assert_eq!(!f.dp().conntrack_unconfirmed(&fkey), confirms, "{flags:#x}");
            if confirms {
                assert!(f.ct(&fkey).is_some() && !f.dp().conntrack_unconfirmed(&rkey));
            }
        }
    });
}

#[test]
fn a_first_reply_after_its_backend_left_the_service_is_still_translated() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(41100);
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 1000, 0).build();
        let be = assert_dnat(&f.run(&syn), &syn, &web_backends());
        // The backend leaves (draining), another is added: the flow stays on its backend.
        drop_backend(&mut f, be);
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), sa(VIP, 80), c);
        let ack = tcp(c, sa(VIP, 80), TCP_ACK, 1001, 5001).build();
        assert_eq!(assert_dnat(&f.run(&ack), &ack, &[be]), be);
        // Purged after the drain: the backend's lazy service is forgotten with its flows.
        let drain = std::time::Duration::from_secs(30);
        let purged = f
            .rec
            .purge_drained(std::time::Instant::now() + drain, drain)
            .unwrap();
        assert_eq!(purged, vec![(be.into(), 2)]);
        assert!(f.dp().lazy_reply_services(be, IPPROTO_TCP).is_empty());
    });
}

#[test]
fn a_reply_whose_forward_entry_is_gone_or_elsewhere_is_not_translated() {
    in_fixture_netns(|| {
        let mut f = standard();
        let c = client(41200);
        let syn = tcp(c, sa(VIP, 80), TCP_SYN, 1000, 0).build();
        let be = assert_dnat(&f.run(&syn), &syn, &web_backends());
        let other = web_backends().into_iter().find(|b| *b != be).unwrap();
        // From a backend the flow does not use: no translation, nothing written.
        let wrong = from_backend(tcp(other, c, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_untouched(&f.run(&wrong), &wrong, Reason::PassNoService);
        assert!(f.ct(&flow_key(other, c, IPPROTO_TCP)).is_none());
        // From the flow's backend but where it does not live: not translated, nothing written.
        let synack = from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 5000, 1001));
        let run = f.run_on(&synack, "fx2");
        assert_untouched(&run, &synack, Reason::PassReplyWrongIface);
        assert!(f.ct(&flow_key(be, c, IPPROTO_TCP)).is_none());
        // The forward entry evicted: the reply finds no flow and is not translated.
        f.rec
            .dataplane_mut()
            .conntrack_remove(&flow_key(c, sa(VIP, 80), IPPROTO_TCP))
            .unwrap();
        assert_untouched(&f.run(&synack), &synack, Reason::PassNoService);
        assert!(f.dp().conntrack_entries().is_empty(), "nothing written");
    });
}

#[test]
fn a_spoofed_syn_to_a_second_service_cannot_take_a_lazily_recorded_flows_replies() {
    in_fixture_netns(|| {
        let f = shared_backend();
        let victim = client(41300);
        let syn = tcp(victim, sa(VIP, 80), TCP_SYN, 1000, 0).build();
        let be = assert_dnat(&f.run(&syn), &syn, &[sa(backend(1), 8000)]);
        assert_eq!(
            f.dp().lazy_reply_services(be, IPPROTO_TCP),
            vec![sa(VIP, 80)]
        );
        // Before the backend answers, a spoofer sends a SYN as the victim to the other service
        // on the same backend: the victim's flow holds the reply key though it has no reply
        // entry yet. (A segment past the handshake would take it, as it would take an
        // unanswered reply entry: see the lazily recorded spoofer's test above.)
        let spoof = tcp(victim, sa(HOST, 8080), TCP_SYN, 77, 0).build();
        assert_dropped(&f.run(&spoof), Reason::DropFlowConflict);
        assert!(
            f.ct(&flow_key(victim, sa(HOST, 8080), IPPROTO_TCP))
                .is_none()
        );
        assert!(f.ct(&flow_key(be, victim, IPPROTO_TCP)).is_none());
        // The backend's answer reaches the victim from the service it asked.
        let synack = from_backend(tcp(be, victim, TCP_SYN | TCP_ACK, 5000, 1001));
        assert_reply(&f.run(&synack), sa(VIP, 80), victim);
        // A flow of the other service from another client keeps its reply entry eagerly.
        let c2 = client(41301);
        let syn2 = tcp(c2, sa(HOST, 8080), TCP_SYN, 1000, 0).build();
        assert_dnat(&f.run(&syn2), &syn2, &[be]);
        let rev = f
            .ct(&flow_key(be, c2, IPPROTO_TCP))
            .expect("eager reply entry");
        assert_eq!(rev.nat_port, lb_common::port_to_wire(8080));
    });
}
