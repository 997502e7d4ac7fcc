//! Builds the eBPF object (`lb-ebpf`) for `bpfel-unknown-none` with the pinned toolchain and
//! embeds it through `OUT_DIR/lb-ebpf`, and records the git revision for `berth --version`
//! (`BERTH_GIT_REV`).

use std::{path::PathBuf, process::Command};

/// `git` in the crate's directory: its trimmed stdout, or None (no git, not a checkout).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The checked-out commit ("unknown" outside a git checkout, e.g. a crate tarball). Rebuilt when
/// HEAD moves: HEAD itself (a checkout), the branch it names (a commit) and packed-refs (a gc).
/// `--git-path` resolves these for linked worktrees, whose refs live in the common directory.
fn git_revision() -> String {
    let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for w in watched {
        if let Some(p) = git(&["rev-parse", "--git-path", &w]) {
            let p = PathBuf::from(p);
            // Relative to the crate directory when git prints a relative path.
            let p = if p.is_absolute() {
                p
            } else {
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default()).join(p)
            };
            if p.exists() {
                println!("cargo::rerun-if-changed={}", p.display());
            }
        }
    }
    rev
}

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-env=BERTH_GIT_REV={}", git_revision());
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .expect("lb-userspace sits inside the workspace");
    let ebpf_dir = root.join("lb-ebpf");
    let pinned = std::fs::read_to_string(root.join("rust-toolchain-version"))?;
    println!(
        "cargo::rerun-if-changed={}",
        root.join("rust-toolchain-version").display()
    );
    println!(
        "cargo::rerun-if-changed={}",
        root.join("lb-common/src").display()
    );
    // The eBPF crate needs `-Z build-std=core`; on a stable toolchain that takes RUSTC_BOOTSTRAP,
    // set here for the nested build only (exporting it globally would rebuild every dependency).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = pinned.trim();
    let root_dir = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}
