//! The pinned state in bpffs: the directory layout, the lock that makes one daemon its user,
//! the BPF filesystem checks, and `berth down`.

use super::*;

pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pinned state's directories, and the lock that makes one daemon its only user.
pub(super) struct Pins {
    pub(super) root: PathBuf,
    pub(super) links: PathBuf,
    pub(super) _lock: File,
}

pub(super) fn pin_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let path = path.display().to_string();
    move |source| DataplaneError::Pin { what, path, source }
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is NUL-terminated; statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Whether this process's mount namespace differs from PID 1's (false when that cannot be
/// told).
pub(super) fn private_mount_ns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// Mounts a BPF filesystem on /sys/fs/bpf when `root` lies below it and none is mounted there
/// (as on hosts without systemd, or under `ip netns exec`); any other place must already be
/// one. Returns whether it mounted one.
pub(super) fn ensure_bpffs(root: &Path) -> Result<bool> {
    let base = Path::new("/sys/fs/bpf");
    if !root.starts_with(base) || is_bpffs(base) || !base.is_dir() {
        return Ok(false);
    }
    // SAFETY: constant NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(DataplaneError::Pin {
            what: "mounting a BPF filesystem on",
            path: base.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted a BPF filesystem on /sys/fs/bpf");
    Ok(true)
}

/// Creates `dir` (and missing parents) root-only, and makes an existing one root-only too: an
/// earlier berth created the layout directories 0755, and every pin directory is berth's own.
pub(super) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(pin_err("creating pin directory", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(pin_err("restricting pin directory", dir))
}

/// Whether the BPF filesystem holding `root` is mounted in PID 1's mount namespace too: if not,
/// it exists only in this process's (private) mount namespace and is unmounted, pins and all,
/// when the last process there exits. That is what happens under `ip netns exec`, which gives
/// the command a mount namespace of its own with a fresh /sys, where berth then mounts a bpffs
/// nobody else sees. `None` when PID 1's mounts cannot be read.
pub fn bpffs_shared_with_init(root: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(root).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let init = std::fs::read_to_string("/proc/1/mountinfo").ok()?;
    Some(init.lines().any(|l| {
        // "36 35 0:62 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700": major:minor, and the
        // filesystem type after the " - " separator.
        let (left, right) = l.split_once(" - ").unwrap_or((l, ""));
        right.split_whitespace().next() == Some("bpf")
            && left.split_whitespace().nth(2) == Some(&format!("{major}:{minor}"))
    }))
}

/// Opens `root` (creating it, root-only) and takes its exclusive lock without waiting.
pub(super) fn lock_root(root: &Path) -> Result<File> {
    private_dir(root)?;
    let f = File::open(root).map_err(pin_err("opening pin directory", root))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DataplaneError::Locked {
            path: root.display().to_string(),
        });
    }
    Ok(f)
}

/// Layout directories (`v<N>`) found under `root`.
pub(super) fn layouts(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('v'))
                .collect()
        })
        .unwrap_or_default()
}

/// What `berth down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub links: Vec<String>,
    pub maps: usize,
}

/// Detaches a pinned dataplane and removes its pins (any layout version): unpinning a link
/// nobody else holds detaches it, unpinning a map frees it. Refused while a berth runs on it.
pub fn down(root: &Path) -> Result<DownReport> {
    let mut report = DownReport::default();
    if !root.exists() {
        return Ok(report);
    }
    if !is_bpffs(root) {
        // Never lock (and make root-only) a directory that cannot hold pins.
        return Err(DataplaneError::NotBpffs {
            path: root.display().to_string(),
        });
    }
    let lock = lock_root(root)?;
    for layout in layouts(root) {
        let dir = root.join(&layout);
        for (sub, links) in [("links", true), ("maps", false)] {
            let d = dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                std::fs::remove_file(e.path()).map_err(pin_err("removing pin", &e.path()))?;
                if links {
                    report
                        .links
                        .push(e.file_name().to_string_lossy().into_owned());
                } else {
                    report.maps += 1;
                }
            }
            std::fs::remove_dir(&d).map_err(pin_err("removing pin directory", &d))?;
        }
        std::fs::remove_dir(&dir).map_err(pin_err("removing pin directory", &dir))?;
    }
    drop(lock);
    std::fs::remove_dir(root).map_err(pin_err("removing pin directory", root))?;
    Ok(report)
}
