//! Hostile IPv6 input to the real TC program through BPF_PROG_TEST_RUN: random and mutated IPv6
//! frames (extension header chains with random kinds and lengths, fragments, payload lengths
//! that lie, ICMPv6 errors quoting service flows, NDP, truncations, random bytes) over live
//! flows. What must hold, as for IPv4 (hostile.rs):
//! - every run ends in exactly one counted exit, and none in an abort (`abort_*` stay zero);
//! - every packet the program rewrote from an input whose checksum was right leaves with a right
//!   checksum (recomputed from scratch over the pseudo-header);
//! - the IPv6 conntrack map stays consistent: every entry names an installed service and
//!   backend, and a forward entry's translation is its backend's address.
//!
//! It runs over DNAT and over full NAT (`both_nat!`), where the backends' packets and errors go
//! to this host's address and the source ports the set-up's flows took.

use std::{
    collections::BTreeSet,
    net::{Ipv6Addr, SocketAddrV6},
    time::Instant,
};

use berth_tests::both_nat;
use berth_tests::{
    fixture::*,
    fixture6::*,
    fuzz::{Rng, seed},
    wire::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    wire6::{self, Ext, IPPROTO_DSTOPTS, IPPROTO_HOPOPTS, Ipv6Packet},
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, ct, v6::ipv6_to_wire};
use lb_userspace::{config::Nat, dataplane::DataplaneOptions};

fn b(n: u8, port: u16) -> SocketAddrV6 {
    sa6(backend6(n), port)
}

fn services(nat: Nat) -> Vec<Svc6> {
    let snat = (nat == Nat::Full).then_some(HOST6);
    vec![
        Svc6 {
            id: 0,
            listen: sa6(VIP6, 80),
            proto: IPPROTO_TCP,
            backends: vec![(b(1, 8000), 1), (b(2, 8000), 1), (b(3, 8000), 1)],
            first_backend_id: 1,
            snat,
        },
        Svc6 {
            id: 1,
            listen: sa6(Ipv6Addr::UNSPECIFIED, 5353),
            proto: IPPROTO_UDP,
            backends: vec![(b(4, 53), 1), (b(5, 53), 1)],
            first_backend_id: 4,
            snat,
        },
    ]
}

/// Whether a frame's checksum verifies; false for frames the checker cannot even walk.
fn checksum_ok(p: &[u8]) -> bool {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| wire6::verify_checksums6(p).is_ok()).unwrap_or(false);
    std::panic::set_hook(hook);
    ok
}

fn random_ext(rng: &mut Rng) -> Ext {
    match rng.below(5) {
        0 => Ext::options(IPPROTO_HOPOPTS, 6 + 8 * rng.below(4) as usize),
        1 => Ext::options(IPPROTO_DSTOPTS, 6 + 8 * rng.below(40) as usize),
        2 => Ext::routing(if rng.chance(50) { 0 } else { rng.byte() }),
        3 => Ext::fragment(
            if rng.chance(50) {
                0
            } else {
                rng.below(8000) as u16
            },
            rng.chance(50),
        ),
        _ => Ext {
            kind: [50, 51, 59, 135, 139, 140, 253][rng.below(7) as usize],
            body: vec![0; 6],
        },
    }
}

/// Where the backends' packets of the set-up's flows go: the client (DNAT), or berth's
/// address and the source ports the flows took (full NAT; empty for DNAT).
struct Peers(Vec<SocketAddrV6>);

impl Peers {
    /// The destination of a backend's packet of the flow from client port `port`.
    fn of(&self, rng: &mut Rng, port: u16) -> SocketAddrV6 {
        if self.0.is_empty() {
            client6(port)
        } else {
            self.0[rng.below(self.0.len() as u64) as usize]
        }
    }
}

/// A valid frame of one of the flows the suite's set-up knows (or a new one).
fn valid(rng: &mut Rng, peers: &Peers) -> Vec<u8> {
    let port = 40000 + rng.below(64) as u16;
    let peer = peers.of(rng, port);
    let flags = [
        TCP_SYN,
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_FIN | TCP_ACK,
        TCP_RST,
    ][rng.below(5) as usize];
    let mut p = match rng.below(6) {
        0 | 1 => Ipv6Packet::tcp(client6(port), sa6(VIP6, 80), flags),
        2 => Ipv6Packet::udp(client6(port), sa6(HOST6, 5353), b"query"),
        3 => Ipv6Packet::tcp(b(1 + rng.below(3) as u8, 8000), peer, flags | TCP_ACK),
        4 => Ipv6Packet::udp(b(4 + rng.below(2) as u8, 53), peer, b"answer"),
        _ => {
            // An ICMPv6 error about a reply or a forwarded packet of a flow.
            let quoted = if rng.chance(50) {
                Ipv6Packet::tcp(sa6(VIP6, 80), client6(port), TCP_ACK).ip()
            } else {
                Ipv6Packet::udp(peer, b(4, 53), b"query").ip()
            };
            let kind = 1 + rng.below(4) as u8;
            let keep = 48 + rng.below(quoted.len() as u64 - 47) as usize;
            let (src, dst) = if rng.chance(50) {
                (ROUTER6, VIP6)
            } else {
                (backend6(4), *peer.ip())
            };
            return wire6::icmp6_error(src, dst, kind, 0, 1280, &quoted[..keep]);
        }
    };
    if rng.chance(30) {
        p = p.with_payload(&vec![rng.byte(); rng.below(300) as usize]);
    }
    if rng.chance(30) {
        p.hop_limit = rng.byte();
    }
    if rng.chance(40) {
        let n = 1 + rng.below(5) as usize;
        p = p.with_ext((0..n).map(|_| random_ext(rng)).collect());
    }
    p.build()
}

/// One hostile frame: valid, mutated, truncated, lying about its length, or random bytes.
fn hostile(rng: &mut Rng, peers: &Peers) -> Vec<u8> {
    let mut p = valid(rng, peers);
    match rng.below(8) {
        0 | 1 => {}
        2 | 3 => {
            // A few random bytes in the headers.
            for _ in 0..1 + rng.below(4) {
                let at = 14 + rng.below((p.len() - 14).min(140) as u64) as usize;
                p[at] = rng.byte();
            }
        }
        4 => {
            let plen = rng.below(0x1_0000) as u16;
            p[18..20].copy_from_slice(&plen.to_be_bytes());
        }
        5 => p.truncate(55 + rng.below(p.len() as u64 - 54) as usize),
        6 => {
            // A random next-header value after a valid fixed header.
            p[20] = rng.byte();
        }
        _ => {
            let n = 54 + rng.below(200) as usize;
            p = (0..n).map(|_| rng.byte()).collect();
            p[12] = 0x86;
            p[13] = 0xdd;
            p[14] = 0x60 | (p[14] & 0x0f);
        }
    }
    p
}

both_nat!(
    hostile_ipv6_frames,
    legitimate_ipv6_flows_of_every_kind_survive_a_flood
);

fn hostile_ipv6_frames(nat: Nat) {
    let n: u64 = std::env::var("BERTH_FUZZ_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let seed = seed();
    println!("seed {seed} (set BERTH_FUZZ_SEED to replay), {n} frames");
    in_fixture6_netns(move || {
        let f = fixture6(Vec::new(), &services(nat));
        let mut rng = Rng(seed);
        // Live flows first, so mutations meet conntrack hits and replies as well as misses.
        let mut peers = Peers(Vec::new());
        for port in 40000..40064u16 {
            let p = Ipv6Packet::tcp(client6(port), sa6(VIP6, 80), TCP_SYN).build();
            let run = try_run(&f, &p).expect("run");
            let q = Ipv6Packet::udp(client6(port), sa6(HOST6, 5353), b"q").build();
            let run_q = try_run(&f, &q).expect("run");
            if nat == Nat::Full {
                for r in [run, run_q] {
                    assert_eq!(r.action, TC_ACT_REDIRECT, "{r:?}");
                    let o = wire6::parse6(&r.out);
                    assert_eq!(*o.src.ip(), HOST6, "full NAT from this host");
                    peers.0.push(o.src);
                }
            }
        }
        let t = Instant::now();
        let (mut runs, mut refused, mut rewritten, mut checked) = (0u64, 0u64, 0u64, 0u64);
        let mut exits = std::collections::BTreeMap::<&str, u64>::new();
        for _ in 0..n {
            let p = hostile(&mut rng, &peers);
            let Some(run) = try_run(&f, &p) else {
                refused += 1;
                continue;
            };
            runs += 1;
            assert!(
                [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&run.action),
                "action {} for {p:02x?}",
                run.action
            );
            let exit = run.exits()[0];
            *exits.entry(exit).or_default() += 1;
            assert!(!exit.starts_with("abort_"), "{exit} for {p:02x?}");
            if run.out != p && run.action != TC_ACT_SHOT {
                rewritten += 1;
                if checksum_ok(&p) {
                    checked += 1;
                    assert!(
                        checksum_ok(&run.out),
                        "rewritten from a valid input with a bad checksum: {p:02x?} -> {:02x?}",
                        run.out
                    );
                }
            }
        }
        println!(
            "{n} frames in {:.1?}: {runs} run, {refused} refused by the kernel (shorter than \
             Ethernet + IPv6), {rewritten} rewritten ({checked} from valid input, all with right \
             checksums); exits {exits:?}",
            t.elapsed()
        );
        assert!(checked > 100, "too few translations to judge: {checked}");
        let totals = f.dp().reason_counters().expect("counters");
        for (r, c) in totals {
            assert!(
                !r.name().starts_with("abort_") || c == 0,
                "{} = {c}",
                r.name()
            );
        }
        // Consistency of the IPv6 conntrack maps.
        let backends: BTreeSet<[u32; 4]> = (1..=5)
            .map(|n| ipv6_to_wire(backend6(n).octets()))
            .collect();
        let entries = f.dp().conntrack6_entries();
        for (k, e) in &entries {
            assert!(e.ct.service_id <= 1, "{k:?} {e:?}");
            assert!((1..=5).contains(&e.ct.backend_id), "{k:?} {e:?}");
            if e.ct.dir == ct::DIR_FORWARD {
                assert!(
                    backends.contains(&e.nat_addr),
                    "forward entry to a non-backend: {e:?}"
                );
                let want = f.dp().backend6(e.ct.backend_id).expect("backend slot");
                assert_eq!(want.addr, e.nat_addr, "forward entry names its backend");
            } else {
                assert_eq!(e.ct.dir, ct::DIR_REPLY, "{e:?}");
                assert!(
                    backends.contains(&k.saddr),
                    "reply key from a non-backend: {k:?}"
                );
            }
            // Full NAT: both halves name berth's address, the reply key holds it; DNAT: none.
            let host = ipv6_to_wire(HOST6.octets());
            assert_eq!(e.ct.full_nat(), nat == Nat::Full, "{k:?} {e:?}");
            if nat == Nat::Full {
                if e.ct.dir == ct::DIR_FORWARD {
                    assert_eq!(e.fnat_addr, host, "{e:?}");
                } else {
                    assert_eq!(k.daddr, host, "{k:?}");
                }
                let snat = u16::from_be(if e.ct.dir == ct::DIR_FORWARD {
                    e.ct.fnat_port
                } else {
                    k.dport
                });
                assert!(
                    snat >= 61000,
                    "source port {snat} outside the range: {k:?} {e:?}"
                );
            }
        }
        println!("{} IPv6 conntrack entries, all consistent", entries.len());
    });
}

/// Runs the TC program on frames as if they arrived on `fx0`, without the reason counters'
/// reads of [`try_run`] (a flood is hundreds of thousands of runs).
struct Runner6<'a> {
    fx: &'a Fixture,
    ctx: [u8; 44],
    out: Vec<u8>,
}

impl<'a> Runner6<'a> {
    fn new(fx: &'a Fixture) -> Self {
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex("fx0").to_ne_bytes());
        Self {
            fx,
            ctx,
            out: vec![0; 2048],
        }
    }

    /// The action and the frame out; checks that nothing redirected anywhere but to a backend
    /// leaves from a backend's address.
    fn run(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        use aya::programs::{TestRun, TestRunOptions};
        let res = self
            .fx
            .dp()
            .program()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut self.out),
                ctx_in: Some(&self.ctx),
                ..TestRunOptions::default()
            })
            .expect("run");
        let out = self.out[..res.data_size_out as usize].to_vec();
        let (a, ip) = (res.return_value, wire6::parse6(&out));
        let backend = |a: &Ipv6Addr| (1..=5).any(|n| backend6(n) == *a);
        if a == TC_ACT_REDIRECT && !backend(ip.dst.ip()) {
            assert!(
                !backend(ip.src.ip()),
                "a backend's address towards a client: {ip:?} from {pkt:02x?}"
            );
        }
        (a, out)
    }
}

/// A legitimate IPv6 flow of the flood test: its client, the service it uses, the backend it
/// landed on and how the backend sees it (`peer`: the client, or this host's address and port
/// under full NAT), and the next sequence numbers each side sends (TCP).
struct Legit6 {
    client: SocketAddrV6,
    service: SocketAddrV6,
    tcp: bool,
    backend: SocketAddrV6,
    peer: SocketAddrV6,
    cseq: u32,
    bseq: u32,
}

/// One side's next packet of a legitimate flow, `from` -> `to`: a TCP segment carrying `payload`
/// (sequence number `seq`, advanced past it; acknowledging `ack`), or a UDP datagram.
fn data(
    tcp: bool,
    (from, to): (SocketAddrV6, SocketAddrV6),
    (seq, ack): (&mut u32, u32),
    payload: &[u8],
) -> Ipv6Packet {
    if !tcp {
        return Ipv6Packet::udp(from, to, payload);
    }
    let p = Ipv6Packet::tcp_seq(from, to, TCP_ACK | TCP_PSH, *seq, ack, payload);
    *seq = seq.wrapping_add(payload.len() as u32);
    p
}

/// One exchange of a legitimate flow: the client's segment (or datagram) must reach its
/// backend (under full NAT its peer address may move: counted in `moved`), and the backend's
/// answer must reach the client from the service it used. `backend_first`: the backend speaks
/// first. Returns what went wrong.
fn exchange6(r: &mut Runner6, l: &mut Legit6, backend_first: bool, moved: &mut u64) -> Vec<String> {
    let mut errs = Vec::new();
    let mut fwd = |r: &mut Runner6, l: &mut Legit6, errs: &mut Vec<String>| {
        let p = data(l.tcp, (l.client, l.service), (&mut l.cseq, l.bseq), b"ping");
        let (a, out) = r.run(&p.build());
        let o = wire6::parse6(&out);
        if a != TC_ACT_REDIRECT || o.dst != l.backend {
            errs.push(format!(
                "{} -> {}: to {} (action {a})",
                l.client, l.service, o.dst
            ));
        } else {
            if o.src != l.peer {
                *moved += 1;
                l.peer = o.src;
            }
            if let Err(e) = wire6::verify_checksums6(&out) {
                errs.push(format!("forward checksum: {e}"));
            }
        }
    };
    if !backend_first {
        fwd(r, l, &mut errs);
    }
    let back = data(l.tcp, (l.backend, l.peer), (&mut l.bseq, l.cseq), b"pong");
    let (a, out) = r.run(&back.build());
    let o = wire6::parse6(&out);
    if a != TC_ACT_REDIRECT || o.src != l.service || o.dst != l.client {
        errs.push(format!(
            "{} <- {}: from {} (action {a})",
            l.client, l.backend, o.src
        ));
    } else if let Err(e) = wire6::verify_checksums6(&out) {
        errs.push(format!("reply checksum: {e}"));
    }
    if backend_first {
        fwd(r, l, &mut errs);
    }
    errs
}

/// The IPv6 counterpart of hostile.rs's flood of legitimate flows: a small conntrack
/// overflowed again and again by UDP flows and completed handshakes from random sources, with
/// spoofed packets among them (the legitimate clients' tuples sent to the other TCP service on
/// the same backends, blind RSTs and FINs on their sessions), while legitimate TCP sessions to
/// two services sharing backends and UDP request/response flows keep exchanging. Every
/// exchange must reach the flow's backend and come back from the service its client used,
/// during the flood and after it (then with the backend speaking first too); no backend
/// address may reach a client.
fn legit_flows_through_a_flood6(rounds: u64, per_round: u64, nat: Nat) {
    let seed = seed();
    println!("seed {seed}, {nat}");
    in_fixture6_netns(move || {
        let o = DataplaneOptions {
            conntrack_size: 1024,
            ..options()
        };
        let snat = (nat == Nat::Full).then_some(HOST6);
        let web = vec![(b(1, 8000), 1), (b(2, 8000), 1), (b(3, 8000), 1)];
        let any = sa6(Ipv6Addr::UNSPECIFIED, 8080);
        let mut svcs = services(nat);
        svcs.push(Svc6 {
            id: 2,
            listen: any,
            proto: IPPROTO_TCP,
            backends: web,
            first_backend_id: 6,
            snat,
        });
        let fx = fixture6_with(o, Vec::new(), &svcs);
        let mut r = Runner6::new(&fx);
        // Removes single entries as the LRU does, beside the runner.
        let mut evictor = fx.dp().conntrack_reader().expect("conntrack handle");
        let mut rng = Rng(seed);
        let (vip, host) = (sa6(VIP6, 80), sa6(HOST6, 8080));
        let mut legit = Vec::new();
        for i in 0..12u16 {
            let service = if i % 2 == 0 { vip } else { host };
            let client = client6(30_000 + i);
            let (a, out) =
                r.run(&Ipv6Packet::tcp_seq(client, service, TCP_SYN, 1000, 0, &[]).build());
            assert_eq!(a, TC_ACT_REDIRECT);
            let o = wire6::parse6(&out);
            let synack = Ipv6Packet::tcp_seq(o.dst, o.src, TCP_SYN | TCP_ACK, 5000, 1001, &[]);
            assert_eq!(r.run(&synack.build()).0, TC_ACT_REDIRECT);
            let ack = Ipv6Packet::tcp_seq(client, service, TCP_ACK, 1001, 5001, &[]);
            assert_eq!(r.run(&ack.build()).0, TC_ACT_REDIRECT);
            legit.push(Legit6 {
                client,
                service,
                tcp: true,
                backend: o.dst,
                peer: o.src,
                cseq: 1001,
                bseq: 5001,
            });
        }
        for i in 0..12u16 {
            let client = client6(31_000 + i);
            let service = sa6(HOST6, 5353);
            let (a, out) = r.run(&Ipv6Packet::udp(client, service, b"hello").build());
            assert_eq!(a, TC_ACT_REDIRECT);
            let o = wire6::parse6(&out);
            legit.push(Legit6 {
                client,
                service,
                tcp: false,
                backend: o.dst,
                peer: o.src,
                cseq: 0,
                bseq: 0,
            });
        }
        let flood_src = |rng: &mut Rng| {
            let h = rng.next_u64();
            sa6(
                Ipv6Addr::new(
                    0xfd00,
                    0x11,
                    0,
                    0,
                    (h >> 48) as u16,
                    (h >> 32) as u16,
                    (h >> 16) as u16,
                    h as u16,
                ),
                1024 + rng.below(60_000) as u16,
            )
        };
        let (mut moved, mut failures, mut flood_packets) = (0u64, Vec::new(), 0u64);
        let t = Instant::now();
        for round in 0..rounds {
            for _ in 0..per_round {
                let src = flood_src(&mut rng);
                match rng.below(10) {
                    0..=3 => {
                        r.run(&Ipv6Packet::udp(src, sa6(HOST6, 5353), b"flood").build());
                        flood_packets += 1;
                    }
                    4..=7 => {
                        // A completed handshake: SYN, the backend's SYN-ACK, the ACK.
                        let service = if rng.chance(50) { vip } else { host };
                        let (a, out) = r
                            .run(&Ipv6Packet::tcp_seq(src, service, TCP_SYN, 1000, 0, &[]).build());
                        flood_packets += 1;
                        if a == TC_ACT_REDIRECT {
                            let o = wire6::parse6(&out);
                            r.run(
                                &Ipv6Packet::tcp_seq(
                                    o.dst,
                                    o.src,
                                    TCP_SYN | TCP_ACK,
                                    7000,
                                    1001,
                                    &[],
                                )
                                .build(),
                            );
                            r.run(
                                &Ipv6Packet::tcp_seq(src, service, TCP_ACK, 1001, 7001, &[])
                                    .build(),
                            );
                            flood_packets += 2;
                        }
                    }
                    8 => {
                        // A legitimate client's tuple, to the other service on the same backends.
                        let l = &legit[rng.below(12) as usize];
                        let other = if l.service == vip { host } else { vip };
                        let flags = [TCP_ACK, TCP_SYN, TCP_ACK | TCP_PSH][rng.below(3) as usize];
                        r.run(&Ipv6Packet::tcp(l.client, other, flags).build());
                        flood_packets += 1;
                    }
                    _ => {
                        // A blind RST or FIN on a legitimate session, as in the IPv4 flood:
                        // half the time after its reply half was evicted alone, half after a
                        // blind segment or a bare SYN at the same number, far outside the
                        // session's window. A confirmed session stays open.
                        let l = &legit[rng.below(12) as usize];
                        let fkey = flow_key6(l.client, l.service, IPPROTO_TCP);
                        if rng.chance(50) {
                            let rkey = flow_key6(l.backend, l.peer, IPPROTO_TCP);
                            evictor.remove6(&rkey).expect("evict a reply half");
                        }
                        let confirmed = fx
                            .dp()
                            .conntrack6_main_get(&fkey)
                            .is_some_and(|e| e.ct.state == ct::STATE_OPEN);
                        let seq = l
                            .cseq
                            .wrapping_add(0x8000_0000)
                            .wrapping_add(rng.below(1 << 30) as u32);
                        if rng.chance(50) {
                            let first = if rng.chance(50) { TCP_ACK } else { TCP_SYN };
                            r.run(
                                &Ipv6Packet::tcp_seq(l.client, l.service, first, seq, 0, &[])
                                    .build(),
                            );
                            flood_packets += 1;
                        }
                        let flags = if rng.chance(50) {
                            TCP_RST
                        } else {
                            TCP_FIN | TCP_ACK
                        };
                        r.run(
                            &Ipv6Packet::tcp_seq(l.client, l.service, flags, seq, 0, &[]).build(),
                        );
                        flood_packets += 1;
                        if confirmed
                            && fx
                                .dp()
                                .conntrack6_get(&fkey)
                                .is_none_or(|e| e.ct.state != ct::STATE_OPEN)
                        {
                            failures.push(format!(
                                "round {round}: a blind segment closed {} -> {}",
                                l.client, l.service
                            ));
                        }
                    }
                }
            }
            for l in &mut legit {
                for e in exchange6(&mut r, l, false, &mut moved) {
                    failures.push(format!("round {round}: {e}"));
                }
            }
        }
        let took = t.elapsed();
        let mut after = Vec::new();
        for l in &mut legit {
            after.extend(exchange6(&mut r, l, false, &mut moved));
            after.extend(exchange6(&mut r, l, true, &mut moved));
        }
        drop(r);
        let totals: std::collections::BTreeMap<&str, u64> = fx
            .dp()
            .reason_counters()
            .expect("counters")
            .into_iter()
            .map(|(r, n)| (r.name(), n))
            .collect();
        println!(
            "{flood_packets} flood packets in {took:.1?}, {} legitimate flows exchanging every \
             {per_round}: {} failures during the flood, {} after it; halves rebuilt {}, \
             mid-stream pickups {}, conflicting flows refused {}, FIN/RST outside the window \
             ignored {}; flows on a new source {moved}; {} IPv6 entries at the end",
            legit.len(),
            failures.len(),
            after.len(),
            totals["event_ct_rebuilt"],
            totals["event_ct_midstream_pickup"],
            totals["drop_flow_conflict"],
            totals["event_ct_close_ignored"],
            fx.dp().conntrack6_entries().len(),
        );
        assert!(after.is_empty(), "after the flood: {after:#?}");
        assert!(failures.is_empty(), "during the flood: {failures:#?}");
        if nat == Nat::Dnat {
            assert_eq!(
                moved, 0,
                "a DNAT flow's packets always leave from its client"
            );
        }
        assert!(
            totals["event_ct_rebuilt"] + totals["event_ct_midstream_pickup"] > 0,
            "the flood never evicted a legitimate flow's entry: not a test"
        );
        for (name, n) in &totals {
            assert!(!name.starts_with("abort_") || *n == 0, "{name} = {n}");
        }
    });
}

fn legitimate_ipv6_flows_of_every_kind_survive_a_flood(nat: Nat) {
    legit_flows_through_a_flood6(40, 600, nat);
}

#[test]
#[ignore = "soak: cargo xtask soak"]
fn soak_legitimate_ipv6_flows_through_a_long_flood() {
    legit_flows_through_a_flood6(400, 6000, Nat::Dnat);
    legit_flows_through_a_flood6(400, 6000, Nat::Full);
}
