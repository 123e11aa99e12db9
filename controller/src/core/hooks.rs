//! Lease hooks and cleaning: an exporter's failed beforeLease hook may end its lease (the hook's
//! output becomes the reason the client reads); after each lease an exporter that declared a
//! cleanup is not granted again until it reports its afterLease hook done (or overdue).

use super::{err, fmt_secs, Caller, Core};
use crate::book::{EndReason, Event, Lease, Millis};
use crate::store::{LeaseStore, Table};
use jmp_protocol::api::{CtlErrorCode, HookPhase, HookReport, Reply};
use jmp_protocol::token::TokenKind;
use tracing::{info, warn};

impl<S: LeaseStore> Core<S> {
    /// What an exporter declares at registration: how long it cleans up after each lease
    /// (`None`: it does not), and the lease whose cleanup it still owes (it restarted, or was
    /// cut off, before running it). An owed cleanup is held before the exporter comes online,
    /// so nobody is granted it first.
    pub(super) fn declare_cleanup(
        &mut self,
        now: Millis,
        name: &str,
        cleanup_secs: Option<u64>,
        owed: Option<String>,
    ) -> Vec<Event> {
        let cleanup = cleanup_secs.map(|s| s.saturating_mul(1000));
        self.book.set_cleanup(name, cleanup);
        let (Some(owed), Some(d)) = (owed, cleanup) else {
            return Vec::new();
        };
        let current = self.book.lease_of_exporter(name).map(|l| l.name.clone());
        let cleaning = self.book.exporter(name).and_then(|e| e.cleaning.clone());
        if current.as_deref() == Some(owed.as_str()) || cleaning.is_some() {
            return Vec::new();
        }
        info!(exporter = %name, lease = %owed, "exporter still owes its cleanup after a lease; not granted until done");
        self.book
            .set_cleaning(now, name, Some((now.saturating_add(d), owed)))
    }

    pub(super) fn cleanup_overdue(&mut self, exporter: &str, lease: &str) {
        warn!(exporter = %exporter, lease = %lease, "the exporter did not report its cleanup after the lease within its declared time; it may be leased again");
        self.links.push.insert(exporter.to_string());
    }

    /// What the exporter tells the client about why `lease` ended.
    pub(super) fn end_reason_text(&mut self, lease: &Lease, reason: &EndReason) -> String {
        if let Some(why) = self.hook_failures.remove(&lease.name) {
            return format!("lease {} ended: {why}", lease.name);
        }
        match reason {
            EndReason::Expired if lease.auto_extend.is_some_and(|a| a.hard_end <= lease.end) => {
                format!(
                    "lease {} reached its hard limit ({} after its begin)",
                    lease.name,
                    fmt_secs(lease.end.saturating_sub(lease.begin) / 1000)
                )
            }
            EndReason::Expired => format!("lease {} expired", lease.name),
            EndReason::Idle => format!(
                "lease {} ended: nothing used it for {} (its idle timeout)",
                lease.name,
                fmt_secs(lease.idle_timeout.unwrap_or(0).div_ceil(1000))
            ),
            EndReason::Released => format!("lease {} was released", lease.name),
            EndReason::PolicyChanged => {
                let allow = self
                    .registry
                    .clients
                    .get(&lease.client)
                    .map(|c| c.allow.text().to_string())
                    .unwrap_or_default();
                format!(
                    "lease {} ended: the policy of client {} no longer allows exporter {} (it allows '{allow}')",
                    lease.name, lease.client, lease.exporter
                )
            }
            other => format!("lease {} ended: {}", lease.name, other.as_str()),
        }
    }

    /// An exporter reports a lease hook: a failed beforeLease may end its lease; a finished
    /// afterLease ends the cleanup, so the exporter may be granted again.
    pub(super) fn lease_hook(&mut self, now: Millis, caller: &Caller, r: HookReport) -> Reply {
        if caller.kind != TokenKind::Exporter {
            return err(CtlErrorCode::Forbidden, "only exporters report lease hooks");
        }
        let name = caller.name.clone();
        let output = r.output.trim();
        match r.phase {
            HookPhase::Before => {
                let current = self.book.lease_of_exporter(&name).map(|l| l.name.clone());
                if r.ok || current.as_deref() != Some(r.lease.as_str()) {
                    return Reply::Done;
                }
                warn!(exporter = %name, lease = %r.lease, end = r.end_lease, "beforeLease hook failed: {output}");
                if r.end_lease {
                    self.hook_failures.insert(
                        r.lease.clone(),
                        format!("beforeLease hook failed: {output}"),
                    );
                    let ev = self.book.release(now, &r.lease);
                    self.on_events(now, ev);
                }
                Reply::Done
            }
            HookPhase::After => {
                let cleaning = self.book.exporter(&name).and_then(|e| e.cleaning.clone());
                if !matches!(&cleaning, Some((_, l)) if *l == r.lease) {
                    return Reply::Done;
                }
                if r.ok {
                    info!(exporter = %name, lease = %r.lease, "cleaned up after the lease");
                } else {
                    warn!(exporter = %name, lease = %r.lease, disable = r.disable, "afterLease hook failed: {output}");
                }
                if !r.ok && r.disable {
                    if let Some(rec) = self.registry.exporters.get_mut(&name) {
                        rec.enabled = false;
                        let labels = rec.effective_labels();
                        self.persist.dirty.insert((Table::Exporters, name.clone()));
                        let ev = self.book.upsert_exporter(now, &name, labels, false);
                        self.on_events(now, ev);
                    }
                }
                let ev = self.book.set_cleaning(now, &name, None);
                self.on_events(now, ev);
                self.links.push.insert(name);
                Reply::Done
            }
        }
    }
}
