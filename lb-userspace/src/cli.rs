//! The command line: `berth run | down | check-config | status | completions`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lb_userspace::{api::admin, logging::LogFormat};

#[derive(Parser)]
#[command(
    name = "berth",
    // `berth --version`: "berth 0.1.0 (git <rev>)"; the revision comes from build.rs.
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("BERTH_GIT_REV"), ")"),
    about = "Kernel-accelerated L4 load balancer for Docker hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Admin socket `berth status` talks to (root only); also from `BERTH_ADMIN_SOCKET`.
        #[arg(long, env = "BERTH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
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
        /// Address to serve `/metrics` on; replaces `metrics.listen` (in every mode: a Synapse
        /// config has no `[metrics]` of its own).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<String>,
        /// Serve no metrics; replaces `metrics.enabled`.
        #[arg(long, conflicts_with = "metrics_listen")]
        no_metrics: bool,
        /// Pool a new container as soon as it runs, without waiting until it accepts TCP
        /// connections; sets `docker.readiness_probe = false` (in every mode).
        #[arg(long)]
        no_readiness_probe: bool,
        /// Log lines as text, or as one JSON object per line (for log shippers). `RUST_LOG`
        /// filters either (default: info).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Keep this Docker host's containers in etcd (`[[publish.service]]` of the config), under a
    /// lease refreshed while it runs, for balancers watching those prefixes. SIGTERM/SIGINT
    /// withdraw them.
    Publish {
        /// TOML config file with `[etcd]` and `[publish]`, and the Docker Engines as for `berth
        /// run` (`[[docker.engine]]`, `[docker] socket`, else `DOCKER_HOST` as the docker CLI).
        #[arg(long, short)]
        config: PathBuf,
        /// This host's address as the balancers reach it; replaces `publish.address`. Default:
        /// the address towards the default gateway.
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
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
        /// The admin socket of the daemon to ask (the one it was started with); also from
        /// `BERTH_ADMIN_SOCKET`.
        #[arg(long, env = "BERTH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Print a shell completion script (e.g. `berth completions bash > /etc/bash_completion.d/berth`).
    Completions { shell: clap_complete::Shell },
}
