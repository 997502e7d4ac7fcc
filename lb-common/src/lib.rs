//! Types and pure logic shared by berth's eBPF programs (`lb-ebpf`) and its userspace daemon
//! (`lb-userspace`).
//!
//! Every type that crosses the kernel/user boundary is defined here exactly once: `#[repr(C)]`,
//! `Copy`, integer fields only, explicit padding, a compile-time size check, and derived
//! `bytemuck::Pod` (whose derive refuses any padding byte), so that a map key never carries
//! uninitialised padding bytes (which would make lookups miss).
//!
//! Byte order: addresses and ports in keys and values are kept in *network byte order*, exactly as
//! they sit in the packet. Userspace converts with [`ipv4_to_wire`] and [`port_to_wire`].
#![no_std]

pub mod claim;
pub mod csum;
pub mod ct;
pub mod epoch;
pub mod hash;
pub mod reason;
pub mod summed;
pub mod syn;
pub mod v6;

pub use reason::Reason;

/// Name of the TC ingress program in the object file.
pub const PROG_TC_INGRESS: &str = "berth_tc_ingress";
/// The IPv6 half of [`PROG_TC_INGRESS`]: a classifier of its own, reached by a tail call
/// through [`MAP_TC_V6`] (each program gets the verifier's whole instruction budget).
pub const PROG_TC_INGRESS6: &str = "berth_tc_ingress6";
/// The program array holding [`PROG_TC_INGRESS6`] at index 0 (pinned with the maps: a program
/// array's entries are cleared when no process or pin refers to it).
pub const MAP_TC_V6: &str = "TC_V6";
/// A classifier that returns TC_ACT_OK and nothing else (benchmark floor; never attached).
pub const PROG_TC_NOOP: &str = "berth_tc_noop";
/// The XDP fast path for established IPv4 flows (issue 14); everything else it passes to
/// [`PROG_TC_INGRESS`].
pub const PROG_XDP: &str = "berth_xdp";
/// A do-nothing XDP program: the benchmark's floor for XDP test runs (never attached).
pub const PROG_XDP_NOOP: &str = "berth_xdp_noop";
/// Interfaces the XDP program may redirect into (a `DEVMAP_HASH`, ifindex -> ifindex): ones
/// that take XDP frames (see README, "XDP fast path").
pub const MAP_XDP_DEVS: &str = "XDP_DEVS";
/// Socket-level balancing for clients on the host (cgroup sock_addr hooks).
pub const PROG_SOCK_CONNECT4: &str = "berth_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "berth_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "berth_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "berth_getpeername4";
/// The same hooks for IPv6 sockets (and IPv4-mapped destinations of dual-stack ones).
pub const PROG_SOCK_CONNECT6: &str = "berth_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "berth_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "berth_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "berth_getpeername6";

/// Version of the pinned layout (maps, their key and value types, their meaning). Pins live
/// under `<pin path>/v<PIN_LAYOUT>/`; a berth finding another version there refuses to adopt it.
/// Bump it with every change to a map's type, key, value or the meaning of a field.
pub const PIN_LAYOUT: u32 = 12;

/// Addresses of this host (network byte order -> 1), kept current by userspace: what "any
/// address of this host" means for wildcard services at the socket hooks.
pub const MAP_LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Reverse translation for balanced sockets: [`SockRevKey`] -> [`SockRevValue`].
pub const MAP_SOCK_REVNAT: &str = "SOCK_REVNAT";
/// Capacity of [`MAP_SOCK_REVNAT`].
pub const DEFAULT_SOCK_REVNAT_SIZE: u32 = 65_536;

/// Service table: [`ServiceKey`] -> [`ServiceValue`].
pub const MAP_SERVICES: &str = "SERVICES";
/// Backend array: backend id -> [`Backend`].
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Maglev lookup tables, one row of `maglev_size` backend ids per service id.
pub const MAP_MAGLEV: &str = "MAGLEV";
/// Connection tracking LRU hash: [`FlowKey`] -> [`CtEntry`].
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// Conntrack for flows not yet confirmed (TCP flows until their handshake completes, see
/// [`ct::starts_unconfirmed`]): same types as [`MAP_CONNTRACK`], so a flood of SYNs that never
/// complete churns only this map (and the handshake table, [`syn::MAP_CT_SYN`], where most new
/// flows wait for their backend's first reply), never the established flows.
pub const MAP_CT_NEW: &str = "CT_NEW";
/// Lazy reply entries (issue 14): a DNAT backend's address, port and protocol (as a
/// [`ServiceKey`]) -> the service addresses and ports ([`LazyOwners`], up to [`LAZY_OWNERS`])
/// whose flows to that backend are recorded without their reply entry until the first reply.
/// A reply that misses conntrack finds its flow's forward entry through it (the client is the
/// reply's destination; one forward key per service named). Written by the program (the entry
/// with `BPF_NOEXIST`, each further service into a free slot by a compare-and-swap; a slot is
/// never changed once taken), removed by userspace once the backend has left every service and
/// its flows were purged. Flows to the backend for any further service keep their reply entry
/// from the first packet.
pub const MAP_LAZY_REPLY: &str = "LAZY_REPLY";
/// Slots of [`LazyOwners`]: the most services one backend's flows are recorded lazily for
/// (each slot more is a forward entry more to look for on a reply that misses, and a flow more
/// to check on a new flow, all walked by the verifier).
pub const LAZY_OWNERS: usize = 2;

/// Value of [`MAP_LAZY_REPLY`]: the services (each [`LazyOwners::pack`]ed; 0: a free slot,
/// slots taken in order) whose flows to the backend are recorded lazily. Two flows of two of
/// them from one client address and port would share a reply key; a new flow of one is
/// refused while a live flow of another holds the key (the program's `lazy_others_hold`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LazyOwners {
    pub owners: [u64; LAZY_OWNERS],
}
const _: () = assert!(core::mem::size_of::<LazyOwners>() == 8 * LAZY_OWNERS);

impl LazyOwners {
    /// A service's address and port (wire order) in one word: never 0 for a service (its port
    /// is not 0), so 0 marks a free slot.
    #[inline(always)]
    pub const fn pack(addr: u32, port: u16) -> u64 {
        ((addr as u64) << 16) | port as u64
    }

    /// The address and port (wire order) of a [`Self::pack`]ed service.
    #[inline(always)]
    pub const fn unpack(owner: u64) -> (u32, u16) {
        ((owner >> 16) as u32, owner as u16)
    }

    /// The services named, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u16)> + '_ {
        self.owners
            .iter()
            .filter(|&&o| o != 0)
            .map(|&o| Self::unpack(o))
    }
}
/// Route cache per backend id ([`BackendRoute`]): new flows to a backend reuse it.
pub const MAP_BACKEND_ROUTES: &str = "BACKEND_ROUTES";
/// Per-CPU counters per service id ([`Counters`]).
pub const MAP_SERVICE_STATS: &str = "SERVICE_STATS";
/// Per-CPU counters per backend id ([`Counters`]).
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
/// Port filter: host-order port -> `PORT_F_*` bits. Lets packets that cannot be ours skip every
/// hash lookup.
pub const MAP_PORTS: &str = "PORTS";
/// Some TCP service listens on this port.
pub const PORT_F_TCP_SERVICE: u8 = 1 << 0;
/// Some UDP service listens on this port.
pub const PORT_F_UDP_SERVICE: u8 = 1 << 1;
/// Some TCP backend listens on this port (its replies come from it).
pub const PORT_F_TCP_BACKEND: u8 = 1 << 2;
/// Some UDP backend listens on this port.
pub const PORT_F_UDP_BACKEND: u8 = 1 << 3;

/// The `PORT_F_*` bits for a service port (`backend == false`) or backend port of `proto`.
pub const fn port_flag(proto: u8, backend: bool) -> u8 {
    match (proto == IPPROTO_TCP, backend) {
        (true, false) => PORT_F_TCP_SERVICE,
        (false, false) => PORT_F_UDP_SERVICE,
        (true, true) => PORT_F_TCP_BACKEND,
        (false, true) => PORT_F_UDP_BACKEND,
    }
}

/// Some TCP service listens on this port at an address of its own (of either family).
pub const PORT_F_TCP_OWN_ADDR: u8 = 1 << 4;
/// Some UDP service listens on this port at an address of its own.
pub const PORT_F_UDP_OWN_ADDR: u8 = 1 << 5;
/// Some TCP service listens on this port at any address of the host (`0.0.0.0` or `::`).
pub const PORT_F_TCP_ANY_ADDR: u8 = 1 << 6;
/// Some UDP service listens on this port at any address of the host.
pub const PORT_F_UDP_ANY_ADDR: u8 = 1 << 7;

/// The `PORT_F_*` bits a service of `proto` sets on its port: the service bit, and which of
/// its service lookups a packet to the port needs ([`service_lookups`]): at its own address, or
/// at any address of the host (`any`).
pub const fn service_port_flags(proto: u8, any: bool) -> u8 {
    let addr = match (proto == IPPROTO_TCP, any) {
        (true, false) => PORT_F_TCP_OWN_ADDR,
        (false, false) => PORT_F_UDP_OWN_ADDR,
        (true, true) => PORT_F_TCP_ANY_ADDR,
        (false, true) => PORT_F_UDP_ANY_ADDR,
    };
    port_flag(proto, false) | addr
}

/// Which service lookups a packet of `proto` to a port whose filter entry is `flags` needs:
/// (the service at the packet's destination address, the service at any address of the host).
/// A port's bits are only ever added, so a lookup skipped finds nothing. A service port with
/// neither address bit was written by a berth that did not set them (a dataplane adopted from
/// it, before the reconciler writes its services again): both.
#[inline(always)]
pub const fn service_lookups(flags: u8, proto: u8) -> (bool, bool) {
    let (own, any) = if proto == IPPROTO_TCP {
        (PORT_F_TCP_OWN_ADDR, PORT_F_TCP_ANY_ADDR)
    } else {
        (PORT_F_UDP_OWN_ADDR, PORT_F_UDP_ANY_ADDR)
    };
    if flags & (own | any) == 0 {
        (true, true)
    } else {
        (flags & own != 0, flags & any != 0)
    }
}

/// Per-CPU packet counters per [`Reason`].
pub const MAP_REASON_STATS: &str = "REASON_STATS";
/// Name of the read-only global holding the [`DpConfig`].
pub const GLOBAL_CONFIG: &str = "BERTH_CONFIG";

/// Default map sizes (all configurable at load time).
pub const DEFAULT_MAX_SERVICES: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;

/// IP protocol numbers berth balances.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// [`DpConfig::flags`]: after translation, route the packet with `bpf_fib_lookup` and redirect it
/// straight to the egress device (bypassing netfilter's FORWARD chain). Without it the translated
/// packet is handed back to the kernel stack.
pub const CFG_F_REDIRECT: u32 = 1 << 0;
/// [`DpConfig::flags`]: leave the TTL of redirected packets as it is (a transparent hop).
pub const CFG_F_KEEP_TTL: u32 = 1 << 1;
/// [`DpConfig::flags`]: drop a TCP segment for a service with no backend instead of answering
/// it with a RST.
pub const CFG_F_DROP_NO_BACKEND: u32 = 1 << 2;

/// Runtime configuration of the dataplane, written into a read-only global at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DpConfig {
    /// Number of slots in each service's Maglev row (a prime).
    pub maglev_size: u32,
    /// Number of Maglev rows (service ids are `0..max_services`).
    pub max_services: u32,
    /// Seed mixed into the flow hash.
    pub hash_seed: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// How long a TCP entry lives after a FIN or RST was seen.
    pub tcp_closing_ns: u64,
    /// How long an idle, open TCP entry lives.
    pub tcp_idle_ns: u64,
    /// How long an idle UDP entry lives.
    pub udp_idle_ns: u64,
    /// `SO_NETNS_COOKIE` of the host's network namespace: the socket hooks treat loopback
    /// addresses as "this host" only for sockets in it (a container's 127.0.0.1 is its own).
    pub host_netns_cookie: u64,
    /// First source port of full-NAT flows (host order).
    pub snat_port_first: u16,
    /// Last source port of full-NAT flows (host order, inclusive).
    pub snat_port_last: u16,
    /// How long (ms) a full-NAT flow that has fully closed keeps its source port before a new
    /// flow may take it (see [`ct::port_reusable`]).
    pub snat_reuse_ms: u32,
    /// Sets of the pending-handshake table (`syn::MAP_CT_SYN`, a power of two).
    pub syn_sets: u32,
    /// Words of the full-NAT port claims (`claim::MAP_SNAT_CLAIMS`, a power of two).
    pub snat_claims: u32,
    /// Random and nonzero for each load of the program: the table epoch counts only for the
    /// program whose instance userspace writes beside it (see [`epoch::Epoch`]).
    pub instance: u32,
    /// How many slots of a backend's [`LazyOwners`] the program may take (at most
    /// [`LAZY_OWNERS`]; 1: one lazy service per backend, as before several were).
    pub lazy_owners: u32,
}
const _: () = assert!(core::mem::size_of::<DpConfig>() == 72);

impl DpConfig {
    /// A zeroed config; the dataplane treats `maglev_size == 0` as "not configured" and passes
    /// everything.
    pub const fn zeroed() -> Self {
        Self {
            maglev_size: 0,
            max_services: 0,
            hash_seed: 0,
            flags: 0,
            tcp_closing_ns: 0,
            tcp_idle_ns: 0,
            udp_idle_ns: 0,
            host_netns_cookie: 0,
            snat_port_first: 0,
            snat_port_last: 0,
            snat_reuse_ms: 0,
            syn_sets: 0,
            snat_claims: 0,
            instance: 0,
            lazy_owners: 0,
        }
    }
}

/// Key of the service table. `addr == 0` means "any local address of this host".
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable,
)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

impl ServiceKey {
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// [`ServiceValue::flags`]: the service has no backend at all (not merely an empty slot of a
/// row being rewritten): its clients are refused at once (unless configured to drop).
pub const SVC_F_EMPTY: u32 = 1 << 0;

/// Value of the service table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceValue {
    /// Row of the Maglev table and index of the service counters; `< max_services`.
    pub id: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// A backend of the pool (its id; 0: none), taken by a new flow whose Maglev slot holds no
    /// backend: a row being filled one slot at a time (the pool's first backend) never drops a
    /// client.
    pub fallback: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// A backend slot. `addr == 0` marks an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    /// Full NAT: the source address new flows to this backend get (with a port of the
    /// configured range), so that its replies come back to this host wherever the backend
    /// is. 0: DNAT (the client's address is kept).
    pub snat_addr: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 16);

impl Backend {
    /// A backend reached by DNAT.
    pub const fn dnat(addr: u32, port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
            snat_addr: 0,
            _pad2: 0,
        }
    }
}

/// Conntrack key: the 5-tuple exactly as it appears in the packet being looked up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Two scalar fields rather than `[u8; 3]`: zeroing an array became a call to a `memset`
    // subprogram in the eBPF build, once per key built (several per packet).
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// Conntrack value.
///
/// A balanced flow has two entries: the forward one keyed by client -> service, whose `nat_*` is
/// the backend to rewrite the destination to, and the reply one keyed by backend -> client, whose
/// `nat_*` is the service address to rewrite the source back to. Both carry the backend id so the
/// pair can be found and purged together. A DNAT flow of its backend's lazy service
/// ([`MAP_LAZY_REPLY`]) gets its reply entry with its first reply, built from the forward one
/// ([`CtEntry::lazy`]). Every other packet looks up both halves: a missing half is rebuilt from
/// the other, a half whose partner points elsewhere is stale (see `ct`); a lazy flow's forward
/// packets look up their reply half only when they close or refresh the flow (its replies
/// derive it again if it went missing).
///
/// A full-NAT flow ([`ct::CT_F_FULLNAT`]) also rewrites the other end: its reply key is backend
/// -> berth's source address and port, and `fnat_*` is, in the forward entry, the source to
/// write (that address and port) and, in the reply entry, the destination to write back (the
/// client). [`ct::reply_key`] and [`ct::forward_key`] find one half's key from the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtEntry {
    pub nat_addr: u32,
    pub nat_port: u16,
    /// [`ct::DIR_FORWARD`] or [`ct::DIR_REPLY`].
    pub dir: u8,
    /// One of the `ct::STATE_*` values.
    pub state: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet of the flow in either direction (both halves
    /// are refreshed together, at most once per [`ct::TOUCH_INTERVAL_NS`]).
    pub last_seen_ns: u64,
    /// Cached route of this direction after translation; refreshed with `last_seen_ns`, so at
    /// most [`ct::TOUCH_INTERVAL_NS`] stale.
    pub route: Route,
    /// Reply entries of TCP flows: the latest acknowledgment number the backend sent (the
    /// client's next byte it expects), valid when `flags` has [`ct::CT_F_ACK_KNOWN`]. A FIN or
    /// RST from the client side counts only near it (the backend side cannot be forged: see
    /// `in_ifindex`). Forward entries of full-NAT TCP flows: where a closing FIN ends, with
    /// [`ct::CT_F_FIN_SEQ`], [`ct::CT_F_AWAIT_CLIENT_ACK`] or [`ct::CT_F_AWAIT_BACKEND_ACK`]
    /// (see [`ct::track_close`]; 0 and unused otherwise, so entries pinned by an older berth
    /// read as "nothing tracked").
    pub backend_ack: u32,
    /// Reply entries: the interface the backend's packets must arrive on (0: not known, as when
    /// the FIB has no forwarding route to it; not checked).
    pub in_ifindex: u32,
    /// Full NAT only: the forward entry's new source, the reply entry's new destination.
    pub fnat_addr: u32,
    pub fnat_port: u16,
    /// `ct::CT_F_*` bits.
    pub flags: u8,
    /// Forward entries: 1 if the flow is a DNAT flow of its backend's lazy service
    /// ([`MAP_LAZY_REPLY`]), whose reply entry the program derives from this one whenever it is
    /// missing (the backend's reply finds it through `LAZY_REPLY`), so the flow's forward packets
    /// need not look their reply half up except to close or refresh the flow (`ct::LAZY_*`). 0
    /// otherwise, and in entries pinned by an older berth (which take the full path). Reply
    /// entries: [`ct::WINDOW_LOST`] while the half, rebuilt from a client's segment, waits
    /// for its backend's next acknowledgment (see `ct::rebuilt_window`); 0 otherwise.
    pub lazy: u8,
    /// The table epoch the flow's backend was picked in (see [`epoch`]), both halves; 0:
    /// unknown (picked while the tables changed, a full-NAT flow, or written by userspace).
    /// A reply entry carrying the current epoch skips the forward lookup
    /// ([`ct::reply_skips_forward`]).
    pub epoch: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 64);
const _: () = assert!(core::mem::size_of::<CtEntry>().is_multiple_of(8));

impl CtEntry {
    /// Whether the flow is translated both ways (full NAT).
    #[inline(always)]
    pub const fn full_nat(&self) -> bool {
        self.flags & ct::CT_F_FULLNAT != 0
    }
}

/// A route as the FIB gave it: egress interface and the MACs to write. `ifindex == 0` means
/// "none cached: look it up".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Route {
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Route>() == 16);

impl Route {
    pub const NONE: Route = Route {
        ifindex: 0,
        dmac: [0; 6],
        smac: [0; 6],
    };
}

/// The route towards a backend as last looked up, shared by that backend's new flows.
/// Userspace clears the slot when it reuses the backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BackendRoute {
    pub route: Route,
    /// When it was looked up (`bpf_ktime_get_coarse_ns`); reused for [`ct::TOUCH_INTERVAL_NS`].
    pub stamp_ns: u64,
}
const _: () = assert!(core::mem::size_of::<BackendRoute>() == 24);

/// Key of the socket reverse-translation map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

/// The service address a socket asked for, to show it instead of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevValue {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 8);

/// Per-service and per-backend counters (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 24);

/// Converts an IPv4 address's octets to the in-map representation (network byte order).
#[inline(always)]
pub const fn ipv4_to_wire(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Converts a host-order port to the in-map representation (network byte order).
#[inline(always)]
pub const fn port_to_wire(port: u16) -> u16 {
    port.to_be()
}

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: `bytemuck::Pod` is derived for the type, which checks at compile time that
            // it is `#[repr(C)]`, `Copy`, made of `Pod` fields only and free of padding bytes:
            // exactly what `aya::Pod` asks (any bit pattern valid, no byte uninitialised).
            unsafe impl aya::Pod for $t where $t: bytemuck::Pod {}
        )*};
    }
    pod!(
        super::DpConfig,
        super::ServiceKey,
        super::LazyOwners,
        super::ServiceValue,
        super::Backend,
        super::FlowKey,
        super::CtEntry,
        super::Counters,
        super::BackendRoute,
        super::SockRevKey,
        super::SockRevValue,
        super::v6::ServiceKey6,
        super::v6::Backend6,
        super::v6::FlowKey6,
        super::v6::CtEntry6,
        super::syn::SynSlot,
        super::syn::SynSet,
        super::epoch::Epoch
    );
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn a_flow_key_is_the_bytes_the_kernel_hashes() {
        let k = FlowKey::new(
            ipv4_to_wire([10, 0, 0, 1]),
            ipv4_to_wire([10, 0, 0, 2]),
            port_to_wire(40000),
            port_to_wire(80),
            IPPROTO_TCP,
        );
        let mut want = [0u8; 16];
        want[..4].copy_from_slice(&[10, 0, 0, 1]);
        want[4..8].copy_from_slice(&[10, 0, 0, 2]);
        want[8..10].copy_from_slice(&40000u16.to_be_bytes());
        want[10..12].copy_from_slice(&80u16.to_be_bytes());
        want[12] = IPPROTO_TCP;
        assert_eq!(bytemuck::bytes_of(&k), want);
        assert_eq!(
            bytemuck::bytes_of(&<CtEntry as bytemuck::Zeroable>::zeroed()),
            [0u8; 64]
        );
        assert_eq!(
            bytemuck::bytes_of(&Backend::dnat(1, 2)),
            [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_port_asks_only_the_service_lookups_its_services_need() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let other = if proto == IPPROTO_TCP {
                IPPROTO_UDP
            } else {
                IPPROTO_TCP
            };
            let own = service_port_flags(proto, false);
            let any = service_port_flags(proto, true);
            assert_ne!(own & port_flag(proto, false), 0);
            assert_ne!(any & port_flag(proto, false), 0);
            assert_eq!(service_lookups(own, proto), (true, false));
            assert_eq!(service_lookups(any, proto), (false, true));
            assert_eq!(service_lookups(own | any, proto), (true, true));
            // The other protocol's services say nothing about this one's.
            assert_eq!(
                service_lookups(own | service_port_flags(other, true), proto),
                (true, false)
            );
            // An entry written before the address bits: both lookups.
            assert_eq!(
                service_lookups(port_flag(proto, false), proto),
                (true, true)
            );
            // Backend bits are not service bits.
            let backend = port_flag(proto, true) | port_flag(other, true);
            assert_eq!(service_lookups(backend | any, proto), (false, true));
        }
        // Eight distinct bits.
        let all = [
            PORT_F_TCP_SERVICE,
            PORT_F_UDP_SERVICE,
            PORT_F_TCP_BACKEND,
            PORT_F_UDP_BACKEND,
            PORT_F_TCP_OWN_ADDR,
            PORT_F_UDP_OWN_ADDR,
            PORT_F_TCP_ANY_ADDR,
            PORT_F_UDP_ANY_ADDR,
        ];
        assert_eq!(all.iter().fold(0u8, |a, b| a | b), 0xff);
    }

    #[test]
    fn a_lazy_service_packs_into_a_nonzero_word_and_back() {
        // Any address, even 0 (a service on every local address names the packet's), and the
        // extreme ports: a packed service is never 0, the free slot's mark.
        for (addr, port) in [
            (0, port_to_wire(1)),
            (ipv4_to_wire([10, 99, 0, 1]), port_to_wire(80)),
            (u32::MAX, u16::MAX),
        ] {
            let o = LazyOwners::pack(addr, port);
            assert_ne!(o, 0);
            assert_eq!(LazyOwners::unpack(o), (addr, port));
        }
        let a = LazyOwners::pack(ipv4_to_wire([10, 99, 0, 1]), port_to_wire(80));
        let b = LazyOwners::pack(ipv4_to_wire([10, 99, 0, 2]), port_to_wire(8080));
        assert_ne!(a, b);
        let mut v = LazyOwners { owners: [a, 0] };
        assert!(v.iter().eq([LazyOwners::unpack(a)]));
        v.owners[1] = b;
        assert!(v.iter().eq([LazyOwners::unpack(a), LazyOwners::unpack(b)]));
    }
}
