//! The dataplane's maps. Sizes here are defaults; userspace sets the real ones at load time
//! (`EbpfLoader::map_max_entries`), and names are the `MAP_*` constants of lb-common.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    Backend, BackendRoute, Counters, CtEntry, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAGLEV_SIZE,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_SOCK_REVNAT_SIZE, FlowKey, LazyOwners,
    Reason, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    v6::{SockRevKey6, SockRevValue6},
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend id -> backend. Id 0 is never assigned, so an all-zero Maglev slot means "no backend".
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// `max_services` rows of `maglev_size` backend ids.
#[map]
pub static BACKEND_ROUTES: Array<BackendRoute> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static MAGLEV: Array<u32> =
    Array::with_max_entries(DEFAULT_MAX_SERVICES * DEFAULT_MAGLEV_SIZE, 0);

#[map]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Flows that have only sent a SYN (see lb-common's `MAP_CT_NEW`); userspace sizes it.
#[map]
pub static CT_NEW: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE / 4, 0);

/// The pending-handshake table (see lb-common's `syn`); userspace sizes it, and maps it into
/// its memory to clear one slot without writing the rest of its set (`BPF_F_MMAPABLE`).
#[map]
pub static CT_SYN: Array<lb_common::syn::SynSet> = Array::with_max_entries(
    DEFAULT_CONNTRACK_SIZE / 16,
    aya_ebpf::bindings::BPF_F_MMAPABLE,
);

/// Per-CPU copy of the pending-handshake slot being read (`syn::find`): a reader judges its own
/// copy, and the call chains' 512-byte stack has no room for one. Same reasoning as [`SCRATCH`].
#[map]
pub static SYN_SCRATCH: PerCpuArray<lb_common::syn::SynSlot> = PerCpuArray::with_max_entries(1, 0);

/// A DNAT backend -> the services whose flows to it get their reply entry lazily (see
/// lb-common's `MAP_LAZY_REPLY`); userspace sizes it to `max_backends`.
#[map]
pub static LAZY_REPLY: HashMap<ServiceKey, LazyOwners> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Index 0: the IPv6 classifier (`berth_tc_ingress6`), which the IPv4 one tail-calls for an
/// IPv6 frame; userspace writes it at load time.
#[map]
pub static TC_V6: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Host-order port -> `PORT_F_*`. Bits are only ever set while berth runs (a port that stops
/// being used merely costs the lookups it would have skipped).
#[map]
pub static PORTS: Array<u8> = Array::with_max_entries(65_536, 0);

/// This host's addresses (network byte order) -> 1, loopback excluded.
#[map]
pub static LOCAL_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// A balanced socket and its backend -> the service address it asked for.
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVNAT_SIZE, 0);

/// A balanced IPv6 socket and its backend -> the service address it asked for.
#[map]
pub static SOCK_REVNAT6: LruHashMap<SockRevKey6, SockRevValue6> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVNAT_SIZE, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per-CPU scratch space for one packet's state ([`crate::Pkt`]): too large for the 512-byte
/// BPF stack of the call chain. A TC program runs to completion on its CPU (softirq, no
/// preemption), and nothing else uses this slot.
#[map]
pub static SCRATCH: PerCpuArray<crate::Pkt> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space of a new full-NAT flow ([`crate::NatScratch`]): its entries are built
/// here rather than on the stack, which the call chain down to `port_free` has no room for.
/// Same reasoning as [`SCRATCH`].
#[map]
pub static NAT_SCRATCH: PerCpuArray<crate::NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU parameter block of `bpf_fib_lookup` (see `nat::fib_into`): 64 bytes the call
/// chains' 512-byte stack does not have to hold. Same reasoning as [`SCRATCH`].
#[map]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

#[map]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Counts one occurrence of `reason` on this CPU.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of a valid map value. A socket hook interrupted on its CPU by
        // the TC program may lose one increment (a counter, never state).
        unsafe { *c += 1 };
    }
}

/// Adds one packet of `bytes` (and a new flow if `new_flow`) to a service's and a backend's
/// counters.
#[inline(always)]
pub fn account(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    let n = u64::from(new_flow);
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, see `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += n;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, see `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += n;
        }
    }
}

/// The table epoch (see lb-common's `epoch`): index 0, written by userspace.
#[map]
pub static EPOCH: Array<lb_common::epoch::Epoch> = Array::with_max_entries(1, 0);

/// The full-NAT source-port claims (see lb-common's `claim`): one word per reply key's index,
/// taken by a compare-and-swap; userspace sizes it and maps it to list pending handshakes.
#[map]
pub static SNAT_CLAIMS: Array<u64> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// The full-NAT reply index (see lb-common's `claim::MAP_FNAT_INDEX`): the forward key of the
/// confirmed flow whose reply key has each claim word's index; userspace sizes it as
/// `SNAT_CLAIMS`.
#[map]
pub static FNAT_INDEX: Array<lb_common::FlowKey> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Which reply-index slots name a flow (see lb-common's `claim::MAP_FNAT_NAMED`); userspace
/// sizes it.
#[map]
pub static FNAT_NAMED: Array<u64> = Array::with_max_entries(DEFAULT_CONNTRACK_SIZE / 64, 0);
