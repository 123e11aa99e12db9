//! Handing channel requests and device requests to the device they name: shared by the
//! exporter's QUIC sessions and the in-memory sessions of tests, so both dispatch the same way.
//!
//! A session's channels and requests are served through its [`SessionScope`]: they run inside
//! the session's budget ([`crate::budget`]), at most [`crate::budget::Limits::channels`]
//! channels at once (more opens wait, as a listen backlog does), and all of them end with the
//! scope, which the exporter drops when the session ends.

use crate::budget::{self, SessionBudget, Usage};
use crate::{check_mode, info, Driver};
use jmp_protocol::{DeviceInfo, ErrorCode, Refusal};
use jmp_transport::{Incoming, IncomingRequest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, info_span, Instrument};

/// Bytes a device's channels moved, each way (stream bytes, datagram payloads; for the
/// exporter's metrics).
#[derive(Debug, Default)]
pub struct DeviceBytes {
    /// From the client to the board.
    pub to_board: Arc<std::sync::atomic::AtomicU64>,
    /// From the board to the client.
    pub from_board: Arc<std::sync::atomic::AtomicU64>,
}

/// An exporter's devices, in config order.
#[derive(Clone, Default)]
pub struct DeviceSet {
    exporter: String,
    devices: Vec<Arc<dyn Driver>>,
    bytes: Arc<Vec<DeviceBytes>>,
    /// What all sessions' budgets hold now.
    usage: Arc<Usage>,
}

impl DeviceSet {
    pub fn new(exporter: &str, devices: Vec<Arc<dyn Driver>>) -> Self {
        let bytes = Arc::new(devices.iter().map(|_| DeviceBytes::default()).collect());
        DeviceSet {
            exporter: exporter.to_string(),
            devices,
            bytes,
            usage: Arc::default(),
        }
    }

    /// What the budgets of all sessions hold now, and the progress of their blocking work.
    pub fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    /// A scope for one new session, with the standard limits.
    pub fn session(&self) -> SessionScope {
        self.session_with(budget::LIMITS)
    }

    /// A scope for a session that may only watch (a colleague under a lease shared
    /// read-only): its channels open through [`Driver::watch`], its requests are refused;
    /// `why` is said in each refusal.
    pub fn session_watching(&self, why: String) -> SessionScope {
        let mut s = self.session_with(budget::LIMITS);
        s.watching = Some(why.into());
        s
    }

    /// A scope for one new session with other limits (tests of the budgets themselves).
    pub fn session_with(&self, limits: budget::Limits) -> SessionScope {
        SessionScope {
            devices: self.clone(),
            budget: SessionBudget::new(limits, self.usage.clone()),
            tasks: Mutex::new(JoinSet::new()),
            waiting: Arc::default(),
            watching: None,
        }
    }

    /// A new board holder begins (another client or lease): every device forgets what the
    /// previous holder may not see. See [`Driver::new_holder`].
    pub fn new_holder(&self) {
        for d in &self.devices {
            d.new_holder();
        }
    }

    /// The byte counters of each device, in config order (as [`DeviceSet::iter`]).
    pub fn bytes(&self) -> impl Iterator<Item = (&str, &DeviceBytes)> {
        self.devices.iter().map(|d| d.name()).zip(self.bytes.iter())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Driver>> {
        self.devices.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Driver>> {
        self.devices.iter().find(|d| d.name() == name)
    }

    /// What a Welcome lists, as of now.
    pub fn infos(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| info(d.as_ref())).collect()
    }

    fn no_such(&self, device: &str) -> Refusal {
        let have: Vec<&str> = self.devices.iter().map(|d| d.name()).collect();
        Refusal::new(
            ErrorCode::NoSuchDevice,
            format!(
                "{} has no device {:?} (it has: {})",
                self.exporter,
                jmp_protocol::name::escape(device),
                have.join(", ")
            ),
        )
    }

    /// Decides on a channel request in its own task and serves the channel if accepted, in
    /// a session of its own (tests that serve channels without a session; the exporter uses
    /// [`SessionScope::serve_incoming`]).
    pub fn serve_incoming(&self, inc: Incoming) {
        let budget = SessionBudget::new(budget::LIMITS, self.usage.clone());
        if let Some(f) = self.incoming(inc, budget, Arc::default(), None) {
            tokio::spawn(f);
        }
    }

    /// Checks a channel request and returns the future that decides on it and serves it:
    /// it first waits for a place among `budget`'s channels (`waiting` lists it meanwhile).
    fn incoming(
        &self,
        inc: Incoming,
        budget: Arc<SessionBudget>,
        waiting: Waiting,
        watching: Option<Arc<str>>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let device = inc.open.device.clone();
        let Some(at) = self.devices.iter().position(|d| d.name() == device) else {
            let r = self.no_such(&device);
            inc.reject(r.code, r.reason);
            return None;
        };
        let driver = self.devices[at].clone();
        let counters = self
            .bytes
            .get(at)
            .map(|b| (b.from_board.clone(), b.to_board.clone()));
        if let Err(r) = check_mode(driver.as_ref(), inc.mode()) {
            inc.reject(r.code, r.reason);
            return None;
        }
        let channel = inc.open.channel;
        let span = info_span!("channel", id = channel, device = %driver.name());
        Some(
            budget::scope(budget.clone(), async move {
                let slot = budget.channel_slot().await;
                lock(&waiting).remove(&channel);
                let opened = match &watching {
                    Some(why) => driver.watch(&inc.open, why).await,
                    None => driver.open(&inc.open).await,
                };
                match opened {
                    Ok(ch) => {
                        if let Some(mut io) = inc.accept(ch.params()) {
                            match (&mut io, counters) {
                                (jmp_transport::ChannelIo::Stream(p), Some((sent, got))) => {
                                    p.count(sent, got)
                                }
                                (jmp_transport::ChannelIo::Datagram(d), Some((sent, got))) => {
                                    d.count(sent, got)
                                }
                                _ => {}
                            }
                            ch.serve(io).await;
                        }
                    }
                    Err(r) => {
                        info!("refused: {}", r.reason);
                        inc.reject(r.code, r.reason);
                    }
                }
                drop(slot);
            })
            .instrument(span),
        )
    }

    /// Performs a device request in its own task, in a session of its own (tests; the
    /// exporter uses [`SessionScope::serve_request`]).
    pub fn serve_request(&self, req: IncomingRequest) {
        let budget = SessionBudget::new(budget::LIMITS, self.usage.clone());
        if let Some(f) = self.request(req, budget, None) {
            tokio::spawn(f);
        }
    }

    /// The future performing a device request (a power cycle takes seconds; others go on).
    fn request(
        &self,
        req: IncomingRequest,
        budget: Arc<SessionBudget>,
        watching: Option<Arc<str>>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let Some(driver) = self.get(&req.device).cloned() else {
            let r = self.no_such(&req.device);
            req.answer(Err(r));
            return None;
        };
        if let Some(why) = watching {
            // Every request acts on the board (power, a break, line settings, a medium):
            // none is a watcher's.
            req.answer(Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!("{}: refused: {why}", driver.name()),
            )));
            return None;
        }
        let span = info_span!("request", id = req.id, device = %driver.name());
        Some(
            budget::scope(budget, async move {
                let body = req.body.clone();
                let r = driver.request(body).await;
                if let Err(e) = &r {
                    info!("failed: {}", e.reason);
                }
                req.answer(r);
            })
            .instrument(span),
        )
    }
}

/// Channel opens of a session still waiting for a place, by channel id.
type Waiting = Arc<Mutex<HashMap<u64, AbortHandle>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session's channels and requests. Everything served through it runs inside the
/// session's budget and as a task of the scope: dropping the scope (the session ended) aborts
/// them all, and the blocking work they started stops at its next chunk (see
/// [`crate::budget`]). Channels beyond the session's channel budget wait for a place.
pub struct SessionScope {
    devices: DeviceSet,
    budget: Arc<SessionBudget>,
    tasks: Mutex<JoinSet<()>>,
    waiting: Waiting,
    /// Only watching: why (see [`DeviceSet::session_watching`]).
    watching: Option<Arc<str>>,
}

impl SessionScope {
    pub fn budget(&self) -> &Arc<SessionBudget> {
        &self.budget
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) -> AbortHandle {
        let mut tasks = lock(&self.tasks);
        // Finished tasks' results are kept until joined: collect them as new ones come.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(f)
    }

    /// Decides on a channel request and serves the channel if accepted, once the session has
    /// a place for it.
    pub fn serve_incoming(&self, inc: Incoming) {
        let channel = inc.open.channel;
        let waiting = self.waiting.clone();
        if let Some(f) = self.devices.incoming(
            inc,
            self.budget.clone(),
            waiting.clone(),
            self.watching.clone(),
        ) {
            // Listed before it runs: it removes itself once it has a place.
            let mut w = lock(&waiting);
            w.insert(channel, self.spawn(f));
        }
    }

    /// Performs a device request.
    pub fn serve_request(&self, req: IncomingRequest) {
        if let Some(f) = self
            .devices
            .request(req, self.budget.clone(), self.watching.clone())
        {
            self.spawn(f);
        }
    }

    /// Waits until every channel and request of the session has ended by itself (an
    /// in-memory client dropped its handle but still holds pipes).
    pub async fn finish(self) {
        let mut tasks = self.tasks.into_inner().unwrap_or_else(|e| e.into_inner());
        while tasks.join_next().await.is_some() {}
    }

    /// The client closed `channel`: if its open is still waiting for a place, it is given up
    /// (the client stopped waiting for it).
    pub fn closed(&self, channel: u64) {
        if let Some(t) = lock(&self.waiting).remove(&channel) {
            debug!(channel, "the client gave up a channel waiting for a place");
            t.abort();
        }
    }
}
