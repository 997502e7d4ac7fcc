//! The Docker source: a full listing of running containers, then the event stream; each
//! container event is answered with a fresh inspect. When the stream ends discovery reconnects
//! with backoff and sends a new full snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{ContainerInfo, Event};

fn info_from(resp: bollard::models::ContainerInspectResponse) -> Option<ContainerInfo> {
    let id = resp.id?;
    let state = resp.state.unwrap_or_default();
    let config = resp.config.unwrap_or_default();
    let networks = resp
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, ep)| Some((name, ep.ip_address?.parse::<Ipv4Addr>().ok()?)))
        .collect();
    let health = state
        .health
        .and_then(|h| h.status)
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty() && s != "none");
    Some(ContainerInfo {
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
    id: &str,
    bridges: &mut HashMap<String, Option<String>>,
) -> Result<Option<ContainerInfo>, bollard::errors::Error> {
    match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(r) => {
            let Some(mut info) = info_from(r) else {
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

/// One connection's worth of discovery: snapshot, then events until the stream ends.
async fn session(socket: &str, tx: &mpsc::Sender<Event>) -> Result<(), String> {
    let docker = Docker::connect_with_unix(socket, 30, bollard::API_DEFAULT_VERSION)
        .map_err(|e| format!("connecting to {socket}: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| format!("talking to dockerd on {socket}: {e}"))?;
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
            && let Some(info) = inspect(&docker, &id, &mut bridges)
                .await
                .map_err(|e| format!("inspecting {id}: {e}"))?
        {
            snapshot.push(info);
        }
    }
    info!("docker: connected, {} running containers", snapshot.len());
    tx.send(Event::Snapshot(snapshot))
        .await
        .map_err(|_| "daemon gone".to_owned())?;

    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| format!("event stream: {e}"))?;
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
        let update = match inspect(&docker, &id, &mut bridges)
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
        tx.send(update)
            .await
            .map_err(|_| "daemon gone".to_owned())?;
    }
    Err("event stream ended".into())
}

/// Whether a `kill` event's signal ends the container (TERM, INT, KILL; by number or name).
pub(super) fn is_stop_signal(signal: Option<&String>) -> bool {
    matches!(
        signal.map(|s| s.trim_start_matches("SIG")),
        Some("15" | "2" | "9" | "TERM" | "INT" | "KILL")
    )
}

/// Runs discovery until `stop`, reconnecting with backoff (100 ms doubling to 2 s).
pub async fn run(socket: String, tx: mpsc::Sender<Event>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = session(&socket, &tx) => r,
            _ = stop.changed() => return,
        };
        let Err(e) = result else { return };
        if tx.is_closed() {
            return;
        }
        if e != last_error {
            warn!("docker: {e}; reconnecting (and resyncing) with backoff");
            last_error = e;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
