//! Loading and validation: TOML text -> [`Config`] -> the services to serve, each rejection
//! naming its field.

use super::*;

impl Config {
    /// The Docker selectors by service name; a dual-stack service's selector serves its IPv6
    /// half `NAME.ipv6` too (with the containers' IPv6 addresses).
    pub fn selectors(&self) -> std::collections::HashMap<String, DockerSelector> {
        self.services
            .iter()
            .filter_map(|s| Some((s, s.docker.clone()?)))
            .flat_map(|(s, d)| {
                let twin = s
                    .listen6
                    .as_ref()
                    .map(|_| (format!("{}.ipv6", s.name), d.clone()));
                std::iter::once((s.name.clone(), d)).chain(twin)
            })
            .collect()
    }

    /// The etcd key prefixes by service name; a dual-stack service's prefix serves its IPv6
    /// half `NAME.ipv6` too (with the prefix's IPv6 entries, the IPv4 ones going to `NAME`).
    pub fn etcd_selectors(&self) -> std::collections::HashMap<String, String> {
        self.services
            .iter()
            .filter_map(|s| Some((s, s.etcd.as_ref()?.prefix.clone())))
            .flat_map(|(s, p)| {
                let twin = s
                    .listen6
                    .as_ref()
                    .map(|_| (format!("{}.ipv6", s.name), p.clone()));
                std::iter::once((s.name.clone(), p)).chain(twin)
            })
            .collect()
    }

    /// Whether any service takes backends from etcd.
    pub fn etcd_enabled(&self) -> bool {
        self.services.iter().any(|s| s.etcd.is_some())
    }

    /// Parses TOML text (no validation beyond the types).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let span = e
                .span()
                .map(|s| field_at(text, s.start.min(text.len())))
                .unwrap_or_else(|| "config".into());
            ConfigError::new(span, e.message().trim().to_owned())
        })
    }

    /// Parses and validates, returning the services in a form the reconciler takes.
    pub fn load(text: &str) -> Result<(Self, Vec<Service>), ConfigError> {
        let cfg = Self::parse(text)?;
        let services = cfg.validate()?;
        Ok((cfg, services))
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<Vec<Service>, ConfigError> {
        let d = &self.dataplane;
        let m = d.maglev_table_size;
        if !is_prime(m) || !(7..=1_048_573).contains(&m) {
            return Err(ConfigError::new(
                "dataplane.maglev_table_size",
                format!("{m} must be a prime between 7 and 1048573 (e.g. 251, 4099, 65537)"),
            ));
        }
        if !(1..=4096).contains(&d.max_services) {
            return Err(ConfigError::new(
                "dataplane.max_services",
                "must be between 1 and 4096",
            ));
        }
        let slots = u64::from(d.max_services) * u64::from(m);
        if slots > 64 * 1024 * 1024 {
            return Err(ConfigError::new(
                "dataplane.max_services",
                format!(
                    "max_services x maglev_table_size = {slots} slots is more than 67108864 \
                     (256 MiB of table); lower one of them"
                ),
            ));
        }
        if !(2..=1_048_576).contains(&d.max_backends) {
            return Err(ConfigError::new(
                "dataplane.max_backends",
                "must be between 2 and 1048576",
            ));
        }
        if !(1024..=(1 << 26)).contains(&d.conntrack_size) {
            return Err(ConfigError::new(
                "dataplane.conntrack_size",
                "must be between 1024 and 67108864 entries",
            ));
        }
        for (name, v) in [
            (
                "dataplane.tcp_closing_timeout_secs",
                d.tcp_closing_timeout_secs,
            ),
            ("dataplane.tcp_idle_timeout_secs", d.tcp_idle_timeout_secs),
            ("dataplane.udp_idle_timeout_secs", d.udp_idle_timeout_secs),
            ("dataplane.drain_timeout_secs", d.drain_timeout_secs),
        ] {
            if v == 0 || v > 7 * 24 * 3600 {
                return Err(ConfigError::new(
                    name,
                    "must be between 1 and 604800 seconds",
                ));
            }
        }
        if d.snat_port_reuse_ms > d.tcp_closing_timeout_secs.saturating_mul(1000) {
            return Err(ConfigError::new(
                "dataplane.snat_port_reuse_ms",
                format!(
                    "must be at most tcp_closing_timeout_secs ({} s, {} ms): a closed flow's \
                     entries are gone after that anyway",
                    d.tcp_closing_timeout_secs,
                    d.tcp_closing_timeout_secs.saturating_mul(1000)
                ),
            ));
        }
        if d.xdp && !d.redirect {
            return Err(ConfigError::new(
                "dataplane.xdp",
                "needs dataplane.redirect = true: the XDP fast path sends packets on the route \
                 the TC program cached, which it only does when it redirects",
            ));
        }
        if !d.pin_path.starts_with('/') || d.pin_path.trim_end_matches('/').is_empty() {
            return Err(ConfigError::new(
                "dataplane.pin_path",
                format!(
                    "{:?} must be an absolute directory below a BPF filesystem (e.g. {})",
                    d.pin_path, DEFAULT_PIN_PATH
                ),
            ));
        }
        if Cgroup::parse(&d.cgroup).is_none() {
            return Err(ConfigError::new(
                "dataplane.cgroup",
                format!(
                    "{:?} must be \"auto\", \"none\" or an absolute cgroup v2 directory",
                    d.cgroup
                ),
            ));
        }
        if self.metrics.enabled && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new(
                "metrics.listen",
                format!("{:?} is not an ADDR:PORT", self.metrics.listen),
            ));
        }
        if !(1..=3600).contains(&self.metrics.refresh_interval_secs) {
            return Err(ConfigError::new(
                "metrics.refresh_interval_secs",
                format!(
                    "{} must be between 1 and 3600 seconds",
                    self.metrics.refresh_interval_secs
                ),
            ));
        }
        if !(100..=600_000).contains(&self.docker.readiness_timeout_ms) {
            return Err(ConfigError::new(
                "docker.readiness_timeout_ms",
                format!(
                    "{} must be between 100 and 600000 ms",
                    self.docker.readiness_timeout_ms
                ),
            ));
        }
        self.etcd.validate()?;
        self.publish.validate()?;
        if let Some(a) = d.snat_address
            && (a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback())
        {
            return Err(ConfigError::new(
                "dataplane.snat_address",
                format!("{a} cannot be the source of packets to other hosts"),
            ));
        }
        if let Some(a) = d.snat_address6
            && (a.is_unspecified() || a.is_multicast() || a.is_loopback())
        {
            return Err(ConfigError::new(
                "dataplane.snat_address6",
                format!("{a} cannot be the source of packets to other hosts"),
            ));
        }
        engine::configured(&self.docker.engines, self.docker.socket.as_deref())?;
        if !(1..=3600).contains(&self.docker.grace_secs) {
            return Err(ConfigError::new(
                "docker.grace_secs",
                format!(
                    "{} must be between 1 and 3600 seconds",
                    self.docker.grace_secs
                ),
            ));
        }
        let engine_names = self.docker.engine_names();
        for (i, iface) in d.interfaces.iter().enumerate() {
            if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ', '\0']) {
                return Err(ConfigError::new(
                    format!("dataplane.interfaces[{i}]"),
                    format!("{iface:?} is not a valid interface name"),
                ));
            }
        }

        // A dual-stack service takes two service entries (one per family).
        let entries =
            self.services.len() + self.services.iter().filter(|s| s.listen6.is_some()).count();
        if entries > d.max_services as usize {
            return Err(ConfigError::new(
                "service",
                format!(
                    "{entries} services configured (a dual-stack one counts twice) but \
                     dataplane.max_services is {}",
                    d.max_services
                ),
            ));
        }
        let mut names = BTreeSet::new();
        let mut listens = BTreeSet::new();
        let mut out = Vec::with_capacity(self.services.len());
        let mut total_backends = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let at = |f: &str| format!("service[{i}].{f}");
            if s.name.is_empty()
                || s.name.len() > 64
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::new(
                    at("name"),
                    format!("{:?} must be 1-64 characters of [A-Za-z0-9-_.]", s.name),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("duplicate service name {:?}", s.name),
                ));
            }
            let listen = listen_addr(&at("listen"), &s.listen)?;
            // A dual-stack service: `listen` IPv4, `listen6` IPv6.
            let listen6 = match &s.listen6 {
                None => None,
                Some(text) => {
                    let a = listen_addr(&at("listen6"), text)?;
                    if !a.is_ipv6() {
                        return Err(ConfigError::new(
                            at("listen6"),
                            format!("{text:?} is not an IPv6 [ADDR]:PORT"),
                        ));
                    }
                    if !listen.is_ipv4() {
                        return Err(ConfigError::new(
                            at("listen"),
                            format!(
                                "{:?} is IPv6, and listen6 is set: a dual-stack service's listen \
                                 is its IPv4 address",
                                s.listen
                            ),
                        ));
                    }
                    Some(a)
                }
            };
            for (field, l) in [("listen", Some(listen)), ("listen6", listen6)] {
                let Some(l) = l else { continue };
                if !listens.insert((l, s.protocol)) {
                    return Err(ConfigError::new(
                        at(field),
                        format!("{} {} is already served by another service", s.protocol, l),
                    ));
                }
            }
            if listen6.is_some() && !names.insert(format!("{}.ipv6", s.name)) {
                return Err(ConfigError::new(
                    at("name"),
                    format!(
                        "{:?}.ipv6 (its IPv6 half) is another service's name",
                        s.name
                    ),
                ));
            }
            // Full NAT's packets leave from this host's own address: handed to the stack at TC
            // ingress they are martians (a local source arriving from outside) and dropped, so
            // full NAT needs the program to route them itself.
            if s.mode == Some(Nat::Full) && !d.redirect {
                return Err(ConfigError::new(
                    at("mode"),
                    "\"fullnat\" needs dataplane.redirect = true (with redirect = false the \
                     stack drops full NAT's packets, whose source is this host's own address); \
                     set redirect = true or use mode = \"dnat\"",
                ));
            }
            let mut seen = BTreeSet::new();
            let mut backends = Vec::with_capacity(s.backends.len());
            for (j, b) in s.backends.iter().enumerate() {
                let addr = SocketAddr::from_str(&b.address).map_err(|_| {
                    ConfigError::new(
                        at(&format!("backends[{j}]")),
                        format!("{:?} is not an ADDR:PORT ([ADDR]:PORT for IPv6)", b.address),
                    )
                })?;
                if addr.is_ipv6() != listen.is_ipv6() && listen6.is_none() {
                    return Err(ConfigError::new(
                        at(&format!("backends[{j}]")),
                        format!(
                            "{addr} is {}, the service listens on {} ({listen}): a backend is of \
                             its service's family (add listen6 for a dual-stack service)",
                            family(addr),
                            family(listen)
                        ),
                    ));
                }
                if addr.ip().is_unspecified()
                    || addr.port() == 0
                    || addr.ip().is_multicast()
                    || matches!(addr.ip(), std::net::IpAddr::V4(ip) if ip.is_broadcast())
                {
                    return Err(ConfigError::new(
                        at(&format!("backends[{j}]")),
                        format!("{addr} is not a usable unicast address and port"),
                    ));
                }
                if b.weight > MAX_WEIGHT {
                    return Err(ConfigError::new(
                        at(&format!("backends[{j}].weight")),
                        format!("{} is above the maximum weight {MAX_WEIGHT}", b.weight),
                    ));
                }
                if !seen.insert(addr) {
                    return Err(ConfigError::new(
                        at(&format!("backends[{j}]")),
                        format!("duplicate backend {addr}"),
                    ));
                }
                backends.push(BackendSpec {
                    addr,
                    weight: b.weight,
                    nat: s.mode.unwrap_or(Nat::Dnat),
                });
            }
            if backends.len() as u64 >= u64::from(m) {
                return Err(ConfigError::new(
                    at("backends"),
                    format!(
                        "{} backends need a maglev_table_size above that (is {m})",
                        backends.len()
                    ),
                ));
            }
            if let Some(d) = &s.docker {
                if d.port == 0 {
                    return Err(ConfigError::new(
                        at("docker.port"),
                        "port 0 cannot be served",
                    ));
                }
                if d.image.is_none() && d.labels.is_empty() {
                    return Err(ConfigError::new(
                        at("docker"),
                        "name an image and/or labels, or every container would match",
                    ));
                }
                for (j, e) in d.engines.iter().enumerate() {
                    if !engine_names.contains(e) {
                        return Err(ConfigError::new(
                            at(&format!("docker.engines[{j}]")),
                            format!(
                                "no engine is named {e:?} (engines: {})",
                                engine_names.join(", ")
                            ),
                        ));
                    }
                }
            }
            if let Some(e) = &s.etcd {
                etcd::validate_prefix(&at("etcd.prefix"), &e.prefix)?;
            }
            if let Some(h) = &s.health {
                h.validate(&at("health"))?;
                if s.protocol == Protocol::Udp {
                    return Err(ConfigError::new(
                        at("health"),
                        "health checks are TCP or HTTP; a UDP service cannot have one",
                    ));
                }
            }
            total_backends += backends.len();
            let service = |name: String, listen: SocketAddr, backends: Vec<BackendSpec>| Service {
                name,
                listen,
                protocol: s.protocol,
                backends,
                health: s.health.clone(),
                instances: Default::default(),
                mode: s.mode,
            };
            match listen6 {
                None => out.push(service(s.name.clone(), listen, backends)),
                Some(l6) => {
                    let (b6, b4) = backends.into_iter().partition(|b| b.addr.is_ipv6());
                    out.push(service(s.name.clone(), listen, b4));
                    out.push(service(format!("{}.ipv6", s.name), l6, b6));
                }
            }
        }
        if total_backends >= d.max_backends as usize {
            return Err(ConfigError::new(
                "dataplane.max_backends",
                format!("{total_backends} backends configured; raise max_backends above that"),
            ));
        }
        Ok(out)
    }
}

/// A service address of either family (`0.0.0.0:80`, `[::]:80`, `[2001:db8::1]:443`).
fn listen_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let a = SocketAddr::from_str(text).map_err(|_| {
        ConfigError::new(
            field,
            format!("{text:?} is not an ADDR:PORT ([ADDR]:PORT for IPv6)"),
        )
    })?;
    if a.port() == 0 {
        return Err(ConfigError::new(field, "port 0 cannot be served"));
    }
    let bad = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.is_multicast() || ip.is_broadcast(),
        std::net::IpAddr::V6(ip) => ip.is_multicast() || ip.to_ipv4_mapped().is_some(),
    };
    if bad {
        return Err(ConfigError::new(
            field,
            "multicast/broadcast (or IPv4-mapped IPv6) addresses cannot be served",
        ));
    }
    Ok(a)
}

fn family(a: SocketAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}
