//! Counters of things dropped on purpose (a packet outside the subnets, a datagram too large
//! for the path, a frame a slow reader did not take), logged sparingly.

use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

/// One reason for dropping packets, counted. Logged at the 1st, 10th, 100th, ... drop so that
/// a flood does not flood the log.
pub struct Drops {
    what: &'static str,
    n: AtomicU64,
}

impl Drops {
    pub const fn new(what: &'static str) -> Self {
        Drops {
            what,
            n: AtomicU64::new(0),
        }
    }

    pub fn hit(&self, device: &str, detail: impl std::fmt::Display) {
        let n = self.n.fetch_add(1, Ordering::Relaxed) + 1;
        if is_power_of_ten(n) {
            warn!("{device}: {}: {detail} (dropped; {n} so far)", self.what);
        } else {
            debug!("{device}: dropped a packet: {}: {detail}", self.what);
        }
    }

    pub fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_logged_at_powers_of_ten() {
        let hits: Vec<u64> = (1..=1000).filter(|n| is_power_of_ten(*n)).collect();
        assert_eq!(hits, vec![1, 10, 100, 1000]);
    }
}
