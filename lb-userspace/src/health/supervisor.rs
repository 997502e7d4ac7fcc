//! The checks over time: a task per (service, backend) that counts rise/fall and reports each
//! flip, and the [`Supervisor`] that owns the tasks and filters unhealthy backends out.

use std::net::SocketAddr;

use tokio::sync::mpsc;

use super::{Checker, Failure, HealthConfig};

/// A backend's health as HAProxy counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl HealthState {
    pub fn new(start_healthy: bool) -> Self {
        Self {
            healthy: start_healthy,
            streak: 0,
        }
    }

    /// Records one result; returns true when the state flipped.
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> bool {
        if passed == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if passed { rise } else { fall };
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            return true;
        }
        false
    }
}

/// A state change, sent to the reconciler's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub service: String,
    pub backend: SocketAddr,
    pub healthy: bool,
    /// The failure that made it unhealthy (None when it became healthy).
    pub reason: Option<Failure>,
    /// Which check task reported it: one replaced meanwhile (by a reload, or for a new
    /// container run at the address) may have sent it before it stopped, and it no longer
    /// counts.
    pub check: u64,
}

/// Checks one backend every `interval` until the receiver is gone or `stop` fires, reporting
/// each state change. A slow backend only delays its own task.
pub async fn watch<C: Checker>(
    checker: std::sync::Arc<C>,
    service: String,
    backend: SocketAddr,
    cfg: HealthConfig,
    check: u64,
    tx: mpsc::Sender<HealthChange>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut state = HealthState::new(cfg.start_healthy);
    let mut tick = tokio::time::interval(cfg.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let result = checker.check(backend, &cfg).await;
        if state.record(result.is_ok(), cfg.rise, cfg.fall) {
            let change = HealthChange {
                service: service.clone(),
                backend,
                healthy: state.healthy,
                reason: result.err(),
                check,
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// What a check task watches: its settings and the container run behind the backend.
type Watched = (HealthConfig, Option<crate::config::Instance>);

struct Task {
    watched: Watched,
    id: u64,
    stop: tokio::sync::watch::Sender<bool>,
}

/// Owns one check task per (service, backend) with a health check, and the resulting states.
/// The desired set handed to the reconciler is the configured one minus unhealthy backends.
pub struct Supervisor<C: Checker> {
    checker: std::sync::Arc<C>,
    tx: mpsc::Sender<HealthChange>,
    /// Each check with its settings and the container run it checks (a new run at the same
    /// address starts a new check).
    tasks: std::collections::HashMap<(String, SocketAddr), Task>,
    /// The id the next check task gets.
    next_check: u64,
    healthy: std::collections::HashMap<(String, SocketAddr), bool>,
    /// (service address, protocol, backend) whose check starts from healthy whatever the
    /// config says: backends adopted from a running dataplane.
    presumed: std::collections::HashSet<(SocketAddr, crate::config::Protocol, SocketAddr)>,
}

impl<C: Checker> Supervisor<C> {
    pub fn new(checker: C, tx: mpsc::Sender<HealthChange>) -> Self {
        Self {
            checker: std::sync::Arc::new(checker),
            tx,
            tasks: Default::default(),
            next_check: 0,
            healthy: Default::default(),
            presumed: Default::default(),
        }
    }

    /// Backends whose checks, when they start, start from healthy (they were serving a moment
    /// ago, under an earlier berth): a restart does not take them out until a check fails.
    pub fn presume_healthy(
        &mut self,
        backends: impl IntoIterator<Item = (SocketAddr, crate::config::Protocol, SocketAddr)>,
    ) {
        self.presumed.extend(backends);
    }

    /// Starts checks for new backends (or changed check settings, or another container run at
    /// a backend's address) and stops those of backends that are gone. Must run inside a tokio
    /// runtime.
    pub fn sync(&mut self, services: &[crate::config::Service]) {
        let mut wanted: std::collections::HashMap<_, Watched> = std::collections::HashMap::new();
        let mut start_healthy = std::collections::HashSet::new();
        for s in services {
            if let Some(h) = &s.health {
                for b in &s.backends {
                    let instance = s.instances.get(&b.addr).copied();
                    wanted.insert((s.name.clone(), b.addr), (h.clone(), instance));
                    if self.presumed.remove(&(s.listen, s.protocol, b.addr)) {
                        start_healthy.insert((s.name.clone(), b.addr));
                    }
                }
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.watched);
            if !keep {
                let _ = task.stop.send(true);
                self.healthy.remove(key);
            }
            keep
        });
        for (key, watched) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut task_cfg = watched.0.clone();
            task_cfg.start_healthy |= start_healthy.contains(&key);
            self.healthy.insert(key.clone(), task_cfg.start_healthy);
            let id = self.next_check;
            self.next_check += 1;
            tokio::spawn(watch(
                self.checker.clone(),
                key.0.clone(),
                key.1,
                task_cfg,
                id,
                self.tx.clone(),
                stop_rx,
            ));
            self.tasks.insert(
                key,
                Task {
                    watched,
                    id,
                    stop: stop_tx,
                },
            );
        }
    }

    /// Records a change; returns false if it concerns a check that no longer exists.
    pub fn record(&mut self, change: &HealthChange) -> bool {
        let key = (change.service.clone(), change.backend);
        if self.tasks.get(&key).map(|t| t.id) != Some(change.check) {
            return false;
        }
        match self.healthy.get_mut(&key) {
            Some(h) => {
                *h = change.healthy;
                true
            }
            None => false,
        }
    }

    /// A backend's health: None when it has no check.
    pub fn state(&self, service: &str, backend: SocketAddr) -> Option<bool> {
        self.healthy.get(&(service.to_owned(), backend)).copied()
    }

    /// `services` without the backends whose check says unhealthy.
    pub fn filter(&self, services: &[crate::config::Service]) -> Vec<crate::config::Service> {
        services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                let name = s.name.clone();
                s.backends.retain(|b| {
                    self.healthy
                        .get(&(name.clone(), b.addr))
                        .copied()
                        .unwrap_or(true)
                });
                s
            })
            .collect()
    }

    /// Stops every check.
    pub fn stop(&mut self) {
        for (_, task) in self.tasks.drain() {
            let _ = task.stop.send(true);
        }
    }
}
