//! `cargo xtask image`: berth as a container image. A static musl binary (the eBPF object is
//! embedded in it at build time, see lb-userspace's build script) in an image FROM scratch, so
//! nothing is pulled; tagged `berth:latest` and `berth:<git rev>`.
//!
//! Idempotent: cargo rebuilds only what changed, the build context is rewritten only when its
//! bytes differ, and Docker's cache gives the same image ID for the same binary.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cargo, root, setup, status};

/// The image's Dockerfile. The binary is the whole image: no shell, so everything is exec form.
/// The default command reads `/etc/berth/berth.toml` (the host's `/etc/berth`, mounted).
fn dockerfile(version: &str, rev: &str) -> String {
    format!(
        "FROM scratch\n\
         COPY berth /usr/local/bin/berth\n\
         LABEL org.opencontainers.image.title=\"berth\" \
         org.opencontainers.image.version=\"{version}\" \
         org.opencontainers.image.revision=\"{rev}\"\n\
         ENTRYPOINT [\"/usr/local/bin/berth\"]\n\
         CMD [\"run\", \"--config\", \"/etc/berth/berth.toml\"]\n"
    )
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP program header): a binary
/// that does cannot run in a scratch image.
pub fn elf_wants_interpreter(elf: &[u8]) -> Result<bool> {
    ensure!(
        elf.len() >= 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(h) = elf.get(o..o + 4) else {
            bail!("program header {i} lies outside the file");
        };
        if u32::from_le_bytes([h[0], h[1], h[2], h[3]]) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The short revision of the checkout, as `berth --version` shows it.
fn git_rev() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes `bytes` to `path` unless it already holds exactly them (keeps the mtime, so the build
/// context is unchanged for Docker).
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Builds the static binary (release) and the image; returns the tags, first the one to run.
/// `cargo xtask test` runs its container tests on this same image: after a change only
/// lb-userspace is recompiled (about 30 s here).
pub fn build(tc: &str) -> Result<Vec<String>> {
    let started = Instant::now();
    setup::ensure_docker()?;
    setup::ensure_musl_target(tc)?;
    let mut c = cargo(tc);
    c.args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "--target",
        setup::MUSL,
    ]);
    status(c)?;
    let bin = root().join(format!("target/{}/release/berth", setup::MUSL));
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    ensure!(
        !elf_wants_interpreter(&bytes).with_context(|| format!("{}", bin.display()))?,
        "{} is dynamically linked: it cannot run in a scratch image",
        bin.display()
    );
    let rev = git_rev();
    // xtask shares the workspace's version with berth.
    let version = env!("CARGO_PKG_VERSION");
    let ctx = root().join("target/image");
    std::fs::create_dir_all(&ctx).with_context(|| format!("creating {}", ctx.display()))?;
    write_if_changed(&ctx.join("berth"), &bytes)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let p = ctx.join("berth");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", p.display()))?;
    }
    write_if_changed(
        &ctx.join("Dockerfile"),
        dockerfile(version, &rev).as_bytes(),
    )?;
    let tags = vec!["berth:latest".to_owned(), format!("berth:{rev}")];
    let mut d = Command::new("docker");
    d.args(["build", "-q"]);
    for t in &tags {
        d.args(["-t", t]);
    }
    d.arg(&ctx);
    let out = d.output().context("running docker build")?;
    if !out.status.success() {
        bail!(
            "docker build {} failed: {}",
            ctx.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!(
        "xtask: image {} ({id}, binary {:.1} MiB) in {:.1} s",
        tags.join(", "),
        bytes.len() as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pt_interp() {
        // A minimal ELF64 header with one program header at 64.
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20] = 64; // e_phoff
        elf[0x36] = 56; // e_phentsize
        elf[0x38] = 1; // e_phnum
        elf[64] = 1; // PT_LOAD
        assert!(!elf_wants_interpreter(&elf).unwrap());
        elf[64] = 3; // PT_INTERP
        assert!(elf_wants_interpreter(&elf).unwrap());
        assert!(elf_wants_interpreter(b"#!/bin/sh\n").is_err());
        elf[0x38] = 2; // a header past the end
        elf[64] = 1;
        assert!(elf_wants_interpreter(&elf).is_err());
    }

    #[test]
    fn dockerfile_is_exec_form_from_scratch() {
        let d = dockerfile("0.1.0", "abc");
        assert!(d.starts_with("FROM scratch\n"));
        assert!(d.contains("ENTRYPOINT [\"/usr/local/bin/berth\"]"));
        assert!(d.contains("revision=\"abc\""));
    }
}
