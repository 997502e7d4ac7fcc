//! A service's active health check, as configured: what to check, how often, and when a
//! backend's state flips. Running the checks is [`crate::health`]'s job.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// What a health check does, as configured per service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `"tcp"` (connect) or `"http"` (GET `path`).
    #[serde(rename = "type")]
    pub kind: CheckKind,
    #[serde(default = "default_path")]
    pub path: String,
    /// Expected HTTP status (default: any 2xx or 3xx).
    pub expect_status: Option<u16>,
    /// A string the HTTP body must contain.
    pub expect_string: Option<String>,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Whether a new backend takes traffic before its first passing check (default: no).
    #[serde(default)]
    pub start_healthy: bool,
}

fn default_path() -> String {
    "/".into()
}
fn default_interval() -> u64 {
    2000
}
fn default_timeout() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
}

impl HealthConfig {
    /// Checks the values; `at` is the config path of this table for error messages.
    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let err = |f: &str, m: String| ConfigError {
            field: format!("{at}.{f}"),
            message: m,
        };
        if !(10..=3_600_000).contains(&self.interval_ms) {
            return Err(err("interval_ms", "must be between 10 and 3600000".into()));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(err(
                "timeout_ms",
                format!("must be between 1 and interval_ms ({})", self.interval_ms),
            ));
        }
        for (f, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return Err(err(f, "must be between 1 and 100".into()));
            }
        }
        if self.kind == CheckKind::Tcp
            && (self.expect_status.is_some() || self.expect_string.is_some())
        {
            return Err(err(
                "type",
                "expect_status/expect_string need type = \"http\"".into(),
            ));
        }
        if !self.path.starts_with('/') || self.path.contains([' ', '\r', '\n']) {
            return Err(err(
                "path",
                format!("{:?} must be an absolute path", self.path),
            ));
        }
        if let Some(s) = self.expect_status
            && !(100..=599).contains(&s)
        {
            return Err(err("expect_status", format!("{s} is not an HTTP status")));
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
