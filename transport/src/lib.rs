//! jmp-transport: everything between two jmp processes that is not the protocol's logic.
//!
//! Owns: the exporter's TLS identity (created on first start, kept on disk) and its fingerprint;
//! quinn endpoints configured for jmp (ALPN, keep-alive, idle timeout, a stateless-reset key that
//! survives restarts so a client learns at once that a restarted exporter lost its connection);
//! certificate pinning on the client; the [`Link`] (one task owns one connection and its
//! protocol `Session`); [`Pipe`]s, the byte channels devices use, over QUIC streams or in memory
//! ([`pipe::pair`]) for tests; and datagram channels.
//!
//! Also: calls on the controller API ([`ctl`]) and signing/verifying its tokens ([`token`]).
//!
//! Does not own: what a device does with its bytes (jmp-devices), tokens' meaning or leases.

pub mod ctl;
pub mod endpoint;
pub mod identity;
pub mod link;
pub mod pipe;
pub mod token;
pub mod udp;

pub use endpoint::{client_endpoint, connect, server_endpoint, ConnectError};
pub use identity::{Fingerprint, Identity, IdentityError};
pub use link::{Incoming, Link, LinkEvent, LinkHandle, OpenError};
pub use pipe::{ControlTx, DatagramPipe, Pipe, PipeError, PipeRx, PipeTx};

/// The runtime jmp's processes run on. Single-threaded by default: a console round trip crosses
/// several tasks (pty, link, quinn's connection driver), and on the small machines this runs on
/// a wakeup across threads costs more than the parallelism gains. `JMP_WORKER_THREADS=N` gives
/// a multi-threaded runtime with N workers.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    match std::env::var("JMP_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 0 => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
}

/// Registers SIGTERM/SIGINT handlers now (not when first polled: a signal arriving between
/// "ready" and the first poll would otherwise kill the process with its devices in place) and
/// returns a future that completes on either, logging `what` ("removing local devices").
/// Call inside the runtime.
pub fn shutdown_signal(what: &'static str) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: {what}"),
            _ = int.recv() => tracing::info!("interrupted: {what}"),
        }
    }
}
