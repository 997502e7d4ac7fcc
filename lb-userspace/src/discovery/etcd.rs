//! The etcd source: for each watched key prefix, one read of everything under it, then a v3
//! watch from the revision just after that read, so no change between the two is missed. A
//! watch cancelled because its revision was compacted leads to a fresh read; a lost connection
//! to a reconnect with backoff (100 ms doubling to 2 s) and a fresh read of every prefix, which
//! replaces what was known. Meanwhile the daemon keeps serving what it last knew.
//!
//! Each key under a prefix is one backend; its value is JSON, either berth's
//! `{"address": "IP:PORT", "weight": N}` (weight optional, default 1) or the
//! `{"host": "IP", "port": N}` that Nerve writes for Synapse (other fields are ignored). A key
//! written under a lease vanishes when its writer stops refreshing the lease, which etcd reports
//! as a deletion: the backend leaves (and drains) as any other.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::config::{ConfigError, EtcdConfig, MAX_WEIGHT, Service};

/// How to reach the cluster: endpoints and options, with the TLS files and the password read.
#[derive(Clone)]
pub struct Connect {
    pub endpoints: Vec<String>,
    options: ConnectOptions,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The options hold the password: never printed.
        f.debug_struct("Connect")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

fn read_file(field: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError {
        field: field.to_owned(),
        message: format!("cannot read {path}: {e}"),
    })
}

impl Connect {
    /// The client settings of a validated `[etcd]`: reads the certificate, key and password
    /// files (an unreadable one is named, before the kernel is touched).
    pub fn from_config(cfg: &EtcdConfig) -> Result<Self, ConfigError> {
        let t = Duration::from_millis(cfg.timeout_ms);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t)
            .with_keep_alive(t, t)
            .with_keep_alive_while_idle(true);
        if let Some(user) = &cfg.username {
            let password = match (&cfg.password, &cfg.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => String::from_utf8_lossy(&read_file("etcd.password_file", f)?)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                (None, None) => String::new(),
            };
            options = options.with_user(user.clone(), password);
        }
        if cfg.tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_file("etcd.ca_file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read_file("etcd.cert_file", cert)?,
                    read_file("etcd.key_file", key)?,
                ));
            }
            if let Some(name) = &cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
            options = options.with_tls(tls);
        }
        Ok(Self {
            endpoints: cfg.endpoints.clone(),
            options,
        })
    }

    /// A client (the connection itself is made by the first request).
    pub async fn client(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(&self.endpoints, Some(self.options.clone())).await
    }
}

/// One backend as registered in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// IPv4 or IPv6: it backs the services of its family that take its prefix.
    pub addr: SocketAddr,
    pub weight: u32,
}

/// A key's value read as a backend, or why it cannot be one.
pub type Parsed = Result<Entry, String>;

/// Reads a value: `{"address": "IP:PORT", "weight": N}` or `{"host": "IP", "port": N}`
/// (Nerve's), other fields ignored.
pub fn parse_value(v: &[u8]) -> Parsed {
    #[derive(serde::Deserialize)]
    struct Value {
        address: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        weight: Option<u32>,
    }
    let v: Value = serde_json::from_slice(v).map_err(|e| {
        format!(
            "not a JSON object with \"address\" or \"host\" and \"port\" ({})",
            crate::config::clip_values(&e.to_string())
        )
    })?;
    let addr = match (&v.address, &v.host, v.port) {
        (Some(a), _, _) => a.parse::<SocketAddr>().map_err(|_| {
            format!(
                "address {:?} is not an IP:PORT ([IPv6]:PORT for IPv6)",
                crate::config::clip_values(a)
            )
        })?,
        // Nerve writes the bare address, of either family (brackets tolerated).
        (None, Some(h), Some(p)) => SocketAddr::new(
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| {
                    format!(
                        "host {:?} is not an IPv4 or IPv6 address",
                        crate::config::clip_values(h)
                    )
                })?,
            p,
        ),
        _ => return Err("has neither \"address\" nor \"host\" and \"port\"".into()),
    };
    let unusable = match addr.ip() {
        IpAddr::V4(ip) => ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast(),
        // An IPv4-mapped address is IPv4's: it must be written as one (no NAT64).
        IpAddr::V6(ip) => ip.is_unspecified() || ip.is_multicast() || ip.to_ipv4_mapped().is_some(),
    };
    if unusable || addr.port() == 0 {
        return Err(format!("{addr} is not a usable unicast address and port"));
    }
    let weight = v.weight.unwrap_or(1);
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is above the maximum {MAX_WEIGHT}"));
    }
    Ok(Entry { addr, weight })
}

/// What the etcd source tells the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Everything under `prefix` at `revision` (after a (re)connect, a compaction, or a change
    /// of the watched prefixes): replaces what was known of it.
    Snapshot {
        prefix: String,
        entries: BTreeMap<String, Parsed>,
        revision: i64,
    },
    /// A key was written.
    Put {
        prefix: String,
        key: String,
        entry: Parsed,
        revision: i64,
    },
    /// A key was deleted (or its lease expired).
    Delete {
        prefix: String,
        key: String,
        revision: i64,
    },
    /// Every prefix was read and is being watched.
    Synced,
    /// The cluster cannot be reached (the first failure since it last could).
    Down(String),
}

/// What the daemon knows from etcd: prefix -> key -> entry.
pub type Known = BTreeMap<String, BTreeMap<String, Parsed>>;

/// Updates `known` with `update` and says what changed (the reason the reconciler logs), or
/// None when nothing about the backends changed.
pub fn record(known: &mut Known, update: &Update) -> Option<String> {
    match update {
        Update::Snapshot {
            prefix, entries, ..
        } => {
            let old = known.insert(prefix.clone(), entries.clone());
            (old.as_ref() != Some(entries)).then(|| format!("etcd: resync of {prefix}"))
        }
        Update::Put {
            prefix, key, entry, ..
        } => {
            let keys = known.entry(prefix.clone()).or_default();
            let old = keys.insert(key.clone(), entry.clone());
            (old.as_ref() != Some(entry)).then(|| match entry {
                Ok(e) => format!("etcd: {key} = {} weight {}", e.addr, e.weight),
                Err(_) => format!("etcd: {key} unusable"),
            })
        }
        Update::Delete { prefix, key, .. } => known
            .get_mut(prefix)
            .and_then(|keys| keys.remove(key))
            .map(|_| format!("etcd: {key} deleted")),
        Update::Synced | Update::Down(_) => None,
    }
}

/// Adds the backends `known` holds under each service's prefix (`prefixes`: service name ->
/// prefix) to `services`, each to the services of its family: a dual-stack service's prefix
/// (taken by `NAME` and `NAME.ipv6`) feeds its IPv4 entries to one and its IPv6 entries to the
/// other. Returns one message per key whose value is not a backend, whose address another
/// source already gave the service, or whose family no service of that prefix listens on.
pub fn add_backends(
    services: &mut [Service],
    prefixes: &HashMap<String, String>,
    known: &Known,
) -> Vec<String> {
    let mut problems = Vec::new();
    // Which families take each prefix (a key of a family none takes is named, once).
    let mut families: HashMap<&str, (bool, bool)> = HashMap::new();
    for svc in services.iter() {
        if let Some(p) = prefixes.get(&svc.name) {
            let f = families.entry(p.as_str()).or_default();
            if svc.listen.is_ipv6() {
                f.1 = true;
            } else {
                f.0 = true;
            }
        }
    }
    let mut named = std::collections::BTreeSet::new();
    for svc in services.iter_mut() {
        let Some(prefix) = prefixes.get(&svc.name) else {
            continue;
        };
        let Some(keys) = known.get(prefix) else {
            continue;
        };
        let (takes4, takes6) = families.get(prefix.as_str()).copied().unwrap_or_default();
        let v6 = svc.listen.is_ipv6();
        for (key, entry) in keys {
            match entry {
                Err(e) => {
                    if named.insert(key.clone()) {
                        problems.push(format!("etcd: key {key}: {e}; not served"))
                    }
                }
                Ok(e) if e.addr.is_ipv6() != v6 => {
                    // Another service of this prefix (the other half) takes it, or nobody.
                    let taken = if e.addr.is_ipv6() { takes6 } else { takes4 };
                    if !taken && named.insert(key.clone()) {
                        problems.push(format!(
                            "etcd: key {key}: {} is {}, service {} listens on {} ({}) (add \
                             listen6 for a dual-stack service); not served",
                            e.addr,
                            if e.addr.is_ipv6() { "IPv6" } else { "IPv4" },
                            svc.name,
                            if v6 { "IPv6" } else { "IPv4" },
                            svc.listen
                        ));
                    }
                }
                Ok(e) if svc.backends.iter().any(|b| b.addr == e.addr) => problems.push(format!(
                    "etcd: key {key}: {} is already a backend of service {} (the first \
                         entry's weight applies)",
                    e.addr, svc.name
                )),
                Ok(e) => svc.backends.push(crate::config::BackendSpec {
                    addr: e.addr,
                    weight: e.weight,
                    nat: svc.nat_or(crate::config::Nat::Dnat),
                }),
            }
        }
        svc.backends.sort();
    }
    problems
}

/// Why a session ended.
enum End {
    /// The cluster could not be reached or the connection broke: retry with backoff.
    Unreachable(String),
    /// A watch was cancelled (its revision compacted): read everything again, at once.
    Resync(String),
    /// The daemon is gone.
    Closed,
}

fn unreachable(what: &str) -> impl Fn(etcd_client::Error) -> End + '_ {
    move |e| End::Unreachable(format!("{what}: {e}"))
}

fn key_of(kv: &etcd_client::KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

/// One connection's worth: read and watch every prefix until something ends it. `synced` is
/// set once every prefix is read and watched.
async fn session(
    connect: &Connect,
    prefixes: &[String],
    tx: &mpsc::Sender<Update>,
    synced: &mut bool,
) -> End {
    let mut client = match connect.client().await {
        Ok(c) => c,
        Err(e) => return End::Unreachable(format!("connecting: {e}")),
    };
    let mut streams = Vec::new();
    for prefix in prefixes {
        let got = match client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unreachable(&format!("reading {prefix}")))
        {
            Ok(g) => g,
            Err(e) => return e,
        };
        let revision = got.header().map_or(0, |h| h.revision());
        let entries = got
            .kvs()
            .iter()
            .map(|kv| (key_of(kv), parse_value(kv.value())))
            .collect();
        // From the revision after the read: every later change, none twice.
        let stream = match client
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(unreachable(&format!("watching {prefix}")))
        {
            Ok(s) => s,
            Err(e) => return e,
        };
        if tx
            .send(Update::Snapshot {
                prefix: prefix.clone(),
                entries,
                revision,
            })
            .await
            .is_err()
        {
            return End::Closed;
        }
        let p = prefix.clone();
        streams.push(stream.map(move |r| (p.clone(), r)));
    }
    if tx.send(Update::Synced).await.is_err() {
        return End::Closed;
    }
    *synced = true;
    let mut all = futures_util::stream::select_all(streams);
    loop {
        let Some((prefix, msg)) = all.next().await else {
            return if prefixes.is_empty() {
                // Nothing to watch: wait to be told otherwise.
                std::future::pending().await
            } else {
                End::Unreachable("watch stream ended".into())
            };
        };
        let resp = match msg {
            Ok(r) => r,
            Err(e) => return End::Unreachable(format!("watching {prefix}: {e}")),
        };
        if resp.compact_revision() > 0 {
            return End::Resync(format!(
                "the watch of {prefix} fell behind a compaction (revision {})",
                resp.compact_revision()
            ));
        }
        if resp.canceled() {
            return End::Resync(format!(
                "the watch of {prefix} was cancelled: {}",
                resp.cancel_reason()
            ));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = key_of(kv);
            let revision = kv.mod_revision();
            let update = match ev.event_type() {
                EventType::Put => Update::Put {
                    prefix: prefix.clone(),
                    key,
                    entry: parse_value(kv.value()),
                    revision,
                },
                EventType::Delete => Update::Delete {
                    prefix: prefix.clone(),
                    key,
                    revision,
                },
            };
            if tx.send(update).await.is_err() {
                return End::Closed;
            }
        }
    }
}

/// Runs the etcd source until `stop`: reads and watches the prefixes `prefixes` holds (a
/// change, from a reload, restarts the session with a fresh read), and reconnects with backoff
/// (100 ms doubling to 2 s), sending [`Update::Down`] once per outage.
pub async fn run(
    connect: Connect,
    mut prefixes: watch::Receiver<Vec<String>>,
    tx: mpsc::Sender<Update>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = crate::backoff::Backoff::default();
    let mut down = false;
    loop {
        let current = prefixes.borrow_and_update().clone();
        let started = tokio::time::Instant::now();
        let mut synced = false;
        let end = tokio::select! {
            e = session(&connect, &current, &tx, &mut synced) => e,
            _ = prefixes.changed() => {
                info!("etcd: the watched prefixes changed, reading them afresh");
                continue;
            }
            _ = stop.changed() => return,
        };
        if synced {
            // It was reachable: the next failure is a new outage.
            down = false;
        }
        match end {
            End::Closed => return,
            End::Resync(why) => {
                info!("etcd: {why}; reading afresh");
                down = false;
                continue;
            }
            End::Unreachable(e) => {
                if !down {
                    down = true;
                    if tx.send(Update::Down(e.clone())).await.is_err() {
                        return;
                    }
                } else {
                    debug!("etcd: still unreachable: {e}");
                }
            }
        }
        backoff.ended_after(started.elapsed());
        if !backoff.sleep_or_stop(&mut stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendSpec, Protocol};

    #[test]
    fn values_in_berths_and_nerves_layouts() {
        assert_eq!(
            parse_value(br#"{"address":"10.0.0.5:8000","weight":3}"#),
            Ok(Entry {
                addr: "10.0.0.5:8000".parse().unwrap(),
                weight: 3
            })
        );
        // IPv6, in both layouts (Nerve's bare host, brackets tolerated).
        for v in [
            &br#"{"address":"[fd00::5]:8000"}"#[..],
            br#"{"host":"fd00::5","port":8000}"#,
            br#"{"host":"[fd00::5]","port":8000}"#,
        ] {
            assert_eq!(
                parse_value(v),
                Ok(Entry {
                    addr: "[fd00::5]:8000".parse().unwrap(),
                    weight: 1
                }),
                "{v:?}"
            );
        }
        assert_eq!(
            parse_value(br#"{"host":"10.0.0.6","port":80,"name":"i-1234","labels":{}}"#),
            Ok(Entry {
                addr: "10.0.0.6:80".parse().unwrap(),
                weight: 1
            })
        );
        for (bad, needle) in [
            (&b"not json"[..], "JSON"),
            (br#"{"address":"db.local:80"}"#, "IP:PORT"),
            (br#"{"address":"fd00::2:80"}"#, "[IPv6]:PORT"),
            (br#"{"address":"[::]:80"}"#, "usable"),
            (br#"{"address":"[::ffff:10.0.0.1]:80"}"#, "usable"),
            (br#"{"host":"ff02::1","port":80}"#, "usable"),
            (br#"{"host":"fd00::zz","port":80}"#, "IPv4 or IPv6"),
            (br#"{"host":"10.0.0.6"}"#, "neither"),
            (br#"{"address":"0.0.0.0:80"}"#, "usable"),
            (br#"{"address":"10.0.0.1:80","weight":10001}"#, "weight"),
            (br#"{"address":"10.0.0.1:80","weight":-1}"#, "JSON"),
        ] {
            let e = parse_value(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    fn web() -> Service {
        Service {
            name: "web".into(),
            listen: "10.99.0.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![BackendSpec::dnat("10.0.0.9:8000".parse().unwrap(), 1)],
            health: None,
            instances: Default::default(),
            mode: None,
        }
    }

    #[test]
    fn updates_change_what_is_known_and_say_so() {
        let mut known = Known::new();
        let p = "/web/".to_owned();
        let e = |s: &str| parse_value(format!(r#"{{"address":"{s}"}}"#).as_bytes());
        let snap = Update::Snapshot {
            prefix: p.clone(),
            entries: [("/web/a".to_owned(), e("10.0.0.1:8000"))].into(),
            revision: 5,
        };
        assert_eq!(
            record(&mut known, &snap).as_deref(),
            Some("etcd: resync of /web/")
        );
        // The same listing again changes nothing.
        assert_eq!(record(&mut known, &snap), None);
        let put = Update::Put {
            prefix: p.clone(),
            key: "/web/b".into(),
            entry: e("10.0.0.2:8000"),
            revision: 6,
        };
        assert_eq!(
            record(&mut known, &put).as_deref(),
            Some("etcd: /web/b = 10.0.0.2:8000 weight 1")
        );
        let bad = Update::Put {
            prefix: p.clone(),
            key: "/web/c".into(),
            entry: parse_value(b"{}"),
            revision: 7,
        };
        record(&mut known, &bad);
        let prefixes: HashMap<_, _> = [("web".to_owned(), p.clone())].into();
        let mut svcs = vec![web()];
        let problems = add_backends(&mut svcs, &prefixes, &known);
        assert_eq!(
            svcs[0].backends,
            vec![
                BackendSpec::dnat("10.0.0.1:8000".parse().unwrap(), 1),
                BackendSpec::dnat("10.0.0.2:8000".parse().unwrap(), 1),
                BackendSpec::dnat("10.0.0.9:8000".parse().unwrap(), 1),
            ]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("/web/c"), "{problems:?}");
        let del = Update::Delete {
            prefix: p.clone(),
            key: "/web/a".into(),
            revision: 8,
        };
        assert_eq!(
            record(&mut known, &del).as_deref(),
            Some("etcd: /web/a deleted")
        );
        assert_eq!(record(&mut known, &del), None, "deleted twice");
        // A key giving an address the service has already is named, not added twice.
        let dup = Update::Put {
            prefix: p,
            key: "/web/d".into(),
            entry: e("10.0.0.9:8000"),
            revision: 9,
        };
        record(&mut known, &dup);
        let mut svcs = vec![web()];
        let problems = add_backends(&mut svcs, &prefixes, &known);
        assert_eq!(svcs[0].backends.len(), 2, "{:?}", svcs[0].backends);
        assert!(
            problems.iter().any(|p| p.contains("already a backend")),
            "{problems:?}"
        );
        // Another service's prefix is not this one's.
        let mut other = vec![Service {
            name: "api".into(),
            ..web()
        }];
        add_backends(&mut other, &prefixes, &known);
        assert_eq!(other[0].backends.len(), 1);
    }

    #[test]
    fn entries_go_to_the_services_of_their_family() {
        let e = |s: &str| parse_value(format!(r#"{{"address":"{s}"}}"#).as_bytes());
        let p = "/web/".to_owned();
        let known: Known = [(
            p.clone(),
            [
                ("/web/a".to_owned(), e("10.0.0.1:8000")),
                ("/web/b".to_owned(), e("[fd00::1]:8000")),
                ("/web/c".to_owned(), e("[fd00::2]:8000")),
            ]
            .into(),
        )]
        .into();
        let v6 = |name: &str| Service {
            name: name.into(),
            listen: "[::]:80".parse().unwrap(),
            backends: Vec::new(),
            ..web()
        };
        let v4 = || Service {
            backends: Vec::new(),
            ..web()
        };
        // A dual-stack service's two halves share the prefix: each takes its family's keys,
        // and nothing is named.
        let both: HashMap<_, _> = [
            ("web".to_owned(), p.clone()),
            ("web.ipv6".to_owned(), p.clone()),
        ]
        .into();
        let mut svcs = vec![v4(), v6("web.ipv6")];
        let problems = add_backends(&mut svcs, &both, &known);
        assert!(problems.is_empty(), "{problems:?}");
        let addrs = |s: &Service| {
            s.backends
                .iter()
                .map(|b| b.addr.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(addrs(&svcs[0]), ["10.0.0.1:8000"]);
        assert_eq!(addrs(&svcs[1]), ["[fd00::1]:8000", "[fd00::2]:8000"]);
        // An IPv6-only service names the IPv4 key (once), an IPv4-only one the IPv6 keys.
        let only: HashMap<_, _> = [("web".to_owned(), p.clone())].into();
        let mut svcs = vec![v6("web")];
        let problems = add_backends(&mut svcs, &only, &known);
        assert_eq!(addrs(&svcs[0]), ["[fd00::1]:8000", "[fd00::2]:8000"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("/web/a: 10.0.0.1:8000 is IPv4, service web listens on IPv6"),
            "{problems:?}"
        );
        let mut svcs = vec![v4()];
        let problems = add_backends(&mut svcs, &only, &known);
        assert_eq!(addrs(&svcs[0]), ["10.0.0.1:8000"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().all(|p| p.contains("is IPv6")),
            "{problems:?}"
        );
    }
}
