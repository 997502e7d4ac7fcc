//! Connection-tracking rules shared by the kernel (which applies them per packet) and userspace
//! (whose garbage collector applies the same expiry rules when it sweeps the map).

use crate::{CtEntry, DpConfig, IPPROTO_TCP};

/// Entry keyed client -> service; `nat_*` is the backend.
pub const DIR_FORWARD: u8 = 1;
/// Entry keyed backend -> client; `nat_*` is the service address the client used.
pub const DIR_REPLY: u8 = 2;

/// Open flow (TCP: no FIN/RST seen yet; UDP: always).
pub const STATE_OPEN: u8 = 1;
/// A FIN or RST was seen in either direction: the entry lingers for `tcp_closing_ns`.
pub const STATE_CLOSING: u8 = 2;

/// [`CtEntry::flags`]: `backend_ack` holds an acknowledgment number the backend sent.
pub const CT_F_ACK_KNOWN: u8 = 1 << 0;

/// How far past the backend's last acknowledgment a client's FIN or RST may start and still
/// close the flow: the largest window a TCP receiver can offer without window scaling. A blind
/// attacker hits it with one packet in 65,536; a legitimate FIN or RST starts at the client's
/// next sequence number, which lies within what the backend has acknowledged plus what is in
/// flight. One the check refuses is still forwarded (the backend judges it too); the flow then
/// ends by its idle timeout instead of the closing linger.
pub const CLOSE_WINDOW: u32 = 65_535;

/// `last_seen_ns` is rewritten at most this often, so an established flow does not dirty its
/// cache line on every packet.
pub const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment carrying FIN or RST.
#[inline(always)]
pub const fn closes(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Whether a client-side segment with sequence number `seq` lies in the window of the backend's
/// connection whose reply entry is `rev`: it must start within [`CLOSE_WINDOW`] of what the
/// backend acknowledged. With no acknowledgment seen yet (the backend has not answered), there
/// is no established connection to protect. A FIN or RST closes the flow only in the window,
/// and only a segment in the window may take a live flow's reply key over (after a flood
/// evicted the flow's own entries, its client proves itself this way; a blind spoofer cannot).
#[inline(always)]
pub const fn in_window(rev: &CtEntry, seq: u32) -> bool {
    rev.flags & CT_F_ACK_KNOWN == 0 || seq.wrapping_sub(rev.backend_ack) <= CLOSE_WINDOW
}

/// Serial-number order (RFC 1982): whether `a` comes after `b`.
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A bare SYN (no ACK): the start of a new connection attempt, or a retransmission of one.
#[inline(always)]
pub const fn is_bare_syn(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether an entry (either half) may no longer be used for a packet with `tcp_flags` arriving
/// at `now_ns`, or be kept against a new flow that needs its key.
///
/// A bare SYN meeting a closing entry starts a new connection on a reused source port, so the
/// entry is treated as gone even inside the linger period. A retransmitted SYN on an open entry
/// keeps the flow (and so its backend).
#[inline(always)]
pub const fn expired(
    entry: &CtEntry,
    proto: u8,
    tcp_flags: u8,
    now_ns: u64,
    cfg: &DpConfig,
) -> bool {
    if entry.state == STATE_CLOSING && is_bare_syn(proto, tcp_flags) {
        return true;
    }
    idle_expired(entry, proto, now_ns, cfg)
}

/// Whether an entry has been idle longer than its timeout (the rule the userspace GC applies to
/// both halves, which are refreshed together).
#[inline(always)]
pub const fn idle_expired(entry: &CtEntry, proto: u8, now_ns: u64, cfg: &DpConfig) -> bool {
    let idle = now_ns.saturating_sub(entry.last_seen_ns);
    let timeout = if entry.state == STATE_CLOSING {
        cfg.tcp_closing_ns
    } else if proto == IPPROTO_TCP {
        cfg.tcp_idle_ns
    } else {
        cfg.udp_idle_ns
    };
    idle > timeout
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IPPROTO_UDP;

    const CFG: DpConfig = DpConfig {
        maglev_size: 7,
        max_services: 1,
        hash_seed: 0,
        flags: 0,
        tcp_closing_ns: 10,
        tcp_idle_ns: 1000,
        udp_idle_ns: 100,
        host_netns_cookie: 0,
    };

    fn entry(state: u8, last: u64) -> CtEntry {
        CtEntry {
            nat_addr: 1,
            nat_port: 2,
            dir: DIR_FORWARD,
            state,
            backend_id: 0,
            service_id: 0,
            last_seen_ns: last,
            route: crate::Route::NONE,
            backend_ack: 0,
            in_ifindex: 0,
            flags: 0,
            _pad: [0; 7],
        }
    }

    #[test]
    fn retransmitted_syn_keeps_open_flow_but_not_closed_one() {
        let open = entry(STATE_OPEN, 0);
        assert!(!expired(&open, IPPROTO_TCP, TCP_SYN, 5, &CFG));
        let closing = entry(STATE_CLOSING, 0);
        assert!(expired(&closing, IPPROTO_TCP, TCP_SYN, 5, &CFG));
        // A SYN-ACK is not a new connection.
        assert!(!expired(&closing, IPPROTO_TCP, TCP_SYN | TCP_ACK, 5, &CFG));
    }

    #[test]
    fn the_window_is_near_the_backends_acknowledgment() {
        let mut rev = entry(STATE_OPEN, 0);
        rev.dir = DIR_REPLY;
        // Nothing acknowledged yet: no established connection to protect.
        assert!(in_window(&rev, 12345));
        rev.flags |= CT_F_ACK_KNOWN;
        rev.backend_ack = 1011;
        assert!(in_window(&rev, 1011));
        assert!(in_window(&rev, 1011 + CLOSE_WINDOW));
        assert!(!in_window(&rev, 1012 + CLOSE_WINDOW));
        assert!(
            !in_window(&rev, 1010),
            "behind what the backend already has"
        );
        assert!(!in_window(&rev, 7_000_000));
        // Across the wrap of the sequence space.
        rev.backend_ack = u32::MAX - 10;
        assert!(in_window(&rev, 5));
        assert!(!in_window(&rev, u32::MAX - 11));
        // A blind guess hits the window once in 65,536 tries.
        let hits = (0..1u64 << 20)
            .filter(|i| in_window(&rev, (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32))
            .count();
        assert!(hits < 40, "{hits} of 2^20 random sequence numbers accepted");
    }

    #[test]
    fn serial_number_order() {
        assert!(seq_after(2, 1));
        assert!(!seq_after(1, 2));
        assert!(!seq_after(5, 5));
        assert!(seq_after(3, u32::MAX - 3));
        assert!(!seq_after(u32::MAX - 3, 3));
    }

    #[test]
    fn only_tcp_fin_and_rst_close() {
        assert!(closes(IPPROTO_TCP, TCP_FIN | TCP_ACK));
        assert!(closes(IPPROTO_TCP, TCP_RST));
        assert!(!closes(IPPROTO_TCP, TCP_ACK | TCP_SYN));
        assert!(!closes(IPPROTO_UDP, TCP_RST));
    }

    #[test]
    fn timeouts_per_state_and_protocol() {
        assert!(!idle_expired(
            &entry(STATE_CLOSING, 100),
            IPPROTO_TCP,
            110,
            &CFG
        ));
        assert!(idle_expired(
            &entry(STATE_CLOSING, 100),
            IPPROTO_TCP,
            111,
            &CFG
        ));
        assert!(!idle_expired(
            &entry(STATE_OPEN, 100),
            IPPROTO_TCP,
            1100,
            &CFG
        ));
        assert!(idle_expired(
            &entry(STATE_OPEN, 100),
            IPPROTO_TCP,
            1101,
            &CFG
        ));
        assert!(!idle_expired(
            &entry(STATE_OPEN, 100),
            IPPROTO_UDP,
            200,
            &CFG
        ));
        assert!(idle_expired(
            &entry(STATE_OPEN, 100),
            IPPROTO_UDP,
            201,
            &CFG
        ));
        // A clock read before the entry's stamp (another CPU refreshed it) is not idle.
        assert!(!idle_expired(
            &entry(STATE_OPEN, 500),
            IPPROTO_UDP,
            10,
            &CFG
        ));
    }
}
