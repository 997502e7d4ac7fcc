//! berth's userspace: configuration, the Maglev builder, the dataplane handle (loading and
//! attaching the eBPF programs, typed map access) and the reconciler that owns the maps.

pub mod api;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod health;
pub mod maglev;
pub mod reconciler;

pub use api::{metrics, status};
pub use config::synapse;

/// The eBPF object built from `lb-ebpf` by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
