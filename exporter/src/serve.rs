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
        })
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

    fn act(&self, a: Option<Action<LinkHandle>>) {
        match a {
            None => {}
            Some(Action::Bye {
                handle,
                code,
                reason,
            }) => {
                info!(
                    "ending the session from {}: {reason}",
                    handle.remote_address()
                );
                handle.bye(code, reason);
            }
            Some(Action::Notice { handle, text }) => handle.notice(text),
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
        let a = self.seat().end_lease(lease, reason);
        self.act(a);
    }

    /// The controller says `current` is this exporter's lease now.
    pub fn keep_only_lease(&self, current: Option<&str>) {
        let a = self.seat().keep_only_lease(current);
        self.act(a);
    }

    /// A lease's end moved (extended or shortened); `until` in Unix seconds.
    pub fn set_lease_end(&self, lease: &str, until: u64) {
        self.seat().set_lease_end(lease, until);
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
                    let a = self.seat().tick(jmp_transport::unix_now());
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
        let holder = self.seat().vacate();
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
        let verdict = self.seat().admit(
            Claim {
                conn: conn_id,
                handle: link.handle.clone(),
                client: &hello.client,
                session: hello.session,
                admission: &admission,
                one_shot,
            },
            Instant::now(),
        );
        match verdict {
            Verdict::Refuse { code, reason } => {
                warn!(client = %client, "refused {peer}: {reason}");
                link.handle.bye(code, reason);
                drain(&mut link).await;
                return;
            }
            Verdict::Admit { evict } => self.act(evict),
        }
        // Admitted: this connection no longer counts against the unauthenticated limits.
        ticket.release();
        link.handle.welcome(Welcome {
            exporter: self.name.clone(),
            features: self.features,
            instance: self.instance,
            devices: self.devices.infos(),
        });
        info!(client = %client, lease = admission.lease.as_deref().unwrap_or("-"), "attached from {peer}");
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
        while let Some(ev) = link.events.recv().await {
            match ev {
                LinkEvent::Incoming(inc) if one_shot => inc.reject(
                    ErrorCode::Unsupported,
                    "a one-shot session makes device requests only; attach to open channels",
                ),
                LinkEvent::Incoming(inc) => self.devices.serve_incoming(inc),
                LinkEvent::Request(r) => self.devices.serve_request(r),
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
        for w in watchers {
            w.abort();
        }
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        self.seat().detached(conn_id);
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
