//! What the daemon shows the outside: the admin socket (`berth status`), the typed status it
//! answers with, and the Prometheus endpoint rendered from that same status.

pub mod admin;
pub mod metrics;
pub mod status;
