//! The controller's one owner of state: a task that holds the [`LeaseBook`], the identity
//! registry and the store, and applies commands in batches.
//!
//! Why one task and batches: the book's decisions (who gets which exporter, in which order)
//! must be serial to be fair, and every decision must be durable before anyone hears of it. The
//! task takes every command that is waiting, applies them in arrival order, commits all their
//! changes in **one** store transaction, and only then sends the replies and pushes. A burst of
//! a thousand requests costs a handful of fsyncs, not a thousand; a crash before the commit
//! loses only calls that were never answered (and that the callers therefore retry, by
//! request id, without duplicates).
//!
//! If the store cannot be written (disk full, I/O error), the batch's callers get an error and
//! the controller exits: its memory is then ahead of its disk, and the only state that may be
//! served is the durable one, which a restart (systemd `Restart=`) reloads.

use crate::book::{
    Change, EndReason, Event, Lease, LeaseBook, Millis, NewRequest, Outcome, Refusal, RequestState,
    Waiting,
};
use crate::metrics::Metrics;
#[cfg(test)]
use crate::store::MemStore;
use crate::store::{LeaseStore, Op, Table};
use jmp_protocol::ctl::{
    Access, ActiveLease, ClientConfig, ClientInfo, ClientSpec, Credential, CtlError, CtlErrorCode,
    DeviceSummary, EndedLease, ExporterInfo, ExporterSpec, HookPhase, HookReport, IdentityKind,
    LeaseInfo, LeaseRequest, Registration, Reply, Request,
};
use jmp_protocol::selector::{parse_label, Labels, Selector};
use jmp_protocol::token::{Claims, ControllerRef, TokenKind};
use jmp_transport::token::Signer;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// How long a waiting request (or an undelivered grant) survives its requester going away,
/// so that a network blip or a controller restart does not cost its place in the queue.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(15);
/// Default of `--max-waiting-per-client`: enough for a CI matrix, too few to fill a queue.
pub const MAX_WAITING_PER_CLIENT: usize = 16;

/// Longest lease when neither the client's policy nor the controller's flag says.
pub const DEFAULT_MAX_DURATION_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientRecord {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub allow: String,
    #[serde(default)]
    pub max_duration_secs: u64,
    #[serde(default)]
    pub admin: bool,
    /// The id of the one valid credential; anything else is revoked.
    pub jti: String,
    pub created: u64,
    /// When the newest credential issued to it expires (Unix seconds; 0: never).
    #[serde(default)]
    pub expires: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExporterRecord {
    pub name: String,
    /// Set by the admin; wins over `config_labels`.
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub config_labels: Labels,
    pub enabled: bool,
    pub jti: String,
    pub created: u64,
    #[serde(default)]
    pub address: String,
    /// Bound at the first registration; a registration with another one is refused until an
    /// admin rebinds the exporter (a leaked credential cannot redirect clients elsewhere).
    #[serde(default)]
    pub fingerprint: String,
    /// The last fingerprint a refused registration presented.
    #[serde(default)]
    pub rejected_fingerprint: Option<String>,
    #[serde(default)]
    pub devices: Vec<DeviceSummary>,
    /// It takes relayed sessions (`controller: {relay: true}` in its config).
    #[serde(default)]
    pub relay: bool,
}

impl ExporterRecord {
    pub fn effective_labels(&self) -> Labels {
        let mut l = self.config_labels.clone();
        l.extend(self.labels.clone());
        l
    }
}

/// A verified credential's identity (signature checked by the API task; revocation here).
#[derive(Debug, Clone)]
pub struct Caller {
    pub kind: TokenKind,
    pub name: String,
    pub jti: String,
}

// A command is moved once, through the core's channel: the size of the largest (a call with
// its request) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    /// A call; replies go to `reply`, the last one final.
    Call {
        caller: Caller,
        request: Request,
        reply: mpsc::UnboundedSender<Reply>,
        /// Identifies the stream, so a later `Gone` matches only its own call.
        stream: u64,
    },
    /// The caller of `stream` went away (stream stopped, connection lost).
    Gone { stream: u64 },
    /// The caller of `stream` received its final reply (the peer acknowledged it, or closed
    /// its connection on purpose after reading it).
    Delivered { stream: u64 },
}

/// The key pair and the controller reference put into credentials.
pub struct Authority {
    pub signer: Signer,
    pub ctl: ControllerRef,
    /// With several controllers: every live one's address, comma-separated, for the credentials
    /// issued from now on (kept current by [`crate::cluster`]); `None`: `ctl.endpoint`.
    pub cluster_endpoints: std::sync::RwLock<Option<String>>,
}

impl Authority {
    pub fn new(signer: Signer, ctl: ControllerRef) -> Authority {
        Authority {
            signer,
            ctl,
            cluster_endpoints: std::sync::RwLock::new(None),
        }
    }

    /// The controller reference credentials carry: how to reach (any of) the controllers.
    pub fn ctl_ref(&self) -> ControllerRef {
        let mut c = self.ctl.clone();
        if let Some(e) = self
            .cluster_endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            c.endpoint = e;
        }
        c
    }

    pub fn set_endpoints(&self, endpoints: String) {
        *self
            .cluster_endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(endpoints);
    }
}

pub const ISSUER: &str = "jmp-controller";

struct Watcher {
    tx: mpsc::UnboundedSender<Reply>,
    stream: u64,
    last: Option<(u32, Option<String>)>,
    wait_until: u64,
}

struct Link {
    tx: mpsc::UnboundedSender<Reply>,
    stream: u64,
}

pub struct Core<S: LeaseStore> {
    store: S,
    store_name: &'static str,
    revision: u64,
    book: LeaseBook,
    clients: BTreeMap<String, ClientRecord>,
    exporters: BTreeMap<String, ExporterRecord>,
    dirty: BTreeSet<(Table, String)>,
    /// request id → who is waiting for its answer.
    watchers: HashMap<String, Watcher>,
    /// stream → request id, for `Gone`.
    watcher_streams: HashMap<u64, String>,
    /// Requests (waiting, or granted but not yet delivered) whose requester went away, and
    /// when they are given up.
    orphans: HashMap<String, Instant>,
    links: HashMap<String, Link>,
    link_streams: HashMap<u64, String>,
    push: BTreeSet<String>,
    ended: HashMap<String, Vec<EndedLease>>,
    auth: Arc<Authority>,
    metrics: Arc<Metrics>,
    default_max_secs: u64,
    /// Waiting requests one client may have at once.
    max_waiting: usize,
    /// Replies held back until the batch is durable.
    out: Vec<(mpsc::UnboundedSender<Reply>, Reply)>,
    positions_dirty: bool,
    orphan_grace: Duration,
    /// The request ids in the store's `unclaimed` table (see [`Table::Unclaimed`]).
    unclaimed_stored: BTreeSet<String>,
    /// The relay for exporters behind NAT (`None`: this controller relays nothing).
    relays: Option<crate::relay::Relays>,
    /// Checks the lease tokens presented to the relay.
    verifier: jmp_transport::token::Verifier,
    /// Label sets of `jmp_lease_policy_used_ratio` exported now (removed when a lease ends).
    policy_series: BTreeSet<(String, String, String)>,
    policy_updated: Option<Instant>,
    /// Why a lease is being ended by its exporter's failed beforeLease hook (shown to jmpd and
    /// so to the client instead of "released").
    hook_failures: HashMap<String, String>,
    /// Ended leases, for usage reports.
    usage: crate::usage::History,
    /// Store writes of the history (new records, pruned ones) for the next commit.
    usage_ops: Vec<Op>,
    /// Per live lease: up to when its time is in `jmp_leased_seconds_total`.
    accrued: HashMap<String, Millis>,
    /// When [`Core::accrue`] last walked the live leases.
    accrued_at: Millis,
    /// Lifetime of the credentials issued, seconds (`--credential-ttl`; 0: they never expire).
    credential_ttl: u64,
}

/// Default of `--credential-ttl`: 90 days; `jmp` and `jmpd` renew when 30 are left.
pub const DEFAULT_CREDENTIAL_TTL_SECS: u64 = 90 * 86_400;

/// How often the leased-seconds counter catches up with the live leases.
pub const ACCRUE_EVERY: Millis = 15_000;

/// The lease name a waiting request will get ("" if it is not waiting).
fn lease_name_of(book: &LeaseBook, request_id: &str) -> String {
    book.waiting_by_id(request_id)
        .map(|w| w.lease_name.clone())
        .unwrap_or_default()
}

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn err(code: CtlErrorCode, msg: impl Into<String>) -> Reply {
    Reply::Error(CtlError::new(code, msg))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

fn fmt_secs(s: u64) -> String {
    if s.is_multiple_of(3600) && s >= 3600 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Names of clients and exporters: what a label value may be (they appear in labels, file
/// names and metrics).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    parse_label(&format!("name={name}"))
        .map(|_| ())
        .map_err(|e| format!("invalid {what} name {name:?}: {}", e.message))?;
    if name.is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    Ok(())
}

pub fn lease_info(l: &Lease) -> LeaseInfo {
    LeaseInfo {
        name: l.name.clone(),
        client: l.client.clone(),
        exporter: l.exporter.clone(),
        selector: l.selector.clone(),
        begin: l.begin / 1000,
        end: l.end / 1000,
        request_id: l.request_id.clone(),
        status: "active".into(),
        job: l.job.clone(),
    }
}

fn waiting_info(w: &Waiting) -> LeaseInfo {
    LeaseInfo {
        name: w.lease_name.clone(),
        client: w.client.clone(),
        exporter: w.exporter.clone().unwrap_or_default(),
        selector: w.selector.clone(),
        begin: w.not_before / 1000,
        end: w.wait_until / 1000,
        request_id: w.request_id.clone(),
        status: if w.reserved { "reserved" } else { "waiting" }.into(),
        job: w.job.clone(),
    }
}

impl<S: LeaseStore> Core<S> {
    /// Loads the durable state and rebuilds the book. Exporters start offline.
    pub fn open(
        mut store: S,
        store_name: &'static str,
        auth: Arc<Authority>,
        metrics: Arc<Metrics>,
        default_max_secs: u64,
    ) -> anyhow::Result<Core<S>> {
        let snap = store.load()?;
        let mut clients = BTreeMap::new();
        let mut exporters = BTreeMap::new();
        let mut leases = Vec::new();
        let mut waiting = Vec::new();
        let mut unclaimed = BTreeSet::new();
        let mut usage = crate::usage::History::new(crate::usage::DEFAULT_RETENTION_MS);
        for (t, k, v) in snap.records {
            let bad = |e: serde_json::Error| {
                anyhow::anyhow!("store record {}/{k} is not readable: {e}", t.name())
            };
            match t {
                Table::Clients => {
                    clients.insert(k.clone(), serde_json::from_slice(&v).map_err(bad)?);
                }
                Table::Exporters => {
                    exporters.insert(k.clone(), serde_json::from_slice(&v).map_err(bad)?);
                }
                Table::Leases => leases.push(serde_json::from_slice(&v).map_err(bad)?),
                Table::Waiting => waiting.push(serde_json::from_slice(&v).map_err(bad)?),
                Table::Unclaimed => {
                    unclaimed.insert(k.clone());
                }
                Table::Usage => usage.restore(serde_json::from_slice(&v).map_err(bad)?),
            }
        }
        let book = LeaseBook::restore(
            exporters
                .values()
                .map(|e: &ExporterRecord| (e.name.clone(), e.effective_labels(), e.enabled))
                .collect(),
            leases,
            waiting,
        );
        info!(
            clients = clients.len(),
            exporters = exporters.len(),
            leases = book.leases().count(),
            waiting = book.waiting().count(),
            revision = snap.revision,
            "state loaded"
        );
        let verifier = auth.signer.verifier();
        let mut core = Core {
            store,
            store_name,
            revision: snap.revision,
            book,
            clients,
            exporters,
            dirty: BTreeSet::new(),
            watchers: HashMap::new(),
            watcher_streams: HashMap::new(),
            orphans: HashMap::new(),
            links: HashMap::new(),
            link_streams: HashMap::new(),
            push: BTreeSet::new(),
            ended: HashMap::new(),
            auth,
            metrics,
            default_max_secs,
            max_waiting: MAX_WAITING_PER_CLIENT,
            out: Vec::new(),
            positions_dirty: false,
            orphan_grace: ORPHAN_GRACE,
            unclaimed_stored: unclaimed,
            relays: None,
            verifier,
            policy_series: BTreeSet::new(),
            policy_updated: None,
            hook_failures: HashMap::new(),
            usage,
            usage_ops: Vec::new(),
            accrued: HashMap::new(),
            accrued_at: 0,
            credential_ttl: DEFAULT_CREDENTIAL_TTL_SECS,
        };
        // Leases held across the restart: this process's counter starts at their time so far
        // (the previous process's counter had it; Prometheus sees the reset).
        let start = now_ms();
        let live: Vec<String> = core.book.leases().map(|l| l.name.clone()).collect();
        for name in live {
            core.accrued.insert(name, start);
        }
        // Every known exporter is offline until it registers (the "offline" alert needs the
        // series to exist).
        for name in core.exporters.keys() {
            core.metrics.exporter_up.with_label_values(&[name]).set(0);
        }
        // Waiting requests restored from the store have no requester connected yet: give
        // them the grace period to come back.
        // (A reservation needs nobody: it keeps its place.)
        let restored: Vec<String> = core
            .book
            .waiting()
            .filter(|w| !w.reserved)
            .map(|w| w.request_id.clone())
            .collect();
        for id in restored {
            core.orphans.insert(id, Instant::now() + core.orphan_grace);
        }
        // So do leases granted but not yet claimed when the previous process stopped. (Ids
        // whose lease has ended meanwhile are dropped from the store at the next commit.)
        let unclaimed: Vec<String> = core
            .unclaimed_stored
            .iter()
            .filter(|id| core.book.lease_by_request(id).is_some())
            .cloned()
            .collect();
        for id in unclaimed {
            core.orphans.insert(id, Instant::now() + core.orphan_grace);
        }
        Ok(core)
    }

    /// Serves the relay for exporters behind NAT (`--relay-bind`, `--relay-ports`).
    pub fn set_relay(&mut self, cfg: crate::relay::RelayConfig) {
        self.relays = Some(crate::relay::Relays::new(cfg, self.metrics.clone()));
    }

    /// Lifetime of the credentials this controller issues from now on (`--credential-ttl`;
    /// 0: no expiry).
    pub fn set_credential_ttl(&mut self, secs: u64) {
        self.credential_ttl = secs;
    }

    /// The admin credential file at `path` is missing, not this controller's current admin
    /// credential, or due for renewal: writes a good one there. A due one is renewed (same
    /// id: copies elsewhere keep working); a missing or foreign one is re-issued, revoking
    /// the old. `reissue: false` (a cluster member whose store already has an admin issued by
    /// another controller) renews only a file that holds the current credential.
    pub fn ensure_admin_file(
        &mut self,
        path: &std::path::Path,
        reissue: bool,
    ) -> anyhow::Result<()> {
        let now = now_ms() / 1000;
        let current = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_norway::from_str::<ClientConfig>(&t).ok())
            .and_then(|c| {
                self.verifier
                    .verify_any_within(&c.token, now, u64::MAX)
                    .ok()
            })
            .filter(|c| {
                c.sub == "admin"
                    && self
                        .clients
                        .get("admin")
                        .is_some_and(|r| r.jti == c.jti && r.admin)
            });
        let cred = match current {
            Some(c) if c.renew_at(None).is_none_or(|at| now < at) => return Ok(()),
            Some(c) => {
                info!(
                    "the admin credential is due for renewal: renewing {}",
                    path.display()
                );
                let cred = self.credential(IdentityKind::Client, "admin", &c.jti, true)?;
                self.issued_to_client(&cred);
                self.persist()?;
                cred
            }
            None if reissue || !self.has_client("admin") => {
                let _ = std::fs::remove_file(path);
                self.issue_admin("admin")?
            }
            None => {
                if !path.exists() {
                    info!(
                        "the cluster's admin credential was issued by another controller; copy its admin.yaml to {} to use jmp admin here",
                        path.display()
                    );
                }
                return Ok(());
            }
        };
        let yaml = serde_norway::to_string(&ClientConfig::new(&cred))?;
        jmp_transport::write_secret_file(path, yaml.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        info!("admin credential written to {}", path.display());
        Ok(())
    }

    /// How long ended leases stay in the usage history (`--usage-retention`; 0: forever).
    pub fn set_usage_retention(&mut self, ms: Millis) {
        self.usage.set_retention(ms);
    }

    /// Changes how many requests one client may have waiting (`--max-waiting-per-client`).
    pub fn set_max_waiting(&mut self, n: usize) {
        self.max_waiting = n.max(1);
    }

    /// Changes [`ORPHAN_GRACE`] (tests).
    /// Deadlines already set (those restored by [`Core::open`]) are capped to the new grace.
    pub fn set_orphan_grace(&mut self, d: Duration) {
        self.orphan_grace = d;
        let cap = Instant::now() + d;
        for deadline in self.orphans.values_mut() {
            *deadline = (*deadline).min(cap);
        }
    }

    /// Issues (or re-issues) the admin credential, revoking any earlier one.
    pub fn issue_admin(&mut self, name: &str) -> anyhow::Result<Credential> {
        let rec = ClientRecord {
            name: name.into(),
            labels: Labels::new(),
            allow: String::new(),
            max_duration_secs: 0,
            admin: true,
            jti: random_hex(12),
            created: now_ms() / 1000,
            expires: 0,
        };
        let cred = self.credential(IdentityKind::Client, name, &rec.jti, true)?;
        self.clients.insert(name.into(), rec);
        self.issued_to_client(&cred);
        self.dirty.insert((Table::Clients, name.into()));
        self.persist()?;
        Ok(cred)
    }

    pub fn has_client(&self, name: &str) -> bool {
        self.clients.contains_key(name)
    }

    fn credential(
        &self,
        kind: IdentityKind,
        name: &str,
        jti: &str,
        admin: bool,
    ) -> Result<Credential, jmp_transport::token::TokenError> {
        let ctl = self.auth.ctl_ref();
        let endpoint = ctl.endpoint.clone();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: name.into(),
            kind: match kind {
                IdentityKind::Client => TokenKind::Client,
                IdentityKind::Exporter => TokenKind::Exporter,
            },
            jti: jti.into(),
            iat: now_ms() / 1000,
            exp: (self.credential_ttl > 0).then(|| now_ms() / 1000 + self.credential_ttl),
            client: None,
            exporter: None,
            ctl: Some(ctl),
            admin,
        };
        Ok(Credential {
            kind,
            name: name.into(),
            token: self.auth.signer.sign(&claims)?,
            endpoint,
            fingerprint: self.auth.ctl.fingerprint.clone(),
        })
    }

    /// The task: applies commands in batches until every sender is gone. Returns an error when
    /// the store did not take a commit: then this memory may be ahead of the store, and must
    /// not serve anything more (the caller exits, or steps down and reloads).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> anyhow::Result<()> {
        let mut batch = Vec::new();
        loop {
            let deadline = self.next_wakeup();
            tokio::select! {
                n = rx.recv_many(&mut batch, 1024) => if n == 0 { break },
                _ = sleep_until_ms(deadline) => {}
            }
            let now = now_ms();
            for cmd in batch.drain(..) {
                self.handle(now, cmd);
            }
            let events = self.book.tick(now);
            self.on_events(now, events);
            self.reap_orphans(now);
            self.accrue(now);
            let pruned = self.usage.prune(now);
            self.usage_ops.extend(pruned);
            if let Err(e) = self.persist() {
                error!("cannot write the store: {e:#}; answering errors and stopping");
                self.fail_all(&e);
                return Err(e);
            }
            for (tx, r) in self.out.drain(..) {
                let _ = tx.send(r);
            }
            self.send_pushes();
            if self.positions_dirty {
                self.positions_dirty = false;
                self.send_positions(now);
            }
            self.update_gauges();
        }
        Ok(())
    }

    /// After a failed commit: everyone waiting on this core hears why, with an error that
    /// tells them to retry where it makes sense (a waiting request keeps its place in the
    /// store's queue, an exporter registers again).
    fn fail_all(&mut self, e: &anyhow::Error) {
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
        for (_, w) in self.watchers.drain() {
            let _ = w.tx.send(reply.clone());
        }
        for (_, l) in self.links.drain() {
            let _ = l.tx.send(reply.clone());
        }
    }

    fn next_wakeup(&self) -> Option<Millis> {
        let orphan = self.orphans.values().min().map(|i| {
            let left = i.saturating_duration_since(Instant::now());
            now_ms() + left.as_millis() as u64
        });
        // While leases are held the leased-seconds counter keeps up with them.
        let accrue = (!self.accrued.is_empty()).then(|| now_ms() + ACCRUE_EVERY);
        [self.book.next_deadline(), orphan, accrue]
            .into_iter()
            .flatten()
            .min()
    }

    /// Brings `jmp_leased_seconds_total` up to `now` for every live lease, at most every
    /// [`ACCRUE_EVERY`] (a burst's many batches do not each walk every lease).
    fn accrue(&mut self, now: Millis) {
        if now < self.accrued_at.saturating_add(ACCRUE_EVERY) {
            return;
        }
        self.accrued_at = now;
        let live: Vec<Lease> = self.book.leases().cloned().collect();
        for l in &live {
            self.accrue_lease(l, now);
        }
    }

    /// Adds `l`'s time not counted yet, up to `now` (or its end), to the leased-seconds counter.
    fn accrue_lease(&mut self, l: &Lease, now: Millis) {
        let from = self
            .accrued
            .get(&l.name)
            .copied()
            .unwrap_or(l.begin)
            .max(l.begin);
        let to = now.min(l.end);
        if to > from {
            self.metrics
                .leased_seconds
                .with_label_values(&[&self.team(&l.client), &l.exporter])
                .inc_by((to - from) as f64 / 1000.0);
            self.accrued.insert(l.name.clone(), to);
        }
    }

    fn team(&self, client: &str) -> String {
        self.clients
            .get(client)
            .and_then(|c| c.labels.get("team").cloned())
            .unwrap_or_default()
    }

    fn persist(&mut self) -> anyhow::Result<()> {
        // The history's records go in the same commit as the ends of their leases.
        let mut ops = std::mem::take(&mut self.usage_ops);
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
            .orphans
            .keys()
            .filter(|id| self.book.lease_by_request(id).is_some())
            .cloned()
            .collect();
        for id in unclaimed.difference(&self.unclaimed_stored) {
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
        for id in self.unclaimed_stored.difference(&unclaimed) {
            ops.push(Op::Delete {
                table: Table::Unclaimed,
                key: id.clone(),
            });
        }
        for (t, k) in std::mem::take(&mut self.dirty) {
            let v = match t {
                Table::Clients => self.clients.get(&k).map(serde_json::to_vec),
                Table::Exporters => self.exporters.get(&k).map(serde_json::to_vec),
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
        let t0 = Instant::now();
        self.revision = self.store.commit(self.revision, &ops)?;
        self.unclaimed_stored = unclaimed;
        self.metrics
            .store_commit
            .with_label_values(&[self.store_name])
            .observe(t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn reply(&mut self, tx: &mpsc::UnboundedSender<Reply>, r: Reply) {
        self.out.push((tx.clone(), r));
    }

    fn handle(&mut self, now: Millis, cmd: Cmd) {
        match cmd {
            Cmd::Delivered { stream } => {
                // A lease granted from the queue reached its requester: no longer at risk of
                // being held for nobody.
                if let Some(id) = self.watcher_streams.remove(&stream) {
                    if self.watchers.get(&id).is_none_or(|w| w.stream != stream) {
                        self.orphans.remove(&id);
                    }
                }
            }
            Cmd::Gone { stream } => {
                if let Some(id) = self.watcher_streams.remove(&stream) {
                    if self.watchers.get(&id).is_some_and(|w| w.stream == stream) {
                        self.watchers.remove(&id);
                        let reserved = self.book.waiting_by_id(&id).is_some_and(|w| w.reserved);
                        if reserved {
                            // A reservation keeps its place with or without a caller.
                            debug!(request = %id, "a caller waiting on a reservation went away");
                        } else {
                            info!(request = %id, "requester went away; keeping its place for {}s", self.orphan_grace.as_secs());
                            self.orphans.insert(id, Instant::now() + self.orphan_grace);
                        }
                    }
                    // Otherwise its lease was granted and sent but never confirmed: the orphan
                    // mark set at the grant stays, and the lease is released when it runs out
                    // unless the requester comes back for it (same request id).
                }
                if let Some(name) = self.link_streams.remove(&stream) {
                    if self.links.get(&name).is_some_and(|l| l.stream == stream) {
                        self.links.remove(&name);
                        info!(exporter = %name, "offline");
                        self.metrics.exporter_up.with_label_values(&[&name]).set(0);
                        let ev = self.book.set_online(now, &name, false);
                        self.on_events(now, ev);
                    }
                }
            }
            Cmd::Call {
                caller,
                request,
                reply,
                stream,
            } => {
                if let Err(e) = self.authenticate(&caller) {
                    self.reply(&reply, Reply::Error(e));
                    return;
                }
                self.call(now, caller, request, reply, stream);
            }
        }
    }

    fn authenticate(&self, c: &Caller) -> Result<(), CtlError> {
        let jti = match c.kind {
            TokenKind::Client => self.clients.get(&c.name).map(|r| &r.jti),
            TokenKind::Exporter => self.exporters.get(&c.name).map(|r| &r.jti),
            TokenKind::Lease => {
                return Err(CtlError::new(
                    CtlErrorCode::Unauthorized,
                    "a lease token is not a credential for the controller",
                ))
            }
        };
        match jti {
            None => Err(CtlError::new(
                CtlErrorCode::Unauthorized,
                format!("unknown {} {:?} (deleted?)", c.kind.as_str(), c.name),
            )),
            Some(j) if *j != c.jti => Err(CtlError::new(
                CtlErrorCode::Unauthorized,
                format!(
                    "this credential of {} {:?} was revoked (rotated or re-created); use the new one",
                    c.kind.as_str(),
                    c.name
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    fn is_admin(&self, c: &Caller) -> bool {
        c.kind == TokenKind::Client && self.clients.get(&c.name).is_some_and(|r| r.admin)
    }

    fn call(
        &mut self,
        now: Millis,
        caller: Caller,
        request: Request,
        tx: mpsc::UnboundedSender<Reply>,
        stream: u64,
    ) {
        let admin = self.is_admin(&caller);
        let admin_only = matches!(
            request,
            Request::CreateClient(_)
                | Request::CreateExporter(_)
                | Request::GetClients { .. }
                | Request::DeleteClient { .. }
                | Request::DeleteExporter { .. }
                | Request::SetExporterEnabled { .. }
                | Request::RebindExporter { .. }
                | Request::Usage(_)
        );
        if admin_only && !admin {
            self.reply(
                &tx,
                err(
                    CtlErrorCode::Forbidden,
                    format!("{} is not an admin", caller.name),
                ),
            );
            return;
        }
        let client_only = matches!(
            request,
            Request::CreateLease(_)
                | Request::UpdateLease { .. }
                | Request::DeleteLease { .. }
                | Request::LeaseAccess { .. }
                | Request::Relay { .. }
        );
        if client_only && caller.kind != TokenKind::Client {
            self.reply(
                &tx,
                err(CtlErrorCode::Forbidden, "only clients hold leases"),
            );
            return;
        }
        let r = match request {
            Request::Whoami => Reply::Identity {
                kind: match caller.kind {
                    TokenKind::Exporter => IdentityKind::Exporter,
                    _ => IdentityKind::Client,
                },
                name: caller.name.clone(),
                admin,
            },
            Request::CreateLease(req) => return self.create_lease(now, &caller, req, tx, stream),
            Request::GetLeases { all } => {
                let mine = |c: &str| all || c == caller.name;
                let mut leases: Vec<LeaseInfo> = self
                    .book
                    .leases()
                    .filter(|l| mine(&l.client))
                    .map(lease_info)
                    .collect();
                leases.extend(
                    self.book
                        .waiting()
                        .filter(|w| mine(&w.client))
                        .map(waiting_info),
                );
                Reply::Leases { leases }
            }
            Request::UpdateLease {
                name,
                duration_secs,
                extend_secs,
            } => self.update_lease(now, &caller, admin, &name, duration_secs, extend_secs),
            Request::DeleteLease { names, all } => {
                self.delete_leases(now, &caller, admin, names, all)
            }
            Request::LeaseAccess { name } => self.access(now, &caller, name),
            Request::GetExporters { selector } => self.get_exporters(&caller, admin, selector),
            Request::CreateClient(spec) => self.create_client(spec),
            Request::CreateExporter(spec) => self.create_exporter(now, spec),
            Request::GetClients { name } => {
                let clients: Vec<ClientInfo> = self
                    .clients
                    .values()
                    .filter(|c| name.as_ref().is_none_or(|n| *n == c.name))
                    .map(|c| ClientInfo {
                        name: c.name.clone(),
                        labels: c.labels.clone(),
                        allow: c.allow.clone(),
                        max_duration_secs: c.max_duration_secs,
                        admin: c.admin,
                        credential_expires: (c.expires > 0).then_some(c.expires),
                    })
                    .collect();
                if clients.is_empty() && name.is_some() {
                    err(
                        CtlErrorCode::NotFound,
                        format!("no client {:?}", name.unwrap_or_default()),
                    )
                } else {
                    Reply::Clients { clients }
                }
            }
            Request::DeleteClient { name } => self.delete_client(now, &name),
            Request::DeleteExporter { name } => self.delete_exporter(now, &name),
            Request::SetExporterEnabled { name, enabled } => match self.exporters.get_mut(&name) {
                None => err(CtlErrorCode::NotFound, format!("no exporter {name:?}")),
                Some(rec) => {
                    rec.enabled = enabled;
                    let labels = rec.effective_labels();
                    self.dirty.insert((Table::Exporters, name.clone()));
                    let ev = self.book.upsert_exporter(now, &name, labels, enabled);
                    self.on_events(now, ev);
                    self.push.insert(name.clone());
                    Reply::Done
                }
            },
            Request::RebindExporter { name } => match self.exporters.get_mut(&name) {
                None => err(CtlErrorCode::NotFound, format!("no exporter {name:?}")),
                Some(rec) => {
                    info!(exporter = %name, old = %rec.fingerprint, "fingerprint unbound by an admin; the next registration binds one");
                    rec.fingerprint.clear();
                    rec.rejected_fingerprint = None;
                    self.dirty.insert((Table::Exporters, name.clone()));
                    Reply::Done
                }
            },
            Request::Rotate => self.rotate(&caller),
            Request::Renew => self.renew(&caller),
            Request::Relay { token } => return self.relay(&caller, &token, tx),
            Request::LeaseHook(report) => self.lease_hook(now, &caller, report),
            Request::Usage(q) => {
                let live: Vec<(&Lease, String)> = self
                    .book
                    .leases()
                    .map(|l| (l, self.team(&l.client)))
                    .collect();
                Reply::Usage(self.usage.report(now, &q, live.into_iter()))
            }
            Request::Register(reg) => return self.register(now, &caller, reg, tx, stream),
        };
        self.reply(&tx, r);
    }

    fn client_policy(&self, client: &str) -> (Selector, String, u64) {
        let rec = self.clients.get(client);
        let allow = rec.map(|c| c.allow.clone()).unwrap_or_default();
        let max = rec
            .map(|c| c.max_duration_secs)
            .filter(|m| *m > 0)
            .unwrap_or(self.default_max_secs);
        (Selector::parse(&allow).unwrap_or_default(), allow, max)
    }

    fn create_lease(
        &mut self,
        now: Millis,
        caller: &Caller,
        req: LeaseRequest,
        tx: mpsc::UnboundedSender<Reply>,
        stream: u64,
    ) {
        let team = self.team(&caller.name);
        let refuse = |me: &mut Self, result: &str, r: Reply| {
            me.metrics
                .requests
                .with_label_values(&[result, &team])
                .inc();
            me.reply(&tx, r);
        };
        if req.request_id.is_empty() || req.request_id.len() > 128 {
            return refuse(
                self,
                "invalid",
                err(CtlErrorCode::Invalid, "request_id must be 1-128 characters"),
            );
        }
        let selector = match Selector::parse(&req.selector) {
            Ok(s) => s,
            Err(e) => {
                return refuse(
                    self,
                    "invalid",
                    err(CtlErrorCode::Invalid, format!("selector: {e}")),
                )
            }
        };
        if req.duration_secs == 0 {
            return refuse(
                self,
                "invalid",
                err(CtlErrorCode::Invalid, "duration must be positive"),
            );
        }
        // A request id names one client's request: another client presenting it (by accident
        // or on purpose) must not take over its place or its lease.
        let owner = self
            .book
            .waiting_by_id(&req.request_id)
            .map(|w| w.client.clone())
            .or_else(|| {
                self.book
                    .lease_by_request(&req.request_id)
                    .map(|l| l.client.clone())
            });
        if owner.is_some_and(|o| o != caller.name) {
            return refuse(
                self,
                "invalid",
                err(
                    CtlErrorCode::Invalid,
                    "request_id is in use by another client",
                ),
            );
        }
        // Bounds before any arithmetic on values from the wire.
        const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;
        if req.wait_secs > TEN_YEARS || req.begin_time.is_some_and(|t| t > now / 1000 + TEN_YEARS) {
            return refuse(
                self,
                "invalid",
                err(
                    CtlErrorCode::Invalid,
                    "wait or begin time is more than ten years away",
                ),
            );
        }
        let (policy, allow, max) = self.client_policy(&caller.name);
        if req.duration_secs > max {
            return refuse(
                self,
                "forbidden",
                err(
                    CtlErrorCode::Forbidden,
                    format!(
                        "a lease of {} is longer than client {} may hold (at most {})",
                        fmt_secs(req.duration_secs),
                        caller.name,
                        fmt_secs(max)
                    ),
                ),
            );
        }
        if req
            .job
            .as_ref()
            .is_some_and(|j| j.is_empty() || j.len() > 128)
        {
            return refuse(
                self,
                "invalid",
                err(CtlErrorCode::Invalid, "job must be 1-128 characters"),
            );
        }
        // A quota on waiting requests, so one client cannot fill the queue (a retry of a
        // request already waiting is not a new one).
        let waiting_mine = self
            .book
            .waiting()
            .filter(|w| w.client == caller.name && w.request_id != req.request_id)
            .count();
        if waiting_mine >= self.max_waiting {
            return refuse(
                self,
                "quota",
                err(
                    CtlErrorCode::Forbidden,
                    format!(
                        "client {} already has {waiting_mine} requests waiting (at most {} per client); withdraw some with jmp delete lease NAME",
                        caller.name, self.max_waiting
                    ),
                ),
            );
        }
        let not_before = req
            .begin_time
            .map(|t| t.saturating_mul(1000))
            .unwrap_or(now)
            .max(now);
        // A begin time in the future without --wait is a reservation: answered at once, it
        // waits in the queue from its begin time until granted or until its would-be end.
        let reserved = not_before > now && req.wait_secs == 0;
        let wait_until = if reserved {
            Some(not_before.saturating_add(req.duration_secs.saturating_mul(1000)))
        } else {
            (req.wait_secs > 0)
                .then(|| not_before.saturating_add(req.wait_secs.saturating_mul(1000)))
        };
        let mut lease_name = random_hex(8);
        while self.book.lease(&lease_name).is_some() {
            lease_name = random_hex(8);
        }
        let sel_text = selector.to_string();
        let (outcome, events) = self.book.request(
            now,
            NewRequest {
                request_id: req.request_id.clone(),
                lease_name,
                client: caller.name.clone(),
                selector,
                policy,
                exporter: req.exporter.clone(),
                duration: req.duration_secs.saturating_mul(1000),
                not_before,
                wait_until,
                job: req.job.clone(),
                reserved,
            },
        );
        match outcome {
            Outcome::Granted(lease) => {
                self.metrics
                    .requests
                    .with_label_values(&["granted", &team])
                    .inc();
                self.metrics
                    .grants
                    .with_label_values(&["immediate", &team])
                    .inc();
                self.metrics.wait.with_label_values(&[&team]).observe(0.0);
                info!(lease = %lease.name, client = %lease.client, exporter = %lease.exporter, "granted");
                self.push.insert(lease.exporter.clone());
                let r = Reply::Lease(lease_info(&lease));
                self.reply(&tx, r);
            }
            Outcome::Queued { .. } if reserved => {
                self.metrics
                    .requests
                    .with_label_values(&["reserved", &team])
                    .inc();
                let info = self.book.waiting_by_id(&req.request_id).map(waiting_info);
                match info {
                    Some(i) => {
                        info!(lease = %i.name, client = %i.client, begin = i.begin, "reserved");
                        self.reply(&tx, Reply::Lease(i));
                    }
                    None => self.reply(&tx, err(CtlErrorCode::Internal, "reservation lost")),
                }
            }
            Outcome::Queued { position, behind } => {
                self.metrics
                    .requests
                    .with_label_values(&["queued", &team])
                    .inc();
                let until = wait_until.unwrap_or(not_before);
                self.watch(&req.request_id, tx.clone(), stream, until);
                if let Some(w) = self.watchers.get_mut(&req.request_id) {
                    w.last = Some((position, behind.clone()));
                }
                let lease = lease_name_of(&self.book, &req.request_id);
                self.reply(
                    &tx,
                    Reply::Queued {
                        request_id: req.request_id,
                        lease,
                        position,
                        behind,
                        wait_until: until / 1000,
                    },
                );
            }
            Outcome::Refused(r) => {
                let (code, result) = match &r {
                    Refusal::NoSuchExporter(_) => (CtlErrorCode::NoMatch, "no_match"),
                    Refusal::NoMatch => (CtlErrorCode::NoMatch, "no_match"),
                    Refusal::OutsidePolicy { .. } => (CtlErrorCode::Forbidden, "outside_policy"),
                    Refusal::AllOffline { .. } => (CtlErrorCode::AllOffline, "all_offline"),
                    Refusal::AllBusy { .. } => (CtlErrorCode::AllBusy, "all_busy"),
                    Refusal::BadDuration => (CtlErrorCode::Invalid, "invalid"),
                    Refusal::LeaseNameInUse(_) => (CtlErrorCode::Internal, "invalid"),
                };
                let shown = if sel_text.is_empty() {
                    "(any)".to_string()
                } else {
                    sel_text.clone()
                };
                let mut msg = r.message(&shown, &allow);
                if matches!(r, Refusal::AllBusy { .. }) {
                    msg.push_str("; add --wait SECONDS to queue for one");
                }
                refuse(self, result, err(code, msg));
            }
            Outcome::Existing(RequestState::Leased(lease)) => {
                self.orphans.remove(&req.request_id);
                self.reply(&tx, Reply::Lease(lease_info(&lease)));
            }
            Outcome::Existing(RequestState::Waiting {
                position,
                behind,
                wait_until,
            }) => {
                self.orphans.remove(&req.request_id);
                self.watch(&req.request_id, tx.clone(), stream, wait_until);
                let lease = lease_name_of(&self.book, &req.request_id);
                self.reply(
                    &tx,
                    Reply::Queued {
                        request_id: req.request_id,
                        lease,
                        position,
                        behind,
                        wait_until: wait_until / 1000,
                    },
                );
            }
        }
        self.on_events(now, events);
    }

    fn watch(&mut self, id: &str, tx: mpsc::UnboundedSender<Reply>, stream: u64, until: u64) {
        self.watchers.insert(
            id.to_string(),
            Watcher {
                tx,
                stream,
                last: None,
                wait_until: until,
            },
        );
        self.watcher_streams.insert(stream, id.to_string());
    }

    fn own_lease(&self, caller: &Caller, admin: bool, name: &str) -> Result<Lease, CtlError> {
        match self.book.lease(name) {
            Some(l) if admin || l.client == caller.name => Ok(l.clone()),
            Some(l) => Err(CtlError::new(
                CtlErrorCode::Forbidden,
                format!("lease {name} belongs to {}", l.client),
            )),
            None => Err(CtlError::new(
                CtlErrorCode::NotFound,
                format!("no active lease {name:?} (ended, or never granted)"),
            )),
        }
    }

    fn update_lease(
        &mut self,
        now: Millis,
        caller: &Caller,
        admin: bool,
        name: &str,
        duration: Option<u64>,
        extend: Option<u64>,
    ) -> Reply {
        let lease = match self.own_lease(caller, admin, name) {
            Ok(l) => l,
            Err(e) => return Reply::Error(e),
        };
        let end = match (duration, extend) {
            (Some(d), None) => lease.begin.saturating_add(d.saturating_mul(1000)),
            (None, Some(e)) => lease.end.saturating_add(e.saturating_mul(1000)),
            _ => {
                return err(
                    CtlErrorCode::Invalid,
                    "give exactly one of --duration and --extend",
                )
            }
        };
        let (_, _, max) = self.client_policy(&lease.client);
        let total = end.saturating_sub(lease.begin) / 1000;
        if !admin && total > max {
            return err(
                CtlErrorCode::Forbidden,
                format!(
                    "lease {name} would last {} in all; client {} may hold a lease for at most {}",
                    fmt_secs(total),
                    lease.client,
                    fmt_secs(max)
                ),
            );
        }
        match self.book.set_end(now, name, end) {
            Ok(l) => {
                info!(lease = %name, end = l.end / 1000, "lease end changed");
                self.push.insert(l.exporter.clone());
                // A shortened lease that is already over ends now.
                let ev = self.book.tick(now);
                self.on_events(now, ev);
                Reply::Lease(lease_info(&l))
            }
            Err(e) => err(CtlErrorCode::NotFound, e),
        }
    }

    fn delete_leases(
        &mut self,
        now: Millis,
        caller: &Caller,
        admin: bool,
        names: Vec<String>,
        all: bool,
    ) -> Reply {
        let mut targets = Vec::new();
        if all {
            targets.extend(
                self.book
                    .leases()
                    .filter(|l| l.client == caller.name)
                    .map(|l| l.name.clone()),
            );
            targets.extend(
                self.book
                    .waiting()
                    .filter(|w| w.client == caller.name)
                    .map(|w| w.lease_name.clone()),
            );
        } else {
            let mut unknown = Vec::new();
            for n in &names {
                let owner = self.book.lease(n).map(|l| l.client.clone()).or_else(|| {
                    self.book
                        .waiting()
                        .find(|w| w.lease_name == *n)
                        .map(|w| w.client.clone())
                });
                match owner {
                    Some(o) if admin || o == caller.name => targets.push(n.clone()),
                    Some(o) => {
                        return err(CtlErrorCode::Forbidden, format!("lease {n} belongs to {o}"))
                    }
                    None => unknown.push(n.clone()),
                }
            }
            if !unknown.is_empty() {
                return err(
                    CtlErrorCode::NotFound,
                    format!("no lease named {}", unknown.join(", ")),
                );
            }
        }
        for n in &targets {
            // Withdrawn waiting requests: tell whoever waits on them.
            if let Some(id) = self
                .book
                .waiting()
                .find(|w| w.lease_name == *n)
                .map(|w| w.request_id.clone())
            {
                if let Some(w) = self.watchers.remove(&id) {
                    self.watcher_streams.remove(&w.stream);
                    let r = err(CtlErrorCode::NotFound, format!("request {n} was deleted"));
                    self.out.push((w.tx, r));
                }
                self.orphans.remove(&id);
                self.positions_dirty = true;
            }
            let ev = self.book.release(now, n);
            self.on_events(now, ev);
        }
        Reply::Deleted { names: targets }
    }

    fn access(&mut self, now: Millis, caller: &Caller, name: Option<String>) -> Reply {
        let lease = match name {
            Some(n) => match self.own_lease(caller, false, &n) {
                Ok(l) => l,
                Err(e) => return Reply::Error(e),
            },
            None => {
                let mine: Vec<&Lease> = self
                    .book
                    .leases()
                    .filter(|l| l.client == caller.name)
                    .collect();
                match mine.as_slice() {
                    [l] => (*l).clone(),
                    [] => {
                        return err(
                            CtlErrorCode::NotFound,
                            format!(
                                "client {} has no active lease (jmp create lease -l SELECTOR)",
                                caller.name
                            ),
                        )
                    }
                    many => {
                        let names: Vec<&str> = many.iter().map(|l| l.name.as_str()).collect();
                        return err(
                            CtlErrorCode::Ambiguous,
                            format!(
                                "client {} holds {} leases ({}); pick one with --lease",
                                caller.name,
                                many.len(),
                                names.join(", ")
                            ),
                        );
                    }
                }
            }
        };
        let Some(rec) = self.exporters.get(&lease.exporter) else {
            return err(
                CtlErrorCode::NotFound,
                format!("exporter {} is gone", lease.exporter),
            );
        };
        if rec.address.is_empty() {
            return err(
                CtlErrorCode::AllOffline,
                format!(
                    "exporter {} has never registered, so its address is unknown",
                    rec.name
                ),
            );
        }
        let claims = Claims {
            iss: ISSUER.into(),
            sub: lease.name.clone(),
            kind: TokenKind::Lease,
            jti: random_hex(8),
            iat: now / 1000,
            exp: Some(lease.end.div_ceil(1000)),
            client: Some(lease.client.clone()),
            exporter: Some(lease.exporter.clone()),
            ctl: None,
            admin: false,
        };
        match self.auth.signer.sign(&claims) {
            Ok(token) => Reply::Access(Access {
                lease: lease_info(&lease),
                token,
                address: rec.address.clone(),
                fingerprint: rec.fingerprint.clone(),
                relay: rec.relay && self.relays.is_some(),
            }),
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    fn get_exporters(&self, caller: &Caller, admin: bool, selector: Option<String>) -> Reply {
        let sel = match Selector::parse(selector.as_deref().unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return err(CtlErrorCode::Invalid, format!("selector: {e}")),
        };
        let (policy, _, _) = self.client_policy(&caller.name);
        let exporters = self
            .exporters
            .values()
            .filter_map(|rec| {
                let labels = rec.effective_labels();
                if !sel.matches(&labels) || (!admin && !policy.matches(&labels)) {
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

    fn create_client(&mut self, spec: ClientSpec) -> Reply {
        if let Err(e) = check_name("client", &spec.name) {
            return err(CtlErrorCode::Invalid, e);
        }
        if let Err(e) = Selector::parse(&spec.allow) {
            return err(CtlErrorCode::Invalid, format!("--allow: {e}"));
        }
        let rec = ClientRecord {
            name: spec.name.clone(),
            labels: spec.labels,
            allow: spec.allow,
            max_duration_secs: spec.max_duration_secs,
            admin: spec.admin,
            jti: random_hex(12),
            created: now_ms() / 1000,
            expires: 0,
        };
        match self.credential(IdentityKind::Client, &rec.name, &rec.jti, rec.admin) {
            Ok(c) => {
                info!(client = %rec.name, "client created (any earlier credential revoked)");
                self.dirty.insert((Table::Clients, rec.name.clone()));
                self.clients.insert(rec.name.clone(), rec);
                self.issued_to_client(&c);
                Reply::Credential(c)
            }
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    fn create_exporter(&mut self, now: Millis, spec: ExporterSpec) -> Reply {
        if let Err(e) = check_name("exporter", &spec.name) {
            return err(CtlErrorCode::Invalid, e);
        }
        let jti = random_hex(12);
        let rec = match self.exporters.remove(&spec.name) {
            Some(mut r) => {
                r.labels = spec.labels;
                r.jti = jti;
                r
            }
            None => ExporterRecord {
                name: spec.name.clone(),
                labels: spec.labels,
                config_labels: Labels::new(),
                enabled: true,
                jti,
                created: now / 1000,
                address: String::new(),
                fingerprint: String::new(),
                rejected_fingerprint: None,
                devices: Vec::new(),
                relay: false,
            },
        };
        let cred = self.credential(IdentityKind::Exporter, &rec.name, &rec.jti, false);
        let ev = self
            .book
            .upsert_exporter(now, &rec.name, rec.effective_labels(), rec.enabled);
        self.dirty.insert((Table::Exporters, rec.name.clone()));
        // A re-issued credential revokes the old one: drop the old registration.
        if let Some(l) = self.links.remove(&rec.name) {
            let _ = l.tx.send(err(
                CtlErrorCode::Unauthorized,
                "this exporter's credential was re-issued",
            ));
            let ev = self.book.set_online(now, &rec.name, false);
            self.on_events(now, ev);
        }
        if !self.links.contains_key(&rec.name) {
            self.metrics
                .exporter_up
                .with_label_values(&[&rec.name])
                .set(0);
        }
        self.exporters.insert(rec.name.clone(), rec);
        self.on_events(now, ev);
        match cred {
            Ok(c) => Reply::Credential(c),
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    fn delete_client(&mut self, now: Millis, name: &str) -> Reply {
        if self.clients.remove(name).is_none() {
            return err(CtlErrorCode::NotFound, format!("no client {name:?}"));
        }
        self.dirty.insert((Table::Clients, name.into()));
        let waiting: Vec<String> = self
            .book
            .waiting()
            .filter(|w| w.client == name)
            .map(|w| w.request_id.clone())
            .collect();
        for id in waiting {
            self.orphans.remove(&id);
            if let Some(w) = self.watchers.remove(&id) {
                self.watcher_streams.remove(&w.stream);
                self.out.push((
                    w.tx,
                    err(
                        CtlErrorCode::Unauthorized,
                        format!("client {name} was deleted"),
                    ),
                ));
            }
        }
        let ev = self.book.remove_client(now, name);
        self.on_events(now, ev);
        self.positions_dirty = true;
        info!(client = %name, "client deleted");
        Reply::Deleted {
            names: vec![name.into()],
        }
    }

    fn delete_exporter(&mut self, now: Millis, name: &str) -> Reply {
        if self.exporters.remove(name).is_none() {
            return err(CtlErrorCode::NotFound, format!("no exporter {name:?}"));
        }
        self.dirty.insert((Table::Exporters, name.into()));
        let ev = self.book.remove_exporter(now, name);
        self.on_events(now, ev);
        // Its lease's end and then the refusal reach jmpd after the commit, like everything.
        self.push.remove(name);
        if let Some(l) = self.links.remove(name) {
            let ended = self.ended.remove(name).unwrap_or_default();
            self.out.push((
                l.tx.clone(),
                Reply::ExporterState {
                    lease: None,
                    ended,
                    enabled: false,
                    at: now / 1000,
                    cleaning: None,
                },
            ));
            self.out.push((
                l.tx,
                err(
                    CtlErrorCode::Unauthorized,
                    format!("exporter {name} was deleted"),
                ),
            ));
        }
        info!(exporter = %name, "exporter deleted");
        let _ = self.metrics.exporter_up.remove_label_values(&[name]);
        Reply::Deleted {
            names: vec![name.into()],
        }
    }

    fn rotate(&mut self, caller: &Caller) -> Reply {
        let jti = random_hex(12);
        let (kind, admin) = match caller.kind {
            TokenKind::Exporter => match self.exporters.get_mut(&caller.name) {
                Some(r) => {
                    r.jti = jti.clone();
                    self.dirty.insert((Table::Exporters, caller.name.clone()));
                    (IdentityKind::Exporter, false)
                }
                None => return err(CtlErrorCode::NotFound, "exporter gone"),
            },
            _ => match self.clients.get_mut(&caller.name) {
                Some(r) => {
                    r.jti = jti.clone();
                    self.dirty.insert((Table::Clients, caller.name.clone()));
                    (IdentityKind::Client, r.admin)
                }
                None => return err(CtlErrorCode::NotFound, "client gone"),
            },
        };
        info!(name = %caller.name, "credential rotated; the old one is revoked");
        match self.credential(kind, &caller.name, &jti, admin) {
            Ok(c) => {
                if matches!(c.kind, IdentityKind::Client) {
                    self.issued_to_client(&c);
                }
                Reply::Credential(c)
            }
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    /// Records when the credential just issued to client `name` expires (shown by `jmp admin
    /// get clients`, so an admin sees a client that stopped renewing).
    fn issued_to_client(&mut self, cred: &Credential) {
        let exp = jmp_transport::token::peek(&cred.token)
            .ok()
            .and_then(|c| c.exp)
            .unwrap_or(0);
        if let Some(r) = self.clients.get_mut(&cred.name) {
            if r.expires != exp {
                r.expires = exp;
                self.dirty.insert((Table::Clients, cred.name.clone()));
            }
        }
    }

    /// The caller's credential again with a fresh expiry: the same id, so nothing is revoked
    /// (a credential shared by many CI runners keeps working on all of them; `rotate` is the
    /// one that revokes).
    fn renew(&mut self, caller: &Caller) -> Reply {
        let (kind, admin) = match caller.kind {
            TokenKind::Exporter => (IdentityKind::Exporter, false),
            _ => (IdentityKind::Client, self.is_admin(caller)),
        };
        debug!(name = %caller.name, "credential renewed");
        match self.credential(kind, &caller.name, &caller.jti, admin) {
            Ok(c) => {
                if matches!(c.kind, IdentityKind::Client) {
                    self.issued_to_client(&c);
                }
                Reply::Credential(c)
            }
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    fn register(
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
        let Some(rec) = self.exporters.get_mut(&name) else {
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
                self.dirty.insert((Table::Exporters, name.clone()));
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
            self.dirty.insert((Table::Exporters, name.clone()));
        }
        let labels = rec.effective_labels();
        let enabled = rec.enabled;
        if let Some(old) = self.links.insert(
            name.clone(),
            Link {
                tx: tx.clone(),
                stream,
            },
        ) {
            let _ = old.tx.send(err(
                CtlErrorCode::Unauthorized,
                "replaced by a newer registration of the same exporter",
            ));
        }
        self.link_streams.insert(stream, name.clone());
        let mut ev = self.book.upsert_exporter(now, &name, labels, enabled);
        // Its cleanup after each lease, and one it still owes (it restarted, or was cut off,
        // before running it): held before it comes online, so nobody is granted it first.
        let cleanup = reg.cleanup_secs.map(|s| s.saturating_mul(1000));
        self.book.set_cleanup(&name, cleanup);
        if let (Some(owed), Some(d)) = (reg.cleaning.clone(), cleanup) {
            let current = self.book.lease_of_exporter(&name).map(|l| l.name.clone());
            let cleaning = self.book.exporter(&name).and_then(|e| e.cleaning.clone());
            if current.as_deref() != Some(owed.as_str()) && cleaning.is_none() {
                info!(exporter = %name, lease = %owed, "exporter still owes its cleanup after a lease; not granted until done");
                ev.extend(
                    self.book
                        .set_cleaning(now, &name, Some((now.saturating_add(d), owed))),
                );
            }
        }
        ev.extend(self.book.set_online(now, &name, true));
        info!(exporter = %name, "online");
        self.metrics.exporter_up.with_label_values(&[&name]).set(1);
        self.push.insert(name);
        self.on_events(now, ev);
    }

    fn on_events(&mut self, now: Millis, events: Vec<Event>) {
        for e in events {
            match e {
                Event::Granted { lease } => {
                    let team = self.team(&lease.client);
                    self.metrics
                        .grants
                        .with_label_values(&["queued", &team])
                        .inc();
                    self.metrics
                        .wait
                        .with_label_values(&[&team])
                        .observe(lease.begin.saturating_sub(lease.requested) as f64 / 1000.0);
                    info!(lease = %lease.name, client = %lease.client, exporter = %lease.exporter, "granted from the queue");
                    self.push.insert(lease.exporter.clone());
                    self.positions_dirty = true;
                    match self.watchers.remove(&lease.request_id) {
                        Some(w) => {
                            // The stream stays mapped to the request until its caller confirms
                            // receipt (`Delivered`); until then the grant counts as unclaimed.
                            let grace = self.orphan_grace;
                            self.orphans
                                .insert(lease.request_id.clone(), Instant::now() + grace);
                            self.out.push((w.tx, Reply::Lease(lease_info(&lease))));
                        }
                        None if lease.reserved => {
                            // A reservation's grant is claimed when its holder attaches.
                        }
                        None => {
                            // Nobody is listening right now: keep it for the grace period, in
                            // which a retry of the same request id picks it up.
                            let grace = self.orphan_grace;
                            self.orphans
                                .entry(lease.request_id.clone())
                                .or_insert_with(|| Instant::now() + grace);
                        }
                    }
                }
                Event::CleanupOverdue { exporter, lease } => {
                    warn!(exporter = %exporter, lease = %lease, "the exporter did not report its cleanup after the lease within its declared time; it may be leased again");
                    self.push.insert(exporter);
                }
                Event::Ended { lease, reason } => {
                    if let Some(r) = self.relays.as_mut() {
                        r.end_lease(&lease.name);
                    }
                    let team = self.team(&lease.client);
                    let held = now.min(lease.end).saturating_sub(lease.begin) as f64 / 1000.0;
                    // The rest of its time into the counter, then into the history.
                    self.accrue_lease(&lease, now);
                    self.accrued.remove(&lease.name);
                    match self.usage.ended(now, &lease, &reason, team.clone()) {
                        Ok(op) => self.usage_ops.push(op),
                        Err(e) => {
                            error!(lease = %lease.name, "cannot record the lease's usage: {e:#}")
                        }
                    }
                    self.metrics
                        .held
                        .with_label_values(&[reason.as_str(), &team])
                        .observe(held);
                    info!(lease = %lease.name, client = %lease.client, exporter = %lease.exporter, reason = reason.as_str(), "lease ended");
                    self.ended
                        .entry(lease.exporter.clone())
                        .or_default()
                        .push(EndedLease {
                            name: lease.name.clone(),
                            reason: match reason {
                                _ if self.hook_failures.contains_key(&lease.name) => format!(
                                    "lease {} ended: {}",
                                    lease.name,
                                    self.hook_failures.remove(&lease.name).unwrap_or_default()
                                ),
                                EndReason::Expired => format!("lease {} expired", lease.name),
                                EndReason::Released => {
                                    format!("lease {} was released", lease.name)
                                }
                                other => format!("lease {} ended: {}", lease.name, other.as_str()),
                            },
                        });
                    self.push.insert(lease.exporter.clone());
                    self.orphans.remove(&lease.request_id);
                    self.positions_dirty = true;
                }
                Event::WaitExpired { request } => {
                    let team = self.team(&request.client);
                    self.metrics.wait_timeouts.with_label_values(&[&team]).inc();
                    self.orphans.remove(&request.request_id);
                    if let Some(w) = self.watchers.remove(&request.request_id) {
                        self.watcher_streams.remove(&w.stream);
                        let waited = (now.saturating_sub(request.arrived)) / 1000;
                        self.out.push((
                            w.tx,
                            err(
                                CtlErrorCode::Timeout,
                                format!(
                                    "waited {} for an exporter matching '{}'; none became free",
                                    fmt_secs(waited),
                                    request.selector
                                ),
                            ),
                        ));
                    }
                    self.positions_dirty = true;
                }
            }
        }
    }

    /// Requests whose requester did not come back within the grace period are withdrawn; a
    /// lease granted to nobody is released, so a board never stays leased to a vanished caller.
    fn reap_orphans(&mut self, now: Millis) {
        let t = Instant::now();
        let due: Vec<String> = self
            .orphans
            .iter()
            .filter(|(_, d)| **d <= t)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.orphans.remove(&id);
            if let Some(w) = self.book.waiting_by_id(&id).cloned() {
                warn!(request = %id, client = %w.client, "requester did not come back; withdrawing its request");
                let ev = self.book.release(now, &w.lease_name);
                self.on_events(now, ev);
                self.positions_dirty = true;
                continue;
            }
            let granted = self.book.lease_by_request(&id).map(|l| l.name.clone());
            if let Some(l) = granted {
                warn!(lease = %l, "lease was granted while its requester was away and nobody picked it up; releasing it");
                let ev = self.book.release(now, &l);
                self.on_events(now, ev);
            }
        }
    }

    fn send_pushes(&mut self) {
        for name in std::mem::take(&mut self.push) {
            let ended = self.ended.remove(&name).unwrap_or_default();
            let Some(link) = self.links.get(&name) else {
                continue;
            };
            let lease = self.book.lease_of_exporter(&name).map(|l| ActiveLease {
                name: l.name.clone(),
                client: l.client.clone(),
                end: l.end.div_ceil(1000),
                team: self
                    .clients
                    .get(&l.client)
                    .and_then(|c| c.labels.get("team").cloned())
                    .unwrap_or_default(),
            });
            let cleaning = self
                .book
                .exporter(&name)
                .and_then(|e| e.cleaning.as_ref())
                .map(|(_, l)| l.clone());
            let enabled = self.exporters.get(&name).is_some_and(|r| r.enabled);
            let _ = link.tx.send(Reply::ExporterState {
                lease,
                ended,
                enabled,
                at: jmp_transport::unix_now(),
                cleaning,
            });
        }
        self.ended.clear();
    }

    fn send_positions(&mut self, now: Millis) {
        let ids: Vec<String> = self.watchers.keys().cloned().collect();
        for id in ids {
            let Some(pos) = self.book.position(now, &id) else {
                continue;
            };
            if let Some(w) = self.watchers.get_mut(&id) {
                if w.last.as_ref() != Some(&pos) {
                    w.last = Some(pos.clone());
                    let lease = lease_name_of(&self.book, &id);
                    let _ = w.tx.send(Reply::Queued {
                        request_id: id.clone(),
                        lease,
                        position: pos.0,
                        behind: pos.1,
                        wait_until: w.wait_until / 1000,
                    });
                }
            }
        }
    }

    fn update_gauges(&mut self) {
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
            .set(self.exporters.len() as i64);
        m.exporters.with_label_values(&["online"]).set(online);
        m.exporters.with_label_values(&["leased"]).set(leased);
        m.exporters.with_label_values(&["disabled"]).set(disabled);
        m.leases_active.set(leased);
        m.queue_length.set(self.book.waiting().count() as i64);
    }
}

impl<S: LeaseStore> Core<S> {
    /// `jmp_lease_policy_used_ratio` per leased exporter: at most every 5 s (it changes
    /// slowly, and a pass looks at every lease), and at once when the set of leases changed.
    fn update_policy_gauges(&mut self, now: Millis) {
        let due = self
            .policy_updated
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        let count = self.book.leases().count();
        if !due && count == self.policy_series.len() {
            return;
        }
        self.policy_updated = Some(Instant::now());
        let mut seen = BTreeSet::new();
        let leases: Vec<(String, String, Millis)> = self
            .book
            .leases()
            .map(|l| (l.exporter.clone(), l.client.clone(), l.begin))
            .collect();
        for (exporter, client, begin) in leases {
            let (_, _, max) = self.client_policy(&client);
            let team = self.team(&client);
            let used = now.saturating_sub(begin) as f64 / (max.max(1) as f64 * 1000.0);
            self.metrics
                .policy_used
                .with_label_values(&[&exporter, &client, &team])
                .set(used);
            seen.insert((exporter, client, team));
        }
        for gone in self.policy_series.difference(&seen) {
            let _ = self
                .metrics
                .policy_used
                .remove_label_values(&[&gone.0, &gone.1, &gone.2]);
        }
        self.policy_series = seen;
    }

    /// A client's `relay` call: checks its lease token and opens a relay session to the
    /// lease's exporter. The answer comes from the session once the exporter punched through.
    fn relay(&mut self, caller: &Caller, token: &str, tx: mpsc::UnboundedSender<Reply>) {
        if let Err(e) = self.open_relay(caller, token, &tx) {
            info!(client = %caller.name, "relay refused: {}", e.message);
            self.reply(&tx, Reply::Error(e));
        }
    }

    fn open_relay(
        &mut self,
        caller: &Caller,
        token: &str,
        tx: &mpsc::UnboundedSender<Reply>,
    ) -> Result<(), CtlError> {
        fn e(code: CtlErrorCode, m: impl Into<String>) -> CtlError {
            CtlError::new(code, m)
        }
        if self.relays.is_none() {
            return Err(e(
                CtlErrorCode::Forbidden,
                "this controller runs no relay (start it with --relay-bind ADDR)",
            ));
        }
        let claims = self
            .verifier
            .verify(token, TokenKind::Lease, jmp_transport::unix_now())
            .map_err(|x| {
                e(
                    CtlErrorCode::Unauthorized,
                    format!("lease token refused: {x}"),
                )
            })?;
        let lease = self.book.lease(&claims.sub).cloned().ok_or_else(|| {
            e(
                CtlErrorCode::NotFound,
                format!("lease {} is not active (it ended)", claims.sub),
            )
        })?;
        if lease.client != caller.name || claims.client.as_deref() != Some(caller.name.as_str()) {
            return Err(e(
                CtlErrorCode::Forbidden,
                format!("lease {} belongs to {}", lease.name, lease.client),
            ));
        }
        if claims.exporter.as_deref() != Some(lease.exporter.as_str()) {
            return Err(e(
                CtlErrorCode::Unauthorized,
                "the lease token names another exporter than its lease",
            ));
        }
        let relay_ok = self.exporters.get(&lease.exporter).is_some_and(|r| r.relay);
        if !relay_ok {
            return Err(e(
                CtlErrorCode::Forbidden,
                format!(
                    "exporter {} takes no relayed sessions (its config has no controller: {{relay: true}})",
                    lease.exporter
                ),
            ));
        }
        let Some(link) = self.links.get(&lease.exporter) else {
            return Err(e(
                CtlErrorCode::AllOffline,
                format!(
                    "exporter {} is not connected to the controller, so the relay cannot reach it",
                    lease.exporter
                ),
            ));
        };
        let link_tx = link.tx.clone();
        let Some(relays) = self.relays.as_mut() else {
            return Ok(());
        };
        let grant = relays
            .open(&lease.name, &lease.exporter, tx.clone())
            .map_err(|x| e(CtlErrorCode::Internal, x))?;
        let _ = link_tx.send(Reply::RelayOpen(grant));
        Ok(())
    }

    /// An exporter reports a lease hook: a failed beforeLease may end its lease; a finished
    /// afterLease ends the cleanup, so the exporter may be granted again.
    fn lease_hook(&mut self, now: Millis, caller: &Caller, r: HookReport) -> Reply {
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
                    if let Some(rec) = self.exporters.get_mut(&name) {
                        rec.enabled = false;
                        let labels = rec.effective_labels();
                        self.dirty.insert((Table::Exporters, name.clone()));
                        let ev = self.book.upsert_exporter(now, &name, labels, false);
                        self.on_events(now, ev);
                    }
                }
                let ev = self.book.set_cleaning(now, &name, None);
                self.on_events(now, ev);
                self.push.insert(name);
                Reply::Done
            }
        }
    }
}

async fn sleep_until_ms(deadline: Option<Millis>) {
    match deadline {
        None => std::future::pending().await,
        Some(d) => {
            let now = now_ms();
            tokio::time::sleep(Duration::from_millis(d.saturating_sub(now))).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;
    use jmp_protocol::ctl::{LeaseRequest, Registration};
    use jmp_transport::token::peek;

    struct Harness {
        tx: mpsc::Sender<Cmd>,
        admin: Caller,
        next: u64,
    }

    fn caller_of(c: &Credential) -> Caller {
        let claims = peek(&c.token).expect("credential parses");
        Caller {
            kind: claims.kind,
            name: claims.sub,
            jti: claims.jti,
        }
    }

    fn authority() -> Arc<Authority> {
        let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap();
        let signer = Signer::from_pkcs8(der.as_ref()).unwrap();
        let ctl = ControllerRef {
            endpoint: "127.0.0.1:1".into(),
            fingerprint: "sha256:00".into(),
            key: signer.public_key(),
        };
        Arc::new(Authority::new(signer, ctl))
    }

    fn start<S: LeaseStore>(store: S, auth: Arc<Authority>, grace: Duration) -> Harness {
        run(
            Core::open(store, "test", auth, Arc::new(Metrics::new()), 3600).unwrap(),
            grace,
        )
    }

    /// Runs `core` (set up as a test needs) with an admin and `grace` for orphans.
    fn run<S: LeaseStore>(mut core: Core<S>, grace: Duration) -> Harness {
        core.set_orphan_grace(grace);
        let admin = caller_of(&core.issue_admin("admin").unwrap());
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(core.run(rx));
        Harness { tx, admin, next: 1 }
    }

    impl Harness {
        /// Starts a call; returns its stream id and reply channel.
        async fn start_call(
            &mut self,
            caller: &Caller,
            request: Request,
        ) -> (u64, mpsc::UnboundedReceiver<Reply>) {
            let (rtx, rrx) = mpsc::unbounded_channel();
            self.next += 1;
            self.tx
                .send(Cmd::Call {
                    caller: caller.clone(),
                    request,
                    reply: rtx,
                    stream: self.next,
                })
                .await
                .unwrap();
            (self.next, rrx)
        }

        async fn call(&mut self, caller: &Caller, request: Request) -> Reply {
            let (_, mut rx) = self.start_call(caller, request).await;
            loop {
                let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("an answer")
                    .expect("an answer");
                if r.is_final() {
                    return r;
                }
            }
        }

        async fn client(&mut self, name: &str, allow: &str, max: u64) -> Caller {
            let admin = self.admin.clone();
            match self
                .call(
                    &admin,
                    Request::CreateClient(ClientSpec {
                        name: name.into(),
                        allow: allow.into(),
                        max_duration_secs: max,
                        ..Default::default()
                    }),
                )
                .await
            {
                Reply::Credential(c) => caller_of(&c),
                other => panic!("{other:?}"),
            }
        }

        /// Creates an exporter and brings it online; the receiver keeps it registered.
        async fn exporter(
            &mut self,
            name: &str,
            labels: &[(&str, &str)],
        ) -> mpsc::UnboundedReceiver<Reply> {
            let admin = self.admin.clone();
            let cred = match self
                .call(
                    &admin,
                    Request::CreateExporter(ExporterSpec {
                        name: name.into(),
                        labels: labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    }),
                )
                .await
            {
                Reply::Credential(c) => c,
                other => panic!("{other:?}"),
            };
            let (_, mut rx) = self
                .start_call(
                    &caller_of(&cred),
                    Request::Register(Registration {
                        address: "127.0.0.1:9".into(),
                        fingerprint: "sha256:11".into(),
                        ..Default::default()
                    }),
                )
                .await;
            assert!(matches!(rx.recv().await, Some(Reply::ExporterState { .. })));
            rx
        }
    }

    fn lease_req(id: &str, sel: &str, secs: u64, wait: u64) -> Request {
        Request::CreateLease(LeaseRequest {
            request_id: id.into(),
            selector: sel.into(),
            duration_secs: secs,
            wait_secs: wait,
            ..Default::default()
        })
    }

    fn code(r: &Reply) -> Option<CtlErrorCode> {
        match r {
            Reply::Error(e) => Some(e.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn revoked_credentials_policy_and_duration_limits_are_refused_with_reasons() {
        let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
        let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
        let _b = h.exporter("imx8-01", &[("board", "imx8")]).await;
        let old = h.client("ci", "board=rpi4", 7200).await;
        let r = h.call(&old, lease_req("r1", "board=imx8", 60, 0)).await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
        assert!(
            format!("{r:?}").contains("board=rpi4"),
            "names the policy: {r:?}"
        );
        let r = h
            .call(&old, lease_req("r2", "board=rpi4", 3 * 3600, 0))
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
        assert!(format!("{r:?}").contains("at most 2h"), "{r:?}");
        // Rotating revokes the credential used for the call.
        let new = match h.call(&old, Request::Rotate).await {
            Reply::Credential(c) => caller_of(&c),
            other => panic!("{other:?}"),
        };
        let r = h.call(&old, Request::Whoami).await;
        assert_eq!(code(&r), Some(CtlErrorCode::Unauthorized), "{r:?}");
        assert!(format!("{r:?}").contains("revoked"), "{r:?}");
        assert!(matches!(
            h.call(&new, Request::Whoami).await,
            Reply::Identity { .. }
        ));
        // Renewing does not: the same identity and id, a credential that expires, and the one
        // used for the call still works (copies of it elsewhere keep working).
        let renewed = match h.call(&new, Request::Renew).await {
            Reply::Credential(c) => c,
            other => panic!("{other:?}"),
        };
        let claims = jmp_transport::token::peek(&renewed.token).unwrap();
        assert_eq!(claims.jti, new.jti);
        assert_eq!(claims.sub, "ci");
        assert_eq!(
            claims.exp,
            Some(claims.iat + DEFAULT_CREDENTIAL_TTL_SECS),
            "credentials expire"
        );
        for c in [&new, &caller_of(&renewed)] {
            assert!(matches!(
                h.call(c, Request::Whoami).await,
                Reply::Identity { .. }
            ));
        }
        // Non-admins cannot create identities.
        let r = h
            .call(
                &new,
                Request::CreateClient(ClientSpec {
                    name: "x".into(),
                    ..Default::default()
                }),
            )
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    }

    #[tokio::test]
    async fn a_waiting_request_whose_requester_vanished_is_withdrawn_and_its_grant_released() {
        let mut h = start(MemStore::default(), authority(), Duration::from_millis(300));
        let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
        let c1 = h.client("c1", "", 0).await;
        let c2 = h.client("c2", "", 0).await;
        let l1 = match h.call(&c1, lease_req("r1", "board=rpi4", 600, 0)).await {
            Reply::Lease(l) => l,
            other => panic!("{other:?}"),
        };
        // c2 waits, then goes away without a word.
        let (stream, mut rx) = h
            .start_call(&c2, lease_req("r2", "board=rpi4", 600, 60))
            .await;
        assert!(matches!(
            rx.recv().await,
            Some(Reply::Queued { position: 1, .. })
        ));
        h.tx.send(Cmd::Gone { stream }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Its place is gone: freeing the exporter does not lease it to nobody.
        assert!(matches!(
            h.call(
                &c1,
                Request::DeleteLease {
                    names: vec![l1.name],
                    all: false
                }
            )
            .await,
            Reply::Deleted { .. }
        ));
        let admin = h.admin.clone();
        match h.call(&admin, Request::GetLeases { all: true }).await {
            Reply::Leases { leases } => assert!(leases.is_empty(), "{leases:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_requester_that_comes_back_in_time_keeps_its_place_and_gets_its_lease() {
        let mut h = start(MemStore::default(), authority(), Duration::from_secs(30));
        let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
        let c1 = h.client("c1", "", 0).await;
        let c2 = h.client("c2", "", 0).await;
        let l1 = match h.call(&c1, lease_req("r1", "board=rpi4", 600, 0)).await {
            Reply::Lease(l) => l,
            other => panic!("{other:?}"),
        };
        let (stream, mut rx) = h
            .start_call(&c2, lease_req("r2", "board=rpi4", 600, 60))
            .await;
        assert!(matches!(rx.recv().await, Some(Reply::Queued { .. })));
        h.tx.send(Cmd::Gone { stream }).await.unwrap();
        h.call(
            &c1,
            Request::DeleteLease {
                names: vec![l1.name],
                all: false,
            },
        )
        .await;
        // The retry (same request id) finds the lease granted while it was away, not a new one.
        match h.call(&c2, lease_req("r2", "board=rpi4", 600, 60)).await {
            Reply::Lease(l) => {
                assert_eq!(l.request_id, "r2");
                assert_eq!(l.exporter, "rpi4-01");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn granted_leases_survive_a_restart_from_the_store() {
        let dir = std::env::temp_dir().join(format!("jmp-core-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("leases.redb");
        let auth = authority();
        let (lease, client) = {
            let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), ORPHAN_GRACE);
            let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
            let c = h.client("c1", "", 0).await;
            let l = match h.call(&c, lease_req("r1", "board=rpi4", 600, 0)).await {
                Reply::Lease(l) => l,
                other => panic!("{other:?}"),
            };
            // Stop the core: every sender gone ends its task, which drops the store.
            drop(h);
            tokio::time::sleep(Duration::from_millis(200)).await;
            (l, c)
        };
        let mut h = start(RedbStore::open(&db).unwrap(), auth, ORPHAN_GRACE);
        match h.call(&client, Request::GetLeases { all: false }).await {
            Reply::Leases { leases } => {
                assert_eq!(leases.len(), 1, "{leases:?}");
                assert_eq!(leases[0].name, lease.name);
                assert_eq!(leases[0].exporter, "rpi4-01");
            }
            other => panic!("{other:?}"),
        }
        // The same request id after the restart is the same lease, not a second one.
        match h.call(&client, lease_req("r1", "board=rpi4", 600, 0)).await {
            Reply::Lease(l) => assert_eq!(l.name, lease.name),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unclaimed_grant_is_released_after_a_restart_too() {
        let dir = std::env::temp_dir().join(format!("jmp-core-unclaimed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("leases.redb");
        let auth = authority();
        let grace = Duration::from_millis(400);
        // Two exporters; on each, a lease is granted from the queue to a waiter. The waiter on
        // rpi4-01 confirms receipt; the one on rpi4-02 is still unconfirmed when the
        // controller stops (it crashed, or the requester died with it).
        {
            let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), grace);
            let a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
            let b = h.exporter("rpi4-02", &[("board", "rpi4")]).await;
            let c1 = h.client("c1", "", 0).await;
            let c2 = h.client("c2", "", 0).await;
            let mut first = Vec::new();
            for id in ["h1", "h2"] {
                match h.call(&c1, lease_req(id, "board=rpi4", 600, 0)).await {
                    Reply::Lease(l) => first.push(l.name),
                    other => panic!("{other:?}"),
                }
            }
            let mut waiters = Vec::new();
            for id in ["w1", "w2"] {
                let (s, mut rx) = h
                    .start_call(&c2, lease_req(id, "board=rpi4", 600, 60))
                    .await;
                assert!(matches!(rx.recv().await, Some(Reply::Queued { .. })));
                waiters.push((s, rx));
            }
            h.call(
                &c1,
                Request::DeleteLease {
                    names: first,
                    all: false,
                },
            )
            .await;
            for (_, rx) in waiters.iter_mut() {
                assert!(matches!(rx.recv().await, Some(Reply::Lease(_))));
            }
            h.tx.send(Cmd::Delivered {
                stream: waiters[0].0,
            })
            .await
            .unwrap();
            // Let the core commit the confirmation, then stop it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop((waiters, a, b, h));
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut h = start(RedbStore::open(&db).unwrap(), auth, grace);
        let admin = h.admin.clone();
        tokio::time::sleep(Duration::from_millis(900)).await;
        match h.call(&admin, Request::GetLeases { all: true }).await {
            Reply::Leases { leases } => {
                let mut ids: Vec<&str> = leases.iter().map(|l| l.request_id.as_str()).collect();
                ids.sort();
                assert_eq!(
                    ids,
                    ["w1"],
                    "the unclaimed grant is held for nobody: {leases:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        drop(h);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_queued_grant_that_never_reaches_its_requester_is_released() {
        let mut h = start(MemStore::default(), authority(), Duration::from_millis(400));
        let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
        let c1 = h.client("c1", "", 0).await;
        let c2 = h.client("c2", "", 0).await;
        let c3 = h.client("c3", "", 0).await;
        let l1 = match h.call(&c1, lease_req("r1", "board=rpi4", 600, 0)).await {
            Reply::Lease(l) => l,
            other => panic!("{other:?}"),
        };
        // c2 waits; the grant is sent to it, but its stream dies before confirming.
        let (s2, mut rx2) = h
            .start_call(&c2, lease_req("r2", "board=rpi4", 600, 60))
            .await;
        assert!(matches!(rx2.recv().await, Some(Reply::Queued { .. })));
        h.call(
            &c1,
            Request::DeleteLease {
                names: vec![l1.name],
                all: false,
            },
        )
        .await;
        assert!(matches!(rx2.recv().await, Some(Reply::Lease(_))));
        h.tx.send(Cmd::Gone { stream: s2 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let admin = h.admin.clone();
        match h.call(&admin, Request::GetLeases { all: true }).await {
            Reply::Leases { leases } => assert!(leases.is_empty(), "held for nobody: {leases:?}"),
            other => panic!("{other:?}"),
        }

        // The same again, but delivered: the lease stays.
        let l3 = match h.call(&c3, lease_req("r3", "board=rpi4", 600, 0)).await {
            Reply::Lease(l) => l,
            other => panic!("{other:?}"),
        };
        let (s4, mut rx4) = h
            .start_call(&c2, lease_req("r4", "board=rpi4", 600, 60))
            .await;
        assert!(matches!(rx4.recv().await, Some(Reply::Queued { .. })));
        h.call(
            &c3,
            Request::DeleteLease {
                names: vec![l3.name],
                all: false,
            },
        )
        .await;
        assert!(matches!(rx4.recv().await, Some(Reply::Lease(_))));
        h.tx.send(Cmd::Delivered { stream: s4 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        match h.call(&admin, Request::GetLeases { all: true }).await {
            Reply::Leases { leases } => {
                assert_eq!(leases.len(), 1, "{leases:?}");
                assert_eq!(leases[0].request_id, "r4");
            }
            other => panic!("{other:?}"),
        }
        // Another client cannot take over a request id.
        let r = h.call(&c1, lease_req("r4", "board=rpi4", 600, 0)).await;
        assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
        // Values from the wire that would overflow are refused, not wrapped.
        let r = h
            .call(
                &c1,
                Request::CreateLease(LeaseRequest {
                    request_id: "r5".into(),
                    selector: "board=rpi4".into(),
                    duration_secs: 60,
                    wait_secs: u64::MAX,
                    ..Default::default()
                }),
            )
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
    }

    /// The relay's admission in the core: only the lease's own client, with a valid token of
    /// an active lease, for an exporter that takes relayed sessions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_serves_only_the_lease_holder_of_a_relay_exporter_while_the_lease_lasts() {
        let mut core = Core::open(
            MemStore::default(),
            "test",
            authority(),
            Arc::new(Metrics::new()),
            3600,
        )
        .unwrap();
        core.set_relay(crate::relay::RelayConfig {
            bind: "127.0.0.1".parse().unwrap(),
            ports: None,
            host: None,
        });
        let mut h = run(core, ORPHAN_GRACE);
        let admin = h.admin.clone();
        let mut links = Vec::new();
        for (name, relay) in [("nat-01", true), ("lan-01", false)] {
            let cred = match h
                .call(
                    &admin,
                    Request::CreateExporter(jmp_protocol::ctl::ExporterSpec {
                        name: name.into(),
                        labels: [("site".to_string(), name.to_string())].into(),
                    }),
                )
                .await
            {
                Reply::Credential(c) => caller_of(&c),
                other => panic!("{other:?}"),
            };
            let (_, mut link) = h
                .start_call(
                    &cred,
                    Request::Register(Registration {
                        address: "127.0.0.1:9".into(),
                        fingerprint: "sha256:11".into(),
                        relay,
                        ..Default::default()
                    }),
                )
                .await;
            assert!(matches!(
                link.recv().await,
                Some(Reply::ExporterState { .. })
            ));
            links.push(link);
        }
        let mut clients = Vec::new();
        for name in ["c1", "c2"] {
            match h
                .call(
                    &admin,
                    Request::CreateClient(ClientSpec {
                        name: name.into(),
                        ..Default::default()
                    }),
                )
                .await
            {
                Reply::Credential(c) => clients.push(caller_of(&c)),
                other => panic!("{other:?}"),
            }
        }
        let (c1, c2) = (clients[0].clone(), clients[1].clone());
        let mut tokens = Vec::new();
        for (site, id) in [("nat-01", "r1"), ("lan-01", "r2")] {
            let lease = match h
                .call(
                    &c1,
                    Request::CreateLease(LeaseRequest {
                        request_id: id.into(),
                        selector: format!("site={site}"),
                        duration_secs: 600,
                        ..Default::default()
                    }),
                )
                .await
            {
                Reply::Lease(l) => l,
                other => panic!("{other:?}"),
            };
            match h
                .call(
                    &c1,
                    Request::LeaseAccess {
                        name: Some(lease.name.clone()),
                    },
                )
                .await
            {
                Reply::Access(a) => {
                    assert_eq!(a.relay, site == "nat-01", "{a:?}");
                    tokens.push((lease.name, a.token));
                }
                other => panic!("{other:?}"),
            }
        }
        // Someone else's token, garbage, an exporter without the relay: refused.
        let r = h
            .call(
                &c2,
                Request::Relay {
                    token: tokens[0].1.clone(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
        let r = h
            .call(
                &c1,
                Request::Relay {
                    token: "x.y.z".into(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::Unauthorized), "{r:?}");
        let r = h
            .call(
                &c1,
                Request::Relay {
                    token: tokens[1].1.clone(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
        assert!(
            format!("{r:?}").contains("takes no relayed sessions"),
            "{r:?}"
        );
        // The holder: the exporter is told to punch; once it has, the client gets the session.
        let (_, mut answer) = h
            .start_call(
                &c1,
                Request::Relay {
                    token: tokens[0].1.clone(),
                },
            )
            .await;
        let grant = loop {
            match links[0].recv().await {
                Some(Reply::RelayOpen(g)) => break g,
                Some(Reply::ExporterState { .. }) => continue,
                other => panic!("{other:?}"),
            }
        };
        let exp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let secret = jmp_protocol::relay::parse_secret(&grant.secret).unwrap();
        jmp_transport::relay::punch(
            &exp,
            format!("127.0.0.1:{}", grant.port).parse().unwrap(),
            &secret,
        )
        .unwrap();
        match answer.recv().await {
            Some(Reply::Relay(g)) => assert_eq!(g.port, grant.port),
            other => panic!("{other:?}"),
        }
        // The lease ends: its token opens nothing any more.
        let r = h
            .call(
                &c1,
                Request::DeleteLease {
                    names: vec![tokens[0].0.clone()],
                    all: false,
                },
            )
            .await;
        assert!(matches!(r, Reply::Deleted { .. }), "{r:?}");
        let r = h
            .call(
                &c1,
                Request::Relay {
                    token: tokens[0].1.clone(),
                },
            )
            .await;
        assert_eq!(code(&r), Some(CtlErrorCode::NotFound), "{r:?}");
    }
}
