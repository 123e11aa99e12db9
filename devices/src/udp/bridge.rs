//! Client side of a UDP forward: one local socket; each source address that sends to it is a
//! flow with its own datagram channel, opened on its first datagram and closed after
//! [`FLOW_IDLE`] without traffic either way. The socket outlives links; flows do not (a new
//! link opens new ones as datagrams arrive).

use crate::common::listen::LocalUsers;
use crate::common::{Drops, TaskGuard};
use crate::{BoxFuture, Bridge, BridgeExit, Endpoint, Local, Refusal};
use bytes::Bytes;
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::{Channels, PipeError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// A flow with no datagram either way for this long is closed (DNS and TFTP exchanges are over
/// in seconds; a minute keeps slow request/response protocols on one flow).
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued for a flow whose channel is still opening.
const FLOW_QUEUE: usize = 256;
/// Flows before the map is swept of ended ones.
const SWEEP_AT: usize = 1024;

struct Flow {
    tx: mpsc::Sender<Bytes>,
    _task: TaskGuard,
}

pub struct UdpBridge {
    device: String,
    sock: Arc<UdpSocket>,
    local_addr: SocketAddr,
    users: LocalUsers,
    too_large: Arc<Drops>,
    refused: Arc<Drops>,
}

impl UdpBridge {
    pub async fn bind(device: String, addr: SocketAddr) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
        let local_addr = sock.local_addr()?;
        Ok(UdpBridge {
            device,
            sock: Arc::new(sock),
            local_addr,
            users: LocalUsers::new(None, false),
            too_large: Arc::new(Drops::new("datagram larger than the path allows")),
            refused: Arc::new(Drops::new("datagram from another local user")),
        })
    }

    /// Local datagrams dropped because another local user sent them.
    pub fn refused_datagrams(&self) -> u64 {
        self.refused.count()
    }

    /// Serves datagrams from `users` (from the owner only by default).
    pub fn with_local_users(mut self, users: LocalUsers) -> Self {
        self.users = users;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Local datagrams dropped because they were larger than a datagram of the link.
    pub fn dropped_too_large(&self) -> u64 {
        self.too_large.count()
    }
}

/// The bridge for `info`, on the address `--forward` gives it (else an ephemeral loopback
/// port).
pub async fn create(info: &DeviceInfo, ctx: &crate::BridgeCtx) -> Result<UdpBridge, String> {
    let addr = ctx
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    UdpBridge::bind(info.name.clone(), addr)
        .await
        .map(|b| b.with_local_users(ctx.local_users.clone()))
        .map_err(|e| e.to_string())
}

impl Bridge for UdpBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Udp
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        vec![Endpoint::new(Local::Address(self.local_addr))]
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(async move {
            let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
            let (back_tx, mut back_rx) = mpsc::unbounded_channel::<Refusal>();
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    biased;
                    _ = link.closed() => return BridgeExit::LinkLost,
                    Some(r) = back_rx.recv() => return BridgeExit::Refused(r),
                    r = self.sock.recv_from(&mut buf) => {
                        let (n, peer) = match r {
                            Ok(x) => x,
                            Err(e) => {
                                debug!("{}: udp recv: {e}", self.device);
                                continue;
                            }
                        };
                        let d = Bytes::copy_from_slice(&buf[..n]);
                        let d = match flows.get(&peer).map(|f| f.tx.try_send(d)) {
                            None => Some(Bytes::copy_from_slice(&buf[..n])),
                            Some(Ok(())) => None,
                            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                                debug!("{}: flow {peer} is still opening; datagram dropped", self.device);
                                None
                            }
                            Some(Err(mpsc::error::TrySendError::Closed(d))) => Some(d),
                        };
                        if let Some(d) = d {
                            // Checked when a flow starts: its datagrams and the answers to
                            // them stay with the sender's socket while the flow lives.
                            if let Err(why) = self.users.admit_udp(self.local_addr, peer) {
                                self.refused.hit(&self.device, format_args!("{why}"));
                                continue;
                            }
                            if flows.len() >= SWEEP_AT {
                                flows.retain(|_, f| !f.tx.is_closed());
                            }
                            let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                            let _ = tx.try_send(d);
                            let task = tokio::spawn(flow(
                                link.clone(),
                                self.device.clone(),
                                self.sock.clone(),
                                peer,
                                rx,
                                self.too_large.clone(),
                                back_tx.clone(),
                            ));
                            flows.insert(peer, Flow { tx, _task: TaskGuard(task) });
                        }
                    }
                }
            }
        })
    }
}

/// One flow: opens its channel, then carries datagrams both ways until idle or the link ends.
async fn flow(
    link: Arc<dyn Channels>,
    device: String,
    sock: Arc<UdpSocket>,
    peer: SocketAddr,
    mut q: mpsc::Receiver<Bytes>,
    too_large: Arc<Drops>,
    back: mpsc::UnboundedSender<Refusal>,
) {
    let (pipe, _) = match link.open_datagram(&device, Bytes::new()).await {
        Ok(p) => p,
        Err(e) => {
            if !link.is_closed() {
                warn!(
                    "{device}: the exporter refused the flow from {peer}: {} ({})",
                    e.reason, e.code
                );
            }
            if e.code == ErrorCode::NoSuchDevice {
                let _ = back.send(e);
            }
            return;
        }
    };
    debug!("{device}: flow {peer} on channel {}", pipe.channel);
    let channel = pipe.channel;
    let (tx, mut rx, _control) = (pipe.tx, pipe.rx, pipe.control_rx);
    let idle = tokio::time::sleep(FLOW_IDLE);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            d = q.recv() => match d {
                Some(d) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + FLOW_IDLE);
                    match tx.send(&d) {
                        Ok(()) => {}
                        Err(PipeError::TooLarge { size, max }) => {
                            too_large.hit(&device, format_args!("{size} bytes from {peer}, datagrams up to {max}"))
                        }
                        Err(_) => break,
                    }
                }
                None => break,
            },
            d = rx.recv() => match d {
                Some(d) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + FLOW_IDLE);
                    if let Err(e) = sock.send_to(&d, peer).await {
                        debug!("{device}: udp send to {peer}: {e}");
                    }
                }
                None => break,
            },
            _ = &mut idle => {
                debug!("{device}: flow {peer} idle for {} s; closed", FLOW_IDLE.as_secs());
                break;
            }
        }
    }
    link.close(channel, ErrorCode::Ok, "");
}
