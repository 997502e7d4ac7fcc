//! `berth run --synapse-config synapse.json.conf`: reads an Airbnb Synapse configuration (the
//! Synapse + HAProxy recipe berth replaces) and maps it onto berth services.
//!
//! Mapped: `services.<name>.discovery` (method `docker`: `image_name`, `container_port`,
//! `servers`, each a Docker Engine at `host:port`, 4243 by default as in Synapse, the
//! `localhost` one this host's Docker socket; method `base`: `default_servers`),
//! `services.<name>.haproxy.port` and `bind_address`, the health check of `server_options` (`check`, `inter`, `rise`, `fall`) and
//! of the `listen`/`backend` lines (`option httpchk`, `http-check expect string|status`).
//! Everything else is named in a warning, never silently dropped; the top-level `haproxy`
//! section (HAProxy's own process settings) is accepted and ignored with one notice.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    BackendConfig, CheckKind, Config, ConfigError, DockerSelector, EngineConfig, HealthConfig,
    Protocol, ServiceConfig,
};

/// The result of an import: a berth config and what could not be carried over.
#[derive(Debug)]
pub struct Imported {
    pub config: Config,
    pub warnings: Vec<String>,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// HAProxy time: `2000` (ms), `2s`, `500ms`, `1m`.
fn haproxy_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000)
    } else {
        (v, 1)
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn lines(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|l| l.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses Synapse's JSON configuration into a berth configuration.
pub fn import(text: &str) -> Result<Imported, ConfigError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| err(format!("line {}", e.line()), e.to_string()))?;
    let obj = root
        .as_object()
        .ok_or_else(|| err("synapse", "not a JSON object"))?;
    let mut warnings = Vec::new();
    for key in obj.keys() {
        match key.as_str() {
            "services" => {}
            "haproxy" => warnings.push(
                "the top-level haproxy section (HAProxy process settings) is ignored: berth balances in the kernel".into(),
            ),
            other => warnings.push(format!("top-level {other:?} is not supported and ignored")),
        }
    }
    let services = obj
        .get("services")
        .and_then(Value::as_object)
        .ok_or_else(|| err("services", "missing or not an object"))?;
    let global_bind = obj
        .get("haproxy")
        .and_then(|h| h.get("bind_address"))
        .and_then(Value::as_str)
        .map(String::from);

    let mut config = Config::default();
    config.docker.label_services = Some(false);
    let mut engines = Engines::default();
    for (name, svc) in services {
        let at = |f: &str| format!("services.{name}.{f}");
        let s = svc
            .as_object()
            .ok_or_else(|| err(at(""), "not an object"))?;
        for key in s.keys() {
            if !["discovery", "haproxy", "default_servers"].contains(&key.as_str()) {
                warnings.push(format!("{}: not supported, ignored", at(key)));
            }
        }
        let discovery = s
            .get("discovery")
            .and_then(Value::as_object)
            .ok_or_else(|| err(at("discovery"), "missing"))?;
        let method = discovery
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut backends = Vec::new();
        let mut docker = None;
        match method {
            "docker" => {
                let image = discovery
                    .get("image_name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(at("discovery.image_name"), "missing"))?;
                let port = discovery
                    .get("container_port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| err(at("discovery.container_port"), "missing or not a port"))?;
                let servers: Vec<&Value> = discovery
                    .get("servers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .collect();
                let mut names = Vec::new();
                for (i, server) in servers.iter().enumerate() {
                    let field = |f: &str| at(&format!("discovery.servers[{i}].{f}"));
                    let obj = server.as_object().ok_or_else(|| {
                        err(at(&format!("discovery.servers[{i}]")), "not an object")
                    })?;
                    for key in obj.keys() {
                        if !["name", "host", "port"].contains(&key.as_str()) {
                            warnings.push(format!("{}: not supported, ignored", field(key)));
                        }
                    }
                    let host = obj
                        .get("host")
                        .and_then(Value::as_str)
                        .filter(|h| !h.is_empty())
                        .ok_or_else(|| err(field("host"), "missing"))?;
                    let port = match obj.get("port") {
                        None => SYNAPSE_DOCKER_PORT,
                        Some(p) => p
                            .as_u64()
                            .and_then(|p| u16::try_from(p).ok())
                            .filter(|p| *p > 0)
                            .ok_or_else(|| err(field("port"), format!("{p} is not a port")))?,
                    };
                    let server_name = obj.get("name").and_then(Value::as_str).unwrap_or(host);
                    names.push(engines.add(server_name, host, port, &field("host"))?);
                }
                if servers.is_empty() {
                    // Synapse insists on servers; berth takes the missing list for this host.
                    names.push(engines.add("localhost", "localhost", SYNAPSE_DOCKER_PORT, "")?);
                }
                docker = Some(DockerSelector {
                    image: Some(image.to_owned()),
                    labels: BTreeMap::new(),
                    port,
                    network: None,
                    engines: names,
                });
                for key in discovery.keys() {
                    match key.as_str() {
                        "method" | "image_name" | "container_port" | "servers" => {}
                        "check_interval" => warnings.push(format!(
                            "{}: berth follows Docker's event stream instead of polling; ignored",
                            at("discovery.check_interval")
                        )),
                        other => warnings.push(format!(
                            "{}: not supported, ignored",
                            at(&format!("discovery.{other}"))
                        )),
                    }
                }
                if s.contains_key("default_servers") {
                    warnings.push(format!(
                        "{}: used by Synapse only when discovery finds nothing; berth does not fall back, ignored",
                        at("default_servers")
                    ));
                }
            }
            "base" => {
                for (i, server) in s
                    .get("default_servers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let host = server.get("host").and_then(Value::as_str).unwrap_or("");
                    let port = server.get("port").and_then(Value::as_u64).unwrap_or(0);
                    backends.push(BackendConfig {
                        address: format!("{host}:{port}"),
                        weight: 1,
                    });
                    if host.parse::<std::net::Ipv4Addr>().is_err() {
                        return Err(err(
                            at(&format!("default_servers[{i}].host")),
                            format!("{host:?}: berth needs an IPv4 address"),
                        ));
                    }
                }
            }
            other => {
                return Err(err(
                    at("discovery.method"),
                    format!("{other:?} is not supported (berth supports docker and base)"),
                ));
            }
        }

        let hap = s
            .get("haproxy")
            .and_then(Value::as_object)
            .ok_or_else(|| err(at("haproxy"), "missing"))?;
        let port = hap
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| {
                err(
                    at("haproxy.port"),
                    "missing or not a port (berth needs one per service)",
                )
            })?;
        let bind = hap
            .get("bind_address")
            .and_then(Value::as_str)
            .map(String::from)
            .or(global_bind.clone());
        let listen_addr = match bind.as_deref() {
            None | Some("localhost") | Some("127.0.0.1") => {
                warnings.push(format!(
                    "{}: HAProxy listened on localhost; berth serves 0.0.0.0:{port} (any address of this host)",
                    at("haproxy.bind_address")
                ));
                "0.0.0.0".to_owned()
            }
            Some(a) => a.to_owned(),
        };

        // Health: `check` in server_options turns it on; httpchk lines make it HTTP.
        let mut health = HealthConfig {
            kind: CheckKind::Tcp,
            path: "/".into(),
            expect_status: None,
            expect_string: None,
            interval_ms: 2000,
            timeout_ms: 2000,
            rise: 2,
            fall: 3,
            start_healthy: false,
        };
        let mut check = false;
        let mut no_check = false;
        if let Some(opts) = hap.get("server_options").and_then(Value::as_str) {
            let mut it = opts.split_whitespace();
            while let Some(tok) = it.next() {
                let mut num = |f: &str| -> Result<String, ConfigError> {
                    it.next().map(String::from).ok_or_else(|| {
                        err(at("haproxy.server_options"), format!("{f} needs a value"))
                    })
                };
                match tok {
                    "check" => check = true,
                    // HAProxy's way to say "no checks", whatever else is described.
                    "no-check" => no_check = true,
                    "inter" => {
                        let v = num("inter")?;
                        health.interval_ms = haproxy_ms(&v).ok_or_else(|| {
                            err(at("haproxy.server_options"), format!("inter {v:?}"))
                        })?;
                        health.timeout_ms = health.interval_ms;
                    }
                    "rise" => {
                        health.rise = num("rise")?
                            .parse()
                            .map_err(|_| err(at("haproxy.server_options"), "rise needs a number"))?
                    }
                    "fall" => {
                        health.fall = num("fall")?
                            .parse()
                            .map_err(|_| err(at("haproxy.server_options"), "fall needs a number"))?
                    }
                    other => warnings.push(format!(
                        "{}: {other:?} not supported, ignored",
                        at("haproxy.server_options")
                    )),
                }
            }
        }
        for field in ["listen", "backend", "frontend"] {
            for line in lines(hap.get(field)) {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["mode", "http" | "tcp"] => {}
                    ["option", "httpchk", rest @ ..] => {
                        health.kind = CheckKind::Http;
                        // `option httpchk <uri>` or `option httpchk <method> <uri> [<version>]`
                        let uri = match rest {
                            [] => "/",
                            [uri] => uri,
                            [method, uri, ..] => {
                                if *method != "GET" {
                                    warnings.push(format!(
                                        "{}: {line:?}: berth checks with GET",
                                        at(&format!("haproxy.{field}"))
                                    ));
                                }
                                uri
                            }
                        };
                        health.path = uri.to_string();
                    }
                    ["http-check", "expect", "string", s @ ..] => {
                        health.kind = CheckKind::Http;
                        health.expect_string = Some(s.join(" "));
                    }
                    ["http-check", "expect", "status", code] => {
                        health.kind = CheckKind::Http;
                        health.expect_status = Some(code.parse().map_err(|_| {
                            err(at(&format!("haproxy.{field}")), format!("{line:?}"))
                        })?);
                    }
                    _ => warnings.push(format!(
                        "{}: {line:?} not supported, ignored",
                        at(&format!("haproxy.{field}"))
                    )),
                }
            }
        }
        for key in hap.keys() {
            if ![
                "port",
                "bind_address",
                "server_options",
                "listen",
                "backend",
                "frontend",
            ]
            .contains(&key.as_str())
            {
                warnings.push(format!(
                    "{}: not supported, ignored",
                    at(&format!("haproxy.{key}"))
                ));
            }
        }
        // An HTTP check described (httpchk, expect) but no `check` on a server line: HAProxy would
        // not check, yet berth has no server lines to put `check` on, so the intent is clear.
        // It runs the check with HAProxy's defaults unless told `no-check`.
        if !check && !no_check && health.kind == CheckKind::Http {
            check = true;
            warnings.push(format!(
                "{}: the HTTP check described (GET {}{}) runs although server_options has no \
                 `check` (HAProxy would not run it), every {} ms, rise {}, fall {}; \
                 `no-check` in server_options turns it off",
                at("haproxy"),
                health.path,
                health
                    .expect_string
                    .as_ref()
                    .map(|s| format!(", expecting {s:?}"))
                    .unwrap_or_default(),
                health.interval_ms,
                health.rise,
                health.fall,
            ));
        }
        if no_check {
            check = false;
        }
        config.services.push(ServiceConfig {
            name: name.clone(),
            listen: format!("{listen_addr}:{port}"),
            listen6: None,
            protocol: Protocol::Tcp,
            backends,
            health: check.then_some(health),
            docker,
            etcd: None,
            mode: None,
        });
    }
    config.docker.engines = engines.list;
    Ok(Imported { config, warnings })
}

/// The port Synapse's Docker watcher assumes for a server without one.
const SYNAPSE_DOCKER_PORT: u16 = 4243;

/// The engines of every service's `servers`, each once.
#[derive(Default)]
struct Engines {
    list: Vec<EngineConfig>,
}

impl Engines {
    /// The engine of server `name` at `host:port` (named after the server, made unique), added
    /// unless a server of another service named it already. A `localhost` server is this host:
    /// its engine is the Docker socket.
    fn add(
        &mut self,
        name: &str,
        host: &str,
        port: u16,
        field: &str,
    ) -> Result<String, ConfigError> {
        let endpoint = if ["localhost", "127.0.0.1", "::1"].contains(&host) {
            format!("unix://{}", super::engine::DEFAULT_SOCKET)
        } else {
            if host.contains(['/', ' ', ':']) {
                return Err(err(
                    field,
                    format!("{host:?} is not a host name or IPv4 address"),
                ));
            }
            format!("tcp://{host}:{port}")
        };
        if let Some(e) = self.list.iter().find(|e| e.endpoint == endpoint) {
            return Ok(e.name.clone());
        }
        let base: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(60)
            .collect();
        let base = if base.is_empty() {
            "server".to_owned()
        } else {
            base
        };
        let mut unique = base.clone();
        let mut n = 2;
        while self.list.iter().any(|e| e.name == unique) {
            unique = format!("{base}-{n}");
            n += 1;
        }
        self.list.push(EngineConfig {
            name: unique.clone(),
            endpoint,
            address: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_verify: None,
        });
        Ok(unique)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{
      "services": {
        "nodeapp": {
          "discovery": {
            "method": "docker",
            "servers": [{"name": "localhost", "host": "localhost"}],
            "container_port": 8000,
            "image_name": "local/nodeapp",
            "check_interval": 5
          },
          "haproxy": {
            "port": 8080,
            "server_options": "check inter 2s rise 3 fall 2",
            "listen": ["mode http", "option httpchk /", "http-check expect string Hello"]
          }
        }
      },
      "haproxy": {
        "reload_command": "service haproxy reload",
        "config_file_path": "/etc/haproxy/haproxy.cfg",
        "do_writes": true,
        "do_reloads": true,
        "global": ["daemon", "maxconn 4096"],
        "defaults": ["timeout connect 5000ms"]
      }
    }"#;

    #[test]
    fn seed_config_maps_onto_a_berth_service() {
        let imp = import(SEED).unwrap();
        let s = &imp.config.services[0];
        assert_eq!(
            (s.name.as_str(), s.listen.as_str()),
            ("nodeapp", "0.0.0.0:8080")
        );
        let d = s.docker.as_ref().unwrap();
        assert_eq!((d.image.as_deref(), d.port), (Some("local/nodeapp"), 8000));
        let h = s.health.as_ref().unwrap();
        assert_eq!(h.kind, CheckKind::Http);
        assert_eq!(
            (h.path.as_str(), h.expect_string.as_deref()),
            ("/", Some("Hello"))
        );
        assert_eq!((h.interval_ms, h.rise, h.fall), (2000, 3, 2));
        // It validates as a berth config.
        let services = imp.config.validate().unwrap();
        assert_eq!(services[0].listen.to_string(), "0.0.0.0:8080");
        // One notice for the HAProxy process section, one for polling, one for localhost.
        assert_eq!(imp.warnings.len(), 3, "{:?}", imp.warnings);
        assert!(imp.warnings.iter().any(|w| w.contains("top-level haproxy")));
        assert!(imp.warnings.iter().any(|w| w.contains("check_interval")));
    }

    #[test]
    fn every_server_is_an_engine_and_localhost_is_this_host() {
        let imp = import(SEED).unwrap();
        assert_eq!(imp.config.docker.engines.len(), 1);
        let local = &imp.config.docker.engines[0];
        assert_eq!(
            (local.name.as_str(), local.endpoint.as_str()),
            ("localhost", "unix:///var/run/docker.sock")
        );
        assert!(
            !imp.warnings.iter().any(|w| w.contains("servers")),
            "{:?}",
            imp.warnings
        );
        // A second host, and a second service on the same hosts: each engine once.
        let two = SEED.replace(
            r#"[{"name": "localhost", "host": "localhost"}]"#,
            r#"[{"name": "localhost", "host": "localhost"},
                {"name": "docker b", "host": "10.42.2.2"},
                {"name": "c", "host": "docker-c.internal", "port": 2375}]"#,
        );
        let imp = import(&two).unwrap();
        let engines: Vec<(&str, &str)> = imp
            .config
            .docker
            .engines
            .iter()
            .map(|e| (e.name.as_str(), e.endpoint.as_str()))
            .collect();
        assert_eq!(
            engines,
            [
                ("localhost", "unix:///var/run/docker.sock"),
                ("docker-b", "tcp://10.42.2.2:4243"),
                ("c", "tcp://docker-c.internal:2375"),
            ]
        );
        assert_eq!(
            imp.config.services[0].docker.as_ref().unwrap().engines,
            ["localhost", "docker-b", "c"]
        );
        // It validates, and names the engines it resolves.
        imp.config.validate().unwrap();
        assert_eq!(imp.config.docker.engines(&|_| None).unwrap().len(), 3);
        let e = import(&SEED.replace(r#""host": "localhost""#, r#""port": 4243"#)).unwrap_err();
        assert_eq!(e.field, "services.nodeapp.discovery.servers[0].host");
        let e = import(&SEED.replace(
            r#""host": "localhost""#,
            r#""host": "10.0.0.2", "port": 70000"#,
        ))
        .unwrap_err();
        assert_eq!(e.field, "services.nodeapp.discovery.servers[0].port");
    }

    #[test]
    fn unsupported_options_are_named() {
        let text = SEED
            .replace(r#""mode http","#, r#""mode http", "balance leastconn","#)
            .replace("check inter 2s", "check inter 2s maxconn 10");
        let imp = import(&text).unwrap();
        assert!(
            imp.warnings.iter().any(|w| w.contains("balance leastconn")),
            "{:?}",
            imp.warnings
        );
        assert!(
            imp.warnings.iter().any(|w| w.contains("maxconn")),
            "{:?}",
            imp.warnings
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            import(&SEED.replace(r#""method": "docker""#, r#""method": "zookeeper""#)).unwrap_err();
        assert_eq!(e.field, "services.nodeapp.discovery.method");
        let e = import(&SEED.replace(r#""port": 8080,"#, "")).unwrap_err();
        assert_eq!(e.field, "services.nodeapp.haproxy.port");
        let e = import(&SEED.replace(r#""container_port": 8000,"#, "")).unwrap_err();
        assert_eq!(e.field, "services.nodeapp.discovery.container_port");
        assert!(import("{ nope").unwrap_err().field.starts_with("line"));
        assert_eq!(haproxy_ms("2s"), Some(2000));
        assert_eq!(haproxy_ms("500ms"), Some(500));
        assert_eq!(haproxy_ms("1500"), Some(1500));
    }

    #[test]
    fn a_described_http_check_runs_without_check_unless_no_check() {
        let tutorial = r#"{"services": {"nodeapp": {
            "discovery": {"method": "docker", "container_port": 8000, "image_name": "local/nodeapp"},
            "haproxy": {"port": 8080, "server_options": "",
                        "listen": ["mode http", "option httpchk /", "http-check expect string Hello"]}}}}"#;
        let imp = import(tutorial).unwrap();
        let h = imp.config.services[0]
            .health
            .as_ref()
            .expect("the described check runs");
        assert_eq!(h.kind, CheckKind::Http);
        assert_eq!(
            (h.path.as_str(), h.expect_string.as_deref()),
            ("/", Some("Hello"))
        );
        assert_eq!(
            (h.interval_ms, h.rise, h.fall),
            (2000, 2, 3),
            "HAProxy's defaults"
        );
        let notices: Vec<_> = imp
            .warnings
            .iter()
            .filter(|w| w.contains("runs although"))
            .collect();
        assert_eq!(notices.len(), 1, "{:?}", imp.warnings);
        assert!(notices[0].contains("no-check"), "{notices:?}");
        // Turned off on purpose: no check, no notice.
        let off = tutorial.replace(r#""server_options": """#, r#""server_options": "no-check""#);
        let imp = import(&off).unwrap();
        assert!(imp.config.services[0].health.is_none());
        assert!(!imp.warnings.iter().any(|w| w.contains("runs although")));
        // A plain TCP service (nothing described) stays unchecked.
        let tcp = r#"{"services": {"db": {
            "discovery": {"method": "docker", "container_port": 5432, "image_name": "db"},
            "haproxy": {"port": 5432}}}}"#;
        assert!(import(tcp).unwrap().config.services[0].health.is_none());
    }
}
