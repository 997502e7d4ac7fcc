//! Why the dataplane did what it did with a packet. Every exit of the program increments exactly
//! one `Exit*` counter; `Event*` counters record notable things on the way (not exits).
//!
//! The action policy (README.md, "Action policy") in one place:
//! - not ours (other EtherTypes, other IP protocols, NDP and other ICMPv6, no service, no flow):
//!   pass untouched;
//! - IPv4 fragments and IPv6 fragments: pass untouched (no ports to balance on; see README);
//! - IPv6 the path does not walk (routing header with segments left, extension headers past
//!   the bound, jumbograms): pass untouched;
//! - malformed or truncated headers the kernel would reject anyway: drop;
//! - a service with no backend: a TCP segment without payload is answered with a RST, anything
//!   else dropped (or everything dropped, if so configured);
//! - a new flow whose reply key a live flow of another service holds: drop (the backend could
//!   not tell the two apart);
//! - a new full-NAT flow that finds no free source port in its tries: drop;
//! - a reply (or an ICMP error from a backend) arriving on an interface its backend does not
//!   live behind: pass untranslated (the stack's own rules apply to it);
//! - a helper failing while rewriting (internal error): drop and count as an abort.

/// Counter index in the `REASON_STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): pass.
    PassNotIp = 0,
    /// IPv6 that berth leaves to the stack: a routing header with segments left (this host is
    /// a waypoint), more extension headers than the walk bound (or the L4 header past its byte
    /// bound), a zero payload length (jumbogram): pass.
    PassIpv6,
    /// IPv4 or IPv6 but neither TCP nor UDP (ICMP and ICMPv6 other than an error quoting a
    /// balanced flow, NDP above all): pass.
    PassNotTcpUdp,
    /// IPv4 fragment, or IPv6 packet with a fragment header whose offset or more-fragments
    /// flag is set: pass.
    PassFragment,
    /// TCP/UDP that matches neither a flow nor a service: pass.
    PassNoService,
    /// Translated, handed to the kernel stack (redirect disabled, or the route is local).
    PassTranslatedToStack,
    /// Translated, but the FIB could not route it (no route, forwarding disabled): handed to the
    /// stack, which will answer or drop as it would for any packet.
    PassFibFailed,
    /// Translated, but its TTL would expire on this hop: handed to the stack, which drops it and
    /// answers with ICMP time exceeded, as any router would.
    PassTtlExpired,
    /// A backend's packet for a flow arrived on an interface that backend does not live behind
    /// (forged, or asymmetric routing): pass untranslated, no state change.
    PassReplyWrongIface,
    /// Frame shorter than an Ethernet header: drop.
    DropEthTruncated,
    /// IPv4 header truncated, bad version/IHL, or total length inconsistent; IPv6 header or
    /// extension header chain truncated, payload length past the frame, hop-by-hop options
    /// not first: drop.
    DropIpMalformed,
    /// TCP/UDP header truncated or TCP data offset invalid: drop.
    DropL4Malformed,
    /// A service matched but its Maglev slot has no backend: drop.
    DropNoBackend,
    /// A new flow would need the reply key (backend -> client address and port) that a live
    /// flow to another service holds: drop. (A client using one source port for two services on
    /// the same backend at once; the backend could not tell the two apart either.)
    DropFlowConflict,
    /// A new full-NAT flow found every source port it tried (`ct::SNAT_TRIES` of
    /// `dataplane.snat_ports`) held by a live flow to the same backend: drop. The range is too
    /// small for the flows to that backend (or a flood holds it).
    DropSnatExhausted,
    /// A packet-rewrite helper failed: drop.
    AbortRewrite,
    /// An array map lookup that cannot fail did fail: drop.
    AbortMap,
    /// Client -> backend, translated and redirected to the egress device.
    FwdRedirect,
    /// Client -> backend, translated and redirected with kernel neighbour resolution.
    FwdRedirectNeigh,
    /// Backend -> client, translated and redirected to the egress device.
    ReplyRedirect,
    /// Backend -> client, translated and redirected with kernel neighbour resolution.
    ReplyRedirectNeigh,
    /// A TCP segment for a service with no backend, answered with a RST out of the interface it
    /// came in on (the client fails at once, as with nothing listening).
    RejectNoBackend,
    /// XDP fast path: an established flow's packet translated and sent back out of the
    /// interface it arrived on (`XDP_TX`, the one-armed case).
    XdpTx,
    /// XDP fast path: an established flow's packet translated and redirected into another
    /// interface userspace marked as taking XDP frames (`XDP_DEVS`).
    XdpRedirect,
    // ---- events (not exits) ----
    /// The IPv4 header carried options, or the IPv6 header extension headers (walked past;
    /// counted for visibility).
    EventIpOptions,
    /// Inserting a conntrack entry failed; the packet was still balanced statelessly.
    EventCtInsertFailed,
    /// A forward entry had expired (idle timeout, or a SYN reusing a closed flow's tuple).
    EventCtExpired,
    /// A new flow was created for a packet that was not a bare SYN (mid-stream pickup).
    EventCtMidstreamPickup,
    /// A flow was marked closing (FIN or RST seen).
    EventCtClosing,
    /// A FIN or RST from the client side outside the window the backend acknowledged: the packet
    /// was forwarded, the flow stays open.
    EventCtCloseIgnored,
    /// One half of a flow's entry pair was missing (evicted) and was rebuilt from the other.
    EventCtRebuilt,
    /// A new full-NAT flow found a source port it tried held by a live flow and tried the next.
    EventSnatPortTaken,
    /// An ICMP error quoting a balanced flow was translated (and forwarded like the flow).
    EventIcmpTranslated,
    /// Socket hook: a host socket's connect/sendmsg to a service was sent to a backend.
    EventSockTranslated,
    /// Socket hook: a service matched but its Maglev slot has no backend (left untouched: the
    /// connect reaches the service address itself and fails as it would without berth).
    EventSockNoBackend,
    /// Socket hook: recvmsg/getpeername showed the service address instead of the backend's.
    EventSockReverse,
    /// Socket hook: recording the reverse translation failed (the app may see the backend's
    /// address as its peer).
    EventSockRevnatFailed,
    /// XDP fast path: a packet left to the TC program (not an established IPv4 flow with a
    /// cached route the XDP program can send on, or anything it does not handle); the TC
    /// program counts its exit.
    EventXdpPass,
}

impl Reason {
    /// Number of counters.
    pub const COUNT: u32 = Reason::EventXdpPass as u32 + 1;
    /// First index that is an event rather than an exit.
    pub const FIRST_EVENT: u32 = Reason::EventIpOptions as u32;

    /// The reason at index `i`, `None` past the last. A conversion, not a read of [`Self::ALL`]:
    /// in the eBPF programs a table read needs an index whose bound the verifier sees, and an
    /// index that comes back from a global BPF function has none.
    #[inline(always)]
    pub const fn from_index(i: u32) -> Option<Reason> {
        if i < Self::COUNT {
            // SAFETY: `Reason` is `repr(u32)` and only its first variant names its discriminant
            // (0), so they are 0..COUNT in declaration order (the tests check
            // `ALL[i] as u32 == i`, and this against `ALL`).
            Some(unsafe { core::mem::transmute::<u32, Reason>(i) })
        } else {
            None
        }
    }

    /// All reasons in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassIpv6,
        Reason::PassNotTcpUdp,
        Reason::PassFragment,
        Reason::PassNoService,
        Reason::PassTranslatedToStack,
        Reason::PassFibFailed,
        Reason::PassTtlExpired,
        Reason::PassReplyWrongIface,
        Reason::DropEthTruncated,
        Reason::DropIpMalformed,
        Reason::DropL4Malformed,
        Reason::DropNoBackend,
        Reason::DropFlowConflict,
        Reason::DropSnatExhausted,
        Reason::AbortRewrite,
        Reason::AbortMap,
        Reason::FwdRedirect,
        Reason::FwdRedirectNeigh,
        Reason::ReplyRedirect,
        Reason::ReplyRedirectNeigh,
        Reason::RejectNoBackend,
        Reason::XdpTx,
        Reason::XdpRedirect,
        Reason::EventIpOptions,
        Reason::EventCtInsertFailed,
        Reason::EventCtExpired,
        Reason::EventCtMidstreamPickup,
        Reason::EventCtClosing,
        Reason::EventCtCloseIgnored,
        Reason::EventCtRebuilt,
        Reason::EventSnatPortTaken,
        Reason::EventIcmpTranslated,
        Reason::EventSockTranslated,
        Reason::EventSockNoBackend,
        Reason::EventSockReverse,
        Reason::EventSockRevnatFailed,
        Reason::EventXdpPass,
    ];

    /// Stable snake_case name used in logs, `berth status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassIpv6 => "pass_ipv6",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNoService => "pass_no_service",
            Reason::PassTranslatedToStack => "pass_translated_to_stack",
            Reason::PassFibFailed => "pass_fib_failed",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::PassReplyWrongIface => "pass_reply_wrong_iface",
            Reason::DropEthTruncated => "drop_eth_truncated",
            Reason::DropIpMalformed => "drop_ip_malformed",
            Reason::DropL4Malformed => "drop_l4_malformed",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropFlowConflict => "drop_flow_conflict",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::AbortRewrite => "abort_rewrite",
            Reason::AbortMap => "abort_map",
            Reason::FwdRedirect => "fwd_redirect",
            Reason::FwdRedirectNeigh => "fwd_redirect_neigh",
            Reason::ReplyRedirect => "reply_redirect",
            Reason::ReplyRedirectNeigh => "reply_redirect_neigh",
            Reason::RejectNoBackend => "reject_no_backend",
            Reason::XdpTx => "xdp_tx",
            Reason::XdpRedirect => "xdp_redirect",
            Reason::EventIpOptions => "event_ip_options",
            Reason::EventCtInsertFailed => "event_ct_insert_failed",
            Reason::EventCtExpired => "event_ct_expired",
            Reason::EventCtMidstreamPickup => "event_ct_midstream_pickup",
            Reason::EventCtClosing => "event_ct_closing",
            Reason::EventCtCloseIgnored => "event_ct_close_ignored",
            Reason::EventCtRebuilt => "event_ct_rebuilt",
            Reason::EventSnatPortTaken => "event_snat_port_taken",
            Reason::EventIcmpTranslated => "event_icmp_translated",
            Reason::EventSockTranslated => "event_sock_translated",
            Reason::EventSockNoBackend => "event_sock_no_backend",
            Reason::EventSockReverse => "event_sock_reverse",
            Reason::EventSockRevnatFailed => "event_sock_revnat_failed",
            Reason::EventXdpPass => "event_xdp_pass",
        }
    }

    /// Whether this exit drops the packet (every other exit passes or redirects it): the action
    /// policy, applied by the program's `exit`.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropEthTruncated
                | Reason::DropIpMalformed
                | Reason::DropL4Malformed
                | Reason::DropNoBackend
                | Reason::DropFlowConflict
                | Reason::DropSnatExhausted
                | Reason::AbortRewrite
                | Reason::AbortMap
        )
    }

    /// Whether this counter records an exit of the program (as opposed to an event).
    pub const fn is_exit(self) -> bool {
        (self as u32) < Self::FIRST_EVENT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_exactly_the_drop_and_abort_exits() {
        for r in Reason::ALL {
            let name = r.name();
            let by_name = name.starts_with("drop_") || name.starts_with("abort_");
            assert_eq!(r.is_drop(), by_name, "{name}");
            assert!(!r.is_drop() || r.is_exit(), "{name}");
        }
    }

    #[test]
    fn from_index_is_all_in_order_and_none_past_it() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(Reason::from_index(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_index(Reason::COUNT), None);
        assert_eq!(Reason::from_index(u32::MAX), None);
    }

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
            }
        }
    }
}
