//! `cargo xtask`: the project's commands. Built by whatever toolchain is the machine's default;
//! it installs the pinned one (file `rust-toolchain-version`) and runs everything else with it.
//!
//! - `setup`: install what is missing (toolchain + rust-src, bpf-linker against the toolchain's
//!   LLVM, Debian packages), idempotently; a second run only checks.
//! - `build [--release]`, `run [-- ARGS]`, `test [ARGS]`, `bench [ARGS]`, `soak`, `docker-up`.
//! - `image`: berth as a container image (static binary FROM scratch).

mod bench;
mod image;
mod lanes;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

fn usage() -> &'static str {
    "usage: cargo xtask <setup|build [--release]|run [berth run flags | berth subcommand]|test [cargo test args]|bench [args]|soak|docker-up|image>"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (parent of xtask's manifest directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// The pinned toolchain, e.g. "1.99.1".
pub fn toolchain() -> Result<String> {
    let p = root().join("rust-toolchain-version");
    let v = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(v.trim().to_owned())
}

/// `cargo +<pinned>` in the workspace root, with ~/.cargo/bin on PATH (bpf-linker lives there).
fn cargo(tc: &str) -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{tc}")).current_dir(root());
    c.env("PATH", setup::path_with_cargo_bin());
    // C parts of dependencies (ring) built for the musl target use musl's compiler.
    if std::env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
        c.env("CC_x86_64_unknown_linux_musl", setup::MUSL_CC);
    }
    // Set by the outer `cargo xtask` (default toolchain); must not leak into the pinned build.
    for k in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
    ] {
        c.env_remove(k);
    }
    c
}

/// The static `hello` test backend (musl, release): the Docker tests' and benchmarks' image.
fn build_hello(tc: &str) -> Result<()> {
    let mut c = cargo(tc);
    c.args([
        "build",
        "--release",
        "-p",
        "berth-hello",
        "--target",
        setup::MUSL,
    ]);
    status(c)
}

/// Free bytes on the disk that holds the workspace (and `target/`), from `df`.
fn free_disk() -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(root()).output().ok()?;
    df_available(&String::from_utf8(out.stdout).ok()?)
}

/// The available bytes in `df -Pk`'s output for one path (its second line, fourth column).
fn df_available(text: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Below this, a failed build is most likely the disk: the test build's `target/` is ~3 GB, and
/// a linker that runs out of space dies of SIGBUS (signal 7) instead of saying so.
const LOW_DISK: u64 = 2_000_000_000;

/// Names a full disk as the likely cause of `e` when the disk is nearly full now.
fn with_disk(e: anyhow::Error) -> anyhow::Error {
    match free_disk() {
        Some(free) if free < LOW_DISK => e.context(format!(
            "the disk holding {} has only {} MB free: a link that runs out of space dies of \
             SIGBUS (signal 7); free some space and run again",
            root().display(),
            free / 1_000_000
        )),
        _ => e,
    }
}

fn status(mut c: Command) -> Result<()> {
    let shown = format!("{c:?}");
    let st = c.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

/// `cargo xtask test ARGS`: one `cargo test ARGS`, the binaries one after another.
fn test_with_args(tc: &str, args: &[String]) -> Result<()> {
    // The integration tests spawn the daemon binary, and build the test image from the static
    // `hello` server.
    let mut c = cargo(tc);
    c.args(["build", "-p", "lb-userspace"]);
    status(c)?;
    build_hello(tc)?;
    // The container tests run berth as operators do: from its image.
    let berth_image = image::build(tc)?.remove(0);
    let mut c = cargo(tc);
    c.arg("test")
        .args(lanes::WORKSPACE)
        .args(args)
        .args(["--", "--test-threads=1"])
        .envs(lanes::test_env())
        .env("BERTH_IMAGE", berth_image);
    status(c)
}

fn run(args: &[String]) -> Result<()> {
    let Some(cmd) = args.first() else {
        bail!("{}", usage());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "setup" => setup::ensure_all().map(|_| ()),
        "docker-up" => setup::ensure_docker(),
        "image" => {
            if let Some(other) = rest.first() {
                bail!("image: unknown argument {other:?}\n{}", usage());
            }
            let tc = setup::ensure_all()?;
            image::build(&tc).map(|_| ())
        }
        "build" => {
            let tc = setup::ensure_all()?;
            let mut c = cargo(&tc);
            c.args(["build", "-p", "lb-userspace"]).args(rest);
            status(c)
        }
        "run" => {
            let tc = setup::ensure_all()?;
            // Without a config file berth serves containers by their labels.
            setup::ensure_docker()?;
            let mut c = cargo(&tc);
            c.args(["build", "--release", "-p", "lb-userspace"]);
            status(c)?;
            let bin = root().join("target/release/berth");
            let mut berth_args: Vec<String> =
                rest.iter().skip_while(|a| *a == "--").cloned().collect();
            // `cargo xtask run [--config F] [--iface I]...` means `berth run ...`; a berth
            // subcommand (e.g. `check-config F`) is passed through as is.
            if berth_args.first().is_none_or(|a| a.starts_with('-')) {
                berth_args.insert(0, "run".into());
                if berth_args.len() == 1 && Path::new("berth.toml").exists() {
                    berth_args.extend(["--config".into(), "berth.toml".into()]);
                }
            }
            eprintln!("xtask: exec {} {}", bin.display(), berth_args.join(" "));
            use std::os::unix::process::CommandExt as _;
            let err = Command::new(&bin).args(&berth_args).exec();
            Err(err).with_context(|| format!("exec {}", bin.display()))
        }
        "test" => {
            let started = Instant::now();
            let tc = setup::ensure_all()?;
            setup::ensure_docker()?;
            setup::ensure_musl_target(&tc)?;
            setup::ensure_compose()?;
            setup::ensure_etcd()?;
            if let Some(free) = free_disk() {
                eprintln!(
                    "xtask: {:.1} GB free on the disk holding {}",
                    free as f64 / 1e9,
                    root().display()
                );
            }
            let result = if rest.is_empty() {
                lanes::run_all(&tc)
            } else {
                test_with_args(&tc, rest)
            }
            .map_err(with_disk);
            eprintln!(
                "xtask: test finished in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            result
        }
        "bench" => {
            // `bench [--micro-only | --load-only] [berth-bench flags] [-- berth-loadbench flags]`:
            // the BPF_PROG_TEST_RUN micro-benchmarks, then the macro benchmark against peers.
            let (micro_only, load_only, rest) = match rest.first().map(String::as_str) {
                Some("--micro-only") => (true, false, &rest[1..]),
                Some("--load-only") => (false, true, &rest[1..]),
                _ => (false, false, rest),
            };
            let (micro_args, load_args) = if load_only {
                (
                    &[][..],
                    rest.strip_prefix(&["--".to_owned()][..]).unwrap_or(rest),
                )
            } else {
                match rest.iter().position(|a| a == "--") {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &[][..]),
                }
            };
            let tc = setup::ensure_all()?;
            if !load_only {
                let mut c = cargo(&tc);
                c.args([
                    "run",
                    "--release",
                    "-p",
                    "berth-tests",
                    "--bin",
                    "berth-bench",
                    "--",
                ])
                .args(micro_args);
                status(c)?;
            }
            if micro_only {
                return Ok(());
            }
            bench::ensure_tools()?;
            let mut b = cargo(&tc);
            b.args(["build", "--release", "-p", "lb-userspace"]);
            status(b)?;
            let mut c = cargo(&tc);
            c.args([
                "run",
                "--release",
                "-p",
                "berth-tests",
                "--bin",
                "berth-loadbench",
                "--",
            ])
            .args(load_args)
            .env("BERTH_BIN", root().join("target/release/berth"));
            status(c)?;
            // Discovery reaction: a real dockerd and containers of the test image (and etcd for
            // the `berth publish` path).
            setup::ensure_docker()?;
            setup::ensure_etcd()?;
            setup::ensure_musl_target(&tc)?;
            build_hello(&tc)?;
            let mut d = cargo(&tc);
            d.args([
                "run",
                "--release",
                "-p",
                "berth-tests",
                "--bin",
                "berth-discobench",
            ])
            .env("BERTH_BIN", root().join("target/release/berth"))
            .env(
                "BERTH_HELLO_BIN",
                root().join(format!("target/{}/release/hello", setup::MUSL)),
            );
            status(d)
        }
        "soak" => {
            let tc = setup::ensure_all()?;
            let mut c = cargo(&tc);
            c.args([
                "test",
                "--release",
                "-p",
                "berth-tests",
                "--",
                "--ignored",
                "--test-threads=1",
                // The soaks only: the other ignored tests are a diagnosis and a test that fails
                // by design (see their `ignore` reasons), and cargo stops at the first binary
                // that fails, before the soaks in the binaries after it.
                "soak_",
            ])
            .env("BERTH_BIN", root().join("target/release/berth"));
            let mut b = cargo(&tc);
            b.args(["build", "--release", "-p", "lb-userspace"]);
            status(b)?;
            status(c)
        }
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{}", usage()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_available_column_of_df() {
        let text = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n\
                    /dev/vda         263174212  29360128  66060288      31% /\n";
        assert_eq!(df_available(text), Some(66_060_288 * 1024));
        assert_eq!(
            df_available("Filesystem 1024-blocks Used Available\n"),
            None
        );
        assert_eq!(df_available("header\n/dev/vda 1 2 lots 5% /\n"), None);
    }

    #[test]
    fn free_disk_reads_this_machine() {
        assert!(free_disk().is_some_and(|b| b > 0));
    }
}
