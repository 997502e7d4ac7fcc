//! `berth publish`: runs on a Docker host and keeps this host's matching containers in etcd, so
//! that balancers anywhere serve them without watching this host's engine themselves.
//!
//! Each `[[publish.service]]` names containers (image, labels) and a container port; a running
//! container that publishes that port on the host is written as
//! `<prefix><address>:<host port>` = `{"address": "<address>:<host port>", "weight": N,
//! "container": "<name>", "host": "<hostname>"}`, where the address is this host's as the
//! balancers reach it. Every key is written under one lease, refreshed every third of
//! `publish.ttl_secs` while the publisher lives: if it (or its host) dies, the keys vanish within
//! the TTL and the balancers drain those backends. On SIGTERM/SIGINT the lease is revoked, so the
//! keys go at once.
//!
//! The engines are the daemon's: `[[docker.engine]]` entries (Unix socket, TCP, TLS), the
//! `[docker] socket` shorthand, else the docker CLI's environment (`DOCKER_HOST`, ...). Each is
//! followed on its own, as `berth run` follows it (a listing, then the event stream,
//! reconnecting with backoff); a container is taken out at its `kill` event, before it stops
//! serving. An engine of this host (a Unix socket, or TCP to one of this host's addresses)
//! announces its containers at the publisher's address; another host's engine at its own
//! `address` (default: the endpoint's host), so one publisher can stand for several hosts.
//!
//! Each engine is pinged every second, as the daemon's watcher does: a host cut off leaves the
//! event stream hanging, not ended. An engine that stops answering keeps what it published for
//! `[docker] grace_secs` (a dockerd restart costs nothing); past the grace its entries are
//! withdrawn (said once), since the publisher's lease no longer says anything about that host:
//! the balancers would otherwise send flows to a dead host for as long as the publisher lives.
//! Its next listing puts them back. ([`Ledger`] holds that policy, pure; the grace logic is the
//! daemon's `Engines`.) While etcd cannot be reached, the publisher retries with backoff and
//! writes everything again under a fresh lease.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, ListContainersOptions},
};
use etcd_client::{Client, PutOptions};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    config::{PublishConfig, PublishService},
    daemon::engines::Engines,
    discovery::{
        CONNECT_TIMEOUT, ContainerInfo, EngineClient, PING_INTERVAL, PING_TIMEOUT, Reach,
        etcd::Connect,
    },
};

/// Keys and values in etcd.
type Entries = BTreeMap<String, String>;

/// What each engine's containers should have in etcd (engine name -> key -> value); an engine
/// is absent until its first listing, and has no entries while it is lost past its grace.
type Desired = BTreeMap<String, Entries>;

/// What a follower tells the publisher about its engine.
#[derive(Debug)]
enum Heard {
    /// A full listing: the entries its containers should have now.
    Listed {
        engine: String,
        reach: Reach,
        entries: Entries,
    },
    /// It stopped answering (once per loss); it last did at `last_contact`.
    Lost {
        engine: String,
        error: String,
        last_contact: Instant,
    },
}

/// Each engine's last listing and whether it still answers: what the lease should carry. An
/// engine unreachable for longer than the grace (the daemon's `Engines` policy) has its
/// entries withdrawn until it lists again. Pure: time is handed in.
#[derive(Debug)]
pub struct Ledger {
    engines: Engines,
    listed: Desired,
}

impl Ledger {
    /// The engines (name, endpoint) as at start: none has answered yet.
    pub fn new(
        engines: impl IntoIterator<Item = (String, String)>,
        grace: Duration,
        now: Instant,
    ) -> Self {
        Self {
            engines: Engines::new(engines, grace, now),
            listed: Desired::new(),
        }
    }

    pub fn grace(&self) -> Duration {
        self.engines.grace()
    }

    /// A full listing of `engine`. Returns whether it had been lost past its grace (its
    /// entries come back).
    pub fn listed(&mut self, engine: &str, reach: Reach, entries: Entries) -> bool {
        self.listed.insert(engine.to_owned(), entries);
        self.engines.connected(engine, reach)
    }

    /// `engine` stopped answering; it last did at `last_contact`. What it published stays
    /// for the grace.
    pub fn lost(&mut self, engine: &str, error: String, last_contact: Instant) {
        self.engines.disconnected(engine, error, last_contact);
    }

    /// The engines whose grace ran out by `now`, each once per loss, with why it was lost
    /// and how many entries that withdraws (engines never listed are left out: they had
    /// nothing published).
    pub fn expire(&mut self, now: Instant) -> Vec<(String, String, usize)> {
        self.engines
            .expire(now)
            .into_iter()
            .filter_map(|name| {
                let n = self.listed.get(&name)?.len();
                let error = self
                    .engines
                    .get(&name)
                    .and_then(|e| e.error.clone())
                    .unwrap_or_default();
                Some((name, error, n))
            })
            .collect()
    }

    /// What etcd should hold, per engine: each listed engine's entries, none for a lost one.
    pub fn desired(&self) -> Desired {
        self.listed
            .iter()
            .map(|(name, entries)| {
                let lost = self.engines.get(name).is_some_and(|e| e.lost);
                let entries = if lost {
                    Entries::new()
                } else {
                    entries.clone()
                };
                (name.clone(), entries)
            })
            .collect()
    }
}

/// Keeps `tx` at what the ledger says etcd should hold: the followers' listings and losses
/// as they come, and every second the engines whose grace ran out. Ends when every follower
/// is gone (dropping `tx` then tells the lease).
async fn judge(mut ledger: Ledger, mut heard: mpsc::Receiver<Heard>, tx: watch::Sender<Desired>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            h = heard.recv() => match h {
                None => return,
                Some(Heard::Listed { engine, reach, entries }) => {
                    let n = entries.len();
                    if ledger.listed(&engine, reach, entries) {
                        info!("docker {engine}: answers again: its {n} entries are published again");
                    }
                }
                Some(Heard::Lost { engine, error, last_contact }) => {
                    ledger.lost(&engine, error, last_contact);
                    info!(
                        "docker {engine}: not answering; what it published stays for the grace \
                         ({} s)",
                        ledger.grace().as_secs()
                    );
                }
            },
            _ = tick.tick() => {
                for (engine, error, n) in ledger.expire(Instant::now()) {
                    warn!(
                        "docker {engine}: unreachable for more than {} s ({error}): its {n} \
                         entries withdrawn until it answers again",
                        ledger.grace().as_secs()
                    );
                }
            }
        }
        let want = ledger.desired();
        tx.send_if_modified(|d| {
            let changed = *d != want;
            if changed {
                *d = want;
            }
            changed
        });
    }
}

/// A running container as the publisher sees it: identity, labels, and its published ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Reported unhealthy by its own HEALTHCHECK.
    pub unhealthy: bool,
    /// (container port, host address, host port), TCP only; an unspecified address
    /// (`0.0.0.0`, `::`) stands for every address of the host of that family.
    pub ports: Vec<(u16, IpAddr, u16)>,
}

impl Published {
    fn matches(&self, s: &PublishService) -> bool {
        let probe = ContainerInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            image: self.image.clone(),
            labels: self.labels.clone(),
            running: true,
            paused: false,
            health: None,
            networks: BTreeMap::new(),
            bridges: BTreeMap::new(),
            started_at: String::new(),
            engine: String::new(),
            published: BTreeMap::new(),
        };
        s.image.as_deref().is_none_or(|i| probe.runs_image(i))
            && s.labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// The running containers with their published TCP ports, from one listing of the engine.
/// (Kept apart so a richer source of published ports can replace it.)
pub async fn published_ports(docker: &Docker) -> Result<Vec<Published>, bollard::errors::Error> {
    let listed = docker
        .list_containers(Some(ListContainersOptions::default()))
        .await?;
    Ok(listed
        .into_iter()
        .filter_map(|c| {
            let running = c.state.as_ref().is_some_and(|s| s.to_string() == "running");
            if !running {
                return None;
            }
            let ports = c
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.typ.as_ref().is_none_or(|t| t.to_string() == "tcp"))
                .filter_map(|p| {
                    // IPv6 bindings ("::") are listed beside the IPv4 ones (0.0.0.0).
                    let host_ip = match p.ip.as_deref().map(str::parse::<IpAddr>) {
                        Some(Err(_)) => return None,
                        Some(Ok(ip)) => ip,
                        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    };
                    Some((p.private_port, host_ip, p.public_port?))
                })
                .collect();
            Some(Published {
                id: c.id?,
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                image: c.image.unwrap_or_default(),
                labels: c.labels.unwrap_or_default().into_iter().collect(),
                unhealthy: c.status.is_some_and(|s| s.contains("(unhealthy)")),
                ports,
            })
        })
        .collect())
}

/// The keys and values this host should have in etcd: for each service, each matching
/// container serving (not unhealthy, not being stopped) that publishes the service's port.
/// A port published on every address is announced at `address`, and its IPv6 binding (`::`)
/// at `address6` when there is one; a port bound to one address is announced at that
/// address; one bound to loopback only is not announced (balancers cannot reach it).
pub fn entries(
    services: &[PublishService],
    containers: &[Published],
    stopping: &HashSet<String>,
    address: Ipv4Addr,
    address6: Option<Ipv6Addr>,
    hostname: &str,
    engine: &str,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in services {
        for c in containers {
            if c.unhealthy || stopping.contains(&c.id) || !c.matches(s) {
                continue;
            }
            let mut seen = HashSet::new();
            for &(private, host_ip, public) in &c.ports {
                if private != s.port {
                    continue;
                }
                let ip = match host_ip {
                    ip if ip.is_loopback() => continue,
                    IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(address),
                    IpAddr::V6(ip) if ip.is_unspecified() => match address6 {
                        Some(a) => IpAddr::V6(a),
                        None => continue,
                    },
                    ip => ip,
                };
                let addr = SocketAddr::new(ip, public);
                if !seen.insert(addr) {
                    continue;
                }
                let value = serde_json::json!({
                    "address": addr.to_string(),
                    "weight": s.weight,
                    "container": c.name,
                    "host": hostname,
                    "engine": engine,
                });
                out.insert(format!("{}{addr}", s.prefix), value.to_string());
            }
        }
    }
    out
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Where an engine's containers are announced: this host's engines at `host_address`, another
/// host's at its own address. Err: why none is known.
fn announce_at(
    reach: crate::discovery::Reach,
    host_address: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, String> {
    match (reach.local, reach.address, host_address) {
        (true, _, Some(a)) => Ok(a),
        (true, _, None) => Err("this host's engine, but this host's address is unknown \
             (no default route): give publish.address or --address"
            .into()),
        (false, Some(a), _) => Ok(a),
        (false, None, _) => {
            Err("its endpoint's host has no IPv4 address: give the engine's `address`".into())
        }
    }
}

/// Follows one engine: after each listing (at connect, after each container event) tells the
/// judge the entries its containers should have; pings it every second meanwhile, and tells
/// the judge once per loss when it stops answering (with the last time it did).
async fn follow_docker(
    client: EngineClient,
    services: Vec<PublishService>,
    host_address: Option<Ipv4Addr>,
    host_address6: Option<Ipv6Addr>,
    tx: mpsc::Sender<Heard>,
) {
    let host = hostname();
    let engine = client.name().to_owned();
    let endpoint = client.engine.endpoint.to_string();
    let mut backoff = crate::backoff::Backoff::default();
    let mut last_error = String::new();
    let mut first = true;
    let mut contact = Instant::now();
    let mut told = None;
    loop {
        let result: Result<(), String> = async {
            let docker =
                tokio::time::timeout(CONNECT_TIMEOUT, client.connect()?.negotiate_version())
                    .await
                    .map_err(|_| format!("{endpoint} did not answer within {CONNECT_TIMEOUT:?}"))?
                    .map_err(|e| format!("talking to dockerd on {endpoint}: {e}"))?;
            contact = Instant::now();
            let here: Vec<Ipv4Addr> = crate::dataplane::host_ipv4_addrs()
                .into_iter()
                .map(|a| Ipv4Addr::from(a.to_ne_bytes()))
                .collect();
            let reach = client.reach(&here).await;
            let address = announce_at(reach, host_address)?;
            // IPv6 bindings are announced for this host's engines only (another host's
            // published ports are reached at its IPv4 address).
            let address6 = host_address6.filter(|_| reach.local);
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(1))
                .unwrap_or(0);
            let mut events = docker.events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(HashMap::from([(
                    "type".to_owned(),
                    vec!["container".to_owned()],
                )])),
            }));
            if first || !last_error.is_empty() {
                info!(
                    "docker {engine}: following {endpoint}; its containers are announced at \
                     {address}{}",
                    address6.map(|a| format!(" and {a}")).unwrap_or_default()
                );
                first = false;
            }
            let mut ping = tokio::time::interval(PING_INTERVAL);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Containers told to stop: out at once, until the listing no longer shows them.
            let mut stopping = HashSet::new();
            loop {
                let listed = tokio::time::timeout(CONNECT_TIMEOUT, published_ports(&docker))
                    .await
                    .map_err(|_| format!("no listing within {CONNECT_TIMEOUT:?}"))?
                    .map_err(|e| format!("listing containers: {e}"))?;
                contact = Instant::now();
                stopping.retain(|id| listed.iter().any(|c| &c.id == id));
                let entries = entries(
                    &services, &listed, &stopping, address, address6, &host, &engine,
                );
                tx.send(Heard::Listed {
                    engine: engine.clone(),
                    reach,
                    entries,
                })
                .await
                .map_err(|_| "publisher gone".to_owned())?;
                backoff.reset();
                last_error.clear();
                // The next container event (exec_* aside) calls for a new listing; a ping
                // unanswered ends the session.
                loop {
                    let ev = tokio::select! {
                        ev = events.next() => ev,
                        _ = ping.tick() => {
                            match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
                                Ok(Ok(_)) => contact = Instant::now(),
                                Ok(Err(e)) => return Err(format!("ping: {e}")),
                                Err(_) => {
                                    return Err(format!(
                                        "not answering (no ping answer within {PING_TIMEOUT:?})"
                                    ));
                                }
                            }
                            continue;
                        }
                    };
                    let ev = ev
                        .ok_or_else(|| "event stream ended".to_owned())?
                        .map_err(|e| format!("event stream: {e}"))?;
                    contact = Instant::now();
                    let action = ev.action.unwrap_or_default();
                    if action.starts_with("exec_") {
                        continue;
                    }
                    let actor = ev.actor.unwrap_or_default();
                    if action == "kill"
                        && crate::discovery::is_stop_signal(
                            actor.attributes.unwrap_or_default().get("signal"),
                        )
                        && let Some(id) = actor.id
                    {
                        stopping.insert(id);
                    }
                    break;
                }
            }
        }
        .await;
        let Err(e) = result else { return };
        if tx.is_closed() {
            return;
        }
        if e != last_error {
            warn!("docker {engine}: {e}; reconnecting with backoff");
            last_error.clone_from(&e);
        }
        // Once per loss (a new contact makes a new one), not per retry.
        if told != Some(contact) {
            told = Some(contact);
            let lost = Heard::Lost {
                engine: engine.clone(),
                error: e,
                last_contact: contact,
            };
            if tx.send(lost).await.is_err() {
                return;
            }
        }
        backoff.sleep().await;
    }
}

/// Why a lease's life ended.
enum LeaseEnd {
    Stop,
    Failed(String),
}

/// One lease's life: grant it, write what Docker says under it, refresh it, until etcd fails
/// or a stop is asked for (then it is revoked: the keys go at once).
async fn lease_life(
    client: &mut Client,
    ttl: i64,
    desired: &mut watch::Receiver<Desired>,
    stop: &mut watch::Receiver<bool>,
) -> LeaseEnd {
    let fail = |what: &str, e: etcd_client::Error| LeaseEnd::Failed(format!("{what}: {e}"));
    let lease = match client.lease_grant(ttl, None).await {
        Ok(l) => l.id(),
        Err(e) => return fail("granting a lease", e),
    };
    let (mut keeper, mut acks) = match client.lease_keep_alive(lease).await {
        Ok(k) => k,
        Err(e) => return fail("keeping the lease alive", e),
    };
    let mut written: BTreeMap<String, String> = BTreeMap::new();
    let mut refresh = tokio::time::interval(Duration::from_secs(ttl as u64) / 3);
    let mut first = true;
    loop {
        // Nothing is touched before the first engine has been listed.
        let want = {
            let d = desired.borrow_and_update();
            (!d.is_empty()).then(|| {
                d.values()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        if let Some(want) = want {
            for (k, v) in &want {
                if written.get(k) != Some(v) {
                    if let Err(e) = client
                        .put(
                            k.as_str(),
                            v.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await
                    {
                        return fail(&format!("writing {k}"), e);
                    }
                    info!("published {k} = {v}");
                }
            }
            let gone: Vec<String> = written
                .keys()
                .filter(|k| !want.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                if let Err(e) = client.delete(k.as_str(), None).await {
                    return fail(&format!("deleting {k}"), e);
                }
                info!("withdrawn {k}");
            }
            if first {
                info!(
                    "publishing {} entries under lease {lease:x} (ttl {ttl} s)",
                    want.len()
                );
                first = false;
            }
            written = want;
        }
        tokio::select! {
            _ = refresh.tick() => {
                if let Err(e) = keeper.keep_alive().await {
                    return fail("refreshing the lease", e);
                }
                match acks.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(_) => return LeaseEnd::Failed(format!("lease {lease:x} expired")),
                    Err(e) => return fail("refreshing the lease", e),
                }
            }
            r = desired.changed() => {
                if r.is_err() {
                    return LeaseEnd::Stop;
                }
            }
            _ = stop.changed() => {
                match client.lease_revoke(lease).await {
                    Ok(_) => info!("lease revoked: {} entries withdrawn", written.len()),
                    Err(e) => warn!("revoking the lease (its entries go within {ttl} s): {e}"),
                }
                return LeaseEnd::Stop;
            }
        }
    }
}

/// Runs the publisher until `stop`: one follower per engine, one lease for all their entries.
/// `host_address` is where this host's engines' containers are announced (None: unknown; an
/// engine of this host is then named in a warning and publishes nothing). An engine
/// unreachable for longer than `grace` has its entries withdrawn until it answers again.
pub async fn run(
    publish: PublishConfig,
    engines: Vec<EngineClient>,
    connect: Connect,
    host_address: Option<Ipv4Addr>,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let ttl = publish.ttl_secs as i64;
    info!(
        "berth publish: {} services from {} engines ({}), to etcd at {}",
        publish.services.len(),
        engines.len(),
        engines
            .iter()
            .map(|e| format!("{} {}", e.name(), e.engine.endpoint))
            .collect::<Vec<_>>()
            .join(", "),
        connect.endpoints.join(", ")
    );
    let (tx, mut desired) = watch::channel(Desired::new());
    let (heard_tx, heard) = mpsc::channel(64);
    let ledger = Ledger::new(
        engines
            .iter()
            .map(|e| (e.name().to_owned(), e.engine.endpoint.to_string())),
        grace,
        Instant::now(),
    );
    for engine in engines {
        tokio::spawn(follow_docker(
            engine,
            publish.services.clone(),
            host_address,
            publish.address6.as_deref().and_then(|a| a.parse().ok()),
            heard_tx.clone(),
        ));
    }
    // The followers hold the senders: the judge ends (and `changed()` fails) when all are gone.
    drop(heard_tx);
    tokio::spawn(judge(ledger, heard, tx));
    let mut backoff = crate::backoff::Backoff::default();
    let mut down = false;
    loop {
        let end = match connect.client().await {
            Ok(mut client) => {
                let t = tokio::time::Instant::now();
                let end = lease_life(&mut client, ttl, &mut desired, &mut stop).await;
                if t.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
                end
            }
            Err(e) => LeaseEnd::Failed(format!("connecting: {e}")),
        };
        match end {
            LeaseEnd::Stop => return,
            LeaseEnd::Failed(e) if !down => {
                warn!(
                    "etcd: {e}; retrying with backoff (entries are written again under a new lease)"
                );
                down = true;
            }
            LeaseEnd::Failed(_) => {}
        }
        if !backoff.sleep_or_stop(&mut stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(prefix: &str, image: &str, port: u16) -> PublishService {
        PublishService {
            prefix: prefix.into(),
            image: Some(image.into()),
            labels: BTreeMap::new(),
            port,
            weight: 2,
        }
    }

    fn c(id: &str, image: &str, ports: &[(u16, Option<[u8; 4]>, u16)]) -> Published {
        Published {
            id: id.into(),
            name: format!("n-{id}"),
            image: image.into(),
            labels: BTreeMap::new(),
            unhealthy: false,
            ports: ports
                .iter()
                .map(|&(a, ip, b)| (a, IpAddr::from(ip.unwrap_or([0; 4])), b))
                .collect(),
        }
    }

    #[test]
    fn this_hosts_engines_announce_at_its_address_others_at_theirs() {
        use crate::discovery::Reach;
        let here = Ipv4Addr::new(192, 0, 2, 10);
        let me = Some(here);
        let b = Ipv4Addr::new(10, 42, 2, 2);
        let local = |address| Reach {
            address,
            local: true,
        };
        let remote = |address| Reach {
            address,
            local: false,
        };
        // A Unix socket, or TCP to this host (DOCKER_HOST=tcp://127.0.0.1:2375): this host.
        assert_eq!(announce_at(local(None), me), Ok(here));
        assert_eq!(announce_at(local(Some(Ipv4Addr::LOCALHOST)), me), Ok(here));
        assert!(
            announce_at(local(None), None)
                .unwrap_err()
                .contains("publish.address")
        );
        // Another host's engine: its own address, whatever this host's is.
        assert_eq!(announce_at(remote(Some(b)), me), Ok(b));
        assert_eq!(announce_at(remote(Some(b)), None), Ok(b));
        assert!(
            announce_at(remote(None), me)
                .unwrap_err()
                .contains("address")
        );
    }

    #[test]
    fn an_engine_lost_past_its_grace_has_its_entries_withdrawn_until_it_lists_again() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let remote = |a: [u8; 4]| crate::discovery::Reach {
            address: Some(Ipv4Addr::from(a)),
            local: false,
        };
        let one = |k: &str| Entries::from([(k.to_owned(), "{}".to_owned())]);
        let mut l = Ledger::new(
            [
                ("b".to_owned(), "tcp://10.42.5.2:2375".to_owned()),
                ("c".to_owned(), "tcp://10.42.6.2:2376".to_owned()),
                ("d".to_owned(), "tcp://10.42.7.2:2375".to_owned()),
            ],
            Duration::from_secs(5),
            t0,
        );
        assert!(l.desired().is_empty(), "nothing before a listing");
        assert!(!l.listed("b", remote([10, 42, 5, 2]), one("/w/b:1")));
        assert!(!l.listed("c", remote([10, 42, 6, 2]), one("/w/c:1")));
        let both = Desired::from([("b".into(), one("/w/b:1")), ("c".into(), one("/w/c:1"))]);
        assert_eq!(l.desired(), both);
        // c last answered at 10 s: what it published stays for the grace...
        l.lost("c", "not answering".into(), s(10));
        assert!(l.expire(s(15)).is_empty());
        assert_eq!(l.desired(), both, "kept within the grace");
        // ...then it is withdrawn, said once; b keeps its entries. d never answered: lost too,
        // but it had nothing to withdraw.
        assert_eq!(l.expire(s(16)), [("c".into(), "not answering".into(), 1)]);
        assert!(l.expire(s(17)).is_empty());
        assert_eq!(
            l.desired(),
            Desired::from([("b".into(), one("/w/b:1")), ("c".into(), Entries::new())]),
            "c present but empty, so its entries are deleted"
        );
        // Retries that fail do not move the time it was last reached.
        l.lost("c", "connection refused".into(), s(16));
        // Back: its listing (whatever it holds now) is published again.
        assert!(l.listed("c", remote([10, 42, 6, 2]), one("/w/c:2")));
        assert_eq!(
            l.desired(),
            Desired::from([("b".into(), one("/w/b:1")), ("c".into(), one("/w/c:2"))])
        );
        // A loss shorter than the grace changes nothing.
        l.lost("b", "event stream ended".into(), s(30));
        assert!(!l.listed("b", remote([10, 42, 5, 2]), one("/w/b:1")));
        assert!(l.expire(s(40)).is_empty());
        assert_eq!(l.desired()["b"], one("/w/b:1"));
    }

    #[test]
    fn published_ports_of_matching_containers_become_entries() {
        let host = Ipv4Addr::new(192, 0, 2, 10);
        let mut sick = c("d", "web", &[(8000, None, 32770)]);
        sick.unhealthy = true;
        let containers = vec![
            c("a", "web:1", &[(8000, None, 32768), (9000, None, 32769)]),
            c("b", "web", &[(8000, Some([198, 51, 100, 7]), 8080)]),
            c("c", "db", &[(8000, None, 5432)]),
            sick,
            c("e", "web", &[]),
            c("f", "web", &[(8000, None, 32771)]),
        ];
        let stopping = HashSet::from(["f".to_owned()]);
        let e = entries(
            &[svc("/web/", "web", 8000)],
            &containers,
            &stopping,
            host,
            None,
            "h1",
            "default",
        );
        assert_eq!(
            e.keys().collect::<Vec<_>>(),
            ["/web/192.0.2.10:32768", "/web/198.51.100.7:8080"],
            "the service's port only; a port bound to one address is announced there; \
             unhealthy, stopping, unpublished and other images' containers left out"
        );
        let v: serde_json::Value = serde_json::from_str(&e["/web/192.0.2.10:32768"]).unwrap();
        assert_eq!(v["address"], "192.0.2.10:32768");
        assert_eq!(v["weight"], 2);
        assert_eq!(v["container"], "n-a");
        assert_eq!(v["engine"], "default");
        // What a balancer reads back.
        assert_eq!(
            crate::discovery::etcd::parse_value(e["/web/192.0.2.10:32768"].as_bytes()),
            Ok(crate::discovery::etcd::Entry {
                addr: "192.0.2.10:32768".parse().unwrap(),
                weight: 2
            })
        );
    }

    #[test]
    fn ipv6_bindings_are_announced_at_the_hosts_ipv6_address() {
        let host = Ipv4Addr::new(192, 0, 2, 10);
        let host6: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut a = c("a", "web", &[(8000, None, 32768)]);
        // Docker lists a port published everywhere twice: 0.0.0.0 and ::.
        a.ports.push((8000, v6("::"), 32768));
        let mut b = c("b", "web", &[]);
        b.ports.push((8000, v6("2001:db8::7"), 8080));
        let mut l = c("l", "web", &[(8000, Some([127, 0, 0, 1]), 9000)]);
        l.ports.push((8000, v6("::1"), 9001));
        let containers = vec![a, b, l];
        let svcs = [svc("/web/", "web", 8000)];
        let none = HashSet::new();
        let e = entries(
            &svcs,
            &containers,
            &none,
            host,
            Some(host6),
            "h1",
            "default",
        );
        assert_eq!(
            e.keys().collect::<Vec<_>>(),
            [
                "/web/192.0.2.10:32768",
                "/web/[2001:db8::10]:32768",
                "/web/[2001:db8::7]:8080"
            ],
            "both families of a port published everywhere, a port bound to one IPv6 address \
             there, loopback bindings never"
        );
        assert_eq!(
            crate::discovery::etcd::parse_value(e["/web/[2001:db8::10]:32768"].as_bytes()),
            Ok(crate::discovery::etcd::Entry {
                addr: "[2001:db8::10]:32768".parse().unwrap(),
                weight: 2
            })
        );
        // Without an IPv6 address for the host, its `::` bindings are not announced.
        let e = entries(&svcs, &containers, &none, host, None, "h1", "default");
        assert_eq!(
            e.keys().collect::<Vec<_>>(),
            ["/web/192.0.2.10:32768", "/web/[2001:db8::7]:8080"]
        );
    }
}
