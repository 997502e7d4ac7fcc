//! `cargo xtask test` (no arguments): every test binary, in two lanes that run at once.
//!
//! Most of the suite's time is the kernel verifying the TC programs (0.8 s of one core per load
//! here, 2.2 s before session 27 made the rare paths' subprograms global) in the fixture suites,
//! and waiting (containers starting, health-check windows, daemon restarts) in the end-to-end
//! suites. Run one after the other, as `cargo test` does, one core sits idle for most of it. So
//! the binaries are split:
//! - the **isolated** lane: suites whose every case runs in an anonymous network namespace of
//!   its own on BPF objects of its own (BPF_PROG_TEST_RUN fixtures; see [`ISOLATED`]). Nothing
//!   they touch is visible to another process, so they cannot collide with anything;
//! - the **shared** lane: everything else (the daemon, Docker, etcd, named namespaces, cgroups,
//!   bpffs pins), one binary after another, exactly as before. Berth's image is built beside
//!   its first binaries and only the binaries that run it ([`NEEDS_IMAGE`]) wait for it. Done
//!   with its own, the shared lane takes isolated binaries from the back of their queue (the
//!   isolated lane takes the biggest first), so the two lanes end close together.
//!
//! Each binary runs with `--test-threads=1`, in its package's directory, as `cargo test` runs
//! it. A failing binary does not stop the others; the summary names every failure and the
//! command fails. Doc tests run last. `cargo xtask test ARGS` (a filter, `-p`, `--test`) still
//! goes through one plain `cargo test ARGS`.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{build_hello, cargo, image, root, setup, status};

/// Integration test binaries whose cases touch only what they create: each case `unshare`s into
/// an anonymous network namespace and loads its own programs and maps. A new suite goes here
/// only if that holds for every case; anything else belongs to the shared lane.
const ISOLATED: &[&str] = &[
    "agreement",
    "ct_integrity",
    "fixtures",
    "fixtures_v6",
    "fullnat",
    "fullnat_v6",
    "hostile",
    "hostile_v6",
    "xdp",
    "xdp_v6",
];

/// Shared-lane binaries that run berth from its image: they run last, once it is built.
const NEEDS_IMAGE: &[&str] = &["e2e_container"];

/// Cargo's arguments selecting the workspace's tests (the eBPF crate and the test backend are
/// built for other targets).
pub const WORKSPACE: &[&str] = &[
    "--workspace",
    "--exclude",
    "lb-ebpf",
    "--exclude",
    "berth-hello",
];

/// One test binary, as cargo built it.
struct TestBin {
    /// The target's name (`fixtures`, `lb_userspace`).
    name: String,
    /// The source it was built from, relative to the workspace (for the `Running` line).
    src: String,
    exe: PathBuf,
    /// The package's directory: cargo runs a test binary there.
    dir: PathBuf,
    /// An integration test (`tests/*.rs`), not a crate's unit tests.
    integration: bool,
}

/// What one binary did.
struct Outcome {
    name: String,
    lane: &'static str,
    ok: bool,
    secs: f64,
    /// passed, failed, ignored, from the harness's `test result:` line.
    counts: Option<(u64, u64, u64)>,
}

/// Builds the test binaries and lists them (cargo's JSON messages on stdout).
fn build_tests(tc: &str) -> Result<Vec<TestBin>> {
    let mut c = cargo(tc);
    c.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .args(WORKSPACE)
    .stdout(Stdio::piped());
    let shown = format!("{c:?}");
    let out = c
        .spawn()
        .and_then(|child| child.wait_with_output())
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    let root = root();
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let target = &msg["target"];
        let name = target["name"].as_str().unwrap_or("?").to_owned();
        let src = target["src_path"].as_str().unwrap_or("?");
        let src = PathBuf::from(src);
        let src = src
            .strip_prefix(&root)
            .unwrap_or(&src)
            .display()
            .to_string();
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        let integration = target["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        bins.push(TestBin {
            name,
            src,
            exe: exe.into(),
            dir: manifest
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| root.clone()),
            integration,
        });
    }
    for want in ISOLATED.iter().chain(NEEDS_IMAGE) {
        if !bins.iter().any(|b| b.integration && b.name == *want) {
            bail!("xtask's lanes name the test binary {want:?}, which cargo did not build");
        }
    }
    Ok(bins)
}

/// The `test result:` counts of a harness's output line.
fn counts(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let num = |word: &str| {
        let mut prev = None;
        for w in rest.split([' ', ';', '.']) {
            if w == word {
                return prev;
            }
            if !w.is_empty() {
                prev = w.parse::<u64>().ok();
            }
        }
        None
    };
    Some((num("passed")?, num("failed")?, num("ignored")?))
}

/// Runs one test binary, its output passed through line by line (whole lines, so the two
/// lanes' lines interleave but never mix).
fn run_bin(bin: &TestBin, lane: &'static str, env: &[(&str, String)]) -> Result<Outcome> {
    eprintln!(
        "     Running {} ({}) [{lane} lane]",
        bin.src,
        bin.exe.strip_prefix(root()).unwrap_or(&bin.exe).display()
    );
    let started = Instant::now();
    let mut c = Command::new(&bin.exe);
    c.arg("--test-threads=1")
        .current_dir(&bin.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .with_context(|| format!("starting {}", bin.exe.display()))?;
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    // Passes the lines on, and returns the last `test result:` counts.
    let to_stdout = std::thread::spawn(move || {
        let mut seen = None;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            seen = counts(&line).or(seen);
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
        seen
    });
    let to_stderr = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    });
    let st = child
        .wait()
        .with_context(|| format!("waiting for {}", bin.exe.display()))?;
    let counts = to_stdout.join().ok().flatten();
    let _ = to_stderr.join();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "xtask: {} ({lane} lane) {} in {secs:.1} s",
        bin.name,
        if st.success() { "passed" } else { "FAILED" }
    );
    Ok(Outcome {
        name: bin.name.clone(),
        lane,
        ok: st.success(),
        secs,
        counts,
    })
}

/// An outcome that is a failure without a run.
fn failed(name: &str, lane: &'static str) -> Outcome {
    Outcome {
        name: name.to_owned(),
        lane,
        ok: false,
        secs: 0.0,
        counts: None,
    }
}

fn run_or_fail(bin: &TestBin, lane: &'static str, env: &[(&str, String)]) -> Outcome {
    run_bin(bin, lane, env).unwrap_or_else(|e| {
        eprintln!("xtask: {}: {e:#}", bin.name);
        failed(&bin.name, lane)
    })
}

/// The environment every test binary gets: the daemon's binary (debug) and the test backend's
/// (static, for the test image). `BERTH_IMAGE` is added for those that run berth's image.
pub fn test_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "BERTH_BIN",
            root().join("target/debug/berth").display().to_string(),
        ),
        (
            "BERTH_HELLO_BIN",
            root()
                .join(format!("target/{}/release/hello", setup::MUSL))
                .display()
                .to_string(),
        ),
    ]
}

/// How many cases a test binary has (its `--list`), 0 if it cannot say.
fn cases(bin: &TestBin) -> usize {
    Command::new(&bin.exe)
        .args(["--list", "--format", "terse"])
        .current_dir(&bin.dir)
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.ends_with(": test"))
                .count()
        })
        .unwrap_or(0)
}

/// The whole suite: builds, then the two lanes at once, then the doc tests.
pub fn run_all(tc: &str) -> Result<()> {
    // The integration tests spawn the daemon's binary.
    let mut c = cargo(tc);
    c.args(["build", "-p", "lb-userspace"]);
    status(c)?;
    let bins = build_tests(tc)?;
    let is = |names: &[&str], b: &TestBin| b.integration && names.contains(&b.name.as_str());
    let (isolated, mut shared): (Vec<TestBin>, Vec<TestBin>) =
        bins.into_iter().partition(|b| is(ISOLATED, b));
    // Unit tests first, then the suites that start no container (they run while berth's image
    // builds), then the Docker ones, then the ones that need the image.
    shared.sort_by_key(|b| {
        (
            is(NEEDS_IMAGE, b),
            b.integration,
            b.name.starts_with("e2e_docker"),
            b.name.clone(),
        )
    });
    let (with_image, shared): (Vec<TestBin>, Vec<TestBin>) =
        shared.into_iter().partition(|b| is(NEEDS_IMAGE, b));
    let env = test_env();
    // The isolated suites, those with the most cases first (a case is mostly one load of the
    // programs): the isolated lane takes from the front, and the shared lane, once its own
    // binaries are done, from the back.
    let mut isolated: Vec<(usize, TestBin)> =
        isolated.into_iter().map(|b| (cases(&b), b)).collect();
    isolated.sort_by_key(|(n, b)| (std::cmp::Reverse(*n), b.name.clone()));
    let queue = Mutex::new(
        isolated
            .into_iter()
            .map(|(_, b)| b)
            .collect::<VecDeque<_>>(),
    );
    let take = |front: bool| {
        let mut q = queue.lock().expect("queue");
        if front { q.pop_front() } else { q.pop_back() }
    };
    let (isolated_results, shared_results) = std::thread::scope(|s| {
        let isolated_lane = s.spawn(|| {
            std::iter::from_fn(|| take(true))
                .map(|b| run_or_fail(&b, "isolated", &env))
                .collect::<Vec<_>>()
        });
        let mut results = Vec::new();
        // The test backend's image is small and the Docker suites need it; berth's own image
        // is a release build (from scratch on a fresh clone), built beside the first binaries.
        if let Err(e) = build_hello(tc) {
            eprintln!("xtask: the test backend: {e:#}");
            results.push(failed("hello (build)", "shared"));
        }
        let image = s.spawn(|| image::build(tc).map(|mut tags| tags.remove(0)));
        results.extend(shared.iter().map(|b| run_or_fail(b, "shared", &env)));
        match image.join().expect("image thread") {
            Ok(tag) => {
                let mut env = env.clone();
                env.push(("BERTH_IMAGE", tag));
                results.extend(with_image.iter().map(|b| run_or_fail(b, "shared", &env)));
            }
            Err(e) => {
                eprintln!("xtask: berth's image: {e:#}");
                results.extend(with_image.iter().map(|b| failed(&b.name, "shared")));
            }
        }
        results.extend(std::iter::from_fn(|| take(false)).map(|b| run_or_fail(&b, "shared", &env)));
        (isolated_lane.join().expect("isolated lane"), results)
    });
    let mut c = cargo(tc);
    c.args(["test", "--doc"]).args(WORKSPACE);
    let doc = status(c);
    let all: Vec<&Outcome> = isolated_results.iter().chain(&shared_results).collect();
    let (mut p, mut f, mut i) = (0, 0, 0);
    eprintln!("xtask: test binaries (lane, seconds, passed/failed/ignored):");
    for o in &all {
        let c = o.counts.unwrap_or_default();
        (p, f, i) = (p + c.0, f + c.1, i + c.2);
        eprintln!(
            "xtask:   {:<24} {:<8} {:>6.1} s  {}/{}/{}{}",
            o.name,
            o.lane,
            o.secs,
            c.0,
            c.1,
            c.2,
            if o.ok { "" } else { "  FAILED" }
        );
    }
    let lane_secs = |r: &[Outcome]| r.iter().map(|o| o.secs).sum::<f64>();
    eprintln!(
        "xtask: {p} passed, {f} failed, {i} ignored (doc tests aside); isolated lane {:.0} s, \
         shared lane {:.0} s",
        lane_secs(&isolated_results),
        lane_secs(&shared_results)
    );
    let failed: Vec<&str> = all
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("test binaries failed: {}", failed.join(", "));
    }
    doc.context("doc tests")
}

#[cfg(test)]
mod tests {
    use super::counts;

    #[test]
    fn reads_the_harness_result_line() {
        assert_eq!(
            counts(
                "test result: ok. 41 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; \
                 finished in 122.41s"
            ),
            Some((41, 0, 2))
        );
        assert_eq!(
            counts("test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured"),
            Some((3, 1, 0))
        );
        assert_eq!(counts("test foo ... ok"), None);
    }
}
