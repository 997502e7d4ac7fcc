//! `cargo xtask bench`: dataplane micro-benchmarks through BPF_PROG_TEST_RUN.
//!
//! Each path is measured as the kernel-reported average per run over `repeat` runs (default
//! 1,000,000), and the median of `rounds` such measurements (default 5) is printed, beside the
//! do-nothing program of each hook measured the same way (the test-run floors: a classifier, and
//! with redirect on an XDP program). A row's "minus floor" subtracts its own hook's floor; the
//! live-frames row has none (each of its runs also builds a frame, sends it out of a veth and
//! has the peer receive it, see `measure_live`).
//!
//! A TC test run reuses one skb across repeats, so the program sees its own rewrite on the next
//! run. The set-ups are built so every repeat still takes the path being measured:
//! - established hit / reply (IPv4 and IPv6): paired conntrack entries make the packet alternate
//!   between the service tuple and the backend tuple, each a hit with a full rewrite (full NAT:
//!   of both ends; the other half of each flow is rebuilt by the first run, so every run looks
//!   it up as a real flow's packet does); each also through the XDP program;
//! - new flow (IPv4 and IPv6 alike, see `measure_laps`): a ring of 1024 services, each balancing
//!   to the next one's address and port, run in test runs of one lap of 400 runs each, each lap
//!   from another client port, so no DNAT run meets a flow seen before (101 laps, median of
//!   their averages). Full NAT's runs after a lap's first come from the host's address and a
//!   source port hashed from the flow before, so a lap can meet an earlier lap's flow by chance
//!   (a few runs in 10,000 take the tracked path). The conntrack maps (1024 entries each) and
//!   the handshake table (1024 slots) stay full, so every insert evicts and every slot written
//!   overwrites an older handshake, as in a SYN flood. Each run misses, looks the service up,
//!   picks from Maglev, records its flow (IPv4 DNAT: a slot of the handshake table, see
//!   lb-common's `syn`, the entries come with the first reply; full NAT and IPv6 insert both
//!   entries) and rewrites (full NAT: takes a source port too);
//! - new flow, conntrack not full: the same laps into the same maps emptied before each lap, so
//!   no insert evicts (what eviction costs is the difference).
//!
//! Each path's counters are checked afterwards to prove the runs took the intended path: a
//! figure is printed as INVALID unless 99.9% of the runs did.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Instant,
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use berth_tests::{
    fixture::{
        CLIENT, Fixture, HOST, VIP, backend, flow_key, from_backend, ifindex, in_fixture_netns,
        options, svc, with_nat,
    },
    netns::{ETHTOOL_SGRO, attach_noop_xdp, ethtool_flag, sh},
    stats::median,
    wire::{Ipv4Packet, TCP_ACK, TCP_SYN},
};
use berth_tests::{
    fixture6::{CLIENT6, HOST6, VIP6, backend6, flow_key6, in_fixture6_netns, sa6},
    wire6::Ipv6Packet,
};
use lb_common::v6::{CtEntry6, ipv6_to_wire};
use lb_common::{CtEntry, IPPROTO_TCP, Reason, ct, ipv4_to_wire, port_to_wire};
use lb_userspace::dataplane::Backend6Spec;
use lb_userspace::{
    config::{Nat, Protocol},
    dataplane::{DataplaneOptions, monotonic_ns},
    maglev,
};

/// What the live-frames row's receiving veth runs (see `Args::live_peer`).
#[derive(Clone, Copy, PartialEq)]
enum LivePeer {
    Xdp,
    Gro,
    Nothing,
}

#[derive(Clone)]
struct Args {
    repeat: u32,
    rounds: usize,
    /// Conntrack size of the new-flow set-ups (the main maps of both families; CT_NEW and
    /// CT_NEW6 are at least 1024, so a lap of `NEW_FLOW_LAP` flows fits the emptied maps).
    new_flow_ct: u32,
    /// Measure translation without routing (redirect off).
    no_redirect: bool,
    /// Measure only the paths whose name contains this (the floor always), e.g. for a profile.
    only: Option<String>,
    /// What `fx1` runs in the live-frames row: its pass-through XDP program (the default), or
    /// for comparison (diagnostics) GRO only, or nothing (the veth then refuses the frames: the
    /// row is INVALID, its figure the cost without delivery).
    live_peer: LivePeer,
}

impl Args {
    fn wants(&self, path: &str) -> bool {
        self.only.as_deref().is_none_or(|o| path.contains(o))
    }
}

fn args() -> Args {
    let mut a = Args {
        repeat: 1_000_000,
        rounds: 5,
        new_flow_ct: 1024,
        no_redirect: false,
        only: None,
        live_peer: LivePeer::Xdp,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--repeat" => a.repeat = val().parse().expect("--repeat N"),
            "--rounds" => a.rounds = val().parse().expect("--rounds N"),
            "--no-redirect" => a.no_redirect = true,
            "--new-flow-ct" => a.new_flow_ct = val().parse().expect("--new-flow-ct N"),
            "--only" => a.only = Some(val()),
            "--live-peer" => {
                a.live_peer = match val().as_str() {
                    "xdp" => LivePeer::Xdp,
                    "gro" => LivePeer::Gro,
                    "none" => LivePeer::Nothing,
                    v => panic!("--live-peer xdp|gro|none, not {v}"),
                }
            }
            other => panic!(
                "unknown argument {other}; use --repeat N --rounds N --new-flow-ct N --no-redirect \
                 --only PATH-SUBSTRING --live-peer xdp|gro|none"
            ),
        }
    }
    assert!(a.rounds >= 1 && a.repeat >= 1);
    a
}

fn ctx_for(ifindex: u32) -> [u8; 44] {
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Median over `rounds` of the kernel's average ns per run.
fn measure(prog: &SchedClassifier, pkt: &[u8], a: &Args) -> f64 {
    measure_ctx(prog, pkt, &ctx_for(ifindex("fx0")), a)
}

/// [`measure`] for the XDP program (its context: an `xdp_md` naming the frame and `fx0`).
fn measure_xdp(prog: &aya::programs::Xdp, pkt: &[u8], a: &Args) -> f64 {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex("fx0").to_ne_bytes());
    measure_ctx(prog, pkt, &ctx, a)
}

fn measure_ctx<P>(prog: &P, pkt: &[u8], ctx: &[u8], a: &Args) -> f64
where
    P: for<'o> TestRun<Opts<'o> = TestRunOptions<'o>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let v: Vec<f64> = (0..a.rounds)
        .map(|_| {
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(pkt),
                    data_out: Some(&mut out),
                    ctx_in: Some(ctx),
                    repeat: a.repeat,
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            r.duration.as_nanos() as f64
        })
        .collect();
    median(&v)
}

/// Services in a new-flow ring (both families), each balancing to the next one's address.
const NEW_FLOW_RING: u32 = 1024;
/// Runs per lap of the new-flow ring: under the conntrack maps' capacity (1024 entries each by
/// default; a full-NAT or IPv6 flow takes two) less what an LRU map keeps free per CPU, so a lap
/// into emptied maps evicts nothing.
const NEW_FLOW_LAP: u32 = 400;
/// Laps measured per new-flow row (the median of their averages is the figure).
const NEW_FLOW_LAPS: u16 = 101;

/// The new-flow rows of each family: DNAT then full NAT into full conntrack maps (each insert
/// evicts, as in a SYN flood), then both into maps emptied before each lap (no eviction).
const NEW_FLOW_KINDS: [(Nat, bool); 4] = [
    (Nat::Dnat, true),
    (Nat::Full, true),
    (Nat::Dnat, false),
    (Nat::Full, false),
];

/// The options of a new-flow ring's dataplane: the same conntrack sizes with and without
/// eviction (emptied before each lap without), so the difference is the eviction alone.
fn ring_options(a: &Args, max_backends: u32) -> DataplaneOptions {
    DataplaneOptions {
        maglev_size: 7,
        max_services: NEW_FLOW_RING,
        max_backends,
        conntrack_size: a.new_flow_ct,
        // The ring reuses one packet: see `measure_hits`.
        decrement_ttl: false,
        ..options()
    }
}

/// Empties the conntrack maps of both families from userspace.
fn empty_conntrack(f: &mut Fixture) {
    let dp = f.rec.dataplane_mut();
    for (k, _) in dp.conntrack_entries() {
        dp.conntrack_remove(&k).expect("conntrack remove");
    }
    for (k, _) in dp.conntrack6_entries() {
        dp.conntrack6_remove(&k).expect("conntrack6 remove");
    }
}

/// New flows through the ring of `f` (services `0..NEW_FLOW_RING`, either family): test runs of
/// [`NEW_FLOW_LAP`] repeats, each lap from its own client port (`pkt` builds the first packet of
/// a lap, to the ring's first service), so every run is a flow the maps never held (full NAT:
/// all but a few, see the header). With `empty` the conntrack maps are emptied from userspace
/// before each lap (no insert evicts); without, they stay full from the unmeasured laps on
/// (every insert evicts, as in a SYN flood). The unmeasured laps also claim each IPv4 backend's
/// lazy service (`LAZY_REPLY`) once. The row's figure is the median of the measured laps'
/// kernel averages; its check counts the ring's new flows against every run made (all laps, as
/// the counters count them).
fn measure_laps(
    f: &mut Fixture,
    pkt: &dyn Fn(u16) -> Vec<u8>,
    (empty, no_pending): (bool, bool),
    (path, target): (&'static str, Option<f64>),
) -> Row {
    let ctx = ctx_for(ifindex("fx0"));
    let warm_up = 8u16;
    let lap = |f: &mut Fixture, port: u16| {
        if empty {
            empty_conntrack(f);
        } else if no_pending {
            f.rec.dataplane_mut().pending_clear_all();
        }
        let p = pkt(port);
        let mut out = vec![0u8; p.len() + 256];
        let r = f
            .dp()
            .program()
            .test_run(TestRunOptions {
                data_in: Some(&p),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: NEW_FLOW_LAP,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        r.duration.as_nanos() as f64
    };
    for i in 0..warm_up {
        lap(f, 20000 + i);
    }
    let v: Vec<f64> = (0..NEW_FLOW_LAPS)
        .map(|i| lap(f, 20000 + warm_up + i))
        .collect();
    let runs = u64::from(NEW_FLOW_LAP) * u64::from(warm_up + NEW_FLOW_LAPS);
    let new_flows: u64 = (0..NEW_FLOW_RING)
        .map(|i| f.dp().service_counters(i).unwrap().new_flows)
        .sum();
    let redirected = reason_count(f, Reason::FwdRedirect);
    let failed = reason_count(f, Reason::EventCtInsertFailed);
    let exhausted = reason_count(f, Reason::DropSnatExhausted);
    Row {
        path,
        prog: Prog::Tc,
        ns: median(&v),
        target,
        check: format!(
            "new flows {new_flows}/{runs}, redirected {redirected}, insert failures {failed}, \
             ports exhausted {exhausted}"
        ),
        on_path: new_flows as f64 / runs as f64,
    }
}

fn reason_count(f: &Fixture, r: Reason) -> u64 {
    f.dp()
        .reason_counters()
        .expect("counters")
        .into_iter()
        .find(|(x, _)| *x == r)
        .map_or(0, |(_, n)| n)
}

/// A conntrack entry translating to `nat`, and for full NAT the other end to `fnat`.
fn entry(dir: u8, nat: SocketAddrV4, fnat: Option<SocketAddrV4>, now: u64, epoch: u64) -> CtEntry {
    let (fnat_addr, fnat_port, flags) = fnat.map_or((0, 0, 0), |f| {
        (
            ipv4_to_wire(f.ip().octets()),
            port_to_wire(f.port()),
            ct::CT_F_FULLNAT,
        )
    });
    CtEntry {
        nat_addr: ipv4_to_wire(nat.ip().octets()),
        nat_port: port_to_wire(nat.port()),
        dir,
        state: ct::STATE_OPEN,
        backend_id: 1,
        service_id: 0,
        last_seen_ns: now,
        route: lb_common::Route::NONE,
        backend_ack: 0,
        in_ifindex: 0,
        fnat_addr,
        fnat_port,
        flags,
        lazy: 0,
        epoch,
    }
}

/// Measures conntrack hits in direction `dir` for the packet `src -> dst`: one entry rewrites
/// it to `nat` (the destination for forward entries, the source for reply entries) and a second
/// entry rewrites it back, so every repeat of the test run is a hit with a full rewrite. With
/// `fnat`, full-NAT entries rewrite the other end to it and back as well.
/// Sends a SYN to each service from client ports until one reaches `be` (which serves them
/// all), in the services' order, and says which were recorded lazily: the first
/// `LAZY_OWNERS` services to reach a backend are, a further one is not, and is indexed once
/// its handshake completes (panics otherwise: the established rows' kinds of flow would not be
/// the program's).
fn lazy_services_checked(services: &[lb_userspace::config::Service], be: SocketAddrV4) -> String {
    let f = Fixture::new(options(), services.to_vec());
    let mut seen = Vec::new();
    for (i, s) in services.iter().enumerate() {
        let dst = match s.listen {
            std::net::SocketAddr::V4(l) if !l.ip().is_unspecified() => l,
            l => SocketAddrV4::new(HOST, l.port()),
        };
        let tcp = |src, dst, flags, seq, ack| Ipv4Packet::tcp_seq(src, dst, flags, seq, ack, &[]);
        let landed = (0..200u16).find_map(|n| {
            let c = SocketAddrV4::new(CLIENT, 30000 + 1000 * i as u16 + n);
            f.run(&tcp(c, dst, TCP_SYN, 1000, 0).build());
            let e = f.ct(&flow_key(c, dst, IPPROTO_TCP))?;
            (e.nat_addr == ipv4_to_wire(be.ip().octets()) && e.nat_port == port_to_wire(be.port()))
                .then_some((c, e.lazy != 0))
        });
        let (c, lazy) = landed.expect("a SYN reaching the shared backend");
        assert_eq!(
            lazy,
            i < lb_common::LAZY_OWNERS,
            "service {} of {be}: recorded lazily {lazy}",
            i + 1
        );
        if !lazy {
            f.run(&from_backend(tcp(be, c, TCP_SYN | TCP_ACK, 7000, 1001)));
            f.run(&tcp(c, dst, TCP_ACK, 1001, 7001).build());
            assert_indexed(&f, flow_key(c, dst, IPPROTO_TCP));
        }
        seen.push(format!(
            "{} {}",
            s.name,
            if lazy {
                "lazily"
            } else {
                "with its reply half, indexed once confirmed"
            }
        ));
    }
    format!(
        "flows to {be}, one service after another: {}",
        seen.join(", ")
    )
}

/// Checks that the flow whose forward half is at `fkey` is indexed as the program indexes a
/// confirmed flow: its entry `ct::LAZY_INDEXED`, its reply key's slot naming it (panics
/// otherwise).
fn assert_indexed(f: &Fixture, fkey: lb_common::FlowKey) {
    let fwd = f.ct(&fkey).expect("the confirmed forward half");
    assert_eq!(fwd.lazy, ct::LAZY_INDEXED, "a confirmed flow: {fwd:?}");
    let rkey = ct::reply_key(&fkey, &fwd);
    assert_eq!(f.dp().fnat_index(&rkey).expect("reply index"), fkey);
}

/// Confirms a full-NAT TCP flow through the program (SYN, the backend's SYN-ACK, the client's
/// ACK) and checks it is indexed, as the full-NAT established row's flow is staged (panics
/// otherwise: the row would not measure the program's flow).
fn indexed_flow_checked() -> String {
    let vip = SocketAddrV4::new(VIP, 80);
    let f = Fixture::new(
        options(),
        with_nat(
            vec![svc(
                "n",
                &vip.to_string(),
                Protocol::Tcp,
                &[(backend(1), 8000, 1)],
            )],
            Nat::Full,
        ),
    );
    let c = SocketAddrV4::new(CLIENT, 47000);
    let tcp = |src, dst, flags, seq, ack| Ipv4Packet::tcp_seq(src, dst, flags, seq, ack, &[]);
    f.run(&tcp(c, vip, TCP_SYN, 1000, 0).build());
    let fkey = flow_key(c, vip, IPPROTO_TCP);
    let fwd = f.ct(&fkey).expect("the SYN's forward half");
    let rkey = ct::reply_key(&fkey, &fwd);
    let be = SocketAddrV4::new(backend(1), 8000);
    let peer = SocketAddrV4::new(
        std::net::Ipv4Addr::from(rkey.daddr.to_ne_bytes()),
        u16::from_be(rkey.dport),
    );
    f.run(&from_backend(tcp(be, peer, TCP_SYN | TCP_ACK, 7000, 1001)));
    f.run(&tcp(c, vip, TCP_ACK, 1001, 7001).build());
    assert_indexed(&f, fkey);
    format!("full NAT: a flow confirmed through the program is indexed (reply index at {peer})")
}

/// Which half of a flow [`measure_hits`] measures.
#[derive(Clone, Copy)]
enum Half {
    /// Client -> service, of a flow whose forward packets skip the reply half.
    Forward(Skips),
    Reply,
}

/// Why a flow's forward packets skip its reply half (`CtEntry::lazy`).
#[derive(Clone, Copy)]
enum Skips {
    /// A DNAT flow of one of its backend's lazy services (one of the first `LAZY_OWNERS`
    /// services to reach the backend), recorded lazily.
    Lazy,
    /// A confirmed flow in the reply index: a full-NAT flow, or a DNAT flow of a backend's
    /// further service (checked on real handshakes by `indexed_flow_checked` and
    /// `lazy_services_checked`).
    Indexed,
}

fn measure_hits(
    a: &Args,
    services: &[lb_userspace::config::Service],
    redirect: bool,
    half: Half,
    (src, dst, nat, fnat): (
        SocketAddrV4,
        SocketAddrV4,
        SocketAddrV4,
        Option<SocketAddrV4>,
    ),
    (path, target): (&'static str, f64),
    xdp_path: &'static str,
) -> Vec<Row> {
    let (tc_wanted, xdp_wanted) = (a.wants(path), redirect && a.wants(xdp_path));
    if !tc_wanted && !xdp_wanted && !a.wants(LIVE_PATH) {
        return Vec::new();
    }
    // A test run reuses its packet, so a decremented TTL would run out after 63 repeats: the
    // hops measured here keep it (the decrement costs a byte write and a checksum update).
    let mut f = Fixture::new(
        DataplaneOptions {
            redirect,
            decrement_ttl: false,
            ..options()
        },
        services.to_vec(),
    );
    let now = monotonic_ns();
    let dir = match half {
        Half::Forward(_) => ct::DIR_FORWARD,
        Half::Reply => ct::DIR_REPLY,
    };
    // Forward entries rewrite the destination (and for full NAT the source), reply entries the
    // source (and the destination).
    let (back, reason, restore, restore_f) = if dir == ct::DIR_FORWARD {
        let back = (fnat.unwrap_or(src), nat);
        (back, Reason::FwdRedirect, dst, fnat.map(|_| src))
    } else {
        let back = (nat, fnat.unwrap_or(dst));
        (back, Reason::ReplyRedirect, src, fnat.map(|_| dst))
    };
    // An indexed flow's forward key is in the reply index, as the program writes it when it
    // confirms the flow.
    let lazy = match half {
        Half::Forward(Skips::Indexed) => ct::LAZY_INDEXED,
        Half::Forward(Skips::Lazy) => ct::LAZY_RECORDED,
        Half::Reply => 0,
    };
    // A flow is stamped with the table epoch it was picked in, as the program stamps it
    // (lb-common's `epoch`; a full-NAT flow only if it took its first source port, the usual
    // case, which these entries stand for): its replies skip the forward lookup.
    let epoch = f.dp().epoch().expect("epoch");
    assert!(epoch != 0, "the fixture's tables are settled");
    let dp = f.rec.dataplane_mut();
    for (k, e) in [
        (
            flow_key(src, dst, IPPROTO_TCP),
            entry(dir, nat, fnat, now, epoch),
        ),
        (
            flow_key(back.0, back.1, IPPROTO_TCP),
            entry(dir, restore, restore_f, now, epoch),
        ),
    ] {
        dp.conntrack_insert(k, CtEntry { lazy, ..e }).unwrap();
        if lazy == ct::LAZY_INDEXED {
            dp.fnat_index_store(&ct::reply_key(&k, &e), k).unwrap();
        }
    }
    let pkt = Ipv4Packet::tcp(src, dst, TCP_ACK)
        .with_payload(&[0u8; 64])
        .build();
    let total = u64::from(a.repeat) * a.rounds as u64;
    let mut rows = Vec::new();
    let ns = measure(f.dp().program(), &pkt, a);
    let hits = reason_count(&f, reason);
    // The same packet once more without the flow's other half, which its path would rebuild
    // had it looked it up (a reply's forward half; a lazy or indexed flow's reply half); put
    // back for the XDP runs.
    let measured = flow_key(src, dst, IPPROTO_TCP);
    let e = f.dp().conntrack_get(&measured).expect("the measured half");
    let (other, which) = match half {
        Half::Reply => (ct::forward_key(&measured, &e), "forward"),
        Half::Forward(_) => (ct::reply_key(&measured, &e), "reply"),
    };
    let kept = f.dp().conntrack_get(&other);
    if kept.is_some() {
        f.rec.dataplane_mut().conntrack_remove(&other).unwrap();
    }
    let run = f.run(&pkt);
    let skipped = run.counted(reason) == 1
        && run.counted(Reason::EventCtRebuilt) == 0
        && f.dp().conntrack_get(&other).is_none();
    if let Some(kept) = kept {
        f.rec.dataplane_mut().conntrack_insert(other, kept).unwrap();
    }
    if tc_wanted {
        let skip_note = if skipped {
            format!(", {which} lookup skipped")
        } else {
            format!(", {which} lookup NOT skipped")
        };
        rows.push(Row {
            path,
            prog: Prog::Tc,
            ns,
            target: Some(target),
            check: format!("{} {hits}/{total}{skip_note}", reason.name()),
            on_path: if !skipped {
                0.0
            } else {
                hits as f64 / total as f64
            },
        });
    }
    if xdp_wanted {
        // The same packets through the XDP fast path, on the entries (and the routes they
        // cached) the TC runs left, stamped before each round so none is due for its
        // once-a-second refresh (which XDP leaves to TC) during the round.
        let keys = [
            flow_key(src, dst, IPPROTO_TCP),
            flow_key(back.0, back.1, IPPROTO_TCP),
        ];
        let ns = measure_xdp_stamped(&mut f, &pkt, a, |f| stamp(f, &keys));
        let tx = reason_count(&f, Reason::XdpTx);
        rows.push(Row {
            path: xdp_path,
            prog: Prog::Xdp,
            ns,
            target: Some(target),
            check: format!("xdp_tx {tx}/{total}"),
            on_path: tx as f64 / total as f64,
        });
    }
    // Live frames once, for the usual DNAT flow (recorded lazily).
    if redirect && lazy == ct::LAZY_RECORDED && a.wants(LIVE_PATH) {
        rows.push(measure_live(
            &mut f,
            &pkt,
            [
                flow_key(src, dst, IPPROTO_TCP),
                flow_key(back.0, back.1, IPPROTO_TCP),
            ],
            target,
            a,
        ));
    }
    rows
}

/// [`measure_xdp`], each of the `rounds` a test run of its own after `stamp` (which stamps the
/// flow's entries, so none is due for the once-a-second refresh XDP leaves to TC); the median.
fn measure_xdp_stamped(f: &mut Fixture, pkt: &[u8], a: &Args, stamp: impl Fn(&mut Fixture)) -> f64 {
    let one = Args {
        rounds: 1,
        ..a.clone()
    };
    let v: Vec<f64> = (0..a.rounds)
        .map(|_| {
            stamp(f);
            let xdp = f.rec.dataplane_mut().xdp_program().expect("XDP program");
            measure_xdp(xdp, pkt, &one)
        })
        .collect();
    median(&v)
}

/// Stamps the entries at `keys` with the current time (see `measure_hits`).
fn stamp(f: &mut Fixture, keys: &[lb_common::FlowKey]) {
    let now = monotonic_ns();
    for key in keys {
        let mut e = f.dp().conntrack_get(key).expect("entry of the set-up");
        e.last_seen_ns = now;
        f.rec.dataplane_mut().conntrack_update(*key, e).unwrap();
    }
}

const LIVE_PATH: &str = "XDP live frames: established-flow hit, XDP_TX out of a veth";

/// The veth that receives the live frames: `fx0`'s peer, in the fixture namespace.
const LIVE_PEER: &str = "fx1";

/// `LIVE_PEER`'s receive counters (`ip -s -j link`, read in the fixture namespace: sysfs would
/// show the host's): packets its NAPI took in, and what it dropped, including the frames `fx0`
/// failed to queue to it (veth counts those as the peer's `rx_dropped`).
fn peer_rx() -> (u64, u64) {
    let out = sh(&["ip", "-s", "-j", "link", "show", "dev", LIVE_PEER]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    let rx = &v[0]["stats64"]["rx"];
    let n = |k: &str| rx[k].as_u64().unwrap_or_else(|| panic!("rx {k} in {out}"));
    (n("packets"), n("dropped"))
}

/// The established hit in live mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): the kernel builds a real
/// frame per run and, for the program's `XDP_TX`, redirects it out of `fx0` (the run's
/// ingress device), a veth: into the ring of its peer `fx1`. A veth queues such frames only
/// when its peer runs NAPI, so `fx1` gets the pass-through program `berth_xdp_noop` (native
/// mode) for the row, as a NIC has its driver (`--live-peer gro|none` swap it for GRO alone or
/// nothing, for comparison). `fx1` passes each frame to its stack, which drops it (the
/// destination MAC is the backend's, not `fx1`'s). The check requires `fx1`'s received-packet
/// counter to have grown by the frames the program sent (`xdp_tx`), and also reports how many
/// had not arrived yet when each test run returned.
///
/// What the figure includes: the peer's receive work too (its NAPI poll: its XDP program,
/// building an skb, the stack's drop). Measured, not assumed (README, "XDP live frames,
/// delivered"): every frame is counted at `fx1` by the time each test run returns, none is
/// dropped although the veth ring holds 256, and the same runs with nothing on `fx1` (frames
/// refused at the veth) cost about 130 ns against some 470-500. The kernel's
/// `xdp_test_run_batch` runs each batch of 64 frames with bottom halves off and flushes its
/// redirects at the end, which schedules `fx1`'s NAPI on this CPU; the poll runs when the batch
/// turns bottom halves back on, inside the timed loop.
fn measure_live(
    f: &mut Fixture,
    pkt: &[u8],
    keys: [lb_common::FlowKey; 2],
    target: f64,
    a: &Args,
) -> Row {
    let invalid = |check: String| Row {
        path: LIVE_PATH,
        prog: Prog::XdpLive,
        ns: f64::NAN,
        target: Some(target),
        check,
        on_path: 0.0,
    };
    // The peer's program, detached when it drops (at the end of this function, panics
    // included). `fx1` lives in the fixture namespace only.
    let peer = match a.live_peer {
        LivePeer::Xdp => match attach_noop_xdp(LIVE_PEER) {
            Ok(o) => Some(o),
            Err(e) => return invalid(format!("the noop on {LIVE_PEER}: {e}")),
        },
        LivePeer::Gro => {
            ethtool_flag(LIVE_PEER, ETHTOOL_SGRO, true);
            None
        }
        LivePeer::Nothing => None,
    };
    let before = reason_count(f, Reason::XdpTx);
    let (rx_before, drop_before) = peer_rx();
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex("fx0").to_ne_bytes());
    let mut v = Vec::new();
    // Frames still missing at `fx1` right when each test run returned (see the doc comment).
    let mut late = 0u64;
    for _ in 0..a.rounds {
        stamp(f, &keys);
        let tx0 = reason_count(f, Reason::XdpTx);
        let rx0 = peer_rx().0;
        let prog = f.rec.dataplane_mut().xdp_program().expect("XDP program");
        match prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            ctx_in: Some(&ctx),
            repeat: a.repeat,
            attrs: aya::programs::TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::default()
        }) {
            Ok(r) => v.push(r.duration.as_nanos() as f64),
            Err(e) => return invalid(format!("BPF_PROG_TEST_RUN with live frames failed: {e}")),
        }
        let sent = reason_count(f, Reason::XdpTx) - tx0;
        late += sent.saturating_sub(peer_rx().0 - rx0);
    }
    // Give a late NAPI poll its chance before the final count.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (rx_after, drop_after) = peer_rx();
    drop(peer);
    let total = u64::from(a.repeat) * a.rounds as u64;
    let tx = reason_count(f, Reason::XdpTx) - before;
    let rx = rx_after - rx_before;
    let dropped = drop_after - drop_before;
    Row {
        path: LIVE_PATH,
        prog: Prog::XdpLive,
        ns: median(&v),
        target: Some(target),
        check: format!(
            "xdp_tx {tx}/{total}, received by {LIVE_PEER} {rx}/{tx} (dropped {dropped}, \
             not yet in when a run returned {late})"
        ),
        // Every run must have sent its frame and the peer received it (a few frames of the
        // namespace's own could add to `rx`; they cannot make up for missing ones beyond that).
        on_path: tx.min(rx) as f64 / total as f64,
    }
}

/// The program a row measures, which names the floor its "minus floor" column subtracts.
#[derive(Clone, Copy)]
enum Prog {
    Tc,
    Xdp,
    /// XDP in live-frames mode: each run also builds and transmits a frame and the veth peer
    /// receives it, costs neither do-nothing floor includes, so the row has none.
    XdpLive,
    /// The TC program in test runs of one packet each (each run a packet of its own), beside
    /// the do-nothing classifier run the same way: the kernel's per-run time then includes its
    /// clock reads, which that floor has too.
    TcSingle,
}

const TC_FLOOR: &str = "floor: do-nothing classifier";
const XDP_FLOOR: &str = "XDP floor: do-nothing XDP program";
const SINGLE_FLOOR: &str = "floor: do-nothing classifier, runs of one";
const FIRST_REPLY: &str =
    "full NAT: a handshake's first reply (reply entry written, forward entry moved; runs of one)";
const FIRST_SYN: &str = "full NAT: a handshake's SYN (new flow; runs of one)";

/// Handshakes per round of [`measure_first_replies`].
const FIRST_REPLY_ROUND: u16 = 4000;

/// A full-NAT handshake's first reply: the backend's SYN-ACK finds no entry, writes the reply
/// entry from the pending flow its port's claim names (lb-common's `claim`), and the reply path
/// moves the forward entry beside it: the two inserts of the handshake (one of them the SYN's
/// before the claims). Each run needs a handshake of its own, so each round sets up
/// [`FIRST_REPLY_ROUND`] SYNs (unmeasured) and measures their SYN-ACKs in test runs of one,
/// then the do-nothing classifier on the same packets the same way. The rows' figures are the
/// medians over the rounds of each round's average.
fn measure_first_replies(a: &Args) -> Vec<Row> {
    let mut f = Fixture::new(
        DataplaneOptions {
            conntrack_size: 1 << 18,
            // Room for every round's handshakes on one backend.
            snat_ports: lb_userspace::config::PortRange {
                first: 2000,
                last: 65000,
            },
            decrement_ttl: false,
            ..options()
        },
        with_nat(
            vec![svc(
                "f",
                "10.99.0.1:80",
                Protocol::Tcp,
                &[(backend(1), 8000, 1)],
            )],
            Nat::Full,
        ),
    );
    let vip = SocketAddrV4::new(VIP, 80);
    let ctx = ctx_for(ifindex("fx0"));
    let run_one = |prog: &SchedClassifier, pkt: &[u8], out: &mut Vec<u8>| {
        prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN")
    };
    let (mut syns, mut replies, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    // A row of runs of one: the median of the rounds' averages, checked by how many of the
    // runs took the path (`n` of them counted `reason`).
    let timed = |path, samples: &[f64], reason: &str, n: u64| Row {
        path,
        prog: Prog::TcSingle,
        ns: median(samples),
        target: None,
        check: format!(
            "{reason} {n}/{}",
            u64::from(FIRST_REPLY_ROUND) * samples.len() as u64
        ),
        on_path: n as f64 / (u64::from(FIRST_REPLY_ROUND) * samples.len() as u64) as f64,
    };
    let (mut redirected, mut forwarded) = (0u64, 0u64);
    let mut out = vec![0u8; 256];
    let rounds = a.rounds.min(6) as u16;
    for round in 0..rounds {
        let mut total = 0u128;
        let before = reason_count(&f, Reason::FwdRedirect);
        let synacks: Vec<Vec<u8>> = (0..FIRST_REPLY_ROUND)
            .map(|i| {
                let c = SocketAddrV4::new(CLIENT, 10000 + round * FIRST_REPLY_ROUND + i);
                let syn = Ipv4Packet::tcp(c, vip, TCP_SYN).build();
                let r = run_one(f.dp().program(), &syn, &mut out);
                total += r.duration.as_nanos();
                let o = berth_tests::wire::parse(&out[..r.data_size_out as usize]);
                berth_tests::fixture::from_backend(Ipv4Packet::tcp_seq(
                    o.dst,
                    o.src,
                    TCP_SYN | TCP_ACK,
                    7000,
                    1,
                    &[],
                ))
            })
            .collect();
        forwarded += reason_count(&f, Reason::FwdRedirect) - before;
        syns.push(total as f64 / f64::from(FIRST_REPLY_ROUND));
        let before = reason_count(&f, Reason::ReplyRedirect);
        let mut total = 0u128;
        for s in &synacks {
            total += run_one(f.dp().program(), s, &mut out).duration.as_nanos();
        }
        redirected += reason_count(&f, Reason::ReplyRedirect) - before;
        replies.push(total as f64 / f64::from(FIRST_REPLY_ROUND));
        let noop = f.rec.dataplane_mut().noop_program().expect("noop program");
        let mut total = 0u128;
        for s in &synacks {
            total += run_one(noop, s, &mut out).duration.as_nanos();
        }
        floors.push(total as f64 / f64::from(FIRST_REPLY_ROUND));
    }
    vec![
        Row {
            path: SINGLE_FLOOR,
            prog: Prog::TcSingle,
            ns: median(&floors),
            target: None,
            check: "-".into(),
            on_path: 1.0,
        },
        timed(FIRST_SYN, &syns, "fwd_redirect", forwarded),
        timed(FIRST_REPLY, &replies, "reply_redirect", redirected),
    ]
}

impl Prog {
    /// The path of the row measuring this program's do-nothing floor.
    fn floor_path(self) -> Option<&'static str> {
        match self {
            Prog::Tc => Some(TC_FLOOR),
            Prog::Xdp => Some(XDP_FLOOR),
            Prog::XdpLive => None,
            Prog::TcSingle => Some(SINGLE_FLOOR),
        }
    }
}

struct Row {
    path: &'static str,
    prog: Prog,
    ns: f64,
    target: Option<f64>,
    check: String,
    /// Share of runs that took the measured path (a figure is only valid near 1.0).
    on_path: f64,
}

fn main() {
    let a = args();
    let total = u64::from(a.repeat) * a.rounds as u64;
    let mut rows = in_fixture_netns({
        let a = a.clone();
        move || {
            let mut rows = Vec::new();
            // Replies to the VIP side of the alternating set-ups need a route too.
            sh(&[
                "ip",
                "route",
                "add",
                "10.99.0.0/24",
                "via",
                &backend(1).to_string(),
                "dev",
                "fx0",
            ]);
            let redirect = !a.no_redirect;
            let client = SocketAddrV4::new(CLIENT, 40000);
            let vip = SocketAddrV4::new(VIP, 80);
            let be = SocketAddrV4::new(backend(1), 8000);
            // The alternating set-ups bounce between two tuples that must both pass the port filter:
            // service ports 80 and 81, backend ports 8000 and 80.
            let vip2 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 81);
            let services = vec![
                svc(
                    "vip",
                    "10.99.0.1:80",
                    Protocol::Tcp,
                    &[(backend(1), 8000, 1), (backend(2), 8000, 1)],
                ),
                svc(
                    "vip2",
                    "10.99.0.2:81",
                    Protocol::Tcp,
                    &[(backend(1), 8000, 1)],
                ),
                svc(
                    "any",
                    "0.0.0.0:8080",
                    Protocol::Tcp,
                    &[(backend(1), 8000, 1), (backend(2), 80, 1)],
                ),
            ];

            // Floor and non-service packet.
            {
                let mut f = Fixture::new(options(), services.clone());
                let ssh = Ipv4Packet::tcp(client, SocketAddrV4::new(HOST, 22), TCP_SYN).build();
                let ns = measure(f.dp().program(), &ssh, &a);
                let passed = reason_count(&f, Reason::PassNoService);
                let noop = f.rec.dataplane_mut().noop_program().expect("noop program");
                let floor = measure(noop, &ssh, &a);
                rows.push(Row {
                    path: TC_FLOOR,
                    prog: Prog::Tc,
                    ns: floor,
                    target: None,
                    check: "-".into(),
                    on_path: 1.0,
                });
                if redirect {
                    let noop = f.rec.dataplane_mut().xdp_noop_program().expect("XDP noop");
                    rows.push(Row {
                        path: XDP_FLOOR,
                        prog: Prog::Xdp,
                        ns: measure_xdp(noop, &ssh, &a),
                        target: None,
                        check: "-".into(),
                        on_path: 1.0,
                    });
                }
                if redirect {
                    let _ = f.rec.dataplane_mut().xdp_program().expect("XDP program");
                }
                // The verifier's budget is 1,000,000 processed instructions per program.
                let budget: Vec<String> = f
                    .dp()
                    .verified_instructions()
                    .into_iter()
                    .map(|(name, n)| match n {
                        Some(n) => format!("{name} {n} ({:.0}%)", f64::from(n) / 1e4),
                        None => format!("{name} not reported"),
                    })
                    .collect();
                println!(
                    "verifier: instructions processed of 1000000 per program: {}",
                    budget.join(", ")
                );
                let path = "non-service packet (TCP to :22)";
                if a.wants(path) {
                    rows.push(Row {
                        path,
                        prog: Prog::Tc,
                        ns,
                        target: Some(35.0),
                        check: format!("pass_no_service {passed}/{total}"),
                        on_path: passed as f64 / total as f64,
                    });
                }
            }

            // Established hit and reply: the packet bounces between two tuples, both hits.
            // A flow recorded lazily (its service one of its backend's first
            // `LAZY_OWNERS`), then one of a backend's further service (its reply half recorded
            // with its first packet, and the flow in the reply index once confirmed). Which
            // flows the program records lazily and indexes is checked first, on real SYNs and
            // handshakes to backend(1):8000, which serves all three services here.
            if a.wants("established-flow hit") {
                println!("{}", lazy_services_checked(&services, be));
            }
            for (skips, path, xdp_path) in [
                (
                    Skips::Lazy,
                    "established-flow hit (client -> backend)",
                    "XDP: established-flow hit (client -> backend)",
                ),
                (
                    Skips::Indexed,
                    "established-flow hit, a backend's third service",
                    "XDP: established-flow hit, a backend's third service",
                ),
            ] {
                rows.extend(measure_hits(
                    &a,
                    &services,
                    redirect,
                    Half::Forward(skips),
                    (client, vip, vip2, None),
                    (path, 100.0),
                    xdp_path,
                ));
            }
            // Backend ports 8000 and 80 both pass the port filter.
            let be80 = SocketAddrV4::new(backend(2), 80);
            rows.extend(measure_hits(
                &a,
                &services,
                redirect,
                Half::Reply,
                (be, client, be80, None),
                ("reply (backend -> client)", 100.0),
                "XDP: reply (backend -> client)",
            ));
            // Full NAT: the other end goes to another port of the client (it has a neighbour
            // entry, so the redirect is the plain one) and back. Targets: issue 14's.
            let other_end = SocketAddrV4::new(CLIENT, 61000);
            if a.wants("full NAT: established-flow hit") {
                println!("{}", indexed_flow_checked());
            }
            rows.extend(measure_hits(
                &a,
                &services,
                redirect,
                Half::Forward(Skips::Indexed),
                (client, vip, vip2, Some(other_end)),
                ("full NAT: established-flow hit", 110.0),
                "XDP: full NAT: established-flow hit",
            ));
            rows.extend(measure_hits(
                &a,
                &services,
                redirect,
                Half::Reply,
                (be, other_end, be80, Some(client)),
                ("full NAT: reply", 110.0),
                "XDP: full NAT: reply",
            ));

            // New flow: a ring of services (see `measure_laps`). Laps of NEW_FLOW_LAP runs, each
            // lap from another client port, make every run a flow never seen before (with one
            // client port, 1-2% of the runs of a ring of 16384 found their flow of the lap before
            // still tracked: an LRU entry a lookup found is kept as recently used, so such flows
            // stayed).
            // The kinds, and DNAT to services listening at any address of the host (the Docker
            // story's `0.0.0.0:8080`): a ring of ports on one address this host is told it has.
            let kinds = NEW_FLOW_KINDS
                .iter()
                .map(|&(nat, evict)| (nat, evict, false))
                .chain([(Nat::Dnat, true, true)]);
            for (nat, evict, any) in kinds {
                let path = match (nat, evict, any) {
                    (_, _, true) => "new flow to services at any address of the host",
                    (Nat::Dnat, true, _) => {
                        "new flow (ct miss + service + maglev + handshake slot)"
                    }
                    (Nat::Full, true, _) => "full NAT: new flow (+ source port)",
                    (Nat::Dnat, false, _) => "new flow, conntrack not full (no eviction)",
                    (Nat::Full, false, _) => "full NAT: new flow, conntrack not full (no eviction)",
                };
                if !a.wants(path) {
                    continue;
                }
                let local = Ipv4Addr::new(10, 100, 0, 1);
                let addr = |i: u32| {
                    let i = i % NEW_FLOW_RING;
                    if any {
                        // Above the laps' client ports (20000 on), which a backend's port
                        // would make look like its replies.
                        SocketAddrV4::new(local, 40000 + i as u16)
                    } else {
                        SocketAddrV4::new(
                            Ipv4Addr::new(10, 100, (i / 256) as u8, (i % 256) as u8),
                            80 + (i % 2) as u16,
                        )
                    }
                };
                let ring_services: Vec<_> = (0..NEW_FLOW_RING)
                    .map(|i| {
                        let next = addr(i + 1);
                        let listen = if any {
                            format!("0.0.0.0:{}", addr(i).port())
                        } else {
                            addr(i).to_string()
                        };
                        svc(
                            &format!("r{i}"),
                            &listen,
                            Protocol::Tcp,
                            &[(*next.ip(), next.port(), 1)],
                        )
                    })
                    .collect();
                let ring_services = with_nat(ring_services, nat);
                sh(&[
                    "ip",
                    "route",
                    "replace",
                    "10.100.0.0/16",
                    "via",
                    &backend(1).to_string(),
                    "dev",
                    "fx0",
                ]);
                let mut f = Fixture::new(ring_options(&a, NEW_FLOW_RING * 2), ring_services);
                if any {
                    let mut addrs = lb_userspace::dataplane::host_ipv4_addrs();
                    addrs.insert(ipv4_to_wire(local.octets()));
                    f.rec
                        .dataplane_mut()
                        .sync_local_addrs(&addrs)
                        .expect("this host's addresses");
                }
                let pkt = |port: u16| {
                    Ipv4Packet::tcp(SocketAddrV4::new(CLIENT, port), addr(0), TCP_SYN).build()
                };
                // The targets are for the SYN-flood state (the rows with eviction).
                let target = match (nat, evict, any) {
                    (Nat::Dnat, true, false) => Some(300.0),
                    (Nat::Full, true, false) => Some(350.0),
                    _ => None,
                };
                // Full NAT with full maps: the handshake table emptied before each lap. The
                // ring feeds berth's own full-NAT output back to it as new flows, and a source
                // port whose claim went with its overwritten handshake (lb-common's `claim`)
                // may go to a flow of a later lap, whose next hop then meets the earlier lap's
                // handshake still pending there (the runs left the path: ~3%). The maps stay
                // full; the emptied table's claims are judged abandoned as an overwritten
                // one's are.
                let no_pending = nat == Nat::Full && evict;
                rows.push(measure_laps(
                    &mut f,
                    &pkt,
                    (!evict, no_pending),
                    (path, target),
                ));
            }
            if a.wants(FIRST_REPLY) || a.wants(FIRST_SYN) {
                rows.extend(measure_first_replies(&a));
            }
            rows
        }
    });

    rows.extend(v6_rows(&a));

    // Maglev build time (userspace).
    let members: Vec<maglev::Member> = (0..1000u64)
        .map(|i| maglev::Member {
            id: (0x0a00_0000 + i) << 16 | 8000,
            weight: 1,
        })
        .collect();
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(maglev::build(&members, 65_537));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let maglev_ms = median(&times);

    // One backend change through the real reconciler into the kernel's maps (M=65537, 1000
    // backends): the Maglev rebuild plus the writes of the slots that changed.
    let (change_ms, change_writes) = in_fixture_netns(|| {
        let o = DataplaneOptions {
            maglev_size: 65_537,
            max_services: 2,
            max_backends: 2048,
            ..options()
        };
        let backends: Vec<(std::net::Ipv4Addr, u16, u32)> = (0..1000u32)
            .map(|i| (std::net::Ipv4Addr::from(0x0a40_0000 + i), 8000, 1))
            .collect();
        let mut f = Fixture::new(
            o,
            vec![svc("big", "10.99.0.1:80", Protocol::Tcp, &backends)],
        );
        let mut samples = Vec::new();
        for i in 0..5 {
            let mut less = backends.clone();
            less.remove(100 + i * 7);
            for set in [&less, &backends] {
                let s = vec![svc("big", "10.99.0.1:80", Protocol::Tcp, set)];
                let t = Instant::now();
                let writes = f.rec.apply(&s, "bench").expect("apply");
                samples.push((t.elapsed().as_secs_f64() * 1e3, writes));
                f.services = s;
            }
        }
        // The upper middle sample rather than `stats::median`: its writes are reported with
        // its time, so it must be one sample.
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        samples[samples.len() / 2]
    });

    // Each row less the do-nothing floor of its own program (a test run of an XDP program has
    // no skb to set up, so its floor is lower than the classifier's).
    let minus_floor = |r: &Row| {
        r.prog
            .floor_path()
            .and_then(|p| rows.iter().find(|f| f.path == p))
            .map_or_else(|| "-".to_string(), |f| format!("{:.1}", r.ns - f.ns))
    };
    println!();
    println!(
        "berth dataplane micro-benchmarks: BPF_PROG_TEST_RUN, TC program (XDP rows: the XDP \
         program), median of {} x {} runs; minus floor: less the do-nothing program of the same \
         hook",
        a.rounds, a.repeat
    );
    println!();
    println!("| path | ns/packet | minus floor | target | path check |");
    println!("|---|---:|---:|---:|---|");
    for r in &rows {
        // A figure is valid only if (nearly) every run took the path: 99.9%.
        let off_path = r.on_path < 0.999;
        let target = r.target.map_or_else(
            || {
                if off_path {
                    "- (INVALID: runs left the path)"
                } else {
                    "-"
                }
                .to_string()
            },
            |t| {
                let verdict = if off_path {
                    "INVALID: runs left the path"
                } else if r.ns <= t {
                    "met"
                } else {
                    "missed"
                };
                format!("<= {t:.0} ({verdict})")
            },
        );
        println!(
            "| {} | {:.1} | {} | {} | {} |",
            r.path,
            r.ns,
            minus_floor(r),
            target,
            r.check
        );
    }
    println!();
    println!("maglev table build, M=65537, 1000 backends: {maglev_ms:.1} ms (median of 5)");
    println!(
        "one backend change (of 1000, M=65537) into the maps: {change_ms:.1} ms, {change_writes} \
         map writes (median of 10)"
    );

    let json_rows: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"path\":\"{}\",\"ns_per_packet\":{:.2},\"target_ns\":{}}}",
                r.path,
                r.ns,
                r.target.map_or("null".into(), |t| format!("{t}"))
            )
        })
        .collect();
    let json = format!(
        "{{\"repeat\":{},\"rounds\":{},\"paths\":[{}],\"maglev_build_ms_m65537_n1000\":{maglev_ms:.2},\"backend_change_ms\":{change_ms:.2},\"backend_change_writes\":{change_writes}}}\n",
        a.repeat,
        a.rounds,
        json_rows.join(",")
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::write(dir.join("dataplane.json"), &json).is_ok()
    {
        println!("written: target/bench/dataplane.json");
    }
}

// ---- IPv6 ----

/// Stamps the IPv6 entries at `keys` with the current time (see [`stamp`]).
fn stamp6(f: &mut Fixture, keys: &[lb_common::v6::FlowKey6]) {
    let now = monotonic_ns();
    for key in keys {
        let mut e = f.dp().conntrack6_get(key).expect("entry of the set-up");
        e.ct.last_seen_ns = now;
        f.rec.dataplane_mut().conntrack6_insert(*key, e).unwrap();
    }
}

/// An IPv6 conntrack entry translating to `nat`, and for full NAT the other end to `fnat`.
fn entry6(
    dir: u8,
    nat: SocketAddrV6,
    fnat: Option<SocketAddrV6>,
    now: u64,
    epoch: u64,
) -> CtEntry6 {
    CtEntry6 {
        nat_addr: ipv6_to_wire(nat.ip().octets()),
        fnat_addr: fnat.map_or([0; 4], |f| ipv6_to_wire(f.ip().octets())),
        ct: CtEntry {
            nat_addr: 0,
            fnat_addr: 0,
            ..entry(
                dir,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, nat.port()),
                fnat.map(|f| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, f.port())),
                now,
                epoch,
            )
        },
    }
}

/// The IPv6 rows: established hit and reply (alternating tuples, as [`measure_hits`]) and the
/// new-flow rows (laps through a ring of IPv6 services, as IPv4's), in the fixture namespace
/// with its IPv6 side.
fn v6_rows(a: &Args) -> Vec<Row> {
    let a = a.clone();
    let total = u64::from(a.repeat) * a.rounds as u64;
    in_fixture6_netns(move || {
        sh(&[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:99::/64",
            "via",
            &backend6(1).to_string(),
            "dev",
            "fx0",
        ]);
        let mut rows = Vec::new();
        let o = DataplaneOptions {
            redirect: !a.no_redirect,
            decrement_ttl: false,
            ..options()
        };
        let client = sa6(CLIENT6, 40000);
        let vip = sa6(VIP6, 80);
        let vip2 = sa6("fd00:99::2".parse().expect("address"), 81);
        let be = sa6(backend6(1), 8000);
        let be80 = sa6(backend6(2), 80);
        let services = |f: &mut Fixture| {
            let dp = f.rec.dataplane_mut();
            for (id, listen, backend, bid) in [(0, vip, be, 1), (1, vip2, be80, 2)] {
                dp.install_service6(
                    id,
                    listen,
                    IPPROTO_TCP,
                    &[Backend6Spec {
                        id: bid,
                        addr: backend,
                        weight: 1,
                        snat: None,
                    }],
                )
                .expect("install");
            }
        };
        // Full NAT: the other end goes to another port of the client and back.
        let other_end = sa6(CLIENT6, 61000);
        for (dir, src, dst, nat, fnat, path, xdp_path, reason) in [
            (
                ct::DIR_FORWARD,
                client,
                vip,
                vip2,
                None,
                "IPv6: established-flow hit (client -> backend)",
                "XDP: IPv6: established-flow hit (client -> backend)",
                Reason::FwdRedirect,
            ),
            (
                ct::DIR_REPLY,
                be,
                client,
                be80,
                None,
                "IPv6: reply (backend -> client)",
                "XDP: IPv6: reply (backend -> client)",
                Reason::ReplyRedirect,
            ),
            (
                ct::DIR_FORWARD,
                client,
                vip,
                vip2,
                Some(other_end),
                "IPv6 full NAT: established-flow hit",
                "XDP: IPv6 full NAT: established-flow hit",
                Reason::FwdRedirect,
            ),
            (
                ct::DIR_REPLY,
                be,
                other_end,
                be80,
                Some(client),
                "IPv6 full NAT: reply",
                "XDP: IPv6 full NAT: reply",
                Reason::ReplyRedirect,
            ),
        ] {
            let xdp_wanted = !a.no_redirect && a.wants(xdp_path);
            if !a.wants(path) && !xdp_wanted {
                continue;
            }
            let mut f = Fixture::new(o, Vec::new());
            services(&mut f);
            let now = monotonic_ns();
            let (back, restore, restore_f) = if dir == ct::DIR_FORWARD {
                ((fnat.unwrap_or(src), nat), dst, fnat.map(|_| src))
            } else {
                ((nat, fnat.unwrap_or(dst)), src, fnat.map(|_| dst))
            };
            // A DNAT flow is stamped with the table epoch it was picked in, as the program
            // stamps it (IPv6 full NAT never is): its replies skip the forward lookup.
            let epoch = if fnat.is_none() {
                f.dp().epoch().expect("epoch")
            } else {
                0
            };
            let dp = f.rec.dataplane_mut();
            dp.conntrack6_insert(
                flow_key6(src, dst, IPPROTO_TCP),
                entry6(dir, nat, fnat, now, epoch),
            )
            .unwrap();
            dp.conntrack6_insert(
                flow_key6(back.0, back.1, IPPROTO_TCP),
                entry6(dir, restore, restore_f, now, epoch),
            )
            .unwrap();
            let pkt = Ipv6Packet::tcp(src, dst, TCP_ACK)
                .with_payload(&[0u8; 64])
                .build();
            let ns = measure(f.dp().program(), &pkt, &a);
            let hits = reason_count(&f, reason);
            // The DNAT reply: the same packet once more without the forward half, which the
            // reply would rebuild had it looked it up (as the IPv4 rows' check); put back.
            let mut skip_note = String::new();
            let mut skipped = true;
            if dir == ct::DIR_REPLY && fnat.is_none() {
                let measured = flow_key6(src, dst, IPPROTO_TCP);
                let e = f.dp().conntrack6_get(&measured).expect("the measured half");
                let fkey = lb_common::v6::forward_key6(&measured, &e);
                let kept = f.dp().conntrack6_get(&fkey);
                if kept.is_some() {
                    f.rec.dataplane_mut().conntrack6_remove(&fkey).unwrap();
                }
                let run = f.run(&pkt);
                skipped = run.counted(reason) == 1
                    && run.counted(Reason::EventCtRebuilt) == 0
                    && f.dp().conntrack6_get(&fkey).is_none();
                if let Some(kept) = kept {
                    f.rec.dataplane_mut().conntrack6_insert(fkey, kept).unwrap();
                }
                skip_note = if skipped {
                    ", forward lookup skipped".to_string()
                } else {
                    ", forward lookup NOT skipped".to_string()
                };
            }
            rows.push(Row {
                path,
                prog: Prog::Tc,
                ns,
                target: None,
                check: format!("{} {hits}/{total}{skip_note}", reason.name()),
                on_path: if skipped {
                    hits as f64 / total as f64
                } else {
                    0.0
                },
            });
            if xdp_wanted {
                // As the IPv4 XDP rows (see `measure_hits`): on the entries and routes the TC
                // runs left, stamped before each round.
                let keys = [
                    flow_key6(src, dst, IPPROTO_TCP),
                    flow_key6(back.0, back.1, IPPROTO_TCP),
                ];
                let ns = measure_xdp_stamped(&mut f, &pkt, &a, |f| stamp6(f, &keys));
                let tx = reason_count(&f, Reason::XdpTx);
                rows.push(Row {
                    path: xdp_path,
                    prog: Prog::Xdp,
                    ns,
                    target: None,
                    check: format!("xdp_tx {tx}/{total}"),
                    on_path: tx as f64 / total as f64,
                });
            }
        }

        // New flow: a ring of IPv6 services, each balancing to the next one's address and port,
        // in laps as IPv4's (see `measure_laps`); full NAT from the host's address.
        for (nat, evict) in NEW_FLOW_KINDS {
            let path = match (nat, evict) {
                (Nat::Dnat, true) => "IPv6: new flow (ct miss + service + maglev + 2 inserts)",
                (Nat::Full, true) => "IPv6 full NAT: new flow (+ source port)",
                (Nat::Dnat, false) => "IPv6: new flow, conntrack not full (no eviction)",
                (Nat::Full, false) => "IPv6 full NAT: new flow, conntrack not full (no eviction)",
            };
            if !a.wants(path) {
                continue;
            }
            let snat = (nat == Nat::Full).then_some(HOST6);
            let addr = |i: u32| {
                let i = i % NEW_FLOW_RING;
                sa6(
                    Ipv6Addr::new(
                        0xfd00,
                        0x100,
                        0,
                        0,
                        0,
                        0,
                        (i >> 8) as u16,
                        (i & 0xff) as u16,
                    ),
                    80 + (i % 2) as u16,
                )
            };
            sh(&[
                "ip",
                "-6",
                "route",
                "replace",
                "fd00:100::/64",
                "via",
                &backend6(1).to_string(),
                "dev",
                "fx0",
            ]);
            let mut f = Fixture::new(ring_options(&a, NEW_FLOW_RING + 1), Vec::new());
            let dp = f.rec.dataplane_mut();
            for i in 0..NEW_FLOW_RING {
                dp.install_service6(
                    i,
                    addr(i),
                    IPPROTO_TCP,
                    &[Backend6Spec {
                        id: i + 1,
                        addr: addr(i + 1),
                        weight: 1,
                        snat,
                    }],
                )
                .expect("install ring service");
            }
            let pkt = |port: u16| Ipv6Packet::tcp(sa6(CLIENT6, port), addr(0), TCP_SYN).build();
            rows.push(measure_laps(&mut f, &pkt, (!evict, false), (path, None)));
        }
        rows
    })
}
