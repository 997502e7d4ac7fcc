//! The daemon's state between events, and one method per event: a reload (SIGHUP), a Docker
//! event, a health change, a readiness probe's answer, the 1 s tick, the 30 s conntrack sweep, a
//! status or metrics request.
//! Each handler updates what the daemon knows and, when the desired services change, hands
//! them to the reconciler, the one writer of the maps.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, info_span, warn};

use super::{
    Source,
    desired::{self, Hold},
    engines::Engines,
    host::preflight,
    read_config,
    snapshot::{self, MetricsInputs},
};
use crate::{
    api::{admin, metrics::Extra, status::Status},
    config::{Config, Nat, Service},
    dataplane::{Dataplane, host_ipv4_addrs, monotonic_ns},
    discovery::{
        self, ContainerInfo, ContainerKey, EngineClient, EngineEvent, Event,
        etcd::{self, Update},
    },
    health::{HealthChange, NetChecker, ProbeOutcome, ProbeReport, Readiness, Supervisor},
    reconciler::Reconciler,
};

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reloaded {
    /// The new file is in force; `needs_restart`: some `[dataplane]`/`[docker]` change waits for
    /// a restart (and was said in the log).
    Applied { needs_restart: bool },
    /// No file, or an invalid one: the running config stays.
    Kept,
}

/// What the daemon starts from: the validated config and the (possibly adopted) dataplane.
pub(super) struct Start {
    pub(super) source: Option<Source>,
    pub(super) cfg: Config,
    pub(super) services: Vec<Service>,
    pub(super) rec: Reconciler,
    pub(super) adopted: bool,
    /// The command line, written over every reloaded config.
    pub(super) overrides: super::Overrides,
    /// The Docker Engines to watch (none when Docker discovery is off).
    pub(super) engines: Vec<EngineClient>,
}

/// Everything the event loop knows between events.
pub(super) struct Daemon {
    source: Option<Source>,
    overrides: super::Overrides,
    cfg: Config,
    /// The services of the config file.
    configured: Vec<Service>,
    /// Containers by engine and id, as their engines last described them.
    containers: BTreeMap<ContainerKey, ContainerInfo>,
    /// Each engine's state: connected, reached where, lost past its grace.
    engines: Engines,
    /// Configured + discovered services, before the health filter.
    desired: Vec<Service>,
    /// Container problems already warned about (each is logged once).
    reported: HashSet<String>,
    health: Supervisor<NetChecker>,
    /// New container backends wait here until they accept a connection.
    readiness: Readiness,
    rec: Reconciler,
    hold: Hold,
    docker_on: bool,
    /// Bridges tried and failed (reported once).
    unattachable: HashSet<String>,
    docker_events: u64,
    discovery_lag: Option<f64>,
    /// What etcd holds under the watched prefixes (kept as it was while etcd is unreachable).
    etcd_known: etcd::Known,
    /// The etcd source, when it runs.
    etcd: Option<EtcdSource>,
    /// Sources an adopted dataplane waits for before it is written: (Docker, etcd).
    awaiting: (bool, bool),
}

/// The etcd source as the daemon follows it.
struct EtcdSource {
    endpoints: Vec<String>,
    /// The prefixes the source watches (a reload that changes them restarts its read).
    prefixes: watch::Sender<Vec<String>>,
    /// Every prefix read and watched.
    synced: bool,
    /// Why it is unreachable, and since when.
    down: Option<(String, Instant)>,
    revision: i64,
    events: u64,
    resyncs: u64,
}

impl Daemon {
    /// Starts the health checks and writes the configured services (unless an adopted
    /// dataplane is held for Docker's first listing). Health changes and readiness probes
    /// report on their channels.
    pub(super) fn new(
        start: Start,
        health_tx: mpsc::Sender<HealthChange>,
        probe_tx: mpsc::Sender<ProbeReport>,
    ) -> Self {
        let Start {
            source,
            cfg,
            services,
            rec,
            adopted,
            overrides,
            engines,
        } = start;
        let docker_on = super::docker_enabled(&cfg, source.is_some());
        let etcd_on = source.is_some() && cfg.etcd_enabled();
        let engines = Engines::new(
            engines
                .iter()
                .map(|e| (e.name().to_owned(), e.engine.endpoint.to_string())),
            Duration::from_secs(cfg.docker.grace_secs),
            Instant::now(),
        );
        let mut health = Supervisor::new(NetChecker, health_tx);
        health.presume_healthy(rec.pinned_backends());
        let probe_timeout = cfg
            .docker
            .readiness_probe
            .then(|| Duration::from_millis(cfg.docker.readiness_timeout_ms));
        let mut readiness = Readiness::new(probe_tx, probe_timeout);
        readiness.presume_ready(rec.pinned_backends());
        let mut d = Self {
            source,
            overrides,
            cfg,
            desired: services.clone(),
            configured: services,
            containers: BTreeMap::new(),
            engines,
            reported: HashSet::new(),
            health,
            readiness,
            rec,
            hold: Hold::new(adopted, docker_on || etcd_on, Instant::now()),
            docker_on,
            unattachable: HashSet::new(),
            docker_events: 0,
            discovery_lag: None,
            etcd_known: etcd::Known::new(),
            etcd: None,
            awaiting: (docker_on, etcd_on),
        };
        d.health.sync(&d.desired);
        d.readiness.sync(&d.desired);
        if d.hold.holding() {
            info!(
                "keeping the pinned services as they are until the first listing of {}",
                match (docker_on, etcd_on) {
                    (true, true) => "Docker and etcd",
                    (false, true) => "etcd",
                    _ => "Docker",
                }
            );
        }
        d.apply("config");
        d
    }

    pub(super) fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub(super) fn docker_on(&self) -> bool {
        self.docker_on
    }

    pub(super) fn has_file(&self) -> bool {
        self.source.is_some()
    }

    /// The etcd prefixes the configured services take backends from (sorted, each once).
    pub(super) fn etcd_prefixes(&self) -> Vec<String> {
        let mut p: Vec<String> = self.cfg.etcd_selectors().into_values().collect();
        p.sort();
        p.dedup();
        p
    }

    /// The etcd source runs: `prefixes` tells it what to watch.
    pub(super) fn watch_etcd(
        &mut self,
        prefixes: watch::Sender<Vec<String>>,
        endpoints: Vec<String>,
    ) {
        self.etcd = Some(EtcdSource {
            endpoints,
            prefixes,
            synced: false,
            down: None,
            revision: 0,
            events: 0,
            resyncs: 0,
        });
    }

    /// Logs the line that says berth serves (tests and operators wait for it).
    pub(super) fn ready(&self, ifaces: &[String]) {
        let options = self.rec.dataplane().options();
        let backends: usize = self.desired.iter().map(|s| s.backends.len()).sum();
        info!(
            "berth ready: attached to {}; {} services, {backends} backends; maglev M={}, conntrack {}",
            ifaces.join(", "),
            self.desired.len(),
            options.maglev_size,
            options.conntrack_size
        );
    }

    /// SIGHUP: re-reads the config file; an invalid one is reported and the running one kept.
    /// Returns what happened: applied (and whether some of it waits for a restart), or kept.
    pub(super) fn on_reload(&mut self) -> Reloaded {
        let _reload = info_span!("reload").entered();
        let Some(source) = &self.source else {
            warn!("SIGHUP: no config file to reload");
            return Reloaded::Kept;
        };
        match read_config(source) {
            Err(e) => {
                error!(
                    "config reload failed, keeping the running config: {}: {e}",
                    source.path.display()
                );
                Reloaded::Kept
            }
            Ok((mut new_cfg, new_services)) => {
                // Flags win over the file, at every reload as at start.
                self.overrides.apply(&mut new_cfg);
                let (cfg, needs_restart) = desired::reloaded(&self.cfg, new_cfg);
                if needs_restart {
                    warn!(
                        "config reload: [dataplane], [docker] and [etcd] changes take effect on \
                         restart only"
                    );
                }
                self.cfg = cfg;
                self.configured = new_services;
                let prefixes = self.etcd_prefixes();
                match &self.etcd {
                    Some(e) => {
                        e.prefixes.send_if_modified(|p| {
                            let changed = *p != prefixes;
                            *p = prefixes;
                            changed
                        });
                    }
                    None if !prefixes.is_empty() => warn!(
                        "config reload: services now take backends from etcd, which berth \
                         follows only from a restart"
                    ),
                    None => {}
                }
                self.refresh();
                self.apply("config reload");
                info!("config reloaded: {} services", self.desired.len());
                Reloaded::Applied { needs_restart }
            }
        }
    }

    /// An engine's watcher said something: a container changed, a full listing arrived, or
    /// the engine stopped answering.
    pub(super) fn on_docker(&mut self, ev: EngineEvent) {
        let EngineEvent { engine, event } = ev;
        let _container = match &event {
            Event::Snapshot(all, _) => info_span!("docker", %engine, containers = all.len()),
            Event::Upsert(c, _) => info_span!("docker", %engine, container = %c.name, id = %c.id),
            Event::Remove(id, _) => info_span!("docker", %engine, %id),
            Event::Lost { .. } => info_span!("docker", %engine),
        }
        .entered();
        match &event {
            Event::Snapshot(_, reach) => {
                if self.engines.connected(&engine, *reach) {
                    info!("engine {engine} answers again: its containers are judged afresh");
                }
            }
            Event::Lost {
                error,
                last_contact,
            } => {
                self.engines
                    .disconnected(&engine, error.clone(), *last_contact);
                info!(
                    "engine {engine} is unreachable: its backends stay as they are for the \
                     grace ({} s)",
                    self.engines.grace().as_secs()
                );
            }
            Event::Upsert(_, t) | Event::Remove(_, t) => self.engines.event(&engine, *t),
        }
        let Some(why) = desired::record(&mut self.containers, &engine, &event) else {
            return;
        };
        if matches!(event, Event::Snapshot(..)) && self.engines.settled() {
            self.awaiting.0 = false;
            self.release_when_listed();
        }
        self.refresh();
        self.apply(&why);
        if let Event::Upsert(_, Some(t)) | Event::Remove(_, Some(t)) = event {
            self.docker_events += 1;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(t);
            self.discovery_lag = Some(desired::lag_seconds(t, now));
        }
    }

    /// What etcd said: a prefix's listing, a key written or deleted, every prefix synced, or
    /// that it cannot be reached (said once per outage; what it last gave keeps serving).
    pub(super) fn on_etcd(&mut self, update: Update) {
        let _etcd = info_span!("etcd").entered();
        let keys: usize = self.etcd_known.values().map(|k| k.len()).sum();
        let Some(src) = &mut self.etcd else { return };
        match &update {
            Update::Down(e) => {
                if src.synced || src.down.is_none() {
                    warn!(
                        "etcd unreachable at {} ({e}): serving the {keys} keys it last gave, \
                         retrying with backoff",
                        src.endpoints.join(", ")
                    );
                }
                src.synced = false;
                src.down = Some((e.clone(), Instant::now()));
                return;
            }
            Update::Synced => {
                src.synced = true;
                src.resyncs += 1;
                match src.down.take() {
                    Some((_, since)) => info!(
                        "etcd reachable again after {:.1} s: resynced, {keys} keys",
                        since.elapsed().as_secs_f64()
                    ),
                    None => info!("etcd: synced, {keys} keys"),
                }
                if self.awaiting.1 {
                    self.awaiting.1 = false;
                    self.release_when_listed();
                    self.apply("etcd: first listing");
                }
                return;
            }
            Update::Snapshot { revision, .. } => src.revision = src.revision.max(*revision),
            Update::Put { revision, .. } | Update::Delete { revision, .. } => {
                src.revision = src.revision.max(*revision);
                src.events += 1;
            }
        }
        if let Some(why) = etcd::record(&mut self.etcd_known, &update) {
            self.refresh();
            self.apply(&why);
        }
    }

    /// Releases an adopted dataplane's hold once every source it waits for has listed.
    fn release_when_listed(&mut self) {
        if self.awaiting == (false, false) {
            self.hold.release();
        }
    }

    /// Engines unreachable past their grace: their containers now back only services whose
    /// health checks judge them. Says so once per engine and loss, naming what stays and what
    /// leaves.
    fn judge_lost_engines(&mut self, now: Instant) {
        let expired = self.engines.expire(now);
        if expired.is_empty() {
            return;
        }
        let before = std::mem::take(&mut self.desired);
        self.refresh();
        let views = self.engines.views();
        let from = |engine: &str, s: &Service| -> Vec<std::net::SocketAddr> {
            s.backends
                .iter()
                .filter(|b| {
                    discovery::container_at(&self.containers, &views, b.addr)
                        .is_some_and(|c| c.engine == engine)
                })
                .map(|b| b.addr)
                .collect()
        };
        for name in &expired {
            let mut said = Vec::new();
            for s in &before {
                let had = from(name, s);
                if had.is_empty() {
                    continue;
                }
                let kept = self
                    .desired
                    .iter()
                    .find(|d| d.name == s.name)
                    .map(|d| from(name, d))
                    .unwrap_or_default();
                let backends = |n: usize| match n {
                    1 => "1 backend".to_owned(),
                    n => format!("{n} backends"),
                };
                said.push(if s.health.is_some() {
                    format!(
                        "service {} keeps its {} there while the health checks pass",
                        s.name,
                        backends(kept.len())
                    )
                } else {
                    format!(
                        "service {} has no health check: its {} there leave",
                        s.name,
                        backends(had.len() - kept.len())
                    )
                });
            }
            let error = self
                .engines
                .get(name)
                .and_then(|e| e.error.clone())
                .unwrap_or_else(|| "never answered".into());
            warn!(
                "engine {name} unreachable for more than {} s ({error}): {}",
                self.engines.grace().as_secs(),
                if said.is_empty() {
                    "it backs no service".to_owned()
                } else {
                    said.join("; ")
                }
            );
        }
        if self.hold.holding() && self.engines.settled() {
            warn!(
                "releasing the pinned services: engine {} did not list its containers within \
                 the grace",
                expired.join(", ")
            );
            self.awaiting.0 = false;
            self.release_when_listed();
        }
        self.apply(&format!(
            "docker: engine {} unreachable past its grace",
            expired.join(", ")
        ));
    }

    /// A backend's health flipped.
    pub(super) fn on_health(&mut self, change: &HealthChange) {
        let _backend = info_span!(
            "health",
            service = %change.service,
            backend = %change.backend,
            healthy = change.healthy
        )
        .entered();
        if !self.health.record(change) {
            return; // a check stopped by a reload
        }
        let why = match &change.reason {
            None => "health check passing".to_owned(),
            Some(r) => format!("health check failing: {r}"),
        };
        self.apply(&why);
    }

    /// A readiness probe answered: the backend joins its pool (after its health check's rise,
    /// if it has one), or it is slow to listen, which is said once.
    pub(super) fn on_probe(&mut self, report: &ProbeReport) {
        let _backend = info_span!(
            "probe",
            service = %report.service,
            backend = %report.backend,
        )
        .entered();
        if !self.readiness.current(report) {
            return; // the backend is gone, or another container run took its address
        }
        let container = self
            .container_at(report.backend)
            .unwrap_or_else(|| report.backend.to_string());
        match &report.outcome {
            ProbeOutcome::Ready { after } => {
                // In the pool already when no backend of its service was ready (see
                // `Readiness::filter`): said here, as nothing joins; the others still starting
                // leave the pool until their probe passes.
                let pooled = self
                    .readiness
                    .filter(
                        &self.health.filter(&self.desired),
                        self.cfg.dataplane.reject_without_backend,
                    )
                    .iter()
                    .any(|s| {
                        s.name == report.service
                            && s.backends.iter().any(|b| b.addr == report.backend)
                    });
                self.readiness.record(report);
                let why = format!(
                    "docker: container {container} accepting connections after {:.2} s",
                    after.as_secs_f64()
                );
                if pooled {
                    info!(
                        "{why}, in service {}'s pool already (none of its backends was ready)",
                        report.service
                    );
                    self.apply(&format!(
                        "docker: container {container} of service {} ready; backends still                          starting wait for their probe",
                        report.service
                    ));
                } else {
                    self.apply(&why);
                }
            }
            ProbeOutcome::Slow { last } => warn!(
                "container {container}: nothing accepts connections on {} {} s after it \
                 started ({last}); kept out of service {}'s pool, probing every {} s until it \
                 does (`[docker] readiness_probe = false` or `--no-readiness-probe` pool \
                 containers as soon as they run)",
                report.backend,
                self.readiness.timeout().unwrap_or_default().as_secs_f64(),
                report.service,
                crate::health::SLOW_PROBE_EVERY.as_secs()
            ),
        }
    }

    /// Every second: engines past their grace, the hold warning, a retry of a failed write,
    /// this host's addresses, and the purge of drained backends' flows.
    pub(super) fn on_tick(&mut self, now: Instant) {
        self.judge_lost_engines(now);
        let tick = self.hold.tick(now);
        if tick.warn_hold {
            warn!(
                "{} has not answered for 10 s: the pinned services keep serving as they were \
                 until it does",
                if self.awaiting.0 { "Docker" } else { "etcd" }
            );
        }
        if tick.retry {
            self.apply("retry");
        }
        if let Err(e) = self
            .rec
            .dataplane_mut()
            .sync_local_addrs(&host_ipv4_addrs())
            .and_then(|_| {
                self.rec
                    .dataplane_mut()
                    .sync_local_addrs6(&crate::dataplane::host_ipv6_addrs())
            })
        {
            warn!("recording this host's addresses, retrying in 1 s: {e}");
        }
        let drain = Duration::from_secs(self.cfg.dataplane.drain_timeout_secs);
        if let Err(e) = self.rec.purge_drained(now, drain) {
            warn!("purging drained backends, retrying in 1 s: {e:#}");
        }
    }

    /// Every 30 s: sweeps expired conntrack entries, off the event loop (a full walk costs two
    /// syscalls per entry).
    pub(super) fn on_gc(&self) {
        match self.rec.dataplane().conntrack_reader() {
            Ok(mut r) => {
                tokio::task::spawn_blocking(move || match r.gc(monotonic_ns()) {
                    Ok(0) => {}
                    Ok(n) => debug!("conntrack gc: removed {n} expired entries"),
                    Err(e) => warn!("conntrack gc: {e}"),
                });
            }
            Err(e) => warn!("conntrack gc: {e}"),
        }
    }

    /// `berth status`: the cheap map reads here, the conntrack walk off the loop, and only for a
    /// valid request.
    pub(super) fn on_admin(&self, conn: tokio::net::UnixStream) {
        let mut s = self.status();
        let reader = self.rec.dataplane().conntrack_reader();
        tokio::spawn(admin::answer(conn, async move {
            let (entries, entries6) = snapshot::walk_conntrack(reader).await;
            snapshot::fill_active_flows(&mut s, &entries, &entries6);
            s
        }));
    }

    /// The metrics task's page is stale: hand it what a new one is made of (the conntrack walk
    /// runs in that task).
    pub(super) fn on_metrics(&self, reply: oneshot::Sender<MetricsInputs>) {
        let _ = reply.send(MetricsInputs {
            status: self.status(),
            reader: self.rec.dataplane().conntrack_reader(),
            extra: Extra {
                conntrack_capacity: u64::from(self.rec.dataplane().options().conntrack_size),
                docker_events: self.docker_events,
                discovery_lag_seconds: self.discovery_lag,
                ..Default::default()
            },
        });
    }

    /// Stops the health checks and gives back the dataplane and the config as last reloaded.
    pub(super) fn stop(mut self) -> (Dataplane, Config) {
        self.health.stop();
        self.readiness.stop();
        (self.rec.into_dataplane(), self.cfg)
    }

    fn status(&self) -> Status {
        let mut s = snapshot::build_status(
            &self.rec,
            &self.health,
            &self.readiness,
            &self.desired,
            &self.containers,
            &self.engines,
        );
        s.etcd = self.etcd.as_ref().map(|e| crate::api::status::EtcdStatus {
            endpoints: e.endpoints.clone(),
            connected: e.synced,
            error: e.down.as_ref().map(|(why, _)| why.clone()),
            down_for_secs: e.down.as_ref().map(|(_, t)| t.elapsed().as_secs_f64()),
            keys: self.etcd_known.values().map(|k| k.len()).sum(),
            revision: e.revision,
            events: e.events,
            resyncs: e.resyncs,
        });
        s
    }

    /// The name of the serving container at `backend`'s address.
    fn container_at(&self, backend: std::net::SocketAddr) -> Option<String> {
        let views = self.engines.views();
        discovery::container_at(&self.containers, &views, backend).map(|c| c.name.clone())
    }

    /// Recomputes the desired services from the config and the containers, and points the
    /// health checks at their backends.
    fn refresh(&mut self) {
        let (mut services, mut problems) = desired::services(
            &self.cfg,
            &self.configured,
            &self.containers,
            &self.engines.views(),
            self.has_file(),
            &desired::Host::now(),
            &self.desired,
        );
        if self.etcd.is_some() {
            problems.extend(etcd::add_backends(
                &mut services,
                &self.cfg.etcd_selectors(),
                &self.etcd_known,
            ));
        }
        for p in problems {
            if self.reported.insert(p.clone()) {
                warn!("{p}");
            }
        }
        self.desired = services;
        self.health.sync(&self.desired);
        self.readiness.sync(&self.desired);
    }

    /// Hands the ready and healthy part of the desired services to the reconciler, unless
    /// held; a failed write is logged and retried by the tick. Then attaches where the
    /// backends' replies arrive.
    fn apply(&mut self, why: &str) {
        let serving = self.readiness.filter(
            &self.health.filter(&self.desired),
            self.cfg.dataplane.reject_without_backend,
        );
        let rec = &mut self.rec;
        self.hold.settle(|| match rec.apply(&serving, why) {
            Ok(_) => false,
            Err(e) => {
                error!("applying services failed, retrying in 1 s: {e:#}");
                true
            }
        });
        self.attach_backend_interfaces();
    }

    /// Attaches the program where backends' replies arrive, so they are translated: the bridge
    /// of each Docker network with backends, and the interface of the route toward each
    /// full-NAT backend (its replies come back to this host's address the way its packets
    /// left). Each failure is reported once.
    fn attach_backend_interfaces(&mut self) {
        let views = self.engines.views();
        let mut wanted: BTreeMap<String, &str> =
            discovery::backend_bridges(&self.desired, &self.containers, &views)
                .into_iter()
                .map(|br| (br, "bridge of a Docker network with backends"))
                .collect();
        let full_nat: std::collections::BTreeSet<std::net::IpAddr> = self
            .desired
            .iter()
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.nat == Nat::Full)
            .map(|b| b.addr.ip())
            .collect();
        let routes = super::host::read_routes();
        let routes6 = super::host::read_routes6();
        for ip in full_nat {
            let iface = match ip {
                std::net::IpAddr::V4(ip) => super::host::route_interface_in(&routes, ip),
                std::net::IpAddr::V6(ip) => super::host::route6_interface_in(&routes6, ip),
            };
            match iface {
                // Loopback: the backend is this host, nothing to translate on the way back.
                Some(i) if i != "lo" => {
                    wanted.entry(i).or_insert("route to full-NAT backends");
                }
                _ => {}
            }
        }
        for (iface, why) in wanted {
            if self.rec.dataplane().attached().contains(&iface)
                || !self.unattachable.insert(iface.clone())
            {
                continue;
            }
            let ipv6 = self.desired.iter().any(|s| s.listen.is_ipv6());
            let attached = preflight(
                std::slice::from_ref(&iface),
                self.cfg.dataplane.redirect,
                ipv6,
            )
            .and_then(|()| {
                self.rec
                    .dataplane_mut()
                    .attach(&iface)
                    .map_err(anyhow::Error::from)
            });
            match attached {
                Ok(_) => {
                    self.unattachable.remove(&iface);
                    info!("attached to {iface} ({why})");
                    if self.cfg.dataplane.xdp {
                        super::attach_xdp(
                            self.rec.dataplane_mut(),
                            &self.cfg,
                            std::slice::from_ref(&iface),
                        );
                    }
                }
                Err(e) => warn!(
                    "cannot attach to {iface} ({why}): {e:#}; replies of the backends behind it \
                     will not be translated"
                ),
            }
        }
    }
}

/// The handlers against a real dataplane: loaded into the kernel (root), attached nowhere, fed
/// one event at a time; what each handler decided is read back from the maps the program would
/// use.
#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;
    use crate::{
        daemon::Format,
        dataplane::{Dataplane, DataplaneOptions},
        discovery::Reach,
    };
    use lb_common::{ipv4_to_wire, port_to_wire};

    /// Containers of image "web" on port 8000, without the readiness probe: the test's
    /// containers are not real, nothing may be sent to their addresses.
    const ONE_SERVICE: &str = "[docker]\nreadiness_probe = false\n\
                               [[service]]\nname = \"web\"\nlisten = \"10.99.0.1:80\"\n\
                               docker = { image = \"web\", port = 8000 }\n";

    fn daemon(dir: &std::path::Path, text: &str) -> Daemon {
        daemon_with_probes(dir, text).0
    }

    /// A daemon, and the channel its readiness probes report on (the event loop's part).
    fn daemon_with_probes(
        dir: &std::path::Path,
        text: &str,
    ) -> (Daemon, mpsc::Receiver<ProbeReport>) {
        let path = dir.join("berth.toml");
        std::fs::write(&path, text).unwrap();
        let (mut cfg, services) = Config::load(text).expect("valid config");
        let overrides = super::super::Overrides {
            pin_path: Some("/sys/fs/bpf/bte-state-test".into()),
            detach_on_exit: true,
            ..Default::default()
        };
        overrides.apply(&mut cfg);
        let dp = Dataplane::load(DataplaneOptions {
            maglev_size: 251,
            max_services: 8,
            max_backends: 64,
            conntrack_size: 1024,
            ..DataplaneOptions::default()
        })
        .expect("load the dataplane (needs root and BPF)");
        let (tx, _rx) = mpsc::channel(16);
        let (probe_tx, probe_rx) = mpsc::channel(16);
        let engines = cfg
            .docker
            .engines(&|_| None)
            .unwrap()
            .into_iter()
            .map(|e| EngineClient::new(e).unwrap())
            .collect();
        let start = Start {
            source: Some(Source {
                path,
                format: Format::Berth,
            }),
            cfg,
            services,
            rec: Reconciler::new(dp),
            adopted: false,
            overrides,
            engines,
        };
        (Daemon::new(start, tx, probe_tx), probe_rx)
    }

    /// The backend ids in service `listen`'s Maglev row.
    fn slots(d: &Daemon, addr: [u8; 4], port: u16) -> Vec<u32> {
        let dp = d.rec.dataplane();
        let (_, v) = dp
            .services()
            .into_iter()
            .find(|(k, _)| k.addr == ipv4_to_wire(addr) && k.port == port_to_wire(port))
            .expect("service installed");
        let mut ids: Vec<u32> = (0..251)
            .map(|s| dp.maglev_slot(v.id, s).unwrap())
            .filter(|&id| id != 0)
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// An event of engine `default` (the one engine of a config without `[[docker.engine]]`).
    fn ev(event: Event) -> EngineEvent {
        on("default", event)
    }

    fn on(engine: &str, event: Event) -> EngineEvent {
        EngineEvent {
            engine: engine.into(),
            event,
        }
    }

    /// The backends in service `listen`'s Maglev row, as (address, port).
    fn pool(d: &Daemon, addr: [u8; 4], port: u16) -> Vec<(Ipv4Addr, u16)> {
        let dp = d.rec.dataplane();
        let Some((_, v)) = dp
            .services()
            .into_iter()
            .find(|(k, _)| k.addr == ipv4_to_wire(addr) && k.port == port_to_wire(port))
        else {
            return Vec::new();
        };
        let mut seen: Vec<(Ipv4Addr, u16)> = (0..251)
            .map(|s| dp.maglev_slot(v.id, s).unwrap())
            .filter(|&id| id != 0)
            .map(|id| dp.backend(id).unwrap())
            .map(|b| (Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port)))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    }

    fn container(id: &str, image: &str, ip: [u8; 4]) -> ContainerInfo {
        ContainerInfo {
            engine: "default".into(),
            published: BTreeMap::new(),
            paused: false,
            id: id.into(),
            name: format!("n-{id}"),
            image: image.into(),
            labels: BTreeMap::new(),
            running: true,
            health: None,
            networks: BTreeMap::from([("bridge".to_owned(), Ipv4Addr::from(ip).into())]),
            bridges: BTreeMap::new(),
            started_at: "2026-12-03T09:00:00.000000000Z".into(),
        }
    }

    #[tokio::test]
    async fn docker_events_reach_the_maps_one_handler_call_at_a_time() {
        let dir = tempdir("docker");
        let mut d = daemon(&dir, ONE_SERVICE);
        assert_eq!(pool(&d, [10, 99, 0, 1], 80), []);
        d.on_docker(ev(Event::Upsert(
            container("c1", "web", [172, 17, 0, 5]),
            None,
        )));
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([172, 17, 0, 5].into(), 8000)]
        );
        // Another image's container is not a backend; a second one of ours joins.
        d.on_docker(ev(Event::Upsert(
            container("c2", "db", [172, 17, 0, 6]),
            None,
        )));
        d.on_docker(ev(Event::Upsert(
            container("c3", "web", [172, 17, 0, 7]),
            None,
        )));
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [
                ([172, 17, 0, 5].into(), 8000),
                ([172, 17, 0, 7].into(), 8000)
            ]
        );
        // Unhealthy by its own HEALTHCHECK, then gone: out of the table.
        let mut sick = container("c1", "web", [172, 17, 0, 5]);
        sick.health = Some("unhealthy".into());
        d.on_docker(ev(Event::Upsert(sick, None)));
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([172, 17, 0, 7].into(), 8000)]
        );
        d.on_docker(ev(Event::Remove("c3".into(), None)));
        assert_eq!(pool(&d, [10, 99, 0, 1], 80), []);
        // A full listing replaces what the daemon knew.
        d.on_docker(ev(Event::Snapshot(
            vec![container("c9", "web", [172, 17, 0, 9])],
            Reach {
                address: None,
                local: true,
            },
        )));
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([172, 17, 0, 9].into(), 8000)]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    const THREE_ENGINES: &str = "[docker]\ngrace_secs = 5\nreadiness_probe = false\n\
        [[docker.engine]]\nname = \"a\"\nendpoint = \"unix:///run/a.sock\"\n\
        [[docker.engine]]\nname = \"b\"\nendpoint = \"tcp://10.42.2.2:2375\"\n\
        [[docker.engine]]\nname = \"c\"\nendpoint = \"tcp://10.42.3.2:2375\"\n\
        [[service]]\nname = \"web\"\nlisten = \"10.99.0.1:80\"\n\
        docker = { image = \"web\", port = 8000 }\n";

    #[tokio::test]
    async fn each_engines_containers_are_its_own_and_a_lost_engine_leaves_after_its_grace() {
        let dir = tempdir("engines");
        let mut d = daemon(&dir, THREE_ENGINES);
        let remote = |a: [u8; 4]| Reach {
            address: Some(a.into()),
            local: false,
        };
        let published = |engine: &str, id: &str, port: u16| {
            let mut c = container(id, "web", [172, 17, 0, 2]);
            c.engine = engine.into();
            c.published.insert(
                (crate::config::Protocol::Tcp, 8000),
                (Ipv4Addr::UNSPECIFIED, port),
            );
            c
        };
        let mut local = container("x", "web", [172, 17, 0, 2]);
        local.engine = "a".into();
        d.on_docker(on(
            "a",
            Event::Snapshot(
                vec![local],
                Reach {
                    address: None,
                    local: true,
                },
            ),
        ));
        // The same container id and address on b and c: other containers, reached through
        // their hosts' published ports.
        d.on_docker(on(
            "b",
            Event::Snapshot(vec![published("b", "x", 32768)], remote([10, 42, 2, 2])),
        ));
        d.on_docker(on(
            "c",
            Event::Snapshot(vec![published("c", "x", 32769)], remote([10, 42, 3, 2])),
        ));
        let all = [
            ([10, 42, 2, 2].into(), 32768),
            ([10, 42, 3, 2].into(), 32769),
            ([172, 17, 0, 2].into(), 8000),
        ];
        assert_eq!(pool(&d, [10, 99, 0, 1], 80), all);
        // b's listing replaces b's containers only.
        d.on_docker(on("b", Event::Snapshot(vec![], remote([10, 42, 2, 2]))));
        assert_eq!(pool(&d, [10, 99, 0, 1], 80), [all[1], all[2]]);
        d.on_docker(on("b", Event::Upsert(published("b", "y", 32770), Some(1))));
        let st = d.status();
        let b = st.engines.iter().find(|e| e.name == "b").unwrap();
        assert!(b.connected && !b.this_host && b.containers == 1, "{b:?}");
        // c stops answering; its backends stay for the grace (5 s), then leave (no health
        // check configured).
        let now = Instant::now();
        d.on_docker(on(
            "c",
            Event::Lost {
                error: "ping timed out".into(),
                last_contact: now,
            },
        ));
        d.on_tick(now + Duration::from_secs(4));
        assert!(pool(&d, [10, 99, 0, 1], 80).contains(&all[1]));
        d.on_tick(now + Duration::from_secs(6));
        assert!(!pool(&d, [10, 99, 0, 1], 80).contains(&all[1]));
        let st = d.status();
        let c = st.engines.iter().find(|e| e.name == "c").unwrap();
        assert!(!c.connected && c.lost, "{c:?}");
        // Back: its listing brings its containers back.
        d.on_docker(on(
            "c",
            Event::Snapshot(vec![published("c", "x", 32769)], remote([10, 42, 3, 2])),
        ));
        assert!(pool(&d, [10, 99, 0, 1], 80).contains(&all[1]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_reload_applies_a_valid_file_and_keeps_the_running_config_on_a_bad_one() {
        let dir = tempdir("reload");
        let mut d = daemon(&dir, ONE_SERVICE);
        d.on_docker(ev(Event::Upsert(
            container("c1", "web", [172, 17, 0, 5]),
            None,
        )));
        let path = dir.join("berth.toml");
        std::fs::write(
            &path,
            format!("{ONE_SERVICE}[[service]]\nname = \"api\"\nlisten = \"10.99.0.2:81\"\nbackends = [\"10.20.0.11:8000\"]\n"),
        )
        .unwrap();
        d.on_reload();
        assert_eq!(
            pool(&d, [10, 99, 0, 2], 81),
            [([10, 20, 0, 11].into(), 8000)]
        );
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([172, 17, 0, 5].into(), 8000)]
        );
        std::fs::write(&path, "[[service]]\nname = 5\n").unwrap();
        assert_eq!(d.on_reload(), Reloaded::Kept);
        assert_eq!(
            pool(&d, [10, 99, 0, 2], 81),
            [([10, 20, 0, 11].into(), 8000)]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn flags_win_over_the_file_at_every_reload() {
        let dir = tempdir("flags");
        let mut d = daemon(&dir, ONE_SERVICE);
        // An unchanged file: nothing waits for a restart (it used to say so at every reload when
        // --pin-path or --cgroup was given).
        assert_eq!(
            d.on_reload(),
            Reloaded::Applied {
                needs_restart: false
            }
        );
        // The file says other values for what the command line set (--pin-path,
        // --detach-on-exit): the flags stay, so nothing "needs a restart" either.
        std::fs::write(
            dir.join("berth.toml"),
            format!(
                "[dataplane]\npin_path = \"/sys/fs/bpf/other\"\ndetach_on_exit = false\n{ONE_SERVICE}"
            ),
        )
        .unwrap();
        assert_eq!(
            d.on_reload(),
            Reloaded::Applied {
                needs_restart: false
            }
        );
        assert_eq!(d.cfg().dataplane.pin_path, "/sys/fs/bpf/bte-state-test");
        assert!(
            d.cfg().dataplane.detach_on_exit,
            "--detach-on-exit forgotten"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_new_container_at_a_reused_address_gets_a_fresh_slot() {
        let dir = tempdir("reused");
        let mut d = daemon(&dir, ONE_SERVICE);
        d.on_docker(ev(Event::Snapshot(
            vec![container("a", "web", [172, 17, 0, 5])],
            Reach {
                address: None,
                local: true,
            },
        )));
        let first = slots(&d, [10, 99, 0, 1], 80);
        assert_eq!(first.len(), 1);
        // The same container listed again (a resync) keeps its slot.
        d.on_docker(ev(Event::Snapshot(
            vec![container("a", "web", [172, 17, 0, 5])],
            Reach {
                address: None,
                local: true,
            },
        )));
        assert_eq!(slots(&d, [10, 99, 0, 1], 80), first);
        // Docker's listing after a reconnect: another container has the address now. It is
        // a new backend: a slot of its own, whose counters start from zero (the old slot
        // kept the first container's counts).
        d.on_docker(ev(Event::Snapshot(
            vec![container("b", "web", [172, 17, 0, 5])],
            Reach {
                address: None,
                local: true,
            },
        )));
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([172, 17, 0, 5].into(), 8000)]
        );
        let second = slots(&d, [10, 99, 0, 1], 80);
        assert_eq!(second.len(), 1);
        assert_ne!(
            second, first,
            "the new container inherited the old one's slot"
        );
        let c = d.rec.dataplane().backend_counters(second[0]).unwrap();
        assert_eq!((c.packets, c.bytes, c.new_flows), (0, 0, 0));
        // The same container restarted (a new run, same id and address): a new slot too.
        let mut restarted = container("b", "web", [172, 17, 0, 5]);
        restarted.started_at = "2026-12-03T09:00:07.000000000Z".into();
        d.on_docker(ev(Event::Upsert(restarted, None)));
        let third = slots(&d, [10, 99, 0, 1], 80);
        assert!(third.len() == 1 && third != second, "{third:?} {second:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Service "web" of the containers running image "web" on `port`, probe on.
    /// A service of containers of image `web` on `port`, probed; berth drops SYNs of a service
    /// without backends (`reject_without_backend = false`), so a lone container waits for its
    /// probe out of the pool (see `Readiness::filter`).
    fn probed(port: u16) -> String {
        format!(
            "[dataplane]\nreject_without_backend = false\n\
             [docker]\nreadiness_timeout_ms = 10000\n[[service]]\nname = \"web\"\n\
             listen = \"10.99.0.1:80\"\ndocker = {{ image = \"web\", port = {port} }}\n"
        )
    }

    #[tokio::test]
    async fn a_lone_starting_container_is_pooled_where_berth_refuses_without_backends() {
        let dir = tempdir("probe-alone");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let text = probed(port).replace("reject_without_backend = false", "");
        let (mut d, _probes) = daemon_with_probes(&dir, &text);
        d.on_docker(ev(Event::Upsert(
            container("c1", "web", [127, 0, 0, 1]),
            None,
        )));
        // Nothing listens yet, but no backend of the service is ready either: a client is
        // refused by it or by berth alike, so it is in the pool while its probe runs.
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([127, 0, 0, 1].into(), port)]
        );
        let st = d.status();
        let b = &st.services[0].backends[0];
        assert_eq!((b.health.as_str(), b.in_pool), ("starting", true));
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn next_probe(rx: &mut mpsc::Receiver<ProbeReport>) -> ProbeReport {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a probe report within 5 s")
            .expect("probe channel open")
    }

    #[tokio::test]
    async fn a_container_is_pooled_once_it_listens_and_again_after_a_restart() {
        let dir = tempdir("probe");
        // A "container" on loopback, whose port the test opens and closes: the probe connects
        // to it for real.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut d, mut probes) = daemon_with_probes(&dir, &probed(port));
        let c = container("c1", "web", [127, 0, 0, 1]);
        d.on_docker(ev(Event::Upsert(c.clone(), None)));
        assert_eq!(pool(&d, [10, 99, 0, 1], 80), [], "pooled before it listens");
        let st = d.status();
        let b = &st.services[0].backends[0];
        assert_eq!((b.health.as_str(), b.in_pool), ("starting", false));

        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let report = next_probe(&mut probes).await;
        assert!(
            matches!(report.outcome, ProbeOutcome::Ready { .. }),
            "{report:?}"
        );
        d.on_probe(&report);
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([127, 0, 0, 1].into(), port)]
        );
        let first = slots(&d, [10, 99, 0, 1], 80);

        // Restarted (same id, same address, a new run) and not listening yet: out of the pool
        // until it listens again, then in with a slot of its own.
        drop(listener);
        let mut again = c.clone();
        again.started_at = "2026-12-03T09:00:09.000000000Z".into();
        d.on_docker(ev(Event::Upsert(again, None)));
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [],
            "pooled before it listens again"
        );
        // The earlier run's report, handled late, changes nothing.
        d.on_probe(&report);
        assert_eq!(pool(&d, [10, 99, 0, 1], 80), []);
        let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let report = next_probe(&mut probes).await;
        d.on_probe(&report);
        assert_eq!(
            pool(&d, [10, 99, 0, 1], 80),
            [([127, 0, 0, 1].into(), port)]
        );
        assert_ne!(slots(&d, [10, 99, 0, 1], 80), first);

        // Stopped while probing: its probe ends with it.
        let c2 = container("c2", "web", [127, 0, 0, 2]);
        d.on_docker(ev(Event::Upsert(c2.clone(), None)));
        let mut stopped = c2;
        stopped.running = false;
        d.on_docker(ev(Event::Upsert(stopped, None)));
        let _l2 = std::net::TcpListener::bind(("127.0.0.2", port)).unwrap();
        tokio::time::sleep(crate::health::PROBE_EVERY * 4).await;
        assert!(
            probes.try_recv().is_err(),
            "the probe of a stopped container reported"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("berth-state-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
