//! The handle on berth's kernel side: loads the eBPF object with the configured map sizes and
//! runtime settings, attaches the TC ingress program to interfaces and the socket programs to a
//! cgroup, and offers typed access to the maps.
//!
//! Loaded with a pin path (the daemon), maps and attachments are pinned in bpffs under
//! `<pin path>/v<PIN_LAYOUT>/` and outlive the process: a berth that exits leaves the dataplane
//! serving, the next one adopts the maps as they are and swaps its programs in atomically
//! (`BPF_LINK_UPDATE`), and `berth down` ([`down`]) removes it all. Loaded without one (tests,
//! benchmarks), dropping it detaches everything it attached.

use std::{
    ffi::CString,
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
    },
};
use lb_common::{
    Backend, CFG_F_REDIRECT, Counters, CtEntry, DpConfig, FlowKey, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_CONNTRACK, MAP_MAGLEV, MAP_REASON_STATS, MAP_SERVICE_STATS, MAP_SERVICES, PROG_TC_INGRESS,
    Reason, ServiceKey, ServiceValue,
};

use crate::config::DataplaneConfig;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed (are you root, with BTF at /sys/kernel/btf/vmlinux?)")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
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

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A removal of a key that is already gone is a success.
fn absent_is_fine(r: std::result::Result<(), MapError>, name: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}

/// Load-time settings of the dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataplaneOptions {
    pub maglev_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_size: u32,
    pub hash_seed: u32,
    pub redirect: bool,
    /// Decrement the TTL of packets the program forwards itself.
    pub decrement_ttl: bool,
    pub tcp_closing: Duration,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
}

impl DataplaneOptions {
    /// Options from a validated config section; a missing seed is drawn at random.
    pub fn from_config(d: &DataplaneConfig) -> Self {
        Self {
            maglev_size: d.maglev_table_size,
            max_services: d.max_services,
            max_backends: d.max_backends,
            conntrack_size: d.conntrack_size,
            hash_seed: d.hash_seed.unwrap_or_else(random_u32),
            redirect: d.redirect,
            decrement_ttl: d.decrement_ttl,
            tcp_closing: Duration::from_secs(d.tcp_closing_timeout_secs),
            tcp_idle: Duration::from_secs(d.tcp_idle_timeout_secs),
            udp_idle: Duration::from_secs(d.udp_idle_timeout_secs),
        }
    }

    /// Capacity of the unconfirmed-flow map: a quarter of the main one, at least 1024.
    pub fn ct_new_size(&self) -> u32 {
        (self.conntrack_size / 4).max(1024)
    }

    /// The global the program reads.
    pub fn dp_config(&self) -> DpConfig {
        DpConfig {
            maglev_size: self.maglev_size,
            max_services: self.max_services,
            hash_seed: self.hash_seed,
            flags: if self.redirect { CFG_F_REDIRECT } else { 0 }
                | if self.decrement_ttl {
                    0
                } else {
                    lb_common::CFG_F_KEEP_TTL
                },
            tcp_closing_ns: self.tcp_closing.as_nanos() as u64,
            tcp_idle_ns: self.tcp_idle.as_nanos() as u64,
            udp_idle_ns: self.udp_idle.as_nanos() as u64,
            host_netns_cookie: netns_cookie(),
        }
    }
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        let mut o = Self::from_config(&DataplaneConfig::default());
        o.hash_seed = 0;
        o
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(0x5eed)
    }
}

/// `SO_NETNS_COOKIE` of this process's network namespace (0 if the kernel cannot tell, which
/// no namespace has: loopback then never counts as local at the socket hooks).
pub fn netns_cookie() -> u64 {
    // SAFETY: a plain socket; getsockopt writes at most `len` bytes into `cookie`; the fd is
    // closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return 0;
        }
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        libc::close(fd);
        if r == 0 { cookie } else { 0 }
    }
}

/// Every map of the object; all are pinned (the read-only config global is not a map of ours).
const MAPS: [&str; 12] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    lb_common::MAP_BACKEND_ROUTES,
    MAP_MAGLEV,
    MAP_CONNTRACK,
    lb_common::MAP_CT_NEW,
    lb_common::MAP_PORTS,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_REASON_STATS,
    lb_common::MAP_LOCAL_ADDRS,
    lb_common::MAP_SOCK_REVNAT,
];

/// The socket programs, in attach order.
const SOCK_PROGS: [&str; 4] = [
    lb_common::PROG_SOCK_CONNECT4,
    lb_common::PROG_SOCK_SENDMSG4,
    lb_common::PROG_SOCK_RECVMSG4,
    lb_common::PROG_SOCK_GETPEERNAME4,
];

pub use crate::config::DEFAULT_PIN_PATH;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pinned state's directories, and the lock that makes one daemon its only user.
struct Pins {
    root: PathBuf,
    links: PathBuf,
    _lock: File,
}

fn pin_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let path = path.display().to_string();
    move |source| DataplaneError::Pin { what, path, source }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is NUL-terminated; statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Whether this process's mount namespace differs from PID 1's (false when that cannot be
/// told).
fn private_mount_ns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// Mounts a BPF filesystem on /sys/fs/bpf when `root` lies below it and none is mounted there
/// (as on hosts without systemd, or under `ip netns exec`); any other place must already be
/// one. Returns whether it mounted one.
fn ensure_bpffs(root: &Path) -> Result<bool> {
    let base = Path::new("/sys/fs/bpf");
    if !root.starts_with(base) || is_bpffs(base) || !base.is_dir() {
        return Ok(false);
    }
    // SAFETY: constant NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(DataplaneError::Pin {
            what: "mounting a BPF filesystem on",
            path: base.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    log::info!("mounted a BPF filesystem on /sys/fs/bpf");
    Ok(true)
}

/// Creates `dir` (and missing parents) root-only, and makes an existing one root-only too: an
/// earlier berth created the layout directories 0755, and every pin directory is berth's own.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(pin_err("creating pin directory", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(pin_err("restricting pin directory", dir))
}

/// Whether the BPF filesystem holding `root` is mounted in PID 1's mount namespace too: if not,
/// it exists only in this process's (private) mount namespace and is unmounted, pins and all,
/// when the last process there exits. That is what happens under `ip netns exec`, which gives
/// the command a mount namespace of its own with a fresh /sys, where berth then mounts a bpffs
/// nobody else sees. `None` when PID 1's mounts cannot be read.
pub fn bpffs_shared_with_init(root: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(root).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let init = std::fs::read_to_string("/proc/1/mountinfo").ok()?;
    Some(init.lines().any(|l| {
        // "36 35 0:62 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700": major:minor, and the
        // filesystem type after the " - " separator.
        let (left, right) = l.split_once(" - ").unwrap_or((l, ""));
        right.split_whitespace().next() == Some("bpf")
            && left.split_whitespace().nth(2) == Some(&format!("{major}:{minor}"))
    }))
}

/// Opens `root` (creating it, root-only) and takes its exclusive lock without waiting.
fn lock_root(root: &Path) -> Result<File> {
    private_dir(root)?;
    let f = File::open(root).map_err(pin_err("opening pin directory", root))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DataplaneError::Locked {
            path: root.display().to_string(),
        });
    }
    Ok(f)
}

/// Layout directories (`v<N>`) found under `root`.
fn layouts(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('v'))
                .collect()
        })
        .unwrap_or_default()
}

/// What `berth down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub links: Vec<String>,
    pub maps: usize,
}

/// Detaches a pinned dataplane and removes its pins (any layout version): unpinning a link
/// nobody else holds detaches it, unpinning a map frees it. Refused while a berth runs on it.
pub fn down(root: &Path) -> Result<DownReport> {
    let mut report = DownReport::default();
    if !root.exists() {
        return Ok(report);
    }
    if !is_bpffs(root) {
        // Never lock (and make root-only) a directory that cannot hold pins.
        return Err(DataplaneError::NotBpffs {
            path: root.display().to_string(),
        });
    }
    let lock = lock_root(root)?;
    for layout in layouts(root) {
        let dir = root.join(&layout);
        for (sub, links) in [("links", true), ("maps", false)] {
            let d = dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                std::fs::remove_file(e.path()).map_err(pin_err("removing pin", &e.path()))?;
                if links {
                    report
                        .links
                        .push(e.file_name().to_string_lossy().into_owned());
                } else {
                    report.maps += 1;
                }
            }
            std::fs::remove_dir(&d).map_err(pin_err("removing pin directory", &d))?;
        }
        std::fs::remove_dir(&dir).map_err(pin_err("removing pin directory", &dir))?;
    }
    drop(lock);
    std::fs::remove_dir(root).map_err(pin_err("removing pin directory", root))?;
    Ok(report)
}

/// This host's IPv4 addresses (network byte order), loopback excluded: what the socket hooks
/// take for "an address of this host" besides loopback.
pub fn host_ipv4_addrs() -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*a.cast::<libc::sockaddr_in>();
                let addr = sin.sin_addr.s_addr;
                if u32::from_be(addr) >> 24 != 127 {
                    out.insert(addr);
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// The mount point of the cgroup v2 hierarchy (from /proc/self/mountinfo).
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The loaded programs and maps.
pub struct Dataplane {
    // Field order matters for drop: maps and links go with `ebpf`.
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    backend_routes: Array<MapData, lb_common::BackendRoute>,
    maglev: Array<MapData, u32>,
    ports: Array<MapData, u8>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, u64>,
    local_addrs: HashMap<MapData, u32, u8>,
    /// What `sync_local_addrs` last made the map hold (None: not known yet, e.g. adopted).
    local_addrs_written: Option<std::collections::BTreeSet<u32>>,
    /// Flows that have only sent a SYN.
    ct_new: HashMap<MapData, FlowKey, CtEntry>,
    /// Second descriptors of the two conntrack maps, for [`Dataplane::conntrack_reader`].
    conntrack_fds: [std::os::fd::OwnedFd; 2],
    options: DataplaneOptions,
    attached: Vec<String>,
    cgroup: Option<PathBuf>,
    adopted: bool,
    /// Whether the pins outlive this process (see [`bpffs_shared_with_init`]).
    pins_outlive: bool,
    // Dropped after the maps and programs: the lock is released last.
    ebpf: Ebpf,
    pins: Option<Pins>,
}

macro_rules! take {
    ($ebpf:expr, $name:expr) => {{
        let map = $ebpf
            .take_map($name)
            .ok_or(DataplaneError::MissingMap { name: $name })?;
        map.try_into().map_err(map_err($name))?
    }};
}

impl Dataplane {
    /// Loads the object into the kernel with maps of its own (nothing is attached yet; nothing
    /// outlives the handle).
    pub fn load(options: DataplaneOptions) -> Result<Self> {
        Self::load_with(options, None)
    }

    /// Loads the object with its maps pinned under `root`: adopting the maps pinned there by an
    /// earlier berth (their contents are kept), or creating and pinning them.
    pub fn load_pinned(options: DataplaneOptions, root: &Path) -> Result<Self> {
        let rootname = root.display().to_string();
        let mounted = ensure_bpffs(root)?;
        // Made root-only only once known to be on bpffs (lock_root): any other directory is
        // refused untouched.
        std::fs::create_dir_all(root).map_err(pin_err("creating pin directory", root))?;
        if !is_bpffs(root) {
            return Err(DataplaneError::NotBpffs { path: rootname });
        }
        let lock = lock_root(root)?;
        let want = format!("v{}", lb_common::PIN_LAYOUT);
        if let Some(found) = layouts(root).into_iter().find(|l| *l != want) {
            return Err(DataplaneError::IncompatibleLayout {
                root: rootname,
                found,
            });
        }
        let dir = root.join(&want);
        let (maps, links) = (dir.join("maps"), dir.join("links"));
        for d in [&dir, &maps, &links] {
            private_dir(d)?;
        }
        let adopted = maps.join(MAP_SERVICES).exists();
        let loaded = Self::load_with(options, Some(&maps));
        if loaded.is_err() && !adopted {
            // Nothing was serving: leave nothing behind.
            drop(lock);
            let _ = down(root);
            return Err(loaded.err().expect("checked"));
        }
        let mut dp = loaded.map_err(|e| match e {
            DataplaneError::Load {
                source:
                    aya::EbpfError::MapError(MapError::IncompatiblePinnedMap {
                        name,
                        property,
                        expected,
                        actual,
                    }),
            } => DataplaneError::PinnedMismatch {
                root: rootname.clone(),
                setting: match name.as_str() {
                    MAP_CONNTRACK | lb_common::MAP_CT_NEW => "dataplane.conntrack_size",
                    MAP_MAGLEV => "dataplane.maglev_table_size x dataplane.max_services",
                    MAP_SERVICES | MAP_SERVICE_STATS => "dataplane.max_services",
                    MAP_BACKENDS | MAP_BACKEND_STATS | lb_common::MAP_BACKEND_ROUTES => {
                        "dataplane.max_backends"
                    }
                    _ => "this berth version",
                },
                map: name,
                property,
                expected,
                actual,
            },
            e => e,
        })?;
        dp.adopted = adopted;
        // Unknown (PID 1's mounts unreadable) counts as shared unless berth mounted the bpffs
        // itself in a mount namespace that is not PID 1's.
        dp.pins_outlive = bpffs_shared_with_init(root).unwrap_or(!(mounted && private_mount_ns()));
        dp.pins = Some(Pins {
            root: root.to_owned(),
            links,
            _lock: lock,
        });
        Ok(dp)
    }

    /// Whether the maps were adopted from an earlier berth (their contents are live state).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether the pinned dataplane outlives this process (false when unpinned, or pinned in a
    /// BPF filesystem only this process's mount namespace has).
    pub fn pins_outlive_process(&self) -> bool {
        self.pins.is_some() && self.pins_outlive
    }

    fn load_with(options: DataplaneOptions, pin_dir: Option<&Path>) -> Result<Self> {
        let cfg = options.dp_config();
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> = pin_dir
            .map(|d| MAPS.iter().map(|m| (*m, d.join(m))).collect())
            .unwrap_or_default();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .override_global(lb_common::GLOBAL_CONFIG, &cfg, true)
            .map_max_entries(MAP_SERVICES, options.max_services)
            .map_max_entries(MAP_SERVICE_STATS, options.max_services)
            .map_max_entries(MAP_BACKENDS, options.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, options.max_backends)
            .map_max_entries(lb_common::MAP_BACKEND_ROUTES, options.max_backends)
            .map_max_entries(MAP_MAGLEV, options.max_services * options.maglev_size)
            .map_max_entries(MAP_CONNTRACK, options.conntrack_size)
            .map_max_entries(lb_common::MAP_CT_NEW, options.ct_new_size())
            .load(crate::EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load { source })?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_TC_INGRESS)
            .ok_or(DataplaneError::MissingProgram {
                name: PROG_TC_INGRESS,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name: PROG_TC_INGRESS,
                source,
            })?;
        prog.load().map_err(|source| DataplaneError::Program {
            name: PROG_TC_INGRESS,
            source,
        })?;
        for name in SOCK_PROGS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram { name })?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let dup = |name: &'static str| {
            ebpf.map(name)
                .and_then(|m| match m {
                    aya::maps::Map::LruHashMap(md) => md.fd().as_fd().try_clone_to_owned().ok(),
                    _ => None,
                })
                .ok_or(DataplaneError::MissingMap { name })
        };
        let conntrack_fds = [dup(MAP_CONNTRACK)?, dup(lb_common::MAP_CT_NEW)?];
        Ok(Self {
            conntrack_fds,
            ct_new: take!(ebpf, lb_common::MAP_CT_NEW),
            services: take!(ebpf, MAP_SERVICES),
            backends: take!(ebpf, MAP_BACKENDS),
            backend_routes: take!(ebpf, lb_common::MAP_BACKEND_ROUTES),
            maglev: take!(ebpf, MAP_MAGLEV),
            ports: take!(ebpf, lb_common::MAP_PORTS),
            conntrack: take!(ebpf, MAP_CONNTRACK),
            service_stats: take!(ebpf, MAP_SERVICE_STATS),
            backend_stats: take!(ebpf, MAP_BACKEND_STATS),
            reason_stats: take!(ebpf, MAP_REASON_STATS),
            local_addrs: take!(ebpf, lb_common::MAP_LOCAL_ADDRS),
            local_addrs_written: None,
            options,
            attached: Vec::new(),
            cgroup: None,
            adopted: false,
            pins_outlive: false,
            ebpf,
            pins: None,
        })
    }

    /// The pin root, when pinned.
    pub fn pin_root(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.root.as_path())
    }

    /// Interfaces attached through link pins of an earlier berth, other than `except`, whose
    /// interface still exists (pins of vanished interfaces are removed).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&pins.links) else {
            return out;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((index, iface)) = name
                .strip_prefix("tc-")
                .and_then(|r| r.split_once('-'))
                .and_then(|(i, n)| Some((i.parse::<u32>().ok()?, n.to_owned())))
            else {
                continue;
            };
            if ifindex(&iface) == Some(index) {
                out.push(iface);
            } else {
                // The interface is gone (the kernel detached the link): drop the stale pin.
                let _ = std::fs::remove_file(e.path());
            }
        }
        out
    }

    pub fn options(&self) -> &DataplaneOptions {
        &self.options
    }

    /// The TC ingress program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn program(&self) -> &SchedClassifier {
        self.ebpf
            .program(PROG_TC_INGRESS)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .expect("program checked at load")
    }

    /// Loads the do-nothing classifier (benchmark floor) and returns it.
    pub fn noop_program(&mut self) -> Result<&SchedClassifier> {
        let name = lb_common::PROG_TC_NOOP;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Attaches the TC ingress program to `iface` (TCX on kernels >= 6.6, clsact otherwise).
    /// Pinned, an attachment pinned by an earlier berth is taken over (its program swapped for
    /// ours in one step, no packet unprocessed) and a new one is pinned. Returns whether an
    /// earlier attachment was taken over.
    pub fn attach(&mut self, iface: &str) -> Result<bool> {
        let unknown = || DataplaneError::UnknownInterface {
            iface: iface.to_owned(),
        };
        let name = CString::new(iface).map_err(|_| unknown())?;
        let index = ifindex(iface).ok_or_else(unknown)?;
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            source,
        };
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let pin = self
            .pins
            .as_ref()
            .filter(|_| tcx)
            .map(|p| p.links.join(format!("tc-{index}-{iface}")));
        let pinned = match &pin {
            Some(path) if path.exists() => Some(FdLink::from(PinnedLink::from_pin(path).map_err(
                |source| DataplaneError::Link {
                    path: path.display().to_string(),
                    source,
                },
            )?)),
            _ => None,
        };
        let pinned_prog = pinned
            .as_ref()
            .and_then(|l| l.info().ok())
            .map(|i| i.program_id());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_TC_INGRESS)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("program checked at load");
        if tcx {
            // Kernel program names keep 15 characters.
            let prefix = &PROG_TC_INGRESS.as_bytes()[..15];
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&name, TcAttachType::Ingress)
                && let Some(p) = progs
                    .iter()
                    .find(|p| p.name().starts_with(prefix) && Some(p.id()) != pinned_prog)
            {
                return Err(DataplaneError::AlreadyAttached {
                    iface: iface.to_owned(),
                    prog_id: p.id(),
                    pins: self
                        .pins
                        .as_ref()
                        .map_or("(none)".into(), |p| p.root.display().to_string()),
                });
            }
        } else {
            // Older kernels attach through a clsact qdisc; it may already exist.
            let _ = aya::programs::tc::qdisc_add_clsact(&name);
        }
        let took_over = pinned.is_some();
        match (pinned, pin) {
            (Some(pinned), Some(path)) => {
                let link = SchedClassifierLink::try_from(pinned).map_err(|source| {
                    DataplaneError::Link {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                prog.attach_to_link(link).map_err(attach_err)?;
            }
            (None, Some(path)) => {
                let id = prog
                    .attach(&name, TcAttachType::Ingress)
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                    path: path.display().to_string(),
                    source,
                })?;
                fd.pin(&path).map_err(|e| DataplaneError::Pin {
                    what: "pinning link",
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
            }
            _ => {
                prog.attach(&name, TcAttachType::Ingress)
                    .map_err(attach_err)?;
            }
        }
        self.attached.push(iface.to_owned());
        Ok(took_over)
    }

    /// Attaches the socket programs (connect4, sendmsg4, recvmsg4, getpeername4) to the cgroup v2
    /// directory `path`: every socket of its processes and descendants is balanced. Pinned,
    /// attachments of an earlier berth to the same cgroup are taken over, and those to another
    /// cgroup removed.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let cg_err = |source| DataplaneError::Cgroup {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(pin_err("opening cgroup", path))?;
        let ino = file
            .metadata()
            .map_err(pin_err("opening cgroup", path))?
            .ino();
        if let Some(pins) = &self.pins
            && let Ok(entries) = std::fs::read_dir(&pins.links)
        {
            let mine = format!("cg-{ino}-");
            for e in entries.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("cg-") && !n.starts_with(&mine) {
                    std::fs::remove_file(e.path()).map_err(pin_err("removing pin", &e.path()))?;
                }
            }
        }
        for name in SOCK_PROGS {
            let pin = self
                .pins
                .as_ref()
                .map(|p| p.links.join(format!("cg-{ino}-{name}")));
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
                .expect("program checked at load");
            let link_err = |path: &Path| {
                let path = path.display().to_string();
                move |source| DataplaneError::Link { path, source }
            };
            match pin {
                Some(path) if path.exists() => {
                    let pinned = PinnedLink::from_pin(&path).map_err(link_err(&path))?;
                    let link = aya::programs::cgroup_sock_addr::CgroupSockAddrLink::try_from(
                        FdLink::from(pinned),
                    )
                    .map_err(link_err(&path))?;
                    prog.attach_to_link(link).map_err(cg_err)?;
                }
                Some(path) => {
                    // Through a bpf_link (kernels >= 5.7) the flags must be 0 ("Single"); links
                    // always coexist with other programs on the cgroup.
                    let id = prog
                        .attach(&file, CgroupAttachMode::Single)
                        .map_err(cg_err)?;
                    let link = prog.take_link(id).map_err(cg_err)?;
                    let fd = FdLink::try_from(link).map_err(link_err(&path))?;
                    fd.pin(&path).map_err(|e| DataplaneError::Pin {
                        what: "pinning link",
                        path: path.display().to_string(),
                        source: std::io::Error::other(e),
                    })?;
                }
                None => {
                    prog.attach(&file, CgroupAttachMode::Single)
                        .map_err(cg_err)?;
                }
            }
        }
        self.cgroup = Some(path.to_owned());
        Ok(())
    }

    /// The cgroup the socket programs are attached to.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// Makes the local-address set (network byte order, loopback excluded) exactly `addrs`;
    /// returns the number of writes.
    pub fn sync_local_addrs(&mut self, addrs: &std::collections::BTreeSet<u32>) -> Result<usize> {
        let name = lb_common::MAP_LOCAL_ADDRS;
        if self.local_addrs_written.as_ref() == Some(addrs) {
            return Ok(0); // the usual case, every second: no map access at all
        }
        let have: std::collections::BTreeSet<u32> =
            self.local_addrs.keys().filter_map(|k| k.ok()).collect();
        let mut writes = 0;
        for a in have.difference(addrs) {
            absent_is_fine(self.local_addrs.remove(a), name)?;
            writes += 1;
        }
        for a in addrs.difference(&have) {
            self.local_addrs.insert(a, &1, 0).map_err(map_err(name))?;
            writes += 1;
        }
        self.local_addrs_written = Some(addrs.clone());
        Ok(writes)
    }

    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    // ---- services and backends ----

    pub fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.services
            .insert(&key, &value, 0)
            .map_err(map_err(MAP_SERVICES))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        absent_is_fine(self.services.remove(key), MAP_SERVICES)
    }

    pub fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().filter_map(|r| r.ok()).collect()
    }

    /// Writes a backend slot, dropping any route cached for the slot's previous occupant.
    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backend_routes
            .set(id, &lb_common::BackendRoute::default(), 0)
            .map_err(map_err(lb_common::MAP_BACKEND_ROUTES))?;
        self.backends
            .set(id, &backend, 0)
            .map_err(map_err(MAP_BACKENDS))
    }

    /// A backend slot as the kernel holds it.
    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends.get(&id, 0).map_err(map_err(MAP_BACKENDS))
    }

    /// The route cached for a backend id.
    pub fn backend_route(&self, id: u32) -> Result<lb_common::BackendRoute> {
        self.backend_routes
            .get(&id, 0)
            .map_err(map_err(lb_common::MAP_BACKEND_ROUTES))
    }

    /// Writes one slot of a service's Maglev row.
    pub fn set_maglev_slot(&mut self, service_id: u32, slot: u32, backend_id: u32) -> Result<()> {
        let index = service_id * self.options.maglev_size + slot;
        self.maglev
            .set(index, &backend_id, 0)
            .map_err(map_err(MAP_MAGLEV))
    }

    pub fn maglev_slot(&self, service_id: u32, slot: u32) -> Result<u32> {
        let index = service_id * self.options.maglev_size + slot;
        self.maglev.get(&index, 0).map_err(map_err(MAP_MAGLEV))
    }

    /// Adds `PORT_F_*` bits to a (host-order) port's filter entry.
    pub fn add_port_flags(&mut self, port: u16, flags: u8) -> Result<()> {
        let name = lb_common::MAP_PORTS;
        let cur = self.ports.get(&u32::from(port), 0).map_err(map_err(name))?;
        if cur & flags != flags {
            self.ports
                .set(u32::from(port), &(cur | flags), 0)
                .map_err(map_err(name))?;
        }
        Ok(())
    }

    // ---- conntrack ----

    /// An independent handle on the conntrack map, to walk it off the daemon's event loop (a
    /// full walk costs two syscalls per entry).
    pub fn conntrack_reader(&self) -> Result<ConntrackReader> {
        let mut maps = Vec::new();
        for fd in &self.conntrack_fds {
            let fd = fd
                .try_clone()
                .map_err(|e| map_err(MAP_CONNTRACK)(MapError::IoError(e)))?;
            let md = MapData::from_fd(fd).map_err(map_err(MAP_CONNTRACK))?;
            maps.push(
                HashMap::try_from(aya::maps::Map::LruHashMap(md))
                    .map_err(map_err(MAP_CONNTRACK))?,
            );
        }
        Ok(ConntrackReader {
            maps,
            cfg: self.options.dp_config(),
        })
    }

    /// Every conntrack entry: established flows, then unconfirmed ones.
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, CtEntry)> {
        count_walk();
        self.conntrack
            .iter()
            .chain(self.ct_new.iter())
            .filter_map(|r| r.ok())
            .collect()
    }

    /// Entries of flows that have only sent a SYN.
    pub fn unconfirmed_entries(&self) -> Vec<(FlowKey, CtEntry)> {
        self.ct_new.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn conntrack_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack
            .get(key, 0)
            .ok()
            .or_else(|| self.ct_new.get(key, 0).ok())
    }

    pub fn conntrack_insert(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        self.conntrack
            .insert(&key, &entry, 0)
            .map_err(map_err(MAP_CONNTRACK))
    }

    pub fn conntrack_remove(&mut self, key: &FlowKey) -> Result<()> {
        absent_is_fine(self.conntrack.remove(key), MAP_CONNTRACK)?;
        absent_is_fine(self.ct_new.remove(key), lb_common::MAP_CT_NEW)
    }

    // ---- counters ----

    fn sum<T: Copy + Default + aya::Pod>(
        map: &PerCpuArray<MapData, T>,
        index: u32,
        name: &'static str,
        add: impl Fn(T, T) -> T,
    ) -> Result<T> {
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().fold(T::default(), |acc, v| add(acc, *v)))
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.service_stats, id, MAP_SERVICE_STATS, add_counters)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.backend_stats, id, MAP_BACKEND_STATS, add_counters)
    }

    /// All reason counters, summed over CPUs, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|&r| {
                Ok((
                    r,
                    Self::sum(&self.reason_stats, r as u32, MAP_REASON_STATS, |a, b| a + b)?,
                ))
            })
            .collect()
    }

    fn zeroed_per_cpu() -> Result<PerCpuValues<Counters>> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            name: MAP_SERVICE_STATS,
            source: MapError::IoError(e),
        })?;
        PerCpuValues::try_from(vec![Counters::default(); cpus.get() as usize]).map_err(|e| {
            DataplaneError::Map {
                name: MAP_SERVICE_STATS,
                source: MapError::IoError(e),
            }
        })
    }

    /// Zeroes a service id's counters (before the id is given to a new service).
    pub fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        let zero = Self::zeroed_per_cpu()?;
        self.service_stats
            .set(id, zero, 0)
            .map_err(map_err(MAP_SERVICE_STATS))
    }

    /// Zeroes a backend id's counters (before the id is given to a new backend).
    pub fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        let zero = Self::zeroed_per_cpu()?;
        self.backend_stats
            .set(id, zero, 0)
            .map_err(map_err(MAP_BACKEND_STATS))
    }
}

/// Full walks of the conntrack maps since the process started (each costs two syscalls per
/// entry): what the metrics cache and the sweep's interval keep rare.
static CONNTRACK_WALKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many full conntrack walks this process has made.
pub fn conntrack_walks() -> u64 {
    CONNTRACK_WALKS.load(std::sync::atomic::Ordering::Relaxed)
}

fn count_walk() {
    CONNTRACK_WALKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The conntrack map through its own descriptor (`Send`: for `spawn_blocking`).
pub struct ConntrackReader {
    /// The main map and the unconfirmed-flow map.
    maps: Vec<HashMap<MapData, FlowKey, CtEntry>>,
    cfg: DpConfig,
}

impl ConntrackReader {
    pub fn entries(&self) -> Vec<(FlowKey, CtEntry)> {
        count_walk();
        self.maps
            .iter()
            .flat_map(|m| m.iter().filter_map(|r| r.ok()))
            .collect()
    }

    /// Removes entries idle past their timeout (the rule the program applies), returning how
    /// many were removed. `now_ns` is CLOCK_MONOTONIC, the clock of `bpf_ktime_get_coarse_ns`.
    pub fn gc(&mut self, now_ns: u64) -> Result<usize> {
        let stale: Vec<FlowKey> = self
            .entries()
            .into_iter()
            .filter(|(k, e)| lb_common::ct::idle_expired(e, k.proto, now_ns, &self.cfg))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            for m in &mut self.maps {
                absent_is_fine(m.remove(k), MAP_CONNTRACK)?;
            }
        }
        Ok(stale.len())
    }
}

fn add_counters(a: Counters, b: Counters) -> Counters {
    Counters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock the program's conntrack timestamps use).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
