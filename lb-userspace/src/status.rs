//! `berth status`: what the running daemon serves, over a local admin socket only root can use
//! (directory 0700, socket 0600). The daemon answers the request line `status` with one JSON
//! document and closes the connection.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Default admin socket.
pub const DEFAULT_SOCKET: &str = "/run/berth/admin.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// Exit and event counters by name.
    pub counters: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: String,
    pub protocol: String,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub address: String,
    /// The container behind it, if discovered through Docker.
    pub container: Option<String>,
    /// "healthy", "unhealthy", or "unchecked" (no health check configured).
    pub health: String,
    pub weight: u32,
    /// Whether it is in the Maglev table (takes new flows).
    pub in_pool: bool,
    /// Open conntrack flows pinned to it.
    pub active_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// The table `berth status` prints.
pub fn render(s: &Status) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "LISTEN",
            "PROTO",
            "BACKEND",
            "CONTAINER",
            "HEALTH",
            "POOL",
            "WEIGHT",
            "FLOWS",
            "PACKETS",
        ]
        .map(String::from),
    ];
    for svc in &s.services {
        if svc.backends.is_empty() {
            rows.push([
                svc.name.clone(),
                svc.listen.clone(),
                svc.protocol.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for b in &svc.backends {
            rows.push([
                svc.name.clone(),
                svc.listen.clone(),
                svc.protocol.clone(),
                b.address.clone(),
                b.container.clone().unwrap_or_else(|| "-".into()),
                b.health.clone(),
                if b.in_pool { "in" } else { "out" }.into(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                b.packets.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Binds the admin socket: creates its directory 0700, removes a stale socket (one nobody
/// answers on), refuses if another daemon answers, and makes the socket 0600.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
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
    serde_json::from_str(&body).map_err(|e| format!("bad answer from berth: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_backend() {
        let s = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:8080".into(),
                protocol: "tcp".into(),
                backends: vec![BackendStatus {
                    address: "172.17.0.2:8000".into(),
                    container: Some("app-1".into()),
                    health: "healthy".into(),
                    weight: 1,
                    in_pool: true,
                    active_flows: 3,
                    packets: 120,
                    bytes: 9000,
                    new_flows: 4,
                }],
            }],
            counters: vec![],
        };
        let t = render(&s);
        assert!(t.lines().next().unwrap().starts_with("SERVICE"));
        let row = t.lines().nth(1).unwrap();
        for cell in [
            "web",
            "0.0.0.0:8080",
            "172.17.0.2:8000",
            "app-1",
            "healthy",
            "in",
            "3",
            "120",
        ] {
            assert!(row.contains(cell), "{row}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
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
