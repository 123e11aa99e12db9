//! jmp-transport: everything between two jmp processes that is not the protocol's logic.
//!
//! Owns: the exporter's TLS identity (created on first start, kept on disk) and its fingerprint;
//! quinn endpoints configured for jmp (ALPN, keep-alive, idle timeout, a stateless-reset key that
//! survives restarts so a client learns at once that a restarted exporter lost its connection);
//! certificate pinning on the client; the [`Link`] (one task owns one connection and its
//! protocol `Session`); [`Channels`], the seam devices open channels and make requests through,
//! implemented by the link and by an in-memory pair ([`channels::mem`]) for tests; [`Pipe`]s,
//! the byte channels devices use, over QUIC streams or in memory ([`pipe::pair`]); and
//! datagram channels.
//!
//! Also: calls on the controller API ([`ctl`]) and signing/verifying its tokens ([`token`]).
//!
//! Does not own: what a device does with its bytes (jmp-devices), tokens' meaning or leases.

pub mod channels;
pub mod connector;
pub mod controller;
pub mod endpoint;
pub mod gate;
pub mod identity;
pub mod known;
pub mod link;
pub mod liveness;
pub mod pipe;
pub mod possession;
pub mod relay;
pub mod systemd;
pub mod token;
pub mod udp;

pub use channels::{BoxFuture, ChannelIo, Channels, Incoming, IncomingRequest};
pub use endpoint::{
    client_endpoint, client_endpoint_on, connect, connect_tuned, connect_without_retry,
    server_endpoint, ConnectError,
};
pub use identity::{Fingerprint, Identity, IdentityError};
pub use link::{Link, LinkEvent, LinkHandle, OpenError};
pub use pipe::{
    ChannelMsg, ControlTx, DatagramPipe, DatagramRx, DatagramTx, Pipe, PipeError, PipeRx, PipeTx,
    PRIORITY_BULK, PRIORITY_INTERACTIVE,
};

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

/// Logging for jmp's programs: to stderr, level from `JMP_LOG` (default `info`), colours only
/// on a terminal. `targets`: show the module of each line (daemons) or not (the CLI).
pub fn init_logging(targets: bool) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JMP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(targets)
        .init();
}

/// Wall-clock Unix seconds (token expiry, lease ends). 0 if the clock is before 1970.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Replaces `path` with `content`, readable by its owner only (credentials, client configs).
/// Written to a temporary file first and renamed, so a reader never sees half a secret.
pub fn write_secret_file(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
