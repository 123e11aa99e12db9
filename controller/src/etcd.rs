//! The etcd v3 backend of [`LeaseStore`] (`--store etcd://h1:2379,h2:2379,h3:2379`), and the
//! small etcd client wrapper the election in [`crate::cluster`] uses too.
//!
//! Key layout under the prefix (`--etcd-prefix`, default `/jmp`):
//!
//! | key | what |
//! |---|---|
//! | `P/t/<table>/<key>` | one record, JSON, as in the redb store |
//! | `P/meta` | the commit marker: its `mod_revision` is the store revision [`LeaseStore::commit`] compares |
//! | `P/leader` | the leader controller (attached to its etcd lease) — see [`crate::cluster`] |
//! | `P/members/<addr>` | every live controller (attached to its etcd lease) |
//! | `P/cluster` | the cluster's signing key and TLS fingerprint (controllers must share them) |
//! | `P/stage/<id>/<n>` | the parts of a large commit while it is applied |
//!
//! **Fencing.** Every write is a transaction that compares `create_revision(P/leader)` with the
//! revision at which this controller created that key when it won the election. A controller
//! that lost its leadership (its etcd lease expired while it was paused or cut off, and another
//! controller took the key) can therefore not write anything, even if nobody has written since.
//! A commit also compares `mod_revision(P/meta)` with the revision the caller last saw, so that
//! two writers can never both believe they committed on top of the same state.
//!
//! **Atomic commits of any size.** etcd refuses transactions of more than 128 operations (its
//! `--max-txn-ops` default) or 1.5 MiB. A commit that fits goes in one transaction. A larger one
//! (a thousand leases ending in the same second) is first written as parts under `P/stage/<id>/`,
//! then committed by one transaction that points `P/meta` at them (the commit point), then
//! applied in chunks and finally marked done. Whoever loads the store next (this controller or
//! the next leader) finishes an applied-but-unfinished commit before reading, so a crash at any
//! step leaves either all of the commit or none of it.
//!
//! **Unknown outcomes.** A transaction whose answer was lost (an etcd member died under it) may
//! or may not have been applied. Each commit writes a random id into `P/meta`; when the retry's
//! comparison fails, `P/meta` holding our id means the first attempt was applied.
//!
//! The store's calls are synchronous ([`LeaseStore`] is shared with redb, whose commits block
//! on an fsync); the etcd client is async, so the store runs its own thread with its own
//! single-threaded runtime and connections, and the core task waits on it as it waits on redb.

use crate::store::{LeaseStore, Op, Snapshot, StoreError, Table};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, GetResponse, PutOptions,
    Txn, TxnOp, TxnResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One request to one etcd member may take this long before the next member is tried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a commit keeps retrying before it reports the store unavailable (and the
/// controller steps down and reloads: its memory may be ahead of etcd).
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(5);
/// etcd's default `--max-txn-ops` is 128: leave room for the comparisons and `P/meta`.
const MAX_TXN_OPS: usize = 100;
/// etcd's default `--max-request-bytes` is 1.5 MiB.
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// Records read per range request while loading.
const PAGE: i64 = 1000;

/// Parses `etcd://h1:2379,h2:2379` into the members' URLs.
pub fn parse_url(s: &str) -> Result<Vec<String>, String> {
    let rest = s.strip_prefix("etcd://").ok_or_else(|| {
        format!(
            "--store {s:?}: expected redb (the embedded store) or etcd://HOST:PORT[,HOST:PORT...]"
        )
    })?;
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| format!("http://{}", e.trim_end_matches('/')))
        .collect();
    if eps.is_empty() {
        return Err(format!("--store {s:?}: no etcd member named"));
    }
    for e in &eps {
        let hp = &e["http://".len()..];
        let ok = hp
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(format!(
                "--store {s:?}: {hp:?} is not HOST:PORT (an etcd member's client URL, e.g. 127.0.0.1:2379)"
            ));
        }
    }
    Ok(eps)
}

/// Checks `--etcd-prefix`: absolute, no trailing slash, printable.
pub fn check_prefix(p: &str) -> Result<String, String> {
    let t = p.trim_end_matches('/');
    if !t.starts_with('/') || t.len() < 2 || t.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "--etcd-prefix {p:?}: expected an absolute key prefix such as /jmp"
        ));
    }
    Ok(t.to_string())
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd clients for each member, used one at a time: a request that fails or hangs is tried on
/// the next member. (etcd-client's own balanced channel fails requests while any member is
/// down, so each member gets its own lazily connected client.)
pub struct Etcd {
    members: Vec<String>,
    clients: Vec<Client>,
    current: AtomicUsize,
    pub prefix: String,
}

impl Etcd {
    pub async fn connect(members: &[String], prefix: &str) -> Result<Etcd, String> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
        let mut clients = Vec::new();
        for m in members {
            clients.push(
                Client::connect([m.as_str()], Some(opts.clone()))
                    .await
                    .map_err(|e| format!("etcd member {m}: {e}"))?,
            );
        }
        Ok(Etcd {
            members: members.to_vec(),
            clients,
            current: AtomicUsize::new(0),
            prefix: prefix.to_string(),
        })
    }

    /// `P/rest`.
    pub fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}/{rest}", self.prefix).into_bytes()
    }

    pub fn members(&self) -> String {
        self.members
            .iter()
            .map(|m| m.trim_start_matches("http://"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `f` on the member last seen working, then on each other member in turn until one
    /// answers. The error names every member and what it said.
    pub async fn run<T, F, Fut>(&self, mut f: F) -> Result<T, String>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let m = self.members[idx].trim_start_matches("http://");
            match tokio::time::timeout(REQUEST_TIMEOUT, f(self.clients[idx].clone())).await {
                Ok(Ok(v)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) => errors.push(format!("{m}: {e}")),
                Err(_) => errors.push(format!(
                    "{m}: no answer within {}s",
                    REQUEST_TIMEOUT.as_secs()
                )),
            }
        }
        Err(format!("etcd unreachable ({})", errors.join("; ")))
    }

    pub async fn get(&self, key: Vec<u8>, opts: Option<GetOptions>) -> Result<GetResponse, String> {
        self.run(|mut c| {
            let (k, o) = (key.clone(), opts.clone());
            async move { c.get(k, o).await }
        })
        .await
    }

    pub async fn txn(&self, txn: &Txn) -> Result<TxnResponse, String> {
        self.run(|mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }
}

/// What this controller's writes are fenced by: the leader key and the revision at which this
/// controller created it.
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

impl Fence {
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }
}

/// The value of `P/meta`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    /// The id of the last commit (see "unknown outcomes" above).
    commit: String,
    /// A large commit that is committed but not yet applied to the record keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    staged: Option<Staged>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Staged {
    id: String,
    parts: usize,
}

/// One staged operation (a record key's new value, or its deletion).
#[derive(Debug, Serialize, Deserialize)]
struct StagedOp {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

/// The part of the store that runs on the store's own thread.
struct Inner {
    etcd: Etcd,
    fence: Fence,
}

/// Record keys and values as etcd holds them: `(key, Some(value))` puts, `(key, None)` deletes.
type KeyOps = Vec<(Vec<u8>, Option<Vec<u8>>)>;

impl Inner {
    fn rec_key(&self, t: Table, k: &str) -> Vec<u8> {
        self.etcd.key(&format!("t/{}/{k}", t.name()))
    }

    fn parse_rec_key(&self, key: &[u8]) -> Option<(Table, String)> {
        let s = std::str::from_utf8(key).ok()?;
        let rest = s.strip_prefix(&format!("{}/t/", self.etcd.prefix))?;
        let (t, k) = rest.split_once('/')?;
        let table = Table::ALL.into_iter().find(|x| x.name() == t)?;
        Some((table, k.to_string()))
    }

    fn unavailable(&self, e: String) -> StoreError {
        StoreError::Unavailable(format!("etcd://{}: {e}", self.etcd.members()))
    }

    /// `P/meta` as of now: (its mod_revision, its value, the store revision read at).
    async fn meta(&self) -> Result<(i64, Meta, i64), StoreError> {
        let r = self
            .etcd
            .get(self.etcd.key("meta"), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        let at = r.header().map(|h| h.revision()).unwrap_or(0);
        match r.kvs().first() {
            None => Ok((0, Meta::default(), at)),
            Some(kv) => {
                let m: Meta = serde_json::from_slice(kv.value()).map_err(|e| {
                    StoreError::Unavailable(format!("{} is not readable: {e}", self.meta_name()))
                })?;
                Ok((kv.mod_revision(), m, at))
            }
        }
    }

    fn meta_name(&self) -> String {
        format!("{}/meta", self.etcd.prefix)
    }

    /// Whether the leader key is still ours.
    async fn still_leader(&self) -> Result<bool, StoreError> {
        let r = self
            .etcd
            .get(self.fence.key.clone(), None)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(r.kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == self.fence.create_revision))
    }

    fn fenced(&self) -> StoreError {
        StoreError::Fenced(format!(
            "{} was re-created since this controller won the election (revision {})",
            String::from_utf8_lossy(&self.fence.key),
            self.fence.create_revision
        ))
    }

    /// A transaction guarded by the fence and `mod_revision(P/meta) == expected` that writes
    /// `P/meta = {commit: id, ..}` among `ops`; returns the revision it committed at. Retried
    /// until [`COMMIT_DEADLINE`]; an attempt whose answer was lost is recognised by `id`.
    async fn commit_txn(
        &self,
        expected: i64,
        meta: &Meta,
        ops: Vec<TxnOp>,
    ) -> Result<i64, StoreError> {
        let meta_key = self.etcd.key("meta");
        let body = serde_json::to_vec(meta).unwrap_or_default();
        let mut all = vec![TxnOp::put(meta_key.clone(), body, None)];
        all.extend(ops);
        let txn = Txn::new()
            .when(vec![
                self.fence.compare(),
                Compare::mod_revision(meta_key, CompareOp::Equal, expected),
            ])
            .and_then(all);
        let deadline = Instant::now() + COMMIT_DEADLINE;
        loop {
            let attempt = self.etcd.txn(&txn).await;
            match &attempt {
                Ok(r) if r.succeeded() => return Ok(r.header().map(|h| h.revision()).unwrap_or(0)),
                _ => {
                    // Either refused (someone else wrote, or we are fenced, or an earlier
                    // attempt of ours was applied and moved the revision) or unanswered.
                    match self.meta().await {
                        Ok((rev, m, _)) if m.commit == meta.commit => return Ok(rev),
                        Ok((rev, _, _)) if attempt.is_ok() => {
                            if !self.still_leader().await? {
                                return Err(self.fenced());
                            }
                            return Err(StoreError::Conflict {
                                expected: expected as u64,
                                found: rev as u64,
                            });
                        }
                        // Our attempt was not applied (P/meta does not hold our id): the
                        // transaction can be sent again.
                        Ok(_) => {}
                        Err(e) if Instant::now() >= deadline => return Err(e),
                        Err(_) => {}
                    }
                    if Instant::now() >= deadline {
                        return Err(match attempt {
                            Err(e) => self.unavailable(e),
                            Ok(_) => self.unavailable("commit not confirmed".into()),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A fenced transaction of idempotent operations (puts and deletes of final values).
    async fn fenced_txn(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let txn = Txn::new().when(vec![self.fence.compare()]).and_then(ops);
        let deadline = Instant::now() + COMMIT_DEADLINE;
        loop {
            match self.etcd.txn(&txn).await {
                Ok(r) if r.succeeded() => return Ok(()),
                Ok(_) => return Err(self.fenced()),
                Err(e) if Instant::now() >= deadline => return Err(self.unavailable(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn to_txn_ops(ops: &KeyOps) -> Vec<TxnOp> {
        ops.iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k.clone(), v.clone(), None::<PutOptions>),
                None => TxnOp::delete(k.clone(), None::<DeleteOptions>),
            })
            .collect()
    }

    /// Splits into transactions etcd accepts.
    fn chunks(ops: &KeyOps) -> Vec<KeyOps> {
        let mut out: Vec<KeyOps> = Vec::new();
        let mut cur: KeyOps = Vec::new();
        let mut bytes = 0;
        for (k, v) in ops {
            let n = k.len() + v.as_ref().map_or(0, |v| v.len()) + 16;
            if !cur.is_empty() && (cur.len() >= MAX_TXN_OPS || bytes + n > MAX_TXN_BYTES) {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            cur.push((k.clone(), v.clone()));
            bytes += n;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    async fn commit(&self, expected: u64, ops: &[Op]) -> Result<u64, StoreError> {
        // One operation per key (etcd refuses a transaction naming a key twice); every op is
        // the key's final state, so the last one wins.
        let mut by_key: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put { table, key, value } => {
                    by_key.insert(self.rec_key(*table, key), Some(value.clone()));
                }
                Op::Delete { table, key } => {
                    by_key.insert(self.rec_key(*table, key), None);
                }
            }
        }
        let kops: KeyOps = by_key.into_iter().collect();
        let expected = expected as i64;
        let id = random_id();
        let chunks = Self::chunks(&kops);
        if chunks.len() <= 1 {
            let meta = Meta {
                commit: id,
                staged: None,
            };
            let rev = self
                .commit_txn(expected, &meta, Self::to_txn_ops(&kops))
                .await?;
            return Ok(rev as u64);
        }
        // Large: stage the parts, commit a pointer to them, apply, finish.
        let parts: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| {
                let staged: Vec<StagedOp> = c
                    .iter()
                    .map(|(k, v)| StagedOp {
                        key: String::from_utf8_lossy(k).into_owned(),
                        value: v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                    })
                    .collect();
                serde_json::to_vec(&staged).unwrap_or_default()
            })
            .collect();
        for (i, p) in parts.iter().enumerate() {
            let k = self.etcd.key(&format!("stage/{id}/{i:06}"));
            self.fenced_txn(vec![TxnOp::put(k, p.clone(), None)])
                .await?;
        }
        let meta = Meta {
            commit: id.clone(),
            staged: Some(Staged {
                id: id.clone(),
                parts: parts.len(),
            }),
        };
        let rev = self.commit_txn(expected, &meta, Vec::new()).await?;
        let done = self.apply_staged(rev, &meta, &chunks).await?;
        Ok(done as u64)
    }

    /// Applies a committed staged commit's chunks and marks it done; returns the new revision.
    async fn apply_staged(
        &self,
        rev: i64,
        meta: &Meta,
        chunks: &[KeyOps],
    ) -> Result<i64, StoreError> {
        for c in chunks {
            self.fenced_txn(Self::to_txn_ops(c)).await?;
        }
        let staged = meta
            .staged
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        let stage = self.etcd.key(&format!("stage/{staged}/"));
        let done = Meta {
            commit: random_id(),
            staged: None,
        };
        self.commit_txn(
            rev,
            &done,
            vec![TxnOp::delete(
                stage.clone(),
                Some(DeleteOptions::new().with_range(prefix_end(&stage))),
            )],
        )
        .await
    }

    /// Finishes a staged commit found at load (its committer died while applying it).
    async fn finish_staged(&self, rev: i64, meta: &Meta, at: i64) -> Result<(), StoreError> {
        let staged = meta.staged.clone().unwrap_or(Staged {
            id: String::new(),
            parts: 0,
        });
        let mut chunks = Vec::new();
        for i in 0..staged.parts {
            let k = self.etcd.key(&format!("stage/{}/{i:06}", staged.id));
            let r = self
                .etcd
                .get(k.clone(), Some(GetOptions::new().with_revision(at)))
                .await
                .map_err(|e| self.unavailable(e))?;
            let kv = r.kvs().first().ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "part {} of a committed change is missing from etcd",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            let ops: Vec<StagedOp> = serde_json::from_slice(kv.value()).map_err(|e| {
                StoreError::Unavailable(format!(
                    "part {} of a committed change is not readable: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            chunks.push(
                ops.into_iter()
                    .map(|o| (o.key.into_bytes(), o.value.map(String::into_bytes)))
                    .collect(),
            );
        }
        tracing::info!(
            parts = staged.parts,
            "finishing a large commit its controller did not finish applying"
        );
        self.apply_staged(rev, meta, &chunks).await?;
        Ok(())
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        loop {
            let (rev, meta, at) = self.meta().await?;
            if meta.staged.is_some() {
                self.finish_staged(rev, &meta, at).await?;
                continue;
            }
            let mut records = Vec::new();
            let base = self.etcd.key("t/");
            let end = prefix_end(&base);
            let mut from = base.clone();
            loop {
                let r = self
                    .etcd
                    .get(
                        from.clone(),
                        Some(
                            GetOptions::new()
                                .with_range(end.clone())
                                .with_limit(PAGE)
                                .with_revision(at),
                        ),
                    )
                    .await
                    .map_err(|e| self.unavailable(e))?;
                for kv in r.kvs() {
                    if let Some((t, k)) = self.parse_rec_key(kv.key()) {
                        records.push((t, k, kv.value().to_vec()));
                    }
                }
                match r.kvs().last() {
                    Some(last) if r.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            // Parts of a large commit whose committer died before its commit point: never
            // committed, so garbage.
            let stage = self.etcd.key("stage/");
            let stray = self
                .etcd
                .get(
                    stage.clone(),
                    Some(
                        GetOptions::new()
                            .with_range(prefix_end(&stage))
                            .with_count_only(),
                    ),
                )
                .await
                .map_err(|e| self.unavailable(e))?;
            if stray.count() > 0 {
                self.fenced_txn(vec![TxnOp::delete(
                    stage.clone(),
                    Some(DeleteOptions::new().with_range(prefix_end(&stage))),
                )])
                .await?;
            }
            return Ok(Snapshot {
                revision: rev as u64,
                records,
            });
        }
    }
}

enum Job {
    Load(std::sync::mpsc::SyncSender<Result<Snapshot, StoreError>>),
    Commit(
        u64,
        Vec<Op>,
        std::sync::mpsc::SyncSender<Result<u64, StoreError>>,
    ),
}

/// The etcd store as the core sees it: a handle to the store's thread.
pub struct EtcdStore {
    jobs: std::sync::mpsc::Sender<Job>,
    members: String,
}

impl EtcdStore {
    /// Starts the store's thread; its connections are made lazily (an unreachable etcd shows
    /// at the first load or commit, as [`StoreError::Unavailable`]).
    pub fn open(members: &[String], prefix: &str, fence: Fence) -> Result<EtcdStore, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let members_v = members.to_vec();
        let prefix = prefix.to_string();
        let shown = members
            .iter()
            .map(|m| m.trim_start_matches("http://"))
            .collect::<Vec<_>>()
            .join(",");
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("jmp-etcd-store".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let etcd = match rt.block_on(Etcd::connect(&members_v, &prefix)) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let inner = Inner { etcd, fence };
                // Ends when the core drops its handle.
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Load(reply) => {
                            let _ = reply.send(rt.block_on(inner.load()));
                        }
                        Job::Commit(expected, ops, reply) => {
                            let _ = reply.send(rt.block_on(inner.commit(expected, &ops)));
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the etcd thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EtcdStore {
                jobs: tx,
                members: shown,
            }),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("etcd://{shown}: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd://{shown}: the store thread ended"
            ))),
        }
    }

    fn gone(&self) -> StoreError {
        StoreError::Unavailable(format!("etcd://{}: the store thread ended", self.members))
    }
}

impl LeaseStore for EtcdStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs.send(Job::Load(tx)).map_err(|_| self.gone())?;
        rx.recv().map_err(|_| self.gone())?
    }

    fn commit(&mut self, expected: u64, ops: &[Op]) -> Result<u64, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs
            .send(Job::Commit(expected, ops.to_vec(), tx))
            .map_err(|_| self.gone())?;
        rx.recv().map_err(|_| self.gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_and_prefixes_are_checked_with_reasons() {
        assert_eq!(
            parse_url("etcd://h1:2379,h2:2379").unwrap(),
            ["http://h1:2379", "http://h2:2379"]
        );
        assert!(parse_url("http://h1:2379").unwrap_err().contains("etcd://"));
        assert!(parse_url("etcd://").unwrap_err().contains("no etcd member"));
        assert!(parse_url("etcd://h1").unwrap_err().contains("HOST:PORT"));
        assert!(parse_url("etcd://h1:99999")
            .unwrap_err()
            .contains("HOST:PORT"));
        assert_eq!(check_prefix("/jmp/").unwrap(), "/jmp");
        assert!(check_prefix("jmp").is_err());
        assert!(check_prefix("/").is_err());
        assert!(check_prefix("/a b").is_err());
    }

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/jmp/t/"), b"/jmp/t0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn chunks_respect_etcds_limits() {
        let ops: KeyOps = (0..250)
            .map(|i| (format!("k{i}").into_bytes(), Some(vec![b'x'; 10])))
            .collect();
        let c = Inner::chunks(&ops);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|c| c.len() <= MAX_TXN_OPS));
        assert_eq!(c.iter().map(Vec::len).sum::<usize>(), 250);
        let big: KeyOps = (0..3)
            .map(|i| (format!("k{i}").into_bytes(), Some(vec![b'x'; 600 * 1024])))
            .collect();
        assert_eq!(Inner::chunks(&big).len(), 3);
    }
}
