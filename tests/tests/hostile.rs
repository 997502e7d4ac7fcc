//! Hostile input to the real TC program through BPF_PROG_TEST_RUN: a million random and mutated
//! packets, and a conntrack flood. Each test prints what it measured. Longer variants run under
//! `cargo xtask soak`.
//!
//! What must hold:
//! - every run ends in exactly one counted exit, and no hostile packet makes the program abort
//!   (`abort_*` stay zero);
//! - every packet the program rewrote, from an input whose checksums were right, leaves with right
//!   checksums (recomputed from scratch);
//! - the maps stay consistent: every conntrack entry names a live backend and service, and a
//!   forward entry's translation is its backend's address;
//! - under a flood of new flows the conntrack map never grows past its size, and established
//!   flows keep their backends.
//!
//! Every test runs over DNAT and over full NAT (`both_nat!`), where the backends' packets go to
//! this host's address and a port of the source range instead of the client.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions};
use berth_tests::both_nat;
use berth_tests::{
    fixture::*,
    fuzz::{Rng, seed},
    wire::{self, Ipv4Packet, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};
use lb_common::{Reason, ct};
use lb_userspace::{
    config::{Nat, Protocol},
    dataplane::DataplaneOptions,
};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn backends() -> Vec<(Ipv4Addr, u16, u32)> {
    vec![
        (backend(1), 8000, 1),
        (backend(2), 8000, 2),
        (backend(3), 8000, 1),
    ]
}

fn services(nat: Nat) -> Vec<lb_userspace::config::Service> {
    with_nat(
        vec![
            svc("vip", "10.99.0.1:80", Protocol::Tcp, &backends()),
            svc("any", "0.0.0.0:8080", Protocol::Tcp, &backends()),
            svc(
                "dns",
                "0.0.0.0:5353",
                Protocol::Udp,
                &[(backend(4), 53, 1), (backend(5), 53, 1)],
            ),
        ],
        nat,
    )
}

/// The address the backends' packets of a flow from `client` go to: the client itself for
/// DNAT, this host and a port of the source range for full NAT (`pick` chooses which).
fn peer_of(client: SocketAddrV4, nat: Nat, pick: u64) -> SocketAddrV4 {
    match nat {
        Nat::Dnat => client,
        Nat::Full => {
            let n = u64::from(SNAT_PORTS.len());
            sa(HOST, SNAT_PORTS.first + (pick % n) as u16)
        }
    }
}

/// The program run once on `pkt` as if it arrived on fx0: Some((action, output)), or None when
/// the kernel refused the input itself (frames shorter than Ethernet or than an IPv4 header).
struct Runner<'a> {
    fx: &'a Fixture,
    ctx: [u8; 44],
    out: Vec<u8>,
}

impl<'a> Runner<'a> {
    fn new(fx: &'a Fixture) -> Self {
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex("fx0").to_ne_bytes());
        Self {
            fx,
            ctx,
            out: vec![0; 2048],
        }
    }

    fn run(&mut self, pkt: &[u8]) -> Option<(u32, &[u8])> {
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
            .ok()?;
        Some((res.return_value, &self.out[..res.data_size_out as usize]))
    }
}

fn reason_totals(fx: &Fixture) -> BTreeMap<&'static str, u64> {
    fx.dp()
        .reason_counters()
        .expect("reason counters")
        .into_iter()
        .map(|(r, n)| (r.name(), n))
        .collect()
}

fn exits(totals: &BTreeMap<&'static str, u64>) -> u64 {
    Reason::ALL
        .iter()
        .filter(|r| r.is_exit())
        .map(|r| totals[r.name()])
        .sum()
}

/// Every conntrack entry names a live backend and a valid service, and a forward entry
/// translates to its backend's address (a reply entry comes from it); with full NAT, both
/// halves are marked so, a forward entry's source is this host and a port of the range, and
/// a reply entry is keyed to that address and port.
fn assert_maps_consistent(fx: &Fixture, o: &DataplaneOptions, nat: Nat) -> usize {
    let entries = fx.dp().conntrack_entries();
    for (k, e) in &entries {
        assert!(e.service_id < o.max_services, "{k:?} {e:?}");
        assert!(
            e.backend_id != 0 && e.backend_id < o.max_backends,
            "{k:?} {e:?}"
        );
        let b = fx.dp().backend(e.backend_id).expect("backend slot");
        assert_ne!(
            b.addr, 0,
            "entry points at an empty backend slot: {k:?} {e:?}"
        );
        match e.dir {
            ct::DIR_FORWARD => assert_eq!((e.nat_addr, e.nat_port), (b.addr, b.port), "{k:?}"),
            ct::DIR_REPLY => assert_eq!((k.saddr, k.sport), (b.addr, b.port), "{k:?}"),
            d => panic!("entry with direction {d}: {k:?} {e:?}"),
        }
        assert_eq!(e.full_nat(), nat == Nat::Full, "{k:?} {e:?}");
        if nat == Nat::Full {
            let (addr, port) = if e.dir == ct::DIR_FORWARD {
                (e.fnat_addr, e.fnat_port)
            } else {
                (k.daddr, k.dport)
            };
            assert_eq!(addr, lb_common::ipv4_to_wire(HOST.octets()), "{k:?} {e:?}");
            let port = u16::from_be(port);
            assert!(
                (SNAT_PORTS.first..=SNAT_PORTS.last).contains(&port),
                "{k:?} {e:?}"
            );
        }
    }
    entries.len()
}

/// A valid frame the dataplane has an opinion about.
fn base_packet(rng: &mut Rng, nat: Nat) -> Vec<u8> {
    let client = if rng.chance(70) {
        Ipv4Addr::new(10, 10, 0, 2 + rng.below(200) as u8)
    } else {
        Ipv4Addr::from(rng.next_u64() as u32)
    };
    let sport = 1024 + rng.below(60_000) as u16;
    let flags = match rng.below(7) {
        0 | 1 => TCP_SYN,
        2 => TCP_ACK,
        3 => TCP_ACK | TCP_PSH,
        4 => TCP_FIN | TCP_ACK,
        5 => TCP_RST,
        _ => rng.byte(),
    };
    let payload: Vec<u8> = (0..rng.below(64)).map(|_| rng.byte()).collect();
    let mut p = match rng.below(6) {
        0 => Ipv4Packet::tcp(sa(client, sport), sa(VIP, 80), flags),
        1 => Ipv4Packet::tcp(sa(client, sport), sa(HOST, 8080), flags),
        2 => Ipv4Packet::udp(sa(client, sport), sa(HOST, 5353), &payload),
        3 => Ipv4Packet::tcp(
            sa(backend(1 + rng.below(3) as u8), 8000),
            peer_of(sa(client, sport), nat, rng.next_u64()),
            flags,
        ),
        4 => Ipv4Packet::udp(
            sa(backend(4), 53),
            peer_of(sa(client, sport), nat, rng.next_u64()),
            &payload,
        ),
        _ => Ipv4Packet::tcp(
            sa(client, sport),
            sa(Ipv4Addr::from(rng.next_u64() as u32), rng.byte().into()),
            flags,
        ),
    };
    p = p.with_payload(&payload);
    if rng.chance(10) {
        p.options = (0..1 + rng.below(40)).map(|_| rng.byte()).collect();
    }
    if rng.chance(5) {
        p.frag = rng.next_u64() as u16;
    }
    if let L4::Udp { zero_csum, .. } = &mut p.l4 {
        *zero_csum = rng.chance(10);
    }
    p.build()
}

/// An ICMP destination-unreachable quoting a service flow.
fn icmp_error(rng: &mut Rng) -> Vec<u8> {
    let quoted = Ipv4Packet::tcp(sa(CLIENT, 40_000), sa(VIP, 80), TCP_SYN).build();
    let mut icmp = vec![3, rng.below(16) as u8, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let c = wire::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&[10, 20, 0, 1]);
    ip.extend_from_slice(&CLIENT.octets());
    let tot = (ip.len() + icmp.len()) as u16;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    let c = wire::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = wire::ethernet(fx0_mac(), CLIENT_MAC, 0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// One hostile frame: valid, mutated, with random header fields, truncated, or random bytes.
fn hostile(rng: &mut Rng, icmp: &[u8], nat: Nat) -> Vec<u8> {
    let mut p = base_packet(rng, nat);
    match rng.below(10) {
        0 | 1 => {} // valid
        2 | 3 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(p.len() as u64) as usize;
                p[i] = rng.byte();
            }
        }
        4 => {
            // Random values in the fields the parser trusts least.
            match rng.below(6) {
                0 => p[14] = 0x40 | (rng.byte() & 0x0f), // IHL
                1 => p[16..18].copy_from_slice(&(rng.next_u64() as u16).to_be_bytes()), // total length
                2 => p[20..22].copy_from_slice(&(rng.next_u64() as u16).to_be_bytes()), // fragment
                3 => p[23] = rng.byte(),                                                // protocol
                4 => p[14] = rng.byte(), // version + IHL
                _ => {
                    let ihl = usize::from(p[14] & 0x0f) * 4;
                    if p.len() > 14 + ihl + 13 {
                        p[14 + ihl + 12] = rng.byte(); // TCP data offset
                        p[14 + ihl + 4] = rng.byte(); // UDP length, high byte
                    }
                }
            }
            if rng.chance(50) {
                // Fix the header checksum so the mutation gets past a checksum-minded parser.
                let ihl = (usize::from(p[14] & 0x0f) * 4).clamp(20, p.len() - 14);
                p[24] = 0;
                p[25] = 0;
                let c = wire::checksum(&p[14..14 + ihl]);
                p[24..26].copy_from_slice(&c.to_be_bytes());
            }
        }
        5 | 6 => p.truncate(rng.below(p.len() as u64 + 1) as usize),
        7 => {
            let n = rng.below(200) as usize;
            p = (0..n).map(|_| rng.byte()).collect();
            if p.len() >= 15 && rng.chance(70) {
                p[12] = 0x08;
                p[13] = 0x00;
                p[14] = 0x45;
            }
        }
        8 => p = icmp.to_vec(),
        _ => {
            // Bad L4 checksum on an otherwise valid packet.
            let last = p.len() - 1;
            p[last] ^= 0x5a;
        }
    }
    p
}

#[derive(Default)]
struct Stats {
    runs: u64,
    refused: u64,
    rewritten: u64,
    checked: u64,
}

/// Runs `n` hostile packets (plus every truncation of a few valid ones) and checks every run.
fn hostile_packets(n: u64, nat: Nat) {
    let seed = seed();
    println!("seed {seed} (set BERTH_FUZZ_SEED to replay), {nat}");
    in_fixture_netns(move || {
        let o = options();
        let fx = Fixture::new(o, services(nat));
        let mut rng = Rng(seed);
        let icmp = icmp_error(&mut rng);
        let mut runner = Runner::new(&fx);
        let mut s = Stats::default();
        let t = Instant::now();

        let check = |pkt: &[u8], runner: &mut Runner, s: &mut Stats| {
            let Some((action, out)) = runner.run(pkt) else {
                s.refused += 1;
                return;
            };
            s.runs += 1;
            assert!(
                [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&action),
                "action {action} for {pkt:02x?}"
            );
            if out != pkt && action != TC_ACT_SHOT {
                s.rewritten += 1;
                if wire::verify_checksums(pkt).is_ok() {
                    s.checked += 1;
                    if let Err(e) = wire::verify_checksums(out) {
                        panic!(
                            "rewritten packet has a wrong checksum: {e}\nin  {pkt:02x?}\nout {out:02x?}"
                        );
                    }
                }
            }
        };

        // Every truncation of a few valid frames, and of one with IP options.
        let mut with_opts = Ipv4Packet::tcp(sa(CLIENT, 40_001), sa(VIP, 80), TCP_SYN);
        with_opts.options = vec![0x94, 4, 0, 0, 1, 1, 1, 0];
        let syn = Ipv4Packet::tcp(sa(CLIENT, 40_000), sa(VIP, 80), TCP_SYN).build();
        let mut bases = vec![
            syn.clone(),
            Ipv4Packet::udp(sa(CLIENT, 40_000), sa(HOST, 5353), b"query").build(),
            Ipv4Packet::tcp(sa(backend(1), 8000), sa(CLIENT, 40_000), TCP_ACK).build(),
            with_opts.build(),
            icmp.clone(),
        ];
        // ICMP errors quoting the flow the SYN above starts, from either side: translated.
        let peer = {
            let (_, out) = runner.run(&syn).expect("run");
            let o = wire::parse(out);
            s.runs += 1;
            o.src
        };
        let router = Ipv4Addr::new(10, 10, 0, 254);
        let reply = Ipv4Packet::tcp(sa(VIP, 80), sa(CLIENT, 40_000), TCP_SYN | TCP_ACK).build();
        bases.push(wire::icmp_error(router, VIP, 3, 4, 1280, &reply, 8));
        for (b, _, _) in backends() {
            let sent = Ipv4Packet::tcp(peer, sa(b, 8000), TCP_SYN).build();
            bases.push(wire::icmp_error(b, *peer.ip(), 3, 3, 0, &sent, 28));
        }
        for b in &bases {
            for len in 0..=b.len() {
                check(&b[..len], &mut runner, &mut s);
            }
        }
        let quoting: Vec<Vec<u8>> = bases[4..].to_vec();
        while s.runs + s.refused < n {
            let icmp = &quoting[rng.below(quoting.len() as u64) as usize];
            let p = hostile(&mut rng, icmp, nat);
            check(&p, &mut runner, &mut s);
        }
        let Stats {
            runs,
            refused,
            rewritten,
            checked,
        } = s;
        let took = t.elapsed();
        let totals = reason_totals(&fx);
        let entries = assert_maps_consistent(&fx, &o, nat);
        println!(
            "{} packets in {took:.1?}: {runs} run, {refused} refused by the kernel before the \
             program (too short), {rewritten} rewritten ({checked} from valid input, all with \
             right checksums); {entries} conntrack entries, all consistent",
            runs + refused
        );
        let nonzero: Vec<String> = totals
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        println!("counters: {}", nonzero.join(" "));
        assert_eq!(exits(&totals), runs, "every run counts exactly one exit");
        assert_eq!(totals["abort_rewrite"], 0);
        assert_eq!(totals["abort_map"], 0);
        assert!(checked > n / 10, "too few checked rewrites: {checked}");
        assert!(
            refused < n / 5,
            "most input never reached the program: {refused}"
        );
    });
}

both_nat!(
    a_million_hostile_packets_never_abort_corrupt_or_confuse_the_maps,
    a_conntrack_flood_stays_within_the_map_and_established_flows_keep_their_backends,
    legitimate_flows_of_every_kind_survive_a_flood_of_udp_flows_and_completed_handshakes,
);

fn a_million_hostile_packets_never_abort_corrupt_or_confuse_the_maps(nat: Nat) {
    hostile_packets(1_000_000, nat);
}

#[test]
#[ignore = "soak: cargo xtask soak"]
fn soak_ten_million_hostile_packets() {
    hostile_packets(10_000_000, Nat::Dnat);
    hostile_packets(10_000_000, Nat::Full);
}

/// Floods a service with `flood` blind new flows from random sources while `long` established
/// flows send a packet every `every` flood events; halfway through, a fourth backend joins (so
/// a flow whose entry the flood evicted could land elsewhere). With full NAT an established flow
/// must also keep its source port (the backend would not know it on another). A blind spoofer
/// never sees the backend's packets, so its flows are: SYNs; handshakes whose ACK does not
/// acknowledge the backend's SYN-ACK (sent at once after the SYN, or after the SYN-ACK with a
/// guessed number); and segments of no connection, which the backend answers with a RST. None
/// may evict an established flow's entries.
fn conntrack_flood(flood: u64, long: usize, every: u64, nat: Nat) {
    let seed = seed();
    println!("seed {seed}, {nat}");
    in_fixture_netns(move || {
        let o = DataplaneOptions {
            conntrack_size: 8192,
            ..options()
        };
        let mut fx = Fixture::new(o, services(nat));
        let mut rng = Rng(seed);
        let mut runner = Runner::new(&fx);
        // The long-lived flows: established, with their backend remembered.
        let flows: Vec<SocketAddrV4> = (0..long).map(|i| sa(CLIENT, 20_000 + i as u16)).collect();
        let mut pinned = Vec::new();
        for c in &flows {
            // Established: the SYN, the backend's SYN-ACK, and the client's ACK of it.
            let syn = Ipv4Packet::tcp_seq(*c, sa(VIP, 80), TCP_SYN, 1000, 0, &[]).build();
            let (action, out) = runner.run(&syn).expect("run");
            assert_eq!(action, TC_ACT_REDIRECT);
            let o = wire::parse(out);
            pinned.push((o.dst, o.src));
            let synack = Ipv4Packet::tcp_seq(o.dst, o.src, TCP_SYN | TCP_ACK, 5000, 1001, &[]);
            assert_eq!(
                runner.run(&from_backend(synack)).expect("run").0,
                TC_ACT_REDIRECT
            );
            let ack = Ipv4Packet::tcp_seq(*c, sa(VIP, 80), TCP_ACK, 1001, 5001, &[]).build();
            assert_eq!(runner.run(&ack).expect("run").0, TC_ACT_REDIRECT);
        }
        let keys: Vec<_> = flows
            .iter()
            .map(|c| flow_key(*c, sa(VIP, 80), lb_common::IPPROTO_TCP))
            .collect();
        let (mut evicted, mut moved, mut max_entries) = (0u64, 0u64, 0usize);
        let t = Instant::now();
        for i in 0..flood {
            let src = sa(
                Ipv4Addr::from(0x0b00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff)),
                1024 + rng.below(60_000) as u16,
            );
            let syn = Ipv4Packet::tcp(src, sa(VIP, 80), TCP_SYN).build();
            let blind_ack = |seq: u32, ack: u32| {
                Ipv4Packet::tcp_seq(src, sa(VIP, 80), TCP_ACK, seq, ack, &[]).build()
            };
            match i % 4 {
                0 => {
                    runner.run(&syn).expect("run");
                }
                1 => {
                    // The ACK right behind the SYN, before any SYN-ACK.
                    runner.run(&syn).expect("run");
                    runner
                        .run(&blind_ack(1001, rng.next_u64() as u32))
                        .expect("run");
                }
                2 => {
                    // The SYN-ACK passes; the spoofer's ACK guesses its number.
                    let (action, out) = runner.run(&syn).expect("run");
                    if action == TC_ACT_REDIRECT {
                        let o = wire::parse(out);
                        let synack =
                            Ipv4Packet::tcp_seq(o.dst, o.src, TCP_SYN | TCP_ACK, 7000, 1001, &[]);
                        runner.run(&from_backend(synack)).expect("run");
                    }
                    runner
                        .run(&blind_ack(1001, rng.next_u64() as u32))
                        .expect("run");
                }
                _ => {
                    // A segment of no connection; the backend answers it with a RST.
                    let (action, out) = runner
                        .run(&blind_ack(rng.next_u64() as u32, rng.next_u64() as u32))
                        .expect("run");
                    if action == TC_ACT_REDIRECT {
                        let o = wire::parse(out);
                        let rst = Ipv4Packet::tcp_seq(o.dst, o.src, TCP_RST, 2000, 0, &[]);
                        runner.run(&from_backend(rst)).expect("run");
                    }
                }
            }
            if (i + 1) % every == 0 {
                for (j, c) in flows.iter().enumerate() {
                    if fx.dp().conntrack_get(&keys[j]).is_none() {
                        evicted += 1;
                    }
                    let ack = Ipv4Packet::tcp(*c, sa(VIP, 80), TCP_ACK | TCP_PSH)
                        .with_payload(b"still here")
                        .build();
                    let (action, out) = runner.run(&ack).expect("run");
                    assert_eq!(action, TC_ACT_REDIRECT);
                    wire::verify_checksums(out).expect("checksums");
                    let o = wire::parse(out);
                    if (o.dst, o.src) != pinned[j] {
                        moved += 1;
                    }
                }
            }
            if (i + 1) % (flood / 4).max(1) == 0 {
                max_entries = max_entries.max(fx.dp().conntrack_entries().len());
            }
            if i + 1 == flood / 2 {
                let mut more = services(nat);
                let mut b = backends();
                b.push((backend(6), 8000, 1));
                more[0] =
                    with_nat(vec![svc("vip", "10.99.0.1:80", Protocol::Tcp, &b)], nat).remove(0);
                drop(runner);
                fx.apply(more);
                runner = Runner::new(&fx);
            }
        }
        let took = t.elapsed();
        let totals = reason_totals(&fx);
        let entries = assert_maps_consistent(&fx, &o, nat);
        println!(
            "flood of {flood} blind new flows in {took:.1?} ({:.0} flows/s) against a conntrack of {} \
             entries (+{} for unconfirmed flows): at most {max_entries} entries seen, {entries} at the end; {long} established \
             flows checked every {every} flood packets: {evicted} times an established flow's \
             entry had been evicted (picked up again mid-stream: {} pickups), {moved} answers \
             from another backend or source; source ports taken {} times, exhausted {}",
            flood as f64 / took.as_secs_f64(),
            o.conntrack_size,
            o.ct_new_size(),
            totals["event_ct_midstream_pickup"],
            totals["event_snat_port_taken"],
            totals["drop_snat_exhausted"],
        );
        // The maps' capacity, and the handshake table's (fixed) slots: a pending full-NAT
        // handshake is listed with its reply half too, which its port's claim stands for
        // (lb-common's `claim`) until its backend answers, no map entry.
        let slots = o.syn_sets() * lb_common::syn::SYN_WAYS;
        let cap = (o.conntrack_size + o.ct_new_size() + 2 * slots) as usize;
        assert!(
            max_entries <= cap && entries <= cap,
            "{max_entries} {entries} > {cap}"
        );
        assert_eq!(
            moved, 0,
            "established flows changed backend (or source port) under the flood"
        );
        assert_eq!(
            evicted, 0,
            "established flows' entries evicted by blind flows"
        );
        assert_eq!(totals["abort_rewrite"] + totals["abort_map"], 0);
        // A fraction of each backend's source ports is live at any time: independent tries
        // almost never all meet a taken port (a fixed stride between tries clustered and
        // dropped 1141 of these flows).
        assert!(
            totals["drop_snat_exhausted"] <= flood / 100_000,
            "{} new flows found no free source port",
            totals["drop_snat_exhausted"]
        );
    });
}

fn a_conntrack_flood_stays_within_the_map_and_established_flows_keep_their_backends(nat: Nat) {
    conntrack_flood(1_000_000, 64, 20_000, nat);
}

#[test]
#[ignore = "soak: cargo xtask soak"]
fn soak_conntrack_flood_of_twenty_million_flows() {
    conntrack_flood(20_000_000, 256, 50_000, Nat::Dnat);
    conntrack_flood(20_000_000, 256, 50_000, Nat::Full);
}

/// One legitimate flow of the flood test: a TCP session or a UDP request/response exchange.
struct Legit {
    client: SocketAddrV4,
    service: SocketAddrV4,
    tcp: bool,
    backend: SocketAddrV4,
    /// Whom the backend's packets go to: the client (DNAT), or this host's address and the
    /// flow's port (full NAT; a flow whose entries were all evicted may get another port).
    peer: SocketAddrV4,
    /// Next sequence numbers of the client and of the backend (TCP).
    cseq: u32,
    bseq: u32,
}

/// Every packet the program translated towards a client carries no backend address, in its
/// own header or, for an ICMP error, in the packet it quotes; with full NAT, every packet
/// translated towards a backend carries no client address either.
fn assert_no_backend_towards_client(action: u32, input: &[u8], out: &[u8], nat: Nat) {
    if action == TC_ACT_OK && out == input {
        return; // untouched: not translated by berth
    }
    if out.len() < 34 || u16::from_be_bytes([out[12], out[13]]) != wire::ETH_P_IP {
        return;
    }
    let ip = &out[14..];
    let is_backend = |a: Ipv4Addr| a.octets()[..3] == [10, 20, 0];
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    if is_backend(dst) {
        // Towards a backend.
        if nat == Nat::Full {
            assert_eq!(
                src, HOST,
                "a client address leaves towards {dst}: {out:02x?}"
            );
            if ip[9] == 1 {
                let e = wire::parse_icmp_error(out);
                assert_eq!(
                    *e.inner_dst.ip(),
                    HOST,
                    "an ICMP error quotes a client: {e:?}"
                );
            }
        }
        return;
    }
    assert!(
        !is_backend(src),
        "a backend address leaves towards {dst}: {out:02x?}"
    );
    if ip[9] == 1 {
        let e = wire::parse_icmp_error(out);
        assert!(
            !is_backend(*e.inner_src.ip()) && !is_backend(*e.inner_dst.ip()),
            "an ICMP error towards {dst} quotes a backend: {e:?}"
        );
    }
}

/// Runs `pkt`, checking that nothing translated carries a backend address towards a client.
fn run(runner: &mut Runner, pkt: &[u8], nat: Nat) -> (u32, Vec<u8>) {
    let (a, out) = runner.run(pkt).expect("run");
    assert_no_backend_towards_client(a, pkt, out, nat);
    (a, out.to_vec())
}

/// The client's next packet of a legitimate flow.
fn legit_forward(l: &mut Legit) -> Vec<u8> {
    if l.tcp {
        let mut p = Ipv4Packet::tcp(l.client, l.service, TCP_ACK | TCP_PSH);
        p.l4 = L4::Tcp {
            flags: TCP_ACK | TCP_PSH,
            seq: l.cseq,
            ack: l.bseq,
            payload: b"ping".to_vec(),
        };
        l.cseq += 4;
        p.build()
    } else {
        Ipv4Packet::udp(l.client, l.service, b"ping").build()
    }
}

/// The backend's next packet of a legitimate flow.
fn legit_back(l: &mut Legit) -> Vec<u8> {
    let mut p = if l.tcp {
        let mut p = Ipv4Packet::tcp(l.backend, l.peer, TCP_ACK | TCP_PSH);
        p.l4 = L4::Tcp {
            flags: TCP_ACK | TCP_PSH,
            seq: l.bseq,
            ack: l.cseq,
            payload: b"pong".to_vec(),
        };
        l.bseq += 4;
        p
    } else {
        Ipv4Packet::udp(l.backend, l.peer, b"pong")
    };
    p.src_mac = backend_mac(*l.backend.ip());
    p.build()
}

/// One exchange of a legitimate flow (`backend_first`: the backend speaks first; `icmp`: the
/// backend also answers the client's packet with port unreachable, UDP only). Returns what
/// went wrong, and counts in `moved` the forward packets that left from another source than
/// the flow's (full NAT: a new port after its entries were all evicted).
fn exchange(
    runner: &mut Runner,
    l: &mut Legit,
    backend_first: bool,
    icmp: bool,
    (nat, moved): (Nat, &mut u64),
) -> Vec<String> {
    let mut errs = Vec::new();
    let mut check_fwd = |runner: &mut Runner, l: &mut Legit, errs: &mut Vec<String>| {
        let (a, out) = run(runner, &legit_forward(l), nat);
        let o = wire::parse(&out);
        if a != TC_ACT_REDIRECT || o.dst != l.backend {
            errs.push(format!(
                "{} -> {}: to {} (action {a})",
                l.client, l.service, o.dst
            ));
        } else if o.src != l.peer {
            *moved += 1;
            l.peer = o.src;
        }
        out
    };
    let mut sent = None;
    if !backend_first {
        sent = Some(check_fwd(runner, l, &mut errs));
    }
    let (a, out) = run(runner, &legit_back(l), nat);
    let o = wire::parse(&out);
    if a != TC_ACT_REDIRECT || o.src != l.service || o.dst != l.client {
        errs.push(format!(
            "{} <- {}: from {} (action {a})",
            l.client, l.backend, o.src
        ));
    } else if let Err(e) = wire::verify_checksums(&out) {
        errs.push(format!("reply checksum: {e}"));
    }
    if backend_first {
        sent = Some(check_fwd(runner, l, &mut errs));
    }
    if icmp
        && !l.tcp
        && let Some(sent) = sent
    {
        let mut e = wire::icmp_error(*l.backend.ip(), *l.peer.ip(), 3, 3, 0, &sent, 16);
        e[6..12].copy_from_slice(&backend_mac(*l.backend.ip()));
        let (a, out) = run(runner, &e, nat);
        let q = (a == TC_ACT_REDIRECT).then(|| wire::parse_icmp_error(&out));
        if q.as_ref()
            .is_none_or(|q| q.inner_dst != l.service || q.src != *l.service.ip())
        {
            errs.push(format!(
                "icmp error about {} -> {}: {q:?}",
                l.client, l.service
            ));
        }
    }
    errs
}

/// A flood of UDP flows and of completed TCP handshakes from random sources, plus spoofed
/// packets (blind RSTs, and the legitimate clients' tuples sent to the other service on the same
/// backends), overflowing a small conntrack again and again, while legitimate flows of every
/// kind keep talking: TCP sessions to two services sharing backends, and UDP request/response.
/// Every legitimate exchange must succeed, from the service address the client used, during
/// the flood and after it (then also with the backend speaking first), and nothing translated
/// may carry a backend address towards a client, ICMP errors' quotes included.
fn legit_flows_through_a_flood(rounds: u64, per_round: u64, nat: Nat) {
    let seed = seed();
    println!("seed {seed}, {nat}");
    in_fixture_netns(move || {
        let o = DataplaneOptions {
            conntrack_size: 1024,
            ..options()
        };
        let fx = Fixture::new(o, services(nat));
        let mut moved = 0u64;
        let mut rng = Rng(seed);
        let mut runner = Runner::new(&fx);
        // Removes single entries as the LRU does, beside the runner.
        let mut evictor = fx.dp().conntrack_reader().expect("conntrack handle");
        let mut failures = Vec::new();
        // The legitimate flows.
        let mut legit = Vec::new();
        for i in 0..12u16 {
            let service = if i % 2 == 0 {
                sa(VIP, 80)
            } else {
                sa(HOST, 8080)
            };
            let client = sa(CLIENT, 30_000 + i);
            let (a, out) = run(
                &mut runner,
                &Ipv4Packet::tcp(client, service, TCP_SYN).build(),
                nat,
            );
            assert_eq!(a, TC_ACT_REDIRECT);
            let o = wire::parse(&out);
            let backend = o.dst;
            let mut l = Legit {
                client,
                service,
                tcp: true,
                backend,
                peer: o.src,
                cseq: 1001,
                bseq: 5001,
            };
            let mut synack = Ipv4Packet::tcp(backend, o.src, TCP_SYN | TCP_ACK);
            synack.l4 = L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
                seq: 5000,
                ack: 1001,
                payload: vec![],
            };
            synack.src_mac = backend_mac(*backend.ip());
            assert_eq!(run(&mut runner, &synack.build(), nat).0, TC_ACT_REDIRECT);
            l.cseq = 1001;
            legit.push(l);
        }
        for i in 0..12u16 {
            let client = sa(CLIENT, 31_000 + i);
            let service = sa(HOST, 5353);
            let (a, out) = run(
                &mut runner,
                &Ipv4Packet::udp(client, service, b"hello").build(),
                nat,
            );
            assert_eq!(a, TC_ACT_REDIRECT);
            let o = wire::parse(&out);
            let backend = o.dst;
            legit.push(Legit {
                client,
                service,
                tcp: false,
                backend,
                peer: o.src,
                cseq: 0,
                bseq: 0,
            });
        }
        let flood_src = |rng: &mut Rng| {
            sa(
                Ipv4Addr::from(0x0b00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff)),
                1024 + rng.below(60_000) as u16,
            )
        };
        let t = Instant::now();
        let mut flood_packets = 0u64;
        for round in 0..rounds {
            for _ in 0..per_round {
                let src = flood_src(&mut rng);
                match rng.below(10) {
                    0..=3 => {
                        let p = Ipv4Packet::udp(src, sa(HOST, 5353), b"flood").build();
                        run(&mut runner, &p, nat);
                        flood_packets += 1;
                    }
                    4..=7 => {
                        // A completed handshake: SYN, the backend's SYN-ACK, the ACK.
                        let service = if rng.chance(50) {
                            sa(VIP, 80)
                        } else {
                            sa(HOST, 8080)
                        };
                        let (a, out) = run(
                            &mut runner,
                            &Ipv4Packet::tcp(src, service, TCP_SYN).build(),
                            nat,
                        );
                        flood_packets += 1;
                        if a == TC_ACT_REDIRECT {
                            // The SYN-ACK's sequence number is 1000: the client's ACK (1001)
                            // completes the handshake, so the flow is confirmed into the main
                            // map like a real client's.
                            let o = wire::parse(&out);
                            let synack = Ipv4Packet::tcp(o.dst, o.src, TCP_SYN | TCP_ACK);
                            run(&mut runner, &from_backend(synack), nat);
                            run(
                                &mut runner,
                                &Ipv4Packet::tcp_seq(src, service, TCP_ACK, 1001, 1001, &[])
                                    .build(),
                                nat,
                            );
                            flood_packets += 2;
                        }
                    }
                    8 => {
                        // A legitimate client's tuple, to the other service on the same backends.
                        let l = &legit[rng.below(12) as usize];
                        let other = if l.service.port() == 80 {
                            sa(HOST, 8080)
                        } else {
                            sa(VIP, 80)
                        };
                        let flags = [TCP_ACK, TCP_SYN, TCP_ACK | TCP_PSH][rng.below(3) as usize];
                        run(
                            &mut runner,
                            &Ipv4Packet::tcp(l.client, other, flags).build(),
                            nat,
                        );
                        flood_packets += 1;
                    }
                    _ => {
                        // A blind RST or FIN on a legitimate session, half the time after its
                        // reply half was evicted, and half the time after a blind segment or a
                        // bare SYN at the same sequence number (which rebuild the reply half if
                        // it was evicted), the number far outside the session's window. A
                        // confirmed session stays open.
                        let l = &legit[rng.below(12) as usize];
                        let fkey = flow_key(l.client, l.service, lb_common::IPPROTO_TCP);
                        if rng.chance(50) {
                            // Its reply half evicted alone first, as the LRU may (this flood,
                            // whose packets keep a session's two halves equally recent, never
                            // does it by itself).
                            let rkey = flow_key(l.backend, l.peer, lb_common::IPPROTO_TCP);
                            evictor.remove(&rkey).expect("evict a reply half");
                        }
                        let confirmed = fx
                            .dp()
                            .conntrack_main_get(&fkey)
                            .is_some_and(|e| e.state == ct::STATE_OPEN);
                        let seq = l
                            .cseq
                            .wrapping_add(0x8000_0000)
                            .wrapping_add(rng.below(1 << 30) as u32);
                        let blind = |flags| {
                            let mut p = Ipv4Packet::tcp(l.client, l.service, flags);
                            p.l4 = L4::Tcp {
                                flags,
                                seq,
                                ack: 0,
                                payload: vec![],
                            };
                            p.build()
                        };
                        if rng.chance(50) {
                            let first = if rng.chance(50) { TCP_ACK } else { TCP_SYN };
                            run(&mut runner, &blind(first), nat);
                            flood_packets += 1;
                        }
                        let flags = if rng.chance(50) {
                            TCP_RST
                        } else {
                            TCP_FIN | TCP_ACK
                        };
                        run(&mut runner, &blind(flags), nat);
                        flood_packets += 1;
                        if confirmed && fx.ct(&fkey).is_none_or(|e| e.state != ct::STATE_OPEN) {
                            failures.push(format!(
                                "round {round}: a blind segment closed {} -> {}",
                                l.client, l.service
                            ));
                        }
                    }
                }
            }
            for l in &mut legit {
                for e in exchange(&mut runner, l, false, round % 4 == 0, (nat, &mut moved)) {
                    failures.push(format!("round {round}: {e}"));
                }
            }
        }
        let took = t.elapsed();
        // The flood is over: every flow answers, whoever speaks first.
        let mut after = Vec::new();
        for l in &mut legit {
            after.extend(exchange(&mut runner, l, false, true, (nat, &mut moved)));
            after.extend(exchange(&mut runner, l, true, false, (nat, &mut moved)));
        }
        drop(runner);
        let totals = reason_totals(&fx);
        let entries = assert_maps_consistent(&fx, &o, nat);
        println!(
            "{flood_packets} flood packets in {took:.1?} against a conntrack of {} entries (+{} \
             unconfirmed), {} legitimate flows exchanging every {per_round} flood events: \
             {} failures during the flood, {} after it; halves rebuilt {}, mid-stream pickups \
             {}, conflicting flows refused {}, FIN/RST outside the window ignored {}, ICMP errors \
             translated {}; source ports taken {} times, exhausted {}, flows on a new source \
             {moved}; {entries} entries at the end",
            o.conntrack_size,
            o.ct_new_size(),
            legit.len(),
            failures.len(),
            after.len(),
            totals["event_ct_rebuilt"],
            totals["event_ct_midstream_pickup"],
            totals["drop_flow_conflict"],
            totals["event_ct_close_ignored"],
            totals["event_icmp_translated"],
            totals["event_snat_port_taken"],
            totals["drop_snat_exhausted"],
        );
        assert!(after.is_empty(), "after the flood: {after:#?}");
        if nat == Nat::Dnat {
            assert_eq!(
                moved, 0,
                "a DNAT flow's packets always leave from its client"
            );
        }
        assert!(failures.is_empty(), "during the flood: {failures:#?}");
        assert!(
            totals["event_ct_rebuilt"] + totals["event_ct_midstream_pickup"] > 0,
            "the flood never evicted a legitimate flow's entry: not a test"
        );
        assert_eq!(totals["abort_rewrite"] + totals["abort_map"], 0);
    });
}

fn legitimate_flows_of_every_kind_survive_a_flood_of_udp_flows_and_completed_handshakes(nat: Nat) {
    legit_flows_through_a_flood(40, 600, nat);
}

#[test]
#[ignore = "soak: cargo xtask soak"]
fn soak_legitimate_flows_through_a_long_flood() {
    legit_flows_through_a_flood(400, 6000, Nat::Dnat);
    legit_flows_through_a_flood(400, 6000, Nat::Full);
}
