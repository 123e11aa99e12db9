//! jmp-devices: the device kinds, one folder each, and the exporter's serving of them.
//!
//! Each kind has `driver.rs` (exporter side: serves one channel of the device on a [`Pipe`]),
//! `bridge.rs` (client side: creates the local endpoint, a pty or a listening port, and pumps
//! it over channels of the current link) and, where the kind has one, `sim.rs` (a simulated board
//! backend for the quick start and tests). [`exporter`] turns a config's device table into a
//! served QUIC endpoint (used by `jmpd`, and in-process by `jmp local`); [`config`] is the
//! exporter's YAML.
//!
//! Does not own: the wire or the connection (jmp-transport), the CLI, leases.

pub mod config;
pub mod exporter;
pub(crate) mod fdio;
pub mod serial;
pub mod tcp;

use jmp_protocol::{DeviceInfo, ErrorCode, Open};
use jmp_transport::{LinkHandle, Pipe};
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a channel was refused: sent to the client as `Reject { code, reason }`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

/// Exporter side of a device kind. One per exported device, alive as long as the exporter.
pub trait Driver: Send + Sync + 'static {
    fn info(&self) -> DeviceInfo;

    /// Decides on a channel request. On success the returned [`Channel`] is served on the
    /// channel's pipe; the exporter accepts the QUIC stream only then, so a refusal (target port
    /// closed, serial port vanished) reaches the client as a `Reject` with the reason.
    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>>;
}

/// One accepted channel of a device, ready to be served.
pub trait Channel: Send + 'static {
    /// Device-output offset of the first byte the channel will send (serial resume; else 0).
    fn offset(&self) -> u64;

    /// Moves bytes between the pipe and the device until either side ends.
    fn serve(self: Box<Self>, pipe: Pipe) -> BoxFuture<'static, ()>;
}

/// How a bridge's run over one link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeExit {
    /// The link is gone; run again on the next link (the local endpoint stays).
    LinkLost,
    /// The exporter refused this device for good (no such device): stop using it.
    Refused(Refusal),
}

/// Client side of a device kind: the local endpoint (pty, listening port) outlives any one
/// connection; `run` is called once per link and returns when that link is gone.
pub trait Bridge: Send + 'static {
    /// Device name on the exporter.
    fn device(&self) -> &str;
    /// Device kind ("serial", "tcp").
    fn kind(&self) -> &str;
    /// Where the device appeared locally: a path or an address.
    fn local(&self) -> String;

    /// Called with every Welcome, before `run` on that link (a serial bridge learns whether the
    /// exporter restarted, and so whether its offsets still mean anything).
    fn on_welcome(&mut self, _welcome: &jmp_protocol::Welcome) {}
    /// Serves the local endpoint over `link` until the link is gone. The caller may also drop
    /// the future at any time (it learned first that the link is gone): state that must survive
    /// reconnects lives in `self`, never only in the future.
    fn run<'a>(&'a mut self, link: &'a LinkHandle) -> BoxFuture<'a, BridgeExit>;

    /// Runs while there is no link (between a loss and the next connection), until dropped.
    /// A serial bridge drains and discards what is typed meanwhile; a TCP bridge leaves new
    /// connections waiting in the listen backlog, served once the link is back.
    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
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
