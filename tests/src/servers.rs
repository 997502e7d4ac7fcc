//! Real TCP and UDP servers in a namespace answering `Hello from {name}: ...`, and the clients
//! the tests use against them and against berth's services (one-shot TCP, sessions, connected
//! UDP, HTTP/1.0 GET).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::{Netns, enter};

/// TCP and UDP servers answering `Hello from {name}: {request}` on one address, stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddrV4, udp: bool) -> Self {
        Self::start_any(ns, name, addr.into(), udp)
    }

    /// [`Servers::start`] on an address of either family.
    pub fn start_any(ns: &Netns, name: &str, addr: SocketAddr, udp: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let path = PathBuf::from("/run/netns").join(&ns.name);
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (stop, name, path, tx) = (stop.clone(), name.to_owned(), path.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&path);
                let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                l.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let name = name.clone();
                            std::thread::spawn(move || serve_tcp(s, &name));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        if udp {
            let (stop, name, tx) = (stop.clone(), name.to_owned(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&path);
                let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                tx.send(()).expect("ready");
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let mut reply = format!("Hello from {name}: ").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = s.send_to(&reply, from);
                    }
                }
            }));
        }
        for _ in 0..threads.len() {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server ready");
        }
        Self { stop, threads }
    }
}

/// Answers each line with `Hello from {name}: {line}`; the line `peer?` is answered with the
/// address the connection came from (to check what the backend sees); a `GET` request line gets
/// an HTTP/1.0 response `200 OK` with body `Hello from {name}` (for HTTP health checks).
fn serve_tcp(s: TcpStream, name: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.starts_with("GET ") => {
                // Skip the headers, answer, close.
                let mut h = String::new();
                while r.read_line(&mut h).is_ok_and(|n| n > 0) && !h.trim_end().is_empty() {
                    h.clear();
                }
                let body = format!("Hello from {name}\n");
                let _ = w.write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                return;
            }
            Ok(_) => {
                let answer = if line.trim_end() == "peer?" {
                    format!("Hello from {name}: peer {peer}\n")
                } else {
                    format!("Hello from {name}: {line}")
                };
                if w.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connection, one line, one answer line (runs in the calling thread's namespace).
pub fn tcp_request(addr: SocketAddrV4, line: &str) -> Result<String, String> {
    tcp_request_any(addr.into(), line)
}

/// How long the test clients here ([`http_get`], [`tcp_request`], [`Session`]) wait to connect,
/// and then for each read.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// [`tcp_request`] to an address of either family.
pub fn tcp_request_any(addr: SocketAddr, line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Ok(out.trim_end().to_owned())
}

/// A long-lived TCP connection (in the calling thread's namespace).
pub struct Session {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Session {
    pub fn connect(addr: SocketAddrV4) -> Result<Self, String> {
        Self::connect_any(addr.into())
    }

    /// [`Session::connect`] to an address of either family.
    pub fn connect_any(addr: SocketAddr) -> Result<Self, String> {
        let s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Self {
            w,
            r: BufReader::new(s),
        })
    }

    pub fn request(&mut self, line: &str) -> Result<String, String> {
        self.w
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut out = String::new();
        match self.r.read_line(&mut out) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(out.trim_end().to_owned()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// One datagram over a *connected* UDP socket: the kernel drops any answer whose source is not
/// `addr`, so an answer proves the reply was translated back to the service address.
pub fn udp_request(addr: SocketAddrV4, payload: &str) -> Result<String, String> {
    udp_request_any(addr.into(), payload)
}

/// [`udp_request`] to an address of either family.
pub fn udp_request_any(addr: SocketAddr, payload: &str) -> Result<String, String> {
    let any = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    s.connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.send(payload.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 2048];
    let n = s
        .recv(&mut buf)
        .map_err(|e| format!("recv from {addr}: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The backend name in an answer `Hello from NAME: ...`.
pub fn responder(answer: &str) -> Option<&str> {
    answer.strip_prefix("Hello from ")?.split(':').next()
}

/// An HTTP/1.0 GET of `/` (in the calling thread's namespace): (status, body).
pub fn http_get(addr: SocketAddrV4) -> Result<(u16, String), String> {
    http_get_any(addr.into())
}

/// [`http_get`] to an address of either family.
pub fn http_get_any(addr: SocketAddr) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not HTTP: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_owned();
    Ok((status, body))
}
