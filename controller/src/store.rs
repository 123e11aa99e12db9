//! Durable state of the controller behind one trait, [`LeaseStore`].
//!
//! The controller keeps its working state in memory (the [`crate::book::LeaseBook`] and the
//! identity registry) and persists every change before it answers the call that caused it, so a
//! `kill -9` loses nothing that was acknowledged. The trait is shaped for an etcd backend too:
//! a flat key space per table, a store-wide **revision**, and commits that are
//! **compare-and-swap** on that revision (an etcd `Txn` comparing a revision key). A controller
//! that loses a CAS knows another instance wrote in between and must reload; with the embedded
//! store there is only ever one writer, so a conflict means a bug and is reported as such.
//! Watches (etcd's way to learn of other controllers' writes) are `changes_since`, whose default
//! says there are no other writers; no caller needs them while one controller runs.
//!
//! Values are JSON, so `redb` files and etcd keys stay inspectable with generic tools.

use std::path::Path;

/// The tables (etcd: key prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Clients,
    Exporters,
    Leases,
    Waiting,
    /// Request ids of leases granted from the queue whose requester has not yet confirmed
    /// receipt (value: the lease name). Kept so that a restart gives them the grace period
    /// again instead of holding them for nobody until they expire.
    Unclaimed,
    /// The history of ended leases (see [`crate::usage`]), keyed `<end ms>/<lease>`.
    Usage,
}

impl Table {
    pub const ALL: [Table; 6] = [
        Table::Clients,
        Table::Exporters,
        Table::Leases,
        Table::Waiting,
        Table::Unclaimed,
        Table::Usage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Clients => "clients",
            Table::Exporters => "exporters",
            Table::Leases => "leases",
            Table::Waiting => "waiting",
            Table::Unclaimed => "unclaimed",
            Table::Usage => "usage",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: String,
    },
}

/// Everything stored, as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: u64,
    pub records: Vec<(Table, String, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store revision is {found}, expected {expected}: another writer changed it")]
    Conflict { expected: u64, found: u64 },
    #[error("store {path}: {why}")]
    Io { path: String, why: String },
    /// etcd: this controller is no longer the leader (its leader key is gone or another's), so
    /// its commits are refused by the store.
    #[error("no longer the leader: {0}")]
    Fenced(String),
    /// etcd: the store cannot be reached, or did not say whether a commit was applied.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

pub trait LeaseStore: Send + 'static {
    /// Reads everything (at start).
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Applies `ops` atomically and durably if the revision is still `expected`; returns the new
    /// revision. Nothing is applied on error.
    fn commit(&mut self, expected: u64, ops: &[Op]) -> Result<u64, StoreError>;

    /// What other writers changed after `revision` (etcd: a watch from that revision), so that
    /// a controller that lost a compare-and-swap can catch up instead of reloading everything.
    /// `None`: this store has no other writers (the embedded one).
    fn changes_since(&mut self, _revision: u64) -> Result<Option<Vec<Op>>, StoreError> {
        Ok(None)
    }
}

/// Creates `path` empty with mode 0600 unless it exists, and takes group and other access
/// away from an existing one.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "{} was readable by others (mode {:o}); making it the owner's only",
            path.display(),
            mode & 0o777
        );
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// The embedded default: one redb file. redb commits are atomic and, with the default
/// durability, fsynced before `commit` returns, so a crash leaves either all of a commit or none.
pub struct RedbStore {
    db: redb::Database,
    path: String,
}

const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

fn table_def(t: Table) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    redb::TableDefinition::new(t.name())
}

impl RedbStore {
    /// Opens the store at `path`, creating it if missing. It holds every identity's record
    /// and every lease, so it is the owner's only (0600, also when an older version left it
    /// wider).
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let p = path.display().to_string();
        let io = |e: std::io::Error| StoreError::Io {
            path: p.clone(),
            why: e.to_string(),
        };
        private_file(path).map_err(io)?;
        let db = redb::Database::create(path).map_err(|e| StoreError::Io {
            path: p.clone(),
            why: e.to_string(),
        })?;
        let s = RedbStore { db, path: p };
        // Create the tables so that reads of a fresh store find them.
        let tx = s.db.begin_write().map_err(|e| s.err(e))?;
        {
            tx.open_table(META).map_err(|e| s.err(e))?;
            for t in Table::ALL {
                tx.open_table(table_def(t)).map_err(|e| s.err(e))?;
            }
        }
        tx.commit().map_err(|e| s.err(e))?;
        Ok(s)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            why: e.to_string(),
        }
    }
}

impl LeaseStore for RedbStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = tx.open_table(META).map_err(|e| self.err(e))?;
        let revision = meta
            .get("revision")
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut records = Vec::new();
        for t in Table::ALL {
            let table = tx.open_table(table_def(t)).map_err(|e| self.err(e))?;
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                records.push((t, k.value().to_string(), v.value().to_vec()));
            }
        }
        Ok(Snapshot { revision, records })
    }

    fn commit(&mut self, expected: u64, ops: &[Op]) -> Result<u64, StoreError> {
        use redb::ReadableTable;
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let next = {
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            let found = meta
                .get("revision")
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(0);
            if found != expected {
                // Dropping the transaction aborts it.
                return Err(StoreError::Conflict { expected, found });
            }
            meta.insert("revision", found + 1)
                .map_err(|e| self.err(e))?;
            found + 1
        };
        for t in Table::ALL {
            if !ops.iter().any(|op| op_table(op) == t) {
                continue;
            }
            let mut table = tx.open_table(table_def(t)).map_err(|e| self.err(e))?;
            for op in ops.iter().filter(|op| op_table(op) == t) {
                match op {
                    Op::Put { key, value, .. } => {
                        table
                            .insert(key.as_str(), value.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Op::Delete { key, .. } => {
                        table.remove(key.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(next)
    }
}

fn op_table(op: &Op) -> Table {
    match op {
        Op::Put { table, .. } | Op::Delete { table, .. } => *table,
    }
}

/// In memory, for tests and benchmarks of the logic around the store.
#[derive(Default)]
pub struct MemStore {
    revision: u64,
    data: std::collections::BTreeMap<(Table, String), Vec<u8>>,
}

impl LeaseStore for MemStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            revision: self.revision,
            records: self
                .data
                .iter()
                .map(|((t, k), v)| (*t, k.clone(), v.clone()))
                .collect(),
        })
    }

    fn commit(&mut self, expected: u64, ops: &[Op]) -> Result<u64, StoreError> {
        if expected != self.revision {
            return Err(StoreError::Conflict {
                expected,
                found: self.revision,
            });
        }
        for op in ops {
            match op {
                Op::Put { table, key, value } => {
                    self.data.insert((*table, key.clone()), value.clone());
                }
                Op::Delete { table, key } => {
                    self.data.remove(&(*table, key.clone()));
                }
            }
        }
        self.revision += 1;
        Ok(self.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(t: Table, k: &str, v: &str) -> Op {
        Op::Put {
            table: t,
            key: k.into(),
            value: v.as_bytes().to_vec(),
        }
    }

    fn exercise(store: &mut dyn LeaseStore) {
        let s = store.load().unwrap();
        assert_eq!(s.revision, 0);
        assert!(s.records.is_empty());
        let r1 = store
            .commit(
                0,
                &[put(Table::Leases, "l1", "a"), put(Table::Clients, "c", "x")],
            )
            .unwrap();
        assert_eq!(r1, 1);
        // A stale revision changes nothing.
        let e = store
            .commit(0, &[put(Table::Leases, "l2", "b")])
            .unwrap_err();
        assert!(matches!(
            e,
            StoreError::Conflict {
                expected: 0,
                found: 1
            }
        ));
        let r2 = store
            .commit(
                1,
                &[
                    Op::Delete {
                        table: Table::Leases,
                        key: "l1".into(),
                    },
                    put(Table::Waiting, "w", "y"),
                ],
            )
            .unwrap();
        assert_eq!(r2, 2);
        let mut recs = store.load().unwrap().records;
        recs.sort();
        assert_eq!(
            recs,
            vec![
                (Table::Clients, "c".into(), b"x".to_vec()),
                (Table::Waiting, "w".into(), b"y".to_vec()),
            ]
        );
    }

    #[test]
    fn mem_store_commits_atomically_with_cas() {
        exercise(&mut MemStore::default());
    }

    #[test]
    fn redb_store_commits_with_cas_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("jmp-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        {
            let mut s = RedbStore::open(&path).unwrap();
            exercise(&mut s);
        }
        let mut s = RedbStore::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.revision, 2);
        assert_eq!(snap.records.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_redb_file_is_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("jmp-store-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.join("leases.redb");
        drop(RedbStore::open(&fresh).unwrap());
        assert_eq!(mode(&fresh), 0o600);
        // One an older version created 0644 is tightened, and its contents kept.
        let old = dir.join("old.redb");
        {
            let mut s = RedbStore::open(&old).unwrap();
            exercise(&mut s);
        }
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut s = RedbStore::open(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(s.load().unwrap().revision, 2);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unopenable_store_names_its_path() {
        let e = match RedbStore::open(Path::new("/proc/no/such/dir/state.redb")) {
            Err(e) => e,
            Ok(_) => panic!("opened a store under /proc"),
        };
        assert!(
            e.to_string().contains("/proc/no/such/dir/state.redb"),
            "{e}"
        );
    }
}
