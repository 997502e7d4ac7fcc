//! Network namespaces and the commands run in them, shared by the e2e tests and the benchmarks:
//! `Netns` (deleted on drop, after killing what runs in it), veth pairs, `ns_command` (enters
//! only the network namespace, so bpffs and cgroups stay the host's), threads that enter a
//! namespace, and the process helpers around them. Leftovers of a crashed run (names starting
//! with `PREFIX`) are removed by `remove_leftovers` before a topology is built.
//!
//! Traffic only ever goes between namespaces created here.

use std::{
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::daemon::{berth_down, cgroup2_root, remove_cgroup};

/// Prefix of every namespace and interface the e2e tests create.
pub const PREFIX: &str = "bte";

/// Runs a command; Err(what failed, with its stderr) on failure.
pub fn try_sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("running {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command, panicking with its stderr on failure.
pub fn sh(args: &[&str]) -> String {
    try_sh(args).unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces and root-namespace links left by a crashed run (Docker hosts of the
/// multi-engine tests first: their dockerd stops its containers before the namespace's
/// processes are killed).
pub fn remove_leftovers() {
    crate::engines::remove_leftovers();
    let list = sh("ip netns list".split(' ').collect::<Vec<_>>().as_slice());
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(PREFIX) {
            kill_all_in(name);
            sh_quiet(&["ip", "netns", "del", name]);
        }
    }
    let links = sh(&["ip", "-o", "link", "show"]);
    for line in links.lines() {
        if let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
            && name.starts_with(PREFIX)
        {
            sh_quiet(&["ip", "link", "del", name]);
        }
    }
    if let Ok(pins) = std::fs::read_dir("/sys/fs/bpf") {
        for p in pins.filter_map(|e| e.ok()) {
            if p.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = berth_down(&p.path());
            }
        }
    }
    if let Ok(cgroups) = std::fs::read_dir(cgroup2_root()) {
        for c in cgroups.filter_map(|e| e.ok()) {
            if c.file_name().to_string_lossy().starts_with(PREFIX) {
                remove_cgroup(&c.path());
            }
        }
    }
}

/// Sends `sig` to `pid` (a process the tests or benchmarks started, or a daemon they manage).
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Whether `pid` runs. A zombie still has a /proc entry but only waits to be reaped: not alive.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// Kills every process left in namespace `ns`: SIGTERM, up to 3 s to exit, then SIGKILL.
pub fn kill_all_in(ns: &str) {
    let pids = |s: String| -> Vec<i32> {
        s.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let list = pids(try_sh(&["ip", "netns", "pids", ns]).unwrap_or_default());
        if list.is_empty() {
            return;
        }
        for p in &list {
            signal(*p, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && list.iter().any(|p| alive(*p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace, deleted (after killing what runs in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(short: &str) -> Self {
        let name = format!("{PREFIX}-{short}");
        sh_quiet(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command that runs `program` in this network namespace only (unlike `ip netns exec`, it
    /// keeps the host's mounts: /sys/fs/bpf, cgroups).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        ns_command(&self.name, program)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it creates live here)
    /// and waits for it, propagating its panic.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }

    /// Starts `f` on a thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        sh_quiet(&["ip", "netns", "del", &self.name]);
    }
}

/// A command that runs `program` in network namespace `ns` only: setns(2) on the network
/// namespace, so the mounts (bpffs, cgroups) stay the host's, which `ip netns exec` would not keep.
pub fn ns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    let f = std::fs::File::open(PathBuf::from("/run/netns").join(ns))
        .unwrap_or_else(|e| panic!("opening netns {ns}: {e}"));
    // SAFETY: setns(2) on a descriptor opened before the fork is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd
}

/// Pins `cmd`'s process to one CPU before it runs (sched_setaffinity(2), as taskset does).
pub fn on_cpu(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure only calls sched_setaffinity(2) with a set built on its stack
    // (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A command run to completion in network namespace `ns` (see `ns_command`), panicking with its
/// stderr on failure.
pub fn ns_sh(ns: &str, args: &[&str]) -> String {
    let out = ns_command(ns, args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?} in {ns}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns affects the calling
/// thread only: sockets it creates live there) and waits for it, propagating its panic.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f)
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Starts `f` on a thread that has entered network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

pub(crate) fn enter(path: &PathBuf) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Creates a veth pair directly inside two namespaces (the root namespace never holds a test
/// interface), both ends up.
/// Makes `sw` a switch: a bridge `sw0`, up.
pub fn bridge(sw: &Netns) {
    sw.exec(&["ip", "link", "add", "sw0", "type", "bridge"]);
    sw.exec(&["ip", "link", "set", "sw0", "up"]);
}

/// Plugs `ns`'s `eth0` into switch `sw` (see [`bridge`]) through a veth whose switch end is
/// `port`.
pub fn plug(sw: &Netns, ns: &Netns, port: &str) {
    veth(ns, "eth0", sw, port);
    sw.exec(&["ip", "link", "set", port, "master", "sw0"]);
}

pub fn veth(a_ns: &Netns, a: &str, b_ns: &Netns, b: &str) {
    sh(&[
        "ip", "link", "add", a, "netns", &a_ns.name, "type", "veth", "peer", "name", b, "netns",
        &b_ns.name,
    ]);
    a_ns.exec(&["ip", "link", "set", a, "up"]);
    b_ns.exec(&["ip", "link", "set", b, "up"]);
}

/// `ETHTOOL_STXCSUM`: transmit checksum offload (a legacy ethtool flag, see [`ethtool_flag`]).
pub const ETHTOOL_STXCSUM: u32 = 0x17;
/// `ETHTOOL_SGRO`: generic receive offload (a legacy ethtool flag, see [`ethtool_flag`]).
pub const ETHTOOL_SGRO: u32 = 0x2c;

/// Attaches the project's pass-through XDP program (`berth_xdp_noop`, `XDP_PASS`), from a copy
/// of the object of its own, to `iface` of the calling thread's namespace in native mode: what a
/// veth needs on its receive side to take the `XDP_TX` frames its peer sends (see README "XDP
/// fast path"). The program stays attached while the returned object lives.
pub fn attach_noop_xdp(iface: &str) -> Result<aya::Ebpf, String> {
    let mut ebpf = aya::EbpfLoader::new()
        .load(lb_userspace::EBPF_OBJECT)
        .map_err(|e| format!("loading the object: {e}"))?;
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(lb_common::PROG_XDP_NOOP)
        .ok_or("no pass-through program in the object")?
        .try_into()
        .map_err(|e| format!("not an XDP program: {e}"))?;
    prog.load()
        .map_err(|e| format!("loading the program: {e}"))?;
    let name = std::ffi::CString::new(iface).map_err(|e| e.to_string())?;
    prog.attach(name.as_c_str(), aya::programs::XdpMode::Driver)
        .map_err(|e| format!("attaching to {iface}: {e}"))?;
    Ok(ebpf)
}

/// Sets a legacy ethtool flag (`ETHTOOL_S*`) of `iface` in this thread's namespace through the
/// `SIOCETHTOOL` ioctl (no ethtool binary needed); in another namespace: `Netns::run`.
pub fn ethtool_flag(iface: &str, cmd: u32, on: bool) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let mut v = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut v,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a socket only for the ioctl, closed below; `req` and `v` outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, 0x8946, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(rc, 0, "SIOCETHTOOL {cmd:#x} on {iface}: {err}");
    }
}
