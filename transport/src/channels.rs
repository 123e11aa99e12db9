//! The seam between device code and the connection: [`Channels`] is how a client-side bridge
//! opens channels and makes requests, [`Incoming`] and [`IncomingRequest`] are how an
//! exporter-side driver receives them. Both are implemented by the QUIC [`crate::Link`] and by
//! the in-memory pair of [`mem`], so every bridge and driver is tested without a network first.

use crate::link::LinkHandle;
use crate::pipe::{datagram_pair_on, pair_on, DatagramPipe, Pipe};
use bytes::Bytes;
use jmp_protocol::{ChannelMode, ErrorCode, Open, Refusal};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::oneshot;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The client side of a session, as device bridges see it. Cheap to clone behind an `Arc`.
pub trait Channels: Send + Sync + 'static {
    /// Opens a stream channel on `device` with the kind's open parameters; returns the pipe
    /// and the kind's answer (`Opened.params`).
    fn open_stream<'a>(
        &'a self,
        device: &'a str,
        params: Bytes,
    ) -> BoxFuture<'a, Result<(Pipe, Bytes), Refusal>>;

    /// Opens a datagram channel on `device`.
    fn open_datagram<'a>(
        &'a self,
        device: &'a str,
        params: Bytes,
    ) -> BoxFuture<'a, Result<(DatagramPipe, Bytes), Refusal>>;

    /// A device request; the kind's answer, or why it failed (`timeout` if none came in time).
    fn request<'a>(
        &'a self,
        device: &'a str,
        body: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Bytes, Refusal>>;

    /// Lets the session forget a channel the holder has finished with.
    fn close(&self, channel: u64, code: ErrorCode, reason: &str);

    /// Completes when the session is gone.
    fn closed(&self) -> BoxFuture<'_, ()>;

    fn is_closed(&self) -> bool;

    /// Whether the peer has stopped answering although the session is not given up yet
    /// (see [`crate::liveness`]), as it changes; `None` where the carrier cannot tell (the
    /// in-memory pair, the exporter's side).
    fn stalled(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// The two ways a channel is carried.
pub enum ChannelIo {
    Stream(Pipe),
    Datagram(DatagramPipe),
}

enum OpenAnswer {
    Quic {
        stream: Option<(quinn::SendStream, quinn::RecvStream)>,
        link: LinkHandle,
    },
    Mem {
        io: Option<ChannelIo>,
        reply: oneshot::Sender<Result<Bytes, Refusal>>,
    },
}

/// An exporter's pending channel: accept it with the kind's answer, or reject it. Dropping it
/// rejects it.
pub struct Incoming {
    pub open: Open,
    answer: Option<OpenAnswer>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("open", &self.open)
            .finish()
    }
}

impl Incoming {
    pub(crate) fn quic(
        open: Open,
        stream: Option<(quinn::SendStream, quinn::RecvStream)>,
        link: LinkHandle,
    ) -> Self {
        Incoming {
            open,
            answer: Some(OpenAnswer::Quic { stream, link }),
        }
    }

    pub fn mode(&self) -> ChannelMode {
        self.open.mode
    }

    /// Accepts the channel; `params` is the kind's answer (`Opened.params`). `None` if the
    /// connection is already gone.
    pub fn accept(mut self, params: Bytes) -> Option<ChannelIo> {
        match self.answer.take()? {
            OpenAnswer::Quic { stream, link } => link.accept(&self.open, stream, params),
            OpenAnswer::Mem { io, reply } => {
                reply.send(Ok(params)).ok()?;
                io
            }
        }
    }

    pub fn reject(mut self, code: ErrorCode, reason: impl Into<String>) {
        self.reject_inner(code, reason.into());
    }

    fn reject_inner(&mut self, code: ErrorCode, reason: String) {
        match self.answer.take() {
            Some(OpenAnswer::Quic { stream, link }) => {
                if let Some((mut send, mut recv)) = stream {
                    let c = quinn::VarInt::from_u64(code.to_wire()).unwrap_or(quinn::VarInt::MAX);
                    let _ = send.reset(c);
                    let _ = recv.stop(c);
                }
                link.reject(self.open.channel, code, reason);
            }
            Some(OpenAnswer::Mem { reply, .. }) => {
                let _ = reply.send(Err(Refusal::new(code, reason)));
            }
            None => {}
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.reject_inner(
            ErrorCode::Internal,
            "the exporter dropped the request".into(),
        );
    }
}

enum RequestAnswer {
    Quic(LinkHandle),
    Mem(oneshot::Sender<Result<Bytes, Refusal>>),
}

/// An exporter's pending device request: answer it once. Dropping it answers `internal`.
pub struct IncomingRequest {
    pub id: u64,
    pub device: String,
    pub body: Bytes,
    answer: Option<RequestAnswer>,
}

impl std::fmt::Debug for IncomingRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingRequest")
            .field("id", &self.id)
            .field("device", &self.device)
            .finish()
    }
}

impl IncomingRequest {
    pub(crate) fn quic(r: jmp_protocol::Request, link: LinkHandle) -> Self {
        IncomingRequest {
            id: r.id,
            device: r.device,
            body: r.body,
            answer: Some(RequestAnswer::Quic(link)),
        }
    }

    pub fn answer(mut self, result: Result<Bytes, Refusal>) {
        self.answer_inner(result);
    }

    fn answer_inner(&mut self, result: Result<Bytes, Refusal>) {
        match self.answer.take() {
            Some(RequestAnswer::Quic(link)) => link.done(self.id, result),
            Some(RequestAnswer::Mem(tx)) => {
                let _ = tx.send(result);
            }
            None => {}
        }
    }
}

impl Drop for IncomingRequest {
    fn drop(&mut self) {
        self.answer_inner(Err(Refusal::new(
            ErrorCode::Internal,
            "the exporter dropped the request",
        )));
    }
}

fn gone() -> Refusal {
    Refusal::new(ErrorCode::Internal, "the connection is closed")
}

/// An in-memory session: the client half implements [`Channels`]; the exporter half receives
/// what the client opens and asks as the same [`Incoming`] and [`IncomingRequest`] a QUIC link
/// delivers. For tests of bridges and drivers without a network.
pub mod mem {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::sync::mpsc;

    /// What the exporter half receives.
    #[derive(Debug)]
    pub enum MemEvent {
        Incoming(Incoming),
        Request(IncomingRequest),
        Closed { channel: u64 },
    }

    /// Chunks of buffering each way on a stream channel (the stand-in for flow control).
    const DEPTH: usize = 16;

    /// The client half.
    #[derive(Clone)]
    pub struct MemChannels {
        events: mpsc::Sender<MemEvent>,
        next: Arc<AtomicU64>,
    }

    /// A connected pair: drop the receiver to end the session.
    pub fn pair() -> (MemChannels, mpsc::Receiver<MemEvent>) {
        let (tx, rx) = mpsc::channel(64);
        (
            MemChannels {
                events: tx,
                next: Arc::new(AtomicU64::new(1)),
            },
            rx,
        )
    }

    impl MemChannels {
        async fn open(
            &self,
            device: &str,
            mode: ChannelMode,
            params: Bytes,
        ) -> Result<(ChannelIo, Bytes), Refusal> {
            let channel = self.next.fetch_add(1, Ordering::Relaxed);
            let (mine, theirs) = match mode {
                ChannelMode::Stream => {
                    let (a, b) = pair_on(channel, DEPTH);
                    (ChannelIo::Stream(a), ChannelIo::Stream(b))
                }
                ChannelMode::Datagram => {
                    let (a, b) = datagram_pair_on(channel, 1024);
                    (ChannelIo::Datagram(a), ChannelIo::Datagram(b))
                }
            };
            let (reply, answer) = oneshot::channel();
            let incoming = Incoming {
                open: Open {
                    channel,
                    device: device.to_string(),
                    mode,
                    params,
                },
                answer: Some(OpenAnswer::Mem {
                    io: Some(theirs),
                    reply,
                }),
            };
            self.events
                .send(MemEvent::Incoming(incoming))
                .await
                .map_err(|_| gone())?;
            let params = answer.await.map_err(|_| gone())??;
            Ok((mine, params))
        }
    }

    impl Channels for MemChannels {
        fn open_stream<'a>(
            &'a self,
            device: &'a str,
            params: Bytes,
        ) -> BoxFuture<'a, Result<(Pipe, Bytes), Refusal>> {
            Box::pin(async move {
                match self.open(device, ChannelMode::Stream, params).await? {
                    (ChannelIo::Stream(p), params) => Ok((p, params)),
                    _ => Err(gone()),
                }
            })
        }

        fn open_datagram<'a>(
            &'a self,
            device: &'a str,
            params: Bytes,
        ) -> BoxFuture<'a, Result<(DatagramPipe, Bytes), Refusal>> {
            Box::pin(async move {
                match self.open(device, ChannelMode::Datagram, params).await? {
                    (ChannelIo::Datagram(p), params) => Ok((p, params)),
                    _ => Err(gone()),
                }
            })
        }

        fn request<'a>(
            &'a self,
            device: &'a str,
            body: Bytes,
            timeout: Duration,
        ) -> BoxFuture<'a, Result<Bytes, Refusal>> {
            Box::pin(async move {
                let (tx, rx) = oneshot::channel();
                let req = IncomingRequest {
                    id: self.next.fetch_add(1, Ordering::Relaxed),
                    device: device.to_string(),
                    body,
                    answer: Some(RequestAnswer::Mem(tx)),
                };
                self.events
                    .send(MemEvent::Request(req))
                    .await
                    .map_err(|_| gone())?;
                match tokio::time::timeout(timeout, rx).await {
                    Ok(r) => r.map_err(|_| gone())?,
                    Err(_) => Err(Refusal::new(
                        ErrorCode::Timeout,
                        "no answer from the exporter in time",
                    )),
                }
            })
        }

        fn close(&self, channel: u64, _code: ErrorCode, _reason: &str) {
            let _ = self.events.try_send(MemEvent::Closed { channel });
        }

        fn closed(&self) -> BoxFuture<'_, ()> {
            Box::pin(self.events.closed())
        }

        fn is_closed(&self) -> bool {
            self.events.is_closed()
        }
    }
}
