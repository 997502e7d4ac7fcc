//! One check of one backend: a TCP connect, or an HTTP GET judged by status and body, within
//! its timeout. [`Checker`] is the seam tests replace.

use std::{fmt, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{CheckKind, HealthConfig};

/// Why a check failed (logged once per state change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Timeout,
    Io(String),
    BadStatus(u16),
    MissingString,
    BadResponse,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Io(e) => write!(f, "{e}"),
            Failure::BadStatus(s) => write!(f, "unexpected HTTP status {s}"),
            Failure::MissingString => f.write_str("expected string not in body"),
            Failure::BadResponse => f.write_str("not an HTTP response"),
        }
    }
}

/// Runs one check against one backend.
pub trait Checker: Send + Sync + 'static {
    fn check(
        &self,
        addr: SocketAddr,
        cfg: &HealthConfig,
    ) -> impl std::future::Future<Output = Result<(), Failure>> + Send;
}

/// The real checker: TCP connect, or HTTP/1.0 GET over TCP.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetChecker;

/// The most of a response body an HTTP check reads.
const MAX_BODY: usize = 64 * 1024;

impl Checker for NetChecker {
    async fn check(&self, addr: SocketAddr, cfg: &HealthConfig) -> Result<(), Failure> {
        match tokio::time::timeout(cfg.timeout(), check_once(addr, cfg)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }
}

/// A TCP connect to `addr` (no timeout of its own).
pub(super) async fn connect(addr: SocketAddr) -> Result<TcpStream, Failure> {
    TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        _ => Failure::Io(e.to_string()),
    })
}

async fn check_once(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), Failure> {
    let mut s = connect(addr).await?;
    if cfg.kind == CheckKind::Tcp {
        return Ok(());
    }
    let req = format!(
        "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n",
        cfg.path
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| Failure::Io(e.to_string()))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while buf.len() < MAX_BODY {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::Io(e.to_string()))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    evaluate_http(&buf, cfg)
}

/// Judges a raw HTTP response against the expectations.
pub fn evaluate_http(resp: &[u8], cfg: &HealthConfig) -> Result<(), Failure> {
    let text = String::from_utf8_lossy(resp);
    let status_line = text.lines().next().ok_or(Failure::BadResponse)?;
    let mut parts = status_line.split_whitespace();
    let proto = parts.next().ok_or(Failure::BadResponse)?;
    if !proto.starts_with("HTTP/") {
        return Err(Failure::BadResponse);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(Failure::BadResponse)?;
    let status_ok = match cfg.expect_status {
        Some(want) => status == want,
        None => (200..400).contains(&status),
    };
    if !status_ok {
        return Err(Failure::BadStatus(status));
    }
    if let Some(want) = &cfg.expect_string {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !body.contains(want.as_str()) {
            return Err(Failure::MissingString);
        }
    }
    Ok(())
}
