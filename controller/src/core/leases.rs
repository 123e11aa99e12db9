//! Leases: requests (granted, queued, reserved or refused), the callers waiting on queued
//! requests and what happens when they go away, changes to a lease's end, releases, listings,
//! and the lease tokens clients present to exporters.

use super::{err, fmt_secs, random_hex, Caller, Core, ISSUER};
use crate::book::{
    Denial, Lease, LeaseBook, Millis, NewRequest, Outcome, RequestState, Share, Waiting,
};
use crate::store::LeaseStore;
use jmp_protocol::api::{
    Access, CtlError, CtlErrorCode, LeaseInfo, LeaseRequest, Reply, ShareInfo,
};
use jmp_protocol::selector::Selector;
use jmp_protocol::token::{Claims, ShareClaim, TokenKind};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

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
        idle_timeout: l.idle_timeout.map(|d| d.div_ceil(1000)),
        last_use: Some(l.last_use / 1000),
        attached: l.attached,
        idle_deadline: l.idle_deadline().map(|d| d.div_ceil(1000)),
        hard_limit: l.auto_extend.map(|a| a.hard_end / 1000),
        shares: l.shares.iter().map(share_info).collect(),
        position: None,
    }
}

pub fn share_info(s: &Share) -> ShareInfo {
    ShareInfo {
        client: s.client.clone(),
        until: s.until.map(|u| u / 1000),
        control: s.control,
    }
}

/// The shares of `l` that still let their client attach at `now` (one whose `--until` passed
/// admits nobody, and is removed from the record at that time: see [`Core::end_past_shares`]).
pub fn live_shares(l: &Lease, now: Millis) -> Vec<ShareInfo> {
    l.shares
        .iter()
        .filter(|s| s.live_at(now))
        .map(share_info)
        .collect()
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
        idle_timeout: w.idle_timeout.map(|d| d.div_ceil(1000)),
        last_use: None,
        attached: false,
        idle_deadline: None,
        hard_limit: None,
        shares: Vec::new(),
        position: None,
    }
}

/// The idle timeout a new lease gets, seconds (`None`: none): the one asked for (`Some(0)`:
/// none), else the controller's default; within the client's limit (`max_idle`), or why not.
fn idle_timeout_of(
    asked: Option<u64>,
    default: u64,
    max_idle: Option<u64>,
    client: &str,
) -> Result<Option<u64>, String> {
    match (asked, max_idle) {
        (Some(0), Some(m)) => Err(format!(
            "client {client} may not hold a lease without an idle timeout (at most {}); give --idle-timeout",
            fmt_secs(m)
        )),
        (Some(d), Some(m)) if d > m => Err(format!(
            "an idle timeout of {} is longer than client {client} may ask for (at most {})",
            fmt_secs(d),
            fmt_secs(m)
        )),
        (Some(d), _) => Ok(Some(d).filter(|d| *d > 0)),
        (None, Some(m)) if default == 0 => Ok(Some(m)),
        (None, Some(m)) => Ok(Some(default.min(m))),
        (None, None) => Ok(Some(default).filter(|d| *d > 0)),
    }
}

/// A refusal's error code, its `jmp_lease_requests_total` result, and its message (naming the
/// request's selector `sel`, "" for any, the exporter it named, and the client's policy
/// `allow`).
fn refusal_reply(
    r: &Denial,
    sel: &str,
    exporter: Option<&str>,
    allow: &str,
) -> (CtlErrorCode, &'static str, String) {
    let (code, result) = match r {
        Denial::NoSuchExporter(_) => (CtlErrorCode::NoMatch, "no_match"),
        Denial::NoMatch => (CtlErrorCode::NoMatch, "no_match"),
        Denial::OutsidePolicy { .. } => (CtlErrorCode::Forbidden, "outside_policy"),
        Denial::AllOffline { .. } => (CtlErrorCode::AllOffline, "all_offline"),
        Denial::AllBusy { .. } => (CtlErrorCode::AllBusy, "all_busy"),
        Denial::BadDuration => (CtlErrorCode::Invalid, "invalid"),
        Denial::LeaseNameInUse(_) => (CtlErrorCode::Internal, "invalid"),
    };
    let mut msg = r.message(sel, exporter, allow);
    if matches!(r, Denial::AllBusy { .. }) {
        msg.push_str("; add --wait SECONDS to queue for one");
    }
    (code, result, msg)
}

/// The lease name a waiting request will get ("" if it is not waiting).
fn lease_name_of(book: &LeaseBook, request_id: &str) -> String {
    book.waiting_by_id(request_id)
        .map(|w| w.lease_name.clone())
        .unwrap_or_default()
}

/// A caller waiting on a queued request's answer.
struct Watcher {
    tx: mpsc::UnboundedSender<Reply>,
    stream: u64,
    last: Option<(u32, Option<String>)>,
    wait_until: u64,
}

/// Who waits on which queued request, and the requests (or undelivered grants) whose
/// requester went away.
pub(super) struct Waiters {
    /// request id → who is waiting for its answer.
    watchers: HashMap<String, Watcher>,
    /// stream → request id, for `Gone`.
    streams: HashMap<u64, String>,
    /// Requests (waiting, or granted but not yet delivered) whose requester went away, and
    /// when they are given up.
    pub orphans: HashMap<String, Instant>,
    grace: Duration,
    /// Some waiter's place may have changed: send the places that did.
    pub positions_dirty: bool,
}

impl Waiters {
    pub fn new(grace: Duration) -> Waiters {
        Waiters {
            watchers: HashMap::new(),
            streams: HashMap::new(),
            orphans: HashMap::new(),
            grace,
            positions_dirty: false,
        }
    }

    pub fn set_grace(&mut self, d: Duration) {
        self.grace = d;
        let cap = Instant::now() + d;
        for deadline in self.orphans.values_mut() {
            *deadline = (*deadline).min(cap);
        }
    }

    pub fn next_orphan_deadline(&self) -> Option<Millis> {
        self.orphans.values().min().map(|i| {
            let left = i.saturating_duration_since(Instant::now());
            super::now_ms() + left.as_millis() as u64
        })
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
        self.streams.insert(stream, id.to_string());
    }

    /// Tells whoever waits on request `id` its final answer `r` (after the commit, in `out`),
    /// and forgets the request.
    pub fn answer(
        &mut self,
        id: &str,
        r: Reply,
        out: &mut Vec<(mpsc::UnboundedSender<Reply>, Reply)>,
    ) {
        if let Some(w) = self.watchers.remove(id) {
            self.streams.remove(&w.stream);
            out.push((w.tx, r));
        }
        self.orphans.remove(id);
        self.positions_dirty = true;
    }

    /// Everyone waiting hears `r` (the batch could not be stored).
    pub fn fail_all(&mut self, r: &Reply) {
        for (_, w) in self.watchers.drain() {
            let _ = w.tx.send(r.clone());
        }
    }

    pub fn lease_ended(&mut self, lease: &Lease) {
        self.orphans.remove(&lease.request_id);
        self.positions_dirty = true;
    }

    pub fn wait_expired(
        &mut self,
        now: Millis,
        request: &Waiting,
        out: &mut Vec<(mpsc::UnboundedSender<Reply>, Reply)>,
    ) {
        let waited = (now.saturating_sub(request.arrived)) / 1000;
        let r = err(
            CtlErrorCode::Timeout,
            format!(
                "waited {} for an exporter matching '{}'; none became free",
                fmt_secs(waited),
                request.selector
            ),
        );
        self.answer(&request.request_id, r, out);
    }
}

impl<S: LeaseStore> Core<S> {
    /// Waiting requests restored from the store have no requester connected yet: they get the
    /// grace period to come back (a reservation needs nobody: it keeps its place). So do
    /// leases granted but not yet claimed when the previous process stopped (ids whose lease
    /// has ended meanwhile are dropped from the store at the next commit).
    pub(super) fn restore_orphans(&mut self) {
        let deadline = Instant::now() + self.waiters.grace;
        let restored: Vec<String> = self
            .book
            .waiting()
            .filter(|w| !w.reserved)
            .map(|w| w.request_id.clone())
            .collect();
        for id in restored {
            self.waiters.orphans.insert(id, deadline);
        }
        let unclaimed: Vec<String> = self
            .persist
            .unclaimed_stored
            .iter()
            .filter(|id| self.book.lease_by_request(id).is_some())
            .cloned()
            .collect();
        for id in unclaimed {
            self.waiters.orphans.insert(id, deadline);
        }
    }

    /// A lease granted from the queue reached its requester: no longer at risk of being held
    /// for nobody.
    pub(super) fn delivered(&mut self, stream: u64) {
        let w = &mut self.waiters;
        if let Some(id) = w.streams.remove(&stream) {
            if w.watchers.get(&id).is_none_or(|x| x.stream != stream) {
                w.orphans.remove(&id);
            }
        }
    }

    /// The caller of `stream` went away: a waiting request keeps its place for the grace
    /// period.
    pub(super) fn requester_gone(&mut self, stream: u64) {
        let Some(id) = self.waiters.streams.remove(&stream) else {
            return;
        };
        if self
            .waiters
            .watchers
            .get(&id)
            .is_some_and(|w| w.stream == stream)
        {
            self.waiters.watchers.remove(&id);
            let reserved = self.book.waiting_by_id(&id).is_some_and(|w| w.reserved);
            if reserved {
                // A reservation keeps its place with or without a caller.
                debug!(request = %id, "a caller waiting on a reservation went away");
            } else {
                let grace = self.waiters.grace;
                info!(request = %id, "requester went away; keeping its place for {}s", grace.as_secs());
                self.waiters.orphans.insert(id, Instant::now() + grace);
            }
        }
        // Otherwise its lease was granted and sent but never confirmed: the orphan mark set at
        // the grant stays, and the lease is released when it runs out unless the requester
        // comes back for it (same request id).
    }

    /// A lease granted from the queue: to its waiting requester, or kept for the grace period.
    pub(super) fn granted_from_queue(&mut self, lease: &Lease) {
        let w = &mut self.waiters;
        w.positions_dirty = true;
        let grace = w.grace;
        match w.watchers.remove(&lease.request_id) {
            Some(x) => {
                // The stream stays mapped to the request until its caller confirms receipt
                // (`Delivered`); until then the grant counts as unclaimed.
                w.orphans
                    .insert(lease.request_id.clone(), Instant::now() + grace);
                self.out.push((x.tx, Reply::Lease(lease_info(lease))));
            }
            None if lease.reserved => {
                // A reservation's grant is claimed when its holder attaches.
            }
            None => {
                // Nobody is listening right now: keep it for the grace period, in which a
                // retry of the same request id picks it up.
                w.orphans
                    .entry(lease.request_id.clone())
                    .or_insert_with(|| Instant::now() + grace);
            }
        }
    }

    pub(super) fn create_lease(
        &mut self,
        now: Millis,
        caller: &Caller,
        req: LeaseRequest,
        tx: mpsc::UnboundedSender<Reply>,
        stream: u64,
    ) {
        let team = self.registry.team(&caller.name);
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
        let (policy, allow, max, max_idle) = match self
            .registry
            .client_policy(&caller.name, self.default_max_secs)
        {
            Ok(p) => (
                p.allow.clone(),
                p.text.to_string(),
                p.max_secs,
                p.max_idle_secs,
            ),
            Err(e) => {
                warn!(client = %caller.name, "lease request refused: {}", e.message);
                return refuse(self, "forbidden", Reply::Error(e));
            }
        };
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
        if req.idle_timeout_secs.is_some_and(|d| d > TEN_YEARS) {
            return refuse(
                self,
                "invalid",
                err(CtlErrorCode::Invalid, "idle timeout is more than ten years"),
            );
        }
        let idle = match idle_timeout_of(
            req.idle_timeout_secs,
            self.default_idle_secs,
            max_idle,
            &caller.name,
        ) {
            Ok(i) => i,
            Err(msg) => return refuse(self, "forbidden", err(CtlErrorCode::Forbidden, msg)),
        };
        // Auto-extension's hard limit: asked for, else the most the policy allows.
        let hard_limit = match (req.auto_extend, req.max_duration_secs) {
            (false, Some(_)) => {
                return refuse(
                    self,
                    "invalid",
                    err(
                        CtlErrorCode::Invalid,
                        "a hard limit (max_duration_secs, --max-duration) is for an auto-extending lease (auto_extend, --auto-extend)",
                    ),
                )
            }
            (false, None) => None,
            (true, asked) => {
                let hard = asked.unwrap_or(max);
                if hard < req.duration_secs {
                    return refuse(
                        self,
                        "invalid",
                        err(
                            CtlErrorCode::Invalid,
                            format!(
                                "the hard limit {} is shorter than the lease's duration {}",
                                fmt_secs(hard),
                                fmt_secs(req.duration_secs)
                            ),
                        ),
                    );
                }
                if hard > max {
                    return refuse(
                        self,
                        "forbidden",
                        err(
                            CtlErrorCode::Forbidden,
                            format!(
                                "a hard limit of {} is longer than client {} may hold a lease (at most {})",
                                fmt_secs(hard),
                                caller.name,
                                fmt_secs(max)
                            ),
                        ),
                    );
                }
                Some(hard)
            }
        };
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
        // A request no registered exporter could ever serve is refused now with why, wait or
        // not (waiting would only hide the reason until the wait ran out), and before the
        // quota: it takes no place in the queue.
        let known = self.book.request_state(now, &req.request_id).is_some();
        if !known {
            if let Some(r) = self
                .book
                .unservable(&selector, &policy, req.exporter.as_deref())
            {
                let (code, result, msg) =
                    refusal_reply(&r, &selector.to_string(), req.exporter.as_deref(), &allow);
                return refuse(self, result, err(code, msg));
            }
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
        let req_exporter = req.exporter.clone();
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
                idle_timeout: idle.map(|d| d.saturating_mul(1000)),
                max_duration: hard_limit.map(|h| h.saturating_mul(1000)),
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
                self.links.push.insert(lease.exporter.clone());
                self.granted_on(now, &lease);
                let lease = self.book.lease(&lease.name).cloned().unwrap_or(lease);
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
                self.waiters
                    .watch(&req.request_id, tx.clone(), stream, until);
                if let Some(w) = self.waiters.watchers.get_mut(&req.request_id) {
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
                let (code, result, msg) =
                    refusal_reply(&r, &sel_text, req_exporter.as_deref(), &allow);
                refuse(self, result, err(code, msg));
            }
            Outcome::Existing(RequestState::Leased(lease)) => {
                self.waiters.orphans.remove(&req.request_id);
                // Its requester is back for it: a use.
                let (now_lease, ev) = self.book.touch(now, &lease.name);
                self.on_events(now, ev);
                let lease = now_lease.unwrap_or(lease);
                self.reply(&tx, Reply::Lease(lease_info(&lease)));
            }
            Outcome::Existing(RequestState::Waiting {
                position,
                behind,
                wait_until,
            }) => {
                self.waiters.orphans.remove(&req.request_id);
                self.waiters
                    .watch(&req.request_id, tx.clone(), stream, wait_until);
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

    /// The caller's leases and requests; with `all`, also those of others that concern
    /// exporters it may lease: the leases on them, and the requests competing for them (its
    /// place in the queue depends on those). An admin sees everything. A client restricted to
    /// some exporters learns nothing about the rest of the lab (who holds them, for how long,
    /// which jobs run there).
    pub(super) fn get_leases(&self, now: Millis, caller: &Caller, admin: bool, all: bool) -> Reply {
        let policy = if all && !admin {
            match self
                .registry
                .client_policy(&caller.name, self.default_max_secs)
            {
                Ok(p) => Some(p.allow),
                Err(e) => return Reply::Error(e),
            }
        } else {
            None
        };
        let allowed = |exporter: &str| {
            policy.is_none_or(|p| {
                self.book
                    .exporter(exporter)
                    .is_some_and(|e| p.matches(&e.labels))
            })
        };
        let mine = |c: &str| c == caller.name;
        let shared_with_me = |l: &Lease| l.shares.iter().any(|s| mine(&s.client));
        let mut leases: Vec<LeaseInfo> = self
            .book
            .leases()
            .filter(|l| mine(&l.client) || shared_with_me(l) || (all && allowed(&l.exporter)))
            .map(lease_info)
            .collect();
        leases.extend(
            self.book
                .waiting()
                .filter(|w| {
                    mine(&w.client)
                        || (all
                            && self
                                .book
                                .candidates(&w.request_id)
                                .into_iter()
                                .any(&allowed))
                })
                .map(|w| {
                    let mut i = waiting_info(w);
                    if !w.reserved {
                        i.position = self.book.position(now, &w.request_id).map(|(p, _)| p);
                    }
                    i
                }),
        );
        Reply::Leases { leases }
    }

    /// `client`'s policy changed: its waiting requests and reservations that it may no longer
    /// be granted are withdrawn (their callers told why), the rest wait for what it now
    /// allows, and its leases on exporters it no longer allows end.
    /// Ends `client`'s shares of the leases `which` picks, telling their exporters (which end
    /// the colleague's sessions when they hear).
    pub(super) fn end_shares_of(
        &mut self,
        client: &str,
        which: impl Fn(&crate::book::Lease) -> bool,
        why: &str,
    ) {
        let unshared: Vec<(String, Vec<Share>)> = self
            .book
            .leases()
            .filter(|l| l.shares.iter().any(|s| s.client == client) && which(l))
            .map(|l| {
                let keep = l.shares.iter().filter(|s| s.client != client);
                (l.name.clone(), keep.cloned().collect())
            })
            .collect();
        for (lease, keep) in unshared {
            if let Ok(l) = self.book.set_shares(&lease, keep) {
                info!(%lease, client, "share ended: {why}");
                self.links.push.insert(l.exporter.clone());
            }
        }
    }

    pub(super) fn policy_changed(&mut self, now: Millis, client: &str) {
        let (allow, text, max, max_idle) =
            match self.registry.client_policy(client, self.default_max_secs) {
                Ok(p) => (
                    p.allow.clone(),
                    p.text.to_string(),
                    p.max_secs,
                    p.max_idle_secs,
                ),
                Err(e) => {
                    warn!(client, "policy changed but cannot be read: {}", e.message);
                    return;
                }
            };
        let too_long: Vec<Waiting> = self
            .book
            .waiting()
            .filter(|w| w.client == client && w.duration > max.saturating_mul(1000))
            .cloned()
            .collect();
        for w in too_long {
            let msg = format!(
                "request {} was withdrawn: the policy of client {client} changed, and a lease of {} is longer than it may now hold (at most {})",
                w.lease_name,
                fmt_secs(w.duration / 1000),
                fmt_secs(max)
            );
            info!(client, request = %w.request_id, "{msg}");
            self.waiters.answer(
                &w.request_id,
                err(CtlErrorCode::Forbidden, msg),
                &mut self.out,
            );
            let ev = self.book.release(now, &w.lease_name);
            self.on_events(now, ev);
        }
        let ev = self.book.limit_client(
            now,
            client,
            max_idle.map(|m| m.saturating_mul(1000)),
            max.saturating_mul(1000),
        );
        self.on_events(now, ev);
        // Its shares end by its new longest lease at the latest, as a new share would.
        let limit = now.saturating_add(max.saturating_mul(1000));
        let capped: Vec<(String, Vec<Share>)> = self
            .book
            .leases()
            .filter(|l| {
                l.shares
                    .iter()
                    .any(|s| s.client == client && s.until.is_none_or(|u| u > limit))
            })
            .map(|l| {
                let shares = l
                    .shares
                    .iter()
                    .map(|s| match s.until {
                        Some(u) if s.client == client && u <= limit => s.clone(),
                        _ if s.client == client => Share {
                            until: Some(limit),
                            ..s.clone()
                        },
                        _ => s.clone(),
                    })
                    .collect();
                (l.name.clone(), shares)
            })
            .collect();
        for (lease, shares) in capped {
            if let Ok(l) = self.book.set_shares(&lease, shares) {
                info!(%lease, client, "share shortened to the client's new longest lease");
                self.links.push.insert(l.exporter.clone());
            }
        }
        // Shares with this client on exporters it may no longer use end too (the exporter
        // ends its sessions when it hears): a share never grants what the policy forbids.
        let forbidden: Vec<String> = self
            .book
            .leases()
            .filter(|l| {
                !self
                    .book
                    .exporter(&l.exporter)
                    .is_some_and(|e| allow.matches(&e.labels))
            })
            .map(|l| l.name.clone())
            .collect();
        self.end_shares_of(
            client,
            |l| forbidden.contains(&l.name),
            "the client's policy no longer allows the exporter",
        );
        let (ev, withdrawn) = self.book.set_policy(now, client, &allow);
        for (w, why) in withdrawn {
            let (code, _, reason) = refusal_reply(&why, &w.selector, w.exporter.as_deref(), &text);
            let msg = format!(
                "request {} was withdrawn: the policy of client {client} changed: {reason}",
                w.lease_name
            );
            info!(client, request = %w.request_id, "{msg}");
            self.waiters
                .answer(&w.request_id, err(code, msg), &mut self.out);
        }
        self.on_events(now, ev);
        self.waiters.positions_dirty = true;
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
                self.ended_text(caller, admin, name).unwrap_or_else(|| {
                    format!("no active lease {name:?} (ended, or never granted)")
                }),
            )),
        }
    }

    /// How lease `name` ended, for its holder (or an admin) coming back to it: "lease L ended
    /// at T: nothing used it for 10m (its idle timeout)". `None` when it is not in the usage
    /// history, or was someone else's.
    pub(super) fn ended_text(&self, caller: &Caller, admin: bool, name: &str) -> Option<String> {
        let rec = self.usage.history.ended_lease(name)?;
        if !(admin || rec.client == caller.name) {
            return None;
        }
        let at = jmp_protocol::usage::rfc3339(rec.end);
        let why = match rec.reason.as_str() {
            "idle" => match rec.idle_timeout {
                Some(d) => format!(
                    "nothing used it for {} (its idle timeout)",
                    fmt_secs(d.div_ceil(1000))
                ),
                None => "nothing used it for its idle timeout".to_string(),
            },
            "expired" => "it expired".to_string(),
            other => other.to_string(),
        };
        Some(format!("lease {name} ended at {at}: {why}"))
    }

    pub(super) fn update_lease(
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
        let total = end.saturating_sub(lease.begin) / 1000;
        // An admin may set any end; a client only within its policy.
        let max = match self
            .registry
            .client_policy(&lease.client, self.default_max_secs)
        {
            Ok(p) => p.max_secs,
            Err(_) if admin => u64::MAX,
            Err(e) => return Reply::Error(e),
        };
        if total > max {
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
                self.links.push.insert(l.exporter.clone());
                // Changing a lease uses it; a shortened lease that is already over ends now
                // (touching advances the book first).
                let (now_lease, ev) = self.book.touch(now, name);
                self.on_events(now, ev);
                Reply::Lease(lease_info(&now_lease.unwrap_or(l)))
            }
            Err(e) => err(CtlErrorCode::NotFound, e),
        }
    }

    pub(super) fn delete_leases(
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
                let said: Vec<String> = unknown
                    .iter()
                    .map(|n| {
                        self.ended_text(caller, admin, n)
                            .unwrap_or_else(|| format!("no lease named {n}"))
                    })
                    .collect();
                return err(CtlErrorCode::NotFound, said.join("; "));
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
                let r = err(CtlErrorCode::NotFound, format!("request {n} was deleted"));
                self.waiters.answer(&id, r, &mut self.out);
            }
            let ev = self.book.release(now, n);
            self.on_events(now, ev);
        }
        Reply::Deleted { names: targets }
    }

    /// The caller's lease `name`, or its only active one (the error says why there is none,
    /// or which to choose from).
    fn lease_named(&self, caller: &Caller, name: Option<String>) -> Result<Lease, CtlError> {
        Ok(match name {
            Some(n) => self.own_lease(caller, false, &n)?,
            None => {
                let mine: Vec<&Lease> = self
                    .book
                    .leases()
                    .filter(|l| l.client == caller.name)
                    .collect();
                match mine.as_slice() {
                    [l] => (*l).clone(),
                    [] => {
                        return Err(CtlError::new(
                            CtlErrorCode::NotFound,
                            format!(
                                "client {} has no active lease (jmp create lease -l SELECTOR)",
                                caller.name
                            ),
                        ))
                    }
                    many => {
                        let names: Vec<&str> = many.iter().map(|l| l.name.as_str()).collect();
                        return Err(CtlError::new(
                            CtlErrorCode::Ambiguous,
                            format!(
                                "client {} holds {} leases ({}); pick one with --lease",
                                caller.name,
                                many.len(),
                                names.join(", ")
                            ),
                        ));
                    }
                }
            }
        })
    }

    /// The caller uses its lease (`touch-lease`): its idle timeout starts again.
    pub(super) fn touch_lease(
        &mut self,
        now: Millis,
        caller: &Caller,
        name: Option<String>,
    ) -> Reply {
        let lease = match self.lease_named(caller, name) {
            Ok(l) => l,
            Err(e) => return Reply::Error(e),
        };
        let (now_lease, ev) = self.book.touch(now, &lease.name);
        self.on_events(now, ev);
        match now_lease {
            Some(l) => Reply::Lease(lease_info(&l)),
            None => err(
                CtlErrorCode::NotFound,
                self.ended_text(caller, false, &lease.name)
                    .unwrap_or_else(|| format!("lease {} has ended", lease.name)),
            ),
        }
    }

    /// A lease token for the caller's lease, with where its exporter is and how to pin it.
    /// Asking for one is a use of the lease (an attachment connecting or reconnecting, a
    /// command on a connection of its own). A client that a lease named by `name` is shared
    /// with gets a share's token for it (see [`Core::share_access`]).
    pub(super) fn access(&mut self, now: Millis, caller: &Caller, name: Option<String>) -> Reply {
        if let Some(n) = &name {
            if let Some(l) = self.book.lease(n) {
                if l.client != caller.name {
                    if let Some(sh) = l.shares.iter().find(|s| s.client == caller.name) {
                        let (l, sh) = (l.clone(), sh.clone());
                        return self.share_access(now, caller, l, sh);
                    }
                }
            }
        }
        let lease = match self.lease_named(caller, name) {
            Ok(l) => l,
            Err(e) => return Reply::Error(e),
        };
        let (now_lease, ev) = self.book.touch(now, &lease.name);
        self.on_events(now, ev);
        let Some(lease) = now_lease else {
            return err(
                CtlErrorCode::NotFound,
                self.ended_text(caller, false, &lease.name)
                    .unwrap_or_else(|| format!("lease {} has ended", lease.name)),
            );
        };
        let (client, end) = (lease.client.clone(), lease.end);
        self.sign_access(now, &lease, &client, end, None)
    }

    /// A share's token for `caller`, whom `lease`'s holder shared it with: only while the
    /// share lasts, and only if the caller's own policy allows the lease's exporter (checked
    /// at each use, so a share never grants what the colleague's policy forbids, however the
    /// policy changed since the share was made). It expires with the share or the lease,
    /// whichever ends first.
    fn share_access(&mut self, now: Millis, caller: &Caller, lease: Lease, share: Share) -> Reply {
        if !share.live_at(now) {
            return err(
                CtlErrorCode::NotFound,
                format!(
                    "the share of lease {} with {} ended at {}",
                    lease.name,
                    caller.name,
                    jmp_protocol::usage::rfc3339(share.until.unwrap_or_default())
                ),
            );
        }
        if let Err(e) = self.share_allowed(&lease, &caller.name) {
            return Reply::Error(e);
        }
        let (now_lease, ev) = self.book.touch(now, &lease.name);
        self.on_events(now, ev);
        let Some(lease) = now_lease else {
            return err(
                CtlErrorCode::NotFound,
                format!("lease {} has ended", lease.name),
            );
        };
        let end = share.until.map_or(lease.end, |u| u.min(lease.end));
        self.sign_access(
            now,
            &lease,
            &caller.name,
            end,
            Some(ShareClaim {
                control: share.control,
            }),
        )
    }

    /// Whether `client`'s own policy lets it use `lease`'s exporter (an error naming both if
    /// not, or if the policy cannot be read: that never means "any exporter").
    fn share_allowed(&self, lease: &Lease, client: &str) -> Result<(), CtlError> {
        if !self.links.admits_shares.contains(&lease.exporter) {
            return Err(CtlError::new(
                CtlErrorCode::Forbidden,
                format!(
                    "lease {} cannot be shared: exporter {} runs a jmpd that does not know shares (it would admit a colleague as the holder); upgrade its jmpd",
                    lease.name, lease.exporter
                ),
            ));
        }
        let policy = self.registry.client_policy(client, self.default_max_secs)?;
        let allowed = self
            .book
            .exporter(&lease.exporter)
            .is_some_and(|e| policy.allow.matches(&e.labels));
        if allowed {
            Ok(())
        } else {
            Err(CtlError::new(
                CtlErrorCode::Forbidden,
                format!(
                    "lease {} cannot be shared with {client}: the policy of client {client} (allow {:?}) does not allow exporter {}",
                    lease.name, policy.text, lease.exporter
                ),
            ))
        }
    }

    /// A lease token naming `lease` and `client`, valid until `end_ms`, with where the
    /// lease's exporter is.
    fn sign_access(
        &mut self,
        now: Millis,
        lease: &Lease,
        client: &str,
        end_ms: Millis,
        share: Option<ShareClaim>,
    ) -> Reply {
        let Some(rec) = self.registry.exporters.get(&lease.exporter) else {
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
            exp: Some(end_ms.div_ceil(1000)),
            client: Some(client.to_string()),
            exporter: Some(lease.exporter.clone()),
            ctl: None,
            admin: false,
            share,
        };
        if let Some(exp) = claims.exp {
            self.links.token_issued(&lease.name, exp);
        }
        match self.auth.signer.sign(&claims) {
            Ok(token) => Reply::Access(Access {
                lease: lease_info(lease),
                token,
                address: rec.address.clone(),
                fingerprint: rec.fingerprint.clone(),
                relay: rec.relay && self.relays.is_some(),
            }),
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        }
    }

    /// `jmp share lease NAME --with CLIENT`: the holder (or an admin) lets `with` attach beside
    /// it. Refused when `with`'s own policy does not allow the exporter (a share never widens
    /// a policy), for the holder itself, an unknown client, or an end already past. Sharing
    /// again with the same client replaces its share (a new end, control given or taken: its
    /// sessions under the old terms are ended by the exporter).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn share_lease(
        &mut self,
        now: Millis,
        caller: &Caller,
        admin: bool,
        name: &str,
        with: &str,
        until: Option<u64>,
        control: bool,
    ) -> Reply {
        let lease = match self.own_lease(caller, admin, name) {
            Ok(l) => l,
            Err(e) => return Reply::Error(e),
        };
        if with == lease.client {
            return err(
                CtlErrorCode::Invalid,
                format!("lease {name} is {with}'s own; share it with another client"),
            );
        }
        let until = until.map(|u| u.saturating_mul(1000));
        if let Some(u) = until {
            if u <= now {
                return err(
                    CtlErrorCode::Invalid,
                    format!(
                        "--until {} is already past",
                        jmp_protocol::usage::rfc3339(u)
                    ),
                );
            }
        }
        if let Err(e) = self.share_allowed(&lease, with) {
            return Reply::Error(e);
        }
        // The colleague's own longest lease bounds its share too: a share is no way around
        // its policy's `max_duration`. Asked beyond it, refused (as a lease that long would
        // be); asked for nothing, it ends at that limit, which `get leases` shows. The limit
        // is stored even when the lease ends sooner: the lease may be extended (by hand or
        // auto-extension) past it later, and nothing re-caps a share then.
        let max = match self.registry.client_policy(with, self.default_max_secs) {
            Ok(p) => p.max_secs.saturating_mul(1000),
            Err(e) => return Reply::Error(e),
        };
        let limit = now.saturating_add(max);
        let until = match until {
            Some(u) if u > limit => {
                return err(
                    CtlErrorCode::Forbidden,
                    format!(
                        "--until {} is beyond what client {with} may hold: its policy's longest lease is {}, so its share may last until {} at the latest",
                        jmp_protocol::usage::rfc3339(u),
                        fmt_secs(max / 1000),
                        jmp_protocol::usage::rfc3339(limit)
                    ),
                )
            }
            None => Some(limit),
            u => u,
        };
        let mut shares: Vec<Share> = lease
            .shares
            .iter()
            .filter(|s| s.client != with && s.live_at(now))
            .cloned()
            .collect();
        shares.push(Share {
            client: with.to_string(),
            until,
            control,
        });
        match self.book.set_shares(name, shares) {
            Ok(l) => {
                info!(lease = %name, with, control, until = until.map(|u| u / 1000), "lease shared");
                self.links.push.insert(l.exporter.clone());
                Reply::Lease(lease_info(&l))
            }
            Err(e) => err(CtlErrorCode::Invalid, e),
        }
    }

    /// When the next listed share reaches its `--until` (`None`: none has one). Scans every
    /// lease: there are at most as many as exporters, each with at most `MAX_SHARES` shares.
    pub(super) fn next_share_end(&self) -> Option<Millis> {
        self.book
            .leases()
            .flat_map(|l| l.shares.iter().filter_map(|s| s.until))
            .min()
    }

    /// Shares past their `--until` are removed from their leases (the store keeps the rest,
    /// `get leases` stops listing them) and the exporters hear of it (their guests of that
    /// share were ended at the share's end already: their tokens said so).
    pub(super) fn end_past_shares(&mut self, now: Millis) {
        let past: Vec<(String, Vec<String>, Vec<Share>)> = self
            .book
            .leases()
            .filter(|l| l.shares.iter().any(|s| !s.live_at(now)))
            .map(|l| {
                let (keep, gone): (Vec<Share>, Vec<Share>) =
                    l.shares.iter().cloned().partition(|s| s.live_at(now));
                (
                    l.name.clone(),
                    gone.into_iter().map(|s| s.client).collect(),
                    keep,
                )
            })
            .collect();
        for (lease, gone, keep) in past {
            if let Ok(l) = self.book.set_shares(&lease, keep) {
                info!(%lease, with = ?gone, "share ended: its --until passed");
                self.links.push.insert(l.exporter.clone());
            }
        }
    }

    /// `jmp unshare lease NAME --with CLIENT`: the share ends; the exporter ends the
    /// colleague's sessions when it hears (its next push) and refuses its tokens.
    pub(super) fn unshare_lease(
        &mut self,
        now: Millis,
        caller: &Caller,
        admin: bool,
        name: &str,
        with: &str,
    ) -> Reply {
        let lease = match self.own_lease(caller, admin, name) {
            Ok(l) => l,
            Err(e) => return Reply::Error(e),
        };
        if !lease.shares.iter().any(|s| s.client == with) {
            return err(
                CtlErrorCode::NotFound,
                format!("lease {name} is not shared with {with}"),
            );
        }
        let shares: Vec<Share> = lease
            .shares
            .iter()
            .filter(|s| s.client != with && s.live_at(now))
            .cloned()
            .collect();
        match self.book.set_shares(name, shares) {
            Ok(l) => {
                info!(lease = %name, with, "lease unshared");
                self.links.push.insert(l.exporter.clone());
                Reply::Lease(lease_info(&l))
            }
            Err(e) => err(CtlErrorCode::NotFound, e),
        }
    }

    /// Requests whose requester did not come back within the grace period are withdrawn; a
    /// lease granted to nobody is released, so a board never stays leased to a vanished caller.
    pub(super) fn reap_orphans(&mut self, now: Millis) {
        let t = Instant::now();
        let due: Vec<String> = self
            .waiters
            .orphans
            .iter()
            .filter(|(_, d)| **d <= t)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.waiters.orphans.remove(&id);
            if let Some(w) = self.book.waiting_by_id(&id).cloned() {
                warn!(request = %id, client = %w.client, "requester did not come back; withdrawing its request");
                let ev = self.book.release(now, &w.lease_name);
                self.on_events(now, ev);
                self.waiters.positions_dirty = true;
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

    /// Each waiting caller whose place changed hears its new place.
    pub(super) fn send_positions(&mut self, now: Millis) {
        for (id, w) in self.waiters.watchers.iter_mut() {
            let Some(pos) = self.book.position(now, id) else {
                continue;
            };
            if w.last.as_ref() != Some(&pos) {
                w.last = Some(pos.clone());
                let _ = w.tx.send(Reply::Queued {
                    request_id: id.clone(),
                    lease: lease_name_of(&self.book, id),
                    position: pos.0,
                    behind: pos.1,
                    wait_until: w.wait_until / 1000,
                });
            }
        }
    }
}
