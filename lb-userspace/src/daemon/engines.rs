//! What the daemon knows of each Docker Engine between events (connected, where its containers
//! are reached, when it last answered, whether its grace ran out), and the grace policy: an
//! engine unreachable for longer than `[docker] grace_secs` is *lost*; its containers then back
//! only services whose health checks judge them (see [`EngineView::lost`]). `berth publish`
//! judges its engines by the same policy (`publish::Ledger`: a lost engine's entries are
//! withdrawn). Pure: time is handed in.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::discovery::{EngineView, Reach};

/// One engine's state.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineState {
    /// As Docker spells it (`unix:///...`, `tcp://HOST:PORT`).
    pub endpoint: String,
    /// Where its containers are reached, from its last connection (None: never connected).
    pub reach: Option<Reach>,
    pub connected: bool,
    /// Since when it has not answered (the daemon's start for one never reached).
    pub unreachable_since: Option<Instant>,
    /// Unreachable for longer than the grace.
    pub lost: bool,
    /// Docker's timestamp of the last container event it sent (ns since the epoch).
    pub last_event_ns: Option<i64>,
    /// Why it was last lost.
    pub error: Option<String>,
    /// It sent at least one full listing.
    pub listed: bool,
}

/// Every engine, by name.
#[derive(Debug, Clone)]
pub struct Engines {
    map: BTreeMap<String, EngineState>,
    grace: Duration,
}

impl Engines {
    /// The engines (name, endpoint) as at start: none has answered yet.
    pub fn new(
        engines: impl IntoIterator<Item = (String, String)>,
        grace: Duration,
        now: Instant,
    ) -> Self {
        let map = engines
            .into_iter()
            .map(|(name, endpoint)| {
                (
                    name,
                    EngineState {
                        endpoint,
                        reach: None,
                        connected: false,
                        unreachable_since: Some(now),
                        lost: false,
                        last_event_ns: None,
                        error: None,
                        listed: false,
                    },
                )
            })
            .collect();
        Self { map, grace }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    pub fn get(&self, name: &str) -> Option<&EngineState> {
        self.map.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &EngineState)> {
        self.map.iter()
    }

    /// Its full listing arrived: connected, reached as `reach`, no longer lost. Returns
    /// whether it had been lost (its backends come back).
    pub fn connected(&mut self, name: &str, reach: Reach) -> bool {
        let Some(e) = self.map.get_mut(name) else {
            return false;
        };
        let was_lost = e.lost;
        e.reach = Some(reach);
        e.connected = true;
        e.unreachable_since = None;
        e.lost = false;
        e.listed = true;
        was_lost
    }

    /// It stopped answering; it last did at `last_contact`.
    pub fn disconnected(&mut self, name: &str, error: String, last_contact: Instant) {
        if let Some(e) = self.map.get_mut(name) {
            e.connected = false;
            e.error = Some(error);
            // An engine never reached stays unreachable since the start.
            if e.unreachable_since.is_none() {
                e.unreachable_since = Some(last_contact);
            }
        }
    }

    /// A container event with Docker's timestamp.
    pub fn event(&mut self, name: &str, time_ns: Option<i64>) {
        if let (Some(e), Some(t)) = (self.map.get_mut(name), time_ns) {
            e.last_event_ns = Some(t);
        }
    }

    /// The engines whose grace ran out by `now` (each reported once per loss), now lost.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let grace = self.grace;
        self.map
            .iter_mut()
            .filter(|(_, e)| {
                !e.lost
                    && !e.connected
                    && e.unreachable_since
                        .is_some_and(|t| now.saturating_duration_since(t) > grace)
            })
            .map(|(name, e)| {
                e.lost = true;
                name.clone()
            })
            .collect()
    }

    /// Whether every engine has listed its containers or been judged lost: what an adopted
    /// dataplane waits for before it is rewritten.
    pub fn settled(&self) -> bool {
        self.map.values().all(|e| e.listed || e.lost)
    }

    /// What the selection needs of each engine that has answered at least once.
    pub fn views(&self) -> BTreeMap<String, EngineView> {
        self.map
            .iter()
            .filter_map(|(name, e)| {
                Some((
                    name.clone(),
                    EngineView {
                        reach: e.reach?,
                        lost: e.lost,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn remote() -> Reach {
        Reach {
            address: Some(Ipv4Addr::new(10, 42, 2, 2)),
            local: false,
        }
    }

    #[test]
    fn an_engine_is_lost_once_its_grace_runs_out_and_back_at_its_next_listing() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut e = Engines::new(
            [
                ("a".to_owned(), "unix:///a.sock".to_owned()),
                ("b".to_owned(), "tcp://10.42.2.2:2375".to_owned()),
            ],
            Duration::from_secs(5),
            t0,
        );
        assert!(!e.settled());
        assert!(e.views().is_empty(), "nothing known before a listing");
        e.connected(
            "a",
            Reach {
                address: None,
                local: true,
            },
        );
        e.connected("b", remote());
        assert!(e.settled());
        assert_eq!(e.expire(s(100)), Vec::<String>::new());
        // b answered last at 10 s: lost after 15 s, reported once.
        e.disconnected("b", "ping timed out".into(), s(10));
        assert_eq!(e.expire(s(15)), Vec::<String>::new());
        assert_eq!(e.expire(s(16)), ["b"]);
        assert_eq!(e.expire(s(17)), Vec::<String>::new());
        assert!(e.views()["b"].lost && !e.views()["a"].lost);
        // A later failure to reconnect does not move the time it was last reached.
        e.disconnected("b", "connection refused".into(), s(16));
        assert_eq!(e.get("b").unwrap().unreachable_since, Some(s(10)));
        // Back: its listing makes it whole again.
        assert!(e.connected("b", remote()));
        assert!(!e.views()["b"].lost);
        e.disconnected("b", "event stream ended".into(), s(30));
        assert_eq!(e.expire(s(36)), ["b"]);
    }

    #[test]
    fn an_engine_never_reached_is_lost_a_grace_after_the_start() {
        let t0 = Instant::now();
        let mut e = Engines::new(
            [("b".to_owned(), "tcp://10.42.2.2:2375".to_owned())],
            Duration::from_secs(5),
            t0,
        );
        e.disconnected("b", "no route to host".into(), t0 + Duration::from_secs(3));
        assert_eq!(e.get("b").unwrap().unreachable_since, Some(t0));
        assert!(e.expire(t0 + Duration::from_secs(5)).is_empty());
        assert!(!e.settled());
        assert_eq!(e.expire(t0 + Duration::from_secs(6)), ["b"]);
        assert!(
            e.settled(),
            "a lost engine no longer holds an adopted dataplane"
        );
        e.event("b", Some(7));
        assert_eq!(e.get("b").unwrap().last_event_ns, Some(7));
    }
}
