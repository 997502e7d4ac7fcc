//! The test backend: `hello serve [PORT]` answers every HTTP request with
//! `Hello from <hostname>` (status from the file /sick-status if present, e.g. `500`; a file
//! /sick-hang makes it accept and never answer), every UDP datagram to the same port with the
//! same text, and exits on SIGTERM. With `HELLO_LISTEN_AFTER_MS=N` in its environment it binds
//! its ports only N ms after it started, as a service with a slow start does. `hello get ADDR` is
//! the image's HEALTHCHECK: exit 0 if ADDR answers 200.
//!
//! `hello client tcp|udp|udp-connected ADDR N` is the test client for clients on the host and in
//! containers: N requests, one per connection (or socket), each printed as
//! `<answer> peer=<address the socket says it talked to>` or `ERR <error>`.
//!
//! The marker files at / (a FROM-scratch image has no /tmp) are how tests make a container sick (`docker exec ... hello sick 500`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

static STOP: AtomicBool = AtomicBool::new(false);
const GRACE: Duration = Duration::from_millis(1500);

extern "C" fn on_term(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

unsafe extern "C" {
    fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn serve(port: u16) {
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        signal(15, on_term);
        signal(2, on_term);
    }
    // A service that takes a while to start: the container runs (and Docker says so) before
    // anything listens.
    if let Some(ms) = std::env::var("HELLO_LISTEN_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    // Both families on one socket where the container has IPv6 (a dual-stack Docker
    // network): `[::]` takes IPv4 as mapped addresses. IPv4 alone where it has none.
    let l = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let name = hostname();
    let u = UdpSocket::bind(("::", port))
        .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
        .expect("bind udp");
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(format!("Hello from {udp_name}\n").as_bytes(), from);
        }
    });
    // After SIGTERM keep serving for a grace period, as a well-behaved service does, so the
    // balancer (told by Docker's kill event) can stop sending new connections first.
    let mut stop_at: Option<std::time::Instant> = None;
    loop {
        if STOP.load(Ordering::SeqCst) {
            let at = *stop_at.get_or_insert_with(|| std::time::Instant::now() + GRACE);
            if std::time::Instant::now() >= at {
                break;
            }
        }
        match l.accept() {
            Ok((s, _)) => {
                let name = name.clone();
                std::thread::spawn(move || answer(s, &name));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn answer(s: TcpStream, name: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    if std::path::Path::new("/sick-hang").exists() {
        std::thread::sleep(Duration::from_secs(3600));
        return;
    }
    let status = std::fs::read_to_string("/sick-status")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(200);
    let body = format!("Hello from {name}\n");
    let _ = write!(
        w,
        "HTTP/1.0 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn get(addr: &str) -> i32 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 1;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return 1;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    i32::from(!resp.starts_with("HTTP/1.0 200"))
}

/// One request of `hello client`: the answer's first line and the peer the socket reports.
fn client_once(kind: &str, addr: &str) -> Result<(String, String), String> {
    let timeout = Some(Duration::from_secs(2));
    // A UDP socket of the destination's family: an IPv6 one (dual-stack) for `[...]:port`.
    let any = if addr.starts_with('[') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let (answer, peer) = match kind {
        "tcp" => {
            let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")
                .map_err(|e| format!("write: {e}"))?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)
                .map_err(|e| format!("read: {e}"))?;
            let body = resp
                .split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .to_owned();
            (body, peer)
        }
        "udp" => {
            let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            s.send_to(b"hello?", addr)
                .map_err(|e| format!("sendto: {e}"))?;
            let mut buf = [0u8; 1500];
            let (n, from) = s
                .recv_from(&mut buf)
                .map_err(|e| format!("recvfrom: {e}"))?;
            (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
        }
        "udp-connected" => {
            let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            s.connect(addr).map_err(|e| format!("connect: {e}"))?;
            s.send(b"hello?").map_err(|e| format!("send: {e}"))?;
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
            let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
            (String::from_utf8_lossy(&buf[..n]).into_owned(), peer)
        }
        other => return Err(format!("unknown client kind {other:?}")),
    };
    Ok((answer.trim().to_owned(), peer.to_string()))
}

fn client(args: &[String]) {
    let kind = args.first().map_or("tcp", String::as_str);
    let addr = args.get(1).map_or("127.0.0.1:8080", String::as_str);
    let n: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
    for _ in 0..n {
        match client_once(kind, addr) {
            Ok((answer, peer)) => println!("{answer} peer={peer}"),
            Err(e) => println!("ERR {e}"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("client") => client(&args[2..]),
        Some("get") => {
            std::process::exit(get(args.get(2).map_or("127.0.0.1:8000", String::as_str)))
        }
        Some("sick") => {
            // `hello sick 500` / `hello sick hang` / `hello sick no` (healthy again)
            let _ = std::fs::remove_file("/sick-status");
            let _ = std::fs::remove_file("/sick-hang");
            let written = match args.get(2).map(String::as_str) {
                Some("hang") => std::fs::write("/sick-hang", ""),
                Some("no") | None => Ok(()),
                Some(code) => std::fs::write("/sick-status", code),
            };
            if let Err(e) = written {
                eprintln!("hello sick: {e}");
                std::process::exit(1);
            }
        }
        _ => serve(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(8000)),
    }
}
