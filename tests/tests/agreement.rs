//! Several balancers, one answer per flow: three dataplanes (three loaded programs with their
//! own maps, as on three hosts) given the same backends and the same `hash_seed`, each learning
//! the backends in another order and history, pick the same backend for each of 10,000 new
//! flows, run through the real program (BPF_PROG_TEST_RUN), before and after a backend leaves
//! all of them. Their backend slot ids differ; what must agree is the backend address a flow is
//! sent to, and the Maglev rows they built, read back slot for slot with each slot's id turned
//! into its backend's address, must be identical.

use std::collections::{BTreeMap, BTreeSet};

use aya::programs::{TestRun as _, TestRunOptions};
use berth_tests::{
    fixture::{
        Fixture, TC_ACT_REDIRECT, b8000, backend, client, ifindex, in_fixture_netns, options, svc,
    },
    wire::{self, Ipv4Packet, TCP_SYN},
};
use lb_userspace::config::{Protocol, Service};

const FLOWS: u16 = 10_000;

fn web(members: &[u8]) -> Vec<Service> {
    let be: Vec<_> = members.iter().map(|&n| (backend(n), 8000, 1)).collect();
    vec![svc("web", "10.99.0.1:80", Protocol::Tcp, &be)]
}

/// The backend each flow's SYN is sent to (client port -> backend), conntrack emptied after.
/// (Run straight through BPF_PROG_TEST_RUN, without `Fixture::run`'s reading of every exit
/// counter before and after: 60,000 runs.)
fn picks(f: &mut Fixture, backends: &[std::net::SocketAddrV4]) -> Vec<std::net::SocketAddrV4> {
    let vip = "10.99.0.1:80".parse().unwrap();
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex("fx0").to_ne_bytes());
    let out = (0..FLOWS)
        .map(|i| {
            let pkt = Ipv4Packet::tcp(client(20_000 + i), vip, TCP_SYN).build();
            let mut out = vec![0u8; pkt.len() + 64];
            let res = f
                .dp()
                .program()
                .test_run(TestRunOptions {
                    data_in: Some(&pkt),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            out.truncate(res.data_size_out as usize);
            assert_eq!(res.return_value, TC_ACT_REDIRECT, "flow {i}");
            wire::verify_checksums(&out).unwrap_or_else(|e| panic!("flow {i}: {e}"));
            let dst = wire::parse(&out).dst;
            assert!(backends.contains(&dst), "flow {i} sent to {dst}");
            dst
        })
        .collect();
    let dp = f.rec.dataplane_mut();
    for (k, _) in dp.conntrack_entries() {
        dp.conntrack_remove(&k).expect("empty conntrack");
    }
    out
}

/// The service's Maglev row as the program reads it, each slot's backend id turned into the
/// backend's address (ids are local to a balancer; the addresses are what must be identical).
fn row(f: &Fixture) -> Vec<std::net::SocketAddr> {
    let state = &f.rec.state()[0];
    let by_id: BTreeMap<u32, std::net::SocketAddr> =
        state.backends.iter().map(|(a, id, _)| (*id, *a)).collect();
    (0..options().maglev_size)
        .map(|slot| {
            let id = f
                .dp()
                .maglev_slot(state.id, slot)
                .expect("read the Maglev row");
            *by_id
                .get(&id)
                .unwrap_or_else(|| panic!("slot {slot} holds id {id}, not a backend of the pool"))
        })
        .collect()
}

/// The backend slot ids a dataplane gave its backends (address -> id).
fn ids(f: &Fixture) -> BTreeMap<std::net::SocketAddr, u32> {
    f.rec.state()[0]
        .backends
        .iter()
        .map(|(a, id, _)| (*a, *id))
        .collect()
}

#[test]
fn three_balancers_pick_the_same_backend_for_every_flow() {
    in_fixture_netns(|| {
        // n1: one backend at a time; n2: a backend that came and went, then the rest in
        // reverse; n3: all at once.
        let mut n1 = Fixture::new(options(), web(&[]));
        for k in 1..=4 {
            n1.apply(web(&(1..=k).collect::<Vec<_>>()));
        }
        let mut n2 = Fixture::new(options(), web(&[9]));
        n2.apply(web(&[9, 4, 3]));
        n2.apply(web(&[4, 3]));
        n2.apply(web(&[4, 3, 2, 1]));
        let mut n3 = Fixture::new(options(), web(&[1, 2, 3, 4]));
        assert_ne!(ids(&n1), ids(&n2), "the slot ids were meant to differ");
        // The rows themselves, slot for slot (ids read as addresses).
        assert_eq!(row(&n1), row(&n2), "n1 and n2 built different Maglev rows");
        assert_eq!(row(&n1), row(&n3), "n1 and n3 built different Maglev rows");

        let four: Vec<_> = (1..=4).map(b8000).collect();
        let before: Vec<Vec<_>> = [&mut n1, &mut n2, &mut n3]
            .into_iter()
            .map(|f| picks(f, &four))
            .collect();
        assert!(before[0] == before[1], "n1 and n2 disagree");
        assert!(before[0] == before[2], "n1 and n3 disagree");
        let used: BTreeSet<_> = before[0].iter().collect();
        assert_eq!(used.len(), 4, "every backend takes flows");

        // Backend 2 leaves all of them.
        for f in [&mut n1, &mut n2, &mut n3] {
            f.apply(web(&[1, 3, 4]));
        }
        assert_eq!(
            row(&n1),
            row(&n2),
            "n1 and n2 rows differ after the removal"
        );
        assert_eq!(
            row(&n1),
            row(&n3),
            "n1 and n3 rows differ after the removal"
        );
        let three: Vec<_> = [1, 3, 4].map(b8000).to_vec();
        let after: Vec<Vec<_>> = [&mut n1, &mut n2, &mut n3]
            .into_iter()
            .map(|f| picks(f, &three))
            .collect();
        assert!(after[0] == after[1], "n1 and n2 disagree after the removal");
        assert!(after[0] == after[2], "n1 and n3 disagree after the removal");
        let moved = before[0]
            .iter()
            .zip(&after[0])
            .filter(|(b, a)| b != a)
            .count();
        let on_b2 = before[0].iter().filter(|b| **b == b8000(2)).count();
        let share = f64::from(moved as u32) / f64::from(FLOWS);
        println!(
            "{FLOWS} flows, 3 balancers: all agree; backend 2 of 4 removed: {moved} flows moved \
             ({share:.4}; ideal 1/N = 0.25, {on_b2} were on backend 2)"
        );
        assert!(moved >= on_b2, "flows of the removed backend must move");
        assert!(
            (share - 0.25).abs() < 0.05,
            "moved share {share} is not close to 1/N"
        );
    });
}
