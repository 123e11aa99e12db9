//! The client half of storage channels: requests are submitted from anywhere (the FUSE
//! thread, a flash task) with a completion, sent in order on the current channel, and
//! completed as their answers arrive, in whatever order the exporter finishes them.
//!
//! A [`Client`] outlives channels. [`Client::serve`] runs it on one channel until that ends;
//! what was in flight then is either sent again on the next channel ([`Retry::Resend`]: the
//! mount, whose reads and writes are idempotent) or failed ([`Retry::Fail`]: a flash, which
//! reports exactly what was acknowledged). Requests that wait longer than the client's
//! patience without a channel fail with EIO ([`Client::expire`]).

use super::medium::Failure;
use bytes::{Bytes, BytesMut};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::storage::{
    frame, DeviceParams, FrameReader, Op, Request, Response, StorageError,
};
use jmp_transport::{BoxFuture, PipeRx, PipeTx};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify};

/// Requests on the wire at once per channel: enough to keep a link busy with 1 MiB reads and
/// to serve QD16 random I/O from several programs; the exporter runs 32 at a time.
pub const MAX_IN_FLIGHT: usize = 64;

/// What a completed request gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done,
    /// A read's data, contiguous.
    Data(Bytes),
    Hash([u8; 32]),
}

/// Called once with a request's outcome (on the channel's task: keep it short).
pub type Completion = Box<dyn FnOnce(Result<Reply, Failure>) + Send>;

/// What happens to requests in flight when a channel ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Resend,
    Fail,
}

struct Pending {
    op: Op,
    payload: Option<Bytes>,
    done: Completion,
    since: Instant,
}

#[derive(Default)]
struct State {
    /// Not yet sent on the current channel, in submission order.
    waiting: VecDeque<(u64, Pending)>,
    in_flight: HashMap<u64, Pending>,
    /// No more channels: new requests fail at once.
    closed: Option<Failure>,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
    /// A request finished (room in flight).
    room: Notify,
    next: AtomicU64,
    params: watch::Sender<Option<DeviceParams>>,
    /// The exporter instance the parameters come from (0: not said). Written only while the
    /// `params` watch is locked for writing ([`Client::set_origin`]), so whoever reads it
    /// while holding a borrow of that watch sees the pair as it was set.
    instance: AtomicU64,
    retry: Retry,
    device: String,
}

/// Cheap to clone; every clone submits to the same queue.
#[derive(Clone)]
pub struct Client(Arc<Inner>);

/// Sends chunks on a channel (a QUIC stream, a pipe, a relayed Unix socket).
pub trait ChunkTx: Send {
    fn send(&mut self, b: Bytes) -> BoxFuture<'_, io::Result<()>>;
}

/// Receives chunks of a channel; `None` at its end.
pub trait ChunkRx: Send {
    fn recv(&mut self) -> BoxFuture<'_, io::Result<Option<Bytes>>>;
}

impl ChunkTx for PipeTx {
    fn send(&mut self, b: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { PipeTx::send(self, b).await.map_err(io::Error::other) })
    }
}

impl ChunkRx for PipeRx {
    fn recv(&mut self) -> BoxFuture<'_, io::Result<Option<Bytes>>> {
        Box::pin(async move { PipeRx::recv(self).await.map_err(io::Error::other) })
    }
}

/// A channel relayed over a byte stream (the attachment's control socket).
pub struct StreamTx<W>(pub W);
pub struct StreamRx<R>(pub R);

impl<W: tokio::io::AsyncWrite + Unpin + Send> ChunkTx for StreamTx<W> {
    fn send(&mut self, b: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.write_all(&b).await })
    }
}

impl<R: tokio::io::AsyncRead + Unpin + Send> ChunkRx for StreamRx<R> {
    fn recv(&mut self) -> BoxFuture<'_, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            let mut b = BytesMut::with_capacity(256 << 10);
            match self.0.read_buf(&mut b).await? {
                0 => Ok(None),
                _ => Ok(Some(b.freeze())),
            }
        })
    }
}

fn lost(device: &str, why: &str) -> Failure {
    Failure::new(
        StorageError::Io,
        format!("{device}: the link to the exporter is lost: {why}"),
    )
}

impl Client {
    pub fn new(device: &str, retry: Retry) -> Client {
        Client(Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            room: Notify::new(),
            next: AtomicU64::new(1),
            params: watch::Sender::new(None),
            instance: AtomicU64::new(0),
            retry,
            device: device.to_string(),
        }))
    }

    pub fn device(&self) -> &str {
        &self.0.device
    }

    /// The device's parameters as last heard (`None` before the first channel).
    pub fn params(&self) -> Option<DeviceParams> {
        *self.0.params.borrow()
    }

    /// Parameter changes (the board's power, the generation).
    pub fn watch_params(&self) -> watch::Receiver<Option<DeviceParams>> {
        self.0.params.subscribe()
    }

    /// A new channel's parameters, from exporter `instance`. Always a change for watchers
    /// (even with the same parameters): a mount checks its cache on every new channel.
    pub fn set_origin(&self, instance: u64, p: DeviceParams) {
        self.0.params.send_modify(|cur| {
            self.0.instance.store(instance, Ordering::Relaxed);
            *cur = Some(p);
        });
    }

    /// The exporter instance of the parameters (see [`Client::set_origin`]); read it while
    /// holding a borrow of [`Client::watch_params`] to get the pair.
    pub fn instance(&self) -> u64 {
        self.0.instance.load(Ordering::Relaxed)
    }

    pub fn set_params(&self, p: DeviceParams) {
        self.0.params.send_if_modified(|cur| {
            let changed = *cur != Some(p);
            *cur = Some(p);
            changed
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request; `done` is called once with its outcome. `payload` is a write's data.
    pub fn submit(&self, op: Op, payload: Option<Bytes>, done: Completion) {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(f) = &st.closed {
            let f = f.clone();
            drop(st);
            done(Err(f));
            return;
        }
        st.waiting.push_back((
            id,
            Pending {
                op,
                payload,
                done,
                since: Instant::now(),
            },
        ));
        drop(st);
        self.0.wake.notify_one();
    }

    /// Submits and waits for the outcome.
    pub async fn call(&self, op: Op, payload: Option<Bytes>) -> Result<Reply, Failure> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            op,
            payload,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await
            .unwrap_or_else(|_| Err(lost(&self.0.device, "the request was dropped")))
    }

    /// Requests submitted and not yet answered.
    pub fn outstanding(&self) -> usize {
        let st = self.lock();
        st.waiting.len() + st.in_flight.len()
    }

    /// Waits until fewer than `n` requests are outstanding (a producer's backpressure).
    pub async fn wait_below(&self, n: usize) {
        loop {
            let room = self.0.room.notified();
            if self.outstanding() < n {
                return;
            }
            room.await;
        }
    }

    /// Fails every waiting request older than `patience` (no channel came back in time).
    pub fn expire(&self, patience: Duration) {
        let now = Instant::now();
        let mut st = self.lock();
        let mut expired = Vec::new();
        let mut keep = VecDeque::new();
        while let Some((id, p)) = st.waiting.pop_front() {
            if now.duration_since(p.since) > patience {
                expired.push(p);
            } else {
                keep.push_back((id, p));
            }
        }
        st.waiting = keep;
        drop(st);
        for p in expired {
            (p.done)(Err(lost(&self.0.device, "no connection to the exporter")));
        }
        self.0.room.notify_waiters();
    }

    /// No more channels: everything outstanding, and anything submitted later, fails with
    /// `why`.
    pub fn close(&self, why: Failure) {
        let mut st = self.lock();
        st.closed = Some(why.clone());
        let mut all: Vec<Pending> = st.waiting.drain(..).map(|(_, p)| p).collect();
        all.extend(st.in_flight.drain().map(|(_, p)| p));
        drop(st);
        for p in all {
            (p.done)(Err(why.clone()));
        }
        self.0.room.notify_waiters();
    }

    /// Runs the client on one channel until it ends (or the future is dropped); then what was
    /// in flight is resent later or failed, as the client's [`Retry`] says.
    pub async fn serve(&self, mut tx: impl ChunkTx, mut rx: impl ChunkRx) -> io::Result<()> {
        let _guard = Requeue(self);
        let send = async {
            loop {
                let wake = self.0.wake.notified();
                let next = {
                    let mut st = self.lock();
                    if st.in_flight.len() >= MAX_IN_FLIGHT {
                        None
                    } else {
                        st.waiting.pop_front().map(|(id, p)| {
                            let req = Request { id, op: p.op };
                            let payload = p.payload.clone();
                            st.in_flight.insert(id, p);
                            (req, payload)
                        })
                    }
                };
                match next {
                    Some((req, payload)) => {
                        tx.send(frame(&req)).await?;
                        if let Some(p) = payload {
                            tx.send(p).await?;
                        }
                    }
                    None => {
                        tokio::select! {
                            _ = wake => {}
                            _ = self.0.room.notified() => {}
                        }
                    }
                }
            }
        };
        let recv = async {
            let mut reader = FrameReader::<Response>::new();
            loop {
                let Some(chunk) = rx.recv().await? else {
                    return Err::<(), io::Error>(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the exporter ended the storage channel",
                    ));
                };
                reader.push(chunk);
                while let Some((resp, payload)) = reader
                    .next_frame()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                {
                    self.complete(resp, payload)?;
                }
            }
        };
        tokio::select! {
            r = send => r,
            r = recv => r,
        }
    }

    fn complete(&self, resp: Response, payload: Vec<Bytes>) -> io::Result<()> {
        if let Response::Changed(p) = resp {
            self.set_params(p);
            return Ok(());
        }
        let id = resp.id();
        let Some(p) = self.lock().in_flight.remove(&id) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the exporter answered request {id}, which is not in flight"),
            ));
        };
        let out = match (resp, p.op) {
            (Response::Ok { .. }, _) => Ok(Reply::Done),
            (Response::Data { len, .. }, Op::Read { len: want, .. }) if len == want => {
                Ok(Reply::Data(concat(payload)))
            }
            (Response::DataZstd { len, .. }, Op::Read { len: want, .. }) if len == want => {
                let z = concat(payload);
                match zstd::bulk::decompress(&z, len as usize) {
                    Ok(d) if d.len() as u64 == len => Ok(Reply::Data(Bytes::from(d))),
                    _ => Err(Failure::new(
                        StorageError::BadData,
                        format!(
                            "{}: compressed data from the exporter does not decompress",
                            self.0.device
                        ),
                    )),
                }
            }
            (Response::Hash { sha256, .. }, Op::Hash { .. }) => Ok(Reply::Hash(sha256)),
            (Response::Error { error, message, .. }, _) => Err(Failure::new(error, message)),
            (other, op) => {
                // Never hand a program data that does not match what it asked: the channel
                // is broken, so end it (what is in flight is resent or failed).
                (p.done)(Err(Failure::new(
                    StorageError::Io,
                    format!(
                        "{}: the exporter answered {op:?} with {other:?}",
                        self.0.device
                    ),
                )));
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "mismatched answer",
                ));
            }
        };
        (p.done)(out);
        self.0.room.notify_waiters();
        Ok(())
    }
}

/// Puts what was in flight back in front of the queue, or fails it, when a channel's serve
/// ends (also when its future is dropped).
struct Requeue<'a>(&'a Client);

impl Drop for Requeue<'_> {
    fn drop(&mut self) {
        let c = self.0;
        let mut st = c.lock();
        let mut back: Vec<(u64, Pending)> = st.in_flight.drain().collect();
        back.sort_by_key(|(id, _)| *id);
        match c.0.retry {
            Retry::Resend => {
                for item in back.into_iter().rev() {
                    st.waiting.push_front(item);
                }
                drop(st);
            }
            Retry::Fail => {
                drop(st);
                for (_, p) in back {
                    (p.done)(Err(lost(&c.0.device, "the channel ended")));
                }
            }
        }
        c.0.room.notify_waiters();
    }
}

/// One contiguous buffer of a payload that arrived in pieces (free when it is one piece).
pub fn concat(mut parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut b = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
            for p in &parts {
                b.extend_from_slice(p);
            }
            b.freeze()
        }
    }
}

/// Opens a storage channel on `link` and returns its halves with the device's parameters.
pub async fn open(
    link: &dyn jmp_transport::Channels,
    device: &str,
) -> Result<(PipeTx, PipeRx, DeviceParams), jmp_protocol::Refusal> {
    let (pipe, params) = link.open_stream(device, Bytes::new()).await?;
    let p = DeviceParams::decode_exact(&params).map_err(|e| {
        jmp_protocol::Refusal::new(
            jmp_protocol::ErrorCode::Protocol,
            format!("{device}: bad storage parameters from the exporter: {e}"),
        )
    })?;
    let (tx, rx) = pipe.split();
    // Megabytes of writes must not hold back a console's keystrokes on the same connection.
    tx.set_priority(jmp_transport::PRIORITY_BULK);
    Ok((tx, rx, p))
}
