//! The test backend: `hello serve [PORT]` answers every HTTP request with
//! `Hello from <hostname>` (status from the file /sick-status if present, e.g. `500`; a file
//! /sick-hang makes it accept and never answer), and exits on SIGTERM. `hello get ADDR` is the
//! image's HEALTHCHECK: exit 0 if ADDR answers 200.
//!
//! The marker files at / (a FROM-scratch image has no /tmp) are how tests make a container sick (`docker exec ... hello sick 500`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
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
    let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let name = hostname();
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
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
