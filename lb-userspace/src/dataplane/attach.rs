//! Attaching: the TC ingress program to interfaces (taking over pinned attachments), the socket
//! programs to a cgroup, and the local-address set the socket programs consult.

use super::*;

impl Dataplane {
    /// Attaches the TC ingress program to `iface` (TCX on kernels >= 6.6, clsact otherwise).
    /// Pinned, an attachment pinned by an earlier berth is taken over (its program swapped for
    /// ours in one step, no packet unprocessed) and a new one is pinned. Returns whether an
    /// earlier attachment was taken over.
    pub fn attach(&mut self, iface: &str) -> Result<bool> {
        let unknown = || DataplaneError::UnknownInterface {
            iface: iface.to_owned(),
        };
        let name = CString::new(iface).map_err(|_| unknown())?;
        let index = ifindex(iface).ok_or_else(unknown)?;
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            source,
        };
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let pin = self
            .pins
            .as_ref()
            .filter(|_| tcx)
            .map(|p| p.links.join(format!("tc-{index}-{iface}")));
        let pinned = match &pin {
            Some(path) if path.exists() => Some(FdLink::from(PinnedLink::from_pin(path).map_err(
                |source| DataplaneError::Link {
                    path: path.display().to_string(),
                    source,
                },
            )?)),
            _ => None,
        };
        let pinned_prog = pinned
            .as_ref()
            .and_then(|l| l.info().ok())
            .map(|i| i.program_id());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_TC_INGRESS)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("program checked at load");
        if tcx {
            // Kernel program names keep 15 characters.
            let prefix = &PROG_TC_INGRESS.as_bytes()[..15];
            // Reading another program's name needs CAP_SYS_ADMIN: without it the query fails,
            // and a second berth on this interface could not be told apart, so say so.
            let attached = match SchedClassifier::query_tcx(&name, TcAttachType::Ingress) {
                Ok((_, progs)) => progs,
                Err(e) => {
                    tracing::warn!(
                        "cannot list the programs attached to {iface} ({e}): another berth \
                         attached there would not be detected (berth needs CAP_SYS_ADMIN for it)"
                    );
                    Vec::new()
                }
            };
            if let Some(p) = attached
                .iter()
                .find(|p| p.name().starts_with(prefix) && Some(p.id()) != pinned_prog)
            {
                return Err(DataplaneError::AlreadyAttached {
                    iface: iface.to_owned(),
                    prog_id: p.id(),
                    pins: self
                        .pins
                        .as_ref()
                        .map_or("(none)".into(), |p| p.root.display().to_string()),
                });
            }
        } else {
            // Older kernels attach through a clsact qdisc; it may already exist.
            let _ = aya::programs::tc::qdisc_add_clsact(&name);
        }
        let took_over = pinned.is_some();
        match (pinned, pin) {
            (Some(pinned), Some(path)) => {
                let link = SchedClassifierLink::try_from(pinned).map_err(|source| {
                    DataplaneError::Link {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                prog.attach_to_link(link).map_err(attach_err)?;
            }
            (None, Some(path)) => {
                let id = prog
                    .attach(&name, TcAttachType::Ingress)
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                    path: path.display().to_string(),
                    source,
                })?;
                fd.pin(&path).map_err(|e| DataplaneError::Pin {
                    what: "pinning link",
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
            }
            _ => {
                prog.attach(&name, TcAttachType::Ingress)
                    .map_err(attach_err)?;
            }
        }
        self.attached.push(iface.to_owned());
        Ok(took_over)
    }

    /// Attaches the socket programs (connect, sendmsg, recvmsg and getpeername, each for IPv4 and
    /// IPv6) to the cgroup v2 directory `path`: every socket of its processes and descendants is
    /// balanced. Pinned,
    /// attachments of an earlier berth to the same cgroup are taken over, and those to another
    /// cgroup removed.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let cg_err = |source| DataplaneError::Cgroup {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(pin_err("opening cgroup", path))?;
        let ino = file
            .metadata()
            .map_err(pin_err("opening cgroup", path))?
            .ino();
        if let Some(pins) = &self.pins
            && let Ok(entries) = std::fs::read_dir(&pins.links)
        {
            let mine = format!("cg-{ino}-");
            for e in entries.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("cg-") && !n.starts_with(&mine) {
                    std::fs::remove_file(e.path()).map_err(pin_err("removing pin", &e.path()))?;
                }
            }
        }
        for name in SOCK_PROGS {
            let pin = self
                .pins
                .as_ref()
                .map(|p| p.links.join(format!("cg-{ino}-{name}")));
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
                .expect("program checked at load");
            let link_err = |path: &Path| {
                let path = path.display().to_string();
                move |source| DataplaneError::Link { path, source }
            };
            match pin {
                Some(path) if path.exists() => {
                    let pinned = PinnedLink::from_pin(&path).map_err(link_err(&path))?;
                    let link = aya::programs::cgroup_sock_addr::CgroupSockAddrLink::try_from(
                        FdLink::from(pinned),
                    )
                    .map_err(link_err(&path))?;
                    prog.attach_to_link(link).map_err(cg_err)?;
                }
                Some(path) => {
                    // Through a bpf_link (kernels >= 5.7) the flags must be 0 ("Single"); links
                    // always coexist with other programs on the cgroup.
                    let id = prog
                        .attach(&file, CgroupAttachMode::Single)
                        .map_err(cg_err)?;
                    let link = prog.take_link(id).map_err(cg_err)?;
                    let fd = FdLink::try_from(link).map_err(link_err(&path))?;
                    fd.pin(&path).map_err(|e| DataplaneError::Pin {
                        what: "pinning link",
                        path: path.display().to_string(),
                        source: std::io::Error::other(e),
                    })?;
                }
                None => {
                    prog.attach(&file, CgroupAttachMode::Single)
                        .map_err(cg_err)?;
                }
            }
        }
        Ok(())
    }

    /// Makes the local-address set (network byte order, loopback excluded) exactly `addrs`;
    /// returns the number of writes.
    pub fn sync_local_addrs(&mut self, addrs: &std::collections::BTreeSet<u32>) -> Result<usize> {
        if self.local_addrs_written.as_ref() == Some(addrs) {
            return Ok(0); // the usual case, every second: no map access at all
        }
        let have: std::collections::BTreeSet<u32> =
            self.local_addrs.keys().filter_map(|k| k.ok()).collect();
        if &have != addrs {
            // What a wildcard service's pick reads: a change of the tables (lb-common's
            // `epoch`), settled below whether or not every write succeeds.
            self.changing()?;
        }
        let written = write_addr_set(
            &mut self.local_addrs,
            lb_common::MAP_LOCAL_ADDRS,
            &have,
            addrs,
        );
        self.settle()?;
        let writes = written?;
        self.local_addrs_written = Some(addrs.clone());
        Ok(writes)
    }

    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Attaches the XDP fast path to `iface` in native (driver) mode, beside the TC program
    /// (which must be attached there too: XDP passes it everything it does not handle). Generic
    /// XDP runs after the skb is built and would only add to TC's cost, so it is never used:
    /// without native XDP the attach fails (`XdpUnsupported`) and the interface stays TC's.
    /// Pinned, an attachment pinned by an earlier berth is taken over (its program swapped in one
    /// step). A device of another driver than veth is also marked as a redirect target
    /// (`XDP_DEVS`): drivers with native XDP implement `ndo_xdp_xmit` once a program runs there.
    /// A veth is not (frames redirected into it are dropped unless its peer runs XDP or has GRO
    /// on, which berth cannot see from here). Returns whether an earlier attachment was taken
    /// over.
    pub fn attach_xdp(&mut self, iface: &str) -> Result<bool> {
        use aya::programs::{Xdp, XdpMode, xdp::XdpLink};
        let unknown = || DataplaneError::UnknownInterface {
            iface: iface.to_owned(),
        };
        let name = CString::new(iface).map_err(|_| unknown())?;
        let index = ifindex(iface).ok_or_else(unknown)?;
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            source,
        };
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.links.join(format!("xdp-{index}-{iface}")));
        self.xdp_program()?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(lb_common::PROG_XDP)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("loaded above");
        let link_err = |path: &Path, source| DataplaneError::Link {
            path: path.display().to_string(),
            source,
        };
        let took_over = match &pin {
            Some(path) if path.exists() => {
                let fd = FdLink::from(
                    PinnedLink::from_pin(path).map_err(|source| link_err(path, source))?,
                );
                let link = XdpLink::try_from(fd).map_err(|source| link_err(path, source))?;
                prog.attach_to_link(link).map_err(attach_err)?;
                true
            }
            Some(path) => {
                let id = prog
                    .attach(name.as_c_str(), XdpMode::Driver)
                    .map_err(|source| DataplaneError::XdpUnsupported {
                        iface: iface.to_owned(),
                        source,
                    })?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let fd = FdLink::try_from(link).map_err(|source| link_err(path, source))?;
                fd.pin(path).map_err(|e| DataplaneError::Pin {
                    what: "pinning link",
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
                false
            }
            None => {
                prog.attach(name.as_c_str(), XdpMode::Driver)
                    .map_err(|source| DataplaneError::XdpUnsupported {
                        iface: iface.to_owned(),
                        source,
                    })?;
                false
            }
        };
        if driver_of(iface).is_some_and(|d| d != "veth") {
            self.set_xdp_target(index)?;
        }
        Ok(took_over)
    }

    /// Removes the XDP attachments an earlier berth pinned (for a berth started without
    /// `dataplane.xdp`): unpinning a link nobody else holds detaches it. Returns the interfaces.
    pub fn drop_pinned_xdp(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let Some(pins) = &self.pins else {
            return Ok(out);
        };
        let Ok(entries) = std::fs::read_dir(&pins.links) else {
            return Ok(out);
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("xdp-") {
                std::fs::remove_file(e.path()).map_err(pin_err("removing pin", &e.path()))?;
                out.push(rest.split_once('-').map_or(rest, |(_, n)| n).to_owned());
            }
        }
        Ok(out)
    }
}

/// Makes the address set `map` (`name`), which holds `have`, hold exactly `want` (either
/// family's local addresses); returns the number of writes.
pub(super) fn write_addr_set<T, K>(
    map: &mut HashMap<T, K, u8>,
    name: &'static str,
    have: &std::collections::BTreeSet<K>,
    want: &std::collections::BTreeSet<K>,
) -> Result<usize>
where
    T: std::borrow::BorrowMut<MapData>,
    K: aya::Pod + Ord,
{
    let mut writes = 0;
    for a in have.difference(want) {
        absent_is_fine(map.remove(a), name)?;
        writes += 1;
    }
    for a in want.difference(have) {
        map.insert(a, &1, 0).map_err(map_err(name))?;
        writes += 1;
    }
    Ok(writes)
}
