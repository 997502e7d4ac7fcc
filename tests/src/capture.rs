//! Capturing the frames an interface receives with the kernel's checksum status of each
//! (`PACKET_AUXDATA`): a frame whose skb is `CHECKSUM_PARTIAL` (`TP_STATUS_CSUMNOTREADY`)
//! carries only the pseudo-header's sum in its TCP/UDP checksum field, which a NIC or the stack
//! completes later; any other carries the complete checksum. A veth hands both on unchecked, so
//! a test of berth's rewrites checks them here ([`Frame::verify`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    netns::{ETHTOOL_STXCSUM, Netns, ethtool_flag},
    traffic::spread,
    wire, wire6,
};

const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

/// One received frame and whether its skb was `CHECKSUM_PARTIAL`.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub partial: bool,
}

impl Frame {
    /// The frame's IPv4 header checksum, and its TCP/UDP checksum as its skb's state says: a
    /// `CHECKSUM_PARTIAL` field must hold the pseudo-header's sum (source, destination,
    /// protocol, length; not inverted), any other the complete checksum. IPv6 alike (no
    /// header checksum; the L4 header right after the fixed header).
    pub fn verify(&self) -> Result<(), String> {
        if self.is_ipv6() {
            return self.verify6();
        }
        if !self.partial {
            return wire::verify_checksums(&self.bytes);
        }
        let p = &self.bytes;
        let ip = p.get(14..).ok_or("frame too short")?;
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let proto = ip[9];
        let off = match proto {
            6 => 16,
            17 => 6,
            _ => return Err(format!("a partial checksum in protocol {proto}")),
        };
        // The IPv4 header's checksum is always complete: the header sums to all ones.
        if wire::checksum(&ip[..ihl]) != 0 {
            return Err("IPv4 header checksum wrong".to_owned());
        }
        let got = u16::from_be_bytes([ip[ihl + off], ip[ihl + off + 1]]);
        let mut sum: u32 = 0;
        for w in [src(ip).octets(), dst(ip).octets()] {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum += u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        sum += u32::from(proto) + (tot - ihl) as u32;
        partial_field("", proto, got, sum)
    }
}

/// A partial L4 field `got` against the pseudo-header's sum `sum` (not folded yet).
fn partial_field(family: &str, proto: u8, got: u16, mut sum: u32) -> Result<(), String> {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if got != sum as u16 {
        return Err(format!(
            "partial {family}L4 (proto {proto}) field {got:#06x}, pseudo-header sum {sum:#06x}"
        ));
    }
    Ok(())
}

impl Frame {
    fn is_ipv6(&self) -> bool {
        self.bytes.len() >= 54 && self.bytes[12..14] == [0x86, 0xdd]
    }

    /// [`Frame::verify`] for an IPv6 frame.
    fn verify6(&self) -> Result<(), String> {
        if !self.partial {
            return wire6::verify_checksums6(&self.bytes);
        }
        let ip = &self.bytes[14..];
        let proto = ip[6];
        let off = match proto {
            6 => 16,
            17 => 6,
            _ => return Err(format!("a partial checksum in next header {proto}")),
        };
        let at = 40 + off;
        let got = u16::from_be_bytes([
            *ip.get(at).ok_or("frame too short")?,
            *ip.get(at + 1).ok_or("frame too short")?,
        ]);
        // Source and destination, the upper-layer length (the payload: no extension headers
        // here) and the next header.
        let mut sum: u32 = ip[8..40]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        sum += u32::from(u16::from_be_bytes([ip[4], ip[5]])) + u32::from(proto);
        partial_field("IPv6 ", proto, got, sum)
    }

    /// A TCP or UDP frame's (source, destination) ports (IPv4, or IPv6 without extension
    /// headers).
    pub fn ports(&self) -> Option<(u16, u16)> {
        let b = &self.bytes;
        let port = |at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
        if self.is_ipv6() {
            return matches!(b[20], 6 | 17).then_some((port(54)?, port(56)?));
        }
        if b.len() < 38 || b[12..14] != [0x08, 0x00] || !matches!(b[23], 6 | 17) {
            return None;
        }
        let l4 = 14 + usize::from(b[14] & 0xf) * 4;
        Some((port(l4)?, port(l4 + 2)?))
    }

    /// The IPv4 protocol or IPv6 next header (0 for anything else).
    pub fn proto(&self) -> u8 {
        if self.is_ipv6() {
            self.bytes[20]
        } else if self.bytes.len() > 23 && self.bytes[12..14] == [0x08, 0x00] {
            self.bytes[23]
        } else {
            0
        }
    }
}

/// Checks `frames` (rewritten ones, `what` in messages): at least `tcp` TCP and `udp` UDP
/// frames, partial ones (most of them: a client's or backend's sockets send nothing else)
/// exactly when transmit checksum `offload` was on, and every one's checksums right for its
/// state ([`Frame::verify`]).
pub fn assert_checksums(what: &str, frames: &[Frame], offload: bool, tcp: usize, udp: usize) {
    let count = |p: u8| frames.iter().filter(|f| f.proto() == p).count();
    let (t, u) = (count(6), count(17));
    let partial = frames.iter().filter(|f| f.partial).count();
    println!(
        "offload {offload}, {what}: {} frames ({t} TCP, {u} UDP), {partial} partial",
        frames.len()
    );
    assert!(t >= tcp && u >= udp, "{what}: {t} TCP, {u} UDP frames");
    if offload {
        assert!(
            partial * 2 >= frames.len(),
            "{what}: only {partial} partial with offload on"
        );
    } else {
        assert_eq!(partial, 0, "{what}: partial frames with offload off");
    }
    let bad: Vec<String> = frames.iter().filter_map(|f| f.verify().err()).collect();
    assert!(
        bad.is_empty(),
        "{what}, offload {offload}: {} of {} frames wrong, e.g. {:?}",
        bad.len(),
        frames.len(),
        &bad[..bad.len().min(4)]
    );
}

/// Sends 60 TCP requests and 60 UDP datagrams from `client` to `service` (port 8080, whose
/// backends in `backends` listen on 8000) twice: with the transmit checksum offload of every
/// `eth0` on (the frames' skbs `CHECKSUM_PARTIAL`) and off (complete checksums); captures what
/// the backends and the client receive, and checks every rewritten frame ([`assert_checksums`],
/// `what` in messages).
pub fn check_rewritten_checksums(
    what: &str,
    client: &Netns,
    backends: &[Netns],
    service: impl Into<SocketAddr>,
) {
    let service: SocketAddr = service.into();
    assert_eq!(service.port(), 8080, "the backends listen on 8000");
    for offload in [true, false] {
        for ns in backends.iter().chain([client]) {
            ns.run(move || ethtool_flag("eth0", ETHTOOL_STXCSUM, offload));
        }
        let caps: Vec<Capture> = backends.iter().map(|b| Capture::start(b, "eth0")).collect();
        let at_client = Capture::start(client, "eth0");
        let tcp = spread(client, service, false, 60);
        let udp = spread(client, service, true, 60);
        assert_eq!(tcp.values().chain(udp.values()).sum::<usize>(), 120);
        // The last answers' frames reach the captures.
        std::thread::sleep(Duration::from_millis(200));
        let forward: Vec<Frame> = caps
            .into_iter()
            .flat_map(Capture::stop)
            .filter(|f| f.ports().is_some_and(|p| p.1 == 8000))
            .collect();
        let replies: Vec<Frame> = at_client
            .stop()
            .into_iter()
            .filter(|f| f.ports().is_some_and(|p| p.0 == 8080))
            .collect();
        assert_checksums(&format!("{what} forward"), &forward, offload, 60 * 3, 60);
        assert_checksums(&format!("{what} reply"), &replies, offload, 60 * 3, 60);
    }
}

fn src(ip: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])
}

fn dst(ip: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])
}

/// A capture of the frames `iface` in a namespace receives, until [`Capture::stop`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Frame>>>,
}

impl Capture {
    /// Starts capturing what `iface` in `ns` receives (its own transmissions left out); returns
    /// once the socket is bound.
    pub fn start(ns: &Netns, iface: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, iface) = (stop.clone(), iface.to_owned());
        let thread = ns.spawn(move || capture(&iface, &flag, &ready_tx));
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture socket bound");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the frames received.
    pub fn stop(mut self) -> Vec<Frame> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn capture(iface: &str, stop: &AtomicBool, ready: &std::sync::mpsc::Sender<()>) -> Vec<Frame> {
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: plain socket calls on a socket this function owns and closes; every buffer
    // passed outlives its call.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(sll.sll_ifindex > 0, "no interface {iface}");
        let rc = libc::bind(
            fd,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let on: i32 = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            (&raw const on).cast(),
            4,
        );
        assert_eq!(rc, 0, "PACKET_AUXDATA: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let _ = ready.send(());
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65_536];
        let mut control = [0u64; 16];
        while !stop.load(Ordering::Relaxed) {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = (&raw mut from).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = libc::recvmsg(fd, &raw mut msg, 0);
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut partial = false;
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux = libc::CMSG_DATA(c)
                        .cast::<libc::tpacket_auxdata>()
                        .read_unaligned();
                    partial = aux.tp_status & TP_STATUS_CSUMNOTREADY != 0;
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
            frames.push(Frame {
                bytes: buf[..n as usize].to_vec(),
                partial,
            });
        }
        libc::close(fd);
        frames
    }
}
