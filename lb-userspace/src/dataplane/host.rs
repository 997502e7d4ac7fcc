//! Host probes the dataplane needs: this host's addresses, the cgroup v2 root, interface
//! indexes, the network namespace's cookie and the clock conntrack timestamps use.

use super::*;

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

/// The source address the kernel would give a packet of this process's network namespace
/// toward `to` (its routing decision, policy routing included): what full NAT uses unless
/// `dataplane.snat_address` says otherwise. A connected UDP socket sends nothing.
pub fn source_toward(to: std::net::Ipv4Addr) -> std::io::Result<std::net::Ipv4Addr> {
    let s = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect((to, 9))?;
    match s.local_addr()? {
        std::net::SocketAddr::V4(a) if !a.ip().is_unspecified() => Ok(*a.ip()),
        other => Err(std::io::Error::other(format!(
            "no IPv4 source toward {to} (got {other})"
        ))),
    }
}

/// [`source_toward`] for an IPv6 backend (`dataplane.snat_address6` unless given).
pub fn source_toward6(to: std::net::Ipv6Addr) -> std::io::Result<std::net::Ipv6Addr> {
    let s = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))?;
    s.connect((to, 9))?;
    match s.local_addr()? {
        std::net::SocketAddr::V6(a) if !a.ip().is_unspecified() => Ok(*a.ip()),
        other => Err(std::io::Error::other(format!(
            "no IPv6 source toward {to} (got {other})"
        ))),
    }
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

pub(super) fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
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

/// The driver of network interface `iface` in this network namespace (`ETHTOOL_GDRVINFO`), e.g.
/// "veth"; None if the interface does not answer. (Not sysfs: /sys/class/net shows the
/// namespace of whoever mounted it.)
pub fn driver_of(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 4 * 32 + 12 + 20],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if iface.len() >= 16 {
        return None;
    }
    let mut info = DrvInfo {
        cmd: 0x3, // ETHTOOL_GDRVINFO
        driver: [0; 32],
        rest: [0; 4 * 32 + 12 + 20],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a socket only for the ioctl, closed below; `req` and `info` outlive the call and
    // are as large as the kernel writes (struct ifreq, struct ethtool_drvinfo).
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, 0x8946, &mut req); // SIOCETHTOOL
        libc::close(fd);
        rc
    };
    if rc != 0 {
        return None;
    }
    let n = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..n]).into_owned())
}
