//! Connection-tracking rules shared by the kernel (which applies them per packet) and userspace
//! (whose garbage collector applies the same expiry rules when it sweeps the map).

use crate::{CtEntry, DpConfig, FlowKey, IPPROTO_TCP};

/// Entry keyed client -> service; `nat_*` is the backend.
pub const DIR_FORWARD: u8 = 1;
/// Entry keyed backend -> client (full NAT: backend -> berth's source address and port);
/// `nat_*` is the service address the client used.
pub const DIR_REPLY: u8 = 2;

/// Open flow (TCP: no FIN/RST seen yet; UDP: always).
pub const STATE_OPEN: u8 = 1;
/// A FIN or RST was seen in either direction: the entry lingers for `tcp_closing_ns`.
pub const STATE_CLOSING: u8 = 2;

/// [`CtEntry::flags`]: `backend_ack` holds an acknowledgment number the backend sent.
pub const CT_F_ACK_KNOWN: u8 = 1 << 0;
/// [`CtEntry::flags`]: a full-NAT flow (`fnat_*` holds the other end's rewrite).
pub const CT_F_FULLNAT: u8 = 1 << 1;
/// [`CtEntry::flags`] (both halves): the client's side sent a FIN (in the window).
pub const CT_F_FIN_CLIENT: u8 = 1 << 2;
/// [`CtEntry::flags`] (both halves): the backend's side sent a FIN.
pub const CT_F_FIN_BACKEND: u8 = 1 << 3;
/// Both closing bits: the connection is over on both ends (FIN each way, or a RST).
pub const CT_F_CLOSED: u8 = CT_F_FIN_CLIENT | CT_F_FIN_BACKEND;
/// [`CtEntry::flags`] (full NAT, both halves): one side's FIN passed and the forward entry's
/// `backend_ack` holds where it ends (see [`track_close`]).
pub const CT_F_FIN_SEQ: u8 = 1 << 4;
/// [`CtEntry::flags`] (full NAT, both halves): the backend's FIN came second, acknowledging the
/// client's; the forward entry's `backend_ack` holds where it ends, and the client's ACK of it
/// is the flow's final ACK.
pub const CT_F_AWAIT_CLIENT_ACK: u8 = 1 << 5;
/// [`CtEntry::flags`] (full NAT, both halves): the client's FIN came second; the backend's ACK
/// of it is the final ACK.
pub const CT_F_AWAIT_BACKEND_ACK: u8 = 1 << 6;
/// [`CtEntry::flags`] (full NAT, both halves): the final ACK of a flow closed by a FIN each way
/// passed; its port is free at once ([`port_reusable`]).
pub const CT_F_LAST_ACK: u8 = 1 << 7;
/// Every bit of the final-ACK tracking.
pub const CT_F_FINAL: u8 =
    CT_F_FIN_SEQ | CT_F_AWAIT_CLIENT_ACK | CT_F_AWAIT_BACKEND_ACK | CT_F_LAST_ACK;

/// How many source ports a new full-NAT flow tries before it is dropped as
/// `drop_snat_exhausted`.
pub const SNAT_TRIES: u32 = 12;

/// How long a full-NAT port an unconfirmed flow holds (a TCP SYN with no answer from its client
/// since) stays its own against new flows needing a port. Unconfirmed entries live in the small
/// CT_NEW map; without this, a burst of spoofed SYNs would hold every port of a backend until
/// LRU pressure evicted them. A client still retrying its SYN refreshes the entry; one that gave
/// up loses nothing (its next SYN is a new flow with a new port).
pub const UNCONFIRMED_PORT_HOLD_NS: u64 = 5_000_000_000;

/// The key of the reply half of the flow whose forward half is `fwd` at `fkey`: backend ->
/// client, or backend -> berth's source address and port for full NAT.
#[inline(always)]
pub const fn reply_key(fkey: &FlowKey, fwd: &CtEntry) -> FlowKey {
    if fwd.full_nat() {
        FlowKey::new(
            fwd.nat_addr,
            fwd.fnat_addr,
            fwd.nat_port,
            fwd.fnat_port,
            fkey.proto,
        )
    } else {
        FlowKey::new(
            fwd.nat_addr,
            fkey.saddr,
            fwd.nat_port,
            fkey.sport,
            fkey.proto,
        )
    }
}

/// The key of the forward half of the flow whose reply half is `rev` at `rkey`: client ->
/// service.
#[inline(always)]
pub const fn forward_key(rkey: &FlowKey, rev: &CtEntry) -> FlowKey {
    if rev.full_nat() {
        FlowKey::new(
            rev.fnat_addr,
            rev.nat_addr,
            rev.fnat_port,
            rev.nat_port,
            rkey.proto,
        )
    } else {
        FlowKey::new(
            rkey.daddr,
            rev.nat_addr,
            rkey.dport,
            rev.nat_port,
            rkey.proto,
        )
    }
}

/// Key equality as one test (no branch per field: cheaper for the verifier and the CPU).
#[inline(always)]
pub const fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    let diff = (a.saddr ^ b.saddr)
        | (a.daddr ^ b.daddr)
        | ((a.sport ^ b.sport) as u32)
        | ((a.dport ^ b.dport) as u32)
        | ((a.proto ^ b.proto) as u32);
    diff == 0
}

/// Whether `rev`, found at `rkey`, is the reply half of the flow keyed `fkey`.
#[inline(always)]
pub const fn is_reply_of(rev: &CtEntry, rkey: &FlowKey, fkey: &FlowKey) -> bool {
    rev.dir == DIR_REPLY && same_key(&forward_key(rkey, rev), fkey)
}

/// Whether `fwd`, found at `fkey`, is the forward half of the flow whose reply key is `rkey`.
#[inline(always)]
pub const fn is_forward_of(fwd: &CtEntry, fkey: &FlowKey, rkey: &FlowKey) -> bool {
    fwd.dir == DIR_FORWARD && same_key(&reply_key(fkey, fwd), rkey)
}

/// The `try_`th source port (host order) a new full-NAT flow with flow hash `hash` tries, in
/// `first..=last`. A pure function of the flow: a flow picked up again after both its entries
/// were evicted tries the same ports in the same order, so it gets its old port back unless
/// another flow took it meanwhile.
///
/// Each try is an independent hash of the flow hash and the try number. A fixed stride (port,
/// port + k, port + 2k, ...) would make flows that met a taken port queue up behind it, the
/// way linear probing clusters: runs of taken ports grow and swallow all of a flow's tries
/// long before the range is full (measured in the hostile suite's SYN flood: 1141 drops at a
/// seventh of the range in use). A range no larger than the number of tries is walked port
/// by port instead, so every port of it is tried.
#[inline(always)]
pub const fn snat_port(hash: u32, try_: u32, first: u16, last: u16) -> u16 {
    let n = last as u32 - first as u32 + 1;
    // Mixed again, so the port is not correlated with the Maglev slot (the same hash modulo
    // the table size).
    let off = if n <= SNAT_TRIES {
        (crate::hash::finalize(hash ^ 0x5bd1_e995) % n + try_) % n
    } else {
        crate::hash::finalize(hash ^ try_.wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995) % n
    };
    (first as u32 + off) as u16
}

/// Whether `cfg` gives full NAT a source port range (a first port, and a last not below it).
#[inline(always)]
pub const fn has_snat_range(cfg: &DpConfig) -> bool {
    cfg.snat_port_first != 0 && cfg.snat_port_last >= cfg.snat_port_first
}

/// [`snat_port`] in `cfg`'s range, in network order: the reply key's destination port of a
/// full-NAT flow's `try_`th try (its first, `try_` 0, a pure function of the flow).
#[inline(always)]
pub const fn snat_try(cfg: &DpConfig, hash: u32, try_: u32) -> u16 {
    crate::port_to_wire(snat_port(
        hash,
        try_,
        cfg.snat_port_first,
        cfg.snat_port_last,
    ))
}

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

/// [`CtEntry::lazy`]: a forward entry recorded lazily (no reply half written with it), whose
/// backend has not answered yet.
pub const LAZY_RECORDED: u8 = 1;
/// [`CtEntry::lazy`]: a forward entry recorded lazily whose backend has answered (its reply half
/// was derived at least once).
pub const LAZY_ANSWERED: u8 = 2;
/// [`CtEntry::lazy`]: a confirmed IPv4 TCP flow's forward entry (full NAT, or DNAT to a service
/// its backend does not serve lazily) whose forward key is in the reply index (lb-common's
/// `claim::MAP_FNAT_INDEX`) at its reply key's claim word: a reply that finds no reply half
/// derives it from this entry through the index, and neither the port search nor a new flow's
/// claim takes the reply key while this entry lives, so its forward packets need not look the
/// reply half up except to close or refresh the flow, as a lazily recorded flow's. (Not
/// `WINDOW_LOST`'s value, which only reply entries carry.)
pub const LAZY_INDEXED: u8 = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment carrying FIN or RST.
#[inline(always)]
pub const fn closes(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// The closing bits a FIN or RST adds to a flow's entries, `dir` being the half the packet
/// was found at ([`DIR_FORWARD`]: from the client's side; [`DIR_REPLY`]: from the backend's).
/// A RST ends the connection on both ends at once; a FIN only its sender's direction. Anything
/// else adds none.
#[inline(always)]
pub const fn close_bits(proto: u8, tcp_flags: u8, dir: u8) -> u8 {
    if proto != IPPROTO_TCP {
        0
    } else if tcp_flags & TCP_RST != 0 {
        CT_F_CLOSED
    } else if tcp_flags & TCP_FIN == 0 {
        0
    } else if dir == DIR_FORWARD {
        CT_F_FIN_CLIENT
    } else {
        CT_F_FIN_BACKEND
    }
}

/// Whether the full-NAT source port that reply entry `rev` holds may be taken over by a new
/// flow at `now_ns` before the closing linger ends: its connection has closed on both ends
/// ([`CT_F_CLOSED`]) and either its final ACK passed ([`CT_F_LAST_ACK`], see [`track_close`]:
/// free at once) or nothing of it was seen for `cfg.snat_reuse_ms` since (each FIN or RST
/// stamps the flow; the hold leaves time for a final ACK berth did not see and a retransmitted
/// FIN). The new flow then replaces both of the old flow's entries, as a host reuses a port in
/// TIME_WAIT. A flow closed on one side only (a half-close: the other side may still send)
/// keeps its port for the whole linger, or its idle timeout.
///
/// Why no hold once the final ACK passed: the side that sent it is in TIME_WAIT (or closed),
/// and the other side sends nothing more once the ACK reaches it, so nothing of the old
/// connection is in flight. The backend's socket on the port is then closed (it closed second:
/// LAST_ACK ends with that ACK) or in TIME_WAIT (it closed first), which Linux hands a new SYN
/// to its listener when the SYN's timestamp or sequence number is newer (else it answers with
/// an ACK, the new client resets it, and its SYN retry gets through), as for any client
/// reusing a port. The hold never covered the backend's 60 s TIME_WAIT either; the port search
/// passes such a port by while another is free instead (`crate::claim::time_wait`). What the
/// hold still covers, and immediate reuse does not: a final ACK lost *after* berth, toward a
/// backend that closed second; its retransmitted FIN then reaches the new flow (see README
/// "Full NAT").
#[inline(always)]
pub const fn port_reusable(rev: &CtEntry, now_ns: u64, cfg: &DpConfig) -> bool {
    rev.state == STATE_CLOSING
        && rev.flags & CT_F_CLOSED == CT_F_CLOSED
        && (rev.flags & CT_F_LAST_ACK != 0
            || now_ns.saturating_sub(rev.last_seen_ns) > cfg.snat_reuse_ms as u64 * 1_000_000)
}

/// Whether a flow whose entry (either half) is `e` no longer holds its reply key and port: idle
/// past its timeout ([`idle_expired`]), or closed both ways past its port's hold
/// ([`port_reusable`]). The port search's rule for what holds a port, by its reply half or
/// (the reply index) its forward half.
#[inline(always)]
pub const fn port_lapsed(e: &CtEntry, proto: u8, now_ns: u64, cfg: &DpConfig) -> bool {
    idle_expired(e, proto, now_ns, cfg) || port_reusable(e, now_ns, cfg)
}

/// Where a TCP segment's sequence space ends (the sequence number the receiver acknowledges
/// once it has all of it): `seq` plus its data plus one for a SYN and one for a FIN.
#[inline(always)]
pub const fn seq_end(seq: u32, data_len: u32, tcp_flags: u8) -> u32 {
    seq.wrapping_add(data_len)
        .wrapping_add((tcp_flags & TCP_SYN != 0) as u32)
        .wrapping_add((tcp_flags & TCP_FIN != 0) as u32)
}

/// The final-ACK tracking of a full-NAT TCP flow after a FIN or RST from `dir`'s side
/// ([`DIR_FORWARD`]: the client's) passes, judged before its closing bits are added: `flags`
/// are the forward entry's, `fin_end` its `backend_ack`, `ack` the segment's acknowledgment
/// number (`tcp_flags` has ACK, or it is ignored) and `end` its [`seq_end`]. Returns the
/// tracking bits ([`CT_F_FINAL`]) both halves get and the forward entry's new `backend_ack`.
///
/// - The first FIN (no closing bit yet) is recorded: [`CT_F_FIN_SEQ`] and its end.
/// - The other side's FIN, acknowledging exactly that end (its sender has all of the first
///   side's bytes and FIN: it is closing second, in LAST_ACK, and the first side is in
///   FIN_WAIT_2), awaits its own ACK: [`CT_F_AWAIT_CLIENT_ACK`] or [`CT_F_AWAIT_BACKEND_ACK`]
///   and its end. One that does not (a simultaneous close, or a FIN berth saw without the
///   first) tracks nothing more: the flow keeps the hold.
/// - A FIN of a side that already sent one (a retransmission: its sender has not had the ACK
///   yet, whatever berth saw pass) takes [`CT_F_LAST_ACK`] back; the ACK that answers it marks
///   it again.
/// - A RST, or a FIN with SYN, ends the tracking: the hold applies.
#[inline(always)]
pub const fn track_close(
    flags: u8,
    fin_end: u32,
    tcp_flags: u8,
    dir: u8,
    ack: u32,
    end: u32,
) -> (u8, u32) {
    if tcp_flags & (TCP_RST | TCP_SYN) != 0 || tcp_flags & TCP_FIN == 0 {
        return (0, fin_end);
    }
    // The side whose ACK this FIN awaits, should it come second.
    let (mine, await_theirs) = if dir == DIR_FORWARD {
        (CT_F_FIN_CLIENT, CT_F_AWAIT_BACKEND_ACK)
    } else {
        (CT_F_FIN_BACKEND, CT_F_AWAIT_CLIENT_ACK)
    };
    let closed = flags & CT_F_CLOSED;
    let tracking = flags & CT_F_FINAL;
    if closed == 0 {
        (CT_F_FIN_SEQ, end)
    } else if closed & mine != 0 {
        // This side's FIN again.
        (tracking & !CT_F_LAST_ACK, fin_end)
    } else if tracking & CT_F_FIN_SEQ != 0 && tcp_flags & TCP_ACK != 0 && ack == fin_end {
        (await_theirs, end)
    } else {
        (0, fin_end)
    }
}

/// Whether a segment from `dir`'s side of a full-NAT flow whose forward entry has `flags` and
/// `fin_end` (its `backend_ack`) is the flow's final ACK: the side [`track_close`] awaits it
/// from, a plain ACK (no SYN, FIN or RST) of exactly where the second FIN ends (its sender
/// sends nothing beyond it, so a larger number is no ACK of this connection). Checked first
/// on the awaited bit alone, so a flow not closing pays one test.
#[inline(always)]
pub const fn is_final_ack(flags: u8, fin_end: u32, tcp_flags: u8, dir: u8, ack: u32) -> bool {
    let awaited = if dir == DIR_FORWARD {
        CT_F_AWAIT_CLIENT_ACK
    } else {
        CT_F_AWAIT_BACKEND_ACK
    };
    flags & awaited != 0
        && tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK) == TCP_ACK
        && ack == fin_end
}

/// Whether a client-side segment with sequence number `seq` lies in the window of the backend's
/// connection whose reply entry is `rev`: it must start within [`CLOSE_WINDOW`] of what the
/// backend acknowledged. With no acknowledgment seen yet (the backend has not answered), there
/// is no established connection to protect. A FIN or RST closes the flow only in the window,
/// and only a segment in the window may take a live flow's reply key over (after a flood
/// evicted the flow's own entries, its client proves itself this way; a blind spoofer cannot).
/// A half whose window was lost ([`WINDOW_LOST`]) has none: no segment is in it until the
/// backend's next acknowledgment ([`record_backend_ack`]).
#[inline(always)]
pub const fn in_window(rev: &CtEntry, seq: u32) -> bool {
    rev.lazy != WINDOW_LOST
        && (rev.flags & CT_F_ACK_KNOWN == 0 || seq.wrapping_sub(rev.backend_ack) <= CLOSE_WINDOW)
}

/// A reply entry's [`CtEntry::lazy`] byte (0 otherwise there): the half was rebuilt from a
/// client's segment of a confirmed flow (see [`rebuilt_window`]), and its window went with the
/// evicted half it replaces.
pub const WINDOW_LOST: u8 = 3;

/// How a half rebuilt as `dir` (in CT_NEW if `unconfirmed`) starts, from the client's TCP
/// segment that rebuilds it: its `backend_ack`, its [`CT_F_ACK_KNOWN`] bit and its
/// [`CtEntry::lazy`] byte. A reply half must not read as never answered where its backend has
/// answered, for [`in_window`] leaves such a half open to any segment (a blind spoofer's
/// included) closing the flow or taking its key over:
/// - a confirmed flow's backend has answered, and the window went with the evicted half:
///   [`WINDOW_LOST`], nothing judged in it until the backend's next acknowledgment, whatever
///   the segment (a bare SYN on a confirmed flow is a retransmission or a spoofer's). The
///   segment's own sequence number once stood in for the window: a blind spoofer's segment
///   then set a window its own next segment fell in, and a RST there closed a live flow; a
///   bare SYN left the half as never answered, and any RST after it closed the flow.
/// - an unconfirmed flow (whose client may close it before its backend ever answers) has no
///   established connection to protect: a segment past the handshake (no SYN) stands in its
///   sequence number for the backend's acknowledgment until the backend's next one replaces
///   it; a SYN's half starts unknown.
///
/// Anything else (a forward half, UDP) starts unknown.
#[inline(always)]
pub const fn rebuilt_window(
    dir: u8,
    proto: u8,
    tcp_flags: u8,
    seq: u32,
    unconfirmed: bool,
) -> (u32, u8, u8) {
    if dir != DIR_REPLY || proto != IPPROTO_TCP {
        (0, 0, 0)
    } else if !unconfirmed {
        (0, 0, WINDOW_LOST)
    } else if tcp_flags & TCP_SYN != 0 {
        (0, 0, 0)
    } else {
        (seq, CT_F_ACK_KNOWN, 0)
    }
}

/// Records in reply entry `rev` an acknowledgment number `ack` its backend sent (a TCP segment
/// with ACK): the window [`in_window`] judges client segments by. It only moves forward, except
/// from no acknowledgment known (which a lost window, [`WINDOW_LOST`], also is, and ends).
#[inline(always)]
pub fn record_backend_ack(rev: &mut CtEntry, ack: u32) {
    if rev.flags & CT_F_ACK_KNOWN == 0 || seq_after(ack, rev.backend_ack) {
        rev.backend_ack = ack;
        rev.flags |= CT_F_ACK_KNOWN;
        rev.lazy = 0;
    }
}

/// The reply half of the flow whose forward entry `fwd` is at `fkey`, derived where its
/// backend's reply finds none (a lazily recorded DNAT flow's, an indexed flow's whose half was
/// evicted): translating back to the service (and for full NAT to the client), with
/// the forward entry's closing bits and last-seen time (so it expires with it), no route yet,
/// and no window (the reply's acknowledgment records it). The TC program's one rule.
#[inline(always)]
pub const fn derived_reply(fkey: &FlowKey, fwd: &CtEntry) -> CtEntry {
    let full = fwd.full_nat();
    CtEntry {
        nat_addr: fkey.daddr,
        nat_port: fkey.dport,
        dir: DIR_REPLY,
        route: crate::Route::NONE,
        backend_ack: 0,
        fnat_addr: if full { fkey.saddr } else { 0 },
        fnat_port: if full { fkey.sport } else { 0 },
        flags: fwd.flags & !CT_F_ACK_KNOWN,
        lazy: 0,
        ..*fwd
    }
}

/// Whether a forward packet of the flow whose forward entry is `fwd` may go without looking up
/// its reply half: the flow is recorded lazily or indexed ([`CtEntry::lazy`]: its backend's
/// replies derive a missing reply half), the packet does not close it (a FIN or RST is judged
/// against the reply half's window and marks both halves), the flow is not closing (a full-NAT
/// flow's final ACK is judged and marked so too), and it is not the flow's once-a-second
/// refresh (which stamps both halves together, so the reply half of a flow whose client only
/// sends never expires). The TC and XDP programs' one rule.
#[inline(always)]
pub const fn forward_skips_reply(fwd: &CtEntry, proto: u8, tcp_flags: u8, now_ns: u64) -> bool {
    fwd.lazy != 0
        && now_ns.wrapping_sub(fwd.last_seen_ns) <= TOUCH_INTERVAL_NS
        && !closes(proto, tcp_flags)
        && fwd.flags & CT_F_FINAL == 0
}

/// Whether a reply packet of the flow whose reply entry is `rev` (in the main map) may be
/// translated without looking up its forward half: a flow picked in the current table epoch
/// (`epoch()`, `crate::epoch::stable`; a full-NAT flow is stamped only at its first port; see
/// [`crate::epoch`] for why its reply entry is then the one its client's tuple leads to), open,
/// the packet neither a SYN (a handshake on the tuple meets the forward side's state), a FIN
/// nor a RST (which mark both halves), and not the flow's once-a-second refresh (which stamps
/// both halves, and rebuilds an evicted forward half from this one). The refresh test is
/// `translate`'s own, so a packet that skips is never one that refreshes. The epoch (a map read) is read last, only for an entry that could skip:
/// an unstamped reply (a full-NAT flow at a later port, say) never pays for it.
#[inline(always)]
pub fn reply_skips_forward(
    rev: &CtEntry,
    proto: u8,
    tcp_flags: u8,
    now_ns: u64,
    epoch: impl FnOnce() -> u64,
) -> bool {
    rev.epoch != 0
        && rev.state == STATE_OPEN
        && (proto != IPPROTO_TCP || tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0)
        && now_ns.wrapping_sub(rev.last_seen_ns) <= TOUCH_INTERVAL_NS
        && rev.epoch == epoch()
}

/// Whether reply entry `r` (in CT_NEW if `in_ct_new`) holds its key and port as a full-NAT flow
/// whose forward entry may be pending in the handshake table, out of sight of the map: while
/// unconfirmed and younger than [`UNCONFIRMED_PORT_HOLD_NS`], as if its forward half were
/// there (the program's `port_free` and `claim` do not look in the table).
#[inline(always)]
pub const fn pending_full_nat_holds(r: &CtEntry, in_ct_new: bool, now: u64) -> bool {
    r.full_nat() && in_ct_new && now.saturating_sub(r.last_seen_ns) <= UNCONFIRMED_PORT_HOLD_NS
}

/// Whether a live DNAT flow recorded lazily, forward entry `fwd`, keeps its reply key when it
/// has no reply half (so no window to judge by) against a new flow's packet of `proto` and
/// `tcp_flags` that would take the key, from the same client address and port (`names_client`:
/// false where the taker is a full-NAT flow, whose reply key names berth's address). The rule
/// `claim` applies to a reply half whose backend has not answered: such a flow proved nothing
/// (a blind spoofer's segment, picked up after a flood evicted the live flow's entries, records
/// one as easily as a client's SYN), so a TCP segment past the handshake naming its client takes
/// the key over. Answered ([`LAZY_ANSWERED`]), it keeps the key against every packet: nothing
/// tells its client from a spoofer without the window the missing half held.
#[inline(always)]
pub const fn lazy_flow_keeps(fwd: &CtEntry, proto: u8, tcp_flags: u8, names_client: bool) -> bool {
    lazy_keeps(fwd.lazy, proto, tcp_flags, names_client)
}

/// [`lazy_flow_keeps`] for a forward entry whose `lazy` field is `lazy`.
#[inline(always)]
pub const fn lazy_keeps(lazy: u8, proto: u8, tcp_flags: u8, names_client: bool) -> bool {
    lazy == LAZY_ANSWERED || !names_client || proto != IPPROTO_TCP || is_bare_syn(proto, tcp_flags)
}

/// Whether a new flow of `proto` starts unconfirmed, in the small map of its own (`CT_NEW`),
/// where a flood of flows that prove nothing churns without evicting established ones: every
/// TCP flow, a bare SYN's or one picked up mid-stream. It moves to the main map once its
/// client acknowledged the backend's SYN-ACK ([`handshake_confirms`]) or its backend sent a
/// segment of an established connection ([`reply_confirms`]); a blind spoofer, who never sees
/// the backend's packets, can do neither. UDP has nothing to prove itself by: its flows start
/// in the main map.
#[inline(always)]
pub const fn starts_unconfirmed(proto: u8) -> bool {
    proto == IPPROTO_TCP
}

/// Records in an unconfirmed flow's forward entry `fwd` the acknowledgment its client's
/// handshake ACK must carry, from the backend's SYN-ACK with sequence number `seq` (the
/// forward entry's `backend_ack` and [`CT_F_ACK_KNOWN`] are otherwise unused until the flow
/// is confirmed; [`clear_handshake`] clears them).
#[inline(always)]
pub const fn record_syn_ack(fwd: &mut CtEntry, tcp_flags: u8, seq: u32) {
    if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK {
        fwd.backend_ack = seq.wrapping_add(1);
        fwd.flags |= CT_F_ACK_KNOWN;
    }
}

/// Whether a client's segment (not a bare SYN) with `tcp_flags` and acknowledgment `ack`
/// confirms the unconfirmed flow whose forward entry is `fwd`: it acknowledges the backend's
/// SYN-ACK ([`record_syn_ack`]; up to [`CLOSE_WINDOW`] beyond it, for a SYN-ACK carrying data).
/// Without a SYN-ACK seen, nothing does (an ACK sent right behind a SYN, before any SYN-ACK, is
/// a blind spoofer's); such a flow is confirmed by its backend's reply ([`reply_confirms`]).
#[inline(always)]
pub const fn handshake_confirms(fwd: &CtEntry, tcp_flags: u8, ack: u32) -> bool {
    fwd.flags & CT_F_ACK_KNOWN != 0
        && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
        && ack.wrapping_sub(fwd.backend_ack) <= CLOSE_WINDOW
}

/// Whether a backend's segment confirms its unconfirmed flow: one of an established connection
/// (an ACK without SYN or RST). A backend answers a SYN with a SYN-ACK whoever sent it, and a
/// segment of no connection it has (a blind spoofer's) with a RST.
#[inline(always)]
pub const fn reply_confirms(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
}

/// Clears a forward entry's handshake bookkeeping ([`record_syn_ack`]) as it moves to the main
/// map.
#[inline(always)]
pub const fn clear_handshake(fwd: &mut CtEntry) {
    fwd.flags &= !CT_F_ACK_KNOWN;
    fwd.backend_ack = 0;
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
    extern crate std;

    use super::*;

    #[test]
    fn a_derived_reply_half_names_its_forward_half_and_carries_its_closing_state() {
        let fkey = FlowKey::new(0x0a00_0001, 0x0a63_0001, 40000u16.to_be(), 80u16.to_be(), 6);
        let base = CtEntry {
            nat_addr: 0x0a14_000b,
            nat_port: 8000u16.to_be(),
            dir: DIR_FORWARD,
            state: STATE_CLOSING,
            backend_id: 3,
            service_id: 1,
            last_seen_ns: 77,
            route: crate::Route::NONE,
            backend_ack: 1234,
            in_ifindex: 5,
            fnat_addr: 0,
            fnat_port: 0,
            flags: CT_F_ACK_KNOWN | CT_F_FIN_CLIENT,
            lazy: LAZY_ANSWERED,
            epoch: 6,
        };
        for fwd in [
            base,
            CtEntry {
                fnat_addr: 0x0a0a_0001,
                fnat_port: 61000u16.to_be(),
                flags: CT_F_ACK_KNOWN | CT_F_FULLNAT | CT_F_FIN_CLIENT | CT_F_AWAIT_BACKEND_ACK,
                lazy: LAZY_INDEXED,
                ..base
            },
        ] {
            let rkey = reply_key(&fkey, &fwd);
            let rev = derived_reply(&fkey, &fwd);
            assert!(is_reply_of(&rev, &rkey, &fkey), "{rev:?}");
            assert!(is_forward_of(&fwd, &fkey, &rkey));
            assert_eq!(
                (rev.flags, rev.backend_ack, rev.lazy),
                (fwd.flags & !CT_F_ACK_KNOWN, 0, 0)
            );
            assert_eq!(
                (rev.state, rev.last_seen_ns, rev.epoch, rev.in_ifindex),
                (fwd.state, 77, 6, 5)
            );
        }
    }
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
        snat_port_first: 61000,
        snat_port_last: 65535,
        snat_reuse_ms: 2,
        syn_sets: 1,
        snat_claims: 65_536,
        instance: 0,
        lazy_owners: 0,
    };

    #[test]
    fn an_unconfirmed_full_nat_reply_entry_holds_its_port_for_the_hold_only() {
        let r = CtEntry {
            flags: CT_F_FULLNAT,
            last_seen_ns: 1_000,
            ..bytemuck::Zeroable::zeroed()
        };
        let hold = UNCONFIRMED_PORT_HOLD_NS;
        assert!(pending_full_nat_holds(&r, true, 1_000 + hold));
        assert!(
            !pending_full_nat_holds(&r, true, 1_001 + hold),
            "past the hold"
        );
        assert!(
            !pending_full_nat_holds(&r, false, 1_000),
            "confirmed: judged by its pair"
        );
        let dnat = CtEntry { flags: 0, ..r };
        assert!(
            !pending_full_nat_holds(&dnat, true, 1_000),
            "a DNAT entry has no pending half"
        );
    }

    #[test]
    fn a_reply_half_rebuilt_past_the_handshake_has_lost_its_window_until_its_backend_acks() {
        let (backend_ack, flags, lazy) =
            rebuilt_window(DIR_REPLY, IPPROTO_TCP, TCP_ACK, 1234, false);
        assert_eq!((backend_ack, flags, lazy), (0, 0, WINDOW_LOST));
        let r = CtEntry {
            dir: DIR_REPLY,
            backend_ack,
            flags,
            lazy,
            ..entry(STATE_OPEN, 0)
        };
        // Answered, so not open to every segment as one never answered is; and no window,
        // not even at the rebuilding segment's own number.
        for seq in [0, 1234, 1235, 999_999, u32::MAX] {
            assert!(!in_window(&r, seq), "{seq}");
        }
        // The backend's next acknowledgment gives it one.
        let mut r = r;
        record_backend_ack(&mut r, 5000);
        assert_eq!(
            (r.backend_ack, r.flags & CT_F_ACK_KNOWN, r.lazy),
            (5000, CT_F_ACK_KNOWN, 0)
        );
        assert!(in_window(&r, 5000 + 10));
        assert!(!in_window(&r, 999_999));
        // And it only moves forward from there.
        record_backend_ack(&mut r, 4000);
        assert_eq!(r.backend_ack, 5000);
        record_backend_ack(&mut r, 6000);
        assert_eq!(r.backend_ack, 6000);
        // Unconfirmed: the segment's number stands in.
        let (ack, f, l) = rebuilt_window(DIR_REPLY, IPPROTO_TCP, TCP_ACK, 1234, true);
        assert_eq!((ack, f, l), (1234, CT_F_ACK_KNOWN, 0));
        let r = CtEntry {
            backend_ack: ack,
            flags: f,
            ..r
        };
        assert!(in_window(&r, 1234 + 10));
        assert!(!in_window(&r, 999_999));
        // A confirmed flow's half has lost its window whatever rebuilt it, a SYN too; an
        // unconfirmed flow's, rebuilt by a SYN, is never answered.
        assert_eq!(
            rebuilt_window(DIR_REPLY, IPPROTO_TCP, TCP_SYN, 1, false),
            (0, 0, WINDOW_LOST)
        );
        assert_eq!(
            rebuilt_window(DIR_REPLY, IPPROTO_TCP, TCP_SYN, 1, true),
            (0, 0, 0)
        );
        for unconfirmed in [false, true] {
            assert_eq!(
                rebuilt_window(DIR_FORWARD, IPPROTO_TCP, TCP_ACK, 1, unconfirmed),
                (0, 0, 0)
            );
            assert_eq!(
                rebuilt_window(DIR_REPLY, IPPROTO_UDP, 0, 1, unconfirmed),
                (0, 0, 0)
            );
        }
    }

    #[test]
    fn a_reply_skips_its_forward_half_only_in_its_epoch_open_and_fresh() {
        let r = CtEntry {
            dir: DIR_REPLY,
            epoch: 6,
            ..entry(STATE_OPEN, 1_000)
        };
        let now = 1_000 + TOUCH_INTERVAL_NS;
        // A TCP ACK of `rev` at `now`, the current epoch being `cur`.
        let ack = |rev: &CtEntry, now: u64, cur: u64| {
            reply_skips_forward(rev, IPPROTO_TCP, TCP_ACK, now, || cur)
        };
        assert!(ack(&r, now, 6));
        assert!(reply_skips_forward(&r, IPPROTO_UDP, 0, now, || 6));
        assert!(!ack(&r, now, 8), "the tables changed since its pick");
        assert!(!ack(&r, now, 0), "being changed");
        assert!(!ack(&CtEntry { epoch: 0, ..r }, now, 0), "not stamped");
        for flags in [TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
            assert!(
                !reply_skips_forward(&r, IPPROTO_TCP, flags, now, || 6),
                "{flags:#x}"
            );
        }
        assert!(!ack(&r, now + 1, 6), "due for its refresh");
        let closing = CtEntry {
            state: STATE_CLOSING,
            ..r
        };
        assert!(!ack(&closing, now, 6));
        // Full NAT: stamped only at its first port, then the same rule.
        let fnat = CtEntry {
            flags: CT_F_FULLNAT,
            ..r
        };
        assert!(ack(&fnat, now, 6));
        assert!(!ack(&fnat, now, 8));
        // The epoch is read only for an entry that could skip.
        let later_port = CtEntry { epoch: 0, ..fnat };
        assert!(!reply_skips_forward(
            &later_port,
            IPPROTO_TCP,
            TCP_ACK,
            now,
            || { panic!("an unstamped reply reads no epoch") }
        ));
    }

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
            fnat_addr: 0,
            fnat_port: 0,
            flags: 0,
            lazy: 0,
            epoch: 0,
        }
    }

    /// A flow's two halves as the program writes them: client 10.0.0.1:1000 -> service
    /// 10.9.0.1:80, backend 10.2.0.5:8000, and (full NAT) berth's source 10.1.0.1:61005.
    fn pair(full: bool) -> ((FlowKey, CtEntry), (FlowKey, CtEntry)) {
        let (client, service, backend, snat) = ((1, 1000), (2, 80), (3, 8000), (4, 61005));
        let fkey = FlowKey::new(client.0, service.0, client.1, service.1, IPPROTO_TCP);
        let mut f = entry(STATE_OPEN, 0);
        (f.nat_addr, f.nat_port) = backend;
        let mut r = f;
        r.dir = DIR_REPLY;
        (r.nat_addr, r.nat_port) = service;
        let rkey = if full {
            f.flags |= CT_F_FULLNAT;
            r.flags |= CT_F_FULLNAT;
            (f.fnat_addr, f.fnat_port) = snat;
            (r.fnat_addr, r.fnat_port) = client;
            FlowKey::new(backend.0, snat.0, backend.1, snat.1, IPPROTO_TCP)
        } else {
            FlowKey::new(backend.0, client.0, backend.1, client.1, IPPROTO_TCP)
        };
        ((fkey, f), (rkey, r))
    }

    #[test]
    fn an_unanswered_lazy_flow_yields_its_key_only_to_a_segment_of_its_client() {
        let unanswered = CtEntry {
            lazy: LAZY_RECORDED,
            ..entry(STATE_OPEN, 1_000)
        };
        let answered = CtEntry {
            lazy: LAZY_ANSWERED,
            ..unanswered
        };
        for flags in [TCP_ACK, TCP_ACK | TCP_FIN, TCP_SYN | TCP_ACK, TCP_RST] {
            assert!(!lazy_flow_keeps(&unanswered, IPPROTO_TCP, flags, true));
            assert!(lazy_flow_keeps(&answered, IPPROTO_TCP, flags, true));
            assert!(lazy_flow_keeps(&unanswered, IPPROTO_TCP, flags, false));
        }
        assert!(lazy_flow_keeps(&unanswered, IPPROTO_TCP, TCP_SYN, true));
        assert!(lazy_flow_keeps(&unanswered, IPPROTO_UDP, 0, true));
    }

    #[test]
    fn only_an_ack_of_the_backends_syn_ack_or_an_established_reply_confirms_a_flow() {
        let mut fwd = entry(STATE_OPEN, 1_000);
        // No SYN-ACK seen: no client segment confirms.
        assert!(!handshake_confirms(&fwd, TCP_ACK, 5001));
        record_syn_ack(&mut fwd, TCP_SYN, 4999);
        record_syn_ack(&mut fwd, TCP_SYN | TCP_ACK | TCP_RST, 4999);
        assert!(!handshake_confirms(&fwd, TCP_ACK, 5000));
        record_syn_ack(&mut fwd, TCP_SYN | TCP_ACK, 5000);
        assert!(handshake_confirms(&fwd, TCP_ACK, 5001));
        assert!(handshake_confirms(&fwd, TCP_ACK | TCP_FIN, 5001));
        assert!(handshake_confirms(&fwd, TCP_ACK, 5001 + CLOSE_WINDOW));
        assert!(!handshake_confirms(&fwd, TCP_ACK, 5002 + CLOSE_WINDOW));
        assert!(!handshake_confirms(&fwd, TCP_ACK, 5000));
        assert!(!handshake_confirms(&fwd, TCP_ACK | TCP_RST, 5001));
        assert!(!handshake_confirms(&fwd, TCP_SYN | TCP_ACK, 5001));
        clear_handshake(&mut fwd);
        assert_eq!((fwd.flags & CT_F_ACK_KNOWN, fwd.backend_ack), (0, 0));
        assert!(reply_confirms(IPPROTO_TCP, TCP_ACK));
        assert!(reply_confirms(IPPROTO_TCP, TCP_ACK | TCP_FIN));
        for flags in [TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK, 0] {
            assert!(!reply_confirms(IPPROTO_TCP, flags));
        }
        assert!(starts_unconfirmed(IPPROTO_TCP) && !starts_unconfirmed(IPPROTO_UDP));
    }

    #[test]
    fn only_a_lazy_flows_plain_fresh_forward_packets_skip_the_reply_half() {
        let lazy = CtEntry {
            lazy: 1,
            ..entry(STATE_OPEN, 1_000)
        };
        let now = 1_000 + TOUCH_INTERVAL_NS;
        assert!(forward_skips_reply(&lazy, IPPROTO_TCP, TCP_ACK, now));
        assert!(forward_skips_reply(&lazy, IPPROTO_UDP, 0, now));
        // Not recorded lazily, a closing packet, or the refresh: the reply half is needed.
        assert!(!forward_skips_reply(
            &entry(STATE_OPEN, 1_000),
            IPPROTO_TCP,
            TCP_ACK,
            now
        ));
        assert!(!forward_skips_reply(
            &lazy,
            IPPROTO_TCP,
            TCP_ACK | TCP_FIN,
            now
        ));
        assert!(!forward_skips_reply(&lazy, IPPROTO_TCP, TCP_RST, now));
        assert!(!forward_skips_reply(&lazy, IPPROTO_TCP, TCP_ACK, now + 1));
    }

    #[test]
    fn each_half_finds_the_key_of_the_other() {
        for full in [false, true] {
            let ((fkey, f), (rkey, r)) = pair(full);
            assert_eq!(reply_key(&fkey, &f), rkey, "full nat {full}");
            assert_eq!(forward_key(&rkey, &r), fkey, "full nat {full}");
            assert!(is_reply_of(&r, &rkey, &fkey));
            assert!(is_forward_of(&f, &fkey, &rkey));
            // A half of another flow: another client, another service, another backend.
            let other_client = FlowKey::new(9, fkey.daddr, fkey.sport, fkey.dport, fkey.proto);
            assert!(!is_reply_of(&r, &rkey, &other_client));
            let mut r2 = r;
            r2.nat_port = 81;
            assert!(!is_reply_of(&r2, &rkey, &fkey));
            let mut f2 = f;
            f2.nat_addr = 7;
            assert!(!is_forward_of(&f2, &fkey, &rkey));
            // The wrong direction is never a partner.
            assert!(!is_reply_of(&f, &rkey, &fkey));
            assert!(!is_forward_of(&r, &fkey, &rkey));
        }
        // Full NAT: the reply key does not hold the client, so the entry must name it.
        let ((fkey, _), (rkey, r)) = pair(true);
        let mut other = fkey;
        other.saddr = 9;
        assert!(!is_reply_of(&r, &rkey, &other));
        // A DNAT half never pairs with a full-NAT one.
        let ((_, fd), _) = pair(false);
        assert_ne!(reply_key(&fkey, &fd), rkey);
    }

    #[test]
    fn snat_ports_stay_in_range_and_spread() {
        for (first, last) in [(61000u16, 65535u16), (7, 7), (1, 65535), (50000, 50009)] {
            let n = u32::from(last) - u32::from(first) + 1;
            let mut seen = std::collections::BTreeSet::new();
            for h in 0..2000u32 {
                let h = h.wrapping_mul(0x0101_0101) ^ 0xdead_beef;
                for t in 0..SNAT_TRIES {
                    let p = snat_port(h, t, first, last);
                    assert!((first..=last).contains(&p), "{p} outside {first}-{last}");
                    seen.insert(p);
                }
            }
            if n <= 10 {
                assert_eq!(seen.len() as u32, n, "every port of a small range is used");
            }
        }
        // A flow's tries are repeatable, and (nearly always) distinct ports.
        assert_eq!(
            snat_port(12345, 3, 61000, 65535),
            snat_port(12345, 3, 61000, 65535)
        );
        let repeats = (0..10_000u32)
            .filter(|h| {
                let tries: std::collections::BTreeSet<u16> = (0..SNAT_TRIES)
                    .map(|t| snat_port(h.wrapping_mul(0x0101_0101), t, 61000, 65535))
                    .collect();
                tries.len() as u32 != SNAT_TRIES
            })
            .count();
        // Independent tries meet again as the birthday bound has it: about pairs / range.
        let pairs = SNAT_TRIES * (SNAT_TRIES - 1) / 2;
        let expected = 10_000 * pairs as usize / 4536;
        assert!(
            repeats < expected + expected / 2,
            "{repeats} of 10000 flows try a port twice (independent tries: ~{expected})"
        );
        // A small range is walked port by port: every port is tried.
        for h in 0..100u32 {
            let tries: std::collections::BTreeSet<u16> =
                (0..SNAT_TRIES).map(|t| snat_port(h, t, 7, 9)).collect();
            assert_eq!(tries.len(), 3);
        }
        // Flows spread over the range: 4536 ports, 20000 flows' first tries.
        let mut counts = std::collections::BTreeMap::new();
        for h in 0..20_000u32 {
            let h = crate::hash::flow_hash(&FlowKey::new(h, 2, 3, 4, 6), 99);
            *counts.entry(snat_port(h, 0, 61000, 65535)).or_insert(0u32) += 1;
        }
        assert!(counts.len() > 4000, "only {} ports used", counts.len());
        assert!(*counts.values().max().unwrap() < 20, "{counts:?}");
    }

    /// The allocation as the program does it (the first free try), with flows coming and going
    /// as under a SYN flood: a third of the range in use at any time, the oldest flow leaving
    /// (evicted) as each new one arrives. A new flow must find no free port about as rarely as
    /// independent tries would (0.33^SNAT_TRIES: 1 in 600,000 with 12 tries); taken ports must not
    /// cluster.
    #[test]
    fn taken_ports_do_not_swallow_a_flows_tries() {
        let (first, last) = (61000u16, 65535u16);
        let n = usize::from(last - first) + 1;
        let mut taken = std::vec![false; n];
        let mut live = std::collections::VecDeque::new();
        let slot = |h: u32, t: u32| usize::from(snat_port(h, t, first, last) - first);
        let mut failed = 0;
        for flow in 0..200_000u32 {
            let h = crate::hash::flow_hash(&FlowKey::new(flow, 2, 3, 4, 6), 77);
            match (0..SNAT_TRIES).map(|t| slot(h, t)).find(|&i| !taken[i]) {
                Some(i) => {
                    taken[i] = true;
                    live.push_back(i);
                }
                None => failed += 1,
            }
            if live.len() > n / 3 {
                taken[live.pop_front().expect("non-empty")] = false;
            }
        }
        assert!(
            failed < 100,
            "{failed} of 200000 new flows found no free port with a third of the range in use"
        );
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
    fn fin_marks_its_senders_side_and_rst_both() {
        let tcp = IPPROTO_TCP;
        assert_eq!(
            close_bits(tcp, TCP_FIN | TCP_ACK, DIR_FORWARD),
            CT_F_FIN_CLIENT
        );
        assert_eq!(
            close_bits(tcp, TCP_FIN | TCP_ACK, DIR_REPLY),
            CT_F_FIN_BACKEND
        );
        assert_eq!(close_bits(tcp, TCP_RST, DIR_FORWARD), CT_F_CLOSED);
        assert_eq!(close_bits(tcp, TCP_RST | TCP_ACK, DIR_REPLY), CT_F_CLOSED);
        assert_eq!(close_bits(tcp, TCP_ACK, DIR_REPLY), 0);
        assert_eq!(close_bits(tcp, TCP_SYN, DIR_FORWARD), 0);
        // UDP has no FIN: port 0x01 in the flags byte is meaningless there.
        assert_eq!(close_bits(IPPROTO_UDP, TCP_FIN | TCP_RST, DIR_FORWARD), 0);
    }

    #[test]
    fn only_a_flow_closed_both_ways_gives_its_port_up_after_the_hold() {
        // CFG holds 2 ms = 2_000_000 ns.
        let mut r = entry(STATE_CLOSING, 1_000);
        r.dir = DIR_REPLY;
        r.flags = CT_F_FULLNAT | CT_F_ACK_KNOWN | CT_F_CLOSED;
        assert!(!port_reusable(&r, 1_000, &CFG));
        assert!(
            !port_reusable(&r, 2_001_000, &CFG),
            "the hold is not over yet"
        );
        assert!(port_reusable(&r, 2_001_001, &CFG));
        // Half-closed either way: the other side may still send, the port stays.
        for half in [CT_F_FIN_CLIENT, CT_F_FIN_BACKEND] {
            r.flags = CT_F_FULLNAT | half;
            assert!(!port_reusable(&r, u64::MAX, &CFG), "{half:#x}");
        }
        // Open (the bits of a flow that closed are never on an open one, but the state rules).
        r.flags = CT_F_FULLNAT | CT_F_CLOSED;
        r.state = STATE_OPEN;
        assert!(!port_reusable(&r, u64::MAX, &CFG));
        // A clock that went back (another CPU's stamp) is not an old flow.
        r.state = STATE_CLOSING;
        assert!(!port_reusable(&r, 0, &CFG));
    }

    #[test]
    fn a_flow_whose_final_ack_passed_gives_its_port_up_at_once() {
        let mut r = entry(STATE_CLOSING, 1_000);
        r.dir = DIR_REPLY;
        r.flags = CT_F_FULLNAT | CT_F_CLOSED | CT_F_LAST_ACK;
        assert!(port_reusable(&r, 1_000, &CFG), "no hold");
        assert!(port_reusable(&r, 0, &CFG));
        // Awaiting it is not having it.
        r.flags = CT_F_FULLNAT | CT_F_CLOSED | CT_F_AWAIT_CLIENT_ACK;
        assert!(!port_reusable(&r, 1_000, &CFG));
        assert!(port_reusable(&r, 2_001_001, &CFG), "the hold still ends");
        // The bit never frees a half-closed or open flow's port.
        r.flags = CT_F_FULLNAT | CT_F_FIN_CLIENT | CT_F_LAST_ACK;
        assert!(!port_reusable(&r, u64::MAX, &CFG));
        r.flags = CT_F_FULLNAT | CT_F_CLOSED | CT_F_LAST_ACK;
        r.state = STATE_OPEN;
        assert!(!port_reusable(&r, u64::MAX, &CFG));
    }

    #[test]
    fn sequence_space_ends_after_data_syn_and_fin() {
        assert_eq!(seq_end(100, 0, TCP_FIN | TCP_ACK), 101);
        assert_eq!(seq_end(100, 10, TCP_FIN | TCP_ACK), 111);
        assert_eq!(seq_end(100, 10, TCP_ACK), 110);
        assert_eq!(seq_end(100, 0, TCP_SYN), 101);
        assert_eq!(seq_end(u32::MAX, 0, TCP_FIN), 0, "wraps");
    }

    /// The tracking as the program applies it: `track_close` before a FIN's closing bits are
    /// added, `is_final_ack` for other segments.
    struct Flow {
        flags: u8,
        fin_end: u32,
    }

    impl Flow {
        fn seg(&mut self, dir: u8, tcp_flags: u8, seq: u32, ack: u32, data: u32) -> bool {
            if closes(IPPROTO_TCP, tcp_flags) {
                let end = seq_end(seq, data, tcp_flags);
                let (bits, fin_end) =
                    track_close(self.flags, self.fin_end, tcp_flags, dir, ack, end);
                self.flags = (self.flags & !CT_F_FINAL) | bits;
                self.fin_end = fin_end;
                self.flags |= close_bits(IPPROTO_TCP, tcp_flags, dir);
                false
            } else if is_final_ack(self.flags, self.fin_end, tcp_flags, dir, ack) {
                self.flags |= CT_F_LAST_ACK;
                true
            } else {
                false
            }
        }
    }

    const A: u8 = TCP_ACK;
    const FA: u8 = TCP_FIN | TCP_ACK;

    #[test]
    fn the_final_ack_is_the_ack_of_the_second_fin_from_the_other_side() {
        let (c, b) = (DIR_FORWARD, DIR_REPLY);
        // The client closes first (with 5 bytes of data on its FIN), the backend second; the
        // client's ACK of the backend's FIN is the last.
        let mut f = Flow {
            flags: 0,
            fin_end: 0,
        };
        f.seg(c, FA, 1000, 5000, 5);
        assert_eq!((f.flags & CT_F_FINAL, f.fin_end), (CT_F_FIN_SEQ, 1006));
        f.seg(b, A, 5000, 1006, 0);
        f.seg(b, TCP_ACK | 0x08, 5000, 1006, 100); // data in the half-close
        assert_eq!(f.flags & CT_F_FINAL, CT_F_FIN_SEQ);
        f.seg(b, FA, 5100, 1006, 0);
        assert_eq!(
            (f.flags & CT_F_FINAL, f.fin_end),
            (CT_F_AWAIT_CLIENT_ACK, 5101)
        );
        // Not the final ACK: from the backend's side, short of the FIN, past it, with SYN.
        assert!(!f.seg(b, A, 5101, 1006, 0));
        assert!(!f.seg(c, A, 1006, 5100, 0));
        assert!(!f.seg(c, A, 1006, 5102, 0));
        assert!(!f.seg(c, TCP_SYN | A, 1006, 5101, 0));
        assert_eq!(f.flags & CT_F_LAST_ACK, 0);
        assert!(f.seg(c, A, 1006, 5101, 0));
        assert_eq!(f.flags & CT_F_CLOSED, CT_F_CLOSED);
        // The backend retransmits its FIN (it did not get the ACK): the port is held again,
        // until the client's TIME_WAIT answers it.
        f.seg(b, FA, 5100, 1006, 0);
        assert_eq!(f.flags & CT_F_LAST_ACK, 0);
        assert!(f.seg(c, A, 1006, 5101, 0));

        // The backend closes first, the client second; the backend's ACK is the last.
        let mut f = Flow {
            flags: 0,
            fin_end: 0,
        };
        f.seg(b, FA, 7000, 300, 0);
        f.seg(c, FA, 300, 7001, 0);
        assert_eq!(
            (f.flags & CT_F_FINAL, f.fin_end),
            (CT_F_AWAIT_BACKEND_ACK, 301)
        );
        assert!(!f.seg(c, A, 301, 7001, 0), "the client owes nothing");
        assert!(f.seg(b, A, 7001, 301, 0));
    }

    #[test]
    fn no_final_ack_is_awaited_after_a_simultaneous_close_or_a_rst() {
        let (c, b) = (DIR_FORWARD, DIR_REPLY);
        // FINs crossing: the backend's does not acknowledge the client's.
        let mut f = Flow {
            flags: 0,
            fin_end: 0,
        };
        f.seg(c, FA, 1000, 5000, 0);
        f.seg(b, FA, 5000, 1000, 0);
        assert_eq!(f.flags & CT_F_FINAL, 0);
        assert!(!f.seg(c, A, 1001, 5001, 0));
        assert!(!f.seg(b, A, 5001, 1001, 0));
        // A FIN without ACK, or acknowledging beyond the first FIN, is no second FIN either.
        for (flags, ack) in [(TCP_FIN, 1001), (FA, 1002)] {
            let mut f = Flow {
                flags: 0,
                fin_end: 0,
            };
            f.seg(c, FA, 1000, 5000, 0);
            f.seg(b, flags, 5000, ack, 0);
            assert_eq!(f.flags & CT_F_FINAL, 0, "{flags:#x} {ack}");
        }
        // A RST ends the tracking wherever it is.
        let mut f = Flow {
            flags: 0,
            fin_end: 0,
        };
        f.seg(c, FA, 1000, 5000, 0);
        f.seg(b, FA, 5000, 1001, 0);
        f.seg(b, TCP_RST, 5001, 0, 0);
        assert_eq!(f.flags & CT_F_FINAL, 0);
        assert!(!f.seg(c, A, 1001, 5001, 0));
        let mut f = Flow {
            flags: 0,
            fin_end: 0,
        };
        f.seg(c, FA, 1000, 5000, 0);
        f.seg(b, FA, 5000, 1001, 0);
        assert!(f.seg(c, A, 1001, 5001, 0));
        f.seg(c, TCP_RST, 1001, 0, 0);
        assert_eq!(f.flags & CT_F_FINAL, 0, "a RST after it: the hold again");
        // A flow closed by a RST first: a FIN after it starts no tracking.
        let mut f = Flow {
            flags: 0,
            fin_end: 0,
        };
        f.seg(b, TCP_RST | A, 5000, 1000, 0);
        f.seg(c, FA, 1000, 5000, 0);
        assert_eq!(f.flags & CT_F_FINAL, 0);
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
