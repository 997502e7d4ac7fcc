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
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray},
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

mod attach;
mod conntrack;
mod error;
mod host;
mod maps;
mod pins;
mod summed;
mod v6;

pub use summed::{ChecksumMode, SkbLayout};

pub use conntrack::{ConntrackReader, conntrack_walks};
pub use error::DataplaneError;
use error::*;
use host::*;
pub use host::{
    cgroup2_root, driver_of, host_ipv4_addrs, monotonic_ns, netns_cookie, source_toward,
    source_toward6,
};
use pins::*;
pub use pins::{DownReport, bpffs_shared_with_init, down};
pub(crate) use v6::member_id6;
pub use v6::{Backend6Spec, host_ipv6_addrs};

pub use crate::config::DEFAULT_PIN_PATH;

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
    /// Answer traffic to a service with no backend with a RST or port unreachable (else drop).
    pub reject_no_backend: bool,
    pub tcp_closing: Duration,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    /// Source address of full-NAT flows (`None`: the one the kernel would use toward each
    /// backend; the reconciler asks it).
    pub snat_address: Option<std::net::Ipv4Addr>,
    /// The same for IPv6 backends.
    pub snat_address6: Option<std::net::Ipv6Addr>,
    /// Source ports of full-NAT flows.
    pub snat_ports: crate::config::PortRange,
    /// How long a fully closed full-NAT flow keeps its source port.
    pub snat_reuse: Duration,
    /// How many services one backend's flows are recorded lazily for (lb-common's
    /// `LAZY_OWNERS`; fewer only where a test wants flows of a further service recorded with
    /// their reply entry).
    pub lazy_services: u32,
    /// Update rewritten packets' TCP/UDP checksums by hand where the kernel's BTF lets the
    /// program read the skb's `ip_summed` (see [`ChecksumMode`]); false: always through the
    /// kernel's helpers (for tests of that path).
    pub checksums_by_hand: bool,
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
            reject_no_backend: d.reject_without_backend,
            tcp_closing: Duration::from_secs(d.tcp_closing_timeout_secs),
            tcp_idle: Duration::from_secs(d.tcp_idle_timeout_secs),
            udp_idle: Duration::from_secs(d.udp_idle_timeout_secs),
            snat_address: d.snat_address,
            snat_address6: d.snat_address6,
            snat_ports: d.snat_ports,
            snat_reuse: Duration::from_millis(d.snat_port_reuse_ms),
            lazy_services: lb_common::LAZY_OWNERS as u32,
            checksums_by_hand: true,
        }
    }

    /// Capacity of the unconfirmed-flow map: a quarter of the main one, at least 1024.
    pub fn ct_new_size(&self) -> u32 {
        (self.conntrack_size / 4).max(1024)
    }

    /// Sets of the pending-handshake table (`lb_common::syn`): `SYN_WAYS` slots each, at
    /// least as many slots as [`Self::ct_new_size`].
    pub fn syn_sets(&self) -> u32 {
        lb_common::syn::syn_sets(self.ct_new_size())
    }

    /// Words of the full-NAT port claims (`lb_common::claim`).
    pub fn snat_claims(&self) -> u32 {
        lb_common::claim::snat_claims(self.ct_new_size())
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
                }
                | if self.reject_no_backend {
                    0
                } else {
                    lb_common::CFG_F_DROP_NO_BACKEND
                },
            tcp_closing_ns: self.tcp_closing.as_nanos() as u64,
            tcp_idle_ns: self.tcp_idle.as_nanos() as u64,
            udp_idle_ns: self.udp_idle.as_nanos() as u64,
            host_netns_cookie: netns_cookie(),
            snat_port_first: self.snat_ports.first,
            snat_port_last: self.snat_ports.last,
            snat_reuse_ms: self.snat_reuse.as_millis().min(u128::from(u32::MAX)) as u32,
            syn_sets: self.syn_sets(),
            snat_claims: self.snat_claims(),
            // Each load's own, drawn by `Dataplane::load_with` (lb-common's `epoch`).
            instance: 0,
            lazy_owners: self.lazy_services.clamp(1, lb_common::LAZY_OWNERS as u32),
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

/// Every map of the object; all are pinned (the read-only config global is not a map of ours).
const MAPS: [&str; 26] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    lb_common::MAP_BACKEND_ROUTES,
    MAP_MAGLEV,
    MAP_CONNTRACK,
    lb_common::MAP_CT_NEW,
    lb_common::syn::MAP_CT_SYN,
    lb_common::claim::MAP_SNAT_CLAIMS,
    lb_common::claim::MAP_FNAT_INDEX,
    lb_common::claim::MAP_FNAT_NAMED,
    lb_common::MAP_LAZY_REPLY,
    lb_common::MAP_PORTS,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_REASON_STATS,
    lb_common::MAP_LOCAL_ADDRS,
    lb_common::MAP_SOCK_REVNAT,
    lb_common::v6::MAP_SERVICES6,
    lb_common::v6::MAP_BACKENDS6,
    lb_common::v6::MAP_CONNTRACK6,
    lb_common::v6::MAP_CT_NEW6,
    lb_common::v6::MAP_LOCAL_ADDRS6,
    lb_common::v6::MAP_SOCK_REVNAT6,
    lb_common::MAP_XDP_DEVS,
    lb_common::MAP_TC_V6,
    lb_common::epoch::MAP_EPOCH,
];

/// The socket programs, in attach order: IPv4's, then IPv6's.
const SOCK_PROGS: [&str; 8] = [
    lb_common::PROG_SOCK_CONNECT4,
    lb_common::PROG_SOCK_SENDMSG4,
    lb_common::PROG_SOCK_RECVMSG4,
    lb_common::PROG_SOCK_GETPEERNAME4,
    lb_common::PROG_SOCK_CONNECT6,
    lb_common::PROG_SOCK_SENDMSG6,
    lb_common::PROG_SOCK_RECVMSG6,
    lb_common::PROG_SOCK_GETPEERNAME6,
];

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
    /// Handshakes pending (lb-common's `syn`), the map mapped into this process: read in
    /// place, one way cleared in place.
    syn_view: conntrack::SynView,
    /// The full-NAT port claims (lb-common's `claim`), mapped (read; written by tests only).
    claim_view: conntrack::ClaimView,
    /// The full-NAT reply index (lb-common's `claim::MAP_FNAT_INDEX`): written by the program,
    /// and by tests only here.
    fnat_index: Array<MapData, FlowKey>,
    /// Which of its slots name a flow (`claim::MAP_FNAT_NAMED`).
    fnat_named: Array<MapData, u64>,
    /// DNAT backend -> the service whose flows to it get their reply entry lazily.
    lazy_reply: HashMap<MapData, ServiceKey, lb_common::LazyOwners>,
    /// The table epoch (lb-common's `epoch`), this load's instance token written beside it,
    /// and whether a change of the tables a pick reads is under way (the epoch odd).
    epoch: Array<MapData, lb_common::epoch::Epoch>,
    instance: u32,
    changing: bool,
    /// How the loaded TC program updates rewritten packets' checksums.
    checksum_mode: ChecksumMode,
    /// Second descriptors of the conntrack maps (IPv4's two, then IPv6's, then the handshake
    /// table and the port claims), for [`Dataplane::conntrack_reader`].
    conntrack_fds: [std::os::fd::OwnedFd; 6],
    options: DataplaneOptions,
    attached: Vec<String>,
    adopted: bool,
    /// Whether the pins outlive this process (see [`bpffs_shared_with_init`]).
    pins_outlive: bool,
    // Dropped after the maps and programs: the lock is released last.
    ebpf: Ebpf,
    pins: Option<Pins>,
}

/// Loads classifier `name` of the object into the kernel.
fn load_classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })?;
    prog.load()
        .map_err(|source| DataplaneError::Program { name, source })?;
    Ok(prog)
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
                    MAP_CONNTRACK
                    | lb_common::MAP_CT_NEW
                    | lb_common::syn::MAP_CT_SYN
                    | lb_common::claim::MAP_SNAT_CLAIMS
                    | lb_common::claim::MAP_FNAT_INDEX
                    | lb_common::claim::MAP_FNAT_NAMED
                    | lb_common::v6::MAP_CONNTRACK6
                    | lb_common::v6::MAP_CT_NEW6 => "dataplane.conntrack_size",
                    MAP_MAGLEV => "dataplane.maglev_table_size x dataplane.max_services",
                    MAP_SERVICES | MAP_SERVICE_STATS | lb_common::v6::MAP_SERVICES6 => {
                        "dataplane.max_services"
                    }
                    MAP_BACKENDS
                    | MAP_BACKEND_STATS
                    | lb_common::MAP_BACKEND_ROUTES
                    | lb_common::MAP_LAZY_REPLY
                    | lb_common::v6::MAP_BACKENDS6 => "dataplane.max_backends",
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
        let cfg = DpConfig {
            instance: random_u32() | 1,
            ..options.dp_config()
        };
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> = pin_dir
            .map(|d| MAPS.iter().map(|m| (*m, d.join(m))).collect())
            .unwrap_or_default();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let checksum_mode = if !options.checksums_by_hand {
            ChecksumMode::Helpers("by-hand checksums turned off")
        } else {
            match summed::kernel_layout() {
                Ok(l) => ChecksumMode::ByHand(l),
                Err(why) => ChecksumMode::Helpers(why),
            }
        };
        // The object with the program's `ip_summed` read patched in, in 8-byte-aligned memory
        // (the ELF parser reads it in place).
        let mut object = vec![0u64; crate::EBPF_OBJECT.len().div_ceil(8)];
        // SAFETY: the u64s' memory viewed as bytes, no longer than it; any byte is a valid u8.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                object.as_mut_ptr().cast::<u8>(),
                crate::EBPF_OBJECT.len(),
            )
        };
        bytes.copy_from_slice(crate::EBPF_OBJECT);
        let places = summed::patch(bytes, checksum_mode)
            .map_err(|reason| DataplaneError::Object { reason })?;
        if places == 0 {
            return Err(DataplaneError::Object {
                reason: "the TC program has no ip_summed read to patch".to_owned(),
            });
        }
        tracing::info!("TCP/UDP checksums of rewritten packets: {checksum_mode}");
        let bytes: &[u8] = bytes;
        let mut ebpf = loader
            .override_global(lb_common::GLOBAL_CONFIG, &cfg, true)
            .map_max_entries(MAP_SERVICES, options.max_services)
            .map_max_entries(MAP_SERVICE_STATS, options.max_services)
            .map_max_entries(MAP_BACKENDS, options.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, options.max_backends)
            .map_max_entries(lb_common::MAP_BACKEND_ROUTES, options.max_backends)
            .map_max_entries(lb_common::MAP_LAZY_REPLY, options.max_backends)
            .map_max_entries(MAP_MAGLEV, options.max_services * options.maglev_size)
            .map_max_entries(MAP_CONNTRACK, options.conntrack_size)
            .map_max_entries(lb_common::MAP_CT_NEW, options.ct_new_size())
            .map_max_entries(lb_common::syn::MAP_CT_SYN, options.syn_sets())
            .map_max_entries(lb_common::claim::MAP_SNAT_CLAIMS, options.snat_claims())
            .map_max_entries(lb_common::claim::MAP_FNAT_INDEX, options.snat_claims())
            .map_max_entries(
                lb_common::claim::MAP_FNAT_NAMED,
                lb_common::claim::named_words(options.snat_claims()),
            )
            .map_max_entries(lb_common::v6::MAP_SERVICES6, options.max_services)
            .map_max_entries(lb_common::v6::MAP_BACKENDS6, options.max_backends)
            .map_max_entries(lb_common::v6::MAP_CONNTRACK6, options.conntrack_size)
            .map_max_entries(lb_common::v6::MAP_CT_NEW6, options.ct_new_size())
            .load(bytes)
            .map_err(|source| DataplaneError::Load { source })?;
        load_classifier(&mut ebpf, PROG_TC_INGRESS)?;
        // The IPv6 classifier, which the IPv4 one tail-calls: loaded and put in its slot before
        // anything is attached.
        let v6 = lb_common::PROG_TC_INGRESS6;
        let prog = load_classifier(&mut ebpf, v6)?;
        let v6_fd = prog
            .fd()
            .map_err(|source| DataplaneError::Program { name: v6, source })?
            .try_clone()
            .map_err(|e| DataplaneError::Program {
                name: v6,
                source: ProgramError::IOError(e),
            })?;
        let mut tail: ProgramArray<&mut MapData> = ebpf
            .map_mut(lb_common::MAP_TC_V6)
            .ok_or(DataplaneError::MissingMap {
                name: lb_common::MAP_TC_V6,
            })?
            .try_into()
            .map_err(map_err(lb_common::MAP_TC_V6))?;
        tail.set(0, &v6_fd, 0)
            .map_err(map_err(lb_common::MAP_TC_V6))?;
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
                    aya::maps::Map::LruHashMap(md) | aya::maps::Map::Array(md) => {
                        md.fd().as_fd().try_clone_to_owned().ok()
                    }
                    _ => None,
                })
                .ok_or(DataplaneError::MissingMap { name })
        };
        let conntrack_fds = [
            dup(MAP_CONNTRACK)?,
            dup(lb_common::MAP_CT_NEW)?,
            dup(lb_common::v6::MAP_CONNTRACK6)?,
            dup(lb_common::v6::MAP_CT_NEW6)?,
            dup(lb_common::syn::MAP_CT_SYN)?,
            dup(lb_common::claim::MAP_SNAT_CLAIMS)?,
        ];
        let ct_syn: Array<MapData, lb_common::syn::SynSet> =
            take!(ebpf, lb_common::syn::MAP_CT_SYN);
        // Only its size is needed: the table is read and written through the mapping.
        let syn_view = conntrack::SynView::of(conntrack_fds[4].as_fd(), ct_syn.len())?;
        drop(ct_syn);
        let claims: Array<MapData, u64> = take!(ebpf, lb_common::claim::MAP_SNAT_CLAIMS);
        // Read through the mapping only (the daemon lists the handshakes whose claims name them).
        let claim_view = conntrack::ClaimView::of(conntrack_fds[5].as_fd(), claims.len())?;
        drop(claims);
        let mut dp = Self {
            epoch: take!(ebpf, lb_common::epoch::MAP_EPOCH),
            instance: cfg.instance,
            changing: false,
            checksum_mode,
            conntrack_fds,
            ct_new: take!(ebpf, lb_common::MAP_CT_NEW),
            syn_view,
            claim_view,
            lazy_reply: take!(ebpf, lb_common::MAP_LAZY_REPLY),
            fnat_index: take!(ebpf, lb_common::claim::MAP_FNAT_INDEX),
            fnat_named: take!(ebpf, lb_common::claim::MAP_FNAT_NAMED),
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
            adopted: false,
            pins_outlive: false,
            ebpf,
            pins: None,
        };
        // Nothing this program picks is stamped until its owner settles the tables it wrote
        // (and an earlier berth's program, still running on adopted maps, stops stamping).
        dp.changing()?;
        Ok(dp)
    }

    /// How the loaded TC program updates rewritten packets' TCP/UDP checksums.
    pub fn checksum_mode(&self) -> ChecksumMode {
        self.checksum_mode
    }

    /// Interfaces attached through link pins of an earlier berth whose interface still exists (pins of vanished interfaces are removed).
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

    /// How many instructions the verifier processed for each loaded packet program (the TC
    /// classifiers and, if loaded, the XDP fast path): each must stay under the kernel's
    /// 1,000,000 per program. None where the kernel does not report it.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        [
            PROG_TC_INGRESS,
            lb_common::PROG_TC_INGRESS6,
            lb_common::PROG_XDP,
        ]
        .into_iter()
        .filter_map(|name| {
            let info = self.ebpf.program(name)?.info().ok()?;
            Some((name, info.verified_instruction_count()))
        })
        .collect()
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

    /// Loads the XDP fast path (issue 14) if not loaded yet and returns it. Loaded on demand:
    /// a berth without `[dataplane] xdp` never loads it.
    pub fn xdp_program(&mut self) -> Result<&aya::programs::Xdp> {
        self.xdp_program_named(lb_common::PROG_XDP)
    }

    /// Loads the do-nothing XDP program (benchmark floor) and returns it.
    pub fn xdp_noop_program(&mut self) -> Result<&aya::programs::Xdp> {
        self.xdp_program_named(lb_common::PROG_XDP_NOOP)
    }

    fn xdp_program_named(&mut self, name: &'static str) -> Result<&aya::programs::Xdp> {
        let prog: &mut aya::programs::Xdp = self
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

    /// Marks interface `ifindex` as taking XDP frames: the XDP program may redirect into it.
    pub fn set_xdp_target(&mut self, ifindex: u32) -> Result<()> {
        let name = lb_common::MAP_XDP_DEVS;
        let mut m: aya::maps::DevMapHash<&mut MapData> = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?
            .try_into()
            .map_err(map_err(name))?;
        m.insert(ifindex, ifindex, None, 0).map_err(|e| match e {
            aya::maps::xdp::XdpMapError::MapError(e) => map_err(name)(e),
            e => map_err(name)(MapError::InvalidName {
                name: e.to_string(),
            }),
        })
    }
}
