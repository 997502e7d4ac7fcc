//! The workloads, one wrk run per target and what it measured: wrk's figures, the machine's
//! kernel CPU time and the balancer process's own, and each backend's share.

use std::{
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use berth_tests::netns::{ns_command, on_cpu};
use serde_json::{Value, json};

use crate::{
    Args,
    contenders::{Contender, Running},
    topology::{NS_CLIENT, NS_LB, PIN_PATH, access_log_requests},
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Workload {
    KeepAlive,
    NewConn,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::KeepAlive, Workload::NewConn];

    pub fn name(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keep-alive",
            Workload::NewConn => "new-conn",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::KeepAlive => "req/s",
            Workload::NewConn => "conn/s",
        }
    }
}

/// Machine-wide (system, softirq) ticks, from the first line of /proc/stat.
pub fn kernel_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq ...
    (
        f.get(2).copied().unwrap_or(0),
        f.get(6).copied().unwrap_or(0),
    )
}

/// (utime, stime) ticks of a process.
pub fn proc_ticks(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
    let rest: Vec<&str> = s
        .rsplit_once(") ")
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    let at = |i: usize| rest.get(i - 3).and_then(|v| v.parse().ok()).unwrap_or(0);
    (at(14), at(15))
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` on while it lives, then back to what it was.
pub struct BpfStats(Option<String>);

impl BpfStats {
    pub fn enable() -> Self {
        let old = std::fs::read_to_string(BPF_STATS).ok();
        let _ = std::fs::write(BPF_STATS, "1");
        BpfStats(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(BPF_STATS, old.trim());
        }
    }
}

/// Ids of berth's programs attached in namespace `ns`: those behind the links pinned under
/// `pins` (TCX and XDP links: this machine's bpftool 7.1 predates TCX, so `bpftool net
/// show` does not list them), and classic TC filters (`bpftool net show`, berth's fallback where
/// the kernel has no TCX).
pub fn berth_programs(ns: &str, pins: &Path) -> Vec<u64> {
    // `PIN/v<layout>/links/<link>`: every layout's, whichever this berth pins.
    let layouts = std::fs::read_dir(pins).into_iter().flatten().flatten();
    let links = layouts.flat_map(|l| std::fs::read_dir(l.path().join("links")).into_iter());
    let mut ids: Vec<u64> = links
        .flatten()
        .flatten()
        .filter_map(|link| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(link.path())
                .output()
                .ok()?;
            serde_json::from_slice::<Value>(&out.stdout)
                .ok()?
                .get("prog_id")?
                .as_u64()
        })
        .collect();
    ids.extend(classic_tc_programs(ns));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Ids of the classic TC (cls_bpf) programs attached in namespace `ns` (`bpftool net show`).
fn classic_tc_programs(ns: &str) -> Vec<u64> {
    let out = ns_command(ns, "bpftool")
        .args(["-j", "net", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let mut ids: Vec<u64> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("tc"))
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|a| a.get("prog_id").and_then(Value::as_u64))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Total `run_time_ns` of programs `ids` (0 while `kernel.bpf_stats_enabled` is off).
pub fn prog_run_time_ns(ids: &[u64]) -> u64 {
    ids.iter()
        .map(|id| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "prog", "show", "id", &id.to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            serde_json::from_str::<Value>(&out)
                .ok()
                .and_then(|v| v.get("run_time_ns").and_then(Value::as_u64))
                .unwrap_or(0)
        })
        .sum()
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[derive(Clone, Debug, Default)]
pub struct Run {
    pub rps: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    /// System + softirq seconds of the whole machine (+ HAProxy's user time).
    pub cpu_s: f64,
    pub cpu_per_100k: f64,
    /// HAProxy's own user / system seconds (informational; the system part is in `cpu_s`).
    pub proc_user_s: f64,
    pub proc_sys_s: f64,
    /// Requests each backend logged during the run.
    pub split: [u64; 2],
    /// berth only: seconds its TC programs in bb-lb ran during the run, per 100k requests
    /// (`kernel.bpf_stats_enabled` run time; a part of the softirq time in `cpu_s`).
    pub prog_per_100k: Option<f64>,
}

impl Run {
    pub fn errors(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }

    pub fn json(&self) -> Value {
        json!({
            "rps": self.rps, "requests": self.requests, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
            "socket_errors": self.socket_errors, "non_2xx": self.non_2xx,
            "cpu_s": self.cpu_s, "cpu_s_per_100k": self.cpu_per_100k,
            "balancer_process_user_s": self.proc_user_s, "balancer_process_sys_s": self.proc_sys_s,
            "backend_requests": self.split,
            "berth_program_s_per_100k": self.prog_per_100k,
        })
    }
}

/// wrk's latency figure ("385.00us", "1.20ms", "2.00s", "1.00m") in milliseconds.
pub fn parse_latency(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

/// The figures of wrk's output (with `--latency`).
pub fn parse_wrk(out: &str) -> Result<Run, String> {
    let mut r = Run::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
        } else if words.len() >= 2 && words[1] == "requests" && words.get(2) == Some(&"in") {
            r.requests = words[0].parse().map_err(|e| format!("{line:?}: {e}"))?;
        } else if words.len() == 2 && words[0] == "50%" {
            r.p50_ms = parse_latency(words[1]).ok_or(format!("latency {line:?}"))?;
        } else if words.len() == 2 && words[0] == "99%" {
            r.p99_ms = parse_latency(words[1]).ok_or(format!("latency {line:?}"))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    if r.rps == 0.0 || r.requests == 0 {
        return Err(format!("no requests/s in wrk's output:\n{out}"));
    }
    Ok(r)
}

pub fn measure(c: Contender, w: Workload, running: &Running, a: &Args) -> Run {
    // The ceiling loads both backends like the balancers do: one wrk per backend with half the
    // connections each (same CPU), rates added, the worse p99 and the mean p50 kept. One
    // backend alone (direct1) leaves the second nginx idle, while both share a CPU.
    let targets = c.endpoints();
    let duration = format!("{}s", a.duration);
    let conns = (a.connections / targets.len() as u32).max(1).to_string();
    let logs0 = [access_log_requests(0), access_log_requests(1)];
    let pid = running.user_pid();
    let progs = if c.is_berth() {
        berth_programs(NS_LB, Path::new(PIN_PATH))
    } else {
        Vec::new()
    };
    // Only for berth's runs (it costs every BPF program two clock reads per run, which berth's
    // figures then include: against it, never in its favour).
    let _stats = (!progs.is_empty()).then(BpfStats::enable);
    let b0 = prog_run_time_ns(&progs);
    let p0 = pid.map(proc_ticks).unwrap_or_default();
    let k0 = kernel_ticks();
    let children: Vec<Child> = targets
        .iter()
        .map(|t| {
            let mut cmd = ns_command(NS_CLIENT, "wrk");
            on_cpu(&mut cmd, a.wrk_cpu);
            cmd.args([
                "-t1",
                "-c",
                &conns,
                "-d",
                &duration,
                "--timeout",
                "2s",
                "--latency",
            ]);
            if w == Workload::NewConn {
                cmd.args(["-H", "Connection: close"]);
            }
            cmd.arg(format!("http://{t}/"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running wrk")
        })
        .collect();
    let outs: Vec<std::process::Output> = children
        .into_iter()
        .map(|ch| ch.wait_with_output().expect("wrk"))
        .collect();
    let k1 = kernel_ticks();
    let p1 = pid.map(proc_ticks).unwrap_or_default();
    let b1 = prog_run_time_ns(&progs);
    let parsed: Vec<Run> = outs
        .iter()
        .map(|out| {
            parse_wrk(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| {
                panic!(
                    "{} {}: wrk ({}): {e}\n{}",
                    c.name(),
                    w.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    let mut r = parsed[0].clone();
    for p in &parsed[1..] {
        r.rps += p.rps;
        r.requests += p.requests;
        r.p50_ms = (r.p50_ms + p.p50_ms) / 2.0;
        r.p99_ms = r.p99_ms.max(p.p99_ms);
        r.socket_errors += p.socket_errors;
        r.non_2xx += p.non_2xx;
    }
    let hz = clock_ticks();
    r.proc_user_s = p1.0.saturating_sub(p0.0) as f64 / hz;
    r.proc_sys_s = p1.1.saturating_sub(p0.1) as f64 / hz;
    let kernel = (k1.0 - k0.0 + k1.1 - k0.1) as f64 / hz;
    r.cpu_s = kernel + r.proc_user_s;
    r.cpu_per_100k = r.cpu_s / r.requests as f64 * 100_000.0;
    if !progs.is_empty() {
        let ns = b1.saturating_sub(b0) as f64;
        r.prog_per_100k = Some(ns / 1e9 / r.requests as f64 * 100_000.0);
    }
    // Let connections close and nginx flush its buffered access log (flush=1s).
    std::thread::sleep(Duration::from_millis(1200));
    r.split = [
        access_log_requests(0) - logs0[0],
        access_log_requests(1) - logs0[1],
    ];
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 5s test @ http://10.77.0.1:8080/\n  1 threads and 32 connections\n  \
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.02ms  300.00us   9.00ms   80.00%\n  \
            Latency Distribution\n     50%  385.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.50ms\n  \
            123456 requests in 5.00s, 17.43MB read\n  Socket errors: connect 0, read 12, write 1, timeout 0\n  \
            Non-2xx or 3xx responses: 5\nRequests/sec:  24690.35\nTransfer/sec:      3.49MB\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 123_456);
        assert!((r.rps - 24690.35).abs() < 1e-6);
        assert!((r.p50_ms - 0.385).abs() < 1e-9);
        assert!((r.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(r.socket_errors, 13);
        assert_eq!(r.non_2xx, 5);
    }
}
