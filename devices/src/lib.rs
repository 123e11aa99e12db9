//! jmp-devices: the device kinds, one folder each, and the seams they plug into.
//!
//! Each kind's folder holds its config spec (`spec.rs`: what an exporter config says, with its
//! own `validate()`), `driver.rs` (exporter side: serves the device's channels and requests),
//! `bridge.rs` (client side: creates the local endpoints, a pty, a listening port, and pumps
//! them over channels of the current link), its typed client operations (`ops.rs`) and, where
//! the kind has one, `sim.rs` (a simulated board backend for the quick start and tests).
//! [`kind`] is what a kind is (one trait implementation per folder); [`registry`] is the one
//! file that lists the kinds; [`common`] holds the machinery kinds share, naming none.
//!
//! The seams, and only these: [`Driver`] and [`Channel`] on the exporter, [`Bridge`] on the
//! client. What a client may make a driver hold is budgeted per channel and per session
//! ([`budget`]). Both sides talk through jmp-transport's [`Channels`] / [`Incoming`] abstractions,
//! which the QUIC link and an in-memory pair implement alike, so this crate names no QUIC type
//! and every kind is tested over memory first ([`testing`]).
//!
//! Does not own: the wire's generic layer or the connection (jmp-transport), the exporter's
//! serving and seat logic (jmp-exporter), the CLI, leases.

pub mod agent;
pub mod board;
pub mod budget;
pub mod common;
pub mod kind;
pub mod places;
pub mod registry;

pub use registry::*;
pub mod serve;
pub mod spec;
pub mod testing;

pub use jmp_protocol::Refusal;
pub use jmp_transport::BoxFuture;

use bytes::Bytes;
use jmp_protocol::{ChannelMode, DeviceInfo, DeviceState, ErrorCode, Kind, Open};
use jmp_transport::{ChannelIo, Channels};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// A device's state and typed parameters as the exporter knows them now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub state: DeviceState,
    /// The kind's `DeviceInfo.params`.
    pub params: Bytes,
}

impl DeviceStatus {
    pub fn available(params: Bytes) -> Self {
        DeviceStatus {
            state: DeviceState::Available,
            params,
        }
    }
}

/// Exporter side of a device kind. One per exported device, alive as long as the exporter.
pub trait Driver: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn kind(&self) -> Kind;
    /// Text for people ("/dev/ttyUSB0 115200 8N1"); never parsed.
    fn detail(&self) -> String;
    /// The device's state and params, updated as they change; the exporter pushes changes to
    /// the attached client.
    fn status(&self) -> watch::Receiver<DeviceStatus>;
    /// The channel modes the device serves (none: requests only).
    fn modes(&self) -> &'static [ChannelMode];

    /// Decides on a channel request. On success the returned [`Channel`] is served on the
    /// channel; the exporter accepts the channel only then, so a refusal (target port closed,
    /// serial port vanished) reaches the client as a `Reject` with the reason.
    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        let _ = req;
        Box::pin(async move {
            Err(Refusal::new(
                ErrorCode::Unsupported,
                format!("{}: a {} device has no channels", self.name(), self.kind()),
            ))
        })
    }

    /// Opens a channel for a session that may only watch (a colleague under a lease shared
    /// read-only): what the device says reaches it, nothing it sends reaches the board.
    /// `why` says so, for the refusal or the client's notices. A kind that cannot be watched
    /// without acting on the board refuses (the default).
    fn watch<'a>(
        &'a self,
        req: &'a Open,
        why: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        let _ = req;
        Box::pin(async move {
            Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "{}: {why}; a {} device is not served read-only",
                    self.name(),
                    self.kind()
                ),
            ))
        })
    }

    /// The board's power switch, when this device is one: jmpd switches it off after a lease
    /// (`powerOffAfterLease`) and counts its on-time, whatever the device's kind.
    fn power_switch(&self) -> Option<&dyn PowerSwitch> {
        None
    }

    /// A new holder begins: the board now serves another client, or another lease (see
    /// [`crate::serve::DeviceSet::new_holder`] for when exactly). A device that keeps what the
    /// board said for clients that attach later (a console's history) keeps nothing from
    /// before this for the new holder. Called outside the device's own tasks, at the moment
    /// the exporter decides.
    fn new_holder(&self) {}

    /// A device request (the kind's `Request` body); the kind's answer.
    fn request<'a>(&'a self, body: Bytes) -> BoxFuture<'a, Result<Bytes, Refusal>> {
        let _ = body;
        Box::pin(async move {
            Err(Refusal::new(
                ErrorCode::Unsupported,
                format!(
                    "{}: a {} device takes no requests",
                    self.name(),
                    self.kind()
                ),
            ))
        })
    }
}

/// A device that switches the board's power (see [`Driver::power_switch`]).
pub trait PowerSwitch: Send + Sync {
    /// Switches the board off; fails with the device's reason.
    fn switch_off(&self) -> BoxFuture<'_, Result<(), Refusal>>;
    /// Whether `status` (this device's) says the board is on.
    fn is_on(&self, status: &DeviceStatus) -> bool;
}

/// The `DeviceInfo` a Welcome lists for `d`, as of now.
pub fn info(d: &dyn Driver) -> DeviceInfo {
    let st = d.status().borrow().clone();
    DeviceInfo {
        name: d.name().to_string(),
        kind: d.kind(),
        state: st.state,
        params: st.params,
        detail: d.detail(),
    }
}

/// Refuses an open in a mode the driver does not serve (checked by the exporter before
/// `Driver::open`).
pub fn check_mode(d: &dyn Driver, mode: ChannelMode) -> Result<(), Refusal> {
    if d.modes().contains(&mode) {
        return Ok(());
    }
    let what = match mode {
        ChannelMode::Stream => "stream",
        ChannelMode::Datagram => "datagram",
    };
    Err(Refusal::new(
        ErrorCode::Unsupported,
        format!(
            "{}: a {} device serves no {what} channels",
            d.name(),
            d.kind()
        ),
    ))
}

/// One accepted channel of a device, ready to be served.
pub trait Channel: Send + 'static {
    /// The kind's answer to the open (`Opened.params`).
    fn params(&self) -> Bytes;

    /// Moves data between the channel and the device until either side ends.
    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()>;
}

/// How a bridge's run over one link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeExit {
    /// The link is gone; run again on the next link (the local endpoint stays).
    LinkLost,
    /// The exporter refused this device for good (no such device): stop using it.
    Refused(Refusal),
}

/// Where a device appeared on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "at", rename_all = "lowercase")]
pub enum Local {
    /// A device node or its stable link (a serial pty).
    Path(PathBuf),
    /// A listening socket (a TCP forward, a socketcand port).
    Address(std::net::SocketAddr),
    /// A network interface (vcan, TUN).
    Interface(String),
    /// A mount point (storage).
    Mount(PathBuf),
}

/// One local endpoint of a bridge, with what it is for when a bridge has several ("slcan",
/// "socketcand").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(flatten)]
    pub local: Local,
}

impl Endpoint {
    pub fn new(local: Local) -> Self {
        Endpoint { role: None, local }
    }

    pub fn with_role(role: &str, local: Local) -> Self {
        Endpoint {
            role: Some(role.to_string()),
            local,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = &self.role {
            write!(f, "{r}:")?;
        }
        match &self.local {
            Local::Path(p) | Local::Mount(p) => write!(f, "{}", p.display()),
            Local::Address(a) => write!(f, "{a}"),
            Local::Interface(i) => write!(f, "{i}"),
        }
    }
}

/// How far a bridge's local cache of the device's contents (a storage mount's page cache) has
/// caught up with the exporter: every change up to `generation` of exporter `instance` has
/// been dropped from it, so reads from now on see at least that state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheState {
    /// The exporter instance (from its Welcome; 0 when not known).
    pub instance: u64,
    /// `None` before the device's parameters were first heard.
    pub generation: Option<u64>,
}

impl CacheState {
    /// The cache has caught up with `generation` (of `instance`, when given: generations of
    /// another exporter instance say nothing about this one).
    pub fn covers(&self, instance: Option<u64>, generation: u64) -> bool {
        instance.is_none_or(|i| i == self.instance)
            && self.generation.is_some_and(|g| g >= generation)
    }
}

/// What a bridge needs to know about where it lives.
#[derive(Debug, Clone)]
pub struct BridgeCtx {
    /// The exporter's name (checked against `jmp_protocol::name`: safe as a path component).
    pub exporter: String,
    /// Where device nodes and links go (`/dev/jmp`, `$XDG_RUNTIME_DIR/jmp`).
    pub dev_dir: PathBuf,
    /// Where mounts go (`/run/jmp` for root: a FUSE mount has no place in /dev; else the
    /// dev dir).
    pub mount_dir: PathBuf,
    /// The user local devices belong to (uid, gid).
    pub owner: Option<(u32, u32)>,
    /// Where a bridge that listens (`DeviceKind::LISTENS`) listens, as `--forward` chose for
    /// this device; `None`: an ephemeral port on 127.0.0.1.
    pub listen: Option<std::net::SocketAddr>,
    /// Who may use the local ports (`--allow-local-users`: anyone; else the owner only).
    pub local_users: common::listen::LocalUsers,
}

/// Client side of a device kind: the local endpoints (pty, listening port) outlive any one
/// connection; `run` is called once per link and returns when that link is gone. Each bridge
/// runs in its own task for the life of the attachment.
pub trait Bridge: Send + 'static {
    /// Device name on the exporter.
    fn device(&self) -> &str;
    fn kind(&self) -> Kind;
    /// Where the device appeared locally (none for a kind used only through commands).
    fn endpoints(&self) -> Vec<Endpoint>;

    /// Called with every Welcome, before `run` on that link: the device as the exporter lists
    /// it now and the exporter's instance (a serial bridge learns whether the exporter
    /// restarted, and so whether its offsets still mean anything).
    fn on_welcome(&mut self, _info: &DeviceInfo, _instance: u64) {}
    /// Serves the local endpoints over `link` until the link is gone. The caller may also drop
    /// the future at any time (it learned first that the link is gone): state that must survive
    /// reconnects lives in `self`, never only in the future.
    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit>;

    /// Runs while there is no link (between a loss and the next connection), until dropped.
    /// A serial bridge drains and discards what is typed meanwhile; a TCP bridge leaves new
    /// connections waiting in the listen backlog, served once the link is back.
    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }

    /// Where the device appeared locally, as it changes, for a bridge whose endpoints come and
    /// go while it runs (an imported USB device becomes a tty, a disk, a network interface
    /// once the local kernel has enumerated it); `None` when [`Bridge::endpoints`] is all
    /// there is.
    fn live_endpoints(&self) -> Option<watch::Receiver<Vec<Endpoint>>> {
        None
    }

    /// For a bridge whose local devices come up only after [`Bridge::run`] started (USB
    /// imports enumerate through the local kernel): turns `true` once the devices of its first
    /// link are up or have failed, so that `jmp attach` can show them in its ready line. `None`
    /// when [`Bridge::endpoints`] is complete as soon as the bridge exists.
    fn settled(&self) -> Option<watch::Receiver<bool>> {
        None
    }

    /// The bridge's own state for people, as it changes (frames lost on the way, refused while
    /// the link was down); shown beside the exporter's summary in `jmp status`. `None` for a
    /// kind with nothing to add.
    fn local_status(&self) -> Option<watch::Receiver<String>> {
        None
    }

    /// A bridge that caches the device's contents locally reports how far that cache has
    /// caught up ([`CacheState`]): how `jmp storage flash` waits until every local mount has
    /// dropped what it wrote over. `None` for a kind that caches nothing.
    fn cache(&self) -> Option<watch::Receiver<CacheState>> {
        None
    }
}

/// Registers an owned descriptor with tokio's reactor.
pub(crate) fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // Readable interest only: with writable interest too, every read the *other* end of a pty
    // or tty makes wakes this process (the kernel signals "writable again" on each), a
    // context switch for nothing on every console round trip. Writes try the descriptor
    // directly and register for writability only while it is full (`fdio::write_some`).
    // SAFETY: an OwnedFd stays open and names the same file description until it is dropped,
    // which happens only together with the AsyncFd that owns it.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }?)
}
