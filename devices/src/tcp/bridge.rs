//! Client side of a TCP forward: a local listening port whose every accepted connection
//! becomes one stream channel to the exporter, which connects to the target for it.
//!
//! The listener outlives links. While there is no link, new connections wait in the kernel's
//! backlog; a connection accepted just as the link went away is kept and served on the next
//! link rather than dropped.

use crate::common::forward::forward;
use crate::common::listen::LocalUsers;
use crate::{BoxFuture, Bridge, BridgeExit, Endpoint, Local, Refusal};
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::Channels;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn, Instrument};

/// How long an open that failed with a session-level code waits to see whether the
/// connection closes: the link task fails pending opens just before it closes the connection.
const SESSION_END_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A local connection not yet carried by a channel.
struct LocalConn {
    stream: TcpStream,
    peer: SocketAddr,
}

/// What a connection's task reports back to the bridge. The receiver lives in the bridge, not
/// in `run`, so reports sent after a `run` was dropped reach the next one.
enum Back {
    /// The link went away before the channel opened: serve this connection on the next link.
    Retry(LocalConn),
    /// The exporter has no such device.
    Refused(Refusal),
}

/// A local TCP port forwarded to a `tcp` device of the exporter.
pub struct TcpBridge {
    device: String,
    listener: TcpListener,
    local_addr: SocketAddr,
    users: LocalUsers,
    refused: crate::common::Drops,
    /// Connections handed back by their tasks because the link was lost; served first by the
    /// next `run`.
    pending: VecDeque<LocalConn>,
    back_tx: mpsc::UnboundedSender<Back>,
    back_rx: mpsc::UnboundedReceiver<Back>,
}

impl std::fmt::Debug for TcpBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpBridge")
            .field("device", &self.device)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl TcpBridge {
    /// Listens on `addr` (port 0 picks a free port; see [`TcpBridge::local_addr`]) for the
    /// user running this process only (see [`TcpBridge::with_local_users`]).
    pub async fn bind(device: String, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let (back_tx, back_rx) = mpsc::unbounded_channel();
        Ok(TcpBridge {
            device,
            listener,
            local_addr,
            users: LocalUsers::new(None, false),
            refused: crate::common::Drops::new("connection refused"),
            pending: VecDeque::new(),
            back_tx,
            back_rx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves connections from `users` (from the owner only by default).
    pub fn with_local_users(mut self, users: LocalUsers) -> Self {
        self.users = users;
        self
    }

    fn spawn(&self, link: &Arc<dyn Channels>, local: LocalConn) {
        let span = tracing::debug_span!("tcp", device = %self.device, peer = %local.peer);
        tokio::spawn(
            serve_connection(
                link.clone(),
                self.device.clone(),
                local,
                self.back_tx.clone(),
            )
            .instrument(span),
        );
    }
}

impl Bridge for TcpBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Tcp
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        vec![Endpoint::new(Local::Address(self.local_addr))]
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(async move {
            let link = &link;
            while let Some(local) = self.pending.pop_front() {
                self.spawn(link, local);
            }
            loop {
                tokio::select! {
                    biased;
                    _ = link.closed() => return BridgeExit::LinkLost,
                    back = self.back_rx.recv() => match back {
                        Some(Back::Retry(local)) => {
                            // A task of an earlier link may report late, while this link is
                            // fine: then serve it now.
                            if link.is_closed() {
                                self.pending.push_back(local);
                                return BridgeExit::LinkLost;
                            }
                            self.spawn(link, local);
                        }
                        Some(Back::Refused(r)) => return BridgeExit::Refused(r),
                        // Unreachable: the bridge holds a sender.
                        None => {}
                    },
                    accepted = self.listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            if let Err(why) = self.users.admit_tcp(self.local_addr, peer) {
                                self.refused.hit(&self.device, why);
                                continue;
                            }
                            debug!(device = %self.device, %peer, "local connection");
                            self.spawn(link, LocalConn { stream, peer });
                        }
                        Err(e) => {
                            warn!("{}: accept on {} failed: {e}", self.device, self.local_addr);
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                    },
                }
            }
        })
    }
}

/// Opens a channel for one local connection and forwards it to the end.
async fn serve_connection(
    link: Arc<dyn Channels>,
    device: String,
    local: LocalConn,
    back: mpsc::UnboundedSender<Back>,
) {
    if let Err(e) = local.stream.set_nodelay(true) {
        debug!("cannot set TCP_NODELAY: {e}");
    }
    let (pipe, _) = match link.open_stream(&device, bytes::Bytes::new()).await {
        Ok(p) => p,
        Err(e) => {
            if link_is_gone(link.as_ref(), &e).await {
                debug!("the link went away before the channel opened; kept for the next link");
                // If the bridge itself is gone, so is the listener: closing is then right.
                let _ = back.send(Back::Retry(local));
                return;
            }
            let peer = local.peer;
            match e.code {
                ErrorCode::ConnectFailed => warn!(
                    %peer,
                    "{device}: the exporter could not connect: {}", e.reason
                ),
                code => warn!(
                    %peer,
                    "{device}: the exporter refused the channel: {} ({code})", e.reason
                ),
            }
            if e.code == ErrorCode::NoSuchDevice {
                let _ = back.send(Back::Refused(Refusal::new(e.code, e.reason)));
            }
            // Dropping the socket closes it: the local client sees the forward end at once.
            return;
        }
    };
    let channel = pipe.channel;
    let out = forward(local.stream, pipe).await;
    match out.error {
        None => debug!(
            channel,
            sent = out.sent,
            received = out.received,
            "tcp channel done"
        ),
        Some(e) => debug!(
            channel,
            sent = out.sent,
            received = out.received,
            "tcp channel aborted: {e}"
        ),
    }
    // Lets the session forget the channel; the exporter side has already ended its forward or
    // will on the stream's end.
    link.close(channel, ErrorCode::Ok, "");
}

/// Whether an open failed because the link is gone rather than because the exporter refused
/// the channel.
async fn link_is_gone(link: &dyn Channels, e: &Refusal) -> bool {
    if link.is_closed() {
        return true;
    }
    match e.code {
        ErrorCode::ConnectFailed
        | ErrorCode::NoSuchDevice
        | ErrorCode::DeviceUnavailable
        | ErrorCode::Unsupported => false,
        _ => tokio::time::timeout(SESSION_END_GRACE, link.closed())
            .await
            .is_ok(),
    }
}

/// The bridge for `info`, listening where `--forward` says (else an ephemeral loopback port).
pub async fn create(info: &DeviceInfo, ctx: &crate::BridgeCtx) -> Result<TcpBridge, String> {
    let addr = ctx
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    TcpBridge::bind(info.name.clone(), addr)
        .await
        .map(|b| b.with_local_users(ctx.local_users.clone()))
        .map_err(|e| e.to_string())
}

