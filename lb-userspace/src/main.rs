//! `berth`: the CLI. Parses the command line, runs the subcommand and turns its outcome into
//! an exit code (64 for a bad config or command line, before the kernel is touched).

mod cli;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser as _;
use cli::{Cli, Command};
use lb_userspace::logging::LogFormat;
use lb_userspace::{
    api::{admin, status},
    config::ConfigError,
    daemon::{self, Format, Source},
};
use tracing::error;

/// Exit code for a bad configuration or command line (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    lb_userspace::logging::init(match &cli.command {
        Command::Run { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    });
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "berth", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file, synapse } => check_config(&Source {
            path: file,
            format: if synapse {
                Format::Synapse
            } else {
                Format::Berth
            },
        }),
        Command::Status { json, admin_socket } => show_status(&admin_socket, json),
        Command::Down { pin_path } => down(&pin_path),
        Command::Publish { config, address } => publish(&config, address),
        Command::Run {
            config,
            synapse_config,
            ifaces,
            admin_socket,
            pin_path,
            cgroup,
            detach_on_exit,
            metrics_listen,
            no_metrics,
            no_readiness_probe,
            log_format: _,
        } => {
            let source = match (config, synapse_config) {
                (Some(path), _) => Some(Source {
                    path,
                    format: Format::Berth,
                }),
                (None, Some(path)) => Some(Source {
                    path,
                    format: Format::Synapse,
                }),
                (None, None) => None,
            };
            let overrides = daemon::Overrides {
                ifaces,
                pin_path,
                cgroup,
                detach_on_exit,
                metrics_listen,
                no_metrics,
                no_readiness_probe,
            };
            run(source, overrides, admin_socket)
        }
    }
}

/// `berth run`: everything that can be wrong with the input is found before the kernel is
/// touched (exit 64 for the config or command line), then the daemon runs until a signal.
fn run(source: Option<Source>, overrides: daemon::Overrides, admin_socket: PathBuf) -> ExitCode {
    let run = match daemon::prepare(source, overrides, admin_socket) {
        Ok(run) => run,
        Err(daemon::Refused::Config(path, e)) => return config_failure(&path, &e),
        Err(daemon::Refused::CommandLine(e)) => {
            eprintln!("berth: invalid command line: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(daemon::Refused::Environment(e)) => {
            eprintln!("berth: invalid Docker environment: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(daemon::Refused::Host(e)) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(daemon::run(run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `berth status`: asks the daemon over its admin socket.
fn show_status(admin_socket: &Path, json: bool) -> ExitCode {
    match admin::query(admin_socket) {
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
            if !admin_socket.exists() {
                eprintln!(
                    "berth status: no socket at {}: a berth started with --admin-socket PATH is \
                     asked with `berth status --admin-socket PATH` (or BERTH_ADMIN_SOCKET=PATH)",
                    admin_socket.display()
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// `berth publish`: a bad config exits 64, before anything is written.
fn publish(path: &Path, address: Option<std::net::Ipv4Addr>) -> ExitCode {
    let src = Source {
        path: path.to_owned(),
        format: Format::Berth,
    };
    let checked = daemon::read_config(&src).and_then(|(cfg, _)| {
        if cfg.publish.services.is_empty() {
            return Err(ConfigError {
                field: "publish.service".into(),
                message: "nothing to publish: add [[publish.service]] entries".into(),
            });
        }
        let connect = lb_userspace::discovery::etcd::Connect::from_config(&cfg.etcd)?;
        // The daemon's engines: `[[docker.engine]]`, `[docker] socket`, else DOCKER_HOST.
        let engines = daemon::engines(&cfg)?;
        Ok((cfg, connect, engines))
    });
    let (cfg, connect, engines) = match checked {
        Ok(c) => c,
        Err(e) => return config_failure(path, &e),
    };
    // Where this host's engines' containers are announced. Needed at once when an engine is a
    // Unix socket (always this host); a TCP engine turns out to be this host only when its
    // watcher connects, and is then refused on its own if the address is unknown.
    let host_address = match address.map_or_else(
        || match &cfg.publish.address {
            Some(a) => a.parse().map_err(anyhow::Error::from),
            None => daemon::host::default_route_address(),
        },
        Ok,
    ) {
        Ok(a) => Some(a),
        Err(e)
            if engines
                .iter()
                .any(|c| matches!(c.engine.endpoint, lb_userspace::config::Endpoint::Unix(_))) =>
        {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
        Err(_) => None,
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(lb_userspace::publish::run(
            cfg.publish,
            engines,
            connect,
            host_address,
            std::time::Duration::from_secs(cfg.docker.grace_secs),
            stop_rx,
        ));
        let (Ok(mut term), Ok(mut int)) = (
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        ) else {
            error!("installing signal handlers");
            return ExitCode::FAILURE;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        ExitCode::SUCCESS
    })
}

/// `berth down`: detaches a pinned dataplane and removes its pins.
fn down(pin_path: &Path) -> ExitCode {
    match lb_userspace::dataplane::down(pin_path) {
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
    }
}

fn config_failure(path: &Path, e: &ConfigError) -> ExitCode {
    eprintln!("berth: invalid config {}: {e}", path.display());
    ExitCode::from(EXIT_CONFIG)
}

/// `berth check-config`: validates the file and prints what it would serve.
fn check_config(src: &Source) -> ExitCode {
    let path = &src.path;
    let read = daemon::read_config(src).and_then(|(cfg, services)| {
        if cfg.etcd_enabled() {
            // The TLS and password files must be readable too.
            lb_userspace::discovery::etcd::Connect::from_config(&cfg.etcd)?;
        }
        Ok((cfg, services))
    });
    match read {
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
            for s in &cfg.services {
                if let Some(e) = &s.etcd {
                    println!(
                        "  {}: backends under etcd prefix {} at {}",
                        s.name,
                        e.prefix,
                        cfg.etcd.endpoints.join(", ")
                    );
                }
            }
            if !cfg.dataplane.interfaces.is_empty() {
                println!("  interfaces: {}", cfg.dataplane.interfaces.join(", "));
            }
            if daemon::docker_enabled(&cfg, true) {
                match daemon::engines(&cfg) {
                    Ok(engines) => {
                        for e in &engines {
                            println!(
                                "  docker engine {}: {}{}",
                                e.name(),
                                e.engine.endpoint,
                                if e.engine.tls.is_some() { " (TLS)" } else { "" }
                            );
                        }
                    }
                    Err(e) => return config_failure(path, &e),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => config_failure(path, &e),
    }
}

/// The single-threaded runtime `run` and `publish` work on (None: said why).
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| error!("starting the runtime: {e}"))
        .ok()
}
