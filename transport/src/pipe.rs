//! Pipes: the channels a device driver or bridge moves its bytes through.
//!
//! A [`Pipe`] is one stream channel: an ordered byte stream each way, carried as `Bytes` chunks
//! (over QUIC: `write_chunk`/`read_chunk`, no per-byte copy), with half-close, plus that
//! channel's out-of-band messages ([`ChannelMsg`]). A [`DatagramPipe`] carries unreliable
//! messages, and out-of-band messages the same way. [`pair`] and [`datagram_pair`] make two
//! connected in-memory ends so that device tests run without a network.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Out-of-band messages one channel may have queued for its holder. A holder that lets more
/// pile up is not reading them, and the link ends the session rather than buffer without bound.
pub const CONTROL_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    #[error("the channel was reset by the peer (code {0})")]
    Reset(u64),
    #[error("the connection is gone: {0}")]
    ConnectionLost(String),
    #[error("the channel is closed")]
    Closed,
    /// A datagram larger than the path allows now; send it on a stream instead.
    #[error("a datagram of {size} bytes is larger than the {max} bytes the path allows now")]
    TooLarge { size: usize, max: usize },
}

impl From<quinn::WriteError> for PipeError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => PipeError::Reset(code.into_inner()),
            quinn::WriteError::ConnectionLost(e) => PipeError::ConnectionLost(e.to_string()),
            quinn::WriteError::ClosedStream => PipeError::Closed,
            other => PipeError::ConnectionLost(other.to_string()),
        }
    }
}

impl From<quinn::ReadError> for PipeError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => PipeError::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(e) => PipeError::ConnectionLost(e.to_string()),
            quinn::ReadError::ClosedStream => PipeError::Closed,
            other => PipeError::ConnectionLost(other.to_string()),
        }
    }
}

enum TxInner {
    Quic(quinn::SendStream),
    Mem(Option<mpsc::Sender<Result<Bytes, PipeError>>>),
}

/// Bytes moved through a pipe half, for metrics (`None`: not counted).
type Counter = Option<std::sync::Arc<std::sync::atomic::AtomicU64>>;

fn count(c: &Counter, n: usize) {
    if let Some(c) = c {
        c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Priority of a channel a person waits on (a console's keystrokes and output): its queued
/// data goes out before any other channel's.
pub const PRIORITY_INTERACTIVE: i32 = 1;
/// Priority of a channel that moves bulk data nobody watches byte by byte (storage): the
/// other channels' data goes out first.
pub const PRIORITY_BULK: i32 = -1;

/// The sending half of a stream channel.
pub struct PipeTx(TxInner, Counter);

impl PipeTx {
    pub(crate) fn quic(s: quinn::SendStream) -> Self {
        PipeTx(TxInner::Quic(s), None)
    }

    /// Sends a chunk. Returns once the transport has taken it (flow control applies: a slow
    /// peer slows the sender down; nothing is dropped).
    pub async fn send(&mut self, data: Bytes) -> Result<(), PipeError> {
        if data.is_empty() {
            return Ok(());
        }
        count(&self.1, data.len());
        match &mut self.0 {
            TxInner::Quic(s) => Ok(s.write_chunk(data).await?),
            TxInner::Mem(Some(tx)) => tx.send(Ok(data)).await.map_err(|_| PipeError::Closed),
            TxInner::Mem(None) => Err(PipeError::Closed),
        }
    }

    /// Sends every chunk of `chunks` (emptied), in order. Over QUIC they go to the stream in
    /// one write while the window has room: one wake-up of the connection for a batch, where
    /// [`PipeTx::send`] per chunk may cost one each. Not cancel-safe.
    pub async fn send_all(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), PipeError> {
        count(&self.1, chunks.iter().map(|c| c.len()).sum());
        match &mut self.0 {
            TxInner::Quic(s) => s.write_all_chunks(chunks).await?,
            TxInner::Mem(Some(tx)) => {
                for c in chunks.drain(..).filter(|c| !c.is_empty()) {
                    tx.send(Ok(c)).await.map_err(|_| PipeError::Closed)?;
                }
            }
            TxInner::Mem(None) => return Err(PipeError::Closed),
        }
        chunks.clear();
        Ok(())
    }

    /// Sends a prefix of `data` as soon as the transport takes any, and leaves the rest in
    /// `data`. Cancel-safe (unlike [`PipeTx::send`]): when the future is dropped before it
    /// completes nothing was sent, so a pump can wait for this beside other work in a
    /// `select!` without a task or a queue of its own.
    pub async fn write_some(&mut self, data: &mut Bytes) -> Result<(), PipeError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.0 {
            TxInner::Quic(s) => {
                let w = s.write_chunks(std::slice::from_mut(data)).await?;
                count(&self.1, w.bytes);
                Ok(())
            }
            TxInner::Mem(Some(tx)) => {
                let permit = tx.reserve().await.map_err(|_| PipeError::Closed)?;
                let d = std::mem::take(data);
                count(&self.1, d.len());
                permit.send(Ok(d));
                Ok(())
            }
            TxInner::Mem(None) => Err(PipeError::Closed),
        }
    }

    /// Where this channel's queued data goes among the connection's other channels: higher
    /// first ([`PRIORITY_INTERACTIVE`], [`PRIORITY_BULK`]; 0 is the default). In memory, where
    /// nothing queues between channels, it does nothing.
    pub fn set_priority(&self, priority: i32) {
        if let TxInner::Quic(s) = &self.0 {
            // Fails only on a stream already closed, whose data no longer queues.
            let _ = s.set_priority(priority);
        }
    }

    /// Half-close: the peer reads end-of-stream after everything sent so far.
    pub fn finish(&mut self) -> Result<(), PipeError> {
        match &mut self.0 {
            TxInner::Quic(s) => s.finish().map_err(|_| PipeError::Closed),
            TxInner::Mem(tx) => {
                tx.take();
                Ok(())
            }
        }
    }

    /// Abort: the peer's reads fail with `Reset(code)`; unsent data is discarded.
    pub fn reset(&mut self, code: u64) {
        match &mut self.0 {
            TxInner::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u64(code).unwrap_or(quinn::VarInt::MAX));
            }
            TxInner::Mem(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.try_send(Err(PipeError::Reset(code)));
                }
            }
        }
    }
}

enum RxInner {
    Quic(quinn::RecvStream),
    Mem(mpsc::Receiver<Result<Bytes, PipeError>>),
}

/// The receiving half of a stream channel.
pub struct PipeRx(RxInner, Counter);

/// Largest chunk asked of quinn at once; larger reads only add latency for small writes.
const READ_CHUNK: usize = 64 * 1024;

impl PipeRx {
    pub(crate) fn quic(r: quinn::RecvStream) -> Self {
        PipeRx(RxInner::Quic(r), None)
    }

    /// The next chunk, or `None` at end of stream (the peer finished).
    pub async fn recv(&mut self) -> Result<Option<Bytes>, PipeError> {
        let r = match &mut self.0 {
            RxInner::Quic(r) => r.read_chunk(READ_CHUNK, true).await?.map(|c| c.bytes),
            RxInner::Mem(rx) => rx.recv().await.transpose()?,
        };
        if let Some(b) = &r {
            count(&self.1, b.len());
        }
        Ok(r)
    }

    /// Up to `max` chunks at once (appended to `out`); `false` at end of stream. Receivers
    /// that write to a socket use this with `writev`: QUIC delivers data in packet-sized
    /// chunks, and one syscall per chunk would cost more than the transfer.
    pub async fn recv_many(&mut self, out: &mut Vec<Bytes>, max: usize) -> Result<bool, PipeError> {
        let before = out.len();
        let r = self.recv_many_inner(out, max).await;
        count(
            &self.1,
            out.iter().skip(before).map(|b| b.len()).sum::<usize>(),
        );
        r
    }

    async fn recv_many_inner(
        &mut self,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Result<bool, PipeError> {
        let max = max.max(1);
        match &mut self.0 {
            RxInner::Quic(r) => {
                let mut bufs: [Bytes; 32] = Default::default();
                let n = max.min(bufs.len());
                match r.read_chunks(&mut bufs[..n]).await? {
                    Some(got) => {
                        out.extend(bufs.into_iter().take(got));
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            RxInner::Mem(rx) => {
                match rx.recv().await {
                    None => return Ok(false),
                    Some(first) => out.push(first?),
                }
                while out.len() < max {
                    match rx.try_recv() {
                        Ok(b) => out.push(b?),
                        Err(_) => break,
                    }
                }
                Ok(true)
            }
        }
    }

    /// Tells the peer to stop sending (its writes fail with `Reset(code)`).
    pub fn stop(&mut self, code: u64) {
        match &mut self.0 {
            RxInner::Quic(r) => {
                let _ = r.stop(quinn::VarInt::from_u64(code).unwrap_or(quinn::VarInt::MAX));
            }
            RxInner::Mem(rx) => rx.close(),
        }
    }
}

/// An out-of-band message for a channel's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMsg {
    /// The kind's `Control` body (decode it with the kind's codec).
    Control(Bytes),
    /// Text for people about this channel.
    Notice(String),
}

/// Sends this channel's out-of-band messages to the peer.
#[derive(Clone)]
pub enum ControlTx {
    Link(crate::link::LinkHandle, u64),
    Mem(mpsc::Sender<ChannelMsg>),
}

impl ControlTx {
    fn send(&self, m: ChannelMsg) -> bool {
        match self {
            ControlTx::Link(link, channel) => link.channel_msg(*channel, m),
            // In memory a full queue means the peer is not reading: the same failure as a link
            // that ended the session for it.
            ControlTx::Mem(tx) => tx.try_send(m).is_ok(),
        }
    }

    /// Queues a kind's control body; false if the channel or the link is gone.
    pub fn control(&self, body: Bytes) -> bool {
        self.send(ChannelMsg::Control(body))
    }

    /// Queues a notice for the peer's user; false if the channel or the link is gone.
    pub fn notice(&self, text: impl Into<String>) -> bool {
        self.send(ChannelMsg::Notice(text.into()))
    }
}

/// One stream channel. The holder of the other end is the peer's driver or bridge for the same
/// channel id.
pub struct Pipe {
    pub channel: u64,
    pub tx: PipeTx,
    pub rx: PipeRx,
    /// Out-of-band messages the peer sent for this channel.
    pub control_rx: mpsc::Receiver<ChannelMsg>,
    pub control_tx: ControlTx,
}

impl Pipe {
    pub fn split(self) -> (PipeTx, PipeRx) {
        (self.tx, self.rx)
    }

    /// Counts the bytes this end sends into `sent` and those it receives into `received`
    /// (one relaxed atomic add per chunk).
    pub fn count(
        &mut self,
        sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
        received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        self.tx.1 = Some(sent);
        self.rx.1 = Some(received);
    }
}

fn control_pair() -> (
    (ControlTx, mpsc::Receiver<ChannelMsg>),
    (ControlTx, mpsc::Receiver<ChannelMsg>),
) {
    let (a_tx, b_rx) = mpsc::channel(CONTROL_DEPTH);
    let (b_tx, a_rx) = mpsc::channel(CONTROL_DEPTH);
    ((ControlTx::Mem(a_tx), a_rx), (ControlTx::Mem(b_tx), b_rx))
}

/// Two in-memory pipes wired to each other, with `depth` chunks of buffering each way (the
/// stand-in for QUIC flow control). For device tests.
pub fn pair(depth: usize) -> (Pipe, Pipe) {
    pair_on(1, depth)
}

pub(crate) fn pair_on(channel: u64, depth: usize) -> (Pipe, Pipe) {
    let (a_tx, b_rx) = mpsc::channel(depth);
    let (b_tx, a_rx) = mpsc::channel(depth);
    let ((a_ctl_tx, a_ctl_rx), (b_ctl_tx, b_ctl_rx)) = control_pair();
    let a = Pipe {
        channel,
        tx: PipeTx(TxInner::Mem(Some(a_tx)), None),
        rx: PipeRx(RxInner::Mem(a_rx), None),
        control_rx: a_ctl_rx,
        control_tx: a_ctl_tx,
    };
    let b = Pipe {
        channel,
        tx: PipeTx(TxInner::Mem(Some(b_tx)), None),
        rx: PipeRx(RxInner::Mem(b_rx), None),
        control_rx: b_ctl_rx,
        control_tx: b_ctl_tx,
    };
    (a, b)
}

enum DgTx {
    Quic {
        conn: quinn::Connection,
        header: Bytes,
    },
    Mem(mpsc::Sender<Bytes>),
}

/// Largest datagram an in-memory pair carries: about what QUIC allows right after the
/// handshake, so tests meet the same limit.
pub const MEM_DATAGRAM_MAX: usize = 1150;

/// One datagram channel: unreliable messages of at most [`DatagramTx::max_size`] bytes,
/// plus the channel's out-of-band messages (reliable, in order). Messages that arrive while the
/// receiver is behind are dropped, like a busy bus; kinds that must count losses number their
/// messages. The halves are separate fields so one task can wait on both directions.
pub struct DatagramPipe {
    pub channel: u64,
    pub tx: DatagramTx,
    pub rx: DatagramRx,
    pub control_rx: mpsc::Receiver<ChannelMsg>,
    pub control_tx: ControlTx,
}

/// The sending half of a datagram channel (cheap to clone).
#[derive(Clone)]
pub struct DatagramTx(DgTx, Counter);

/// The receiving half of a datagram channel. Over QUIC it counts down the link's queued
/// datagram bytes as it takes them (see `link::DATAGRAM_BYTES`).
pub struct DatagramRx(
    mpsc::Receiver<Bytes>,
    Counter,
    Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
);

impl Clone for DgTx {
    fn clone(&self) -> Self {
        match self {
            DgTx::Quic { conn, header } => DgTx::Quic {
                conn: conn.clone(),
                header: header.clone(),
            },
            DgTx::Mem(tx) => DgTx::Mem(tx.clone()),
        }
    }
}

impl DatagramTx {
    /// Largest payload that fits one datagram now (grows with MTU discovery).
    pub fn max_size(&self) -> usize {
        match &self.0 {
            DgTx::Quic { conn, header } => conn
                .max_datagram_size()
                .unwrap_or(0)
                .saturating_sub(header.len()),
            DgTx::Mem(_) => MEM_DATAGRAM_MAX,
        }
    }

    /// Sends one message at once (never waits). `TooLarge` if it does not fit one datagram
    /// now; nothing is sent then.
    pub fn send(&self, payload: &[u8]) -> Result<(), PipeError> {
        let max = self.max_size();
        if payload.len() > max {
            return Err(PipeError::TooLarge {
                size: payload.len(),
                max,
            });
        }
        count(&self.1, payload.len());
        match &self.0 {
            DgTx::Quic { conn, header } => {
                let mut b = BytesMut::with_capacity(header.len() + payload.len());
                b.extend_from_slice(header);
                b.extend_from_slice(payload);
                conn.send_datagram(b.freeze()).map_err(|e| match e {
                    quinn::SendDatagramError::TooLarge => PipeError::TooLarge {
                        size: payload.len(),
                        max: self.max_size(),
                    },
                    quinn::SendDatagramError::ConnectionLost(e) => {
                        PipeError::ConnectionLost(e.to_string())
                    }
                    other => PipeError::ConnectionLost(other.to_string()),
                })
            }
            DgTx::Mem(tx) => match tx.try_send(Bytes::copy_from_slice(payload)) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(PipeError::Closed),
            },
        }
    }
}

impl DatagramRx {
    /// The next message, `None` when the channel or connection is gone.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let d = self.0.recv().await;
        if let Some(d) = &d {
            count(&self.1, d.len());
            if let Some(q) = &self.2 {
                q.fetch_sub(d.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        d
    }
}

impl Drop for DatagramRx {
    fn drop(&mut self) {
        // What is still queued is given back with the queue.
        if let Some(q) = &self.2 {
            self.0.close();
            while let Ok(d) = self.0.try_recv() {
                q.fetch_sub(d.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl DatagramPipe {
    pub(crate) fn quic(
        channel: u64,
        conn: quinn::Connection,
        rx: mpsc::Receiver<Bytes>,
        queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        control_rx: mpsc::Receiver<ChannelMsg>,
        control_tx: ControlTx,
    ) -> Self {
        let header = jmp_protocol::channel_header(channel).freeze();
        DatagramPipe {
            channel,
            tx: DatagramTx(DgTx::Quic { conn, header }, None),
            rx: DatagramRx(rx, None, Some(queued)),
            control_rx,
            control_tx,
        }
    }

    pub fn max_size(&self) -> usize {
        self.tx.max_size()
    }

    /// Counts the payload bytes this end sends into `sent` and those it receives into
    /// `received` (as [`Pipe::count`]).
    pub fn count(
        &mut self,
        sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
        received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        self.tx.1 = Some(sent);
        self.rx.1 = Some(received);
    }

    pub fn send(&self, payload: &[u8]) -> Result<(), PipeError> {
        self.tx.send(payload)
    }

    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// Two in-memory datagram pipes wired to each other.
pub fn datagram_pair(depth: usize) -> (DatagramPipe, DatagramPipe) {
    datagram_pair_on(1, depth)
}

pub(crate) fn datagram_pair_on(channel: u64, depth: usize) -> (DatagramPipe, DatagramPipe) {
    let (a_tx, b_rx) = mpsc::channel(depth);
    let (b_tx, a_rx) = mpsc::channel(depth);
    let ((a_ctl_tx, a_ctl_rx), (b_ctl_tx, b_ctl_rx)) = control_pair();
    (
        DatagramPipe {
            channel,
            tx: DatagramTx(DgTx::Mem(a_tx), None),
            rx: DatagramRx(a_rx, None, None),
            control_rx: a_ctl_rx,
            control_tx: a_ctl_tx,
        },
        DatagramPipe {
            channel,
            tx: DatagramTx(DgTx::Mem(b_tx), None),
            rx: DatagramRx(b_rx, None, None),
            control_rx: b_ctl_rx,
            control_tx: b_ctl_tx,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_pair_carries_bytes_finish_and_reset() {
        let (mut a, mut b) = pair(4);
        a.tx.send(Bytes::from_static(b"hello")).await.expect("send");
        a.tx.finish().expect("finish");
        assert_eq!(b.rx.recv().await, Ok(Some(Bytes::from_static(b"hello"))));
        assert_eq!(b.rx.recv().await, Ok(None));
        b.tx.reset(7);
        assert_eq!(a.rx.recv().await, Err(PipeError::Reset(7)));
        assert!(a.control_tx.control(Bytes::from_static(b"\x02")));
        assert_eq!(
            b.control_rx.recv().await,
            Some(ChannelMsg::Control(Bytes::from_static(b"\x02")))
        );
    }

    #[tokio::test]
    async fn send_all_sends_every_chunk_in_order_and_empties_the_batch() {
        let (mut a, mut b) = pair(4);
        let mut batch = vec![
            Bytes::from_static(b"one"),
            Bytes::new(),
            Bytes::from_static(b"two"),
        ];
        a.tx.send_all(&mut batch).await.expect("send");
        assert!(batch.is_empty());
        a.tx.finish().expect("finish");
        assert_eq!(b.rx.recv().await, Ok(Some(Bytes::from_static(b"one"))));
        assert_eq!(b.rx.recv().await, Ok(Some(Bytes::from_static(b"two"))));
        assert_eq!(b.rx.recv().await, Ok(None));
    }

    #[tokio::test]
    async fn write_some_dropped_while_full_sends_nothing_and_keeps_the_data() {
        let (mut a, mut b) = pair(1);
        a.tx.send(Bytes::from_static(b"first")).await.expect("send");
        let mut data = Bytes::from_static(b"second");
        // The pipe is full: the write cannot complete, and dropping it must lose nothing.
        tokio::select! {
            biased;
            r = a.tx.write_some(&mut data) => panic!("a full pipe took a write: {r:?}"),
            _ = std::future::ready(()) => {}
        }
        assert_eq!(&data[..], b"second", "the dropped write kept its data");
        assert_eq!(b.rx.recv().await, Ok(Some(Bytes::from_static(b"first"))));
        a.tx.set_priority(PRIORITY_INTERACTIVE);
        a.tx.write_some(&mut data).await.expect("room now");
        assert!(data.is_empty(), "all of it was taken");
        a.tx.finish().expect("finish");
        assert_eq!(b.rx.recv().await, Ok(Some(Bytes::from_static(b"second"))));
        assert_eq!(b.rx.recv().await, Ok(None), "sent once, not twice");
    }

    #[tokio::test]
    async fn datagram_pair_refuses_too_large_and_keeps_control() {
        let (a, mut b) = datagram_pair(4);
        assert_eq!(
            a.send(&[0u8; MEM_DATAGRAM_MAX + 1]),
            Err(PipeError::TooLarge {
                size: MEM_DATAGRAM_MAX + 1,
                max: MEM_DATAGRAM_MAX
            })
        );
        a.send(b"frame").expect("fits");
        assert_eq!(b.recv().await, Some(Bytes::from_static(b"frame")));
        assert!(a.control_tx.notice("hi"));
        assert_eq!(
            b.control_rx.recv().await,
            Some(ChannelMsg::Notice("hi".into()))
        );
    }
}
