//! Exporters: registering (and the TLS fingerprint bound at the first registration), being
//! online while the registration stream is open, the pushes on that stream (the current
//! lease, the ends of leases, the cleanup owed), and the listing of exporters.

use super::{err, Caller, Core};
use crate::book::{Lease, Millis};
use crate::store::{LeaseStore, Table};
use jmp_protocol::api::{ActiveLease, CtlErrorCode, EndedLease, ExporterInfo, Registration, Reply};
use jmp_protocol::selector::Selector;
use jmp_protocol::token::TokenKind;
use std::collections::{BTreeSet, HashMap};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// An exporter's open registration stream.
pub(super) struct ExporterLink {
    pub tx: mpsc::UnboundedSender<Reply>,
    pub stream: u64,
}

/// The registered exporters' streams, and what is to be pushed on them after the commit.
#[derive(Default)]
pub(super) struct Links {
    pub links: HashMap<String, ExporterLink>,
    /// stream → exporter, for `Gone`.
    pub streams: HashMap<u64, String>,
    /// Exporters whose state changed: each gets a push after the commit.
    pub push: BTreeSet<String>,
    /// Leases that ended since the last push, per exporter, with why.
    pub ended: HashMap<String, Vec<EndedLease>>,
    /// Per live lease, the latest expiry of a lease token issued for it by this process
    /// (Unix seconds): a token issued before its lease was shortened outlives the lease's end.
    tokens_until: HashMap<String, u64>,
    /// Online exporters that do not report their sessions (older jmpd): their leases count
    /// as attached, since nothing would say when they are used.
    pub silent: BTreeSet<String>,
    /// Online exporters that admit share tokens as guests ([`Registration::admits_shares`]):
    /// only their leases are shared.
    pub admits_shares: BTreeSet<String>,
}

impl Links {
    /// A lease token of `lease` valid until `exp` (Unix seconds) was issued.
    pub fn token_issued(&mut self, lease: &str, exp: u64) {
        let until = self.tokens_until.entry(lease.to_string()).or_default();
        *until = (*until).max(exp);
    }

    /// `lease` ended (`why` is what its exporter tells the client): its exporter hears of it,
    /// and until when tokens of it may be presented.
    pub fn lease_ended(&mut self, lease: &Lease, why: String) {
        let until = self
            .tokens_until
            .remove(&lease.name)
            .unwrap_or(0)
            .max(lease.end.div_ceil(1000));
        self.ended
            .entry(lease.exporter.clone())
            .or_default()
            .push(EndedLease {
                name: lease.name.clone(),
                reason: why,
                until,
            });
        self.push.insert(lease.exporter.clone());
    }

    /// Every registration hears `r` (the batch could not be stored).
    pub fn fail_all(&mut self, r: &Reply) {
        for (_, l) in self.links.drain() {
            let _ = l.tx.send(r.clone());
        }
    }
}

impl<S: LeaseStore> Core<S> {
    pub(super) fn register(
        &mut self,
        now: Millis,
        caller: &Caller,
        reg: Registration,
        tx: mpsc::UnboundedSender<Reply>,
        stream: u64,
    ) {
        if caller.kind != TokenKind::Exporter {
            self.reply(&tx, err(CtlErrorCode::Forbidden, "only exporters register"));
            return;
        }
        let name = caller.name.clone();
        let Some(rec) = self.registry.exporters.get_mut(&name) else {
            return;
        };
        if !rec.fingerprint.is_empty() && rec.fingerprint != reg.fingerprint {
            warn!(
                exporter = %name,
                bound = %rec.fingerprint,
                presented = %reg.fingerprint,
                address = %reg.address,
                "registration refused: another TLS fingerprint than the one bound to this exporter (re-imaged host, or a leaked credential)"
            );
            let bound = rec.fingerprint.clone();
            if rec.rejected_fingerprint.as_ref() != Some(&reg.fingerprint) {
                rec.rejected_fingerprint = Some(reg.fingerprint.clone());
                self.persist.dirty.insert((Table::Exporters, name.clone()));
            }
            self.reply(
                &tx,
                err(
                    CtlErrorCode::Unauthorized,
                    format!(
                        "exporter {name} is bound to TLS fingerprint {bound} (from its first registration); this one is {}. If its host was re-imaged, an admin accepts the new identity with `jmp admin rebind exporter {name}`",
                        reg.fingerprint
                    ),
                ),
            );
            return;
        }
        let attached = reg.attached.clone();
        let reports = reg.reports_in_use;
        if reg.admits_shares {
            self.links.admits_shares.insert(name.clone());
        } else {
            self.links.admits_shares.remove(&name);
        }
        let changed = rec.address != reg.address
            || rec.relay != reg.relay
            || rec.fingerprint != reg.fingerprint
            || rec.config_labels != reg.labels
            || rec.devices != reg.devices;
        if changed {
            rec.address = reg.address;
            rec.fingerprint = reg.fingerprint;
            rec.config_labels = reg.labels;
            rec.devices = reg.devices;
            rec.relay = reg.relay;
            self.persist.dirty.insert((Table::Exporters, name.clone()));
        }
        let labels = rec.effective_labels();
        let enabled = rec.enabled;
        if let Some(old) = self.links.links.insert(
            name.clone(),
            ExporterLink {
                tx: tx.clone(),
                stream,
            },
        ) {
            let _ = old.tx.send(err(
                CtlErrorCode::Unauthorized,
                "replaced by a newer registration of the same exporter",
            ));
        }
        self.links.streams.insert(stream, name.clone());
        let mut ev = self.book.upsert_exporter(now, &name, labels, enabled);
        // Its cleanup after each lease, and one it still owes (it restarted, or was cut off,
        // before running it): held before it comes online, so nobody is granted it first.
        ev.extend(self.declare_cleanup(now, &name, reg.cleanup_secs, reg.cleaning));
        ev.extend(self.book.set_online(now, &name, true));
        // Which of its leases is in use, as it says (after a controller restart or failover,
        // this rebuilds what the store's records could not know: a session that left while no
        // controller listened). One that does not report counts its lease as attached.
        let attached = if reports {
            self.links.silent.remove(&name);
            attached
        } else {
            self.links.silent.insert(name.clone());
            self.book.lease_of_exporter(&name).map(|l| l.name.clone())
        };
        ev.extend(self.book.set_attached(now, &name, attached.as_deref()));
        info!(exporter = %name, "online");
        self.metrics.exporter_up.with_label_values(&[&name]).set(1);
        self.links.push.insert(name);
        self.on_events(now, ev);
    }

    /// Exporter `caller` says which lease has a session attached now (`in-use`).
    pub(super) fn in_use(&mut self, now: Millis, caller: &Caller, lease: Option<String>) -> Reply {
        if caller.kind != TokenKind::Exporter {
            return err(
                CtlErrorCode::Forbidden,
                "only exporters report their sessions",
            );
        }
        if !self.links.links.contains_key(&caller.name) {
            // Said outside a registration (the exporter is offline as far as this controller
            // knows): its next registration says it again.
            return err(
                CtlErrorCode::NotFound,
                format!("exporter {} is not registered here", caller.name),
            );
        }
        debug!(exporter = %caller.name, lease = lease.as_deref().unwrap_or("-"), "sessions reported");
        let ev = self.book.set_attached(now, &caller.name, lease.as_deref());
        self.on_events(now, ev);
        Reply::Done
    }

    /// `lease` was granted: on an exporter that does not report its sessions, it counts as
    /// attached from the start (see [`Links::silent`]).
    pub(super) fn granted_on(&mut self, now: Millis, lease: &Lease) {
        if self.links.silent.contains(&lease.exporter) {
            let ev = self
                .book
                .set_attached(now, &lease.exporter, Some(&lease.name));
            self.on_events(now, ev);
        }
    }

    /// The registration of `stream` ended: its exporter is offline (its lease stays).
    pub(super) fn registration_gone(&mut self, now: Millis, stream: u64) {
        let Some(name) = self.links.streams.remove(&stream) else {
            return;
        };
        if self
            .links
            .links
            .get(&name)
            .is_some_and(|l| l.stream == stream)
        {
            self.links.links.remove(&name);
            info!(exporter = %name, "offline");
            self.metrics.exporter_up.with_label_values(&[&name]).set(0);
            let ev = self.book.set_online(now, &name, false);
            self.on_events(now, ev);
        }
    }

    /// Each exporter whose state changed hears it: its current lease, the leases that ended
    /// and why, whether it is enabled, the cleanup it owes.
    pub(super) fn send_pushes(&mut self) {
        for name in std::mem::take(&mut self.links.push) {
            let ended = self.links.ended.remove(&name).unwrap_or_default();
            let Some(link) = self.links.links.get(&name) else {
                continue;
            };
            let lease = self.book.lease_of_exporter(&name).map(|l| ActiveLease {
                name: l.name.clone(),
                client: l.client.clone(),
                end: l.end.div_ceil(1000),
                team: self.registry.team(&l.client),
                extends: l.checkpoint().is_some(),
                shares: super::leases::live_shares(l, self.book.clock()),
            });
            let cleaning = self
                .book
                .exporter(&name)
                .and_then(|e| e.cleaning.as_ref())
                .map(|(_, l)| l.clone());
            let enabled = self
                .registry
                .exporters
                .get(&name)
                .is_some_and(|r| r.enabled);
            let _ = link.tx.send(Reply::ExporterState {
                lease,
                ended,
                enabled,
                at: jmp_transport::unix_now(),
                cleaning,
            });
        }
        self.links.ended.clear();
    }

    pub(super) fn get_exporters(
        &self,
        caller: &Caller,
        admin: bool,
        selector: Option<String>,
    ) -> Reply {
        let sel = match Selector::parse(selector.as_deref().unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return err(CtlErrorCode::Invalid, format!("selector: {e}")),
        };
        // An admin sees every exporter; a client those its policy allows (none if its policy
        // cannot be read).
        let policy = if admin {
            None
        } else {
            match self
                .registry
                .client_policy(&caller.name, self.default_max_secs)
            {
                Ok(p) => Some(p.allow),
                Err(e) => return Reply::Error(e),
            }
        };
        let exporters = self
            .registry
            .exporters
            .values()
            .filter_map(|rec| {
                let labels = rec.effective_labels();
                if !sel.matches(&labels) || policy.is_some_and(|p| !p.matches(&labels)) {
                    return None;
                }
                let st = self.book.exporter(&rec.name);
                let lease = self.book.lease_of_exporter(&rec.name);
                Some(ExporterInfo {
                    name: rec.name.clone(),
                    labels,
                    online: st.is_some_and(|s| s.online),
                    enabled: rec.enabled,
                    address: rec.address.clone(),
                    devices: rec.devices.clone(),
                    lease: lease.map(|l| l.name.clone()),
                    client: lease.map(|l| l.client.clone()),
                    fingerprint: rec.fingerprint.clone(),
                    fingerprint_refused: rec.rejected_fingerprint.clone(),
                    state: st
                        .and_then(|s| s.cleaning.as_ref())
                        .map(|_| "cleaning".to_string()),
                    relay: rec.relay,
                })
            })
            .collect();
        Reply::Exporters { exporters }
    }

    pub(super) fn set_exporter_enabled(&mut self, now: Millis, name: &str, enabled: bool) -> Reply {
        let Some(rec) = self.registry.exporters.get_mut(name) else {
            return err(CtlErrorCode::NotFound, format!("no exporter {name:?}"));
        };
        rec.enabled = enabled;
        let labels = rec.effective_labels();
        self.persist
            .dirty
            .insert((Table::Exporters, name.to_string()));
        let ev = self.book.upsert_exporter(now, name, labels, enabled);
        self.on_events(now, ev);
        self.links.push.insert(name.to_string());
        Reply::Done
    }

    pub(super) fn rebind_exporter(&mut self, name: &str) -> Reply {
        let Some(rec) = self.registry.exporters.get_mut(name) else {
            return err(CtlErrorCode::NotFound, format!("no exporter {name:?}"));
        };
        info!(exporter = %name, old = %rec.fingerprint, "fingerprint unbound by an admin; the next registration binds one");
        rec.fingerprint.clear();
        rec.rejected_fingerprint = None;
        self.persist
            .dirty
            .insert((Table::Exporters, name.to_string()));
        Reply::Done
    }
}
