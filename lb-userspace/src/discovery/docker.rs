//! One Docker Engine's watcher: a full listing of running containers, then the event stream;
//! each container event is answered with a fresh inspect. A ping every second tells a silent
//! engine from a quiet one (a host cut off leaves the event stream hanging, not ended). When
//! the stream ends or a ping fails, the daemon is told the engine is lost (with the last time
//! it answered) and the watcher reconnects with backoff, then sends a new full snapshot.
//!
//! Each engine has its own watcher task: a slow or dead engine delays no other.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{ContainerInfo, EngineClient, EngineEvent, Event, NetAddrs};
use crate::config::Protocol;

/// How often a connected engine is pinged, and how long it has to answer (`berth publish`
/// follows its engines by the same clock).
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting (the version negotiation) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The IPv4 host ports Docker published, per container port and protocol: `8000/tcp` ->
/// (host address, host port); `0.0.0.0` means every address of the host. IPv6 bindings are
/// left out (berth balances IPv4); of several IPv4 bindings, the one on every address wins.
fn published(
    ports: Option<HashMap<String, Option<Vec<bollard::models::PortBinding>>>>,
) -> BTreeMap<(Protocol, u16), (Ipv4Addr, u16)> {
    let mut out = BTreeMap::new();
    for (key, bindings) in ports.unwrap_or_default() {
        let Some((port, proto)) = key.split_once('/') else {
            continue;
        };
        let proto = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => continue,
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        let mut best: Option<(Ipv4Addr, u16)> = None;
        for b in bindings.unwrap_or_default() {
            let ip = match b.host_ip.as_deref() {
                None | Some("") => Ipv4Addr::UNSPECIFIED,
                Some(ip) => match ip.parse::<Ipv4Addr>() {
                    Ok(ip) => ip,
                    Err(_) => continue,
                },
            };
            let Some(host_port) = b.host_port.and_then(|p| p.parse::<u16>().ok()) else {
                continue;
            };
            if best.is_none_or(|(bip, _)| !bip.is_unspecified() && ip.is_unspecified()) {
                best = Some((ip, host_port));
            }
        }
        if let Some(b) = best {
            out.insert((proto, port), b);
        }
    }
    out
}

fn info_from(
    engine: &str,
    resp: bollard::models::ContainerInspectResponse,
) -> Option<ContainerInfo> {
    let id = resp.id?;
    let state = resp.state.unwrap_or_default();
    let config = resp.config.unwrap_or_default();
    let settings = resp.network_settings.unwrap_or_default();
    let networks = settings
        .networks
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, ep)| {
            let addrs = NetAddrs {
                v4: ep.ip_address.and_then(|a| a.parse().ok()),
                v6: ep.global_ipv6_address.and_then(|a| a.parse().ok()),
            };
            (addrs != NetAddrs::default()).then_some((name, addrs))
        })
        .collect();
    let health = state
        .health
        .and_then(|h| h.status)
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty() && s != "none");
    Some(ContainerInfo {
        engine: engine.to_owned(),
        id,
        name: resp
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        running: state.running.unwrap_or(false) && !state.paused.unwrap_or(false),
        paused: state.paused.unwrap_or(false),
        health,
        networks,
        bridges: BTreeMap::new(),
        started_at: state.started_at.unwrap_or_default(),
        published: published(settings.ports),
    })
}

/// The host interface of a bridge-driver network (`docker0` for the default one, the
/// `com.docker.network.bridge.name` option if set, else `br-<id prefix>`); None for others.
async fn bridge_of(docker: &Docker, network: &str) -> Option<String> {
    let n = docker
        .inspect_network(
            network,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .ok()?;
    if n.driver.as_deref() != Some("bridge") {
        return None;
    }
    if let Some(name) = n
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name"))
    {
        return Some(name.clone());
    }
    if n.name.as_deref() == Some("bridge") {
        return Some("docker0".into());
    }
    n.id.map(|id| format!("br-{}", &id[..id.len().min(12)]))
}

async fn inspect(
    docker: &Docker,
    engine: &str,
    id: &str,
    bridges: &mut HashMap<String, Option<String>>,
) -> Result<Option<ContainerInfo>, bollard::errors::Error> {
    match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(r) => {
            let Some(mut info) = info_from(engine, r) else {
                return Ok(None);
            };
            for net in info.networks.keys() {
                if !bridges.contains_key(net) {
                    bridges.insert(net.clone(), bridge_of(docker, net).await);
                }
                if let Some(Some(br)) = bridges.get(net) {
                    info.bridges.insert(net.clone(), br.clone());
                }
            }
            Ok(Some(info))
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One connection's worth of discovery: snapshot, then events (and pings) until the stream
/// ends or the engine stops answering. `contact` is kept at the last time the engine answered.
async fn session(
    client: &EngineClient,
    tx: &mpsc::Sender<EngineEvent>,
    contact: &mut Instant,
) -> Result<(), String> {
    let engine = client.name();
    let endpoint = &client.engine.endpoint;
    let docker = tokio::time::timeout(CONNECT_TIMEOUT, client.connect()?.negotiate_version())
        .await
        .map_err(|_| format!("{endpoint} did not answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("talking to dockerd on {endpoint}: {e}"))?;
    *contact = Instant::now();
    let here: Vec<Ipv4Addr> = crate::dataplane::host_ipv4_addrs()
        .into_iter()
        .map(|a| Ipv4Addr::from(a.to_ne_bytes()))
        .collect();
    let reach = client.reach(&here).await;
    // Events since just before the listing: nothing between the two is missed.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1))
        .unwrap_or(0);
    let mut filters = HashMap::new();
    filters.insert(
        "type".to_owned(),
        vec!["container".to_owned(), "network".to_owned()],
    );
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(filters),
    }));
    let listed = docker
        .list_containers(Some(ListContainersOptions::default()))
        .await
        .map_err(|e| format!("listing containers: {e}"))?;
    let mut snapshot = Vec::new();
    // Network -> bridge interface, looked up once per session.
    let mut bridges = HashMap::new();
    for c in listed {
        if let Some(id) = c.id
            && let Some(info) = inspect(&docker, engine, &id, &mut bridges)
                .await
                .map_err(|e| format!("inspecting {id}: {e}"))?
        {
            snapshot.push(info);
        }
    }
    *contact = Instant::now();
    info!(
        "docker: connected, {} running containers{}",
        snapshot.len(),
        match (reach.local, reach.address) {
            (true, _) => " (this host)".to_owned(),
            (false, Some(a)) => format!(" (published ports at {a})"),
            (false, None) => " (no IPv4 address for its published ports)".to_owned(),
        }
    );
    let send = |event| async {
        tx.send(EngineEvent {
            engine: engine.to_owned(),
            event,
        })
        .await
        .map_err(|_| "daemon gone".to_owned())
    };
    send(Event::Snapshot(snapshot, reach)).await?;

    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
                    Ok(Ok(_)) => *contact = Instant::now(),
                    Ok(Err(e)) => return Err(format!("ping: {e}")),
                    Err(_) => {
                        return Err(format!("not answering (no ping answer within {PING_TIMEOUT:?})"));
                    }
                }
                continue;
            }
        };
        let Some(ev) = ev else {
            return Err("event stream ended".into());
        };
        let ev = ev.map_err(|e| format!("event stream: {e}"))?;
        *contact = Instant::now();
        let action = ev.action.unwrap_or_default();
        if action.starts_with("exec_") {
            continue;
        }
        let actor = ev.actor.unwrap_or_default();
        let attrs = actor.attributes.unwrap_or_default();
        // Network events name the container in their attributes.
        let id = match ev.typ.map(|t| t.to_string()).as_deref() {
            Some("network") => attrs.get("container").cloned(),
            _ => actor.id,
        };
        let Some(id) = id else { continue };
        let update = match inspect(&docker, engine, &id, &mut bridges)
            .await
            .map_err(|e| format!("inspecting {id}: {e}"))?
        {
            // `docker stop` (and kill) announce the end before the process is gone: stop new
            // flows now, while the container still finishes what it has.
            Some(mut info) if action == "kill" && is_stop_signal(attrs.get("signal")) => {
                info.running = false;
                Event::Upsert(info, ev.time_nano)
            }
            Some(info) => Event::Upsert(info, ev.time_nano),
            None => Event::Remove(id, ev.time_nano),
        };
        send(update).await?;
    }
}

/// Whether a `kill` event's signal ends the container (TERM, INT, KILL; by number or name).
pub(super) fn is_stop_signal(signal: Option<&String>) -> bool {
    matches!(
        signal.map(|s| s.trim_start_matches("SIG")),
        Some("15" | "2" | "9" | "TERM" | "INT" | "KILL")
    )
}

/// Watches one engine until `stop`, reconnecting with backoff (100 ms doubling to 2 s). Each
/// time a session ends the daemon is told the engine is lost, with the last time it answered
/// (the watcher's start, for an engine never reached).
pub async fn run(
    client: EngineClient,
    tx: mpsc::Sender<EngineEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = crate::backoff::Backoff::default();
    let mut last_error = String::new();
    let mut contact = Instant::now();
    let mut told = None;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&client, &tx, &mut contact) => r,
            _ = stop.changed() => return,
        };
        let Err(e) = result else { return };
        if tx.is_closed() {
            return;
        }
        if e != last_error {
            warn!("docker: {e}; reconnecting (and resyncing) with backoff");
            last_error.clone_from(&e);
        }
        // Once per loss (a new contact makes a new one), not per retry.
        if told != Some(contact) {
            told = Some(contact);
            let lost = EngineEvent {
                engine: client.name().to_owned(),
                event: Event::Lost {
                    error: e,
                    last_contact: contact,
                },
            };
            if tx.send(lost).await.is_err() {
                return;
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
    use bollard::models::PortBinding;

    use super::*;

    #[test]
    fn published_ports_are_the_ipv4_bindings_preferring_every_address() {
        let b = |ip: &str, port: &str| PortBinding {
            host_ip: Some(ip.into()),
            host_port: Some(port.into()),
        };
        let ports = HashMap::from([
            (
                "8000/tcp".to_owned(),
                Some(vec![b("::", "32768"), b("0.0.0.0", "32768")]),
            ),
            (
                "53/udp".to_owned(),
                Some(vec![b("10.0.0.5", "5353"), b("0.0.0.0", "5354")]),
            ),
            ("9000/tcp".to_owned(), Some(vec![b("10.0.0.5", "9001")])),
            // Exposed, not published.
            ("7000/tcp".to_owned(), None),
            ("6000/sctp".to_owned(), Some(vec![b("0.0.0.0", "6000")])),
            ("5000/tcp".to_owned(), Some(vec![b("::", "5000")])),
        ]);
        let p = published(Some(ports));
        assert_eq!(
            p,
            BTreeMap::from([
                ((Protocol::Tcp, 8000), (Ipv4Addr::UNSPECIFIED, 32768)),
                ((Protocol::Udp, 53), (Ipv4Addr::UNSPECIFIED, 5354)),
                ((Protocol::Tcp, 9000), (Ipv4Addr::new(10, 0, 0, 5), 9001)),
            ])
        );
        assert!(published(None).is_empty());
    }

    #[test]
    fn a_container_has_its_ipv4_and_global_ipv6_address_per_network() {
        use bollard::models::{ContainerInspectResponse, EndpointSettings, NetworkSettings};
        let ep = |v4: &str, v6: &str| EndpointSettings {
            ip_address: Some(v4.into()),
            global_ipv6_address: Some(v6.into()),
            ..Default::default()
        };
        let resp = ContainerInspectResponse {
            id: Some("abc".into()),
            network_settings: Some(NetworkSettings {
                networks: Some(HashMap::from([
                    ("dual".to_owned(), ep("172.31.0.2", "fdbe::2")),
                    ("bridge".to_owned(), ep("172.17.0.2", "")),
                    // Docker's `--network none`: no address at all.
                    ("none".to_owned(), ep("", "")),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let info = info_from("default", resp).unwrap();
        assert_eq!(
            info.networks,
            BTreeMap::from([
                ("bridge".to_owned(), Ipv4Addr::new(172, 17, 0, 2).into()),
                (
                    "dual".to_owned(),
                    NetAddrs {
                        v4: Some(Ipv4Addr::new(172, 31, 0, 2)),
                        v6: Some("fdbe::2".parse().unwrap()),
                    }
                ),
            ])
        );
        assert_eq!(info.address(None, true), Some("fdbe::2".parse().unwrap()));
        assert_eq!(info.address(Some("bridge"), true), None);
    }
}
