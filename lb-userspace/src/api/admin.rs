//! The admin socket `berth status` talks to, only root can use (directory 0700, socket 0600).
//! The daemon answers the request line `status` with one JSON document ([`Status`]) and closes
//! the connection.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::status::Status;

/// Default admin socket.
pub const DEFAULT_SOCKET: &str = "/run/berth/admin.sock";

/// Binds the admin socket. A missing directory is created 0700; an existing one is left as it
/// is, but refused (with every directory above it) if someone other than root could replace the
/// socket: owned by another user, or writable by group or others without being a root-owned
/// sticky directory like /tmp. A stale socket (one nobody answers on) is replaced, anything
/// else at the path refused, and the socket made 0600.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is answered by another berth", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Checks the existing part of `dir`'s path and creates the rest 0700.
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    let existing = dir
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    check_dir(existing)?;
    if existing != dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // Only what berth created here is made root-only (the mode above is cut by the umask).
        for d in dir.ancestors().take_while(|d| *d != existing) {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Refuses `dir` if anyone but root (or berth's own user) could rename it or replace what is in
/// it, through it or any directory above it.
fn check_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let canonical = dir.canonicalize()?;
    for d in canonical.ancestors() {
        let m = std::fs::metadata(d)?;
        let mode = m.mode() & 0o7777;
        let owner_ok = m.uid() == 0 || m.uid() == euid;
        let shared = mode & 0o022 != 0;
        let sticky_root = mode & 0o1000 != 0 && m.uid() == 0;
        if !owner_ok || (shared && !sticky_root) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "directory {} (mode {mode:o}, owner uid {}) lets others replace the admin \
                     socket: use a directory only root can write (default {})",
                    d.display(),
                    m.uid(),
                    Path::new(DEFAULT_SOCKET)
                        .parent()
                        .map_or("".into(), |p| p.display().to_string()),
                ),
            ));
        }
    }
    Ok(())
}

/// Longest admin request line read (the only request is `status`).
pub const MAX_REQUEST: usize = 4096;

/// Reads the request line: at most [`MAX_REQUEST`] bytes, or an error to answer.
pub async fn read_request(
    r: impl tokio::io::AsyncRead + Unpin,
) -> std::io::Result<Result<String, String>> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let mut line = Vec::new();
    // One byte more than allowed: a line that long has no end within the limit.
    tokio::io::BufReader::new(r.take(MAX_REQUEST as u64 + 1))
        .read_until(b'\n', &mut line)
        .await?;
    if line.len() > MAX_REQUEST {
        return Ok(Err(format!("request line longer than {MAX_REQUEST} bytes")));
    }
    Ok(Ok(String::from_utf8_lossy(&line).trim_end().to_owned()))
}

/// Input discarded after an answer, at most.
const LINGER_BYTES: u64 = 1 << 20;

/// An answer that is not a status.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorAnswer {
    error: String,
}

/// Serves one admin connection: reads the request line first (bounded), then computes the
/// status (the conntrack walk runs only for a valid request) and writes it as JSON.
pub async fn answer(
    mut conn: tokio::net::UnixStream,
    status: impl std::future::Future<Output = Status>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let work = async {
        let (mut r, mut w) = conn.split();
        let body = match read_request(&mut r).await? {
            Ok(line) if line == "status" => serde_json::to_vec(&status.await),
            Ok(line) => serde_json::to_vec(&ErrorAnswer {
                error: format!(
                    "unknown request {} (the only one is \"status\")",
                    crate::config::clip_values(&format!("{line:?}"))
                ),
            }),
            Err(error) => serde_json::to_vec(&ErrorAnswer { error }),
        }
        .unwrap_or_default();
        w.write_all(&body).await?;
        w.shutdown().await?;
        // Closing with unread input resets the connection before the client reads the answer:
        // discard what it still sends, within a bound (a lingering close, as HTTP servers do).
        tokio::io::copy(&mut (&mut r).take(LINGER_BYTES), &mut tokio::io::sink()).await?;
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), work).await;
}

/// Asks the daemon on `path` for its status.
pub fn query(path: &Path) -> Result<Status, String> {
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach berth on {}: {e} (is it running? are you root?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"status\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| match serde_json::from_str::<ErrorAnswer>(&body) {
        Ok(a) => format!("berth answered: {}", a.error),
        Err(_) => format!("bad answer from berth: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn temp_dir(tag: &str, mode: u32) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-admin-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_existing_directory_keeps_its_mode() {
        // `--admin-socket /tmp/berth.sock` must not make /tmp root-only: a root-owned 0755
        // directory and a sticky 1777 one (like /tmp) are used as they are.
        for m in [0o755, 0o1777] {
            let dir = temp_dir(&format!("keep{m:o}"), m);
            let path = dir.join("admin.sock");
            runtime().block_on(async {
                let _l = bind(&path).unwrap();
                assert_eq!(mode(&path), 0o600);
            });
            assert_eq!(mode(&dir), m, "{}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        for m in [0o777, 0o775, 0o757] {
            let dir = temp_dir(&format!("open{m:o}"), m);
            let path = dir.join("admin.sock");
            let e = runtime().block_on(async { bind(&path).map(|_| ()).unwrap_err() });
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
            assert_eq!(mode(&dir), m);
            assert!(!path.exists());
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = temp_dir("file", 0o755);
        let path = dir.join("admin.sock");
        std::fs::write(&path, "not a socket").unwrap();
        let e = runtime().block_on(async { bind(&path).map(|_| ()).unwrap_err() });
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn sample() -> Status {
        Status {
            services: vec![],
            counters: vec![("pass_no_service".into(), 1)],
            etcd: None,
            engines: vec![],
        }
    }

    /// Sends `request` (then closes the sending side) and returns the answer and whether the
    /// whole request could be written.
    fn exchange(request: Vec<u8>) -> (String, bool) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        runtime().block_on(async move {
            let (client, server) = tokio::net::UnixStream::pair().unwrap();
            let served = tokio::spawn(answer(server, async { sample() }));
            let (mut r, mut w) = client.into_split();
            let writer = tokio::spawn(async move {
                let ok = w.write_all(&request).await.is_ok();
                let _ = w.shutdown().await;
                ok
            });
            // A request that is cut short may end in a reset instead of the answer.
            let mut out = String::new();
            let _ = r.read_to_string(&mut out).await;
            served.await.unwrap();
            (out, writer.await.unwrap())
        })
    }

    #[test]
    fn the_request_line_is_bounded() {
        let (out, _) = exchange(b"status\n".to_vec());
        assert_eq!(serde_json::from_str::<Status>(&out).unwrap(), sample());
        // A line without an end: answered with an error after 4 KiB ...
        let (out, _) = exchange(vec![b'x'; 64 << 10]);
        let e: ErrorAnswer =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:.200}"));
        assert!(e.error.contains("longer than 4096 bytes"), "{}", e.error);
        // ... and never read whole, however long it is.
        let (_, wrote_all) = exchange(vec![b'x'; 8 << 20]);
        assert!(!wrote_all, "the daemon read the whole request");
        let (out, _) = exchange(b"statu\n".to_vec());
        assert!(out.contains("unknown request"), "{out}");
    }

    #[test]
    fn socket_is_root_only_and_a_live_one_is_not_stolen() {
        let dir = std::env::temp_dir().join(format!("berth-admin-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let dmode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(dmode, 0o700);
            assert_eq!(
                bind(&path).unwrap_err().kind(),
                std::io::ErrorKind::AddrInUse
            );
            drop(l);
            // Stale (nobody listening): taken over.
            let _l = bind(&path).unwrap();
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
