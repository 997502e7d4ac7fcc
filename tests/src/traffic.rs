//! Traffic the end-to-end tests send through berth from a client namespace, and what they
//! check of its answers (shared by the IPv4 and IPv6 topologies).

use std::{collections::BTreeMap, net::SocketAddr};

use crate::{
    netns::Netns,
    servers::{responder, tcp_request_any, udp_request_any},
};

/// `n` one-request TCP connections (or UDP datagrams) from `client` to `to`: answers per
/// backend, each answer checked to be exactly `Hello from <backend>: <line sent>`.
pub fn spread(
    client: &Netns,
    to: impl Into<SocketAddr>,
    udp: bool,
    n: usize,
) -> BTreeMap<String, usize> {
    let to = to.into();
    client.run(move || {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let line = format!("req-{i}");
            let answer = if udp {
                udp_request_any(to, &line)
            } else {
                tcp_request_any(to, &line)
            }
            .unwrap_or_else(|e| panic!("request {i} to {to} (udp {udp}): {e}"));
            let who = responder(&answer)
                .unwrap_or_else(|| panic!("bad answer {answer:?}"))
                .to_owned();
            assert_eq!(answer, format!("Hello from {who}: {line}"), "request {i}");
            *counts.entry(who).or_insert(0) += 1;
        }
        counts
    })
}

/// Checks each backend's share against its weight within `tol` (absolute), and that no other
/// backend answered.
pub fn assert_shares(
    what: &str,
    counts: &BTreeMap<String, usize>,
    weights: &[(&str, u32)],
    tol: f64,
) {
    let total: usize = counts.values().sum();
    let wsum: u32 = weights.iter().map(|(_, w)| w).sum();
    println!("{what}: {total} answers: {counts:?} (weights {weights:?}, tolerance {tol})");
    for (name, w) in weights {
        let got = *counts.get(*name).unwrap_or(&0) as f64 / total as f64;
        let want = f64::from(*w) / f64::from(wsum);
        assert!(
            (got - want).abs() <= tol,
            "{what}: {name} share {got:.3}, expected {want:.3} +- {tol}"
        );
    }
    assert!(
        counts.keys().all(|k| weights.iter().any(|(n, _)| n == k)),
        "unexpected responder: {counts:?}"
    );
}

/// The peers of the established TCP connections to local `port` in `ns`, as `ss` lists them.
pub fn peers_of(ns: &Netns, port: u16) -> Vec<String> {
    ns.exec(&[
        "ss",
        "-tnH",
        "state",
        "established",
        &format!("( sport = :{port} )"),
    ])
    .lines()
    .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
    .collect()
}
