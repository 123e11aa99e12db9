//! Serving a board: accept connections on a QUIC endpoint, check each client's token, let the
//! [`Seat`] decide who holds the board, and hand each channel and request to its device.
//!
//! A misbehaving client (garbage, a wrong token, a protocol violation) only ever ends its own
//! connection; the exporter keeps serving. Nothing here names a device kind.

use crate::auth::{AuthError, Authorizer};
use crate::config::ExporterConfig;
use crate::seat::{Action, Claim, Seat, Verdict};
use jmp_devices::board::Board;
use jmp_devices::kind::BuildCtx;
use jmp_devices::serve::DeviceSet;
use jmp_protocol::{features, name, ChannelMode, ErrorCode, Status, Welcome};
use jmp_transport::{Link, LinkEvent, LinkHandle};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn, Instrument};

/// How long a Hello whose lease the controller has not confirmed yet waits for the push.
const CONFIRM_WAIT: Duration = Duration::from_secs(2);
/// While the board is being prepared, a waiting client hears from us at least this often (its
/// handshake clock restarts with every notice; it gives up after 10 s of silence).
const PREPARING_NOTICE: Duration = Duration::from_secs(4);

/// The preparation of the board for a lease (its beforeLease hook), as sessions see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prep {
    /// The lease being (or last) prepared.
    pub lease: Option<String>,
    pub state: PrepState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PrepState {
    /// Ready (or nothing to prepare).
    #[default]
    Ready,
    /// The hook runs: clients of this lease wait.
    Running { what: String },
    /// The hook failed and the lease ends: clients of this lease are told why.
    Failed(String),
}

/// Whose the board's output is now: the holder it is printed for. Controller mode: a lease
/// and its client (the token's). Direct and local mode have no leases: a holder is a client
/// name, the Hello's own, so there this keeps one user's console from the next user's by
/// accident; it cannot keep it from someone else holding the same token, who is trusted
/// alike.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tenure {
    lease: Option<String>,
    client: String,
}

/// Counters for jmpd's metrics (the exporter library keeps them; jmpd serves them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions admitted and not yet ended (attachments and one-shot requests).
    pub sessions: std::sync::atomic::AtomicI64,
    pub sessions_total: std::sync::atomic::AtomicU64,
}

pub struct Exporter {
    name: String,
    /// Connections that have not yet been admitted by the seat (see `jmp_transport::gate`).
    gate: Arc<jmp_transport::gate::Gate>,
    devices: DeviceSet,
    auth: Arc<dyn Authorizer>,
    instance: u64,
    features: u64,
    seat: Mutex<Seat<LinkHandle>>,
    next_conn: AtomicU64,
    prep: tokio::sync::watch::Sender<Prep>,
    /// Lines of lease hooks' output, for the sessions waiting on or holding the board.
    hook_lines: tokio::sync::broadcast::Sender<String>,
    /// The current preparation's output so far, for clients that start waiting late.
    hook_backlog: Mutex<std::collections::VecDeque<String>>,
    stats: Stats,
    /// The lease a session attached under uses the board now (the holder's, else a guest's;
    /// `None`: nobody, or the holder came without a lease), for the controller: a lease is in
    /// use while a session of it is attached, a colleague's of a shared lease included.
    sessions: tokio::sync::watch::Sender<Option<String>>,
    /// The current holder; `None` until the first one since the exporter started.
    tenure: Mutex<Option<Tenure>>,
    /// A moment on both clocks: the seat's times (monotonic) become Unix seconds from it,
    /// the same for a guest at every push.
    epoch: (Instant, u64),
    history: crate::config::History,
}

impl Exporter {
    /// Starts every device of the config (serial ports are opened, and retried, in the
    /// background). Needs a tokio runtime.
    pub fn from_config(
        cfg: &ExporterConfig,
        auth: Arc<dyn Authorizer>,
    ) -> Result<Exporter, String> {
        let board = Board::new();
        let ctx = BuildCtx {
            exporter: &cfg.metadata.name,
            board: &board,
            fresh_scratch: cfg.fresh_scratch,
            state_dir: cfg.state_dir.as_deref(),
        };
        let drivers = cfg
            .export
            .0
            .iter()
            .map(|(name, spec)| spec.start(name, &ctx))
            .collect::<Vec<_>>();
        let datagrams = drivers
            .iter()
            .any(|d| d.modes().contains(&ChannelMode::Datagram));
        let instance = crate::auth::random_u64()?;
        Ok(Exporter {
            name: cfg.metadata.name.clone(),
            gate: jmp_transport::gate::Gate::new(jmp_transport::gate::Limits::default()),
            devices: DeviceSet::new(&cfg.metadata.name, drivers),
            auth,
            instance,
            features: features::REQUESTS
                | features::STATUS
                | if datagrams { features::DATAGRAMS } else { 0 },
            seat: Mutex::new(Seat::new(&cfg.metadata.name)),
            next_conn: AtomicU64::new(1),
            prep: tokio::sync::watch::Sender::new(Prep::default()),
            hook_lines: tokio::sync::broadcast::channel(256).0,
            hook_backlog: Mutex::default(),
            stats: Stats::default(),
            sessions: tokio::sync::watch::Sender::new(None),
            tenure: Mutex::default(),
            epoch: (Instant::now(), jmp_transport::unix_now()),
            history: cfg.history,
        })
    }

    /// A holder's tenure begins (or goes on): when it is another client's, or another lease's
    /// and the config keeps history per lease, the devices forget what the board printed
    /// before, so the new holder sees only its own lease's output (a power-on's boot log
    /// inside it included). The first holder since the exporter started sees what the board
    /// printed since the start: that was printed for nobody.
    fn begin_tenure(&self, next: Tenure) {
        let mut cur = self.tenure.lock().unwrap_or_else(|e| e.into_inner());
        let forget = match cur.as_ref() {
            None => false,
            // The same lease is the same tenure, whoever's name its sessions give.
            Some(c) if *c == next || (c.lease.is_some() && c.lease == next.lease) => return,
            Some(c) => !(self.history == crate::config::History::Client && c.client == next.client),
        };
        info!(
            lease = next.lease.as_deref().unwrap_or("-"),
            client = %name::escape(&next.client),
            "new holder; earlier console output is {}",
            if forget { "not shown to it" } else { "kept for it" }
        );
        *cur = Some(next);
        if forget {
            self.devices.new_holder();
        }
    }

    /// The controller says `lease` of `client` is this exporter's current lease: its tenure
    /// begins now, before its client attaches (and before its beforeLease hook, which may
    /// power the board on: that boot log is the new lease's).
    pub fn lease_began(&self, lease: &str, client: &str) {
        self.begin_tenure(Tenure {
            lease: Some(lease.to_string()),
            client: client.to_string(),
        });
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn devices(&self) -> &DeviceSet {
        &self.devices
    }

    /// Connections that have not yet been admitted.
    pub fn pending_connections(&self) -> usize {
        self.gate.pending()
    }

    fn seat(&self) -> std::sync::MutexGuard<'_, Seat<LinkHandle>> {
        self.seat.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the seat, then publishes the lease in use if that changed, and tells the
    /// holder its guests if they changed (under the seat's lock, so two changes cannot
    /// publish in the wrong order).
    fn with_seat<R>(&self, f: impl FnOnce(&mut Seat<LinkHandle>) -> R) -> R {
        let mut seat = self.seat();
        let (_, guests_before) = seat.guest_watch();
        let r = f(&mut seat);
        let (to, guests) = seat.guest_watch();
        if let Some(h) = to.filter(|_| guests != guests_before) {
            h.guests(self.guest_list(&guests));
        }
        let lease = seat.lease_in_use().map(str::to_string);
        self.sessions.send_if_modified(|l| {
            let changed = *l != lease;
            *l = lease;
            changed
        });
        r
    }

    /// The lease a session is attached under right now (`None`: nobody holds the board, or
    /// its holder came without a lease), as it changes.
    pub fn sessions(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.sessions.subscribe()
    }

    /// Does what the seat decided, then ends the one-shot sessions that may no longer stay
    /// after that change (see [`Seat::strays`]).
    fn act(&self, a: Option<Action<LinkHandle>>) {
        let strays = self.with_seat(|s| s.strays(jmp_transport::unix_now()));
        for a in a.into_iter().chain(strays) {
            match a {
                Action::Bye {
                    handle,
                    code,
                    reason,
                } => {
                    info!(
                        "ending the session from {}: {reason}",
                        handle.remote_address()
                    );
                    handle.bye(code, reason);
                }
                Action::Notice { handle, text } => handle.notice(text),
            }
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The board is being prepared for `lease` (its beforeLease hook runs; `what` says what,
    /// for the waiting user): its clients wait until [`Exporter::prepared`].
    pub fn preparing(&self, lease: &str, what: &str) {
        self.backlog().clear();
        self.prep.send_replace(Prep {
            lease: Some(lease.to_string()),
            state: PrepState::Running {
                what: what.to_string(),
            },
        });
    }

    /// The preparation for `lease` is over: its waiting clients attach, or (`Some(why)`) are
    /// told the lease ended and why.
    pub fn prepared(&self, lease: &str, failure: Option<String>) {
        self.prep.send_if_modified(|p| {
            if p.lease.as_deref() != Some(lease) {
                return false;
            }
            p.state = match failure {
                Some(why) => PrepState::Failed(why),
                None => PrepState::Ready,
            };
            true
        });
    }

    /// A line of a lease hook's output, for whoever waits on or holds the board.
    pub fn hook_output(&self, line: &str) {
        {
            let mut b = self.backlog();
            b.push_back(line.to_string());
            while b.len() > 40 {
                b.pop_front();
            }
        }
        let _ = self.hook_lines.send(line.to_string());
    }

    fn backlog(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<String>> {
        self.hook_backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the board is prepared for the lease this Hello attaches under, telling the
    /// client so; `Err` ends the connection (with the code and reason, or `None`: it is gone).
    async fn wait_prepared(
        &self,
        link: &mut Link,
        hello: &jmp_protocol::Hello,
        lease: Option<&str>,
    ) -> Result<(), Option<(ErrorCode, String)>> {
        let Some(lease) = lease else { return Ok(()) };
        let mut prep = self.prep.subscribe();
        let mut lines = self.hook_lines.subscribe();
        let started = Instant::now();
        let mut told = false;
        loop {
            let p = prep.borrow_and_update().clone();
            if p.lease.as_deref() != Some(lease) {
                return Ok(());
            }
            let what = match p.state {
                PrepState::Ready => return Ok(()),
                PrepState::Failed(why) => return Err(Some((ErrorCode::LeaseEnded, why))),
                PrepState::Running { what } => what,
            };
            if hello.features & features::WAITS == 0 {
                return Err(Some((
                    ErrorCode::Busy,
                    format!(
                        "{}: preparing the board for lease {lease} ({what}); try again when it is done",
                        self.name
                    ),
                )));
            }
            if !told {
                told = true;
                link.handle.notice(format!(
                    "{}: preparing board for lease {lease}: {what}",
                    self.name
                ));
                // What the hook said before this client came (lines arriving meanwhile may be
                // told twice, never lost: the subscription is older than this copy).
                let earlier: Vec<String> = self.backlog().iter().cloned().collect();
                for l in earlier {
                    link.handle.notice(l);
                }
            }
            tokio::select! {
                _ = prep.changed() => {}
                l = lines.recv() => match l {
                    Ok(line) => link.handle.notice(line),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => {}
                },
                _ = tokio::time::sleep(PREPARING_NOTICE) => link.handle.notice(format!(
                    "{}: still preparing board ({}s)",
                    self.name,
                    started.elapsed().as_secs()
                )),
                ev = link.events.recv() => match ev {
                    Some(LinkEvent::Ended { .. }) | None => return Err(None),
                    Some(_) => {}
                },
            }
        }
    }

    /// Who holds the board now, if anyone.
    pub fn holder(&self) -> Option<String> {
        self.seat().holder().map(str::to_string)
    }

    /// Ends the session of `lease`, if it is attached, telling the client why.
    pub fn end_lease(&self, lease: &str, reason: &str) {
        let a = self.with_seat(|s| s.end_lease(lease, reason));
        self.act(a);
    }

    /// The controller says `current` is this exporter's lease now.
    pub fn keep_only_lease(&self, current: Option<&str>) {
        let a = self.with_seat(|s| s.keep_only_lease(current));
        self.act(a);
    }

    /// The controller says `lease` (the current one) is shared with these clients, each with
    /// whether it has control: guests whose share is gone or changed are ended.
    pub fn set_shares(&self, lease: Option<&str>, shares: Vec<(String, bool)>) {
        self.with_seat(|s| s.set_shares(lease, shares));
        self.act(None);
    }

    /// The controller's end of each share of `lease`: guests are ended by then at the latest.
    pub fn cap_guests(&self, lease: &str, ends: &[(String, u64)]) {
        self.with_seat(|s| s.cap_guests(lease, ends));
    }

    /// The seat's guests as the holder is told them (since when in Unix seconds, from
    /// `epoch`, so a guest's time is the same in every list).
    fn guest_list(&self, guests: &[(String, bool, Instant)]) -> jmp_protocol::Guests {
        let (at, unix) = self.epoch;
        jmp_protocol::Guests {
            guests: guests
                .iter()
                .map(|(client, control, since)| jmp_protocol::GuestInfo {
                    client: client.clone(),
                    control: *control,
                    since: unix + since.saturating_duration_since(at).as_secs(),
                })
                .collect(),
        }
    }

    /// Sessions of colleagues under a shared lease attached now, as (client, control).
    pub fn guests(&self) -> Vec<(String, bool)> {
        self.seat().guests()
    }

    /// A lease's end moved (extended or shortened); `until` in Unix seconds; `extends`: the
    /// controller extends it while in use (no end-of-lease warning for its holder).
    pub fn set_lease_end(&self, lease: &str, until: u64, extends: bool) {
        self.seat().set_lease_end(lease, until, extends);
    }

    /// Accepts connections until `shutdown` completes, then tells the holder why and closes.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut watchdog = tokio::time::interval(Duration::from_millis(250));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = watchdog.tick() => {
                    let a = self.with_seat(|s| s.tick(jmp_transport::unix_now()));
                    self.act(a);
                }
                incoming = endpoint.accept() => match incoming {
                    Some(i) => {
                        // Refused or told to retry here, before any handshake work, when too
                        // many connections are still unauthenticated.
                        let Some((i, ticket)) = jmp_transport::gate::admit(&self.gate, i) else {
                            continue;
                        };
                        let me = self.clone();
                        let peer = i.remote_address();
                        let span = tracing::info_span!("conn", %peer);
                        tokio::spawn(async move { me.connection(i, ticket).await }.instrument(span));
                    }
                    None => break,
                },
            }
        }
        let holder = self.with_seat(|s| s.vacate());
        if let Some(h) = holder {
            h.bye(
                ErrorCode::Shutdown,
                format!("exporter {} is shutting down", self.name),
            );
        }
        // Give the Bye a moment to leave, then close whatever is left.
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        endpoint.close(
            quinn::VarInt::from_u64(ErrorCode::Shutdown.to_wire()).unwrap_or(quinn::VarInt::MAX),
            b"exporter shutting down",
        );
    }

    async fn connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        ticket: jmp_transport::gate::Ticket,
    ) {
        let peer = incoming.remote_address();
        // Until admitted, a newer connection may displace this one (see jmp_transport::gate).
        let admitted = tokio::select! {
            a = self.authenticate(incoming) => a,
            _ = ticket.displaced() => {
                debug!("displaced by newer connections before it authenticated: {peer}");
                None
            }
        };
        let Some((mut link, hello, admission)) = admitted else {
            return;
        };
        let client = name::escape(&hello.client).into_owned();
        let one_shot = hello.features & features::ONE_SHOT != 0;
        // One-shot requests (a `jmp power cycle`) wait too: nothing touches the board while
        // it is being prepared.
        if let Err(end) = self
            .wait_prepared(&mut link, &hello, admission.lease.as_deref())
            .await
        {
            if let Some((code, reason)) = end {
                warn!(client = %client, "refused {peer}: {reason}");
                link.handle.bye(code, reason);
                drain(&mut link).await;
            }
            return;
        }
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let verdict = self.with_seat(|s| {
            s.admit(
                Claim {
                    conn: conn_id,
                    handle: link.handle.clone(),
                    client: &hello.client,
                    session: hello.session,
                    admission: &admission,
                    one_shot,
                    wants_guests: hello.features & features::GUESTS != 0,
                },
                Instant::now(),
            )
        });
        match verdict {
            Verdict::Refuse { code, reason } => {
                warn!(client = %client, "refused {peer}: {reason}");
                link.handle.bye(code, reason);
                drain(&mut link).await;
                return;
            }
            Verdict::Admit { evict } if admission.share.is_some() => {
                // A colleague under a shared lease is a guest of the holder's tenure: it
                // neither begins one nor makes the console forget.
                self.act(evict);
            }
            Verdict::Admit { evict } => {
                self.act(evict);
                // A one-shot session beside the holder is the same tenure; one on a free board
                // (a `jmp power on` before attaching) begins the tenure its attachment goes on.
                self.begin_tenure(Tenure {
                    lease: admission.lease.clone(),
                    client: admission
                        .client
                        .clone()
                        .unwrap_or_else(|| hello.client.clone()),
                });
            }
        }
        // Admitted: this connection no longer counts against the unauthenticated limits.
        ticket.release();
        link.handle.welcome(Welcome {
            exporter: self.name.clone(),
            features: self.features,
            instance: self.instance,
            devices: self.devices.infos(),
        });
        {
            // A holder hears who is already attached beside it (changes come from with_seat;
            // one sent before this Welcome was dropped). Under the seat's lock, so this list
            // cannot overtake a newer one.
            let seat = self.seat();
            if let (Some(h), guests) = seat.guest_watch() {
                if seat.holder_conn() == Some(conn_id) && !guests.is_empty() {
                    h.guests(self.guest_list(&guests));
                }
            }
        }
        let identity = admission.client.as_deref().unwrap_or("-");
        info!(client = %client, identity, lease = admission.lease.as_deref().unwrap_or("-"), "attached from {peer}");
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
        let mut watchers = self.watch_status(&link.handle);
        {
            // Lease hooks' output (a beforeLease hook that only warns) reaches the holder too.
            let mut lines = self.hook_lines.subscribe();
            let h = link.handle.clone();
            watchers.push(tokio::spawn(async move {
                loop {
                    match lines.recv().await {
                        Ok(l) => h.notice(l),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        // The session's channels and requests, within its budget; dropped below, when the
        // session ends, which ends them all and stops their blocking work.
        // A colleague without control only watches: its channels are opened read-only by
        // the kinds that can (a console), refused by the rest, and its requests refused.
        let scope = match admission.share {
            Some(s) if !s.control => self.devices.session_watching(format!(
                "lease {} is shared with {identity} read-only (the holder can give control: jmp share lease {} --with {identity} --control)",
                admission.lease.as_deref().unwrap_or_default(),
                admission.lease.as_deref().unwrap_or_default(),
            )),
            _ => self.devices.session(),
        };
        while let Some(ev) = link.events.recv().await {
            match ev {
                LinkEvent::Incoming(inc) if one_shot => inc.reject(
                    ErrorCode::Unsupported,
                    "a one-shot session makes device requests only; attach to open channels",
                ),
                // Everything a holder does to the board is in the log with who did it: each
                // channel (a console typed on, a bus written to, a medium flashed) and each
                // device request (a power switch), with the Hello's name (`jmp attach --name`,
                // which names an agent's `jmp mcp` session) and the identity the token proves.
                LinkEvent::Incoming(inc) => {
                    info!(client = %client, identity, device = %name::escape(&inc.open.device), channel = inc.open.channel, "channel opened");
                    scope.serve_incoming(inc)
                }
                LinkEvent::Request(r) => {
                    let what = match self.devices.get(&r.device) {
                        Some(d) => jmp_devices::registry::request_text(&d.kind(), &r.body),
                        None => "a request for no such device".into(),
                    };
                    info!(client = %client, identity, device = %name::escape(&r.device), id = r.id, "request: {what}");
                    scope.serve_request(r)
                }
                LinkEvent::Closed { channel, .. } => scope.closed(channel),
                LinkEvent::Ended {
                    code,
                    reason,
                    by_peer,
                } => {
                    info!(client = %client, %code, by_peer, "detached: {}", name::escape(&reason));
                    break;
                }
                other => debug!(?other, "event"),
            }
        }
        drop(scope);
        for w in watchers {
            w.abort();
        }
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        self.with_seat(|s| s.detached(conn_id));
    }

    /// The handshake, the Hello and the token check: the part of a connection's life before the
    /// seat decides. `None` when it ended or was refused (the client has been told why).
    async fn authenticate(
        &self,
        incoming: quinn::Incoming,
    ) -> Option<(Link, jmp_protocol::Hello, crate::auth::Admission)> {
        let peer = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                // Garbage and port scans end here; nothing else is affected.
                debug!("handshake from {peer} failed: {e}");
                return None;
            }
        };
        let mut link = match Link::exporter(conn).await {
            Ok(l) => l,
            Err(e) => {
                info!("connection from {peer} ended before Hello: {e}");
                return None;
            }
        };
        let hello = match link.events.recv().await {
            Some(LinkEvent::Hello(h)) => h,
            Some(LinkEvent::Ended { reason, .. }) => {
                info!(
                    "connection from {peer} ended before Hello: {}",
                    name::escape(&reason)
                );
                return None;
            }
            _ => return None,
        };
        let client = name::escape(&hello.client).into_owned();
        let admission = match self.auth.check(&hello) {
            Ok(a) => Ok(a),
            Err(AuthError::NotYet(why)) => {
                // A lease granted a moment ago may not have reached this exporter from the
                // controller yet (the client can be faster than the push): wait for the next
                // push, then decide.
                match self.auth.changes() {
                    Some(mut changes) => {
                        let _ = tokio::time::timeout(CONFIRM_WAIT, changes.changed()).await;
                        self.auth.check(&hello).map_err(|e| match e {
                            AuthError::NotYet(w) | AuthError::Refused(w) => w,
                        })
                    }
                    None => Err(why),
                }
            }
            Err(AuthError::Refused(why)) => Err(why),
        };
        match admission {
            Ok(a) => Some((link, hello, a)),
            Err(why) => {
                warn!(client = %client, "refused {peer}: {why}");
                link.handle
                    .bye(ErrorCode::Unauthorized, format!("{}: {why}", self.name));
                drain(&mut link).await;
                None
            }
        }
    }

    /// Pushes every change of a device's status to the attached client (one small task per
    /// device, ended with the session).
    fn watch_status(&self, link: &LinkHandle) -> Vec<tokio::task::JoinHandle<()>> {
        self.devices
            .iter()
            .map(|d| {
                let mut rx = d.status();
                rx.borrow_and_update();
                let device = d.name().to_string();
                let link = link.clone();
                tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        let st = rx.borrow_and_update().clone();
                        link.status(Status {
                            device: device.clone(),
                            state: st.state,
                            params: st.params,
                        });
                    }
                })
            })
            .collect()
    }
}

async fn drain(link: &mut Link) {
    while let Some(ev) = link.events.recv().await {
        if matches!(ev, LinkEvent::Ended { .. }) {
            break;
        }
    }
}
