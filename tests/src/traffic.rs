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
    peers_in(ns, port, "established")
}

/// The peers of the TCP connections to local `port` in `ns` in TCP state `state` (an `ss`
/// state name: `established`, `time-wait`, ...), as `ss` lists them.
pub fn peers_in(ns: &Netns, port: u16, state: &str) -> Vec<String> {
    ns.exec(&[
        "ss",
        "-tnH",
        "state",
        state,
        &format!("( sport = :{port} )"),
    ])
    .lines()
    .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
    .collect()
}

/// The kernel's `TcpExt` counter `name` (`/proc/net/netstat`) in `ns`.
pub fn tcp_ext(ns: &Netns, name: &str) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/netstat"]);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("TcpExt {name} in {text}"))
}

/// `n` HTTP/1.0 requests in a row from `client` to full-NAT service `to` whose one backend, in
/// `backend`, listens on :8000 and closes each connection first (it answers, then closes),
/// leaving it in its TIME_WAIT for 60 s: each must be answered, and none may have been sent
/// from a port an earlier one left in TIME_WAIT. Checked at the backend: `n` TIME_WAIT
/// connections, all from berth (`from`, its address as `ss` prints it, with the port's
/// separator), on `n` ports. The clients should send no TCP timestamps: then a SYN meeting a
/// TIME_WAIT connection is taken only if its sequence number is beyond the old one's, else
/// answered with the old connection's ACK, which the client resets before sending its SYN
/// again. The client's SYN retries and what each request took are printed and given in the
/// failure message, not judged: a SYN is retried for other reasons too (the IPv6 topology's
/// first one, now and then, 1 s late), a Linux client sends the SYN again ~10 ms after that
/// ACK, and other stacks wait for their SYN timeout.
pub fn requests_never_meet_time_wait(
    client: &Netns,
    backend: &Netns,
    to: std::net::SocketAddr,
    n: usize,
    from: &str,
) {
    let retries = tcp_ext(client, "TCPSynRetrans");
    let (answers, took): (Vec<_>, Vec<_>) = client.run(move || {
        (0..n)
            .map(|_| {
                let t0 = std::time::Instant::now();
                (crate::servers::http_get_any(to), t0.elapsed().as_millis())
            })
            .unzip()
    });
    let retries = tcp_ext(client, "TCPSynRetrans") - retries;
    println!("requests took (ms): {took:?}; SYNs retried: {retries}");
    for (i, a) in answers.iter().enumerate() {
        let (status, body) = a.as_ref().unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(*status, 200, "request {i}");
        assert!(body.starts_with("Hello from b"), "request {i}: {body}");
    }
    let mut waiting = peers_in(backend, 8000, "time-wait");
    waiting.sort();
    waiting.dedup();
    assert_eq!(
        waiting.len(),
        n,
        "{waiting:?}; SYNs retried: {retries}; requests took (ms): {took:?}"
    );
    assert!(waiting.iter().all(|p| p.starts_with(from)), "{waiting:?}");
}
