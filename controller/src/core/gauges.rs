//! Gauges: exporters by state, the queue, and how much of its longest lease each holder has
//! used, brought up to date after every batch.

use super::{now_ms, Core};
use crate::book::Millis;
use crate::store::LeaseStore;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct Gauges {
    /// Label sets of `jmp_lease_policy_used_ratio` exported now (removed when a lease ends).
    policy_series: BTreeSet<(String, String, String)>,
    policy_updated: Option<Instant>,
}

impl<S: LeaseStore> Core<S> {
    pub(super) fn update_gauges(&mut self) {
        let (mut online, mut disabled, mut cleaning) = (0, 0, 0);
        for (_, st) in self.book.exporters() {
            online += st.online as i64;
            disabled += (!st.enabled) as i64;
            cleaning += st.cleaning.is_some() as i64;
        }
        self.metrics
            .exporters
            .with_label_values(&["cleaning"])
            .set(cleaning);
        let now = now_ms();
        let oldest = self
            .book
            .waiting()
            .filter(|w| !w.reserved && w.not_before <= now)
            .map(|w| now.saturating_sub(w.not_before))
            .max()
            .unwrap_or(0);
        self.metrics.queue_oldest.set(oldest as f64 / 1000.0);
        self.update_policy_gauges(now);
        let leased = self.book.leases().count() as i64;
        let m = &self.metrics;
        m.exporters
            .with_label_values(&["registered"])
            .set(self.registry.exporters.len() as i64);
        m.exporters.with_label_values(&["online"]).set(online);
        m.exporters.with_label_values(&["leased"]).set(leased);
        m.exporters.with_label_values(&["disabled"]).set(disabled);
        m.leases_active.set(leased);
        m.queue_length.set(self.book.waiting().count() as i64);
    }

    /// `jmp_lease_policy_used_ratio` per leased exporter: at most every 5 s (it changes
    /// slowly, and a pass looks at every lease), and at once when the set of leases changed.
    fn update_policy_gauges(&mut self, now: Millis) {
        let due = self
            .gauges
            .policy_updated
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        let count = self.book.leases().count();
        if !due && count == self.gauges.policy_series.len() {
            return;
        }
        self.gauges.policy_updated = Some(Instant::now());
        let mut seen = BTreeSet::new();
        for l in self.book.leases() {
            // A holder whose policy cannot be read has no share to show.
            let Ok(max) = self
                .registry
                .client_policy(&l.client, self.default_max_secs)
                .map(|p| p.max_secs)
            else {
                continue;
            };
            let team = self.registry.team(&l.client);
            let used = now.saturating_sub(l.begin) as f64 / (max.max(1) as f64 * 1000.0);
            self.metrics
                .policy_used
                .with_label_values(&[&l.exporter, &l.client, &team])
                .set(used);
            seen.insert((l.exporter.clone(), l.client.clone(), team));
        }
        for gone in self.gauges.policy_series.difference(&seen) {
            let _ = self
                .metrics
                .policy_used
                .remove_label_values(&[&gone.0, &gone.1, &gone.2]);
        }
        self.gauges.policy_series = seen;
    }
}
