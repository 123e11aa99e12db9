//! Controller mode of jmpd: register with the controller, keep the registration alive, learn
//! which lease currently holds this exporter, and admit clients that present a valid lease token.
//!
//! The controller is not on the data path and need not be up: lease tokens are checked offline
//! with the controller's public key (from this exporter's own credential) and expire on their
//! own. What the controller adds when it is reachable: lease ends before expiry (deleted,
//! revoked), extensions, and which lease is current.

use crate::hooks::LeaseHooks;
use jmp_exporter::{Admission, AuthError, Authorizer, Exporter, TokenAuth};
use jmp_protocol::api::{
    Call, DeviceSummary, HookReport, Registration, RelayGrant, Reply, Request,
};
use jmp_protocol::token::{Claims, TokenKind};
use jmp_protocol::Hello;
use jmp_transport::controller::{CallError, Controllers};
use jmp_transport::token::{peek, Verifier};
use jmp_transport::Fingerprint;
use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{error, info, warn};

/// What the controller last told us.
#[derive(Default)]
struct View {
    /// Whether the controller has told us anything since start (until then, any valid token
    /// for this exporter is accepted).
    known: bool,
    current: Option<(String, u64)>,
    ended: Ended,
    /// The controller's clock when it sent this view (0: unknown).
    at: u64,
    /// Who the current lease is shared with (`jmp share lease`).
    shares: Vec<jmp_protocol::api::ShareInfo>,
}

/// Ended leases that kept too many records when a controller did not say how long their
/// tokens live: beyond this, the ones whose tokens expire first are forgotten first.
const MAX_ENDED: usize = 4096;
/// How long an ended lease is remembered when the controller did not say until when its
/// tokens may be valid (an older controller).
const ENDED_UNKNOWN_SECS: u64 = 7 * 86_400;

/// One ended lease: why, and until when a token of it may still be presented (Unix seconds).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct EndedEntry {
    reason: String,
    until: u64,
}

/// The leases the controller said ended, whose tokens jmpd refuses until they expire. Kept in
/// the state dir: after a restart of jmpd with the controller unreachable, a released lease's
/// token is still refused (nothing else would tell jmpd it ended). Bounded by [`MAX_ENDED`];
/// an entry goes once its tokens have expired (they are refused as expired then).
#[derive(Default)]
struct Ended {
    leases: HashMap<String, EndedEntry>,
    file: Option<std::path::PathBuf>,
}

impl Ended {
    /// The ended leases recorded in `file` (none if it is missing or unreadable: that is
    /// logged, and only loses what the controller would tell again).
    fn load(file: std::path::PathBuf) -> Ended {
        let leases = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(
                    "{} is not readable ({e}); starting without it",
                    file.display()
                );
                HashMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                warn!("cannot read {}: {e}; starting without it", file.display());
                HashMap::new()
            }
        };
        let mut me = Ended {
            leases,
            file: Some(file),
        };
        me.prune(jmp_transport::unix_now());
        me
    }

    fn get(&self, lease: &str) -> Option<&str> {
        self.leases.get(lease).map(|e| e.reason.as_str())
    }

    /// Records what a push said ended (and writes the file if anything is new).
    fn add(&mut self, ended: &[jmp_protocol::api::EndedLease], now: u64) {
        let mut changed = self.prune(now);
        for e in ended {
            let until = match e.until {
                0 => now.saturating_add(ENDED_UNKNOWN_SECS),
                u => u,
            };
            if until <= now || self.leases.contains_key(&e.name) {
                continue;
            }
            self.leases.insert(
                e.name.clone(),
                EndedEntry {
                    reason: e.reason.clone(),
                    until,
                },
            );
            changed = true;
        }
        while self.leases.len() > MAX_ENDED {
            let first = self
                .leases
                .iter()
                .min_by(|a, b| (a.1.until, a.0).cmp(&(b.1.until, b.0)))
                .map(|(k, _)| k.clone());
            match first {
                Some(k) => self.leases.remove(&k),
                None => break,
            };
        }
        if changed {
            self.save();
        }
    }

    /// Forgets leases whose tokens have expired; whether any was.
    fn prune(&mut self, now: u64) -> bool {
        let before = self.leases.len();
        self.leases.retain(|_, e| e.until > now);
        self.leases.len() != before
    }

    fn save(&self) {
        let Some(file) = &self.file else { return };
        let text = serde_json::to_vec(&self.leases).unwrap_or_default();
        if let Err(e) = jmp_transport::write_secret_file(file, &text) {
            warn!(
                "cannot record the ended leases in {}: {e} (after a restart of jmpd with the controller unreachable, their tokens would be accepted until they expire)",
                file.display()
            );
        }
    }
}

pub struct LeaseAuth {
    exporter: String,
    verifier: Verifier,
    view: Mutex<View>,
    /// Ticks on every push from the controller (a Hello waiting for its lease to be
    /// confirmed waits on it).
    pushes: tokio::sync::watch::Sender<u64>,
    /// A direct-mode token accepted as well (`auth.tokenFile` beside `controller`).
    direct: Option<TokenAuth>,
}

impl LeaseAuth {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Authorizer for LeaseAuth {
    fn check(&self, hello: &Hello) -> Result<Admission, AuthError> {
        let token = hello.token.trim();
        if token.split('.').count() != 3 {
            return match &self.direct {
                Some(d) => d.check(hello),
                None if token.is_empty() => Err(AuthError::Refused(
                    "no lease token presented (lease this exporter first: jmp create lease, then jmp attach)"
                        .into(),
                )),
                None => Err(AuthError::Refused("invalid token: not a lease token".into())),
            };
        }
        let c = self
            .verifier
            .verify(token, TokenKind::Lease, jmp_transport::unix_now())
            .map_err(|e| AuthError::Refused(format!("lease token refused: {e}")))?;
        let exporter = c.exporter.clone().unwrap_or_default();
        if exporter != self.exporter {
            return Err(AuthError::Refused(format!(
                "lease token refused: it is for exporter {:?}, this is {:?}",
                jmp_protocol::name::escape(&exporter),
                self.exporter
            )));
        }
        let view = self.view();
        if let Some(why) = view.ended.get(&c.sub) {
            return Err(AuthError::Refused(format!("lease token refused: {why}")));
        }
        let mut until = c.exp;
        if view.known {
            match &view.current {
                // The pushed end, unless the token is newer news: issued after the push, it
                // carries the end as of its issue (a push about an extension can be missed
                // while jmpd is cut off from the controller; the client's token is not).
                Some((name, end)) if *name == c.sub => {
                    until = match c.exp {
                        Some(exp) if view.at > 0 && c.iat > view.at => Some(exp),
                        _ => Some(*end),
                    }
                }
                // Valid, but not current as far as the controller last said: a grant newer
                // than its last push, or a lease that is over. The next push decides.
                _ => {
                    return Err(AuthError::NotYet(format!(
                        "lease token refused: lease {} is not this exporter's current lease",
                        c.sub
                    )))
                }
            }
        }
        if let Some(share) = c.share {
            // A colleague's token: admitted only on the controller's word that the share
            // stands with these terms (a share revoked while jmpd was cut off must not let
            // its token in on its own), and never past the share's end or the lease's.
            let who = c.client.clone().unwrap_or_default();
            if !view.known {
                return Err(AuthError::NotYet(format!(
                    "lease token refused: {} has not heard from the controller since it started, so it cannot tell whether lease {} is still shared with {who}",
                    self.exporter, c.sub
                )));
            }
            match view.shares.iter().find(|s| s.client == who) {
                None => {
                    return Err(AuthError::NotYet(format!(
                        "lease token refused: lease {} is not shared with {who}",
                        c.sub
                    )))
                }
                Some(s) if s.control != share.control => {
                    return Err(AuthError::Refused(format!(
                        "lease token refused: the share of lease {} with {who} changed; attach again for a new token",
                        c.sub
                    )))
                }
                // The holder narrowed the share after this token was made: the controller's
                // end is the one that counts.
                Some(s) if s.until.is_some_and(|u| u <= jmp_transport::unix_now()) => {
                    return Err(AuthError::Refused(format!(
                        "lease token refused: the share of lease {} with {who} has ended",
                        c.sub
                    )))
                }
                Some(s) => {
                    until = [until, c.exp, s.until].into_iter().flatten().min();
                }
            }
        }
        Ok(Admission {
            lease: Some(c.sub),
            until,
            client: c.client.clone(),
            // Until the controller has spoken, the token is the only word on the lease: it
            // may attach to a free board but not end another live session.
            confirmed: view.known,
            share: c.share,
        })
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.pushes.subscribe())
    }
}

/// What controller mode does besides registering: relayed sessions, lease hooks, metrics.
#[derive(Default)]
pub struct Extras {
    /// A duplicate of the exporter's QUIC socket, to punch through to relay sessions from
    /// (`controller: {relay: true}`); `None`: no relayed sessions.
    pub relay: Option<std::net::UdpSocket>,
    pub hooks: Option<Arc<LeaseHooks>>,
    /// The hooks' reports, sent to the controller (again after a reconnect if need be).
    pub reports: Option<tokio::sync::mpsc::UnboundedReceiver<HookReport>>,
    /// The current lease as the controller says, for jmpd's metrics.
    pub holder: Option<crate::metrics::Holder>,
}

fn fmt_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// An `in-use` call on its way: what it says, and the controller's answer.
type InUseReport = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Option<String>, Result<Reply, CallError>)> + Send>,
>;

/// What a registration says, and the TLS identity whose key it proves to hold.
struct Registering<'a> {
    reg: &'a Registration,
    identity: &'a jmp_transport::Identity,
    /// Which lease a session is attached under, as the exporter says (reported on changes).
    sessions: &'a mut tokio::sync::watch::Receiver<Option<String>>,
}

/// Everything needed to run controller mode, from the exporter's credential file.
pub struct Registrar {
    pub auth: Arc<LeaseAuth>,
    /// The exporter credential in use: replaced when it is renewed.
    credential: Mutex<String>,
    claims: Claims,
    endpoint: String,
    /// Where the renewed credential is written (`controller.tokenFile`), and how long before
    /// expiry it is renewed (`None`: a third of its life).
    renewal: Option<(std::path::PathBuf, Option<u64>)>,
    /// After a failed renewal, not before this.
    renew_retry: Mutex<Option<tokio::time::Instant>>,
}

/// How long after a failed renewal jmpd tries again, and the least time between two
/// renewals (a `renewBefore` as long as the credential's life must not renew in a loop).
const RENEW_RETRY: Duration = Duration::from_secs(60);

impl Registrar {
    pub fn new(
        exporter: &str,
        credential: String,
        endpoint_override: Option<String>,
        direct: Option<TokenAuth>,
    ) -> Result<Registrar, String> {
        let claims = peek(&credential).map_err(|e| format!("exporter credential: {e}"))?;
        if claims.kind != TokenKind::Exporter {
            return Err(format!(
                "the credential is a {} credential, not an exporter's",
                claims.kind.as_str()
            ));
        }
        let ctl = claims
            .ctl
            .clone()
            .ok_or("the credential does not name its controller")?;
        if claims.sub != exporter {
            return Err(format!(
                "the credential is for exporter {:?} but this config's metadata.name is {exporter:?}",
                claims.sub
            ));
        }
        let verifier = Verifier::from_public_key(&ctl.key).map_err(|e| e.to_string())?;
        // The credential must be signed by the key it names (a copy-paste check, not security:
        // the controller checks the credential itself).
        verifier
            .verify(&credential, TokenKind::Exporter, jmp_transport::unix_now())
            .map_err(|e| format!("exporter credential: {e}"))?;
        Ok(Registrar {
            auth: Arc::new(LeaseAuth {
                exporter: exporter.into(),
                verifier,
                view: Mutex::new(View::default()),
                pushes: tokio::sync::watch::Sender::new(0),
                direct,
            }),
            credential: Mutex::new(credential),
            endpoint: endpoint_override.unwrap_or(ctl.endpoint),
            claims,
            renewal: None,
            renew_retry: Mutex::new(None),
        })
    }

    /// Keep the leases the controller says ended in `file` (in the state dir), so that their
    /// tokens stay refused across restarts of jmpd.
    pub fn remember_ended_in(self, file: std::path::PathBuf) -> Self {
        self.auth.view().ended = Ended::load(file);
        self
    }

    /// Renew the credential before it expires and write it to `token_file`.
    pub fn renew_into(mut self, token_file: std::path::PathBuf, renew_before: Option<u64>) -> Self {
        self.renewal = Some((token_file, renew_before));
        self
    }

    fn credential(&self) -> String {
        self.credential
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// When the credential in use is due for renewal (`None`: it does not expire, or jmpd
    /// does not renew).
    fn renewal_due(&self) -> Option<tokio::time::Instant> {
        let (_, before) = self.renewal.as_ref()?;
        let at = peek(&self.credential()).ok()?.renew_at(*before)?;
        let now = jmp_transport::unix_now();
        let due = tokio::time::Instant::now() + Duration::from_secs(at.saturating_sub(now));
        let retry = *self.renew_retry.lock().unwrap_or_else(|e| e.into_inner());
        Some(retry.map_or(due, |r| r.max(due)))
    }

    /// Renews the credential over the registration's connection and writes it to the token
    /// file (atomically, 0600). A failure is logged and retried; the credential in hand
    /// stays valid until it expires.
    async fn renew(&self, conn: &quinn::Connection) {
        let Some((file, _)) = &self.renewal else {
            return;
        };
        let call = Call {
            credential: self.credential(),
            request: Request::Renew,
        };
        let exp = peek(&call.credential).ok().and_then(|c| c.exp).unwrap_or(0);
        match jmp_transport::controller::call_once(conn, &call).await {
            Ok(Reply::Credential(c)) => {
                *self.renew_retry.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(tokio::time::Instant::now() + RENEW_RETRY);
                let until = peek(&c.token).ok().and_then(|c| c.exp).unwrap_or(0);
                *self.credential.lock().unwrap_or_else(|e| e.into_inner()) = c.token.clone();
                match jmp_transport::write_secret_file(file, format!("{}\n", c.token).as_bytes()) {
                    Ok(()) => info!(
                        "exporter credential renewed (valid until {}), written to {}",
                        fmt_unix(until),
                        file.display()
                    ),
                    Err(e) => error!(
                        "exporter credential renewed, but it cannot be written to {}: {e}; this process uses it, the file's expires at {} (make tokenFile writable, e.g. under StateDirectory)",
                        file.display(),
                        fmt_unix(exp)
                    ),
                }
            }
            other => {
                *self.renew_retry.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(tokio::time::Instant::now() + RENEW_RETRY);
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(r) => format!("unexpected answer {r:?}"),
                };
                warn!(
                    "the exporter credential expires at {} and could not be renewed: {why}; retrying in {}s",
                    fmt_unix(exp),
                    RENEW_RETRY.as_secs()
                );
            }
        }
    }

    pub fn controller(&self) -> &str {
        &self.endpoint
    }

    /// Registers and stays registered (reconnecting with backoff) for as long as it runs. Each
    /// registration proves that this process holds `identity`'s key (the controller binds
    /// the exporter to that identity's fingerprint).
    pub async fn run(
        self,
        exporter: Arc<Exporter>,
        address: String,
        identity: jmp_transport::Identity,
        labels: std::collections::BTreeMap<String, String>,
        devices: Vec<DeviceSummary>,
        mut extras: Extras,
    ) {
        let reg = Registration {
            address,
            fingerprint: identity.fingerprint().to_string(),
            labels,
            devices,
            relay: extras.relay.is_some(),
            reports_in_use: true,
            admits_shares: true,
            ..Default::default()
        };
        let mut reports = extras.reports.take();
        let pending: Arc<Mutex<Vec<HookReport>>> = Arc::default();
        // Short at first: a lost registration is usually a controller failover, and the next
        // leader is there within a few seconds.
        const FIRST: Duration = Duration::from_millis(200);
        let mut backoff = FIRST;
        loop {
            let mut registered = false;
            let mut reg = reg.clone();
            if let Some(h) = &extras.hooks {
                // Declared afresh at every registration: what it owes may have changed.
                reg.cleanup_secs = h.cleanup_secs();
                reg.cleaning = h.owed();
            }
            // Which lease is in use here, said afresh too: a controller that restarted or
            // failed over meanwhile learns it from this.
            let mut sessions = exporter.sessions();
            reg.attached = sessions.borrow_and_update().clone();
            let res = self
                .session(
                    &exporter,
                    Registering {
                        reg: &reg,
                        identity: &identity,
                        sessions: &mut sessions,
                    },
                    &mut registered,
                    &extras,
                    &mut reports,
                    &pending,
                )
                .await;
            if registered {
                // It was up: a later loss starts the backoff afresh.
                backoff = FIRST;
            }
            match res {
                Ok(()) => {}
                Err(e) => {
                    warn!(
                        "controller {}: {e}; retrying in {:.1}s",
                        self.endpoint,
                        backoff.as_secs_f64()
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn session(
        &self,
        exporter: &Exporter,
        Registering {
            reg,
            identity,
            sessions,
        }: Registering<'_>,
        registered: &mut bool,
        extras: &Extras,
        reports: &mut Option<tokio::sync::mpsc::UnboundedReceiver<HookReport>>,
        pending: &Arc<Mutex<Vec<HookReport>>>,
    ) -> Result<(), String> {
        let ctl = self.claims.ctl.as_ref().ok_or("no controller")?;
        let pin: Fingerprint = ctl
            .fingerprint
            .parse()
            .map_err(|e| format!("credential's controller fingerprint: {e}"))?;
        // One controller, or the several of a cluster: the registration goes to the leader.
        let ctls = Controllers::new(&self.endpoint, pin)?;
        // Made for the connection it goes on: the proof is bound to that connection.
        let make = |conn: &quinn::Connection| {
            let proof =
                jmp_transport::possession::registration_proof(identity, conn, &self.claims.sub)
                    .map_err(|e| format!("cannot prove this exporter's TLS identity: {e}"))?;
            let mut reg = reg.clone();
            reg.proof = Some(proof);
            Ok(Call {
                credential: self.credential(),
                request: Request::Register(reg),
            })
        };
        let (mut replies, _keep) = ctls.call_on(make, true).await.map_err(|e| {
            ctls.close();
            e.to_string()
        })?;
        // The controller that took the registration (the leader): hook reports go to it, and
        // its host runs the relay.
        let conn = ctls
            .connection()
            .ok_or("the controller closed the connection")?;
        let addr = conn.remote_address();
        let mut first = true;
        // The sessions as last told to the controller (the registration told the first), and
        // the report on its way: one at a time, each sent after the answer to the one before,
        // so the controller hears them in order.
        let mut told = reg.attached.clone();
        let mut report_in_flight: Option<InUseReport> = None;
        // The exporter dropped its end (it is shutting down): nothing more to report.
        let mut sessions_gone = false;
        loop {
            if report_in_flight.is_none() && !first {
                let now = sessions.borrow_and_update().clone();
                if now != told {
                    let call = Call {
                        credential: self.credential(),
                        request: Request::InUse { lease: now.clone() },
                    };
                    let conn = conn.clone();
                    report_in_flight = Some(Box::pin(async move {
                        let r = jmp_transport::controller::call_once(&conn, &call).await;
                        (now, r)
                    }));
                }
            }
            let renew_at = self.renewal_due();
            let next = tokio::select! {
                r = replies.next() => r,
                (said, r) = async {
                    match report_in_flight.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    report_in_flight = None;
                    // Anything but `done` (a refusal, a store that could not take it, a lost
                    // connection) means the controller may not know: registering again tells
                    // it where things stand.
                    match r {
                        Ok(Reply::Done) => told = said,
                        Ok(Reply::Error(e)) => {
                            return Err(format!("reporting the sessions: {}", e.message))
                        }
                        Ok(other) => {
                            return Err(format!("reporting the sessions: unexpected answer {other:?}"))
                        }
                        Err(e) => return Err(format!("reporting the sessions: {e}")),
                    }
                    continue;
                }
                r = sessions.changed(), if report_in_flight.is_none() && !sessions_gone => {
                    sessions_gone = r.is_err();
                    continue;
                }
                _ = async {
                    match renew_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.renew(&conn).await;
                    continue;
                }
                Some(report) = async {
                    match reports.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.report(&conn, report, pending);
                    continue;
                }
            };
            match next {
                Ok(Some(Reply::RelayOpen(grant))) => self.punch(extras, addr, grant),
                Ok(Some(Reply::ExporterState {
                    lease,
                    ended,
                    enabled,
                    at,
                    cleaning,
                })) => {
                    *registered = true;
                    if first {
                        // Reports that could not be sent while the controller was away.
                        let held: Vec<HookReport> =
                            std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
                        for r in held {
                            self.report(&conn, r, pending);
                        }
                        info!(
                            "registered with controller {} as {}{}",
                            ctls.current(),
                            self.claims.sub,
                            if enabled { "" } else { " (disabled)" }
                        );
                        first = false;
                    }
                    // The new lease's console history starts here: before its tokens are
                    // admitted (the view below) and before its beforeLease hook may power the
                    // board on (that boot log is the new lease's).
                    if let Some(l) = &lease {
                        exporter.lease_began(&l.name, &l.client);
                    }
                    {
                        let mut v = self.auth.view();
                        v.known = true;
                        v.ended.add(&ended, jmp_transport::unix_now());
                        v.current = lease.as_ref().map(|l| (l.name.clone(), l.end));
                        v.shares = lease.as_ref().map(|l| l.shares.clone()).unwrap_or_default();
                        v.at = at;
                    }
                    if let Some(h) = &extras.holder {
                        *h.lock().unwrap_or_else(|e| e.into_inner()) = lease
                            .as_ref()
                            .map(|l| (l.name.clone(), l.client.clone(), l.team.clone()));
                    }
                    // Before waiting connections hear of the push: a client of a new lease
                    // must find the board "preparing", not ready.
                    if let Some(h) = &extras.hooks {
                        h.on_push(lease.as_ref(), cleaning.as_deref());
                    }
                    self.auth.pushes.send_modify(|n| *n = n.wrapping_add(1));
                    for e in &ended {
                        exporter.end_lease(&e.name, &e.reason);
                    }
                    exporter.keep_only_lease(lease.as_ref().map(|l| l.name.as_str()));
                    exporter.set_shares(
                        lease.as_ref().map(|l| l.name.as_str()),
                        lease
                            .as_ref()
                            .map(|l| {
                                l.shares
                                    .iter()
                                    .map(|s| (s.client.clone(), s.control))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    );
                    if let Some(l) = &lease {
                        let ends: Vec<(String, u64)> = l
                            .shares
                            .iter()
                            .filter_map(|s| s.until.map(|u| (s.client.clone(), u)))
                            .collect();
                        exporter.cap_guests(&l.name, &ends);
                        exporter.set_lease_end(&l.name, l.end, l.extends);
                    }
                }
                Ok(Some(other)) => warn!("unexpected reply from the controller: {other:?}"),
                Ok(None) => return Err("registration ended".into()),
                Err(CallError::Refused(e)) => return Err(format!("refused: {e}")),
                Err(e) => {
                    ctls.close();
                    return Err(e.to_string());
                }
            }
        }
    }
}

impl Registrar {
    /// Sends a hook's report; one that cannot be sent waits for the next registration.
    fn report(
        &self,
        conn: &quinn::Connection,
        r: HookReport,
        pending: &Arc<Mutex<Vec<HookReport>>>,
    ) {
        let conn = conn.clone();
        let call = Call {
            credential: self.credential(),
            request: Request::LeaseHook(r.clone()),
        };
        let pending = pending.clone();
        tokio::spawn(async move {
            if let Err(e) = jmp_transport::controller::call_once(&conn, &call).await {
                if e.is_transient() {
                    pending.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                } else {
                    warn!("the controller refused a lease hook report: {e}");
                }
            }
        });
    }

    /// Punches through to a relay session from the exporter's QUIC socket (a few times: UDP
    /// may lose one), so that the relay can reach this exporter behind its NAT.
    fn punch(&self, extras: &Extras, controller: std::net::SocketAddr, grant: RelayGrant) {
        let Some(sock) = extras.relay.as_ref().and_then(|s| s.try_clone().ok()) else {
            warn!("the controller opened a relay session, but relay is not enabled in this config");
            return;
        };
        let relay = match &grant.host {
            None => Some(std::net::SocketAddr::new(controller.ip(), grant.port)),
            Some(h) => (h.as_str(), grant.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next()),
        };
        let (Some(relay), Ok(secret)) = (relay, jmp_protocol::relay::parse_secret(&grant.secret))
        else {
            warn!("unusable relay session from the controller: {grant:?}");
            return;
        };
        info!(session = %grant.session, %relay, "punching through to a relay session");
        tokio::spawn(async move {
            for wait in [0u64, 50, 200, 500] {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if let Err(e) = jmp_transport::relay::punch(&sock, relay, &secret) {
                    warn!("relay punch to {relay}: {e}");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jmp_transport::token::Signer;

    fn hello(signer: &Signer, lease: &str, iat: u64, exp: u64) -> Hello {
        let claims = Claims {
            iss: "test".into(),
            sub: lease.into(),
            kind: TokenKind::Lease,
            jti: format!("{iat}-{exp}"),
            iat,
            exp: Some(exp),
            client: Some("c1".into()),
            exporter: Some("e1".into()),
            ctl: None,
            admin: false,
            share: None,
        };
        Hello {
            features: 0,
            client: "c1".into(),
            session: 1,
            token: signer.sign(&claims).unwrap(),
        }
    }

    #[test]
    fn before_the_controller_has_spoken_a_token_admits_but_is_not_confirmed() {
        let dir = std::env::temp_dir().join(format!("jmpd-leaseauth0-{}", std::process::id()));
        let signer = Signer::load_or_create(&dir.join("key")).unwrap();
        let now = jmp_transport::unix_now();
        let auth = LeaseAuth {
            exporter: "e1".into(),
            verifier: Verifier::from_public_key(&signer.public_key()).unwrap(),
            view: Mutex::new(View::default()),
            pushes: tokio::sync::watch::Sender::new(0),
            direct: None,
        };
        // jmpd just restarted: the token's word alone (it may not end another session: the
        // seat's rule), and its own end.
        let a = auth
            .check(&hello(&signer, "L1", now, now + 60))
            .expect("admitted");
        assert_eq!(a.lease.as_deref(), Some("L1"));
        assert_eq!(a.client.as_deref(), Some("c1"));
        assert!(!a.confirmed);
        assert_eq!(a.until, Some(now + 60));
        // Once the controller has said L1 is current, the same token is confirmed; another
        // lease's token must wait for the next push (it may be a grant newer than the push).
        {
            let mut v = auth.view();
            v.known = true;
            v.current = Some(("L1".into(), now + 60));
        }
        assert!(
            auth.check(&hello(&signer, "L1", now, now + 60))
                .expect("ok")
                .confirmed
        );
        assert!(matches!(
            auth.check(&hello(&signer, "L2", now, now + 60)),
            Err(AuthError::NotYet(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The ended leases survive a restart of jmpd (a new `LeaseAuth` from the same state
    /// dir, before the controller has said anything): a released lease's token stays refused.
    /// Entries go when their tokens expire, and the file is bounded.
    #[test]
    fn ended_leases_are_refused_after_a_restart_until_their_tokens_expire() {
        let dir = std::env::temp_dir().join(format!("jmpd-ended-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let signer = Signer::load_or_create(&dir.join("key")).unwrap();
        let file = dir.join("ended-leases.json");
        let now = jmp_transport::unix_now();
        let auth = || LeaseAuth {
            exporter: "e1".into(),
            verifier: Verifier::from_public_key(&signer.public_key()).unwrap(),
            view: Mutex::new(View {
                ended: Ended::load(file.clone()),
                ..View::default()
            }),
            pushes: tokio::sync::watch::Sender::new(0),
            direct: None,
        };
        let ended = |name: &str, until: u64| jmp_protocol::api::EndedLease {
            name: name.into(),
            reason: format!("lease {name} was released"),
            until,
        };
        {
            let first = auth();
            first
                .view()
                .ended
                .add(&[ended("L1", now + 60), ended("gone", now - 1)], now);
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Restarted: nothing from the controller yet, and L1's token is refused with why.
        let second = auth();
        match second.check(&hello(&signer, "L1", now, now + 60)) {
            Err(AuthError::Refused(why)) => assert!(why.contains("L1 was released"), "{why}"),
            other => panic!("{:?}", other.map(|a| a.lease)),
        }
        // Another lease's valid token is admitted (unconfirmed, as before any push).
        assert!(second.check(&hello(&signer, "L2", now, now + 60)).is_ok());
        // Past its tokens' expiry the entry goes.
        let mut v = second.view();
        assert!(v.ended.prune(now + 61));
        assert!(v.ended.get("L1").is_none());
        // Bounded: the earliest-expiring are forgotten first.
        let many: Vec<_> = (0..MAX_ENDED as u64 + 10)
            .map(|i| ended(&format!("M{i}"), now + 100 + i))
            .collect();
        v.ended.add(&many, now);
        assert_eq!(v.ended.leases.len(), MAX_ENDED);
        assert!(v.ended.get("M0").is_none() && v.ended.get("M4105").is_some());
        drop(v);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_newer_than_the_last_push_tells_the_lease_end() {
        let dir = std::env::temp_dir().join(format!("jmpd-leaseauth-{}", std::process::id()));
        let signer = Signer::load_or_create(&dir.join("key")).unwrap();
        let now = jmp_transport::unix_now();
        let pushed_end = now + 100;
        let auth = LeaseAuth {
            exporter: "e1".into(),
            verifier: Verifier::from_public_key(&signer.public_key()).unwrap(),
            view: Mutex::new(View {
                known: true,
                current: Some(("L1".into(), pushed_end)),
                ended: Ended::default(),
                at: now - 10,
                shares: Vec::new(),
            }),
            pushes: tokio::sync::watch::Sender::new(0),
            direct: None,
        };
        let until = |h: &Hello| auth.check(h).map(|a| a.until).map_err(|_| ());
        // Issued before the push: the push is the newer word on the lease's end.
        assert_eq!(
            until(&hello(&signer, "L1", now - 20, now + 1000)),
            Ok(Some(pushed_end))
        );
        // Issued after it: the lease was extended (or shortened) and the push about it missed.
        assert_eq!(
            until(&hello(&signer, "L1", now - 5, now + 1000)),
            Ok(Some(now + 1000))
        );
        assert_eq!(
            until(&hello(&signer, "L1", now - 5, now + 50)),
            Ok(Some(now + 50))
        );
        // Issued in the push's second: which came first is unknown, so the push counts.
        assert_eq!(
            until(&hello(&signer, "L1", now - 10, now + 1000)),
            Ok(Some(pushed_end))
        );
        // A newer token does not make another lease current.
        assert!(until(&hello(&signer, "L2", now - 5, now + 1000)).is_err());
        // A controller that does not say when it pushed (older version): the push counts.
        auth.view().at = 0;
        assert_eq!(
            until(&hello(&signer, "L1", now - 5, now + 1000)),
            Ok(Some(pushed_end))
        );

        // A colleague's share token: admitted only while the push lists the share with the
        // token's terms, never past the share's end (the token's) or the lease's.
        let shared = |control: bool, exp: u64| {
            let mut h = hello(&signer, "L1", now - 5, exp);
            let mut c = jmp_transport::token::peek(&h.token).unwrap();
            c.client = Some("bob".into());
            c.share = Some(jmp_protocol::token::ShareClaim { control });
            h.token = signer.sign(&c).unwrap();
            h
        };
        assert!(matches!(
            auth.check(&shared(false, now + 30)),
            Err(AuthError::NotYet(w)) if w.contains("not shared with bob")
        ));
        auth.view().shares = vec![jmp_protocol::api::ShareInfo {
            client: "bob".into(),
            until: Some(now + 30),
            control: false,
        }];
        let a = auth.check(&shared(false, now + 30)).expect("admitted");
        assert_eq!(a.client.as_deref(), Some("bob"));
        assert_eq!(
            a.share,
            Some(jmp_protocol::token::ShareClaim { control: false })
        );
        assert_eq!(a.until, Some(now + 30), "the share ends before the lease");
        // A token made before the holder narrowed the share: the pushed end counts.
        assert_eq!(
            until(&shared(false, now + 1000)),
            Ok(Some(now + 30)),
            "the share's end as pushed caps an older, longer token"
        );
        auth.view().shares[0].until = None;
        assert_eq!(until(&shared(false, now + 1000)), Ok(Some(pushed_end)));
        auth.view().shares[0].until = Some(now - 1);
        assert!(matches!(
            auth.check(&shared(false, now + 1000)),
            Err(AuthError::Refused(w)) if w.contains("has ended")
        ));
        auth.view().shares[0].until = Some(now + 30);
        assert!(matches!(
            auth.check(&shared(true, now + 30)),
            Err(AuthError::Refused(w)) if w.contains("changed")
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
