//! The `berth.*` container labels: a container that carries `berth.port` forms a service of its
//! own (when label services are on), with its protocol, weight, network and health check.

use std::collections::BTreeMap;

use crate::config::Protocol;

/// Labels of the label-driven services.
pub const LABEL_PORT: &str = "berth.port";
pub const LABEL_TARGET_PORT: &str = "berth.target-port";
pub const LABEL_PROTOCOL: &str = "berth.protocol";
pub const LABEL_WEIGHT: &str = "berth.weight";
pub const LABEL_SERVICE: &str = "berth.service";
pub const LABEL_NETWORK: &str = "berth.network";
/// `tcp` or `http`: berth checks the container itself (see [`crate::health`]).
pub const LABEL_HEALTH: &str = "berth.health";
pub const LABEL_HEALTH_PATH: &str = "berth.health.path";
pub const LABEL_HEALTH_EXPECT_STATUS: &str = "berth.health.expect-status";
pub const LABEL_HEALTH_EXPECT_STRING: &str = "berth.health.expect-string";
pub const LABEL_HEALTH_INTERVAL: &str = "berth.health.interval-ms";
pub const LABEL_HEALTH_RISE: &str = "berth.health.rise";
pub const LABEL_HEALTH_FALL: &str = "berth.health.fall";

/// A container's label-driven service request, or why its labels were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelService {
    pub service: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    pub weight: u32,
    pub network: Option<String>,
    pub health: Option<crate::config::HealthConfig>,
}

/// Reads the `berth.*` labels. `Ok(None)`: the container does not ask for a service.
pub fn parse_labels(labels: &BTreeMap<String, String>) -> Result<Option<LabelService>, String> {
    let Some(port) = labels.get(LABEL_PORT) else {
        return Ok(None);
    };
    let num = |key: &str, v: &str| -> Result<u16, String> {
        match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("label {key}={v:?} is not a port (1-65535)")),
        }
    };
    let port = num(LABEL_PORT, port)?;
    let target_port = match labels.get(LABEL_TARGET_PORT) {
        Some(v) => num(LABEL_TARGET_PORT, v)?,
        None => port,
    };
    let protocol = match labels.get(LABEL_PROTOCOL).map(|s| s.trim()) {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(v) => return Err(format!("label {LABEL_PROTOCOL}={v:?} is not tcp or udp")),
    };
    let weight = match labels.get(LABEL_WEIGHT) {
        None => 1,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(w) if w <= crate::config::MAX_WEIGHT => w,
            _ => {
                return Err(format!(
                    "label {LABEL_WEIGHT}={v:?} is not a weight (0-{})",
                    crate::config::MAX_WEIGHT
                ));
            }
        },
    };
    let service = match labels.get(LABEL_SERVICE) {
        Some(s)
            if !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            s.clone()
        }
        Some(s) => {
            return Err(format!(
                "label {LABEL_SERVICE}={s:?} must be 1-64 characters of [A-Za-z0-9-_.]"
            ));
        }
        None => format!("{protocol}-{port}"),
    };
    Ok(Some(LabelService {
        service,
        port,
        target_port,
        protocol,
        weight,
        network: labels.get(LABEL_NETWORK).cloned(),
        health: parse_health_labels(labels)?,
    }))
}

/// The `berth.health*` labels as a health check (None without `berth.health`).
fn parse_health_labels(
    labels: &BTreeMap<String, String>,
) -> Result<Option<crate::config::HealthConfig>, String> {
    use crate::config::{CheckKind, HealthConfig};
    let kind = match labels.get(LABEL_HEALTH).map(|s| s.trim()) {
        None => return Ok(None),
        Some("tcp") => CheckKind::Tcp,
        Some("http") => CheckKind::Http,
        Some(v) => return Err(format!("label {LABEL_HEALTH}={v:?} is not tcp or http")),
    };
    fn num<T: std::str::FromStr>(
        labels: &BTreeMap<String, String>,
        key: &str,
    ) -> Result<Option<T>, String> {
        labels
            .get(key)
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|_| format!("label {key}={v:?} is not a number"))
            })
            .transpose()
    }
    let interval_ms = num(labels, LABEL_HEALTH_INTERVAL)?.unwrap_or(2000);
    let h = HealthConfig {
        kind,
        path: labels
            .get(LABEL_HEALTH_PATH)
            .cloned()
            .unwrap_or_else(|| "/".into()),
        expect_status: num(labels, LABEL_HEALTH_EXPECT_STATUS)?,
        expect_string: labels.get(LABEL_HEALTH_EXPECT_STRING).cloned(),
        interval_ms,
        timeout_ms: interval_ms.min(1000),
        rise: num(labels, LABEL_HEALTH_RISE)?.unwrap_or(2),
        fall: num(labels, LABEL_HEALTH_FALL)?.unwrap_or(3),
        start_healthy: false,
    };
    h.validate("labels").map_err(|e| {
        let label = match e.field.as_str() {
            "labels.path" => LABEL_HEALTH_PATH,
            "labels.expect_status" => LABEL_HEALTH_EXPECT_STATUS,
            "labels.interval_ms" | "labels.timeout_ms" => LABEL_HEALTH_INTERVAL,
            "labels.rise" => LABEL_HEALTH_RISE,
            "labels.fall" => LABEL_HEALTH_FALL,
            _ => LABEL_HEALTH,
        };
        format!("label {label}: {}", e.message)
    })?;
    Ok(Some(h))
}
