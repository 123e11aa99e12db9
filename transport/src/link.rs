//! The Link: one task owns one QUIC connection and its protocol [`Session`]; everyone else talks
//! to it through a cloneable [`LinkHandle`] (commands) and receives [`LinkEvent`]s.
//!
//! The task reads control frames, feeds the session, writes what the session wants sent, pairs
//! an exporter's incoming streams with their `Open`, routes each channel's `Control` messages to
//! the [`Pipe`] that owns the channel, and routes datagrams by channel id. Payload never passes
//! through this task: stream channels are read and written directly by their holders.

use crate::pipe::{ControlTx, DatagramPipe, Pipe, PipeRx, PipeTx};
use bytes::Bytes;
use jmp_protocol::codec::get_varint;
use jmp_protocol::session::{Config, Event, Session, State};
use jmp_protocol::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// A stream that names a channel no `Open` announced is dropped after this long.
const ORPHAN_STREAM_TIMEOUT: Duration = Duration::from_secs(15);
/// Datagrams queued per channel before new ones are dropped (a busy bus drops frames too).
const DATAGRAM_DEPTH: usize = 1024;

#[derive(Debug)]
pub enum LinkEvent {
    /// Client: the exporter accepted us (consumed by [`Link::client`]).
    Welcome(Welcome),
    /// Exporter: the client said Hello. Answer with [`LinkHandle::welcome`] or
    /// [`LinkHandle::bye`].
    Hello(Hello),
    /// Exporter: a channel request, with its stream when it is a stream channel.
    Incoming(Incoming),
    /// A session-level control message (channel 0). Per-channel ones go to the channel's Pipe.
    Control(ControlBody),
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code})")]
pub struct OpenError {
    pub code: ErrorCode,
    pub reason: String,
}

enum Command {
    Open {
        device: String,
        mode: ChannelMode,
        resume_from: Option<u64>,
        id: oneshot::Sender<Option<u64>>,
        done: oneshot::Sender<Result<u64, OpenError>>,
        control: mpsc::UnboundedSender<ControlBody>,
        datagrams: Option<mpsc::Sender<Bytes>>,
    },
    Accept {
        channel: u64,
        offset: u64,
        control: mpsc::UnboundedSender<ControlBody>,
        datagrams: Option<mpsc::Sender<Bytes>>,
    },
    Reject {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    Control {
        channel: u64,
        body: ControlBody,
    },
    Close {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    Welcome(Welcome),
    Bye {
        code: ErrorCode,
        reason: String,
    },
}

/// Commands to a Link's task. Cheap to clone; the task ends when the session ends, after which
/// commands are ignored.
#[derive(Clone)]
pub struct LinkHandle {
    cmds: mpsc::UnboundedSender<Command>,
    conn: quinn::Connection,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkHandle({})", self.conn.remote_address())
    }
}

fn gone() -> OpenError {
    OpenError {
        code: ErrorCode::Internal,
        reason: "the connection is closed".into(),
    }
}

impl LinkHandle {
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Client: asks the task for a channel id and queues the Open. Returns the id and where
    /// the answer (the device offset, or the refusal) will arrive.
    async fn request_open(
        &self,
        device: &str,
        mode: ChannelMode,
        resume_from: Option<u64>,
        control: mpsc::UnboundedSender<ControlBody>,
        datagrams: Option<mpsc::Sender<Bytes>>,
    ) -> Result<(u64, oneshot::Receiver<Result<u64, OpenError>>), OpenError> {
        let (id_tx, id_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        self.cmds
            .send(Command::Open {
                device: device.to_string(),
                mode,
                resume_from,
                id: id_tx,
                done: done_tx,
                control,
                datagrams,
            })
            .map_err(|_| gone())?;
        let channel = id_rx.await.map_err(|_| gone())?.ok_or_else(gone)?;
        Ok((channel, done_rx))
    }

    /// Client: opens a stream channel on `device`. Returns the pipe and the device offset its
    /// first byte has (serial resume; 0 otherwise).
    pub async fn open_stream(
        &self,
        device: &str,
        resume_from: Option<u64>,
    ) -> Result<(Pipe, u64), OpenError> {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (channel, done_rx) = self
            .request_open(device, ChannelMode::Stream, resume_from, ctl_tx, None)
            .await?;
        // The stream goes out at once, before the answer: the exporter pairs it by id, and a
        // TCP forward's first bytes are not held back by a round trip.
        let opened = async {
            let (mut send, recv) = self.conn.open_bi().await.map_err(|e| OpenError {
                code: ErrorCode::Internal,
                reason: format!("cannot open a stream: {e}"),
            })?;
            let header = channel_header(channel).freeze();
            send.write_chunk(header).await.map_err(|e| OpenError {
                code: ErrorCode::Internal,
                reason: format!("cannot open a stream: {e}"),
            })?;
            Ok::<_, OpenError>((send, recv))
        };
        let (send, recv) = match opened.await {
            Ok(s) => s,
            Err(e) => {
                self.close(channel, ErrorCode::Internal, e.reason.clone());
                return Err(e);
            }
        };
        let offset = done_rx.await.map_err(|_| gone())??;
        Ok((
            Pipe {
                channel,
                tx: PipeTx::quic(send),
                rx: PipeRx::quic(recv),
                control_rx: ctl_rx,
                control_tx: ControlTx::Link(self.clone(), channel),
            },
            offset,
        ))
    }

    /// Client: opens a datagram channel on `device`.
    pub async fn open_datagram(&self, device: &str) -> Result<DatagramPipe, OpenError> {
        let (ctl_tx, _ctl_rx) = mpsc::unbounded_channel();
        let (dg_tx, dg_rx) = mpsc::channel(DATAGRAM_DEPTH);
        let (channel, done_rx) = self
            .request_open(device, ChannelMode::Datagram, None, ctl_tx, Some(dg_tx))
            .await?;
        done_rx.await.map_err(|_| gone())??;
        Ok(DatagramPipe::quic(channel, self.conn.clone(), dg_rx))
    }

    /// Sends a control message for an open channel (0: the session). False if the link is gone.
    pub fn control(&self, channel: u64, body: ControlBody) -> bool {
        self.cmds.send(Command::Control { channel, body }).is_ok()
    }

    pub fn close(&self, channel: u64, code: ErrorCode, reason: impl Into<String>) {
        let _ = self.cmds.send(Command::Close {
            channel,
            code,
            reason: reason.into(),
        });
    }

    /// Exporter: accept the client's Hello.
    pub fn welcome(&self, welcome: Welcome) {
        let _ = self.cmds.send(Command::Welcome(welcome));
    }

    /// End the session, telling the peer why (the connection closes with this code and reason).
    pub fn bye(&self, code: ErrorCode, reason: impl Into<String>) {
        let _ = self.cmds.send(Command::Bye {
            code,
            reason: reason.into(),
        });
    }
}

/// An exporter's pending channel. Accept or reject it; dropping it rejects it.
pub struct Incoming {
    pub open: Open,
    stream: Option<(quinn::SendStream, quinn::RecvStream)>,
    /// `None` once answered (or if the application already dropped the link).
    link: Option<LinkHandle>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("open", &self.open)
            .finish()
    }
}

impl Incoming {
    /// Accepts a stream channel; `offset` is the device offset of the first byte sent (serial).
    /// `None` if this is a datagram channel.
    pub fn accept_stream(mut self, offset: u64) -> Option<Pipe> {
        let (send, recv) = self.stream.take()?;
        let link = self.link.take()?;
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let channel = self.open.channel;
        let _ = link.cmds.send(Command::Accept {
            channel,
            offset,
            control: ctl_tx,
            datagrams: None,
        });
        Some(Pipe {
            channel,
            tx: PipeTx::quic(send),
            rx: PipeRx::quic(recv),
            control_rx: ctl_rx,
            control_tx: ControlTx::Link(link, channel),
        })
    }

    /// Accepts a datagram channel. `None` if this is a stream channel.
    pub fn accept_datagram(mut self) -> Option<DatagramPipe> {
        if self.open.mode != ChannelMode::Datagram {
            return None;
        }
        let link = self.link.take()?;
        let (ctl_tx, _ctl_rx) = mpsc::unbounded_channel();
        let (dg_tx, dg_rx) = mpsc::channel(DATAGRAM_DEPTH);
        let _ = link.cmds.send(Command::Accept {
            channel: self.open.channel,
            offset: 0,
            control: ctl_tx,
            datagrams: Some(dg_tx),
        });
        Some(DatagramPipe::quic(
            self.open.channel,
            link.conn.clone(),
            dg_rx,
        ))
    }

    pub fn reject(mut self, code: ErrorCode, reason: impl Into<String>) {
        self.reject_inner(code, reason.into());
    }

    fn reject_inner(&mut self, code: ErrorCode, reason: String) {
        if let Some((mut send, mut recv)) = self.stream.take() {
            let _ = send.reset(quinn::VarInt::from_u32(code.to_wire() as u32));
            let _ = recv.stop(quinn::VarInt::from_u32(code.to_wire() as u32));
        }
        if let Some(link) = self.link.take() {
            let _ = link.cmds.send(Command::Reject {
                channel: self.open.channel,
                code,
                reason,
            });
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.link.is_some() {
            self.reject_inner(
                ErrorCode::Internal,
                "the exporter dropped the request".into(),
            );
        }
    }
}

/// A connection with its task running. `events` is drained by the application; the handle is
/// for commands.
pub struct Link {
    pub handle: LinkHandle,
    pub events: mpsc::UnboundedReceiver<LinkEvent>,
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
    /// Client side: opens the control stream, says Hello and waits for Welcome.
    pub async fn client(
        conn: quinn::Connection,
        hello: Hello,
    ) -> Result<(Link, Welcome), LinkError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| LinkError::Connection(e.to_string()))?;
        let session = Session::client(hello, Config::default(), Instant::now());
        let mut link = Self::spawn(conn, session, send, recv, None);
        match link.events.recv().await {
            Some(LinkEvent::Welcome(w)) => Ok((link, w)),
            Some(LinkEvent::Ended { code, reason, .. }) => Err(LinkError::Refused { code, reason }),
            Some(other) => Err(LinkError::Connection(format!(
                "unexpected {other:?} before Welcome"
            ))),
            None => Err(LinkError::Connection("the link task ended".into())),
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
                    ErrorCode::Protocol
                        .to_wire()
                        .try_into()
                        .unwrap_or(quinn::VarInt::from_u32(1)),
                    b"no control stream",
                );
                return Err(LinkError::Connection(
                    "the client opened no control stream".into(),
                ));
            }
        };
        let (stream_tx, stream_rx) = mpsc::channel(64);
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
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let task = Task {
            conn: conn.clone(),
            session,
            ctl_send,
            ctl_recv,
            decoder: FrameDecoder::new(),
            events: ev_tx,
            cmds: cmd_rx,
            streams,
            opening: HashMap::new(),
            requested: HashMap::new(),
            orphans: HashMap::new(),
            routes: HashMap::new(),
            dg_routes: HashMap::new(),
            self_tx: cmd_tx.downgrade(),
        };
        tokio::spawn(task.run());
        Link {
            handle: LinkHandle { cmds: cmd_tx, conn },
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
    while let Ok((send, mut recv)) = conn.accept_bi().await {
        let out = out.clone();
        tokio::spawn(async move {
            let header = tokio::time::timeout(ORPHAN_STREAM_TIMEOUT, read_header(&mut recv)).await;
            match header {
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
    done: oneshot::Sender<Result<u64, OpenError>>,
    control: mpsc::UnboundedSender<ControlBody>,
    datagrams: Option<mpsc::Sender<Bytes>>,
}

struct Task {
    conn: quinn::Connection,
    session: Session,
    ctl_send: quinn::SendStream,
    ctl_recv: quinn::RecvStream,
    decoder: FrameDecoder,
    events: mpsc::UnboundedSender<LinkEvent>,
    cmds: mpsc::UnboundedReceiver<Command>,
    /// Exporter only: data streams with their channel id.
    streams: Option<mpsc::Receiver<(u64, quinn::SendStream, quinn::RecvStream)>>,
    /// Client: opens waiting for Opened/Reject.
    opening: HashMap<u64, PendingOpen>,
    /// Exporter: stream Opens waiting for their stream.
    requested: HashMap<u64, Open>,
    /// Exporter: streams waiting for their Open (the two race).
    orphans: HashMap<u64, (quinn::SendStream, quinn::RecvStream, Instant)>,
    routes: HashMap<u64, mpsc::UnboundedSender<ControlBody>>,
    dg_routes: HashMap<u64, mpsc::Sender<Bytes>>,
    self_tx: mpsc::WeakUnboundedSender<Command>,
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

impl Task {
    async fn run(mut self) {
        // Once the control stream or datagrams fail, the connection is going away: wait for
        // `closed()` to learn why (and never poll a failed future again, it would spin).
        let mut buf_ended = false;
        let mut dg_open = true;
        loop {
            if let Err(e) = self.flush().await {
                debug!("control stream write failed: {e}");
            }
            self.dispatch_events();
            if self.session.state() == State::Closed {
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
            tokio::select! {
                biased;
                chunk = self.ctl_recv.read_chunk(16 * 1024, true), if !buf_ended => match chunk {
                    Ok(Some(c)) => {
                        self.decoder.feed(&c.bytes);
                        loop {
                            match self.decoder.next_message::<Message>() {
                                Ok(Some(m)) => self.session.handle_message(m, Instant::now()),
                                Ok(None) => break,
                                Err(e) => {
                                    warn!(peer = %self.conn.remote_address(), "malformed control frame: {e}");
                                    self.session.bye(ErrorCode::Protocol, format!("malformed control frame: {e}"));
                                    break;
                                }
                            }
                        }
                    }
                    Ok(None) => {
                        buf_ended = true;
                    }
                    Err(_) => {
                        buf_ended = true;
                    }
                },
                cmd = self.cmds.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => self.session.bye(ErrorCode::Ok, "closed"),
                },
                s = streams => match s {
                    Some((channel, send, recv)) => self.stream_arrived(channel, send, recv),
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
            self.expire_orphans();
        }
        self.finish().await;
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
                Event::OpenRequested(open) => self.open_requested(open),
                Event::Opened { channel, offset } => {
                    if let Some(p) = self.opening.remove(&channel) {
                        self.routes.insert(channel, p.control);
                        if let Some(d) = p.datagrams {
                            self.dg_routes.insert(channel, d);
                        }
                        let _ = p.done.send(Ok(offset));
                    }
                }
                Event::Rejected {
                    channel,
                    code,
                    reason,
                } => {
                    if let Some(p) = self.opening.remove(&channel) {
                        let _ = p.done.send(Err(OpenError { code, reason }));
                    }
                }
                Event::Control { channel: 0, body } => self.emit(LinkEvent::Control(body)),
                Event::Control { channel, body } => {
                    if let Some(r) = self.routes.get(&channel) {
                        let _ = r.send(body);
                    }
                }
                Event::Closed {
                    channel,
                    code,
                    reason,
                } => {
                    self.routes.remove(&channel);
                    self.dg_routes.remove(&channel);
                    self.requested.remove(&channel);
                    self.emit(LinkEvent::Closed {
                        channel,
                        code,
                        reason,
                    });
                }
                Event::Ended {
                    code,
                    reason,
                    by_peer,
                } => {
                    for (_, p) in self.opening.drain() {
                        let _ = p.done.send(Err(OpenError {
                            code,
                            reason: reason.clone(),
                        }));
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

    fn emit(&self, ev: LinkEvent) {
        let _ = self.events.send(ev);
    }

    /// A handle for an `Incoming` to answer through. Weak inside the task, so that the task
    /// notices when the application has dropped every handle.
    fn handle(&self) -> Option<LinkHandle> {
        Some(LinkHandle {
            cmds: self.self_tx.upgrade()?,
            conn: self.conn.clone(),
        })
    }

    fn open_requested(&mut self, open: Open) {
        match open.mode {
            ChannelMode::Datagram => {
                let link = self.handle();
                self.emit(LinkEvent::Incoming(Incoming {
                    open,
                    stream: None,
                    link,
                }));
            }
            ChannelMode::Stream => {
                if let Some((send, recv, _)) = self.orphans.remove(&open.channel) {
                    let link = self.handle();
                    self.emit(LinkEvent::Incoming(Incoming {
                        open,
                        stream: Some((send, recv)),
                        link,
                    }));
                } else {
                    self.requested.insert(open.channel, open);
                }
            }
        }
    }

    fn stream_arrived(
        &mut self,
        channel: u64,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        if let Some(open) = self.requested.remove(&channel) {
            let link = self.handle();
            self.emit(LinkEvent::Incoming(Incoming {
                open,
                stream: Some((send, recv)),
                link,
            }));
        } else if self.orphans.len() < 256 && !self.orphans.contains_key(&channel) {
            self.orphans.insert(channel, (send, recv, Instant::now()));
        } else {
            let _ = send.reset(0u32.into());
            let _ = recv.stop(0u32.into());
        }
    }

    fn datagram(&mut self, d: Bytes) {
        let mut s: &[u8] = &d;
        let Ok(channel) = get_varint(&mut s, "datagram channel") else {
            return;
        };
        let header = d.len() - s.len();
        if let Some(route) = self.dg_routes.get(&channel) {
            // Full queue: drop, as a congested bus would. Never block the connection's task.
            let _ = route.try_send(d.slice(header..));
        }
    }

    fn command(&mut self, c: Command) {
        let now = Instant::now();
        match c {
            Command::Open {
                device,
                mode,
                resume_from,
                id,
                done,
                control,
                datagrams,
            } => {
                let channel = self.session.open(&device, mode, resume_from, now);
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
                offset,
                control,
                datagrams,
            } => {
                self.routes.insert(channel, control);
                if let Some(d) = datagrams {
                    self.dg_routes.insert(channel, d);
                }
                self.session.opened(channel, offset);
            }
            Command::Reject {
                channel,
                code,
                reason,
            } => self.session.reject(channel, code, reason),
            Command::Control { channel, body } => {
                self.session.control(channel, body);
            }
            Command::Close {
                channel,
                code,
                reason,
            } => {
                self.routes.remove(&channel);
                self.dg_routes.remove(&channel);
                self.session.close(channel, code, reason);
            }
            Command::Welcome(w) => self.session.welcome(w),
            Command::Bye { code, reason } => self.session.bye(code, reason),
        }
    }

    fn expire_orphans(&mut self) {
        if self.orphans.is_empty() {
            return;
        }
        let now = Instant::now();
        self.orphans.retain(|_, (send, recv, since)| {
            let keep = now.duration_since(*since) < ORPHAN_STREAM_TIMEOUT;
            if !keep {
                let _ = send.reset(0u32.into());
                let _ = recv.stop(0u32.into());
            }
            keep
        });
    }

    /// After the session ended: make sure the connection is closed (a Bye from us already closed
    /// it with its code; a Bye from the peer is answered by closing with code 0).
    async fn finish(&mut self) {
        self.routes.clear();
        self.dg_routes.clear();
        self.conn.close(0u32.into(), b"");
    }
}
