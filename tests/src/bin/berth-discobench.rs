//! `cargo xtask bench` (third part): how fast berth reacts to Docker, against a Synapse-like
//! poller for context.
//!
//! A Docker network (bridge `bte-bdock0`) and a client namespace behind a veth (`bte-bdh0`, the
//! host's uplink) are created here; berth runs in the root namespace attached to those two only,
//! serving containers of the project's `hello` image on port 8080. Ten times: a container is
//! started, and the time from its start (Docker's `State.StartedAt`) to the first request it
//! answers through berth is taken; then it is stopped, and the time from the `docker stop` call to
//! berth taking it out of the pool (`berth status`) is taken. Meanwhile a thread plays Synapse's
//! default: it lists the running containers every 15 s; each start and stop is timed to the first
//! listing that reflects it.
//!
//! Then the same starts through `berth publish` and etcd (`berth_tests::fabric`: a balancer in
//! its own namespace watching etcd, the publisher on this Docker host): the time from the
//! `docker run` call to the first request the new container answers through the balancer,
//! beside the same figure for the direct Docker watch above.
//!
//! Results: a markdown table on stdout and target/bench/discovery.json. Everything is removed
//! afterwards (containers carry the label `berth-bench=1`).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use berth_tests::{
    daemon::Berth,
    docker::{Lab, Layout, docker},
    fabric::{self, Fabric, Publisher},
    servers::http_get,
    stats::median,
};

/// The benchmark's lab: its own network, bridge, uplink, image (no HEALTHCHECK: its exec events
/// would only add noise) and label, beside the tests' ones.
const LAYOUT: Layout = Layout {
    network: "berth-bench-net",
    bridge: "bte-bdock0",
    subnet: "172.31.249.0/24",
    uplink: "bte-bdh0",
    client_ns: "bcl",
    service: SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 1), 8080),
    client: Ipv4Addr::new(10, 42, 0, 2),
    image: "berth-bench/hello",
    label: "berth-bench=1",
    healthcheck: false,
};
const POLL: Duration = Duration::from_secs(15);

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Docker's RFC 3339 timestamp (UTC, nanoseconds) as Unix nanoseconds.
fn parse_rfc3339(s: &str) -> i128 {
    // 2026-11-25T06:58:55.123456789Z
    let (date, time) = s.trim().split_once('T').expect("timestamp");
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let time = time.trim_end_matches('Z');
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let frac = format!("{frac:0<9}");
    i128::from(secs) * 1_000_000_000 + frac[..9].parse::<i128>().unwrap()
}

/// Listings of the running test containers: (when, Unix ns; container ids).
type Listings = Arc<Mutex<Vec<(i128, BTreeSet<String>)>>>;

/// A listing of the running test containers every `POLL`, as (when, ids), like Synapse's
/// watcher polling the Docker API.
fn poller(stop: Arc<AtomicBool>, log: Listings) {
    while !stop.load(Ordering::Relaxed) {
        let out = Command::new("docker")
            .args([
                "ps",
                "-q",
                "--no-trunc",
                "--filter",
                &format!("label={}", LAYOUT.label),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids = out.split_whitespace().map(str::to_owned).collect();
        log.lock().unwrap().push((now_ns(), ids));
        let t = Instant::now();
        while t.elapsed() < POLL && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let lab = Lab::new(&LAYOUT);
    let run = |name: &str| lab.run(name, &[]).id;
    run("bb-base");
    let config = format!("[metrics]\nenabled = false\n{}", LAYOUT.config());
    let berth = Berth::start_root("bench-disco", &config, &[LAYOUT.uplink, LAYOUT.bridge]);
    berth.wait_for(" added (weight ", 1);

    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(Mutex::new(Vec::new()));
    let poll_thread = {
        let (stop, polls) = (stop.clone(), polls.clone());
        std::thread::spawn(move || poller(stop, polls))
    };
    // (container id, started at, served at, stop called at, out of the pool at), Unix ns.
    let mut events: Vec<(String, i128, i128, i128, i128)> = Vec::new();
    // `docker run` called -> first request served, direct watch (ms).
    let mut direct_run: Vec<f64> = Vec::new();
    for i in 0..rounds {
        let name = format!("bb-d{i}");
        let called = now_ns();
        let id = run(&name);
        let host = id[..12].to_owned();
        let started = parse_rfc3339(&docker(&["inspect", "-f", "{{.State.StartedAt}}", &name]));
        let served = lab.client.run(move || {
            let want = format!("Hello from {host}");
            let t = Instant::now();
            loop {
                if let Ok((200, b)) = http_get(LAYOUT.service)
                    && b == want
                {
                    return now_ns();
                }
                assert!(t.elapsed() < Duration::from_secs(10), "{want} never served");
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        direct_run.push((served - called) as f64 / 1e6);
        // Let the poller catch up now and then, so its reaction to starts is measured too.
        std::thread::sleep(Duration::from_millis(1500 + 700 * (i as u64 % 4)));
        let stop_at = now_ns();
        let stopper = {
            let name = name.clone();
            std::thread::spawn(move || docker(&["stop", &name]))
        };
        let addr_prefix = "172.31.249.";
        let out_at = loop {
            let st = berth.status();
            let in_pool = st.services[0]
                .backends
                .iter()
                .filter(|b| b.in_pool && b.address.starts_with(addr_prefix))
                .count();
            if in_pool == 1 {
                break now_ns();
            }
            assert!((now_ns() - stop_at) < 10_000_000_000, "never removed");
            std::thread::sleep(Duration::from_millis(2));
        };
        stopper.join().unwrap();
        events.push((id, started, served, stop_at, out_at));
        std::thread::sleep(Duration::from_millis(1000 + 900 * (i as u64 % 5)));
    }
    // The poller's view of the last events needs one more listing.
    std::thread::sleep(POLL + Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    poll_thread.join().unwrap();
    let polls = polls.lock().unwrap().clone();
    drop(berth);
    let published_run = through_publish(&lab, rounds);

    let ms = |a: i128, b: i128| (b - a) as f64 / 1e6;
    let berth_start: Vec<f64> = events.iter().map(|e| ms(e.1, e.2)).collect();
    let berth_stop: Vec<f64> = events.iter().map(|e| ms(e.3, e.4)).collect();
    let poll_start: Vec<f64> = events
        .iter()
        .filter_map(|e| {
            polls
                .iter()
                .find(|(at, ids)| *at >= e.1 && ids.contains(&e.0))
                .map(|(at, _)| ms(e.1, *at))
        })
        .collect();
    let poll_stop: Vec<f64> = events
        .iter()
        .filter_map(|e| {
            polls
                .iter()
                .find(|(at, ids)| *at >= e.3 && !ids.contains(&e.0))
                .map(|(at, _)| ms(e.3, *at))
        })
        .collect();
    let seen = poll_start.len();
    println!();
    println!("## discovery reaction ({rounds} containers; median, min-max, ms)");
    println!();
    println!("| event | berth | Synapse-like 15 s poll (listing only) |");
    println!("|---|---:|---:|");
    let cell = |v: &[f64]| {
        if v.is_empty() {
            return "-".to_owned();
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{:.0} ({lo:.0}-{hi:.0})", median(v))
    };
    println!(
        "| container started -> first request served | {} | {} |",
        cell(&berth_start),
        cell(&poll_start)
    );
    println!(
        "| `docker stop` called -> out of the pool | {} | {} |",
        cell(&berth_stop),
        cell(&poll_stop)
    );
    println!();
    println!("| `docker run` called -> first request served | ms |");
    println!("|---|---:|");
    println!("| berth watching Docker directly | {} |", cell(&direct_run));
    println!(
        "| balancer in another namespace, via `berth publish` + etcd | {} |",
        cell(&published_run)
    );
    println!();
    println!(
        "The poller's figures are when its listing first reflected the change ({seen} of {rounds} \
         starts were listed while running); a real Synapse then rewrites the HAProxy config and \
         reloads it on top of that."
    );
    let json = serde_json::json!({
        "rounds": rounds,
        "berth_start_to_served_ms": berth_start,
        "berth_stop_to_removed_ms": berth_stop,
        "poll_15s_start_to_listed_ms": poll_start,
        "poll_15s_stop_to_unlisted_ms": poll_stop,
        "direct_run_to_served_ms": direct_run,
        "publish_etcd_run_to_served_ms": published_run,
        "median": {
            "direct_run_to_served_ms": median(&direct_run),
            "publish_etcd_run_to_served_ms": median(&published_run),
            "berth_start_to_served_ms": median(&berth_start),
            "berth_stop_to_removed_ms": median(&berth_stop),
            "poll_15s_start_to_listed_ms": median(&poll_start),
            "poll_15s_stop_to_unlisted_ms": median(&poll_stop),
        }
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("discovery.json"), json.to_string());
    println!("written: target/bench/discovery.json");
}

/// `rounds` containers started on this Docker host, each announced by `berth publish` through
/// etcd to a balancer in its own namespace: ms from the `docker run` call to the first request
/// the container answers through the balancer.
fn through_publish(lab: &Lab, rounds: usize) -> Vec<f64> {
    let f = Fabric::new(1);
    let balancer = f.berth(1);
    f.activate(1);
    let _publisher = Publisher::start("bench-publish", &f.publish_config(LAYOUT.image, 10));
    let mut out = Vec::new();
    for i in 0..rounds {
        let name = format!("bb-p{i}");
        let called = Instant::now();
        let id = lab.run(&name, &["-p", "8000"]).id;
        let host = id[..12].to_owned();
        let took = f.client.run(move || {
            let want = format!("Hello from {host}");
            loop {
                if let Ok((200, b)) = http_get(fabric::SERVICE)
                    && b == want
                {
                    return called.elapsed();
                }
                assert!(
                    called.elapsed() < Duration::from_secs(10),
                    "{want} never served"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        out.push(took.as_secs_f64() * 1e3);
        docker(&["rm", "-f", &name]);
        fabric::wait_pool(&balancer, 0, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300 + 200 * (i as u64 % 3)));
    }
    let counter = |name: &str| {
        balancer
            .status()
            .counters
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    };
    println!(
        "through berth publish: SYNs dropped on a slot mid-update (drop_no_backend) {}, \
         refused with an empty pool (reject_no_backend) {}",
        counter("drop_no_backend"),
        counter("reject_no_backend")
    );
    out
}
