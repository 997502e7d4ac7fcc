//! Host probes `berth run` makes before it touches the kernel: the default route's interface,
//! and whether an interface exists and forwards IPv4.

use std::path::Path;

use anyhow::{Context as _, bail};

/// The text of /proc/net/route (empty if unreadable: no route is found in it).
pub fn read_routes() -> String {
    std::fs::read_to_string("/proc/net/route").unwrap_or_default()
}

/// The IPv4 default route's interface and gateway, in the text of /proc/net/route.
fn default_route(routes: &str) -> Option<(String, std::net::Ipv4Addr)> {
    routes
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
        .and_then(|f| {
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            Some((f[0].to_owned(), std::net::Ipv4Addr::from(gw.to_ne_bytes())))
        })
}

/// The interface of the IPv4 default route (from /proc/net/route).
pub fn default_route_iface() -> anyhow::Result<String> {
    let routes = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    match default_route(&routes) {
        Some((iface, _)) => Ok(iface),
        None => bail!(
            "no IPv4 default route: name the interface(s) with --iface or dataplane.interfaces"
        ),
    }
}

/// The interface of the route the kernel's main table gives toward `to` (longest prefix, then
/// lowest metric), in `routes`, the text of /proc/net/route (addresses and masks are hex of the
/// in-memory, network-order words). Policy routing is not followed.
pub fn route_interface_in(routes: &str, to: std::net::Ipv4Addr) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    let to = u32::from_ne_bytes(to.octets());
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let (dest, flags, metric, mask) = (
                hex(f[1])?,
                hex(f[3])?,
                f[6].parse::<u32>().ok()?,
                hex(f[7])?,
            );
            (flags & RTF_UP != 0 && to & mask == dest).then(|| (mask.count_ones(), metric, f[0]))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, iface)| iface.to_owned())
}

/// The text of /proc/net/ipv6_route (empty if unreadable: no route is found in it).
pub fn read_routes6() -> String {
    std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default()
}

/// [`route_interface_in`] for IPv6: the interface of the route toward `to` in `routes`, the
/// text of /proc/net/ipv6_route (destination and prefix length in hex, metric, flags, device;
/// every table, the local one included, whose routes to this host's own addresses are on
/// `lo`). Reject routes and routes not up are skipped.
pub fn route6_interface_in(routes: &str, to: std::net::Ipv6Addr) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    let to = u128::from(to);
    routes
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let dest = u128::from_str_radix(f[0], 16).ok()?;
            let plen = u32::from_str_radix(f[1], 16).ok()?;
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            let mask = if plen == 0 {
                0
            } else {
                u128::MAX.checked_shl(128 - plen.min(128))?
            };
            (flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && to & mask == dest & mask)
                .then(|| (plen, metric, f[9]))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, iface)| iface.to_owned())
}

/// The address this host sends from towards its default gateway (what other hosts on that
/// network reach it on), without sending anything.
pub fn default_route_address() -> anyhow::Result<std::net::Ipv4Addr> {
    let routes = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    let (_, gw) = default_route(&routes)
        .context("no IPv4 default route: give the address (publish.address or --address)")?;
    crate::dataplane::source_toward(gw)
        .with_context(|| format!("finding this host's address towards the gateway {gw}"))
}

/// The host's `ip_local_port_range` (the source ports its own connections take), when readable.
pub fn local_port_range() -> Option<crate::config::PortRange> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_port_range(&text)
}

/// `"32768\t60999\n"` as a range.
fn parse_port_range(text: &str) -> Option<crate::config::PortRange> {
    let mut f = text.split_whitespace().map(str::parse::<u16>);
    let (first, last) = (f.next()?.ok()?, f.next()?.ok()?);
    (first <= last).then_some(crate::config::PortRange { first, last })
}

/// Checks that every interface exists and, when berth routes packets itself, that IPv4
/// forwarding is on for it, and IPv6 forwarding too when `ipv6` (a service of that family is
/// configured): the kernel's FIB lookup refuses to route for an interface that does not forward.
pub fn preflight(ifaces: &[String], redirect: bool, ipv6: bool) -> anyhow::Result<()> {
    preflight_in(Path::new("/proc/sys/net"), ifaces, redirect, ipv6)
}

/// [`preflight`] against a `/proc/sys/net`-shaped tree at `net`.
fn preflight_in(net: &Path, ifaces: &[String], redirect: bool, ipv6: bool) -> anyhow::Result<()> {
    for iface in ifaces {
        let dir = net.join("ipv4/conf").join(iface);
        if !dir.exists() {
            bail!("interface {iface:?} does not exist (or has no IPv4 configuration)");
        }
        if !redirect {
            continue;
        }
        let fwd = std::fs::read_to_string(dir.join("forwarding"))
            .with_context(|| format!("reading IPv4 forwarding setting of {iface}"))?;
        if fwd.trim() != "1" {
            bail!(
                "IPv4 forwarding is off on {iface}: berth forwards translated packets to \
                 backends and needs it (`sysctl -w net.ipv4.conf.all.forwarding=1`; Docker \
                 hosts have it on), or set dataplane.redirect = false"
            );
        }
        if ipv6 {
            let fwd = std::fs::read_to_string(net.join("ipv6/conf").join(iface).join("forwarding"))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "IPv6 is off on {iface} (no IPv6 configuration), and an IPv6 service \
                         is configured"
                    )
                })?;
            if fwd.trim() != "1" {
                bail!(
                    "IPv6 forwarding is off on {iface}: berth forwards translated packets of the \
                     IPv6 services to backends and needs it (`sysctl -w \
                     net.ipv6.conf.all.forwarding=1`; Docker turns it on for IPv6 networks), or \
                     set dataplane.redirect = false"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_forwarding_is_required_only_with_an_ipv6_service_and_redirect() {
        let net = std::env::temp_dir().join(format!("berth-preflight-{}", std::process::id()));
        let set = |fam: &str, v: &str| {
            let d = net.join(fam).join("conf/eth0");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("forwarding"), v).unwrap();
        };
        let eth0 = ["eth0".to_owned()];
        set("ipv4", "1\n");
        // No IPv6 configuration at all.
        assert!(preflight_in(&net, &eth0, true, false).is_ok());
        let e = preflight_in(&net, &eth0, true, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IPv6 is off on eth0"), "{e}");
        assert!(preflight_in(&net, &eth0, false, true).is_ok());
        set("ipv6", "0\n");
        let e = preflight_in(&net, &eth0, true, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IPv6 forwarding is off on eth0"), "{e}");
        assert!(e.contains("net.ipv6.conf.all.forwarding=1"), "{e}");
        assert!(preflight_in(&net, &eth0, true, false).is_ok());
        set("ipv6", "1\n");
        assert!(preflight_in(&net, &eth0, true, true).is_ok());
        set("ipv4", "0\n");
        let e = preflight_in(&net, &eth0, true, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IPv4 forwarding is off"), "{e}");
        let e = preflight_in(&net, &["nope".to_owned()], true, true).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&net).unwrap();
    }

    #[test]
    fn the_ipv6_route_toward_an_address_is_the_longest_prefix_then_the_lowest_metric() {
        let routes = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fd000050000000000000000000000000 40 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth1
fd000050000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000005 00000001 00000000 00000001     eth2
fd0000dead0000000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00200200       lo
fd000070000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00000000     down0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
";
        let at = |a: &str| route6_interface_in(routes, a.parse().unwrap());
        assert_eq!(
            at("fd00:50::11").as_deref(),
            Some("eth2"),
            "/64, metric 5 over 0x400"
        );
        assert_eq!(at("fd00::7").as_deref(), Some("eth0"), "on-link /64");
        assert_eq!(at("2001:db8::1").as_deref(), Some("eth0"), "default route");
        assert_eq!(
            at("fd00:dead::1").as_deref(),
            Some("eth0"),
            "a reject route is no way there"
        );
        assert_eq!(at("fd00:70::1").as_deref(), Some("eth0"), "a route not up");
        assert_eq!(route6_interface_in("", "fd00::1".parse().unwrap()), None);
    }

    #[test]
    fn the_route_toward_an_address_is_the_longest_prefix_then_the_lowest_metric() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t0000320A\t0200000A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth2\t0000320A\t00000000\t0001\t0\t0\t5\t00FFFFFF\t0\t0\t0\n\
            down0\t0B00320A\t00000000\t0000\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let at = |a: [u8; 4]| route_interface_in(routes, std::net::Ipv4Addr::from(a));
        assert_eq!(
            default_route(routes),
            Some(("eth0".to_owned(), std::net::Ipv4Addr::new(10, 0, 0, 1)))
        );
        assert_eq!(default_route("Iface\n"), None);
        assert_eq!(
            at([10, 50, 0, 11]).as_deref(),
            Some("eth1"),
            "/24, metric 0 over 5"
        );
        assert_eq!(at([10, 0, 0, 7]).as_deref(), Some("eth0"), "on-link /24");
        assert_eq!(at([192, 0, 2, 1]).as_deref(), Some("eth0"), "default route");
        assert_eq!(
            route_interface_in("Iface\n", std::net::Ipv4Addr::new(1, 2, 3, 4)),
            None
        );
    }

    #[test]
    fn the_local_port_range_reads_as_the_kernel_writes_it() {
        let r = parse_port_range("32768\t60999\n").expect("range");
        assert_eq!((r.first, r.last), (32768, 60999));
        assert!(!r.overlaps(&crate::config::PortRange::DEFAULT_SNAT));
        assert!(r.overlaps(&"60000-61000".parse().unwrap()));
        assert_eq!(parse_port_range("9 8"), None);
        assert_eq!(parse_port_range("x"), None);
    }
}
