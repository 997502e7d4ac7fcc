//! Builds the eBPF object (`lb-ebpf`) for `bpfel-unknown-none` with the pinned toolchain and
//! embeds it through `OUT_DIR/lb-ebpf`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
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
