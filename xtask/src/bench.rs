//! What `cargo xtask bench` needs beyond `setup`: the peers and tools of the macro benchmark
//! (`berth-loadbench`), installed only when missing, so a second run only checks.
//!
//! - `wrk` (load generator), `haproxy` (peer), `nginx-light` or else `nginx` (backends),
//!   `nftables` (peer: kernel DNAT) and `util-linux` (`taskset`, `nsenter`).
//! - Debian's nginx and haproxy packages start their daemon from the postinst script unless
//!   `policy-rc.d` forbids it. The benchmark runs its own instances inside namespaces, so any
//!   daemon the install started (a process named nginx or haproxy that was not there before) is
//!   stopped again.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// (binary that proves the tool is there, Debian packages to try in order).
const TOOLS: &[(&str, &[&str])] = &[
    ("/usr/bin/wrk", &["wrk"]),
    ("/usr/sbin/haproxy", &["haproxy"]),
    ("/usr/sbin/nginx", &["nginx-light", "nginx"]),
    ("/usr/sbin/nft", &["nftables"]),
    ("/usr/bin/taskset", &["util-linux"]),
    ("/usr/bin/nsenter", &["util-linux"]),
];

/// Process names of the daemons a package install may start.
const DAEMONS: &[&str] = &["nginx", "haproxy"];

/// Installs whatever the macro benchmark lacks; checks only (a few stats) when all is there.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&(&str, &[&str])> = TOOLS
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .collect();
    if missing.is_empty() {
        eprintln!("setup: bench tools wrk haproxy nginx nft taskset nsenter ok (present)");
        return Ok(());
    }
    let t = Instant::now();
    let before = daemon_pids();
    let result = install(&missing);
    // Even after a failed install a postinst may have started something.
    stop_new_daemons(&before);
    result?;
    if let Some((bin, _)) = TOOLS.iter().find(|(bin, _)| !Path::new(bin).exists()) {
        bail!("{bin} is still missing after the install");
    }
    eprintln!(
        "setup: bench tools installed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn install(missing: &[&(&str, &[&str])]) -> Result<()> {
    apt(&["update", "-q"])?;
    // First choice of each missing tool, all in one apt-get run.
    let mut first: Vec<&str> = missing.iter().map(|(_, pkgs)| pkgs[0]).collect();
    first.sort_unstable();
    first.dedup();
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&first);
    if apt(&args).is_ok() {
        return Ok(());
    }
    // One of them failed (e.g. nginx-light gone from a newer release): each alone, with its
    // fallbacks.
    for (bin, pkgs) in missing {
        if Path::new(bin).exists() {
            continue;
        }
        let ok = pkgs.iter().any(|p| {
            apt(&["install", "-y", "-q", "--no-install-recommends", p])
                .inspect_err(|e| eprintln!("setup: {e:#}"))
                .is_ok()
        });
        if !ok {
            bail!("could not install any of {pkgs:?} (for {bin})");
        }
    }
    Ok(())
}

fn apt(args: &[&str]) -> Result<()> {
    let mut c = Command::new("apt-get");
    c.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null());
    let st = c.status().with_context(|| format!("starting {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed ({st})");
    }
    Ok(())
}

/// Pids of running processes whose name is one of `DAEMONS`.
fn daemon_pids() -> BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| DAEMONS.contains(&c.trim()))
        })
        .collect()
}

/// Stops daemons that appeared since `before` (started by the packages' postinst scripts).
fn stop_new_daemons(before: &BTreeSet<i32>) {
    let new: Vec<i32> = daemon_pids().difference(before).copied().collect();
    if new.is_empty() {
        return;
    }
    eprintln!("setup: stopping daemons started by the package install: pids {new:?}");
    for sig in ["TERM", "KILL"] {
        for pid in &new {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && new
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
