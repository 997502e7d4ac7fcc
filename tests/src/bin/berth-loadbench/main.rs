//! `cargo xtask bench` (second part): macro benchmark of berth against its peers, on one machine,
//! in one run, through namespaces this program builds and removes.
//!
//! Topology (every name starts with `bb-`; nothing outside these namespaces is touched):
//!
//! ```text
//!  bb-client            bb-lb ("the host")              bb-be1 / bb-be2
//!  wrk  bb-c0 ---- bb-lbc 10.77.0.1 (service :8080)
//!  10.77.0.2              bb-lb1 10.77.1.1 ---- bb-e1  10.77.1.2  nginx :8000 "be1"
//!                         bb-lb2 10.77.2.1 ---- bb-e2  10.77.2.2  nginx :8000 "be2"
//! ```
//!
//! Contenders, all with the same backends, clients and CPU pinning (wrk and both nginx pinned
//! with sched_setaffinity, as taskset does):
//! - `direct`: one wrk per backend, each with half the connections, routed through bb-lb by plain
//!   IPv4 forwarding (the ceiling: same hops, both backends loaded, no balancer); rates are
//!   added, the worse p99 and the mean p50 kept;
//! - `direct1` (only when asked for with `--contenders`): wrk to backend 1 alone, all connections,
//!   the literal "one backend, no balancer" ceiling. Only one nginx is busy then, alone on its
//!   CPU, so its p99 lacks the few ms of scheduling delay that two busy nginx sharing a CPU add
//!   to every contender that spreads the load (`direct` included);
//! - `berth`: `berth run` in bb-lb on all three of its veths (TC ingress, redirect mode), no
//!   socket programs (`--cgroup none`);
//! - `nftables`: kube-proxy-style kernel NAT, table `ip bb_nat` in bb-lb: prerouting
//!   `dnat to jhash ip saddr . tcp sport mod 2 map { 0 : be1 . 8000, 1 : be2 . 8000 }` (per-flow
//!   hash, chosen once per conntrack entry). No masquerade: the backends' default route goes
//!   through bb-lb, so conntrack sees and un-NATs the replies, exactly as berth needs;
//! - `haproxy`: Debian's HAProxy, `mode tcp`, `balance roundrobin`, `nbthread 1` (left unpinned:
//!   with 2 cores a second thread only competes with wrk and nginx);
//! - remote backends (issue 11): while these two run, the backends' default routes are removed,
//!   so they can answer only bb-lb's own addresses on their links, as backends on other hosts
//!   whose way to the client bypasses the balancer (DNAT and nftables cannot serve them; the
//!   check proves the client cannot reach a backend directly). `berth-fullnat`: berth with
//!   `mode = "fullnat"` (source: bb-lb's address toward each backend, ports it allocates from
//!   the default `snat_ports`, 61000-65535, closed flows' ports taken over after
//!   `snat_port_reuse_ms`);
//!   `haproxy-remote`: the same HAProxy (a full proxy by nature). Their ratios are to
//!   `berth-fullnat`.
//!
//! Workloads (wrk, `-t1 -cN --latency`): HTTP keep-alive requests/s, and new connections/s (one
//! request per connection: `-H 'Connection: close'`). Latency p50/p99 are wrk's.
//!
//! CPU per 100k requests: the machine's system + softirq time from /proc/stat (all CPUs) over
//! the wrk run, nothing subtracted, so it includes wrk's and nginx's kernel time (the same for
//! every contender) and whatever else runs on the machine. For HAProxy its user time
//! (/proc/PID/stat utime) is added; its system time is already in the machine's. berth's
//! dataplane runs in softirq, so its kernel time is what counts for it.
//!
//! Rounds are interleaved (round 1: every contender, then round 2 ...; the order rotates each
//! round), and every figure is the median over rounds, printed beside its ratio to berth's.
//! Results go to stdout (markdown) and to target/bench/loadbench-<unix time>.json and
//! target/bench/latest.json.
//!
//! Modules: `topology` (namespaces, veths, processes, the nginx backends), `contenders`, `wrk`
//! (workloads and one measured run), `report`.

mod contenders;
mod report;
mod topology;
mod wrk;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use berth_tests::{daemon::berth_bin, netns::try_sh};

use crate::{
    contenders::{Contender, check, start},
    report::{Results, report},
    topology::{Topology, WORKDIR, start_nginx},
    wrk::{Workload, measure},
};

/// Set by SIGINT/SIGTERM: stop after the current run.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The command line (`--help`).
pub struct Args {
    pub duration: u32,
    pub rounds: usize,
    pub connections: u32,
    pub contenders: Vec<Contender>,
    pub wrk_cpu: usize,
    pub nginx_cpu: usize,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn args() -> Args {
    let n = cores();
    let mut a = Args {
        duration: 5,
        rounds: 5,
        connections: 32,
        contenders: Contender::DEFAULT.to_vec(),
        wrk_cpu: 0,
        nginx_cpu: if n > 1 { 1 } else { 0 },
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => {
                a.duration = val()
                    .trim_end_matches('s')
                    .parse()
                    .expect("--duration SECONDS")
            }
            "--rounds" => a.rounds = val().parse().expect("--rounds N"),
            "--connections" => a.connections = val().parse().expect("--connections N"),
            "--wrk-cpu" => a.wrk_cpu = val().parse().expect("--wrk-cpu N"),
            "--nginx-cpu" => a.nginx_cpu = val().parse().expect("--nginx-cpu N"),
            // Lines for berth's `[dataplane]` section (both berth contenders), e.g.
            // "snat_port_reuse_ms = 200", to measure a setting against the defaults.
            "--berth-dataplane" => {
                let lines = val().replace(';', "\n");
                contenders::BERTH_DATAPLANE
                    .set(lines)
                    .expect("--berth-dataplane once");
            }
            "--contenders" => {
                a.contenders = val()
                    .split(',')
                    .map(|c| {
                        *Contender::ALL
                            .iter()
                            .find(|k| k.name() == c)
                            .unwrap_or_else(|| panic!("unknown contender {c}"))
                    })
                    .collect();
                // Every ratio is to a berth: the one of each kind asked for comes along.
                for c in a.contenders.clone() {
                    if !a.contenders.contains(&c.reference()) {
                        a.contenders.insert(0, c.reference());
                    }
                }
            }
            "-h" | "--help" => {
                println!(
                    "berth-loadbench [--duration SECONDS (5)] [--rounds N (5)] [--connections N (32)] \
                     [--contenders direct,berth,nftables,haproxy,berth-fullnat,haproxy-remote (also: direct1)] [--wrk-cpu N (0)] [--nginx-cpu N (1)] \
                     [--berth-dataplane 'KEY = VALUE; ...' (berth's [dataplane] lines)]"
                );
                std::process::exit(0);
            }
            other => panic!(
                "unknown argument {other}; use --duration S --rounds N --connections N --contenders LIST"
            ),
        }
    }
    assert!(a.rounds >= 1 && a.duration >= 1 && a.connections >= 1);
    assert!(
        a.wrk_cpu < n && a.nginx_cpu < n,
        "this machine has {n} CPUs"
    );
    a
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Removes the work directory on drop (after the processes that write there are gone).
struct WorkDir;

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["berth.log", "haproxy.log"] {
                if let Ok(s) = std::fs::read_to_string(Path::new(WORKDIR).join(f)) {
                    eprintln!("---- {f} ----\n{s}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(WORKDIR);
    }
}

fn main() {
    let a = args();
    for tool in ["wrk", "nginx", "haproxy", "nft"] {
        assert!(
            try_sh(&["sh", "-c", &format!("command -v {tool}")]).is_ok(),
            "{tool} is missing: run `cargo xtask bench`, which installs it"
        );
    }
    assert!(
        berth_bin().exists(),
        "{} not built: run `cargo xtask bench` (or set BERTH_BIN)",
        berth_bin().display()
    );
    // SIGINT/SIGTERM: stop after the current run and clean up through the guards (the
    // children in our process group get the same SIGINT and stop on their own).
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(WORKDIR);
    std::fs::create_dir_all(WORKDIR).expect("work dir");
    // Drop order (reverse of declaration): contender, nginx, topology, then the work dir.
    let _workdir = WorkDir;
    let _topo = Topology::build();
    let _nginx = [start_nginx(0, a.nginx_cpu), start_nginx(1, a.nginx_cpu)];
    eprintln!(
        "loadbench: {} rounds x {:?} x {} workloads x {} s (wrk on CPU {}, nginx on CPU {})",
        a.rounds,
        a.contenders.iter().map(|c| c.name()).collect::<Vec<_>>(),
        Workload::ALL.len(),
        a.duration,
        a.wrk_cpu,
        a.nginx_cpu
    );
    let mut res: Results = BTreeMap::new();
    for round in 0..a.rounds {
        let n = a.contenders.len();
        for k in 0..n {
            let c = a.contenders[(k + round) % n];
            let running = start(c);
            match check(c) {
                Ok(seen) => eprintln!(
                    "loadbench: round {} {}: check ok {seen:?}",
                    round + 1,
                    c.name()
                ),
                Err(e) => {
                    eprintln!(
                        "loadbench: round {} {}: CHECK FAILED: {e}",
                        round + 1,
                        c.name()
                    );
                    if let Some(log) = running.berth_log() {
                        eprintln!("---- berth log ----\n{log}");
                    }
                }
            }
            for w in Workload::ALL {
                assert!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                let r = measure(c, w, &running, &a);
                eprintln!(
                    "loadbench: round {} {:>8} {:>10}: {:>8.0} {} p50 {:.2} ms p99 {:.2} ms, {:.3} CPU s/100k, errors {}, be1/be2 {}/{}",
                    round + 1,
                    c.name(),
                    w.name(),
                    r.rps,
                    w.unit(),
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_per_100k,
                    r.errors(),
                    r.split[0],
                    r.split[1]
                );
                res.entry((c, w)).or_default().push(r);
            }
            running.stop();
        }
    }
    let mut present = a.contenders.clone();
    present.sort();
    report(&res, &a, &present, started);
}
