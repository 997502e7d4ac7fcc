//! Prometheus text exposition of what `berth status` shows, plus the dataplane's exit and event
//! counters and conntrack occupancy. Served over HTTP (hyper) on `[metrics] listen` (loopback by
//! default), rendered from a [`Status`] so both views agree.
//!
//! A page costs a walk of the whole conntrack map (two syscalls per entry), so pages come from a
//! [`Cache`]: a scrape takes a new snapshot only when the last one is older than
//! `[metrics] refresh_interval_secs`, and concurrent scrapes wait for the same one. A connection
//! costs nothing until it has sent a request; connections are bounded in number and time.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::api::status::Status;

/// Extra figures the status document does not carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    /// Full conntrack walks the daemon has made (metrics, `berth status`, the sweep).
    pub conntrack_walks: u64,
    pub docker_events: u64,
    /// Seconds from the last Docker event's timestamp to its change being applied.
    pub discovery_lag_seconds: Option<f64>,
}

/// Makes a fresh page (the daemon's: a status snapshot, a conntrack walk, [`render`]).
pub type Renderer = Box<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The last page and when it was made; a page older than the refresh interval is made anew by
/// the first scrape that wants it, while the others wait for it (one walk, however many ask).
pub struct Cache {
    refresh: Duration,
    render: Renderer,
    page: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

impl Cache {
    pub fn new(refresh: Duration, render: Renderer) -> Self {
        Self {
            refresh,
            render,
            page: tokio::sync::Mutex::new(None),
        }
    }

    /// The current page: the cached one if younger than the refresh interval.
    pub async fn page(&self) -> Bytes {
        let mut page = self.page.lock().await;
        if let Some((at, body)) = &*page
            && at.elapsed() < self.refresh
        {
            return body.clone();
        }
        let body = Bytes::from((self.render)().await);
        *page = Some((Instant::now(), body.clone()));
        body
    }
}

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a connection has to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept (a slow reader of the page, say).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves the metrics page on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cache: Arc<Cache>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            permit = permits.clone().acquire_owned() => {
                let permit = permit.expect("the semaphore is never closed");
                tokio::select! {
                    _ = stop.changed() => return,
                    a = listener.accept() => a.map(|(conn, _)| (conn, permit)),
                }
            }
        };
        let (conn, permit) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: retry shortly rather than spin.
                tracing::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cache = cache.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let cache = cache.clone();
                async move { Ok::<_, Infallible>(respond(&cache, &req).await) }
            });
            // One request per connection: an idle keep-alive connection would hold its place
            // among the MAX_CONNECTIONS (scrapers reconnect at no cost worth saving).
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

async fn respond(cache: &Cache, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"GET /metrics\n"),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // `/` too: the page has always been served there.
    if !matches!(req.uri().path(), "/" | "/metrics") {
        return reply(StatusCode::NOT_FOUND, Bytes::from_static(b"GET /metrics\n"));
    }
    reply(StatusCode::OK, cache.page().await)
}

/// A snapshot, encoded by prometheus-client in the Prometheus text format (0.0.4): counters get
/// their `_total` suffix from the encoder, label values their escaping, and families keep the
/// order of `berth status` (services, then their backends).
#[derive(Debug)]
struct Snapshot {
    status: Status,
    extra: Extra,
}

type Labels = Vec<(&'static str, String)>;

/// One family: its descriptor (written even without samples: the HELP and TYPE lines say what
/// berth exports), then a sample per label set, or one unlabelled sample.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        if labels.is_empty() {
            return value.encode(metric);
        }
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<u64> {
    ConstGauge::new(v)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (s, x) = (&self.status, &self.extra);
        let backends: Vec<(Labels, &crate::api::status::BackendStatus)> = s
            .services
            .iter()
            .flat_map(|svc| {
                svc.backends.iter().map(move |b| {
                    let labels = vec![
                        ("service", svc.name.clone()),
                        ("backend", b.address.clone()),
                        ("container", b.container.clone().unwrap_or_default()),
                    ];
                    (labels, b)
                })
            })
            .collect();
        let per_backend = |f: fn(&crate::api::status::BackendStatus) -> u64| {
            backends.iter().map(move |(l, b)| (l.clone(), f(b)))
        };
        for (name, help, f) in [
            (
                "berth_backend_packets",
                "Packets translated for a backend (both directions).",
                (|b| b.packets) as fn(&crate::api::status::BackendStatus) -> u64,
            ),
            (
                "berth_backend_bytes",
                "Bytes translated for a backend (both directions).",
                |b| b.bytes,
            ),
            (
                "berth_backend_new_flows",
                "New flows balanced to a backend.",
                |b| b.new_flows,
            ),
        ] {
            let rows = per_backend(f).map(|(l, v)| (l, counter(v)));
            family(&mut e, name, help, MetricType::Counter, rows)?;
        }
        for (name, help, f) in [
            (
                "berth_backend_active_flows",
                "Open flows pinned to a backend.",
                (|b| b.active_flows) as fn(&crate::api::status::BackendStatus) -> u64,
            ),
            (
                "berth_backend_healthy",
                "1 if the backend passes its health check (or has none), else 0 (also while a \
                 new container does not accept connections yet).",
                |b| u64::from(b.health == "healthy" || b.health == "unchecked"),
            ),
            (
                "berth_backend_in_pool",
                "1 if the backend takes new flows.",
                |b| u64::from(b.in_pool),
            ),
        ] {
            let rows = per_backend(f).map(|(l, v)| (l, gauge(v)));
            family(&mut e, name, help, MetricType::Gauge, rows)?;
        }
        let per_service = |f: fn(&crate::api::status::BackendStatus) -> u64| {
            s.services.iter().map(move |svc| {
                let labels = vec![
                    ("service", svc.name.clone()),
                    ("listen", svc.listen.clone()),
                    ("protocol", svc.protocol.clone()),
                ];
                (labels, counter(svc.backends.iter().map(f).sum()))
            })
        };
        for (name, help, f) in [
            (
                "berth_service_packets",
                "Packets translated for a service's backends.",
                (|b| b.packets) as fn(&crate::api::status::BackendStatus) -> u64,
            ),
            (
                "berth_service_new_flows",
                "New flows balanced by a service.",
                |b| b.new_flows,
            ),
        ] {
            family(&mut e, name, help, MetricType::Counter, per_service(f))?;
        }
        let (exits, events): (Vec<_>, Vec<_>) = s
            .counters
            .iter()
            .partition(|(n, _)| !n.starts_with("event_"));
        family(
            &mut e,
            "berth_packets",
            "Packets by the program's exit: action and reason (see README, action policy).",
            MetricType::Counter,
            exits.iter().map(|(n, v)| {
                let (action, reason) = n.split_once('_').unwrap_or((n.as_str(), ""));
                (
                    vec![("action", action.to_owned()), ("reason", reason.to_owned())],
                    counter(*v),
                )
            }),
        )?;
        family(
            &mut e,
            "berth_dataplane_events",
            "Notable dataplane events (not exits).",
            MetricType::Counter,
            events.iter().map(|(n, v)| {
                let event = n.trim_start_matches("event_").to_owned();
                (vec![("event", event)], counter(*v))
            }),
        )?;
        let one = |v| [(Labels::new(), gauge(v))];
        family(
            &mut e,
            "berth_conntrack_entries",
            "Conntrack entries in use (two per flow).",
            MetricType::Gauge,
            one(x.conntrack_entries),
        )?;
        family(
            &mut e,
            "berth_conntrack_capacity",
            "Conntrack map size.",
            MetricType::Gauge,
            one(x.conntrack_capacity),
        )?;
        family(
            &mut e,
            "berth_conntrack_walks",
            "Full walks of the conntrack map (metrics refreshes, berth status, the sweep).",
            MetricType::Counter,
            [(Labels::new(), counter(x.conntrack_walks))],
        )?;
        family(
            &mut e,
            "berth_docker_events",
            "Docker container and network events handled.",
            MetricType::Counter,
            [(Labels::new(), counter(x.docker_events))],
        )?;
        if let Some(etcd) = &self.status.etcd {
            family(
                &mut e,
                "berth_etcd_up",
                "1 while every etcd prefix is read and watched; 0 while etcd is unreachable \
                 (the last known backends keep serving).",
                MetricType::Gauge,
                one(u64::from(etcd.connected)),
            )?;
            family(
                &mut e,
                "berth_etcd_events",
                "Puts and deletes received through the etcd watches.",
                MetricType::Counter,
                [(Labels::new(), counter(etcd.events))],
            )?;
            family(
                &mut e,
                "berth_etcd_resyncs",
                "Full reads of the etcd prefixes (at start, after each reconnect or compaction).",
                MetricType::Counter,
                [(Labels::new(), counter(etcd.resyncs))],
            )?;
            family(
                &mut e,
                "berth_etcd_keys",
                "Keys known under the watched etcd prefixes.",
                MetricType::Gauge,
                one(etcd.keys as u64),
            )?;
        }
        let engine = |name: &str| vec![("engine", name.to_owned())];
        family(
            &mut e,
            "berth_engine_connected",
            "1 if the Docker Engine's watcher is connected, else 0.",
            MetricType::Gauge,
            s.engines
                .iter()
                .map(|en| (engine(&en.name), gauge(u64::from(en.connected)))),
        )?;
        family(
            &mut e,
            "berth_engine_lost",
            "1 if the Docker Engine has been unreachable past its grace, else 0.",
            MetricType::Gauge,
            s.engines
                .iter()
                .map(|en| (engine(&en.name), gauge(u64::from(en.lost)))),
        )?;
        family(
            &mut e,
            "berth_engine_containers",
            "Running containers the Docker Engine last reported.",
            MetricType::Gauge,
            s.engines
                .iter()
                .map(|en| (engine(&en.name), gauge(en.containers as u64))),
        )?;
        family(
            &mut e,
            "berth_engine_last_event_timestamp_seconds",
            "Docker's timestamp of the last container event of the engine.",
            MetricType::Gauge,
            s.engines.iter().filter_map(|en| {
                Some((engine(&en.name), ConstGauge::new(en.last_event_unix_secs?)))
            }),
        )?;
        if let Some(lag) = x.discovery_lag_seconds {
            family(
                &mut e,
                "berth_discovery_lag_seconds",
                "From the last Docker event's timestamp to its change being in the kernel.",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(lag))],
            )?;
        }
        Ok(())
    }
}

/// The metrics page.
pub fn render(status: Status, extra: Extra) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { status, extra }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::{BackendStatus, ServiceStatus};

    /// A cache whose renderer counts its calls (and takes a while, like a walk).
    fn counting_cache(refresh: Duration) -> (Arc<Cache>, Arc<std::sync::atomic::AtomicUsize>) {
        let renders = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = renders.clone();
        let cache = Cache::new(
            refresh,
            Box::new(move || {
                let n = n.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    format!("page {i}\n")
                })
            }),
        );
        (Arc::new(cache), renders)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn concurrent_scrapes_share_one_render_per_interval() {
        runtime().block_on(async {
            let (cache, renders) = counting_cache(Duration::from_millis(300));
            let pages = futures_util::future::join_all((0..50).map(|_| {
                let c = cache.clone();
                async move { c.page().await }
            }))
            .await;
            assert!(pages.iter().all(|p| p == &pages[0]));
            assert_eq!(renders.load(std::sync::atomic::Ordering::SeqCst), 1);
            tokio::time::sleep(Duration::from_millis(350)).await;
            assert_eq!(cache.page().await, Bytes::from("page 2\n"));
        });
    }

    /// One HTTP/1.0 request on a fresh connection: the whole answer.
    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn connections_without_a_request_render_nothing() {
        runtime().block_on(async {
            let (cache, renders) = counting_cache(Duration::from_secs(60));
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let server = tokio::spawn(serve(l, cache, stop_rx));
            for _ in 0..300 {
                drop(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(renders.load(std::sync::atomic::Ordering::SeqCst), 0);
            let answer = get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
            assert!(answer.contains("text/plain; version=0.0.4"), "{answer}");
            assert!(answer.ends_with("\r\n\r\npage 1\n"), "{answer}");
            // HTTP/1.1 without `Connection: close`: answered, then closed all the same.
            let answer = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(answer.ends_with("page 1\n"), "{answer}");
            let answer = get(addr, "GET /nope HTTP/1.0\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.0 404"), "{answer}");
            let answer = get(addr, "POST /metrics HTTP/1.0\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.0 405"), "{answer}");
            assert_eq!(renders.load(std::sync::atomic::Ordering::SeqCst), 1);
            stop_tx.send(true).unwrap();
            server.await.unwrap();
        });
    }

    #[test]
    fn exposition_format() {
        let s = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "0.0.0.0:8080".into(),
                protocol: "tcp".into(),
                backends: vec![BackendStatus {
                    address: "10.0.0.2:8000".into(),
                    container: Some("a\"b".into()),
                    engine: None,
                    health: "unhealthy".into(),
                    weight: 1,
                    in_pool: false,
                    nat: "dnat".into(),
                    active_flows: 2,
                    packets: 10,
                    bytes: 700,
                    new_flows: 3,
                }],
            }],
            counters: vec![
                ("pass_no_service".into(), 5),
                ("event_ct_closing".into(), 1),
                ("drop_snat_exhausted".into(), 2),
                ("event_snat_port_taken".into(), 9),
            ],
            etcd: Some(crate::api::status::EtcdStatus {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                connected: false,
                error: Some("connection refused".into()),
                down_for_secs: Some(3.0),
                keys: 2,
                revision: 17,
                events: 5,
                resyncs: 1,
            }),
            engines: vec![crate::api::status::EngineStatus {
                name: "b".into(),
                endpoint: "tcp://10.42.2.2:2375".into(),
                connected: false,
                this_host: false,
                address: Some("10.42.2.2".into()),
                containers: 2,
                last_event_unix_secs: Some(1796289590.5),
                unreachable_secs: Some(3.0),
                lost: false,
                error: None,
            }],
        };
        let m = render(
            s,
            Extra {
                conntrack_entries: 4,
                conntrack_capacity: 1024,
                conntrack_walks: 3,
                docker_events: 7,
                discovery_lag_seconds: Some(0.002),
            },
        );
        for line in [
            "# TYPE berth_backend_packets_total counter",
            r#"berth_backend_packets_total{service="web",backend="10.0.0.2:8000",container="a\"b"} 10"#,
            r#"berth_backend_healthy{service="web",backend="10.0.0.2:8000",container="a\"b"} 0"#,
            r#"berth_service_new_flows_total{service="web",listen="0.0.0.0:8080",protocol="tcp"} 3"#,
            r#"berth_packets_total{action="pass",reason="no_service"} 5"#,
            r#"berth_dataplane_events_total{event="ct_closing"} 1"#,
            r#"berth_packets_total{action="drop",reason="snat_exhausted"} 2"#,
            r#"berth_dataplane_events_total{event="snat_port_taken"} 9"#,
            "berth_conntrack_capacity 1024",
            "berth_conntrack_walks_total 3",
            "berth_discovery_lag_seconds 0.002",
            "berth_etcd_up 0",
            "berth_etcd_events_total 5",
            "berth_etcd_resyncs_total 1",
            "berth_etcd_keys 2",
            r#"berth_engine_connected{engine="b"} 0"#,
            r#"berth_engine_lost{engine="b"} 0"#,
            r#"berth_engine_containers{engine="b"} 2"#,
            r#"berth_engine_last_event_timestamp_seconds{engine="b"} 1796289590.5"#,
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
    }
}
