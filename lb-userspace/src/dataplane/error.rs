//! What can go wrong on the kernel side, each variant naming the map, program, interface or
//! path involved.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed (are you root, with BTF at /sys/kernel/btf/vmlinux?)")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("the eBPF object cannot be prepared for this kernel: {reason}")]
    Object { reason: String },
    #[error("the eBPF object has no map named {name}")]
    MissingMap { name: &'static str },
    #[error("the eBPF object has no program named {name}")]
    MissingProgram { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to interface {iface}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "interface {iface} has no native (driver) XDP; berth does not use generic XDP (it runs \
         after the kernel built the packet, so it is no fast path): {iface} stays on TC"
    )]
    XdpUnsupported {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("no network interface named {iface:?}")]
    UnknownInterface { iface: String },
    #[error(
        "a berth program (id {prog_id}) is already attached to {iface}, and not through the pins \
         under {pins}: is another berth running with another pin path? Stop it first (a second \
         one would translate packets twice)"
    )]
    AlreadyAttached {
        iface: String,
        prog_id: u32,
        pins: String,
    },
    #[error(
        "the pinned dataplane under {root} has layout {found}, this berth uses v{want}: it cannot \
         be adopted without misreading it. Reset it with `berth down --pin-path {root}` (this \
         detaches berth and drops established flows), or run the berth version that made it",
        want = lb_common::PIN_LAYOUT
    )]
    IncompatibleLayout { root: String, found: String },
    #[error(
        "the pinned dataplane under {root} does not match this configuration: map {map} has \
         {property} {actual}, the configuration needs {expected} (set by {setting}). Keep the \
         old setting, or reset with `berth down --pin-path {root}` (this detaches berth and \
         drops established flows)"
    )]
    PinnedMismatch {
        root: String,
        map: String,
        setting: &'static str,
        property: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error(
        "pin path {path} is not on a BPF filesystem (mount one with `mount -t bpf bpf \
         /sys/fs/bpf`, or choose another --pin-path)"
    )]
    NotBpffs { path: String },
    #[error("another berth is running with pin path {path}; stop it first")]
    Locked { path: String },
    #[error("{what} {path}")]
    Pin {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned link {path}")]
    Link {
        path: String,
        #[source]
        source: LinkError,
    },
    #[error("attaching the socket programs to cgroup {path}")]
    Cgroup {
        path: String,
        #[source]
        source: ProgramError,
    },
}

pub(super) type Result<T> = std::result::Result<T, DataplaneError>;

pub(super) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A removal of a key that is already gone is a success.
pub(super) fn absent_is_fine(
    r: std::result::Result<(), MapError>,
    name: &'static str,
) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}
