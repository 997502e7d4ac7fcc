//! Idempotent installation of everything the project needs, checking before installing:
//! the pinned Rust toolchain with `rust-src`, bpf-linker built against that toolchain's own LLVM,
//! the Debian packages the tests use, and (on request) Docker Engine and docker-compose.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// `openssl`: the multi-engine tests make the TLS engine's certificates with it.
const PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "tcpdump",
    "procps",
    // etcd-client's build script compiles etcd's gRPC API with `protoc`, which needs the
    // well-known types (google/protobuf/*.proto) of libprotobuf-dev.
    "protobuf-compiler",
    "libprotobuf-dev",
    // ring (TLS to etcd) compiles C: the static image's build needs a musl C compiler.
    "musl-tools",
    "openssl",
    // The CLI tests trace a refused `berth run` to prove it made no bpf(2) call.
    "strace",
];

/// etcd (server and `etcdctl`) for the tests and benchmarks of etcd discovery.
const ETCD_PACKAGES: &[&str] = &["etcd-server", "etcd-client"];

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with the cargo bin directory in front (bpf-linker is installed there).
pub fn path_with_cargo_bin() -> String {
    let bin = cargo_bin();
    let path = std::env::var("PATH").unwrap_or_default();
    if path.split(':').any(|p| Path::new(p) == bin) {
        path
    } else {
        format!("{}:{path}", bin.display())
    }
}

fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", path_with_cargo_bin())
        .output()
        .with_context(|| format!("running {cmd} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_logged(what: &str, mut c: Command) -> Result<()> {
    c.env("PATH", path_with_cargo_bin());
    let st = c
        .status()
        .with_context(|| format!("{what}: starting {c:?}"))?;
    if !st.success() {
        bail!("{what}: {c:?} failed ({st})");
    }
    Ok(())
}

fn done(thing: &str, started: Option<Instant>) {
    match started {
        None => eprintln!("setup: {thing} ok (present)"),
        Some(t) => eprintln!(
            "setup: {thing} installed in {:.1}s",
            t.elapsed().as_secs_f64()
        ),
    }
}

/// Ensures toolchain, bpf-linker and packages; returns the pinned toolchain name.
pub fn ensure_all() -> Result<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "berth's setup installs system packages and its tests load eBPF programs: run as root"
        );
    }
    let tc = crate::toolchain()?;
    ensure_toolchain(&tc)?;
    ensure_bpf_linker(&tc)?;
    ensure_packages()?;
    Ok(tc)
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Target of the static test-image binary.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The C compiler for musl builds (Debian's `musl-gcc`): ring, rustls's crypto, has C and
/// assembly parts, and cc-rs finds no compiler for the musl target without it.
pub const MUSL_CC: &str = "musl-gcc";

/// The musl standard library for the pinned toolchain (the test image and berth's own image are
/// FROM scratch), and the musl C compiler their C dependencies are built with.
pub fn ensure_musl_target(tc: &str) -> Result<()> {
    if package_installed("musl-tools") {
        done("musl-tools", None);
    } else {
        let t = Instant::now();
        apt_install(&["musl-tools"])?;
        done("musl-tools", Some(t));
    }
    let installed = output(
        "rustup",
        &[&format!("+{tc}"), "target", "list", "--installed"],
    )?;
    if installed.lines().any(|l| l.trim() == MUSL) {
        done(&format!("rust target {MUSL}"), None);
        return Ok(());
    }
    let t = Instant::now();
    let mut c = Command::new("rustup");
    c.args(["target", "add", MUSL, "--toolchain", tc]);
    run_logged("adding the musl target", c)?;
    done(&format!("rust target {MUSL}"), Some(t));
    Ok(())
}

fn ensure_toolchain(tc: &str) -> Result<()> {
    let installed = output("rustup", &["toolchain", "list"])?;
    let have_tc = installed.lines().any(|l| l.starts_with(&format!("{tc}-")));
    let have_src = have_tc
        && output(
            "rustup",
            &[&format!("+{tc}"), "component", "list", "--installed"],
        )?
        .lines()
        .any(|l| l.starts_with("rust-src"));
    if have_tc && have_src {
        done(&format!("rust toolchain {tc} with rust-src"), None);
        return Ok(());
    }
    let t = Instant::now();
    let mut c = Command::new("rustup");
    c.args([
        "toolchain",
        "install",
        tc,
        "--profile",
        "minimal",
        "--component",
        "rust-src,rustfmt,clippy",
    ]);
    run_logged("installing the Rust toolchain", c)?;
    done(&format!("rust toolchain {tc} with rust-src"), Some(t));
    Ok(())
}

/// The LLVM major version of a toolchain's rustc (`LLVM version: 23.1.1` in `rustc -vV`).
pub fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

/// The libLLVM a binary links, from `ldd` output: Some(path), or None if absent/unresolved.
pub fn linked_llvm(ldd: &str) -> Option<String> {
    ldd.lines().find(|l| l.contains("libLLVM")).and_then(|l| {
        let target = l.split("=>").nth(1)?.trim();
        if target.starts_with("not found") {
            return None;
        }
        Some(target.split_whitespace().next()?.to_owned())
    })
}

fn ensure_bpf_linker(tc: &str) -> Result<()> {
    let sysroot = output("rustc", &[&format!("+{tc}"), "--print", "sysroot"])?
        .trim()
        .to_owned();
    let lib = Path::new(&sysroot).join("lib");
    let bin = cargo_bin().join("bpf-linker");
    let current = bin.exists()
        && output(bin.to_str().unwrap_or("bpf-linker"), &["--version"])
            .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
        && output("ldd", &[bin.to_str().unwrap_or("bpf-linker")])
            .ok()
            .and_then(|l| linked_llvm(&l))
            .is_some_and(|p| p.starts_with(lib.to_str().unwrap_or("/nonexistent")));
    if current {
        done(
            &format!("bpf-linker {BPF_LINKER_VERSION} (LLVM of {tc})"),
            None,
        );
        return Ok(());
    }
    let t = Instant::now();
    let vv = output("rustc", &[&format!("+{tc}"), "-vV"])?;
    let major = llvm_major(&vv).context("no `LLVM version:` in rustc -vV")?;
    let llvm_so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so; the toolchain only ships the
    // versioned file, so point a temporary prefix at it.
    let prefix = std::env::temp_dir().join(format!("berth-llvm-prefix-{}", std::process::id()));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm_so, &link)?;
    let mut c = Command::new("cargo");
    c.arg(format!("+{tc}"))
        .args([
            "install",
            "--locked",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        )
        .env_remove("RUSTUP_TOOLCHAIN");
    let r = run_logged("building bpf-linker", c);
    let _ = std::fs::remove_dir_all(&prefix);
    r?;
    done(
        &format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {major} of {tc})"),
        Some(t),
    );
    Ok(())
}

fn package_installed(p: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", p])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    let mut u = Command::new("apt-get");
    u.args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null());
    run_logged("apt-get update", u)?;
    let mut i = Command::new("apt-get");
    i.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null());
    run_logged("apt-get install", i)
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        done(&format!("packages {}", PACKAGES.join(" ")), None);
        return Ok(());
    }
    let t = Instant::now();
    apt_install(&missing)?;
    done(&format!("packages {}", missing.join(" ")), Some(t));
    Ok(())
}

/// Debian's etcd 3.4 (`etcd` and `etcdctl`) for the etcd tests; each test starts its own member
/// with its data in a temporary directory, so nothing is started here.
pub fn ensure_etcd() -> Result<()> {
    let missing: Vec<&str> = ETCD_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        done("etcd-server etcd-client", None);
        return Ok(());
    }
    let t = Instant::now();
    apt_install(&missing)?;
    done(&missing.join(" "), Some(t));
    Ok(())
}

/// Debian's `docker-compose` (the v1 Python tool) for the Compose example's test.
pub fn ensure_compose() -> Result<()> {
    if package_installed("docker-compose") {
        done("docker-compose", None);
        return Ok(());
    }
    let t = Instant::now();
    apt_install(&["docker-compose"])?;
    done("docker-compose", Some(t));
    Ok(())
}

const DOCKER_SOCK: &str = "/var/run/docker.sock";

fn docker_ping() -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(DOCKER_SOCK) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.") && buf.ends_with("OK")
}

/// Installs Debian's docker.io if dockerd is missing and starts dockerd if it does not answer.
pub fn ensure_docker() -> Result<()> {
    if Command::new("sh")
        .args(["-c", "command -v dockerd"])
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        let t = Instant::now();
        apt_install(&["docker.io"])?;
        done("docker.io", Some(t));
    }
    if docker_ping() {
        done("dockerd (running)", None);
        return Ok(());
    }
    let t = Instant::now();
    // Stale pid files from a killed daemon block a restart; a live containerd left by a killed
    // dockerd is kept (dockerd takes it over through its pid file).
    for f in [
        "/var/run/docker.pid",
        "/var/run/docker/containerd/containerd.pid",
    ] {
        let alive = std::fs::read_to_string(f)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            // A zombie is not alive: it only waits to be reaped.
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .is_some_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            });
        if !alive {
            let _ = std::fs::remove_file(f);
        }
    }
    let log =
        std::fs::File::create("/var/log/berth-dockerd.log").context("creating dockerd log")?;
    // `setsid --fork` detaches dockerd from this process: it is reparented to init, so
    // a later stop of dockerd (as the Docker tests do) does not leave a zombie child of
    // a still running `cargo xtask test` behind its pid.
    let status = Command::new("setsid")
        .args(["--fork", "dockerd"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("starting dockerd")?;
    if !status.success() {
        bail!("setsid --fork dockerd failed: {status}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker_ping() {
        if Instant::now() > deadline {
            bail!(
                "dockerd did not answer on {DOCKER_SOCK} within 30 s; see /var/log/berth-dockerd.log"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done("dockerd (started)", Some(t));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llvm_major() {
        let vv = "rustc 1.99.1 (58cf8f9c3 2026-10-13)\nbinary: rustc\nLLVM version: 23.1.1\n";
        assert_eq!(llvm_major(vv), Some(23));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn parses_ldd() {
        let ok = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.23.1-rust-1.99.1-stable => /root/.rustup/toolchains/1.99.1-x86_64-unknown-linux-gnu/lib/libLLVM.so.23.1-rust-1.99.1-stable (0x00007f27)\n";
        assert_eq!(
            linked_llvm(ok).as_deref(),
            Some(
                "/root/.rustup/toolchains/1.99.1-x86_64-unknown-linux-gnu/lib/libLLVM.so.23.1-rust-1.99.1-stable"
            )
        );
        assert_eq!(linked_llvm("\tlibLLVM.so.23.1 => not found\n"), None);
        assert_eq!(linked_llvm("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
