//! Where log lines go and how they look: stderr, filtered by `RUST_LOG` (default `info`), as
//! text for people or JSON for log shippers (`berth run --log-format json`). Lines about a
//! change are logged inside spans (`service{..}`, `backend{..}`, `docker{..}`, `health{..}`,
//! `engine{..}`) so each carries its context.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL span{fields}: message`, for people.
    Text,
    /// One JSON object per line with the spans' fields, for log shippers.
    Json,
}

/// Installs the process's logger on stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi))
        .expect("the logger is installed once, first thing");
    // Dependencies that log through the `log` crate (bollard) land here too.
    let _ = tracing_log::LogTracer::init();
}

/// The subscriber `init` installs, writing to `writer` (tests capture it).
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => Box::new(fmt.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            fmt.json()
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::Protocol;

    /// Captures what the subscriber writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    /// Logs a backend change the way the reconciler does, through `format`.
    fn log_a_change(format: LogFormat, filter: &str) -> String {
        let out = Capture::default();
        let sub = subscriber(format, EnvFilter::new(filter), out.clone(), false);
        tracing::subscriber::with_default(sub, || {
            let _s = crate::reconciler::service_span(
                "web",
                Protocol::Tcp,
                "0.0.0.0:8080".parse().unwrap(),
            )
            .entered();
            let _b = tracing::info_span!("backend", addr = %"10.0.0.2:80").entered();
            tracing::info!("service web: backend 10.0.0.2:80 added (weight 1) (config)");
            tracing::debug!("not at info");
        });
        let text = out.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn text_lines_keep_the_message_and_carry_the_spans() {
        let out = log_a_change(LogFormat::Text, "info");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains(
                " INFO service{service=web listen=0.0.0.0:8080 protocol=tcp}:backend{addr=10.0.0.2:80}: \
                 service web: backend 10.0.0.2:80 added (weight 1) (config)"
            ),
            "{out}"
        );
        assert!(log_a_change(LogFormat::Text, "debug").contains("not at info"));
    }

    #[test]
    fn json_lines_carry_the_span_fields() {
        let out = log_a_change(LogFormat::Json, "info");
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(
            line["fields"]["message"],
            "service web: backend 10.0.0.2:80 added (weight 1) (config)"
        );
        assert_eq!(line["spans"][0]["name"], "service");
        assert_eq!(line["spans"][0]["service"], "web");
        assert_eq!(line["spans"][0]["protocol"], "tcp");
        assert_eq!(line["span"]["addr"], "10.0.0.2:80");
    }
}
