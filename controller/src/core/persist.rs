//! Persistence: everything a batch changed goes into the store in one commit before anyone
//! hears of it; a commit that fails answers everyone waiting with why.

use super::{err, Core};
use crate::book::Change;
use crate::store::{LeaseStore, Op, Table};
use jmp_protocol::api::{CtlError, CtlErrorCode, Reply};
use std::collections::BTreeSet;
use std::time::Instant;

pub(super) struct Persistence<S: LeaseStore> {
    store: S,
    store_name: &'static str,
    revision: u64,
    /// Identity records changed in this batch (written from the registry at the commit).
    pub dirty: BTreeSet<(Table, String)>,
    /// The request ids in the store's `unclaimed` table (see [`Table::Unclaimed`]).
    pub unclaimed_stored: BTreeSet<String>,
}

impl<S: LeaseStore> Persistence<S> {
    pub fn new(
        store: S,
        store_name: &'static str,
        revision: u64,
        unclaimed_stored: BTreeSet<String>,
    ) -> Persistence<S> {
        Persistence {
            store,
            store_name,
            revision,
            dirty: BTreeSet::new(),
            unclaimed_stored,
        }
    }
}

impl<S: LeaseStore> Core<S> {
    /// Commits what this batch changed: the book's leases and waiting requests, the identity
    /// records, the unclaimed grants and the usage history, in one transaction.
    pub(super) fn persist(&mut self) -> anyhow::Result<()> {
        // The history's records go in the same commit as the ends of their leases.
        let mut ops = std::mem::take(&mut self.usage.ops);
        for ch in self.book.take_changes() {
            match ch {
                Change::Lease(name) => ops.push(match self.book.lease(&name) {
                    Some(l) => Op::Put {
                        table: Table::Leases,
                        key: name,
                        value: serde_json::to_vec(l)?,
                    },
                    None => Op::Delete {
                        table: Table::Leases,
                        key: name,
                    },
                }),
                Change::Waiting(id) => ops.push(match self.book.waiting_by_id(&id) {
                    Some(w) => Op::Put {
                        table: Table::Waiting,
                        key: id,
                        value: serde_json::to_vec(w)?,
                    },
                    None => Op::Delete {
                        table: Table::Waiting,
                        key: id,
                    },
                }),
                // Exporter records are written from the registry below.
                Change::Exporter(_) => {}
            }
        }
        // Granted-but-unclaimed leases: the orphans that hold a lease. Written as a difference
        // against what the store has, so a batch without such changes writes nothing.
        let unclaimed: BTreeSet<String> = self
            .waiters
            .orphans
            .keys()
            .filter(|id| self.book.lease_by_request(id).is_some())
            .cloned()
            .collect();
        for id in unclaimed.difference(&self.persist.unclaimed_stored) {
            let lease = self
                .book
                .lease_by_request(id)
                .map(|l| l.name.clone())
                .unwrap_or_default();
            ops.push(Op::Put {
                table: Table::Unclaimed,
                key: id.clone(),
                value: serde_json::to_vec(&lease)?,
            });
        }
        for id in self.persist.unclaimed_stored.difference(&unclaimed) {
            ops.push(Op::Delete {
                table: Table::Unclaimed,
                key: id.clone(),
            });
        }
        for (t, k) in std::mem::take(&mut self.persist.dirty) {
            let v = match t {
                Table::Clients => self.registry.clients.get(&k).map(serde_json::to_vec),
                Table::Exporters => self.registry.exporters.get(&k).map(serde_json::to_vec),
                _ => None,
            };
            ops.push(match v {
                Some(v) => Op::Put {
                    table: t,
                    key: k,
                    value: v?,
                },
                None => Op::Delete { table: t, key: k },
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        let p = &mut self.persist;
        let t0 = Instant::now();
        p.revision = p.store.commit(p.revision, &ops)?;
        p.unclaimed_stored = unclaimed;
        self.metrics
            .store_commit
            .with_label_values(&[p.store_name])
            .observe(t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// After a failed commit: everyone waiting on this core hears why, with an error that
    /// tells them to retry where it makes sense (a waiting request keeps its place in the
    /// store's queue, an exporter registers again).
    pub(super) fn fail_all(&mut self, e: &anyhow::Error) {
        use crate::store::StoreError;
        let reply = match e.downcast_ref::<StoreError>() {
            Some(StoreError::Fenced(why)) => Reply::Error(CtlError::not_leader(
                None,
                format!("this controller stopped being the leader before the change was stored ({why}); retry"),
            )),
            Some(StoreError::Unavailable(why)) => err(
                CtlErrorCode::Unavailable,
                format!("the change was not confirmed by the lease store: {why}; retry (the request id makes a retry safe)"),
            ),
            _ => err(
                CtlErrorCode::Internal,
                format!("controller store failed: {e}"),
            ),
        };
        for (tx, _) in self.out.drain(..) {
            let _ = tx.send(reply.clone());
        }
        self.waiters.fail_all(&reply);
        self.links.fail_all(&reply);
    }
}
