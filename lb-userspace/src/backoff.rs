//! The pause between reconnects that every watcher of an outside service shares (Docker
//! Engines, etcd, `berth publish`): 100 ms, doubling up to 2 s, and back to 100 ms after a
//! connection that lasted.

use std::time::Duration;

use tokio::sync::watch;

const FIRST: Duration = Duration::from_millis(100);
const MOST: Duration = Duration::from_secs(2);
/// A connection that lasted this long was a success: the next failure starts from `FIRST`.
const LASTED: Duration = Duration::from_secs(10);

pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Backoff {
    /// A connection ended after `lasted`; one that lasted long enough resets the pause.
    pub fn ended_after(&mut self, lasted: Duration) {
        if lasted > LASTED {
            self.next = FIRST;
        }
    }

    /// Connected: the next failure waits the shortest pause again.
    pub fn reset(&mut self) {
        self.next = FIRST;
    }

    /// Sleeps the current pause, then doubles it.
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(MOST);
    }

    /// As [`Backoff::sleep`], unless `stop` changes first: then false.
    pub async fn sleep_or_stop(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            () = self.sleep() => true,
            _ = stop.changed() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_to_two_seconds_and_resets_after_a_lasting_connection() {
        let mut b = Backoff::default();
        let mut waited = Vec::new();
        for _ in 0..6 {
            let t = tokio::time::Instant::now();
            b.sleep().await;
            waited.push(t.elapsed().as_millis());
        }
        assert_eq!(waited, [100, 200, 400, 800, 1600, 2000]);
        b.ended_after(Duration::from_secs(3));
        assert_eq!(b.next, MOST, "a short connection keeps the pause");
        b.ended_after(Duration::from_secs(11));
        assert_eq!(b.next, FIRST);
        let (tx, mut rx) = watch::channel(false);
        tx.send(true).unwrap();
        assert!(!b.sleep_or_stop(&mut rx).await);
    }
}
