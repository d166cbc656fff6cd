//! A timeout on collectives. A collective waits for every rank, so a rank that died or
//! hangs would leave the others waiting forever; the watchdog stops this process when one
//! collective has waited longer than the timeout, and the launcher then stops the rest.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The collective in progress (its name and start), shared with the watching thread.
type Busy = Arc<Mutex<Option<(&'static str, Instant)>>>;

pub struct Watchdog {
    busy: Busy,
}

/// Marks a collective as in progress until dropped.
pub struct Watch<'a>(&'a Watchdog);

impl Watchdog {
    /// Watches the collectives of rank `rank` with `timeout`.
    pub fn new(rank: usize, timeout: Duration) -> Self {
        let busy: Busy = Arc::default();
        let watched = Arc::downgrade(&busy);
        let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::spawn(move || {
            while let Some(busy) = watched.upgrade() {
                let stuck = busy.lock().expect("watchdog lock").filter(|(_, since)| since.elapsed() > timeout);
                drop(busy);
                if let Some((what, since)) = stuck {
                    tracing::error!(
                        "rank {rank}: the {what} has waited {:.0} s for the other ranks (the timeout is {:.0} s, {}): one of them has failed or hangs; stopping",
                        since.elapsed().as_secs_f64(),
                        timeout.as_secs_f64(),
                        crate::TIMEOUT_VAR
                    );
                    std::process::exit(3);
                }
                std::thread::sleep(tick);
            }
        });
        Self { busy }
    }

    /// Marks the collective `what` as in progress.
    pub fn watch(&self, what: &'static str) -> Watch<'_> {
        *self.busy.lock().expect("watchdog lock") = Some((what, Instant::now()));
        Watch(self)
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().expect("watchdog lock") = None;
    }
}
