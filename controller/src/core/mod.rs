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
//!
//! This module is the dispatcher: the batch loop, who may make which call, and the book's
//! events handed to the jobs they concern. The jobs live beside it:
//! [`records`] (the identity registry and client policies), [`identities`] (credentials:
//! signing, creating, rotating, renewing, deleting), [`leases`] (requests, the queue's
//! waiters, lease tokens), [`registration`] (exporters registering, and the pushes on their
//! registration streams), [`relay_admission`] (who may open a relay session), [`hooks`]
//! (lease hooks and cleaning), [`accrual`] (leased time into the counter and the usage
//! history), [`persist`] (one commit per batch) and [`gauges`].

mod accrual;
mod gauges;
mod hooks;
mod identities;
mod leases;
mod persist;
mod records;
mod registration;
mod relay_admission;
#[cfg(test)]
mod tests;

pub use accrual::ACCRUE_EVERY;
pub use identities::{check_name, Authority, DEFAULT_CREDENTIAL_TTL_SECS, ISSUER};
pub use leases::lease_info;
pub use records::{ClientRecord, ExporterRecord};

use crate::book::{Event, LeaseBook, Millis};
use crate::metrics::Metrics;
use crate::store::{LeaseStore, Table};
use jmp_protocol::api::{CtlError, CtlErrorCode, IdentityKind, Reply, Request};
use jmp_protocol::token::TokenKind;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{error, info};

/// How long a waiting request (or an undelivered grant) survives its requester going away,
/// so that a network blip or a controller restart does not cost its place in the queue.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(15);
/// Default of `--max-waiting-per-client`: enough for a CI matrix, too few to fill a queue.
pub const MAX_WAITING_PER_CLIENT: usize = 16;

/// Longest lease when neither the client's policy nor the controller's flag says.
pub const DEFAULT_MAX_DURATION_SECS: u64 = 24 * 3600;
/// Default of `--default-idle-timeout`: a lease nothing uses for this long ends. Long enough
/// for the gap between `jmp create lease` and its first use (a CI step starting, a person
/// typing `jmp attach`); short enough that a cancelled job's board goes back to the lab soon.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 600;

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

pub struct Core<S: LeaseStore> {
    book: LeaseBook,
    registry: records::Registry,
    persist: persist::Persistence<S>,
    waiters: leases::Waiters,
    links: registration::Links,
    usage: accrual::Accrual,
    gauges: gauges::Gauges,
    auth: Arc<Authority>,
    /// Checks the lease tokens presented to the relay, and the admin file at start.
    verifier: jmp_transport::token::Verifier,
    metrics: Arc<Metrics>,
    default_max_secs: u64,
    /// Idle timeout of leases that ask for none (`--default-idle-timeout`, seconds; 0: none).
    default_idle_secs: u64,
    /// When the store was loaded (idle ends are held for a grace after it).
    loaded_at: Millis,
    /// Waiting requests one client may have at once.
    max_waiting: usize,
    /// Lifetime of the credentials issued, seconds (`--credential-ttl`; 0: they never expire).
    credential_ttl: u64,
    /// Replies held back until the batch is durable.
    out: Vec<(mpsc::UnboundedSender<Reply>, Reply)>,
    /// The relay for exporters behind NAT (`None`: this controller relays nothing).
    relays: Option<crate::relay::Relays>,
    /// Why a lease is being ended by its exporter's failed beforeLease hook (shown to jmpd and
    /// so to the client instead of "released").
    hook_failures: HashMap<String, String>,
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
        let mut registry = records::Registry::default();
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
                    registry
                        .clients
                        .insert(k.clone(), serde_json::from_slice(&v).map_err(bad)?);
                }
                Table::Exporters => {
                    registry
                        .exporters
                        .insert(k.clone(), serde_json::from_slice(&v).map_err(bad)?);
                }
                Table::Leases => leases.push(serde_json::from_slice(&v).map_err(bad)?),
                Table::Waiting => waiting.push(serde_json::from_slice(&v).map_err(bad)?),
                Table::Unclaimed => {
                    unclaimed.insert(k.clone());
                }
                Table::Usage => usage.restore(serde_json::from_slice(&v).map_err(bad)?),
            }
        }
        for c in registry.clients.values() {
            if let Err(e) = c.allow.selector() {
                error!(
                    client = %c.name,
                    "the stored policy {:?} does not parse ({e}): this client may lease nothing until an admin sets a valid one",
                    c.allow.text()
                );
            }
        }
        let book = LeaseBook::restore(
            registry
                .exporters
                .values()
                .map(|e| (e.name.clone(), e.effective_labels(), e.enabled))
                .collect(),
            leases,
            waiting,
        );
        info!(
            clients = registry.clients.len(),
            exporters = registry.exporters.len(),
            leases = book.leases().count(),
            waiting = book.waiting().count(),
            revision = snap.revision,
            "state loaded"
        );
        let mut book = book;
        // Leases whose idle deadline passed while no controller listened wait until the
        // exporters could register again and say which are attached (see set_orphan_grace).
        let loaded_at = now_ms();
        book.hold_idle_ends(loaded_at + ORPHAN_GRACE.as_millis() as u64);
        let verifier = auth.signer.verifier();
        let mut core = Core {
            persist: persist::Persistence::new(store, store_name, snap.revision, unclaimed),
            book,
            registry,
            waiters: leases::Waiters::new(ORPHAN_GRACE),
            links: registration::Links::default(),
            usage: accrual::Accrual::new(usage),
            gauges: gauges::Gauges::default(),
            auth,
            verifier,
            metrics,
            default_max_secs,
            default_idle_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            loaded_at,
            max_waiting: MAX_WAITING_PER_CLIENT,
            credential_ttl: DEFAULT_CREDENTIAL_TTL_SECS,
            out: Vec::new(),
            relays: None,
            hook_failures: HashMap::new(),
        };
        // Leases held across the restart: this process's counter starts at their time so far
        // (the previous process's counter had it; Prometheus sees the reset).
        core.usage.start_counting(core.book.leases(), now_ms());
        // Every known exporter is offline until it registers (the "offline" alert needs the
        // series to exist).
        for name in core.registry.exporters.keys() {
            core.metrics.exporter_up.with_label_values(&[name]).set(0);
        }
        core.restore_orphans();
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

    /// How long ended leases stay in the usage history (`--usage-retention`; 0: forever).
    pub fn set_usage_retention(&mut self, ms: Millis) {
        self.usage.history.set_retention(ms);
    }

    /// The idle timeout of leases that ask for none (`--default-idle-timeout`; 0: they have
    /// none). A client's policy may cap it.
    pub fn set_default_idle_timeout(&mut self, secs: u64) {
        self.default_idle_secs = secs;
    }

    /// Changes how many requests one client may have waiting (`--max-waiting-per-client`).
    pub fn set_max_waiting(&mut self, n: usize) {
        self.max_waiting = n.max(1);
    }

    /// Changes [`ORPHAN_GRACE`] (tests).
    /// Deadlines already set (those restored by [`Core::open`]) are capped to the new grace,
    /// and so is the hold on idle ends after the load (the exporters' time to register again).
    pub fn set_orphan_grace(&mut self, d: Duration) {
        self.waiters.set_grace(d);
        self.book
            .hold_idle_ends(self.loaded_at.saturating_add(d.as_millis() as u64));
    }

    pub fn has_client(&self, name: &str) -> bool {
        self.registry.clients.contains_key(name)
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
            self.end_past_shares(now);
            self.reap_orphans(now);
            self.accrue(now);
            self.usage.prune(now);
            if let Err(e) = self.persist() {
                error!("cannot write the store: {e:#}; answering errors and stopping");
                self.fail_all(&e);
                return Err(e);
            }
            for (tx, r) in self.out.drain(..) {
                let _ = tx.send(r);
            }
            self.send_pushes();
            if std::mem::take(&mut self.waiters.positions_dirty) {
                self.send_positions(now);
            }
            self.update_gauges();
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Millis> {
        [
            self.book.next_deadline(),
            self.waiters.next_orphan_deadline(),
            self.usage.next_accrual(),
            self.next_share_end(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Sends `r` to `tx` once the batch is durable.
    fn reply(&mut self, tx: &mpsc::UnboundedSender<Reply>, r: Reply) {
        self.out.push((tx.clone(), r));
    }

    fn handle(&mut self, now: Millis, cmd: Cmd) {
        match cmd {
            Cmd::Delivered { stream } => self.delivered(stream),
            Cmd::Gone { stream } => {
                self.requester_gone(stream);
                self.registration_gone(now, stream);
            }
            Cmd::Call {
                caller,
                request,
                reply,
                stream,
            } => {
                if let Err(e) = self.registry.authenticate(&caller) {
                    self.reply(&reply, Reply::Error(e));
                    return;
                }
                self.call(now, caller, request, reply, stream);
            }
        }
    }

    /// Who may make the call, then the job that answers it.
    fn call(
        &mut self,
        now: Millis,
        caller: Caller,
        request: Request,
        tx: mpsc::UnboundedSender<Reply>,
        stream: u64,
    ) {
        let admin = self.registry.is_admin(&caller);
        let admin_only = matches!(
            request,
            Request::CreateClient(_)
                | Request::UpdateClient(_)
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
                | Request::TouchLease { .. }
                | Request::ShareLease { .. }
                | Request::UnshareLease { .. }
                | Request::Relay { .. }
        );
        if client_only && caller.kind != TokenKind::Client {
            self.reply(
                &tx,
                err(CtlErrorCode::Forbidden, "only clients hold leases"),
            );
            return;
        }
        // An exporter needs no listing (its own lease reaches it on its registration stream):
        // a leaked exporter credential must not map the lab's exporters, addresses and leases.
        let listing = matches!(
            request,
            Request::GetExporters { .. } | Request::GetLeases { .. }
        );
        if listing && caller.kind != TokenKind::Client {
            self.reply(
                &tx,
                err(
                    CtlErrorCode::Forbidden,
                    format!(
                        "{} {} may not list exporters or leases (only clients list what they may lease)",
                        caller.kind.as_str(),
                        caller.name
                    ),
                ),
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
            Request::GetLeases { all } => self.get_leases(now, &caller, admin, all),
            Request::UpdateLease {
                name,
                duration_secs,
                extend_secs,
            } => self.update_lease(now, &caller, admin, &name, duration_secs, extend_secs),
            Request::DeleteLease { names, all } => {
                self.delete_leases(now, &caller, admin, names, all)
            }
            Request::LeaseAccess { name } => self.access(now, &caller, name),
            Request::TouchLease { name } => self.touch_lease(now, &caller, name),
            Request::ShareLease {
                name,
                with,
                until,
                control,
            } => self.share_lease(now, &caller, admin, &name, &with, until, control),
            Request::UnshareLease { name, with } => {
                self.unshare_lease(now, &caller, admin, &name, &with)
            }
            Request::InUse { lease } => self.in_use(now, &caller, lease),
            Request::GetExporters { selector } => self.get_exporters(&caller, admin, selector),
            Request::CreateClient(spec) => self.create_client(spec),
            Request::UpdateClient(u) => self.update_client(now, u),
            Request::CreateExporter(spec) => self.create_exporter(now, spec),
            Request::GetClients { name } => self.get_clients(name),
            Request::DeleteClient { name } => self.delete_client(now, &name),
            Request::DeleteExporter { name } => self.delete_exporter(now, &name),
            Request::SetExporterEnabled { name, enabled } => {
                self.set_exporter_enabled(now, &name, enabled)
            }
            Request::RebindExporter { name } => self.rebind_exporter(&name),
            Request::Rotate => self.rotate(&caller),
            Request::Renew => self.renew(&caller),
            Request::Relay { token } => return self.relay(&caller, &token, tx),
            Request::LeaseHook(report) => self.lease_hook(now, &caller, report),
            Request::Usage(q) => self.usage_report(now, &q),
            Request::Register(reg) => return self.register(now, &caller, reg, tx, stream),
            // The API answers it (it keeps the dashboard's sign-in links); never sent here.
            Request::WebSignIn => err(
                CtlErrorCode::Invalid,
                "web-sign-in is answered by the controller's API",
            ),
        };
        self.reply(&tx, r);
    }

    /// What the book decided, to every job it concerns: the requester hears of its grant or
    /// its timeout; an ended lease's time is counted and recorded, its relay sessions close,
    /// and its exporter hears of the end.
    fn on_events(&mut self, now: Millis, events: Vec<Event>) {
        for e in events {
            match e {
                Event::Granted { lease } => {
                    let team = self.registry.team(&lease.client);
                    self.metrics
                        .grants
                        .with_label_values(&["queued", &team])
                        .inc();
                    self.metrics
                        .wait
                        .with_label_values(&[&team])
                        .observe(lease.begin.saturating_sub(lease.requested) as f64 / 1000.0);
                    info!(lease = %lease.name, client = %lease.client, exporter = %lease.exporter, "granted from the queue");
                    self.links.push.insert(lease.exporter.clone());
                    self.granted_from_queue(&lease);
                    self.granted_on(now, &lease);
                }
                Event::CleanupOverdue { exporter, lease } => {
                    self.cleanup_overdue(&exporter, &lease);
                }
                Event::Extended { lease } => {
                    info!(lease = %lease.name, client = %lease.client, exporter = %lease.exporter, end = lease.end / 1000, "extended while in use");
                    self.links.push.insert(lease.exporter.clone());
                }
                Event::Ended { lease, reason } => {
                    if let Some(r) = self.relays.as_mut() {
                        r.end_lease(&lease.name);
                    }
                    self.lease_ended_accrual(now, &lease, &reason);
                    info!(lease = %lease.name, client = %lease.client, exporter = %lease.exporter, reason = reason.as_str(), "lease ended");
                    let why = self.end_reason_text(&lease, &reason);
                    self.links.lease_ended(&lease, why);
                    self.waiters.lease_ended(&lease);
                }
                Event::WaitExpired { request } => {
                    let team = self.registry.team(&request.client);
                    self.metrics.wait_timeouts.with_label_values(&[&team]).inc();
                    self.waiters.wait_expired(now, &request, &mut self.out);
                }
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
