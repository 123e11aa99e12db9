//! The Link: one task owns one QUIC connection and its protocol [`Session`]; everyone else talks
//! to it through a cloneable [`LinkHandle`] (commands; on the client it is the [`Channels`]
//! devices open channels through) and receives [`LinkEvent`]s.
//!
//! The task reads control frames, feeds the session, writes what the session wants sent, holds
//! an exporter's incoming streams until the session pairs them with their `Open`, routes each
//! channel's out-of-band messages to the pipe that owns the channel, routes datagrams by channel
//! id, and resolves requests. Payload never passes through this task: stream channels are read
//! and written directly by their holders.
//!
//! Every queue from this task to a consumer is bounded. A consumer that lets its queue fill
//! (the application not reading events, a driver not reading its channel's control messages)
//! ends the session with a reason instead of growing memory; datagrams beyond a channel's
//! queue, or beyond [`DATAGRAM_BYTES`] queued on the whole link, are dropped, as a busy bus
//! drops frames. An exporter whose client has [`jmp_protocol::session::MAX_REQUESTS`]
//! requests unanswered reads no more control messages until one is answered: the client's
//! requests wait in its own flow control.

use crate::channels::{BoxFuture, ChannelIo, Channels, Incoming, IncomingRequest};
use crate::pipe::{ChannelMsg, ControlTx, DatagramPipe, Pipe, PipeRx, PipeTx, CONTROL_DEPTH};
use bytes::Bytes;
use jmp_protocol::codec::get_varint;
use jmp_protocol::session::{Config, Event, Session, State, StreamVerdict};
use jmp_protocol::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Datagrams queued per channel before new ones are dropped (a busy bus drops frames too).
const DATAGRAM_DEPTH: usize = 1024;
/// Datagram payload bytes queued on one link for all its channels together; beyond that new
/// datagrams are dropped. Each queued datagram is copied out of the packet buffer it arrived
/// in (which may hold dozens of other packets), so this counts what is really held.
pub const DATAGRAM_BYTES: usize = 4 << 20;
/// Events queued for the application.
const EVENT_DEPTH: usize = 1024;
/// Streams whose header has been read, queued for the task.
const STREAM_DEPTH: usize = 64;

#[derive(Debug)]
pub enum LinkEvent {
    /// Client: the exporter accepted us (consumed by [`Link::client`]).
    Welcome(Welcome),
    /// Exporter: the client said Hello. Answer with [`LinkHandle::welcome`] or
    /// [`LinkHandle::bye`].
    Hello(Hello),
    /// Exporter: a channel request, with its stream when it is a stream channel.
    Incoming(Incoming),
    /// Exporter: a device request.
    Request(IncomingRequest),
    /// A notice about the session (channel 0). Per-channel ones go to the channel's pipe.
    Notice(String),
    /// Client: a device's state changed.
    Status(Status),
    /// Client: the colleagues attached beside this session now (the whole list).
    Guests(jmp_protocol::Guests),
    /// The peer closed a channel.
    Closed {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    /// The session is over; always the last event.
    Ended {
        code: ErrorCode,
        reason: String,
        by_peer: bool,
    },
}

/// Kept for callers that name the old type: the same as [`Refusal`].
pub type OpenError = Refusal;

enum Command {
    Open {
        device: String,
        mode: ChannelMode,
        params: Bytes,
        id: oneshot::Sender<Option<u64>>,
        done: oneshot::Sender<Result<Bytes, Refusal>>,
        control: mpsc::Sender<ChannelMsg>,
        datagrams: Option<mpsc::Sender<Bytes>>,
    },
    Accept {
        channel: u64,
        params: Bytes,
        control: mpsc::Sender<ChannelMsg>,
        datagrams: Option<mpsc::Sender<Bytes>>,
    },
    Reject {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    ChannelMsg {
        channel: u64,
        msg: ChannelMsg,
    },
    Close {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    Request {
        device: String,
        body: Bytes,
        deadline: Instant,
        done: oneshot::Sender<Result<Bytes, Refusal>>,
    },
    Done {
        id: u64,
        result: Result<Bytes, Refusal>,
    },
    Notice(String),
    Status(Status),
    Guests(jmp_protocol::Guests),
    Welcome(Welcome),
    Bye {
        code: ErrorCode,
        reason: String,
    },
}

/// Commands to a Link's task. Cheap to clone; the task ends when the session ends, after which
/// commands are ignored. The command queue is unbounded: only this process's own code sends on
/// it, each command in answer to something it chose to do.
#[derive(Clone)]
pub struct LinkHandle {
    cmds: mpsc::UnboundedSender<Command>,
    conn: quinn::Connection,
    /// Datagram payload bytes queued for this link's channels (see [`DATAGRAM_BYTES`]).
    dg_queued: Arc<AtomicUsize>,
    /// Client side: whether the exporter has stopped answering (see [`crate::liveness`]).
    stalled: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkHandle({})", self.conn.remote_address())
    }
}

fn gone() -> Refusal {
    Refusal::new(ErrorCode::Internal, "the connection is closed")
}

impl LinkHandle {
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }

    /// The connection's round-trip estimate (for status output).
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Client side: whether the exporter has stopped answering, as it changes (see
    /// [`crate::liveness`]); `None` on the exporter's side.
    pub fn stalled(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.stalled.clone()
    }

    /// Client: asks the task for a channel id and queues the Open. Returns the id and where
    /// the answer (the kind's params, or the refusal) will arrive.
    async fn request_open(
        &self,
        device: &str,
        mode: ChannelMode,
        params: Bytes,
        control: mpsc::Sender<ChannelMsg>,
        datagrams: Option<mpsc::Sender<Bytes>>,
    ) -> Result<(u64, oneshot::Receiver<Result<Bytes, Refusal>>), Refusal> {
        let (id_tx, id_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        self.cmds
            .send(Command::Open {
                device: device.to_string(),
                mode,
                params,
                id: id_tx,
                done: done_tx,
                control,
                datagrams,
            })
            .map_err(|_| gone())?;
        let channel = id_rx.await.map_err(|_| gone())?.ok_or_else(gone)?;
        Ok((channel, done_rx))
    }

    async fn open_stream_inner(
        &self,
        device: &str,
        params: Bytes,
    ) -> Result<(Pipe, Bytes), Refusal> {
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_DEPTH);
        let (channel, done_rx) = self
            .request_open(device, ChannelMode::Stream, params, ctl_tx, None)
            .await?;
        // The stream goes out at once, before the answer: the exporter pairs it by id, and a
        // TCP forward's first bytes are not held back by a round trip.
        let opened = async {
            let failed =
                |e: String| Refusal::new(ErrorCode::Internal, format!("cannot open a stream: {e}"));
            let (mut send, recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|e| failed(e.to_string()))?;
            let header = channel_header(channel).freeze();
            send.write_chunk(header)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok::<_, Refusal>((send, recv))
        };
        let (send, recv) = match opened.await {
            Ok(s) => s,
            Err(e) => {
                self.close_channel(channel, ErrorCode::Internal, e.reason.clone());
                return Err(e);
            }
        };
        let params = done_rx.await.map_err(|_| gone())??;
        Ok((
            Pipe {
                channel,
                tx: PipeTx::quic(send),
                rx: PipeRx::quic(recv),
                control_rx: ctl_rx,
                control_tx: ControlTx::Link(self.clone(), channel),
            },
            params,
        ))
    }

    async fn open_datagram_inner(
        &self,
        device: &str,
        params: Bytes,
    ) -> Result<(DatagramPipe, Bytes), Refusal> {
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_DEPTH);
        let (dg_tx, dg_rx) = mpsc::channel(DATAGRAM_DEPTH);
        let (channel, done_rx) = self
            .request_open(device, ChannelMode::Datagram, params, ctl_tx, Some(dg_tx))
            .await?;
        let params = done_rx.await.map_err(|_| gone())??;
        Ok((
            DatagramPipe::quic(
                channel,
                self.conn.clone(),
                dg_rx,
                self.dg_queued.clone(),
                ctl_rx,
                ControlTx::Link(self.clone(), channel),
            ),
            params,
        ))
    }

    async fn request_inner(
        &self,
        device: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Refusal> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Command::Request {
                device: device.to_string(),
                body,
                deadline: Instant::now() + timeout,
                done: tx,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Queues an out-of-band message for an open channel. False if the link is gone.
    pub(crate) fn channel_msg(&self, channel: u64, msg: ChannelMsg) -> bool {
        self.cmds.send(Command::ChannelMsg { channel, msg }).is_ok()
    }

    fn close_channel(&self, channel: u64, code: ErrorCode, reason: String) {
        let _ = self.cmds.send(Command::Close {
            channel,
            code,
            reason,
        });
    }

    /// Exporter: accept the client's Hello.
    pub fn welcome(&self, welcome: Welcome) {
        let _ = self.cmds.send(Command::Welcome(welcome));
    }

    /// Exporter: a notice for the attached user about the session.
    pub fn notice(&self, text: impl Into<String>) {
        let _ = self.cmds.send(Command::Notice(text.into()));
    }

    /// Exporter: tell the client a device's state changed.
    pub fn status(&self, status: Status) {
        let _ = self.cmds.send(Command::Status(status));
    }

    /// Exporter: tell the holder who is attached beside it (only to a client whose Hello has
    /// `features::GUESTS`).
    pub fn guests(&self, guests: jmp_protocol::Guests) {
        let _ = self.cmds.send(Command::Guests(guests));
    }

    /// End the session, telling the peer why (the connection closes with this code and reason).
    pub fn bye(&self, code: ErrorCode, reason: impl Into<String>) {
        let _ = self.cmds.send(Command::Bye {
            code,
            reason: reason.into(),
        });
    }

    /// Completes when the connection is gone.
    pub async fn connection_closed(&self) {
        self.conn.closed().await;
    }

    pub(crate) fn accept(
        &self,
        open: &Open,
        stream: Option<(quinn::SendStream, quinn::RecvStream)>,
        params: Bytes,
    ) -> Option<ChannelIo> {
        let channel = open.channel;
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_DEPTH);
        let control_tx = ControlTx::Link(self.clone(), channel);
        match open.mode {
            ChannelMode::Stream => {
                let (send, recv) = stream?;
                self.cmds
                    .send(Command::Accept {
                        channel,
                        params,
                        control: ctl_tx,
                        datagrams: None,
                    })
                    .ok()?;
                Some(ChannelIo::Stream(Pipe {
                    channel,
                    tx: PipeTx::quic(send),
                    rx: PipeRx::quic(recv),
                    control_rx: ctl_rx,
                    control_tx,
                }))
            }
            ChannelMode::Datagram => {
                let (dg_tx, dg_rx) = mpsc::channel(DATAGRAM_DEPTH);
                self.cmds
                    .send(Command::Accept {
                        channel,
                        params,
                        control: ctl_tx,
                        datagrams: Some(dg_tx),
                    })
                    .ok()?;
                Some(ChannelIo::Datagram(DatagramPipe::quic(
                    channel,
                    self.conn.clone(),
                    dg_rx,
                    self.dg_queued.clone(),
                    ctl_rx,
                    control_tx,
                )))
            }
        }
    }

    pub(crate) fn reject(&self, channel: u64, code: ErrorCode, reason: String) {
        let _ = self.cmds.send(Command::Reject {
            channel,
            code,
            reason,
        });
    }

    pub(crate) fn done(&self, id: u64, result: Result<Bytes, Refusal>) {
        let _ = self.cmds.send(Command::Done { id, result });
    }
}

impl Channels for LinkHandle {
    fn open_stream<'a>(
        &'a self,
        device: &'a str,
        params: Bytes,
    ) -> BoxFuture<'a, Result<(Pipe, Bytes), Refusal>> {
        Box::pin(self.open_stream_inner(device, params))
    }

    fn open_datagram<'a>(
        &'a self,
        device: &'a str,
        params: Bytes,
    ) -> BoxFuture<'a, Result<(DatagramPipe, Bytes), Refusal>> {
        Box::pin(self.open_datagram_inner(device, params))
    }

    fn request<'a>(
        &'a self,
        device: &'a str,
        body: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Bytes, Refusal>> {
        Box::pin(self.request_inner(device, body, timeout))
    }

    fn close(&self, channel: u64, code: ErrorCode, reason: &str) {
        self.close_channel(channel, code, reason.to_string());
    }

    fn closed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.conn.closed().await;
        })
    }

    fn stalled(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.stalled.clone()
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}

/// A connection with its task running. `events` is drained by the application; the handle is
/// for commands.
pub struct Link {
    pub handle: LinkHandle,
    pub events: mpsc::Receiver<LinkEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{reason} ({code})")]
    Refused { code: ErrorCode, reason: String },
    #[error("connection lost during the handshake: {0}")]
    Connection(String),
}

impl LinkError {
    pub fn code(&self) -> ErrorCode {
        match self {
            LinkError::Refused { code, .. } => *code,
            LinkError::Connection(_) => ErrorCode::Internal,
        }
    }
}

impl Link {
    /// Client side: opens the control stream, says Hello and waits for Welcome. Session
    /// notices before the Welcome (the exporter preparing the board) are logged.
    pub async fn client(
        conn: quinn::Connection,
        hello: Hello,
    ) -> Result<(Link, Welcome), LinkError> {
        Self::client_with(conn, hello, &mut |n| {
            tracing::info!("exporter: {}", jmp_protocol::name::escape(n))
        })
        .await
    }

    /// [`Link::client`], handing each notice before the Welcome to `on_notice` (a Hello with
    /// [`jmp_protocol::features::WAITS`] gets them while the exporter prepares the board).
    pub async fn client_with(
        conn: quinn::Connection,
        hello: Hello,
        on_notice: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(Link, Welcome), LinkError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| LinkError::Connection(e.to_string()))?;
        let session = Session::client(hello, Config::default(), Instant::now());
        let stalled = crate::liveness::watch(conn.clone());
        let mut link = Self::spawn(conn, session, send, recv, None);
        link.handle.stalled = Some(stalled);
        loop {
            match link.events.recv().await {
                Some(LinkEvent::Welcome(w)) => return Ok((link, w)),
                Some(LinkEvent::Notice(n)) => on_notice(&n),
                Some(LinkEvent::Ended { code, reason, .. }) => {
                    return Err(LinkError::Refused { code, reason })
                }
                Some(other) => {
                    return Err(LinkError::Connection(format!(
                        "unexpected {other:?} before Welcome"
                    )))
                }
                None => return Err(LinkError::Connection("the link task ended".into())),
            }
        }
    }

    /// Exporter side: accepts the control stream. The first event is `Hello` (or `Ended`).
    pub async fn exporter(conn: quinn::Connection) -> Result<Link, LinkError> {
        let accept = tokio::time::timeout(Config::default().handshake_timeout, conn.accept_bi());
        let (send, recv) = match accept.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(LinkError::Connection(e.to_string())),
            Err(_) => {
                conn.close(
                    quinn::VarInt::from_u64(ErrorCode::Protocol.to_wire())
                        .unwrap_or(quinn::VarInt::from_u32(1)),
                    b"no control stream",
                );
                return Err(LinkError::Connection(
                    "the client opened no control stream".into(),
                ));
            }
        };
        let (stream_tx, stream_rx) = mpsc::channel(STREAM_DEPTH);
        tokio::spawn(accept_streams(conn.clone(), stream_tx));
        let session = Session::exporter(Config::default(), Instant::now());
        Ok(Self::spawn(conn, session, send, recv, Some(stream_rx)))
    }

    fn spawn(
        conn: quinn::Connection,
        session: Session,
        ctl_send: quinn::SendStream,
        ctl_recv: quinn::RecvStream,
        streams: Option<mpsc::Receiver<(u64, quinn::SendStream, quinn::RecvStream)>>,
    ) -> Link {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_DEPTH);
        let dg_queued = Arc::new(AtomicUsize::new(0));
        let task = Task {
            conn: conn.clone(),
            session,
            ctl_send,
            ctl_recv,
            decoder: FrameDecoder::new(),
            events: ev_tx,
            cmds: cmd_rx,
            streams,
            held: HashMap::new(),
            opening: HashMap::new(),
            routes: HashMap::new(),
            dg_routes: HashMap::new(),
            requests: HashMap::new(),
            self_tx: cmd_tx.downgrade(),
            dg_queued: dg_queued.clone(),
            dg_dropped: 0,
        };
        tokio::spawn(task.run());
        Link {
            handle: LinkHandle {
                cmds: cmd_tx,
                conn,
                dg_queued,
                stalled: None,
            },
            events: ev_rx,
        }
    }
}

/// Exporter: accepts data streams and reads the channel id each starts with. One small task per
/// stream so a slow client cannot stall the accept loop.
async fn accept_streams(
    conn: quinn::Connection,
    out: mpsc::Sender<(u64, quinn::SendStream, quinn::RecvStream)>,
) {
    let timeout = Config::default().open_timeout;
    while let Ok((send, mut recv)) = conn.accept_bi().await {
        let out = out.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, read_header(&mut recv)).await {
                Ok(Some(channel)) => {
                    let _ = out.send((channel, send, recv)).await;
                }
                _ => {
                    debug!("dropping a stream without a valid channel header");
                    let _ = recv.stop(0u32.into());
                }
            }
        });
    }
}

async fn read_header(recv: &mut quinn::RecvStream) -> Option<u64> {
    let mut first = [0u8; 1];
    recv.read_exact(&mut first).await.ok()?;
    let len = 1usize << (first[0] >> 6);
    let mut buf = [0u8; 8];
    buf[0] = first[0];
    recv.read_exact(&mut buf[1..len]).await.ok()?;
    let mut s: &[u8] = &buf[..len];
    get_varint(&mut s, "channel header").ok()
}

struct PendingOpen {
    done: oneshot::Sender<Result<Bytes, Refusal>>,
    control: mpsc::Sender<ChannelMsg>,
    datagrams: Option<mpsc::Sender<Bytes>>,
}

struct Task {
    conn: quinn::Connection,
    session: Session,
    ctl_send: quinn::SendStream,
    ctl_recv: quinn::RecvStream,
    decoder: FrameDecoder,
    events: mpsc::Sender<LinkEvent>,
    cmds: mpsc::UnboundedReceiver<Command>,
    /// Exporter only: data streams with their channel id, as their headers are read.
    streams: Option<mpsc::Receiver<(u64, quinn::SendStream, quinn::RecvStream)>>,
    /// Exporter: streams the session told us to keep until it pairs them (or drops them).
    held: HashMap<u64, (quinn::SendStream, quinn::RecvStream)>,
    /// Client: opens waiting for Opened/Reject.
    opening: HashMap<u64, PendingOpen>,
    routes: HashMap<u64, mpsc::Sender<ChannelMsg>>,
    dg_routes: HashMap<u64, mpsc::Sender<Bytes>>,
    /// Client: requests waiting for their Done.
    requests: HashMap<u64, oneshot::Sender<Result<Bytes, Refusal>>>,
    self_tx: mpsc::WeakUnboundedSender<Command>,
    /// Datagram payload bytes queued for channels (shared with their pipes, which count
    /// down as they take them).
    dg_queued: Arc<AtomicUsize>,
    /// Datagrams dropped because the link's queues held [`DATAGRAM_BYTES`].
    dg_dropped: u64,
}

fn describe(e: &quinn::ConnectionError) -> (ErrorCode, String) {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => (
            ErrorCode::from_wire(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        quinn::ConnectionError::TimedOut => (
            ErrorCode::Internal,
            "connection lost: the peer stopped answering".into(),
        ),
        quinn::ConnectionError::Reset => (
            ErrorCode::Internal,
            "connection lost: the peer restarted".into(),
        ),
        other => (ErrorCode::Internal, format!("connection lost: {other}")),
    }
}

fn reset((mut send, mut recv): (quinn::SendStream, quinn::RecvStream)) {
    let _ = send.reset(0u32.into());
    let _ = recv.stop(0u32.into());
}

impl Task {
    async fn run(mut self) {
        // Once the control stream or datagrams fail, the connection is going away: wait for
        // `closed()` to learn why (and never poll a failed future again, it would spin).
        let mut buf_ended = false;
        let mut dg_open = true;
        loop {
            // Messages left undecoded while requests were backlogged, now that some may have
            // been answered.
            self.decode();
            if let Err(e) = self.flush().await {
                debug!("control stream write failed: {e}");
            }
            self.dispatch_events();
            if self.session.state() == State::Closed {
                // What dispatching just queued (a Bye for an overflow) still goes out.
                let _ = self.flush().await;
                break;
            }
            let timeout = self.session.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            let streams = async {
                match self.streams.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            // While the session takes no more requests, the control stream is not read: what
            // the client sends meanwhile waits in QUIC flow control, at its cost.
            let reading = !buf_ended && self.session.takes_requests();
            tokio::select! {
                biased;
                chunk = self.ctl_recv.read_chunk(16 * 1024, true), if reading => match chunk {
                    Ok(Some(c)) => {
                        self.decoder.feed(&c.bytes);
                        self.decode();
                    }
                    Ok(None) | Err(_) => buf_ended = true,
                },
                cmd = self.cmds.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => self.session.bye(ErrorCode::Ok, "closed"),
                },
                s = streams => match s {
                    Some((channel, send, recv)) => {
                        match self.session.handle_stream(channel, Instant::now()) {
                            StreamVerdict::Keep => {
                                if let Some(old) = self.held.insert(channel, (send, recv)) {
                                    reset(old);
                                }
                            }
                            StreamVerdict::Refuse => reset((send, recv)),
                        }
                    }
                    // The accept loop ended (the connection is going): never poll it again,
                    // it would be ready forever and starve `closed()` below.
                    None => self.streams = None,
                },
                d = self.conn.read_datagram(), if dg_open => match d {
                    Ok(d) => self.datagram(d),
                    Err(_) => {
                        dg_open = false;
                        buf_ended = true;
                    }
                },
                _ = sleep => self.session.handle_timeout(Instant::now()),
                e = self.conn.closed(), if buf_ended => {
                    let (code, reason) = describe(&e);
                    self.session.handle_message(Message::Bye(Bye { code, reason }), Instant::now());
                }
            }
        }
        self.finish();
    }

    /// Hands the session the control messages received so far, stopping while it takes no
    /// more requests (the rest stay in the decoder until it does).
    fn decode(&mut self) {
        while self.session.takes_requests() && self.session.state() != State::Closed {
            match self.decoder.next_message::<Message>() {
                Ok(Some(m)) => self.session.handle_message(m, Instant::now()),
                Ok(None) => break,
                Err(e) => {
                    warn!(peer = %self.conn.remote_address(), "malformed control frame: {e}");
                    self.session
                        .bye(ErrorCode::Protocol, format!("malformed control frame: {e}"));
                    break;
                }
            }
        }
    }

    /// Writes everything the session queued. A Bye also closes the connection with the same code
    /// and reason, so the peer learns why even if the stream data is lost with the close.
    async fn flush(&mut self) -> Result<(), quinn::WriteError> {
        while let Some(m) = self.session.poll_transmit() {
            let frame = m.to_frame();
            let res = self.ctl_send.write_chunk(frame).await;
            if let Message::Bye(b) = &m {
                let code = quinn::VarInt::from_u64(b.code.to_wire()).unwrap_or(quinn::VarInt::MAX);
                let reason: Vec<u8> = b.reason.bytes().take(512).collect();
                self.conn.close(code, &reason);
            }
            res?;
        }
        Ok(())
    }

    fn dispatch_events(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::Hello(h) => self.emit(LinkEvent::Hello(h)),
                Event::Welcome(w) => self.emit(LinkEvent::Welcome(w)),
                Event::Incoming(open) => self.incoming(open),
                Event::DropStream(channel) => {
                    if let Some(s) = self.held.remove(&channel) {
                        reset(s);
                    }
                }
                Event::Opened { channel, params } => {
                    if let Some(p) = self.opening.remove(&channel) {
                        self.routes.insert(channel, p.control);
                        if let Some(d) = p.datagrams {
                            self.dg_routes.insert(channel, d);
                        }
                        let _ = p.done.send(Ok(params));
                    }
                }
                Event::Rejected {
                    channel,
                    code,
                    reason,
                } => {
                    if let Some(p) = self.opening.remove(&channel) {
                        let _ = p.done.send(Err(Refusal { code, reason }));
                    }
                }
                Event::Control { channel, body } => {
                    self.route(channel, ChannelMsg::Control(body));
                }
                Event::Notice(n) if n.channel == 0 => self.emit(LinkEvent::Notice(n.text)),
                Event::Notice(n) => self.route(n.channel, ChannelMsg::Notice(n.text)),
                Event::Closed {
                    channel,
                    code,
                    reason,
                } => {
                    self.routes.remove(&channel);
                    self.dg_routes.remove(&channel);
                    self.emit(LinkEvent::Closed {
                        channel,
                        code,
                        reason,
                    });
                }
                Event::Request(r) => {
                    if let Some(link) = self.handle() {
                        self.emit(LinkEvent::Request(IncomingRequest::quic(r, link)));
                    }
                }
                Event::Done(d) => {
                    if let Some(tx) = self.requests.remove(&d.id) {
                        let r = if d.code == ErrorCode::Ok {
                            Ok(d.body)
                        } else {
                            Err(Refusal {
                                code: d.code,
                                reason: d.reason,
                            })
                        };
                        let _ = tx.send(r);
                    }
                }
                Event::Status(s) => self.emit(LinkEvent::Status(s)),
                Event::Guests(g) => self.emit(LinkEvent::Guests(g)),
                Event::Ended {
                    code,
                    reason,
                    by_peer,
                } => {
                    // The session has answered every open and request it knew of; anything
                    // not yet handed to it fails the same way.
                    for (_, p) in self.opening.drain() {
                        let _ = p.done.send(Err(Refusal::new(code, reason.clone())));
                    }
                    for (_, tx) in self.requests.drain() {
                        let _ = tx.send(Err(Refusal::new(code, reason.clone())));
                    }
                    for (_, s) in self.held.drain() {
                        reset(s);
                    }
                    self.emit(LinkEvent::Ended {
                        code,
                        reason,
                        by_peer,
                    });
                }
            }
        }
    }

    /// Delivers an event; a full queue means the application stopped reading: the session
    /// ends rather than buffer without bound.
    fn emit(&mut self, ev: LinkEvent) {
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                if !matches!(ev, LinkEvent::Ended { .. }) {
                    warn!("link events are not being read; ending the session");
                    self.session.bye(
                        ErrorCode::Internal,
                        "the other side stopped reading its events",
                    );
                }
            }
        }
    }

    fn route(&mut self, channel: u64, msg: ChannelMsg) {
        let Some(r) = self.routes.get(&channel) else {
            return;
        };
        match r.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.routes.remove(&channel);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(channel, "a channel's control messages are not being read");
                self.session.bye(
                    ErrorCode::Internal,
                    format!(
                        "channel {channel}: more than {CONTROL_DEPTH} control messages waiting; the device is not keeping up"
                    ),
                );
            }
        }
    }

    /// A handle for an `Incoming` to answer through. Weak inside the task, so that the task
    /// notices when the application has dropped every handle.
    fn handle(&self) -> Option<LinkHandle> {
        Some(LinkHandle {
            cmds: self.self_tx.upgrade()?,
            conn: self.conn.clone(),
            dg_queued: self.dg_queued.clone(),
            stalled: None,
        })
    }

    fn incoming(&mut self, open: Open) {
        let stream = match open.mode {
            ChannelMode::Stream => match self.held.remove(&open.channel) {
                Some(s) => Some(s),
                None => {
                    // The session pairs only streams it told us to keep.
                    self.session.reject(
                        open.channel,
                        ErrorCode::Internal,
                        "the channel's stream was lost",
                    );
                    return;
                }
            },
            ChannelMode::Datagram => None,
        };
        if let Some(link) = self.handle() {
            self.emit(LinkEvent::Incoming(Incoming::quic(open, stream, link)));
        }
    }

    fn datagram(&mut self, d: Bytes) {
        let mut s: &[u8] = &d;
        let Ok(channel) = get_varint(&mut s, "datagram channel") else {
            return;
        };
        let Some(route) = self.dg_routes.get(&channel) else {
            return;
        };
        let n = s.len();
        if self.dg_queued.load(Ordering::Relaxed) + n > DATAGRAM_BYTES {
            self.dg_dropped += 1;
            if self.dg_dropped.is_power_of_two() {
                warn!(
                    peer = %self.conn.remote_address(),
                    "datagrams are not being taken: {DATAGRAM_BYTES} bytes queued; dropped {} so far",
                    self.dg_dropped
                );
            }
            return;
        }
        // Full queue: drop, as a congested bus would. Never block the connection's task.
        self.dg_queued.fetch_add(n, Ordering::Relaxed);
        if route.try_send(Bytes::copy_from_slice(s)).is_err() {
            self.dg_queued.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn command(&mut self, c: Command) {
        let now = Instant::now();
        match c {
            Command::Open {
                device,
                mode,
                params,
                id,
                done,
                control,
                datagrams,
            } => {
                let channel = self.session.open(&device, mode, params, now);
                let _ = id.send(channel);
                match channel {
                    Some(channel) => {
                        self.opening.insert(
                            channel,
                            PendingOpen {
                                done,
                                control,
                                datagrams,
                            },
                        );
                    }
                    None => {
                        let _ = done.send(Err(gone()));
                    }
                }
            }
            Command::Accept {
                channel,
                params,
                control,
                datagrams,
            } => {
                self.routes.insert(channel, control);
                if let Some(d) = datagrams {
                    self.dg_routes.insert(channel, d);
                }
                self.session.opened(channel, params);
            }
            Command::Reject {
                channel,
                code,
                reason,
            } => self.session.reject(channel, code, reason),
            Command::ChannelMsg { channel, msg } => match msg {
                ChannelMsg::Control(body) => {
                    self.session.control(channel, body);
                }
                ChannelMsg::Notice(text) => {
                    self.session.notice(channel, text);
                }
            },
            Command::Close {
                channel,
                code,
                reason,
            } => {
                self.routes.remove(&channel);
                self.dg_routes.remove(&channel);
                self.session.close(channel, code, reason);
            }
            Command::Request {
                device,
                body,
                deadline,
                done,
            } => match self.session.request(&device, body, Some(deadline)) {
                Some(id) => {
                    self.requests.insert(id, done);
                }
                None => {
                    let _ = done.send(Err(gone()));
                }
            },
            Command::Done { id, result } => match result {
                Ok(body) => self.session.done(id, ErrorCode::Ok, "", body),
                Err(r) => self.session.done(id, r.code, r.reason, Bytes::new()),
            },
            Command::Notice(text) => {
                self.session.notice(0, text);
            }
            Command::Status(s) => self.session.status(s),
            Command::Guests(g) => self.session.guests(g),
            Command::Welcome(w) => self.session.welcome(w),
            Command::Bye { code, reason } => self.session.bye(code, reason),
        }
    }

    /// After the session ended: make sure the connection is closed (a Bye from us already closed
    /// it with its code; a Bye from the peer is answered by closing with code 0).
    fn finish(&mut self) {
        self.routes.clear();
        self.dg_routes.clear();
        self.conn.close(0u32.into(), b"");
    }
}
