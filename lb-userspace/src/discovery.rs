//! Docker discovery: a full listing of running containers, then the event stream; each container
//! event is answered with a fresh inspect, so the order events arrive in does not matter. When
//! the stream ends (dockerd restarted, socket gone) discovery reconnects with backoff and sends a
//! new full snapshot, which replaces everything known before (containers that vanished meanwhile
//! are dropped).
//!
//! What the containers mean for services (selectors, labels) is decided in [`services`], a pure
//! function with unit tests.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::{DockerSelector, Protocol, Service};

/// What berth needs to know about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// The image as given to `docker run` (e.g. `local/nodeapp` or `local/nodeapp:1.2`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Running and not paused.
    pub running: bool,
    /// Docker's own HEALTHCHECK verdict, if the image has one: "starting", "healthy", "unhealthy".
    pub health: Option<String>,
    /// Network name -> IPv4 address, for the networks the container is attached to.
    pub networks: BTreeMap<String, Ipv4Addr>,
    /// Network name -> the host bridge interface behind it (bridge-driver networks only).
    pub bridges: BTreeMap<String, String>,
}

impl ContainerInfo {
    /// Whether the container may take traffic: running and not reported unhealthy by its own
    /// HEALTHCHECK (one still "starting" is served: it joins as soon as it runs).
    pub fn serving(&self) -> bool {
        self.running && self.health.as_deref() != Some("unhealthy")
    }

    /// The address on `network`, or on the first network (by name) when none is named.
    pub fn address(&self, network: Option<&str>) -> Option<Ipv4Addr> {
        match network {
            Some(n) => self.networks.get(n).copied(),
            None => self.networks.values().next().copied(),
        }
    }

    /// Whether the container runs `image` (`name` matches `name`, `name:tag`; `name:tag` matches
    /// only itself).
    pub fn runs_image(&self, image: &str) -> bool {
        self.image == image
            || (!image.contains(':')
                && self
                    .image
                    .strip_prefix(image)
                    .is_some_and(|t| t.starts_with(':')))
            || (!image.contains(':')
                && !self.image.contains(':')
                && self.image == format!("{image}:latest"))
    }
}

/// What discovery tells the daemon.
#[derive(Debug, Clone)]
pub enum Event {
    /// Everything running now; replaces all earlier knowledge.
    Snapshot(Vec<ContainerInfo>),
    /// A container changed; with the event's Docker timestamp (ns since the epoch).
    Upsert(ContainerInfo, Option<i64>),
    Remove(String, Option<i64>),
}

/// The TCP ports some process on this host listens on and the UDP ports bound, from
/// /proc/net/{tcp,tcp6,udp,udp6} (of the namespace berth runs in).
pub fn host_ports() -> std::collections::HashSet<(Protocol, u16)> {
    let mut out = std::collections::HashSet::new();
    for (file, proto, state) in [
        ("/proc/net/tcp", Protocol::Tcp, "0A"),
        ("/proc/net/tcp6", Protocol::Tcp, "0A"),
        ("/proc/net/udp", Protocol::Udp, "07"),
        ("/proc/net/udp6", Protocol::Udp, "07"),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 3
                && f[3] == state
                && let Some(port) = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                out.insert((proto, port));
            }
        }
    }
    out
}

/// Labels of the label-driven services.
pub const LABEL_PORT: &str = "berth.port";
pub const LABEL_TARGET_PORT: &str = "berth.target-port";
pub const LABEL_PROTOCOL: &str = "berth.protocol";
pub const LABEL_WEIGHT: &str = "berth.weight";
pub const LABEL_SERVICE: &str = "berth.service";
pub const LABEL_NETWORK: &str = "berth.network";
/// `tcp` or `http`: berth checks the container itself (see [`crate::health`]).
pub const LABEL_HEALTH: &str = "berth.health";
pub const LABEL_HEALTH_PATH: &str = "berth.health.path";
pub const LABEL_HEALTH_EXPECT_STATUS: &str = "berth.health.expect-status";
pub const LABEL_HEALTH_EXPECT_STRING: &str = "berth.health.expect-string";
pub const LABEL_HEALTH_INTERVAL: &str = "berth.health.interval-ms";
pub const LABEL_HEALTH_RISE: &str = "berth.health.rise";
pub const LABEL_HEALTH_FALL: &str = "berth.health.fall";

/// A container's label-driven service request, or why its labels were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelService {
    pub service: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    pub weight: u32,
    pub network: Option<String>,
    pub health: Option<crate::health::HealthConfig>,
}

/// Reads the `berth.*` labels. `Ok(None)`: the container does not ask for a service.
pub fn parse_labels(labels: &BTreeMap<String, String>) -> Result<Option<LabelService>, String> {
    let Some(port) = labels.get(LABEL_PORT) else {
        return Ok(None);
    };
    let num = |key: &str, v: &str| -> Result<u16, String> {
        match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("label {key}={v:?} is not a port (1-65535)")),
        }
    };
    let port = num(LABEL_PORT, port)?;
    let target_port = match labels.get(LABEL_TARGET_PORT) {
        Some(v) => num(LABEL_TARGET_PORT, v)?,
        None => port,
    };
    let protocol = match labels.get(LABEL_PROTOCOL).map(|s| s.trim()) {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(v) => return Err(format!("label {LABEL_PROTOCOL}={v:?} is not tcp or udp")),
    };
    let weight = match labels.get(LABEL_WEIGHT) {
        None => 1,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(w) if w <= crate::config::MAX_WEIGHT => w,
            _ => {
                return Err(format!(
                    "label {LABEL_WEIGHT}={v:?} is not a weight (0-{})",
                    crate::config::MAX_WEIGHT
                ));
            }
        },
    };
    let service = match labels.get(LABEL_SERVICE) {
        Some(s)
            if !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            s.clone()
        }
        Some(s) => {
            return Err(format!(
                "label {LABEL_SERVICE}={s:?} must be 1-64 characters of [A-Za-z0-9-_.]"
            ));
        }
        None => format!("{protocol}-{port}"),
    };
    Ok(Some(LabelService {
        service,
        port,
        target_port,
        protocol,
        weight,
        network: labels.get(LABEL_NETWORK).cloned(),
        health: parse_health_labels(labels)?,
    }))
}

/// The `berth.health*` labels as a health check (None without `berth.health`).
fn parse_health_labels(
    labels: &BTreeMap<String, String>,
) -> Result<Option<crate::health::HealthConfig>, String> {
    use crate::health::{CheckKind, HealthConfig};
    let kind = match labels.get(LABEL_HEALTH).map(|s| s.trim()) {
        None => return Ok(None),
        Some("tcp") => CheckKind::Tcp,
        Some("http") => CheckKind::Http,
        Some(v) => return Err(format!("label {LABEL_HEALTH}={v:?} is not tcp or http")),
    };
    fn num<T: std::str::FromStr>(
        labels: &BTreeMap<String, String>,
        key: &str,
    ) -> Result<Option<T>, String> {
        labels
            .get(key)
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|_| format!("label {key}={v:?} is not a number"))
            })
            .transpose()
    }
    let interval_ms = num(labels, LABEL_HEALTH_INTERVAL)?.unwrap_or(2000);
    let h = HealthConfig {
        kind,
        path: labels
            .get(LABEL_HEALTH_PATH)
            .cloned()
            .unwrap_or_else(|| "/".into()),
        expect_status: num(labels, LABEL_HEALTH_EXPECT_STATUS)?,
        expect_string: labels.get(LABEL_HEALTH_EXPECT_STRING).cloned(),
        interval_ms,
        timeout_ms: interval_ms.min(1000),
        rise: num(labels, LABEL_HEALTH_RISE)?.unwrap_or(2),
        fall: num(labels, LABEL_HEALTH_FALL)?.unwrap_or(3),
        start_healthy: false,
    };
    h.validate("labels").map_err(|e| {
        let label = match e.field.as_str() {
            "labels.path" => LABEL_HEALTH_PATH,
            "labels.expect_status" => LABEL_HEALTH_EXPECT_STATUS,
            "labels.interval_ms" | "labels.timeout_ms" => LABEL_HEALTH_INTERVAL,
            "labels.rise" => LABEL_HEALTH_RISE,
            "labels.fall" => LABEL_HEALTH_FALL,
            _ => LABEL_HEALTH,
        };
        format!("label {label}: {}", e.message)
    })?;
    Ok(Some(h))
}

/// Services for the containers: the configured `services` get the backends their Docker
/// selector matches added to their static ones, and (when `label_services` is on) containers
/// carrying `berth.port` form services of their own on `0.0.0.0:<port>`. Returns the services and
/// one message per container whose labels were refused or which has no usable address.
pub fn services(
    configured: &[Service],
    selectors: &HashMap<String, DockerSelector>,
    containers: &BTreeMap<String, ContainerInfo>,
    label_services: bool,
    host_ports: &std::collections::HashSet<(Protocol, u16)>,
) -> (Vec<Service>, Vec<String>) {
    let mut problems = Vec::new();
    let mut out: Vec<Service> = configured.to_vec();
    for svc in &mut out {
        let Some(sel) = selectors.get(&svc.name) else {
            continue;
        };
        for c in containers.values().filter(|c| c.serving()) {
            let image_ok = sel.image.as_deref().is_none_or(|i| c.runs_image(i));
            let labels_ok = sel.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v));
            if !image_ok || !labels_ok {
                continue;
            }
            match c.address(sel.network.as_deref()) {
                Some(ip) => svc.backends.push((SocketAddrV4::new(ip, sel.port), 1)),
                None => problems.push(format!(
                    "container {}: no IPv4 address on {}",
                    c.name,
                    sel.network.as_deref().unwrap_or("any network")
                )),
            }
        }
        svc.backends.sort();
        svc.backends.dedup_by_key(|(a, _)| *a);
    }
    if label_services {
        let mut by_name: BTreeMap<String, Service> = BTreeMap::new();
        for c in containers.values().filter(|c| c.serving()) {
            let ls = match parse_labels(&c.labels) {
                Ok(Some(ls)) => ls,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(format!("container {}: {e}; not served", c.name));
                    continue;
                }
            };
            let Some(ip) = c.address(ls.network.as_deref()) else {
                problems.push(format!(
                    "container {}: no IPv4 address to serve from",
                    c.name
                ));
                continue;
            };
            let listen = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ls.port);
            // A label must not capture traffic for a port the host itself serves (e.g. 22).
            if host_ports.contains(&(ls.protocol, ls.port)) {
                problems.push(format!(
                    "container {}: {} port {} is in use by a process on this host; labels cannot take it",
                    c.name, ls.protocol, ls.port
                ));
                continue;
            }
            if out
                .iter()
                .any(|s| s.listen.port() == ls.port && s.protocol == ls.protocol)
            {
                problems.push(format!(
                    "container {}: {} port {} belongs to a configured service; labels cannot take it",
                    c.name, ls.protocol, ls.port
                ));
                continue;
            }
            let entry = by_name
                .entry(ls.service.clone())
                .or_insert_with(|| Service {
                    name: ls.service.clone(),
                    listen,
                    protocol: ls.protocol,
                    backends: Vec::new(),
                    health: ls.health.clone(),
                });
            if entry.health != ls.health {
                problems.push(format!(
                    "container {}: its berth.health labels differ from the rest of service {}; \
                     the first container's check applies",
                    c.name, ls.service
                ));
            }
            if entry.listen != listen || entry.protocol != ls.protocol {
                problems.push(format!(
                    "container {}: service {} is already on {} {}; not served",
                    c.name, ls.service, entry.protocol, entry.listen
                ));
                continue;
            }
            entry
                .backends
                .push((SocketAddrV4::new(ip, ls.target_port), ls.weight));
        }
        for (_, mut s) in by_name {
            s.backends.sort();
            s.backends.dedup_by_key(|(a, _)| *a);
            out.push(s);
        }
    }
    (out, problems)
}

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
        health,
        networks,
        bridges: BTreeMap::new(),
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

/// The host bridges behind the containers that back `services` (to attach the program to, so
/// their replies are translated).
pub fn backend_bridges(
    services: &[Service],
    containers: &BTreeMap<String, ContainerInfo>,
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for c in containers.values().filter(|c| c.serving()) {
        for (net, ip) in &c.networks {
            let backs = services
                .iter()
                .any(|s| s.backends.iter().any(|(a, _)| a.ip() == ip));
            if backs && let Some(br) = c.bridges.get(net) {
                out.insert(br.clone());
            }
        }
    }
    out
}

/// Whether a `kill` event's signal ends the container (TERM, INT, KILL; by number or name).
fn is_stop_signal(signal: Option<&String>) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, image: &str, labels: &[(&str, &str)], ip: [u8; 4]) -> ContainerInfo {
        ContainerInfo {
            id: format!("id-{name}"),
            name: name.into(),
            image: image.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            health: None,
            networks: [("bridge".to_owned(), Ipv4Addr::from(ip))]
                .into_iter()
                .collect(),
            bridges: [("bridge".to_owned(), "docker0".to_owned())]
                .into_iter()
                .collect(),
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_parsing() {
        assert_eq!(parse_labels(&labels(&[("other", "x")])), Ok(None));
        let ls = parse_labels(&labels(&[
            ("berth.port", "8080"),
            ("berth.target-port", "8000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (ls.port, ls.target_port, ls.weight, ls.protocol),
            (8080, 8000, 1, Protocol::Tcp)
        );
        assert_eq!(ls.service, "tcp-8080");
        let ls = parse_labels(&labels(&[
            ("berth.port", "53"),
            ("berth.protocol", "udp"),
            ("berth.weight", "3"),
            ("berth.service", "dns"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (ls.target_port, ls.weight, ls.service.as_str()),
            (53, 3, "dns")
        );
        for (k, v, needle) in [
            ("berth.port", "http", "berth.port=\"http\""),
            ("berth.port", "0", "berth.port"),
            ("berth.port", "70000", "berth.port"),
        ] {
            let e = parse_labels(&labels(&[(k, v)])).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e =
            parse_labels(&labels(&[("berth.port", "80"), ("berth.weight", "lots")])).unwrap_err();
        assert!(e.contains("berth.weight"), "{e}");
        let e =
            parse_labels(&labels(&[("berth.port", "80"), ("berth.protocol", "sctp")])).unwrap_err();
        assert!(e.contains("berth.protocol"), "{e}");
        let e =
            parse_labels(&labels(&[("berth.port", "80"), ("berth.service", "a b")])).unwrap_err();
        assert!(e.contains("berth.service"), "{e}");
        // Health labels.
        let ls = parse_labels(&labels(&[
            ("berth.port", "80"),
            ("berth.health", "http"),
            ("berth.health.path", "/ping"),
            ("berth.health.expect-string", "Hello"),
            ("berth.health.interval-ms", "500"),
            ("berth.health.fall", "2"),
        ]))
        .unwrap()
        .unwrap();
        let h = ls.health.unwrap();
        assert_eq!(
            (
                h.path.as_str(),
                h.expect_string.as_deref(),
                h.interval_ms,
                h.fall,
                h.rise
            ),
            ("/ping", Some("Hello"), 500, 2, 2)
        );
        for (k, v, needle) in [
            ("berth.health", "icmp", "berth.health="),
            ("berth.health.rise", "0", "berth.health.rise"),
            (
                "berth.health.interval-ms",
                "soon",
                "berth.health.interval-ms",
            ),
            ("berth.health.path", "ping", "berth.health.path"),
        ] {
            let mut l: BTreeMap<String, String> =
                labels(&[("berth.port", "80"), ("berth.health", "http")]);
            l.insert(k.into(), v.into());
            let e = parse_labels(&l).unwrap_err();
            assert!(e.contains(needle), "{k}={v}: {e}");
        }
    }

    #[test]
    fn image_matching() {
        let x = c("a", "local/nodeapp", &[], [10, 0, 0, 2]);
        assert!(x.runs_image("local/nodeapp"));
        assert!(!x.runs_image("local/node"));
        let y = c("b", "local/nodeapp:1.2", &[], [10, 0, 0, 3]);
        assert!(y.runs_image("local/nodeapp") && y.runs_image("local/nodeapp:1.2"));
        assert!(!y.runs_image("local/nodeapp:1.3"));
    }

    #[test]
    fn selectors_and_labels_make_services() {
        let configured = vec![Service {
            name: "web".into(),
            listen: "0.0.0.0:8080".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![],
            health: None,
        }];
        let selectors: HashMap<_, _> = [(
            "web".to_owned(),
            DockerSelector {
                image: Some("local/nodeapp".into()),
                labels: BTreeMap::new(),
                port: 8000,
                network: None,
            },
        )]
        .into_iter()
        .collect();
        let mut unhealthy = c("sick", "local/nodeapp", &[], [10, 0, 0, 9]);
        unhealthy.health = Some("unhealthy".into());
        let mut starting = c("new", "local/nodeapp", &[], [10, 0, 0, 10]);
        starting.health = Some("starting".into());
        let mut stopped = c("off", "local/nodeapp", &[], [10, 0, 0, 8]);
        stopped.running = false;
        let containers: BTreeMap<_, _> = [
            c("a", "local/nodeapp", &[], [10, 0, 0, 2]),
            c("b", "local/nodeapp:2", &[], [10, 0, 0, 3]),
            c("other", "local/else", &[], [10, 0, 0, 4]),
            c(
                "lab",
                "x",
                &[("berth.port", "9090"), ("berth.target-port", "80")],
                [10, 0, 0, 5],
            ),
            c("bad", "x", &[("berth.port", "nine")], [10, 0, 0, 6]),
            c("steal", "x", &[("berth.port", "8080")], [10, 0, 0, 7]),
            unhealthy,
            stopped,
            starting,
        ]
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
        let host: std::collections::HashSet<_> = [(Protocol::Tcp, 22)].into_iter().collect();
        let mut containers = containers;
        let ssh = c("ssh", "x", &[("berth.port", "22")], [10, 0, 0, 11]);
        containers.insert(ssh.id.clone(), ssh);
        let (svcs, problems) = services(&configured, &selectors, &containers, true, &host);
        let web = &svcs[0];
        assert_eq!(
            web.backends,
            vec![
                ("10.0.0.2:8000".parse().unwrap(), 1),
                ("10.0.0.3:8000".parse().unwrap(), 1),
                ("10.0.0.10:8000".parse().unwrap(), 1)
            ],
            "running and starting containers serve; unhealthy and stopped ones do not"
        );
        assert!(is_stop_signal(Some(&"15".into())) && is_stop_signal(Some(&"SIGKILL".into())));
        assert!(!is_stop_signal(Some(&"1".into())) && !is_stop_signal(None));
        let lab = svcs
            .iter()
            .find(|s| s.name == "tcp-9090")
            .expect("label service");
        assert_eq!(lab.backends, vec![("10.0.0.5:80".parse().unwrap(), 1)]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("container ssh") && p.contains("in use by a process"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("container bad") && p.contains("berth.port"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("container steal") && p.contains("configured service"))
        );
        // Without label services, labels are ignored.
        assert_eq!(
            backend_bridges(&svcs, &containers)
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["docker0".to_owned()]
        );
        let (svcs, problems) = services(&configured, &selectors, &containers, false, &host);
        assert_eq!(svcs.len(), 1);
        assert!(problems.is_empty());
    }
}
