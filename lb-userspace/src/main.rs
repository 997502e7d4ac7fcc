//! `berth`: the daemon and its CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    api::admin,
    config::{Cgroup, Config, ConfigError, Service},
    dataplane::{Dataplane, DataplaneOptions, monotonic_ns},
    discovery,
    health::{NetChecker, Supervisor},
    reconciler::Reconciler,
    status,
};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

/// Exit code for a bad configuration or command line (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Kernel-accelerated L4 load balancer for Docker hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the dataplane, attach it and serve the configured services until SIGTERM/SIGINT.
    /// SIGHUP re-reads the config file.
    Run {
        /// TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// An Airbnb Synapse config (JSON) to serve instead, mapped onto berth services.
        #[arg(long, conflicts_with = "config")]
        synapse_config: Option<PathBuf>,
        /// Interface to attach to (repeatable); replaces `dataplane.interfaces`. Default: the
        /// interface of the default route.
        #[arg(long = "iface", short = 'i')]
        ifaces: Vec<String>,
        /// Admin socket `berth status` talks to (root only).
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        /// bpffs directory to pin the dataplane under; replaces `dataplane.pin_path`.
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// cgroup v2 directory for the socket programs ("auto", "none" or a path); replaces
        /// `dataplane.cgroup`.
        #[arg(long)]
        cgroup: Option<String>,
        /// Detach and unpin everything on SIGTERM/SIGINT (default: leave the dataplane serving
        /// for the next berth).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Detach a pinned dataplane left by a stopped berth and remove its pins (established flows
    /// through it are dropped).
    Down {
        #[arg(long, default_value = lb_userspace::dataplane::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Validate a config file and print what it would serve.
    CheckConfig {
        file: PathBuf,
        /// The file is a Synapse config (JSON).
        #[arg(long)]
        synapse: bool,
    },
    /// Show what the running daemon serves: services, backends, health, flows, packets.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, synapse } => check_config(&Source {
            path: file,
            synapse,
        }),
        Command::Status { json, admin_socket } => match admin::query(&admin_socket) {
            Ok(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{}", status::render(&s));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth status: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Down { pin_path } => match lb_userspace::dataplane::down(&pin_path) {
            Ok(r) if r.links.is_empty() && r.maps == 0 => {
                println!("berth down: nothing pinned under {}", pin_path.display());
                ExitCode::SUCCESS
            }
            Ok(r) => {
                println!(
                    "berth down: detached {} ({}), removed {} maps under {}",
                    r.links.len(),
                    r.links.join(", "),
                    r.maps,
                    pin_path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth down: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            synapse_config,
            ifaces,
            admin_socket,
            pin_path,
            cgroup,
            detach_on_exit,
        } => {
            let config = match (config, synapse_config) {
                (Some(path), _) => Some(Source {
                    path,
                    synapse: false,
                }),
                (None, Some(path)) => Some(Source {
                    path,
                    synapse: true,
                }),
                (None, None) => None,
            };
            // Everything that can be wrong with the input is found before the kernel is touched.
            let (mut cfg, services) = match &config {
                Some(src) => match read_config(src) {
                    Ok(v) => v,
                    Err(e) => return config_failure(&src.path, &e),
                },
                None => (Config::default(), Vec::new()),
            };
            if let Some(p) = pin_path {
                cfg.dataplane.pin_path = p.display().to_string();
            }
            if let Some(c) = cgroup {
                cfg.dataplane.cgroup = c;
            }
            cfg.dataplane.detach_on_exit |= detach_on_exit;
            if let Err(e) = cfg.validate() {
                eprintln!("berth: invalid command line: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            let ifaces = if !ifaces.is_empty() {
                ifaces
            } else if !cfg.dataplane.interfaces.is_empty() {
                cfg.dataplane.interfaces.clone()
            } else {
                match default_route_iface() {
                    // With Docker discovery, containers on the default bridge are reached
                    // through docker0: attach there too (other networks: name them).
                    Ok(i)
                        if docker_enabled(&cfg, config.is_some())
                            && std::path::Path::new("/sys/class/net/docker0").exists() =>
                    {
                        vec![i, "docker0".to_owned()]
                    }
                    Ok(i) => vec![i],
                    Err(e) => {
                        error!("{e:#}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            if let Err(e) = preflight(&ifaces, cfg.dataplane.redirect) {
                error!("{e:#}");
                return ExitCode::FAILURE;
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!("starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config, cfg, services, ifaces, admin_socket)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Where the configuration comes from: berth's TOML, or a Synapse JSON config.
#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    synapse: bool,
}

fn read_config(src: &Source) -> Result<(Config, Vec<Service>), ConfigError> {
    let text = std::fs::read_to_string(&src.path).map_err(|e| ConfigError {
        field: src.path.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    if !src.synapse {
        return Config::load(&text);
    }
    let imported = lb_userspace::synapse::import(&text)?;
    for w in &imported.warnings {
        warn!("synapse config: {w}");
    }
    let services = imported.config.validate()?;
    Ok((imported.config, services))
}

fn config_failure(path: &std::path::Path, e: &ConfigError) -> ExitCode {
    eprintln!("berth: invalid config {}: {e}", path.display());
    ExitCode::from(EXIT_CONFIG)
}

fn check_config(src: &Source) -> ExitCode {
    let path = &src.path;
    match read_config(src) {
        Ok((cfg, services)) => {
            println!("{}: ok, {} services", path.display(), services.len());
            for s in &services {
                println!(
                    "  {} {} {} -> {} backends",
                    s.name,
                    s.protocol,
                    s.listen,
                    s.backends.len()
                );
            }
            for s in &cfg.services {
                if let Some(d) = &s.docker {
                    println!(
                        "  {}: containers of image {} (labels {:?}) on port {}",
                        s.name,
                        d.image.as_deref().unwrap_or("any"),
                        d.labels,
                        d.port
                    );
                }
            }
            if !cfg.dataplane.interfaces.is_empty() {
                println!("  interfaces: {}", cfg.dataplane.interfaces.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => config_failure(path, &e),
    }
}

/// Whether to watch Docker: as configured, else when a service selects containers or berth runs
/// without a config file (label-driven services).
fn docker_enabled(cfg: &Config, has_file: bool) -> bool {
    cfg.docker
        .enabled
        .unwrap_or(!has_file || cfg.services.iter().any(|s| s.docker.is_some()))
}

/// The interface of the IPv4 default route (from /proc/net/route).
fn default_route_iface() -> anyhow::Result<String> {
    let routes = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    for line in routes.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" {
            return Ok(f[0].to_owned());
        }
    }
    bail!("no IPv4 default route: name the interface(s) with --iface or dataplane.interfaces")
}

/// Checks that every interface exists and, when berth routes packets itself, that IPv4
/// forwarding is on for it (the kernel's FIB lookup refuses to route otherwise).
fn preflight(ifaces: &[String], redirect: bool) -> anyhow::Result<()> {
    for iface in ifaces {
        let dir = PathBuf::from("/proc/sys/net/ipv4/conf").join(iface);
        if !dir.exists() {
            bail!("interface {iface:?} does not exist (or has no IPv4 configuration)");
        }
        if redirect {
            let fwd = std::fs::read_to_string(dir.join("forwarding"))
                .with_context(|| format!("reading IPv4 forwarding setting of {iface}"))?;
            if fwd.trim() != "1" {
                bail!(
                    "IPv4 forwarding is off on {iface}: berth forwards translated packets to \
                     backends and needs it (`sysctl -w net.ipv4.conf.all.forwarding=1`; Docker \
                     hosts have it on), or set dataplane.redirect = false"
                );
            }
        }
    }
    Ok(())
}

async fn run(
    path: Option<Source>,
    cfg: Config,
    services: Vec<Service>,
    ifaces: Vec<String>,
    admin_socket: PathBuf,
) -> anyhow::Result<()> {
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
    let options = DataplaneOptions::from_config(&cfg.dataplane);
    let pin_root = PathBuf::from(&cfg.dataplane.pin_path);
    let mut dp = Dataplane::load_pinned(options, &pin_root).context("loading the dataplane")?;
    let adopted = dp.adopted();
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
                let _ = lb_userspace::dataplane::down(&pin_root);
            }
            return Err(e);
        }
    };
    let rec = if adopted {
        Reconciler::adopt(dp).context("reading the pinned dataplane")?
    } else {
        Reconciler::new(dp)
    };
    run_loop(
        path,
        cfg,
        services,
        ifaces,
        admin_socket,
        (admin, metrics_listener),
        rec,
        adopted,
        pin_root,
    )
    .await
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
    let cgroup = match cfg.dataplane.cgroup_target() {
        Cgroup::None => None,
        Cgroup::Auto => Some(lb_userspace::dataplane::cgroup2_root().context(
            "no cgroup v2 hierarchy is mounted: mount one, or set dataplane.cgroup = \"none\" \
             (clients on this host are then not balanced)",
        )?),
        Cgroup::Path(p) => Some(p),
    };
    if let Some(cg) = &cgroup {
        dp.attach_cgroup(cg)
            .with_context(|| format!("balancing the sockets of cgroup {}", cg.display()))?;
    }
    if let Err(e) = dp.sync_local_addrs(&lb_userspace::dataplane::host_ipv4_addrs()) {
        warn!("recording this host's addresses, retrying in 1 s: {e}");
    }
    Ok(ifaces)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the daemon's state, handed over once"
)]
async fn run_loop(
    path: Option<Source>,
    cfg: Config,
    services: Vec<Service>,
    ifaces: Vec<String>,
    admin_socket: PathBuf,
    listeners: (tokio::net::UnixListener, Option<tokio::net::TcpListener>),
    mut rec: Reconciler,
    adopted: bool,
    pin_root: PathBuf,
) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let options = *rec.dataplane().options();
    let (admin, metrics_listener) = listeners;
    let mut docker_events = 0u64;
    // Bridges tried and failed (reported once).
    let mut unattachable = std::collections::HashSet::new();
    let mut discovery_lag: Option<f64> = None;
    let has_file = path.is_some();
    let mut cfg = cfg;
    let mut configured = services;
    let mut containers = std::collections::BTreeMap::new();
    let mut reported = std::collections::HashSet::new();
    let mut desired = configured.clone();
    let (health_tx, mut health_rx) = tokio::sync::mpsc::channel(256);
    let mut health = Supervisor::new(NetChecker, health_tx);
    health.presume_healthy(rec.pinned_backends());
    health.sync(&desired);
    // An adopted dataplane keeps serving what it has until Docker's first listing says which
    // containers are still there: applying the config alone would drop every container backend
    // for that moment.
    let docker_on = docker_enabled(&cfg, has_file);
    let mut holding = adopted && docker_on;
    let started = std::time::Instant::now();
    let mut pending = if holding {
        info!("keeping the pinned services as they are until Docker's first listing");
        true
    } else {
        apply(&mut rec, &health.filter(&desired), "config")
    };

    let (docker_tx, mut docker_rx) = tokio::sync::mpsc::channel(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The metrics task asks this loop for a snapshot's inputs when its page is stale.
    let (metrics_tx, mut metrics_rx) =
        tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<MetricsInputs>>(1);
    if let Some(listener) = metrics_listener {
        let cache = lb_userspace::metrics::Cache::new(
            Duration::from_secs(cfg.metrics.refresh_interval_secs),
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
        tokio::spawn(lb_userspace::metrics::serve(
            listener,
            std::sync::Arc::new(cache),
            stop_rx.clone(),
        ));
    } else {
        drop(metrics_tx);
    }
    if docker_on {
        let label_services = cfg.docker.label_services.unwrap_or(!has_file);
        info!(
            "docker discovery on {} (label services {})",
            cfg.docker.socket,
            if label_services { "on" } else { "off" }
        );
        tokio::spawn(discovery::run(
            cfg.docker.socket.clone(),
            docker_tx,
            stop_rx,
        ));
    } else {
        drop(docker_tx);
    }
    let backends: usize = desired.iter().map(|s| s.backends.len()).sum();
    info!(
        "berth ready: attached to {}; {} services, {backends} backends; maglev M={}, conntrack {}",
        ifaces.join(", "),
        desired.len(),
        options.maglev_size,
        options.conntrack_size
    );

    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut warned_hold = false;
    // The sweep walks the whole map with two syscalls per entry, so it runs rarely: the program
    // already ignores expired entries and the LRU reclaims space when the map is full.
    let mut gc = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                let Some(path) = &path else {
                    warn!("SIGHUP: no config file to reload");
                    continue;
                };
                match read_config(path) {
                    Err(e) => error!(
                        "config reload failed, keeping the running config: {}: {e}",
                        path.path.display()
                    ),
                    Ok((new_cfg, new_services)) => {
                        let mut running = cfg.dataplane.clone();
                        running.interfaces.clone_from(&new_cfg.dataplane.interfaces);
                        if new_cfg.dataplane != running || new_cfg.docker != cfg.docker {
                            warn!(
                                "config reload: [dataplane] and [docker] changes take effect on \
                                 restart only"
                            );
                        }
                        let docker = cfg.docker.clone();
                        cfg = new_cfg;
                        cfg.docker = docker;
                        configured = new_services;
                        desired = with_containers(&cfg, &configured, &containers, has_file, &mut reported);
                        health.sync(&desired);
                        pending = holding
                            || apply(&mut rec, &health.filter(&desired), "config reload");
                        info!("config reloaded: {} services", desired.len());
                    }
                }
            }
            Some(event) = docker_rx.recv() => {
                let why = match &event {
                    discovery::Event::Snapshot(all) => {
                        containers = all.iter().map(|c| (c.id.clone(), c.clone())).collect();
                        holding = false;
                        "docker: resync".to_owned()
                    }
                    discovery::Event::Upsert(c, _) => {
                        let why = format!(
                            "docker: container {} {}",
                            c.name,
                            if c.serving() { "serving" } else if c.running { "unhealthy" } else { "stopped" }
                        );
                        containers.insert(c.id.clone(), c.clone());
                        why
                    }
                    discovery::Event::Remove(id, _) => {
                        let name = containers.remove(id).map_or_else(|| id.clone(), |c| c.name);
                        format!("docker: container {name} gone")
                    }
                };
                desired = with_containers(&cfg, &configured, &containers, has_file, &mut reported);
                health.sync(&desired);
                pending = holding || apply(&mut rec, &health.filter(&desired), &why);
                // Replies from containers arrive on their network's bridge: attach there too.
                for br in discovery::backend_bridges(&desired, &containers) {
                    if rec.dataplane().attached().contains(&br) || !unattachable.insert(br.clone()) {
                        continue;
                    }
                    let attached = preflight(std::slice::from_ref(&br), cfg.dataplane.redirect)
                        .and_then(|()| rec.dataplane_mut().attach(&br).map_err(anyhow::Error::from));
                    match attached {
                        Ok(_) => {
                            unattachable.remove(&br);
                            info!("attached to {br} (bridge of a Docker network with backends)");
                        }
                        Err(e) => warn!(
                            "cannot attach to {br}: {e:#}; replies of the containers behind it will not be translated"
                        ),
                    }
                }
                if let discovery::Event::Upsert(_, Some(t)) | discovery::Event::Remove(_, Some(t)) = event {
                    docker_events += 1;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i64)
                        .unwrap_or(t);
                    discovery_lag = Some((now - t).max(0) as f64 / 1e9);
                }
            }
            Some(reply) = metrics_rx.recv() => {
                // Cheap map reads here; the conntrack walk runs in the metrics task.
                let _ = reply.send(MetricsInputs {
                    status: build_status(&rec, &health, &desired, &containers),
                    reader: rec.dataplane().conntrack_reader(),
                    extra: lb_userspace::metrics::Extra {
                        conntrack_capacity: u64::from(options.conntrack_size),
                        docker_events,
                        discovery_lag_seconds: discovery_lag,
                        ..Default::default()
                    },
                });
            }
            Ok((conn, _)) = admin.accept() => {
                let mut s = build_status(&rec, &health, &desired, &containers);
                let reader = rec.dataplane().conntrack_reader();
                // The conntrack walk runs off the event loop, and only for a valid request.
                tokio::spawn(admin::answer(conn, async move {
                    let entries = walk_conntrack(reader).await;
                    fill_active_flows(&mut s, &entries);
                    s
                }));
            }
            Some(change) = health_rx.recv() => {
                if !health.record(&change) {
                    continue; // a check stopped by a reload
                }
                let why = match &change.reason {
                    None => "health check passing".to_owned(),
                    Some(r) => format!("health check failing: {r}"),
                };
                pending = holding || apply(&mut rec, &health.filter(&desired), &why);
            }
            _ = retry.tick() => {
                if holding && started.elapsed() > Duration::from_secs(10) && !std::mem::replace(&mut warned_hold, true) {
                    warn!("Docker has not answered for 10 s: the pinned services keep serving as they were until it does");
                }
                if pending && !holding {
                    pending = apply(&mut rec, &health.filter(&desired), "retry");
                }
                if let Err(e) = rec.dataplane_mut().sync_local_addrs(&lb_userspace::dataplane::host_ipv4_addrs()) {
                    warn!("recording this host's addresses, retrying in 1 s: {e}");
                }
                let drain = Duration::from_secs(cfg.dataplane.drain_timeout_secs);
                if let Err(e) = rec.purge_drained(std::time::Instant::now(), drain) {
                    warn!("purging drained backends, retrying in 1 s: {e:#}");
                }
            }
            _ = gc.tick() => {
                // Off the event loop: a full walk costs two syscalls per entry.
                match rec.dataplane().conntrack_reader() {
                    Ok(mut r) => {
                        tokio::task::spawn_blocking(move || match r.gc(monotonic_ns()) {
                            Ok(0) => {}
                            Ok(n) => log::debug!("conntrack gc: removed {n} expired entries"),
                            Err(e) => warn!("conntrack gc: {e}"),
                        });
                    }
                    Err(e) => warn!("conntrack gc: {e}"),
                }
            }
        }
    }

    health.stop();
    let _ = stop_tx.send(true);
    let _ = std::fs::remove_file(&admin_socket);
    let dp = rec.into_dataplane();
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
    if cfg.dataplane.detach_on_exit {
        let r = lb_userspace::dataplane::down(&pin_root)
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

/// The configured services plus what the containers add; problems with containers (bad labels,
/// no address) are logged once each.
fn with_containers(
    cfg: &Config,
    configured: &[Service],
    containers: &std::collections::BTreeMap<String, discovery::ContainerInfo>,
    has_file: bool,
    reported: &mut std::collections::HashSet<String>,
) -> Vec<Service> {
    let label_services = cfg.docker.label_services.unwrap_or(!has_file);
    let (services, problems) = discovery::services(
        configured,
        &cfg.selectors(),
        containers,
        label_services,
        &discovery::host_ports(),
    );
    for p in problems {
        if reported.insert(p.clone()) {
            warn!("{p}");
        }
    }
    services
}

/// What `berth status` shows: every configured or discovered backend, in the pool or not.
fn build_status(
    rec: &Reconciler,
    health: &Supervisor<NetChecker>,
    desired: &[Service],
    containers: &std::collections::BTreeMap<String, discovery::ContainerInfo>,
) -> status::Status {
    use std::collections::HashMap;
    let dp = rec.dataplane();
    // By address and protocol, not by name: after a restart the adopted services carry
    // placeholder names until the first apply claims them (which waits for Docker's first
    // listing), and their counters are the pinned totals all the same.
    let applied: HashMap<_, _> = rec
        .state()
        .into_iter()
        .map(|s| ((s.listen, s.protocol), s))
        .collect();
    let container_of = |addr: &std::net::SocketAddrV4| {
        containers
            .values()
            .find(|c| c.networks.values().any(|ip| ip == addr.ip()))
            .map(|c| c.name.clone())
    };
    let services = desired
        .iter()
        .map(|s| {
            let pool = applied.get(&(s.listen, s.protocol));
            let backends = s
                .backends
                .iter()
                .map(|(addr, weight)| {
                    let id =
                        pool.and_then(|p| p.backends.iter().find(|b| b.0 == *addr).map(|b| b.1));
                    let c = id
                        .and_then(|id| dp.backend_counters(id).ok())
                        .unwrap_or_default();
                    status::BackendStatus {
                        address: addr.to_string(),
                        container: container_of(addr),
                        health: match health.state(&s.name, *addr) {
                            None => "unchecked",
                            Some(true) => "healthy",
                            Some(false) => "unhealthy",
                        }
                        .into(),
                        weight: *weight,
                        in_pool: id.is_some(),
                        // Filled in by `fill_active_flows`, off the event loop.
                        active_flows: 0,
                        packets: c.packets,
                        bytes: c.bytes,
                        new_flows: c.new_flows,
                    }
                })
                .collect();
            status::ServiceStatus {
                name: s.name.clone(),
                listen: s.listen.to_string(),
                protocol: s.protocol.to_string(),
                backends,
            }
        })
        .collect();
    let counters = dp
        .reason_counters()
        .map(|v| {
            v.into_iter()
                .map(|(r, n)| (r.name().to_owned(), n))
                .collect()
        })
        .unwrap_or_default();
    status::Status { services, counters }
}

/// What a metrics page is made of, taken on the event loop.
struct MetricsInputs {
    status: status::Status,
    reader:
        Result<lb_userspace::dataplane::ConntrackReader, lb_userspace::dataplane::DataplaneError>,
    extra: lb_userspace::metrics::Extra,
}

impl MetricsInputs {
    /// Walks conntrack (on a blocking thread) and renders the page.
    async fn render(mut self) -> String {
        let entries = walk_conntrack(self.reader).await;
        fill_active_flows(&mut self.status, &entries);
        self.extra.conntrack_entries = entries.len() as u64;
        self.extra.conntrack_walks = lb_userspace::dataplane::conntrack_walks();
        lb_userspace::metrics::render(self.status, self.extra)
    }
}

/// Every conntrack entry, read on a blocking thread (empty, with a warning, if that fails).
async fn walk_conntrack(
    reader: Result<
        lb_userspace::dataplane::ConntrackReader,
        lb_userspace::dataplane::DataplaneError,
    >,
) -> Vec<(lb_common::FlowKey, lb_common::CtEntry)> {
    match reader {
        Ok(r) => tokio::task::spawn_blocking(move || r.entries())
            .await
            .unwrap_or_default(),
        Err(e) => {
            warn!("reading conntrack: {e}");
            Vec::new()
        }
    }
}

/// Sets each backend's active flows: its open forward conntrack entries.
fn fill_active_flows(s: &mut status::Status, entries: &[(lb_common::FlowKey, lb_common::CtEntry)]) {
    let mut flows: std::collections::HashMap<(u32, u16), u64> = Default::default();
    for (_, e) in entries {
        if e.dir == lb_common::ct::DIR_FORWARD && e.state == lb_common::ct::STATE_OPEN {
            *flows.entry((e.nat_addr, e.nat_port)).or_default() += 1;
        }
    }
    for b in s.services.iter_mut().flat_map(|s| s.backends.iter_mut()) {
        if let Ok(addr) = b.address.parse::<std::net::SocketAddrV4>() {
            let key = (
                lb_common::ipv4_to_wire(addr.ip().octets()),
                lb_common::port_to_wire(addr.port()),
            );
            b.active_flows = flows.get(&key).copied().unwrap_or(0);
        }
    }
}

/// Applies `desired`; on failure logs it and returns true so the caller retries.
fn apply(rec: &mut Reconciler, desired: &[Service], why: &str) -> bool {
    match rec.apply(desired, why) {
        Ok(_) => false,
        Err(e) => {
            error!("applying services failed, retrying in 1 s: {e:#}");
            true
        }
    }
}
