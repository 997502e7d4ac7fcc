//! The handle on berth's kernel side: loads the eBPF object with the configured map sizes and
//! runtime settings, attaches the TC ingress program to interfaces, and offers typed access to
//! the maps. Dropping it detaches everything it attached.

use std::{ffi::CString, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, SchedClassifier, tc::TcAttachType},
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
        "a berth program (id {prog_id}) is already attached to {iface}: is another berth running? \
         Stop it first (a second one would translate packets twice)"
    )]
    AlreadyAttached { iface: String, prog_id: u32 },
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A removal of a key that is already gone is a success.
fn absent_is_fine(r: std::result::Result<(), MapError>, name: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
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
            tcp_closing: Duration::from_secs(d.tcp_closing_timeout_secs),
            tcp_idle: Duration::from_secs(d.tcp_idle_timeout_secs),
            udp_idle: Duration::from_secs(d.udp_idle_timeout_secs),
        }
    }

    /// The global the program reads.
    pub fn dp_config(&self) -> DpConfig {
        DpConfig {
            maglev_size: self.maglev_size,
            max_services: self.max_services,
            hash_seed: self.hash_seed,
            flags: if self.redirect { CFG_F_REDIRECT } else { 0 },
            tcp_closing_ns: self.tcp_closing.as_nanos() as u64,
            tcp_idle_ns: self.tcp_idle.as_nanos() as u64,
            udp_idle_ns: self.udp_idle.as_nanos() as u64,
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
    options: DataplaneOptions,
    attached: Vec<String>,
    ebpf: Ebpf,
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
    /// Loads the object into the kernel (nothing is attached yet).
    pub fn load(options: DataplaneOptions) -> Result<Self> {
        let cfg = options.dp_config();
        let mut ebpf = EbpfLoader::new()
            .override_global(lb_common::GLOBAL_CONFIG, &cfg, true)
            .map_max_entries(MAP_SERVICES, options.max_services)
            .map_max_entries(MAP_SERVICE_STATS, options.max_services)
            .map_max_entries(MAP_BACKENDS, options.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, options.max_backends)
            .map_max_entries(lb_common::MAP_BACKEND_ROUTES, options.max_backends)
            .map_max_entries(MAP_MAGLEV, options.max_services * options.maglev_size)
            .map_max_entries(MAP_CONNTRACK, options.conntrack_size)
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
        Ok(Self {
            services: take!(ebpf, MAP_SERVICES),
            backends: take!(ebpf, MAP_BACKENDS),
            backend_routes: take!(ebpf, lb_common::MAP_BACKEND_ROUTES),
            maglev: take!(ebpf, MAP_MAGLEV),
            ports: take!(ebpf, lb_common::MAP_PORTS),
            conntrack: take!(ebpf, MAP_CONNTRACK),
            service_stats: take!(ebpf, MAP_SERVICE_STATS),
            backend_stats: take!(ebpf, MAP_BACKEND_STATS),
            reason_stats: take!(ebpf, MAP_REASON_STATS),
            options,
            attached: Vec::new(),
            ebpf,
        })
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
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        let name = CString::new(iface).map_err(|_| DataplaneError::UnknownInterface {
            iface: iface.to_owned(),
        })?;
        // SAFETY: `name` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            return Err(DataplaneError::UnknownInterface {
                iface: iface.to_owned(),
            });
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_TC_INGRESS)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("program checked at load");
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if tcx {
            // Kernel program names keep 15 characters.
            let prefix = &PROG_TC_INGRESS.as_bytes()[..15];
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&name, TcAttachType::Ingress)
                && let Some(p) = progs.iter().find(|p| p.name().starts_with(prefix))
            {
                return Err(DataplaneError::AlreadyAttached {
                    iface: iface.to_owned(),
                    prog_id: p.id(),
                });
            }
        } else {
            // Older kernels attach through a clsact qdisc; it may already exist.
            let _ = aya::programs::tc::qdisc_add_clsact(&name);
        }
        prog.attach(&name, TcAttachType::Ingress)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                source,
            })?;
        self.attached.push(iface.to_owned());
        Ok(())
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

    pub fn conntrack_entries(&self) -> Vec<(FlowKey, CtEntry)> {
        self.conntrack.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn conntrack_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack.get(key, 0).ok()
    }

    pub fn conntrack_insert(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        self.conntrack
            .insert(&key, &entry, 0)
            .map_err(map_err(MAP_CONNTRACK))
    }

    pub fn conntrack_remove(&mut self, key: &FlowKey) -> Result<()> {
        absent_is_fine(self.conntrack.remove(key), MAP_CONNTRACK)
    }

    /// Removes entries idle past their timeout (the same rule the program applies), returning
    /// how many were removed. `now_ns` is CLOCK_MONOTONIC, the clock of `bpf_ktime_get_coarse_ns`.
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<usize> {
        let cfg = self.options.dp_config();
        let stale: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, e)| lb_common::ct::idle_expired(e, k.proto, now_ns, &cfg))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            self.conntrack_remove(k)?;
        }
        Ok(stale.len())
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
