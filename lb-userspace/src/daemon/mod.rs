//! `berth run`: binds the sockets, loads and attaches the dataplane, then runs the event loop
//! (`state::Daemon`, one method per event) until SIGTERM/SIGINT, and says what it leaves
//! behind.
//!
//! Everything that can be wrong with the input is found before the kernel is touched: the
//! config is read and validated by the caller ([`read_config`]), the interfaces checked by
//! [`host::preflight`], the sockets bound before the dataplane is loaded.

pub mod desired;
pub(crate) mod engines;
pub mod host;
mod snapshot;
mod state;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    api::admin,
    config::{Cgroup, Config, ConfigError, Service},
    dataplane::{Dataplane, DataplaneOptions},
    discovery::EngineClient,
    reconciler::Reconciler,
};

/// Which format a config file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// berth's TOML.
    Berth,
    /// An Airbnb Synapse JSON config, imported onto berth services.
    Synapse,
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub format: Format,
}

/// Reads and validates `src` (Synapse imports log what could not be carried over).
pub fn read_config(src: &Source) -> Result<(Config, Vec<Service>), ConfigError> {
    let text = std::fs::read_to_string(&src.path).map_err(|e| ConfigError {
        field: src.path.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    match src.format {
        // JSON where berth's TOML was expected: most likely a Synapse config without its flag
        // (the TOML parser would only say "line 1: invalid key").
        Format::Berth if text.trim_start().starts_with('{') => Err(ConfigError {
            field: src.path.display().to_string(),
            message: "this is JSON, not berth's TOML: a Synapse config? use `berth run \
                      --synapse-config FILE` or `berth check-config --synapse FILE`"
                .into(),
        }),
        Format::Berth => Config::load(&text),
        Format::Synapse => {
            let imported = crate::config::synapse::import(&text)?;
            for w in &imported.warnings {
                warn!("synapse config: {w}");
            }
            let services = imported.config.validate()?;
            Ok((imported.config, services))
        }
    }
}

/// Whether to watch Docker: as configured, else when a service selects containers or berth runs
/// without a config file (label-driven services).
pub fn docker_enabled(cfg: &Config, has_file: bool) -> bool {
    cfg.docker
        .enabled
        .unwrap_or(!has_file || cfg.services.iter().any(|s| s.docker.is_some()))
}

/// What `berth run` was given, validated.
pub struct Run {
    pub source: Option<Source>,
    pub cfg: Config,
    pub services: Vec<Service>,
    pub ifaces: Vec<String>,
    pub admin_socket: PathBuf,
    /// The command line, applied again to every reloaded config.
    pub overrides: Overrides,
    /// How to reach etcd, when a service takes backends from it (its files already read).
    pub etcd: Option<crate::discovery::etcd::Connect>,
    /// The Docker Engines to watch (none without Docker discovery), TLS files read.
    pub engines: Vec<EngineClient>,
}

/// What the command line says over the config file: applied to the file as read at start and
/// again at every reload (flags win over the file, always).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--iface` (repeatable): replaces `dataplane.interfaces`.
    pub ifaces: Vec<String>,
    /// `--pin-path`: replaces `dataplane.pin_path`.
    pub pin_path: Option<PathBuf>,
    /// `--cgroup`: replaces `dataplane.cgroup`.
    pub cgroup: Option<String>,
    /// `--detach-on-exit`: sets `dataplane.detach_on_exit`.
    pub detach_on_exit: bool,
    /// `--metrics-listen`: replaces `metrics.listen` (and turns metrics on).
    pub metrics_listen: Option<String>,
    /// `--no-metrics`: turns metrics off.
    pub no_metrics: bool,
    /// `--no-readiness-probe`: turns the readiness probe off.
    pub no_readiness_probe: bool,
}

impl Overrides {
    /// Writes the command line's values over `cfg`'s.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(p) = &self.pin_path {
            cfg.dataplane.pin_path = p.display().to_string();
        }
        if let Some(c) = &self.cgroup {
            cfg.dataplane.cgroup.clone_from(c);
        }
        cfg.dataplane.detach_on_exit |= self.detach_on_exit;
        if let Some(l) = &self.metrics_listen {
            cfg.metrics.listen.clone_from(l);
            cfg.metrics.enabled = true;
        }
        if self.no_metrics {
            cfg.metrics.enabled = false;
        }
        if self.no_readiness_probe {
            cfg.docker.readiness_probe = false;
        }
    }
}

/// Why `berth run` refuses to start (before anything touched the kernel).
#[derive(Debug)]
pub enum Refused {
    /// The config file is unreadable or invalid (exit 64).
    Config(PathBuf, ConfigError),
    /// A command-line value is invalid (exit 64).
    CommandLine(ConfigError),
    /// The docker CLI's environment (`DOCKER_HOST`, ...) names no usable engine (exit 64).
    Environment(ConfigError),
    /// The host is not fit: no default route, a missing interface, forwarding off.
    Host(anyhow::Error),
}

/// The Docker Engines to watch: as configured (or the docker CLI's environment when none is),
/// their TLS files read. An error names the field, or the environment variable.
pub fn engines(cfg: &Config) -> Result<Vec<EngineClient>, ConfigError> {
    cfg.docker
        .engines(&|k| std::env::var(k).ok())?
        .into_iter()
        .map(EngineClient::new)
        .collect()
}

/// Reads and validates the config, applies the command line over it and picks the interfaces:
/// the named ones, else `dataplane.interfaces`, else the default route's (and docker0 with
/// Docker discovery), each checked by [`host::preflight`].
pub fn prepare(
    source: Option<Source>,
    overrides: Overrides,
    admin_socket: PathBuf,
) -> Result<Run, Refused> {
    let (mut cfg, services) = match &source {
        Some(src) => read_config(src).map_err(|e| Refused::Config(src.path.clone(), e))?,
        None => (Config::default(), Vec::new()),
    };
    overrides.apply(&mut cfg);
    cfg.validate().map_err(Refused::CommandLine)?;
    let etcd = match (&source, cfg.etcd_enabled()) {
        (Some(src), true) => Some(
            crate::discovery::etcd::Connect::from_config(&cfg.etcd)
                .map_err(|e| Refused::Config(src.path.clone(), e))?,
        ),
        _ => None,
    };
    let ifaces = if !overrides.ifaces.is_empty() {
        overrides.ifaces.clone()
    } else if !cfg.dataplane.interfaces.is_empty() {
        cfg.dataplane.interfaces.clone()
    } else {
        let i = host::default_route_iface().map_err(Refused::Host)?;
        // With Docker discovery, containers on the default bridge are reached through docker0:
        // attach there too (other networks: name them).
        if docker_enabled(&cfg, source.is_some())
            && std::path::Path::new("/sys/class/net/docker0").exists()
        {
            vec![i, "docker0".to_owned()]
        } else {
            vec![i]
        }
    };
    let engines = if docker_enabled(&cfg, source.is_some()) {
        engines(&cfg).map_err(|e| match &source {
            Some(src) if !e.field.starts_with("DOCKER_") => Refused::Config(src.path.clone(), e),
            _ => Refused::Environment(e),
        })?
    } else {
        Vec::new()
    };
    let ipv6 = services.iter().any(|s| s.listen.is_ipv6());
    host::preflight(&ifaces, cfg.dataplane.redirect, ipv6).map_err(Refused::Host)?;
    Ok(Run {
        source,
        cfg,
        services,
        ifaces,
        admin_socket,
        overrides,
        etcd,
        engines,
    })
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(args: Run) -> anyhow::Result<()> {
    let Run {
        source,
        cfg,
        services,
        ifaces,
        admin_socket,
        overrides,
        etcd,
        engines,
    } = args;
    // The sockets first: a port or path in use fails here, before the kernel is touched.
    let admin = admin::bind(&admin_socket)
        .with_context(|| format!("admin socket {}", admin_socket.display()))?;
    let _socket_file = RemoveOnDrop(admin_socket.clone());
    let metrics_listener = if cfg.metrics.enabled {
        let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
            .await
            .with_context(|| format!("metrics endpoint {}", cfg.metrics.listen))?;
        info!("metrics on http://{}/metrics", cfg.metrics.listen);
        Some(l)
    } else {
        None
    };
    let snat = cfg.dataplane.snat_ports;
    if let Some(local) = host::local_port_range()
        && local.overlaps(&snat)
    {
        warn!(
            "dataplane.snat_ports {snat} overlaps this host's ip_local_port_range {local}: a \
             connection of the host's own and a full-NAT flow may pick the same source port \
             toward a backend (move one of them apart)"
        );
    }
    if let Some(a) = cfg.dataplane.snat_address
        && !crate::dataplane::host_ipv4_addrs().contains(&lb_common::ipv4_to_wire(a.octets()))
    {
        warn!(
            "dataplane.snat_address {a} is not an address of this host (yet): full-NAT \
             backends answer it, and those answers reach berth only if it is routed here"
        );
    }
    if let Some(a) = cfg.dataplane.snat_address6
        && !crate::dataplane::host_ipv6_addrs().contains(&lb_common::v6::ipv6_to_wire(a.octets()))
    {
        warn!(
            "dataplane.snat_address6 {a} is not an address of this host (yet): full-NAT \
             backends answer it, and those answers reach berth only if it is routed here"
        );
    }
    let options = DataplaneOptions::from_config(&cfg.dataplane);
    let pin_root = PathBuf::from(&cfg.dataplane.pin_path);
    let mut dp = Dataplane::load_pinned(options, &pin_root).context("loading the dataplane")?;
    let adopted = dp.adopted();
    for (name, n) in dp.verified_instructions() {
        if let Some(n) = n {
            debug!("{name}: the verifier processed {n} instructions (limit 1000000)");
        }
    }
    if !dp.pins_outlive_process() {
        warn!(
            "pin path {} is on a BPF filesystem only this process's mount namespace has (as \
             under `ip netns exec`, which gives berth its own /sys): the pins will not outlive \
             this process, and the dataplane stops when the last process of this mount \
             namespace (usually berth) exits. To keep it serving across restarts, run berth in \
             the host's mount namespace (e.g. `nsenter --net=/run/netns/NAME berth run ...`)",
            pin_root.display()
        );
    }
    if adopted {
        info!(
            "adopting the dataplane pinned under {} (it kept serving while no berth ran)",
            pin_root.display()
        );
    }
    let ifaces = match attach_all(&mut dp, &cfg, ifaces) {
        Ok(i) => i,
        Err(e) => {
            drop(dp);
            if !adopted {
                // Nothing was serving before: leave nothing attached.
                let _ = crate::dataplane::down(&pin_root);
            }
            return Err(e);
        }
    };
    let rec = if adopted {
        Reconciler::adopt(dp).context("reading the pinned dataplane")?
    } else {
        Reconciler::new(dp)
    };
    let (dp, cfg) = event_loop(
        state::Start {
            source,
            cfg,
            services,
            rec,
            adopted,
            overrides,
            engines,
        },
        admin,
        metrics_listener,
        &ifaces,
        etcd,
    )
    .await?;
    let _ = std::fs::remove_file(&admin_socket);
    // The config as last reloaded decides, as it does for everything read at exit.
    leave(dp, cfg.dataplane.detach_on_exit, &ifaces, &pin_root)
}

/// With `dataplane.xdp`, attaches the XDP fast path beside TC on `ifaces` where the driver has
/// native XDP (saying where it has not: those stay on TC alone); without it, removes the XDP
/// attachments an earlier berth pinned.
pub(crate) fn attach_xdp(dp: &mut Dataplane, cfg: &Config, ifaces: &[String]) {
    if !cfg.dataplane.xdp {
        match dp.drop_pinned_xdp() {
            Ok(gone) => {
                for iface in gone {
                    info!("{iface}: detached the XDP fast path of the earlier berth (xdp = false)");
                }
            }
            Err(e) => warn!("removing the earlier berth's XDP attachments: {e}"),
        }
        return;
    }
    for iface in ifaces {
        match dp.attach_xdp(iface) {
            Ok(true) => info!("{iface}: took over the XDP fast path of the earlier berth"),
            Ok(false) => info!("{iface}: XDP fast path attached (native mode)"),
            Err(e) => {
                warn!("{iface}: {e:#}");
                continue;
            }
        }
        if crate::dataplane::driver_of(iface).as_deref() == Some("veth") {
            warn!(
                "{iface} is a veth: the frames XDP sends back out of it are dropped unless its \
                 peer runs an XDP program of its own, and frames local sockets send through it \
                 carry partial checksums (CHECKSUM_PARTIAL), which XDP cannot complete: turn \
                 transmit checksum offload off on the senders behind it (`ethtool -K IFACE tx \
                 off`), or keep xdp = false"
            );
        }
    }
}

/// Removes the admin socket's file when the daemon ends, however it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Attaches to `ifaces`, takes over what an earlier berth left attached, and attaches the socket
/// programs; returns every interface attached.
fn attach_all(
    dp: &mut Dataplane,
    cfg: &Config,
    ifaces: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let mut ifaces = ifaces;
    for iface in &ifaces {
        if dp
            .attach(iface)
            .with_context(|| format!("attaching to {iface}"))?
        {
            info!("{iface}: took over the attachment of the earlier berth");
        }
    }
    // What an earlier berth attached (bridges found through Docker, say) stays attached: its
    // flows' replies come through there.
    for iface in dp.pinned_interfaces() {
        if !ifaces.contains(&iface) {
            dp.attach(&iface)
                .with_context(|| format!("taking over the pinned attachment to {iface}"))?;
            info!("{iface}: took over the attachment of the earlier berth");
            ifaces.push(iface);
        }
    }
    attach_xdp(dp, cfg, &ifaces);
    let cgroup = match cfg.dataplane.cgroup_target() {
        Cgroup::None => None,
        Cgroup::Auto => Some(crate::dataplane::cgroup2_root().context(
            "no cgroup v2 hierarchy is mounted: mount one, or set dataplane.cgroup = \"none\" \
             (clients on this host are then not balanced)",
        )?),
        Cgroup::Path(p) => Some(p),
    };
    if let Some(cg) = &cgroup {
        dp.attach_cgroup(cg)
            .with_context(|| format!("balancing the sockets of cgroup {}", cg.display()))?;
    }
    if let Err(e) = dp
        .sync_local_addrs(&crate::dataplane::host_ipv4_addrs())
        .and_then(|_| dp.sync_local_addrs6(&crate::dataplane::host_ipv6_addrs()))
    {
        warn!("recording this host's addresses, retrying in 1 s: {e}");
    }
    Ok(ifaces)
}

/// Spawns discovery, health checks and the metrics endpoint under one stop signal, and turns
/// every event into a call on [`state::Daemon`] until SIGTERM/SIGINT. Returns the dataplane and
/// the config as last reloaded.
async fn event_loop(
    start: state::Start,
    admin: tokio::net::UnixListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    ifaces: &[String],
    etcd: Option<crate::discovery::etcd::Connect>,
) -> anyhow::Result<(Dataplane, Config)> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let (health_tx, mut health_rx) = tokio::sync::mpsc::channel(256);
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel(256);
    let engines = start.engines.clone();
    let mut d = state::Daemon::new(start, health_tx, probe_tx);

    let (docker_tx, mut docker_rx) = tokio::sync::mpsc::channel(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The metrics task asks this loop for a snapshot's inputs when its page is stale.
    let (metrics_tx, mut metrics_rx) =
        tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<snapshot::MetricsInputs>>(1);
    if let Some(listener) = metrics_listener {
        let cache = crate::api::metrics::Cache::new(
            Duration::from_secs(d.cfg().metrics.refresh_interval_secs),
            Box::new(move || {
                let ask = metrics_tx.clone();
                Box::pin(async move {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    if ask.send(reply).await.is_err() {
                        return String::new(); // shutting down
                    }
                    match answer.await {
                        Ok(inputs) => inputs.render().await,
                        Err(_) => String::new(),
                    }
                })
            }),
        );
        tokio::spawn(crate::api::metrics::serve(
            listener,
            std::sync::Arc::new(cache),
            stop_rx.clone(),
        ));
    } else {
        drop(metrics_tx);
    }
    let (etcd_tx, mut etcd_rx) = tokio::sync::mpsc::channel(1024);
    if let Some(connect) = etcd {
        let (prefixes_tx, prefixes_rx) = tokio::sync::watch::channel(d.etcd_prefixes());
        info!(
            "etcd discovery from {} ({} prefixes)",
            connect.endpoints.join(", "),
            prefixes_rx.borrow().len()
        );
        d.watch_etcd(prefixes_tx, connect.endpoints.clone());
        let span = info_span!("etcd", endpoints = %connect.endpoints.join(","));
        tokio::spawn(
            crate::discovery::etcd::run(connect, prefixes_rx, etcd_tx, stop_rx.clone())
                .instrument(span),
        );
    } else {
        drop(etcd_tx);
    }
    if d.docker_on() {
        let label_services =
            match desired::label_services(d.cfg(), d.has_file(), crate::discovery::host_has_ipv6())
            {
                crate::discovery::LabelServices::Off => "off",
                crate::discovery::LabelServices::Ipv4 => "on, IPv4",
                crate::discovery::LabelServices::DualStack => "on, IPv4 and IPv6",
            };
        info!(
            "docker discovery on {} engine(s): {} (label services {})",
            engines.len(),
            engines
                .iter()
                .map(|e| format!("{} at {}", e.name(), e.engine.endpoint))
                .collect::<Vec<_>>()
                .join(", "),
            label_services
        );
        // One watcher per engine, each in its span: every line it logs names its engine.
        for client in engines {
            let span = info_span!(
                "engine",
                name = %client.name(),
                endpoint = %client.engine.endpoint
            );
            tokio::spawn(
                crate::discovery::run(client, docker_tx.clone(), stop_rx.clone()).instrument(span),
            );
        }
    }
    drop(docker_tx);
    d.ready(ifaces);

    let mut retry = tokio::time::interval(Duration::from_secs(1));
    // The sweep walks the whole map with two syscalls per entry, so it runs rarely: the program
    // already ignores expired entries and the LRU reclaims space when the map is full.
    let mut gc = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                d.on_reload();
            }
            Some(event) = docker_rx.recv() => d.on_docker(event),
            Some(update) = etcd_rx.recv() => d.on_etcd(update),
            Some(reply) = metrics_rx.recv() => d.on_metrics(reply),
            Ok((conn, _)) = admin.accept() => d.on_admin(conn),
            Some(change) = health_rx.recv() => d.on_health(&change),
            Some(report) = probe_rx.recv() => d.on_probe(&report),
            _ = retry.tick() => d.on_tick(std::time::Instant::now()),
            _ = gc.tick() => d.on_gc(),
        }
    }
    let stopped = d.stop();
    let _ = stop_tx.send(true);
    Ok(stopped)
}

/// Logs the counters, then detaches (`detach_on_exit`) or says what keeps serving.
fn leave(
    dp: Dataplane,
    detach_on_exit: bool,
    ifaces: &[String],
    pin_root: &std::path::Path,
) -> anyhow::Result<()> {
    if let Ok(counters) = dp.reason_counters() {
        let line: Vec<String> = counters
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
        info!(
            "counters: {}",
            if line.is_empty() {
                "none".into()
            } else {
                line.join(" ")
            }
        );
    }
    let pins_outlive = dp.pins_outlive_process();
    drop(dp);
    if detach_on_exit {
        let r = crate::dataplane::down(pin_root)
            .with_context(|| format!("detaching and unpinning {}", pin_root.display()))?;
        info!(
            "berth stopped: detached from {} ({} links, {} maps unpinned)",
            ifaces.join(", "),
            r.links.len(),
            r.maps
        );
    } else if !pins_outlive {
        warn!(
            "berth stopped: the dataplane on {} goes with this mount namespace (its pins under \
             {} were private to it)",
            ifaces.join(", "),
            pin_root.display()
        );
    } else {
        info!(
            "berth stopped: the dataplane keeps serving on {} (pinned under {}; `berth down \
             --pin-path {}` detaches it)",
            ifaces.join(", "),
            pin_root.display(),
            pin_root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(ifaces: &[&str]) -> Overrides {
        Overrides {
            ifaces: ifaces.iter().map(|s| (*s).to_owned()).collect(),
            pin_path: None,
            cgroup: None,
            detach_on_exit: false,
            metrics_listen: None,
            no_metrics: false,
            no_readiness_probe: false,
        }
    }

    #[test]
    fn refusals_name_their_kind_before_the_kernel_is_touched() {
        let missing = Source {
            path: "/nonexistent/berth.toml".into(),
            format: Format::Berth,
        };
        let r = prepare(Some(missing), overrides(&["lo"]), "/x.sock".into());
        assert!(
            matches!(&r, Err(Refused::Config(p, _)) if p.ends_with("berth.toml")),
            "{:?}",
            r.err()
        );
        let mut o = overrides(&["lo"]);
        o.cgroup = Some("relative/dir".into());
        let r = prepare(None, o, "/x.sock".into());
        assert!(
            matches!(&r, Err(Refused::CommandLine(e)) if e.field == "dataplane.cgroup"),
            "{:?}",
            r.err()
        );
        let mut o = overrides(&["lo"]);
        o.metrics_listen = Some("localhost".into());
        let r = prepare(None, o, "/x.sock".into());
        assert!(
            matches!(&r, Err(Refused::CommandLine(e)) if e.field == "metrics.listen"),
            "{:?}",
            r.err()
        );
        let r = prepare(None, overrides(&["nosuchif0"]), "/x.sock".into());
        assert!(
            matches!(&r, Err(Refused::Host(e)) if e.to_string().contains("nosuchif0")),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn the_command_line_goes_over_the_config() {
        let mut o = overrides(&["lo"]);
        o.pin_path = Some("/sys/fs/bpf/elsewhere".into());
        o.cgroup = Some("none".into());
        o.detach_on_exit = true;
        o.metrics_listen = Some("127.0.0.1:19477".into());
        o.no_readiness_probe = true;
        // Whether `lo` forwards IPv4 depends on the host running the test: the forwarding check
        // may refuse it, but the command line itself must pass.
        match prepare(None, o, "/x.sock".into()) {
            Ok(run) => {
                assert_eq!(run.cfg.dataplane.pin_path, "/sys/fs/bpf/elsewhere");
                assert_eq!(run.cfg.dataplane.cgroup_target(), Cgroup::None);
                assert!(run.cfg.dataplane.detach_on_exit);
                assert_eq!(run.cfg.metrics.listen, "127.0.0.1:19477");
                assert!(!run.cfg.docker.readiness_probe);
                assert_eq!(run.ifaces, ["lo"]);
                assert!(run.source.is_none() && run.services.is_empty());
            }
            Err(Refused::Host(e)) => assert!(e.to_string().contains("forwarding"), "{e:#}"),
            Err(e) => panic!("{e:?}"),
        }
    }
}
