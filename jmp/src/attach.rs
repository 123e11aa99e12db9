//! `jmp attach`: connect to an exporter, create the local devices, keep them working across
//! network blips, remove them on the way out. Nothing here names a device kind: the registry
//! makes each device's bridge, and each bridge runs in its own task.
//!
//! The local devices are created once, after the first Welcome, and live until the attachment
//! ends; connections come and go underneath them. The current connection is published on a
//! watch channel ([`LinkSlot`]): every bridge task follows it (running on a link, idling
//! between links), and so does the control socket (device requests use the current link). The
//! first connection's failure is final (a typo'd address or a wrong token should fail fast);
//! later losses are retried with backoff, except refusals that a retry cannot fix (wrong token,
//! board taken by someone else).

use jmp_devices::registry::{self, ClientOptions};
use jmp_devices::{Bridge, BridgeCtx, BridgeExit, Endpoint};
use jmp_protocol::{features, DeviceInfo, DeviceState, ErrorCode, Kind, Welcome};
pub use jmp_transport::connector::{
    is_final, Connector, ConnectorError as AttachError, Pin, RelayOpen, RelayRoute, Via,
};
use jmp_transport::token::peek;
use jmp_transport::{Channels, ConnectError, LinkEvent};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the ready line waits for devices that come up only once their bridge runs (USB
/// imports, which enumerate here through the link): enumeration is a few dozen control
/// transfers, each a round trip to the lab (about a second over a slow link, a few under
/// software emulation); a device that never finishes must not hold back the line scripts wait
/// for. What comes later shows in `jmp status`.
const SETTLE_MAX: Duration = Duration::from_secs(10);

/// Fetches a fresh token before a reconnect (controller mode: a lease token carries the lease's
/// end, which an extension moves). `None`: keep the one we have.
pub type TokenRefresh =
    Box<dyn Fn() -> futures::future::BoxFuture<'static, Option<String>> + Send + Sync>;

pub struct Options {
    pub addr: SocketAddr,
    pub token: String,
    pub token_refresh: Option<TokenRefresh>,
    pub pin: Pin,
    pub dev_dir: PathBuf,
    /// Where mounts go (storage).
    pub mount_dir: PathBuf,
    /// The kinds' own options (`--forward`, ...).
    pub devices: ClientOptions,
    pub client: String,
    pub owner: Option<(u32, u32)>,
    /// The lease attached under (controller mode), for status output.
    pub lease: Option<String>,
    /// The controller's relay, when the exporter takes relayed sessions.
    pub relay: Option<RelayRoute>,
    /// The process the attachment belongs to (`--owner-pid`): it detaches when that ends.
    pub owner_pid: Option<u32>,
}

/// One device of an attachment, as `jmp attach`, `jmp status` and `-o json` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    pub name: String,
    pub kind: Kind,
    /// The first endpoint as text ("" for none): what scripts written for one endpoint read.
    pub local: String,
    pub endpoints: Vec<Endpoint>,
    #[serde(flatten)]
    pub state: DeviceState,
    /// The kind's short state for people ("115200 8N1", "power on").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// What the local side adds (a CAN bridge's lost or refused frames); see
    /// `Bridge::local_status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

impl DeviceRow {
    fn new(info: &DeviceInfo, endpoints: Vec<Endpoint>) -> Self {
        DeviceRow {
            name: info.name.clone(),
            kind: info.kind.clone(),
            local: endpoints.first().map(|e| e.to_string()).unwrap_or_default(),
            endpoints,
            state: info.state.clone(),
            summary: registry::summary(&info.kind, &info.params),
            notes: None,
        }
    }

    fn update(&mut self, state: &DeviceState, params: &[u8]) {
        self.state = state.clone();
        self.summary = registry::summary(&self.kind, params);
    }
}

/// What an attachment prints once its devices exist (one JSON line with `-o json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub exporter: String,
    pub fingerprint: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    pub devices: Vec<DeviceRow>,
}

fn endpoints_text(d: &DeviceRow) -> String {
    if d.endpoints.is_empty() {
        "-".to_string()
    } else {
        d.endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("  ")
    }
}

fn state_text(d: &DeviceRow) -> String {
    let s = match &d.state {
        DeviceState::Available => d.summary.clone().unwrap_or_default(),
        DeviceState::Unavailable(why) => format!("unavailable: {why}"),
    };
    match d.notes.as_deref() {
        Some(n) if !n.is_empty() && !s.is_empty() => format!("{s}; {n}"),
        Some(n) if !n.is_empty() => n.to_string(),
        _ => s,
    }
}

impl Ready {
    /// NAME KIND LOCAL STATE, one device a line.
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .devices
            .iter()
            .map(|d| {
                let mut r = vec![d.name.clone(), d.kind.to_string(), endpoints_text(d)];
                let st = state_text(d);
                if !st.is_empty() {
                    r.push(st);
                }
                r
            })
            .collect();
        crate::table::render(None, &rows)
    }
}

/// The attachment as it is now (for `jmp status` through the control socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    #[serde(flatten)]
    pub ready: Ready,
    /// `up`, `stalled` (the exporter has not answered for `liveness::STALL_AFTER`; given up
    /// and reconnected after the idle timeout), or `reconnecting` (the local devices stay
    /// meanwhile).
    pub link: String,
    /// Unix seconds of the last change of `link`.
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// The board of `jmp local start` (filled in by `jmp status`, which knows which one that
    /// is; absent in the control socket's own answer).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Colleagues attached beside this session under a shared lease (`jmp share lease`), as
    /// the exporter last said; empty (and absent) when nobody is, and while reconnecting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<GuestRow>,
}

/// A colleague's session beside ours, as `jmp status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRow {
    /// The client the share names (from the exporter: escape it before printing).
    pub client: String,
    /// It may type and power (`--control`); otherwise it only watches.
    pub control: bool,
    /// Unix seconds it attached at (the exporter's clock).
    pub since: u64,
}

impl GuestRow {
    fn from_wire(g: &jmp_protocol::GuestInfo) -> Self {
        GuestRow {
            client: g.client.clone(),
            control: g.control,
            since: g.since,
        }
    }

    /// One line for `jmp status`: who, with what access, since when.
    pub fn text(&self) -> String {
        format!(
            "{} ({}) since {}",
            jmp_protocol::name::escape(&self.client),
            if self.control { "control" } else { "read-only" },
            crate::controller::fmt_time(self.since)
        )
    }
}

/// Why the attachment ended.
#[derive(Debug)]
pub enum Outcome {
    /// We were asked to stop (Ctrl-C, SIGTERM, `jmp detach`).
    Detached,
    /// The exporter ended it for good.
    Ended { code: ErrorCode, reason: String },
}

/// Folders removed on drop if they are empty (see `_folders` in `attach`).
struct EmptyFolders(Vec<PathBuf>);

impl Drop for EmptyFolders {
    fn drop(&mut self) {
        for f in &self.0 {
            // Only an empty directory goes; anything else (a file, a live mount, another
            // attachment's links) makes this fail, which is what must happen.
            let _ = std::fs::remove_dir(f);
        }
    }
}

/// The current connection, as bridges and the control socket follow it. `gen` grows with
/// every change, so a follower can tell a new link from the one it just lost.
#[derive(Clone, Default)]
pub struct LinkSlot {
    pub gen: u64,
    pub link: Option<Arc<dyn Channels>>,
    pub welcome: Option<Arc<Welcome>>,
}

/// What the attachment shares with its control socket.
pub struct Shared {
    pub live: Mutex<Live>,
    pub links: watch::Receiver<LinkSlot>,
    /// Per device that caches its contents locally (a storage mount): how far that cache has
    /// caught up with the exporter (the control socket's `settle` waits on it).
    pub caches: Vec<(String, watch::Receiver<jmp_devices::CacheState>)>,
}

impl Shared {
    pub fn live(&self) -> Live {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.live.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

struct Attachment {
    opts: Options,
    connector: Connector,
}

impl Attachment {
    /// After the exporter ended the session for its lease: asks the controller (when attached
    /// by lease) for a fresh token. One that ends later than ours means the lease was extended
    /// and the exporter had not heard (it was cut off from the controller): keep it and
    /// reconnect. A lease that really ended yields no token, or none that ends later.
    async fn extended_token(&self) -> bool {
        let Some(fresh) = self.fresh_token().await else {
            return false;
        };
        let exp = |t: &str| peek(t).ok().and_then(|c| c.exp).unwrap_or(0);
        let Ok(mut cur) = self.connector.token.lock() else {
            return false;
        };
        if exp(&fresh) > exp(&cur).max(jmp_transport::unix_now()) {
            *cur = fresh;
            return true;
        }
        false
    }

    /// A fresh token from the controller, when attached by lease and it answers within 3 s.
    async fn fresh_token(&self) -> Option<String> {
        let refresh = self.opts.token_refresh.as_ref()?;
        tokio::time::timeout(Duration::from_secs(3), refresh())
            .await
            .ok()
            .flatten()
    }
}

/// One bridge for the life of the attachment, in its own task: it runs on each link the slot
/// publishes and idles between them. A device the exporter refused for good stays idle (its
/// local endpoint stays, with a warning).
async fn bridge_task(mut bridge: Box<dyn Bridge>, mut links: watch::Receiver<LinkSlot>) {
    let mut done_gen = 0u64;
    let mut refused = false;
    loop {
        let slot = links.borrow_and_update().clone();
        let runnable = !refused && slot.gen != done_gen;
        match (runnable, slot.link, slot.welcome) {
            (true, Some(link), Some(welcome)) => {
                if let Some(info) = welcome.devices.iter().find(|d| d.name == bridge.device()) {
                    bridge.on_welcome(info, welcome.instance);
                }
                let exit = tokio::select! {
                    exit = bridge.run(link) => Some(exit),
                    c = links.changed() => {
                        if c.is_err() {
                            // The attachment is ending; the task is about to be aborted.
                            std::future::pending::<()>().await;
                        }
                        None
                    }
                };
                match exit {
                    Some(BridgeExit::Refused(r)) => {
                        warn!(
                            "{}: {} ({}); this device stays unavailable",
                            bridge.device(),
                            r.reason,
                            r.code
                        );
                        refused = true;
                    }
                    Some(BridgeExit::LinkLost) => done_gen = slot.gen,
                    None => {}
                }
            }
            _ => {
                let changed = tokio::select! {
                    _ = bridge.idle() => links.changed().await,
                    c = links.changed() => c,
                };
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

fn set_endpoints(l: &mut Live, device: &str, eps: Vec<Endpoint>) {
    if let Some(d) = l.ready.devices.iter_mut().find(|d| d.name == device) {
        d.local = eps.first().map(|e| e.to_string()).unwrap_or_default();
        d.endpoints = eps;
    }
}

/// Runs an attachment until `shutdown` or a final refusal. `on_ready` is called once the local
/// devices exist (it prints the table, writes state files, starts the control socket with the
/// returned [`Shared`]).
pub async fn run(
    opts: Options,
    on_ready: impl FnOnce(&Ready, Arc<Shared>) -> Result<(), String>,
    shutdown: impl Future<Output = ()>,
) -> Result<Outcome, AttachError> {
    let connector = Connector::new(
        opts.addr,
        opts.pin.clone(),
        opts.client.clone(),
        opts.token.clone(),
        features::CLIENT,
    )?;
    let mut opts = opts;
    let mut connector = connector;
    connector.relay = opts.relay.take();
    let session = Attachment { opts, connector };
    let (link, welcome, fp) = session.connector.connect().await?;
    session
        .opts
        .devices
        .check(&welcome.exporter, &welcome.devices)
        .map_err(|e| AttachError::Other(e.to_string()))?;

    // Local devices, in the exporter's order.
    let ctx = BridgeCtx {
        exporter: welcome.exporter.clone(),
        dev_dir: session.opts.dev_dir.clone(),
        mount_dir: session.opts.mount_dir.clone(),
        owner: session.opts.owner,
        listen: None,
        local_users: jmp_devices::common::listen::LocalUsers::new(
            session.opts.owner,
            session.opts.devices.forward.allow_local_users,
        ),
    };
    // Declared before the bridges, so dropped after them: the exporter's folders they made
    // go with them when nothing else is left in them (another attachment of the same exporter
    // keeps its entries there, and remove_dir leaves a folder that is not empty).
    let _folders = EmptyFolders(vec![
        ctx.dev_dir.join(&welcome.exporter),
        ctx.mount_dir.join(&welcome.exporter),
    ]);
    let mut bridges: Vec<Box<dyn Bridge>> = Vec::new();
    let mut rows = Vec::new();
    for d in &welcome.devices {
        if let Some(why) = registry::client_needs(d, &session.opts.devices).unmet() {
            warn!("{}: listed, not bridged: {why}", d.name);
            rows.push(DeviceRow::new(d, Vec::new()));
            continue;
        }
        match registry::bridge(d, &ctx, &session.opts.devices).await {
            Ok(Some(b)) => {
                rows.push(DeviceRow::new(d, b.endpoints()));
                bridges.push(b);
            }
            Ok(None) => {
                warn!(
                    "{}: device kind {:?} is not supported by this jmp; listed, not bridged",
                    d.name,
                    jmp_protocol::name::escape(d.kind.as_str())
                );
                rows.push(DeviceRow::new(d, Vec::new()));
            }
            // A device the exporter could not open may have nothing to bridge (no size, no
            // parameters): it is listed with the exporter's reason and the rest of the board
            // is attached. A device that is there and cannot be bridged here (a port in use, a
            // name taken) is the user's to fix, so it still fails the attachment.
            Err(e) if matches!(d.state, DeviceState::Unavailable(_)) => {
                warn!("{}: unavailable, not bridged: {e}", d.name);
                rows.push(DeviceRow::new(d, Vec::new()));
            }
            Err(e) => return Err(AttachError::Other(format!("{}: {e}", d.name))),
        }
        if let DeviceState::Unavailable(why) = &d.state {
            warn!("{}: unavailable: {why}", d.name);
        }
    }
    let ready = Ready {
        exporter: welcome.exporter.clone(),
        fingerprint: fp.to_string(),
        pid: std::process::id(),
        lease: session.opts.lease.clone(),
        devices: rows,
    };
    // `<dev dir>/current`, when the kinds made anything under the device directory.
    let _current = if ctx.dev_dir.join(&welcome.exporter).is_dir() {
        jmp_devices::places::CurrentLink::place(&ctx.dev_dir, &welcome.exporter)
            .map_err(|e| warn!("cannot place {}/current: {e}", ctx.dev_dir.display()))
            .ok()
    } else {
        None
    };

    let mut gen = 1u64;
    let (slot_tx, slot_rx) = watch::channel(LinkSlot {
        gen,
        link: Some(Arc::new(link.handle.clone()) as Arc<dyn Channels>),
        welcome: Some(Arc::new(welcome.clone())),
    });
    let caches = bridges
        .iter()
        .filter_map(|b| b.cache().map(|rx| (b.device().to_string(), rx)))
        .collect();
    let shared = Arc::new(Shared {
        caches,
        live: Mutex::new(Live {
            ready: ready.clone(),
            link: "up".into(),
            since: jmp_transport::unix_now(),
            log: std::env::var_os("JMP_LOG_FILE").map(PathBuf::from),
            local: false,
            guests: Vec::new(),
        }),
        links: slot_rx.clone(),
    });
    // Bridges that report their own state: it follows into the rows `jmp status` shows.
    let notes: Vec<(String, watch::Receiver<String>)> = bridges
        .iter()
        .filter_map(|b| b.local_status().map(|rx| (b.device().to_string(), rx)))
        .collect();
    // Bridges whose local endpoints come and go (an imported USB device's nodes).
    let live: Vec<(String, watch::Receiver<Vec<Endpoint>>)> = bridges
        .iter()
        .filter_map(|b| b.live_endpoints().map(|rx| (b.device().to_string(), rx)))
        .collect();
    let settling: Vec<watch::Receiver<bool>> = bridges.iter().filter_map(|b| b.settled()).collect();
    let live_now = live.clone();
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = bridges
        .into_iter()
        .map(|b| tokio::spawn(bridge_task(b, slot_rx.clone())))
        .collect();
    for (device, mut rx) in live {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let eps = rx.borrow_and_update().clone();
                shared.update(|l| set_endpoints(l, &device, eps));
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }));
    }
    for (device, mut rx) in notes {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let text = rx.borrow_and_update().clone();
                shared.update(|l| {
                    if let Some(d) = l.ready.devices.iter_mut().find(|d| d.name == device) {
                        d.notes = (!text.is_empty()).then(|| text.clone());
                    }
                });
            }
        }));
    }
    // Aborts the bridge tasks and waits until each has dropped its bridge (so the local
    // devices are gone when `run` returns).
    let stop_bridges = |tasks: Vec<tokio::task::JoinHandle<()>>| async move {
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        info!("local devices removed");
    };
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    for mut rx in settling {
        if tokio::time::timeout_at(deadline, rx.wait_for(|s| *s))
            .await
            .is_err()
        {
            warn!(
                "devices still coming up after {SETTLE_MAX:?}: jmp status shows them once they are"
            );
            break;
        }
    }
    let mut ready = ready;
    shared.update(|l| {
        for (device, rx) in &live_now {
            set_endpoints(l, device, rx.borrow().clone());
        }
        ready = l.ready.clone();
    });
    if let Err(e) = on_ready(&ready, shared.clone()) {
        stop_bridges(tasks).await;
        return Err(AttachError::Other(e));
    }
    info!(exporter = %welcome.exporter, "attached");

    tokio::pin!(shutdown);
    let mut current = Some((link, welcome));
    loop {
        // ---- connected ----
        let Some((mut link, welcome)) = current.take() else {
            unreachable!("the loop always reconnects before coming back here");
        };
        // A silent exporter is shown within liveness::STALL_AFTER (the session is given up,
        // and reconnected, only after the idle timeout).
        let mut stalled = link.handle.stalled();
        let ended: (ErrorCode, String) = loop {
            tokio::select! {
                c = async { stalled.as_mut().expect("guarded").changed().await }, if stalled.is_some() => {
                    let Some(rx) = stalled.as_mut().filter(|_| c.is_ok()) else {
                        stalled = None;
                        continue;
                    };
                    let now_stalled = *rx.borrow_and_update();
                    if now_stalled {
                        warn!(
                            "no answer from {} for {:.1}s; typed console input is discarded until it answers (it is given up after {}s)",
                            welcome.exporter,
                            jmp_transport::liveness::STALL_AFTER.as_secs_f64(),
                            jmp_transport::endpoint::IDLE_TIMEOUT.as_secs()
                        );
                    } else {
                        info!("{} answers again", welcome.exporter);
                    }
                    shared.update(|l| {
                        l.link = if now_stalled { "stalled" } else { "up" }.into();
                        l.since = jmp_transport::unix_now();
                    });
                }
                _ = &mut shutdown => {
                    link.handle.bye(ErrorCode::Ok, "client detached");
                    session.connector.linger(&link).await;
                    stop_bridges(tasks).await;
                    return Ok(Outcome::Detached);
                }
                ev = link.events.recv() => match ev {
                    Some(LinkEvent::Ended { code, reason, .. }) => break (code, reason),
                    Some(LinkEvent::Notice(text)) => warn!("exporter: {}", jmp_protocol::name::escape(&text)),
                    Some(LinkEvent::Status(s)) => {
                        // Only changes of state are logged: a status push may carry only new
                        // counters (a CAN bus's frame counts, once a second).
                        let mut changed = true;
                        shared.update(|l| {
                            if let Some(d) = l.ready.devices.iter_mut().find(|d| d.name == s.device) {
                                changed = d.state != s.state;
                                d.update(&s.state, &s.params);
                            }
                        });
                        if changed {
                            match &s.state {
                                DeviceState::Available => info!("{}: available", s.device),
                                DeviceState::Unavailable(why) => warn!("{}: unavailable: {}", s.device, jmp_protocol::name::escape(why)),
                            }
                        }
                    }
                    Some(LinkEvent::Guests(g)) => {
                        let rows: Vec<GuestRow> = g.guests.iter().map(GuestRow::from_wire).collect();
                        let mut before = Vec::new();
                        shared.update(|l| before = std::mem::replace(&mut l.guests, rows.clone()));
                        for r in rows.iter().filter(|r| !before.contains(r)) {
                            info!("attached beside you: {}", r.text());
                        }
                        for r in before.iter().filter(|r| !rows.iter().any(|n| n.client == r.client && n.since == r.since)) {
                            info!("detached from beside you: {}", jmp_protocol::name::escape(&r.client));
                        }
                    }
                    Some(_) => {}
                    None => break (ErrorCode::Internal, "the link task ended".into()),
                },
            }
        };
        let (code, reason) = ended;
        if is_final(code) {
            if !(code == ErrorCode::LeaseEnded && session.extended_token().await) {
                stop_bridges(tasks).await;
                return Ok(Outcome::Ended { code, reason });
            }
            warn!("{reason} according to the exporter, but the controller has extended it; reconnecting");
        }
        warn!(
            "link to {} lost: {reason}; keeping the local devices and reconnecting",
            welcome.exporter
        );
        gen += 1;
        slot_tx.send_replace(LinkSlot {
            gen,
            link: None,
            welcome: None,
        });
        shared.update(|l| {
            l.link = "reconnecting".into();
            l.since = jmp_transport::unix_now();
            // The next session's exporter says who is beside it then.
            l.guests.clear();
        });

        // ---- disconnected: reconnect with backoff while bridges idle ----
        let lost_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let reconnected = loop {
            let wait = backoff;
            let attempt = async {
                tokio::time::sleep(wait).await;
                if let Some(t) = session.fresh_token().await {
                    if let Ok(mut cur) = session.connector.token.lock() {
                        *cur = t;
                    }
                }
                session.connector.connect().await
            };
            let res = tokio::select! {
                _ = &mut shutdown => {
                    stop_bridges(tasks).await;
                    return Ok(Outcome::Detached);
                }
                r = attempt => r,
            };
            match res {
                Ok((l, w, _)) => break (l, w),
                Err(AttachError::Refused { code, reason }) if is_final(code) => {
                    stop_bridges(tasks).await;
                    return Ok(Outcome::Ended { code, reason });
                }
                Err(
                    e @ (AttachError::Connect(ConnectError::FingerprintMismatch { .. })
                    | AttachError::Impostor(_)),
                ) => {
                    stop_bridges(tasks).await;
                    return Err(e);
                }
                Err(e) => {
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    info!(
                        "reconnect failed: {e}; next try in {:.1}s",
                        backoff.as_secs_f64()
                    );
                }
            }
        };
        info!(
            "reconnected to {} after {:.1}s",
            reconnected.1.exporter,
            lost_at.elapsed().as_secs_f64()
        );
        gen += 1;
        shared.update(|l| {
            l.link = "up".into();
            l.since = jmp_transport::unix_now();
            for d in &reconnected.1.devices {
                if let Some(row) = l.ready.devices.iter_mut().find(|r| r.name == d.name) {
                    row.update(&d.state, &d.params);
                }
            }
        });
        slot_tx.send_replace(LinkSlot {
            gen,
            link: Some(Arc::new(reconnected.0.handle.clone()) as Arc<dyn Channels>),
            welcome: Some(Arc::new(reconnected.1.clone())),
        });
        current = Some(reconnected);
    }
}
