//! berth's userspace: the config (pure parsing), discovery (Docker, etcd), health checks, the
//! dataplane handle (loading, pinning and attaching the eBPF programs, typed map access), the
//! reconciler (the one writer of the maps), the daemon's event loop and its API (admin socket,
//! status, metrics), and `berth publish`. ARCHITECTURE.md at the repository root maps them.

pub mod api;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod health;
pub mod logging;
pub mod maglev;
pub mod publish;
pub mod reconciler;

pub use api::{metrics, status};
pub use config::synapse;

/// The eBPF object built from `lb-ebpf` by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
