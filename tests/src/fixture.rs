//! Harness for packet fixtures run through `BPF_PROG_TEST_RUN`.
//!
//! Each case runs on its own thread that has `unshare`d into a fresh network namespace, set up so
//! the program's FIB lookups have deterministic answers: one veth `fx0` (peer `fx1`) carrying the
//! client network 10.10.0.1/24 (this "host"'s address) and a route to the backend network
//! 10.20.0.0/24, with permanent neighbour entries for the client and the backends (so the MAC
//! rewrite can be checked), and a second veth `fx2` (peer `fx3`, 10.30.0.1/24) behind which no
//! backend lives (a second uplink, for packets arriving where they should not). The namespace
//! disappears with the thread, even when the case panics.
//! Every case loads a fresh dataplane (fresh maps).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use crate::{topo::sh, wire};
use aya::programs::{TestRun, TestRunOptions};
use lb_common::{CtEntry, FlowKey, Reason, ipv4_to_wire, port_to_wire};
use lb_userspace::{
    config::{BackendSpec, Nat, PortRange, Protocol, Service},
    dataplane::{Dataplane, DataplaneOptions},
    reconciler::Reconciler,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_ABORTED: u32 = 0;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
pub const BACKEND_MAC_BASE: [u8; 6] = [0x02, 0, 0, 0, 0x14, 0];
/// Backends 10.20.0.11..=10.20.0.19 have neighbour entries; 10.20.0.50 deliberately has none.
pub const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 50);

pub fn backend(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, 0, 10 + n)
}

pub fn backend_mac(addr: Ipv4Addr) -> [u8; 6] {
    let mut m = BACKEND_MAC_BASE;
    m[5] = addr.octets()[3];
    m
}

/// A packet from a backend (its source), with that backend's MAC, as the fixture's backends
/// send theirs.
pub fn from_backend(mut p: wire::Ipv4Packet) -> Vec<u8> {
    p.src_mac = backend_mac(*p.src.ip());
    p.build()
}

/// Runs `f` on a thread inside a fresh, configured network namespace and propagates its panic.
pub fn in_fixture_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare only affects the calling thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        // Child processes forked from this thread inherit its namespace.
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&[
            "ip", "link", "add", "fx0", "type", "veth", "peer", "name", "fx1",
        ]);
        sh(&["ip", "link", "set", "fx0", "up"]);
        sh(&["ip", "link", "set", "fx1", "up"]);
        sh(&["ip", "addr", "add", "10.10.0.1/24", "dev", "fx0"]);
        sh(&["ip", "route", "add", "10.20.0.0/24", "dev", "fx0"]);
        sh(&[
            "ip", "link", "add", "fx2", "type", "veth", "peer", "name", "fx3",
        ]);
        sh(&["ip", "link", "set", "fx2", "up"]);
        sh(&["ip", "link", "set", "fx3", "up"]);
        sh(&["ip", "addr", "add", "10.30.0.1/24", "dev", "fx2"]);
        sh(&["ip", "route", "add", "unreachable", "192.0.2.0/24"]);
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        sh(&[
            "ip",
            "neigh",
            "add",
            &CLIENT.to_string(),
            "lladdr",
            &mac(CLIENT_MAC),
            "dev",
            "fx0",
            "nud",
            "permanent",
        ]);
        for n in 1..=9 {
            let b = backend(n);
            sh(&[
                "ip",
                "neigh",
                "add",
                &b.to_string(),
                "lladdr",
                &mac(backend_mac(b)),
                "dev",
                "fx0",
                "nud",
                "permanent",
            ]);
        }
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The MAC address of `fx0` in the current namespace.
pub fn fx0_mac() -> [u8; 6] {
    // Not /sys/class/net: sysfs shows the namespace of whoever mounted it, not this thread's.
    let out = Command::new("ip")
        .args(["-o", "link", "show", "fx0"])
        .output()
        .expect("ip link show fx0");
    let s = String::from_utf8_lossy(&out.stdout);
    let mac = s
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {s:?}"));
    let v: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Default options for fixtures: small tables, fixed seed.
pub fn options() -> DataplaneOptions {
    DataplaneOptions {
        maglev_size: 251,
        max_services: 8,
        max_backends: 64,
        conntrack_size: 4096,
        hash_seed: 0x1234_5678,
        ..DataplaneOptions::default()
    }
}

pub fn svc(
    name: &str,
    listen: &str,
    protocol: Protocol,
    backends: &[(Ipv4Addr, u16, u32)],
) -> Service {
    Service {
        name: name.into(),
        listen: listen.parse().expect("listen"),
        protocol,
        backends: backends
            .iter()
            .map(|&(a, p, w)| BackendSpec::dnat(SocketAddrV4::new(a, p).into(), w))
            .collect(),
        health: None,
        instances: Default::default(),
        mode: None,
    }
}

/// Runs each named `fn(Nat)` of the calling test file as two tests, `NAME::dnat` and
/// `NAME::fullnat`: the rules that hold however a backend is reached.
#[macro_export]
macro_rules! both_nat {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn dnat() {
                super::$name(lb_userspace::config::Nat::Dnat)
            }
            #[test]
            fn fullnat() {
                super::$name(lb_userspace::config::Nat::Full)
            }
        }
    )*};
}

/// `services` with every backend reached by `nat` (full NAT sources from this host's address
/// toward the backends, [`HOST`] in the fixture namespace).
pub fn with_nat(mut services: Vec<Service>, nat: Nat) -> Vec<Service> {
    for s in &mut services {
        s.mode = Some(nat);
        for b in &mut s.backends {
            b.nat = nat;
        }
    }
    services
}

/// The full-NAT source ports of [`options`] (the default range).
pub const SNAT_PORTS: PortRange = PortRange::DEFAULT_SNAT;

/// A loaded dataplane with services applied through the real reconciler.
pub struct Fixture {
    pub rec: Reconciler,
    pub services: Vec<Service>,
    ifindex: u32,
}

/// The result of one run of the program.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub out: Vec<u8>,
    /// Reason counters that changed during the run, as (name, delta).
    pub reasons: Vec<(&'static str, u64)>,
}

impl Run {
    pub fn counted(&self, r: Reason) -> u64 {
        self.reasons
            .iter()
            .find(|(n, _)| *n == r.name())
            .map_or(0, |(_, d)| *d)
    }

    /// The exit reasons counted (exactly one per run).
    pub fn exits(&self) -> Vec<&'static str> {
        self.reasons
            .iter()
            .filter(|(n, _)| Reason::ALL.iter().any(|r| r.name() == *n && r.is_exit()))
            .map(|(n, _)| *n)
            .collect()
    }
}

impl Fixture {
    pub fn new(options: DataplaneOptions, services: Vec<Service>) -> Self {
        let mut dp = Dataplane::load(options).expect("load dataplane");
        // The fixture namespace's own addresses, as the daemon records them.
        dp.sync_local_addrs(&lb_userspace::dataplane::host_ipv4_addrs())
            .expect("local addresses");
        let mut rec = Reconciler::new(dp);
        rec.apply(&services, "fixture").expect("apply services");
        Self {
            rec,
            services,
            ifindex: ifindex("fx0"),
        }
    }

    pub fn dp(&self) -> &Dataplane {
        self.rec.dataplane()
    }

    /// This dataplane adopted by a new reconciler, then given the same services: what a
    /// restarted berth does with its pinned one (`Reconciler::adopt`, then its config).
    pub fn readopt(self) -> Self {
        let mut rec = Reconciler::adopt(self.rec.into_dataplane()).expect("adopt the dataplane");
        rec.apply(&self.services, "fixture")
            .expect("apply services");
        Self { rec, ..self }
    }

    pub fn apply(&mut self, services: Vec<Service>) {
        self.rec
            .apply(&services, "fixture")
            .expect("apply services");
        self.services = services;
    }

    fn reasons(&self) -> Vec<u64> {
        self.dp()
            .reason_counters()
            .expect("reason counters")
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    }

    /// Runs the program once on `pkt` as if it arrived on `fx0`.
    pub fn run(&self, pkt: &[u8]) -> Run {
        self.run_at(pkt, self.ifindex)
    }

    /// Runs the program once on `pkt` as if it arrived on interface `iface`.
    pub fn run_on(&self, pkt: &[u8], iface: &str) -> Run {
        let i = ifindex(iface);
        assert_ne!(i, 0, "no interface {iface}");
        self.run_at(pkt, i)
    }

    fn run_at(&self, pkt: &[u8], ifindex: u32) -> Run {
        let before = self.reasons();
        let mut out = vec![0u8; pkt.len() + 256];
        // struct __sk_buff up to and including `ifindex` (offset 40).
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let res = self
            .dp()
            .program()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        let after = self.reasons();
        let reasons = Reason::ALL
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
        assert_eq!(
            run.exits().len(),
            1,
            "every run counts exactly one exit: {run:?}"
        );
        run
    }

    /// Runs the XDP fast path once on `pkt` as if it arrived on `fx0` (loading it first).
    /// Every run counts exactly one exit or, when it leaves the packet to TC, `event_xdp_pass`.
    pub fn run_xdp(&mut self, pkt: &[u8]) -> Run {
        let i = self.ifindex;
        self.run_xdp_at(pkt, i)
    }

    /// [`Fixture::run_xdp`] as if the packet arrived on interface `iface`.
    pub fn run_xdp_on(&mut self, pkt: &[u8], iface: &str) -> Run {
        let i = ifindex(iface);
        assert_ne!(i, 0, "no interface {iface}");
        self.run_xdp_at(pkt, i)
    }

    fn run_xdp_at(&mut self, pkt: &[u8], ifindex: u32) -> Run {
        let before = self.reasons();
        let mut out = vec![0u8; pkt.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let res = self
            .rec
            .dataplane_mut()
            .xdp_program()
            .expect("load the XDP program")
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN (XDP)");
        out.truncate(res.data_size_out as usize);
        let after = self.reasons();
        let reasons = Reason::ALL
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
        let passed = run.counted(Reason::EventXdpPass);
        assert_eq!(
            run.exits().len() as u64 + passed,
            1,
            "every XDP run counts exactly one exit or one pass to TC: {run:?}"
        );
        run
    }

    pub fn ct(&self, key: &FlowKey) -> Option<CtEntry> {
        self.dp().conntrack_get(key)
    }
}

pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey::new(
        ipv4_to_wire(src.ip().octets()),
        ipv4_to_wire(dst.ip().octets()),
        port_to_wire(src.port()),
        port_to_wire(dst.port()),
        proto,
    )
}

// ---- shared set-ups and assertions of the fixture suites ----

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

pub fn client(port: u16) -> SocketAddrV4 {
    sa(CLIENT, port)
}

/// A web service on the VIP and on any local address, three equal backends on :8000, plus a UDP
/// service on :5353.
pub fn standard() -> Fixture {
    standard_with(options())
}

/// [`standard`]'s services with `options`.
pub fn standard_with(options: DataplaneOptions) -> Fixture {
    let be = [
        (backend(1), 8000, 1),
        (backend(2), 8000, 1),
        (backend(3), 8000, 1),
    ];
    Fixture::new(
        options,
        vec![
            svc("vip", "10.99.0.1:80", Protocol::Tcp, &be),
            svc("any", "0.0.0.0:8080", Protocol::Tcp, &be),
            svc(
                "dns",
                "0.0.0.0:5353",
                Protocol::Udp,
                &[(backend(4), 53, 1), (backend(5), 53, 1)],
            ),
        ],
    )
}

/// [`standard`] with every backend reached by `nat`.
pub fn standard_nat(nat: Nat) -> Fixture {
    let f = standard();
    let services = with_nat(f.services.clone(), nat);
    drop(f);
    Fixture::new(options(), services)
}

/// One TCP service on the VIP with backend 1 only.
pub fn one_backend_vip() -> Fixture {
    Fixture::new(
        options(),
        vec![svc(
            "v",
            "10.99.0.1:80",
            Protocol::Tcp,
            &[(backend(1), 8000, 1)],
        )],
    )
}

pub fn assert_untouched(run: &Run, input: &[u8], reason: Reason) {
    assert_eq!(run.action, TC_ACT_OK, "{run:?}");
    assert_eq!(run.out, input, "packet must pass unmodified");
    assert_eq!(run.exits(), [reason.name()], "{run:?}");
}

pub fn assert_dropped(run: &Run, reason: Reason) {
    assert_eq!(run.action, TC_ACT_SHOT, "{run:?}");
    assert_eq!(run.exits(), [reason.name()], "{run:?}");
}

/// How a backend sees a translated flow: the backend, and its peer (the client for DNAT;
/// berth's address and port for full NAT), which its packets of the flow are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leg {
    pub backend: SocketAddrV4,
    pub peer: SocketAddrV4,
}

/// Checks a forward translation: destination rewritten to one of `backends`, source kept,
/// MACs set from the FIB, payload intact, checksums right. Returns the backend chosen.
pub fn assert_dnat(run: &Run, input: &[u8], backends: &[SocketAddrV4]) -> SocketAddrV4 {
    assert_fwd(run, input, backends, Nat::Dnat).backend
}

/// [`assert_dnat`] for a flow reached by `nat`: with full NAT the source must be [`HOST`] (the
/// kernel's source toward the backends) and a port of [`SNAT_PORTS`] instead of the client's.
pub fn assert_fwd(run: &Run, input: &[u8], backends: &[SocketAddrV4], nat: Nat) -> Leg {
    assert_eq!(run.action, TC_ACT_REDIRECT, "{run:?}");
    assert_eq!(run.exits(), [Reason::FwdRedirect.name()], "{run:?}");
    wire::verify_checksums(&run.out).unwrap_or_else(|e| panic!("rewritten packet: {e}"));
    let i = wire::parse(input);
    let o = wire::parse(&run.out);
    assert!(
        backends.contains(&o.dst),
        "dst {} not a backend {backends:?}",
        o.dst
    );
    match nat {
        Nat::Dnat => assert_eq!(o.src, i.src, "source must be kept"),
        Nat::Full => {
            assert_eq!(*o.src.ip(), HOST, "full NAT source address");
            assert!(
                (SNAT_PORTS.first..=SNAT_PORTS.last).contains(&o.src.port()),
                "full NAT source port {} outside {SNAT_PORTS}",
                o.src.port()
            );
        }
    }
    assert_eq!(o.payload, i.payload);
    assert_eq!(o.tcp_flags, i.tcp_flags);
    // Forwarded by berth: one hop, as the stack's forwarding would count it.
    assert_eq!(o.ttl, i.ttl - 1);
    assert_eq!(
        o.dst_mac,
        backend_mac(*o.dst.ip()),
        "destination MAC from the FIB"
    );
    assert_eq!(o.src_mac, fx0_mac(), "source MAC of the egress device");
    assert_eq!(run.out.len(), input.len());
    Leg {
        backend: o.dst,
        peer: o.src,
    }
}

pub fn b8000(n: u8) -> SocketAddrV4 {
    sa(backend(n), 8000)
}

pub fn web_backends() -> Vec<SocketAddrV4> {
    vec![b8000(1), b8000(2), b8000(3)]
}

/// Runs `pkt` through XDP (which must send it with `XDP_TX`, counted `xdp_tx`, its checksums
/// right by `verify`), then through TC (which must redirect it counted `reason`): the frames
/// must be the same, byte for byte (`describe` shows both when they are not). Returns the
/// frame. For the XDP fixtures of both families.
pub fn xdp_equals_tc(
    f: &mut Fixture,
    pkt: &[u8],
    reason: Reason,
    verify: fn(&[u8]) -> Result<(), String>,
    describe: fn(&[u8]) -> String,
) -> Vec<u8> {
    let x = f.run_xdp(pkt);
    assert_eq!(x.action, XDP_TX, "{x:?}");
    assert_eq!(x.exits(), [Reason::XdpTx.name()], "{x:?}");
    verify(&x.out).unwrap_or_else(|e| panic!("XDP's frame: {e}"));
    let t = f.run(pkt);
    assert_eq!(t.action, TC_ACT_REDIRECT, "{t:?}");
    assert_eq!(t.exits(), [reason.name()], "{t:?}");
    assert_eq!(
        x.out,
        t.out,
        "XDP and TC must write the same bytes: XDP {}, TC {}",
        describe(&x.out),
        describe(&t.out)
    );
    x.out
}

/// The XDP program left `pkt` to TC: passed, untouched, counted as a pass.
pub fn assert_left_to_tc(run: &Run, pkt: &[u8]) {
    assert_eq!(run.action, XDP_PASS, "{run:?}");
    assert_eq!(run.out, pkt, "a packet left to TC must be untouched");
    assert_eq!(run.counted(Reason::EventXdpPass), 1, "{run:?}");
    assert!(run.exits().is_empty(), "{run:?}");
}

/// 3,000 frames, the `base` frames in turn with one to three random bytes of their first
/// `header` changed, one in eight also cut short (never below an Ethernet header: the kernel
/// refuses such a test run), through the XDP program: each must be passed untouched or sent
/// (`XDP_TX`) at its length, and a frame whose checksums were right by `verify` must go out
/// with right ones. Returns (sent, passed).
pub fn mangle_through_xdp(
    f: &mut Fixture,
    base: &[Vec<u8>],
    header: usize,
    verify: fn(&[u8]) -> Result<(), String>,
) -> (usize, usize) {
    let mut x = 0x2545_f491_u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let (mut sent, mut passed) = (0, 0);
    for i in 0..3000 {
        let mut p = base[i % base.len()].clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() as usize) % header;
            p[at] = next() as u8;
        }
        if next() % 8 == 0 {
            p.truncate(14 + (next() as usize) % (p.len() - 14));
        }
        let run = f.run_xdp(&p);
        match run.action {
            XDP_PASS => {
                assert_eq!(run.out, p, "passed frames are untouched");
                passed += 1;
            }
            XDP_TX => {
                assert_eq!(run.out.len(), p.len());
                if verify(&p).is_ok() {
                    verify(&run.out)
                        .unwrap_or_else(|e| panic!("{e}: in {p:02x?} out {:02x?}", run.out));
                }
                sent += 1;
            }
            other => panic!("action {other}: {run:?}"),
        }
    }
    (sent, passed)
}
