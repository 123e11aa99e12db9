//! Several controllers on one etcd cluster: exactly one, the leader, runs the [`Core`] and
//! writes; the others answer every call with where the leader is.
//!
//! **Election.** Each controller holds an etcd lease (TTL `--leader-ttl`, 2 s by default) that
//! it keeps alive, with its address under `P/members/`. Whoever finds `P/leader` absent creates
//! it in a transaction that compares its `create_revision` with 0 (only one creation can win),
//! attached to its lease. The winner loads the store and serves; its writes are fenced by that
//! creation's revision ([`crate::etcd::Fence`]), so once its lease has expired and someone else
//! has created the key, nothing it commits is accepted.
//!
//! **Failover time.** A leader killed with `-9` stops renewing its lease; etcd deletes the key
//! when the lease expires (the TTL after its last renewal, checked by etcd about every 500 ms);
//! the others see it gone within one poll ([`TICK`], 100 ms), one wins, loads the store (a few hundred
//! milliseconds for 10,000 exporters) and serves. Clients and exporters that were connected to
//! the dead leader notice within the controller connection's idle timeout (3 s) and move to the
//! new one, keeping their place by request id. So about TTL + 0.5 s until a new leader serves,
//! and up to the idle timeout until every connected caller has moved: 3–4 s in all.
//!
//! **Stepping down.** A leader that has not renewed its lease for 3/4 of the TTL stops serving
//! before the lease can expire under it, and one whose commit failed (etcd unreachable, or
//! fenced) stops at once: its memory may be ahead of what etcd holds, and only etcd's state
//! may be served. It drops the core (callers get an error naming why, and retry), revokes its
//! lease when it can, and takes part in the next election with a fresh load.

use crate::core::{Authority, Cmd, Core};
use crate::etcd::{prefix_end, Etcd, EtcdStore, Fence};
use crate::metrics::Metrics;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// How often a controller looks at the leader key and its lease.
pub const TICK: Duration = Duration::from_millis(100);
/// Default `--leader-ttl`. etcd's smallest lease TTL with its default election timeout is
/// about 1.5 s; 2 s keeps failovers short while a leader paused for less than 1.5 s (a busy
/// machine) keeps its place.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2);

/// What this controller is in its cluster, as the API needs to know it per call.
#[derive(Clone, Debug)]
pub enum Role {
    /// Serving: calls go to the core.
    Leader(mpsc::Sender<Cmd>),
    /// Another controller leads, at this address.
    Follower(String),
    /// No leader is known yet (an election, or this controller loading the store).
    Electing,
    /// etcd cannot be reached (why).
    Unavailable(String),
}

pub struct ClusterArgs {
    pub members: Vec<String>,
    pub prefix: String,
    /// This controller's address, as clients reach it (what a non-leader redirects to).
    pub advertise: String,
    pub ttl: Duration,
    pub data_dir: PathBuf,
    pub max_duration: u64,
    /// `--default-idle-timeout`, seconds (0: none).
    pub default_idle: u64,
    pub max_waiting: usize,
    /// Usage history retention, ms (0: forever).
    pub usage_retention: u64,
    /// `--credential-ttl`, seconds.
    pub credential_ttl: u64,
    /// The relay the leader runs (`None`: disabled).
    pub relay: Option<crate::relay::RelayConfig>,
}

#[derive(Serialize, Deserialize)]
struct LeaderValue {
    addr: String,
    /// This process's random id (two controllers may advertise the same address by mistake).
    id: String,
}

/// What every controller of one cluster must share: credentials and lease tokens are signed
/// by one key, and clients pin one TLS certificate for all of them.
#[derive(Serialize, Deserialize, PartialEq)]
struct ClusterIdentity {
    signing_key: String,
    fingerprint: String,
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

enum IdentityCheck {
    Ok,
    Unreachable(String),
    Mismatch(String),
}

/// Records this controller's identity as the cluster's if there is none yet; otherwise checks
/// that it is the same.
async fn check_identity(
    etcd: &Etcd,
    auth: &Authority,
    data_dir: &std::path::Path,
) -> IdentityCheck {
    let me = ClusterIdentity {
        signing_key: auth.ctl.key.clone(),
        fingerprint: auth.ctl.fingerprint.clone(),
    };
    let key = etcd.key("cluster");
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            key.clone(),
            serde_json::to_vec(&me).unwrap_or_default(),
            None,
        )])
        .or_else(vec![TxnOp::get(key.clone(), None)]);
    let r = match etcd.txn(&txn).await {
        Ok(r) => r,
        Err(e) => return IdentityCheck::Unreachable(e),
    };
    if r.succeeded() {
        info!(
            "this controller's identity is now the cluster's (first controller on {})",
            etcd.prefix
        );
        return IdentityCheck::Ok;
    }
    let theirs: Option<ClusterIdentity> = r.op_responses().into_iter().find_map(|o| match o {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()),
        _ => None,
    });
    match theirs {
        Some(t) if t == me => IdentityCheck::Ok,
        Some(t) => IdentityCheck::Mismatch(format!(
            "the controllers on etcd prefix {} sign with key {} and present TLS fingerprint {}; \
             this one has key {} and fingerprint {} (from {}). Every controller of a cluster must \
             share signing.key and tls/: copy them from a controller of that cluster into {} \
             (or use another --etcd-prefix for another lab)",
            etcd.prefix,
            t.signing_key,
            t.fingerprint,
            me.signing_key,
            me.fingerprint,
            data_dir.display(),
            data_dir.display()
        )),
        None => IdentityCheck::Mismatch(format!(
            "{}/cluster is not readable; delete it only if no controller uses this prefix",
            etcd.prefix
        )),
    }
}

struct Leading {
    fence: Fence,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

struct Node {
    args: ClusterArgs,
    etcd: Etcd,
    auth: Arc<Authority>,
    metrics: Arc<Metrics>,
    role: watch::Sender<Role>,
    id: String,
    /// Our etcd lease, and when we last sent a renewal that was answered.
    session: Option<(i64, Instant)>,
    /// Leases of earlier sessions to revoke once etcd answers again (so that a leader key of
    /// ours does not outlive a step-down by the TTL).
    stale: Vec<i64>,
    leading: Option<Leading>,
    last_renewal: Instant,
    last_members: Instant,
}

impl Node {
    fn set_role(&self, r: Role) {
        self.role.send_replace(r);
    }

    fn unavailable(&self, why: &str) {
        self.set_role(Role::Unavailable(format!(
            "the controller's lease store (etcd://{}) is unreachable: {why}",
            self.etcd.members()
        )));
    }

    async fn step_down(&mut self, why: &str) {
        let Some(l) = self.leading.take() else {
            return;
        };
        warn!("stepping down as leader: {why}");
        self.set_role(Role::Electing);
        l.handle.abort();
        let _ = l.handle.await;
        // Give the key up now if it is still ours, so the next election need not wait for
        // the lease to expire.
        let txn = Txn::new()
            .when(vec![l.fence.compare()])
            .and_then(vec![TxnOp::delete(l.fence.key.clone(), None)]);
        let _ = self.etcd.txn(&txn).await;
    }

    fn end_session(&mut self) {
        if let Some((lease, _)) = self.session.take() {
            self.stale.push(lease);
        }
    }

    async fn revoke_stale(&mut self) {
        let mut left = Vec::new();
        for lease in std::mem::take(&mut self.stale) {
            let r = self
                .etcd
                .run(|mut c| async move { c.lease_revoke(lease).await })
                .await;
            match r {
                Ok(_) => {}
                // "requested lease not found": expired meanwhile, nothing to do.
                Err(e) if e.contains("not found") => {}
                Err(_) => left.push(lease),
            }
        }
        self.stale = left;
    }

    async fn start_session(&mut self) -> Result<(), String> {
        let ttl = self.args.ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let g = self
            .etcd
            .run(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?;
        let lease = g.id();
        let member = self.etcd.key(&format!("members/{}", self.args.advertise));
        let addr = self.args.advertise.clone();
        self.etcd
            .run(|mut c| {
                let (k, v) = (member.clone(), addr.clone());
                async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
            })
            .await?;
        self.session = Some((lease, sent));
        Ok(())
    }

    /// Renews our lease; `Ok(false)` when etcd says it is gone.
    async fn renew(&mut self) -> Result<bool, String> {
        let Some((lease, _)) = self.session else {
            return Ok(false);
        };
        let sent = Instant::now();
        // etcd-client's keep_alive sends one renewal and reads its answer before it returns
        // (an answer with TTL 0, "lease not found", is an error): one call, one renewal.
        let r = self
            .etcd
            .run(|mut c| async move { c.lease_keep_alive(lease).await.map(|_| ()) })
            .await;
        match r {
            Ok(()) => {
                self.session = Some((lease, sent));
                Ok(true)
            }
            // Said by a member of the quorum (the lease is gone for good).
            Err(e) if e.contains("lease not found") => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn refresh_members(&mut self) {
        let base = self.etcd.key("members/");
        let r = self
            .etcd
            .get(
                base.clone(),
                Some(GetOptions::new().with_range(prefix_end(&base))),
            )
            .await;
        if let Ok(r) = r {
            let mut addrs: Vec<String> = r
                .kvs()
                .iter()
                .filter_map(|kv| std::str::from_utf8(kv.value()).ok().map(str::to_string))
                .collect();
            addrs.sort();
            addrs.dedup();
            if !addrs.is_empty() {
                self.auth.set_endpoints(addrs.join(","));
            }
        }
    }

    /// Loads the store as the new leader and starts the core.
    async fn lead(&mut self, fence: Fence) -> Result<(), String> {
        self.set_role(Role::Electing);
        let t0 = Instant::now();
        let members = self.args.members.clone();
        let prefix = self.args.prefix.clone();
        let auth = self.auth.clone();
        let metrics = self.metrics.clone();
        let max = self.args.max_duration;
        let idle = self.args.default_idle;
        let waiting = self.args.max_waiting;
        let retention = self.args.usage_retention;
        let ttl = self.args.credential_ttl;
        let relay = self.args.relay.clone();
        let data_dir = self.args.data_dir.clone();
        let f = fence.clone();
        // The store's calls block (see crate::etcd): off the async workers.
        let core = tokio::task::spawn_blocking(move || -> anyhow::Result<Core<EtcdStore>> {
            let store = EtcdStore::open(&members, &prefix, f)?;
            let mut core = Core::open(store, "etcd", auth, metrics, max)?;
            core.set_max_waiting(waiting);
            core.set_default_idle_timeout(idle);
            core.set_usage_retention(retention);
            if let Some(r) = relay {
                core.set_relay(r);
            }
            core.set_credential_ttl(ttl);
            core.ensure_admin_file(&data_dir.join("admin.yaml"), false)?;
            Ok(core)
        })
        .await
        .map_err(|e| format!("loading the store: {e}"))?
        .map_err(|e| format!("loading the store: {e:#}"))?;
        let (tx, rx) = mpsc::channel(4096);
        let handle = tokio::spawn(core.run(rx));
        info!(
            revision = fence.create_revision,
            "leader: store loaded in {} ms; serving",
            t0.elapsed().as_millis()
        );
        self.leading = Some(Leading { fence, handle });
        self.set_role(Role::Leader(tx));
        Ok(())
    }

    /// One look at the leader key: campaign if it is free, follow if another holds it.
    async fn elect(&mut self) -> Result<(), String> {
        let Some((lease, _)) = self.session else {
            return Ok(());
        };
        let key = self.etcd.key("leader");
        let me = serde_json::to_vec(&LeaderValue {
            addr: self.args.advertise.clone(),
            id: self.id.clone(),
        })
        .unwrap_or_default();
        // A plain read first: a campaign is a write (a raft proposal and an fsync on every
        // member), only worth making when the key is free.
        let read = |kv: &etcd_client::KeyValue| {
            (
                serde_json::from_slice::<LeaderValue>(kv.value()).ok(),
                kv.create_revision(),
            )
        };
        let current = self.etcd.get(key.clone(), None).await?;
        let holder = match current.kvs().first() {
            Some(kv) => Some(read(kv)),
            None => {
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(
                        key.clone(),
                        me,
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else(vec![TxnOp::get(key.clone(), None)]);
                let r = self.etcd.txn(&txn).await?;
                if r.succeeded() {
                    let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                    info!(revision = rev, "won the election");
                    return self
                        .lead(Fence {
                            key,
                            create_revision: rev,
                        })
                        .await;
                }
                r.op_responses().into_iter().find_map(|o| match o {
                    TxnOpResponse::Get(g) => g.kvs().first().map(read),
                    _ => None,
                })
            }
        };
        match holder {
            // Ours: an earlier campaign whose answer was lost, or we lead already.
            Some((Some(v), rev)) if v.id == self.id => {
                match self.leading.as_ref().map(|l| l.fence.create_revision) {
                    Some(mine) if mine == rev => {}
                    Some(_) => self.step_down("the leader key was re-created").await,
                    None => {
                        return self
                            .lead(Fence {
                                key,
                                create_revision: rev,
                            })
                            .await
                    }
                }
            }
            Some((Some(v), _)) => {
                if self.leading.is_some() {
                    self.step_down(&format!("controller {} holds the leader key", v.addr))
                        .await;
                }
                self.set_role(Role::Follower(v.addr));
            }
            // Deleted between the comparison and the read, or unreadable: look again.
            _ => {
                if self.leading.is_some() {
                    self.step_down("the leader key is gone").await;
                }
                self.set_role(Role::Electing);
            }
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), String> {
        let ttl = self.args.ttl;
        if self
            .leading
            .as_ref()
            .is_some_and(|l| l.handle.is_finished())
        {
            // The core stopped: a commit failed (it said why in the log and to its callers).
            self.step_down("the store did not accept a commit").await;
            self.end_session();
        }
        if !self.stale.is_empty() {
            self.revoke_stale().await;
        }
        if self.session.is_none() {
            self.start_session().await?;
            self.last_renewal = Instant::now();
        }
        if self.last_renewal.elapsed() >= ttl / 4 {
            self.last_renewal = Instant::now();
            match self.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    self.step_down("etcd says this controller's lease expired")
                        .await;
                    self.end_session();
                    return Err("this controller's etcd lease expired".into());
                }
                Err(e) => warn!("renewing the etcd lease: {e}"),
            }
        }
        if let Some((_, ok)) = self.session {
            if ok.elapsed() > ttl * 3 / 4 {
                // The lease may expire any moment: stop serving before it can.
                self.step_down("no renewal of its etcd lease answered in time")
                    .await;
                self.end_session();
                return Err(format!(
                    "no answer from etcd for {} ms",
                    ok.elapsed().as_millis()
                ));
            }
        }
        if self.last_members.elapsed() >= Duration::from_secs(1) {
            self.last_members = Instant::now();
            self.refresh_members().await;
        }
        self.elect().await
    }
}

/// Runs this controller's part in the cluster until `shutdown`; then resigns (the leader key and
/// the lease go at once, so the next leader need not wait for the TTL).
pub async fn run(
    args: ClusterArgs,
    auth: Arc<Authority>,
    metrics: Arc<Metrics>,
    role: watch::Sender<Role>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let etcd = Etcd::connect(&args.members, &args.prefix)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut node = Node {
        etcd,
        auth,
        metrics,
        role,
        id: random_id(),
        session: None,
        stale: Vec::new(),
        leading: None,
        last_renewal: Instant::now(),
        last_members: Instant::now() - Duration::from_secs(60),
        args,
    };
    node.unavailable("not contacted yet");
    // The identity first: a controller that does not belong must not take part at all.
    loop {
        match check_identity(&node.etcd, &node.auth, &node.args.data_dir).await {
            IdentityCheck::Ok => break,
            IdentityCheck::Mismatch(m) => anyhow::bail!(m),
            IdentityCheck::Unreachable(e) => {
                node.unavailable(&e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    node.set_role(Role::Electing);
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        match node.tick().await {
            Ok(()) => {
                if let Some(t) = down_since.take() {
                    info!("etcd answers again after {} ms", t.elapsed().as_millis());
                }
            }
            Err(e) => {
                let since = *down_since.get_or_insert_with(|| {
                    error!("{e}");
                    Instant::now()
                });
                // A follower cut off from etcd keeps pointing at the leader for a TTL: the
                // leader may well still serve (it stops by itself before its lease can run out).
                let following = matches!(*node.role.borrow(), Role::Follower(_));
                if node.leading.is_none() && !(following && since.elapsed() < node.args.ttl) {
                    node.unavailable(&e);
                }
            }
        }
    }
    node.step_down("shutting down").await;
    node.end_session();
    node.revoke_stale().await;
    Ok(())
}
