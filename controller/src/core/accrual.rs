//! Usage: leased time into `jmp_leased_seconds_total` while leases last, each ended lease into
//! the usage history (in the same commit as its end), and the usage report.

use super::Core;
use crate::book::{EndReason, Lease, Millis};
use crate::store::{LeaseStore, Op};
use jmp_protocol::api::Reply;
use std::collections::HashMap;
use tracing::error;

/// How often the leased-seconds counter catches up with the live leases.
pub const ACCRUE_EVERY: Millis = 15_000;

pub(super) struct Accrual {
    /// Ended leases, for usage reports.
    pub history: crate::usage::History,
    /// Store writes of the history (new records, pruned ones) for the next commit.
    pub ops: Vec<Op>,
    /// Per live lease: up to when its time is in `jmp_leased_seconds_total`.
    accrued: HashMap<String, Millis>,
    /// When [`Core::accrue`] last walked the live leases.
    accrued_at: Millis,
}

impl Accrual {
    pub fn new(history: crate::usage::History) -> Accrual {
        Accrual {
            history,
            ops: Vec::new(),
            accrued: HashMap::new(),
            accrued_at: 0,
        }
    }

    /// Leases held across a restart: this process counts them from `now` (the previous
    /// process's counter had the time before; Prometheus sees the reset).
    pub fn start_counting<'a>(&mut self, leases: impl Iterator<Item = &'a Lease>, now: Millis) {
        for l in leases {
            self.accrued.insert(l.name.clone(), now);
        }
    }

    /// While leases are held the leased-seconds counter keeps up with them.
    pub fn next_accrual(&self) -> Option<Millis> {
        (!self.accrued.is_empty()).then(|| super::now_ms() + ACCRUE_EVERY)
    }

    /// Drops history older than the retention (the deletes go into the next commit).
    pub fn prune(&mut self, now: Millis) {
        let pruned = self.history.prune(now);
        self.ops.extend(pruned);
    }
}

impl<S: LeaseStore> Core<S> {
    /// Brings `jmp_leased_seconds_total` up to `now` for every live lease, at most every
    /// [`ACCRUE_EVERY`] (a burst's many batches do not each walk every lease).
    pub(super) fn accrue(&mut self, now: Millis) {
        if now < self.usage.accrued_at.saturating_add(ACCRUE_EVERY) {
            return;
        }
        self.usage.accrued_at = now;
        let live: Vec<Lease> = self.book.leases().cloned().collect();
        for l in &live {
            self.accrue_lease(l, now);
        }
    }

    /// Adds `l`'s time not counted yet, up to `now` (or its end), to the leased-seconds counter.
    fn accrue_lease(&mut self, l: &Lease, now: Millis) {
        let from = self
            .usage
            .accrued
            .get(&l.name)
            .copied()
            .unwrap_or(l.begin)
            .max(l.begin);
        let to = now.min(l.end);
        if to > from {
            self.metrics
                .leased_seconds
                .with_label_values(&[&self.registry.team(&l.client), &l.exporter])
                .inc_by((to - from) as f64 / 1000.0);
            self.usage.accrued.insert(l.name.clone(), to);
        }
    }

    /// `lease` ended: the rest of its time into the counter, then into the history.
    pub(super) fn lease_ended_accrual(&mut self, now: Millis, lease: &Lease, reason: &EndReason) {
        let team = self.registry.team(&lease.client);
        let held = now.min(lease.end).saturating_sub(lease.begin) as f64 / 1000.0;
        self.accrue_lease(lease, now);
        self.usage.accrued.remove(&lease.name);
        match self.usage.history.ended(now, lease, reason, team.clone()) {
            Ok(op) => self.usage.ops.push(op),
            Err(e) => {
                error!(lease = %lease.name, "cannot record the lease's usage: {e:#}")
            }
        }
        self.metrics
            .held
            .with_label_values(&[reason.as_str(), &team])
            .observe(held);
    }

    pub(super) fn usage_report(&self, now: Millis, q: &jmp_protocol::usage::UsageQuery) -> Reply {
        let live: Vec<(&Lease, String)> = self
            .book
            .leases()
            .map(|l| (l, self.registry.team(&l.client)))
            .collect();
        Reply::Usage(self.usage.history.report(now, q, live.into_iter()))
    }
}
