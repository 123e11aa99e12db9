//! Pipes: the channels a device driver or bridge moves its bytes through.
//!
//! A [`Pipe`] is one stream channel: an ordered byte stream each way, carried as `Bytes` chunks
//! (over QUIC: `write_chunk`/`read_chunk`, no per-byte copy), with half-close, plus that
//! channel's out-of-band control messages. [`pair`] makes two connected in-memory pipes so that
//! device tests run without a network. A [`DatagramPipe`] carries unreliable messages.

use bytes::{Bytes, BytesMut};
use jmp_protocol::ControlBody;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    #[error("the channel was reset by the peer (code {0})")]
    Reset(u64),
    #[error("the connection is gone: {0}")]
    ConnectionLost(String),
    #[error("the channel is closed")]
    Closed,
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

/// The sending half of a stream channel.
pub struct PipeTx(TxInner);

impl PipeTx {
    pub(crate) fn quic(s: quinn::SendStream) -> Self {
        PipeTx(TxInner::Quic(s))
    }

    /// Sends a chunk. Returns once the transport has taken it (flow control applies: a slow
    /// peer slows the sender down; nothing is dropped).
    pub async fn send(&mut self, data: Bytes) -> Result<(), PipeError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.0 {
            TxInner::Quic(s) => Ok(s.write_chunk(data).await?),
            TxInner::Mem(Some(tx)) => tx.send(Ok(data)).await.map_err(|_| PipeError::Closed),
            TxInner::Mem(None) => Err(PipeError::Closed),
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
pub struct PipeRx(RxInner);

/// Largest chunk asked of quinn at once; larger reads only add latency for small writes.
const READ_CHUNK: usize = 64 * 1024;

impl PipeRx {
    pub(crate) fn quic(r: quinn::RecvStream) -> Self {
        PipeRx(RxInner::Quic(r))
    }

    /// The next chunk, or `None` at end of stream (the peer finished).
    pub async fn recv(&mut self) -> Result<Option<Bytes>, PipeError> {
        match &mut self.0 {
            RxInner::Quic(r) => Ok(r.read_chunk(READ_CHUNK, true).await?.map(|c| c.bytes)),
            RxInner::Mem(rx) => rx.recv().await.transpose(),
        }
    }

    /// Up to `out`'s capacity of chunks at once (appended to `out`); `false` at end of stream.
    /// Receivers that write to a socket use this with `writev`: QUIC delivers data in
    /// packet-sized chunks, and one syscall per chunk would cost more than the transfer.
    pub async fn recv_many(&mut self, out: &mut Vec<Bytes>, max: usize) -> Result<bool, PipeError> {
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

/// Sends this channel's control messages to the peer.
#[derive(Clone)]
pub enum ControlTx {
    Link(crate::link::LinkHandle, u64),
    Mem(mpsc::UnboundedSender<ControlBody>),
}

impl ControlTx {
    /// Queues a control message; false if the channel or the link is gone.
    pub fn send(&self, body: ControlBody) -> bool {
        match self {
            ControlTx::Link(link, channel) => link.control(*channel, body),
            ControlTx::Mem(tx) => tx.send(body).is_ok(),
        }
    }
}

/// One stream channel. The holder of the other end is the peer's driver or bridge for the same
/// channel id.
pub struct Pipe {
    pub channel: u64,
    pub tx: PipeTx,
    pub rx: PipeRx,
    /// Control messages the peer sent for this channel.
    pub control_rx: mpsc::UnboundedReceiver<ControlBody>,
    pub control_tx: ControlTx,
}

impl Pipe {
    pub fn split(self) -> (PipeTx, PipeRx) {
        (self.tx, self.rx)
    }
}

/// Two in-memory pipes wired to each other, with `depth` chunks of buffering each way (the
/// stand-in for QUIC flow control). For device tests.
pub fn pair(depth: usize) -> (Pipe, Pipe) {
    let (a_tx, b_rx) = mpsc::channel(depth);
    let (b_tx, a_rx) = mpsc::channel(depth);
    let (a_ctl_tx, b_ctl_rx) = mpsc::unbounded_channel();
    let (b_ctl_tx, a_ctl_rx) = mpsc::unbounded_channel();
    let a = Pipe {
        channel: 1,
        tx: PipeTx(TxInner::Mem(Some(a_tx))),
        rx: PipeRx(RxInner::Mem(a_rx)),
        control_rx: a_ctl_rx,
        control_tx: ControlTx::Mem(a_ctl_tx),
    };
    let b = Pipe {
        channel: 1,
        tx: PipeTx(TxInner::Mem(Some(b_tx))),
        rx: PipeRx(RxInner::Mem(b_rx)),
        control_rx: b_ctl_rx,
        control_tx: ControlTx::Mem(b_ctl_tx),
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

/// One datagram channel: unreliable, unordered messages of at most [`DatagramPipe::max_size`]
/// bytes. Messages that arrive while the receiver is behind are dropped, like a busy bus.
pub struct DatagramPipe {
    pub channel: u64,
    tx: DgTx,
    rx: mpsc::Receiver<Bytes>,
}

impl DatagramPipe {
    pub(crate) fn quic(channel: u64, conn: quinn::Connection, rx: mpsc::Receiver<Bytes>) -> Self {
        let header = jmp_protocol::channel_header(channel).freeze();
        DatagramPipe {
            channel,
            tx: DgTx::Quic { conn, header },
            rx,
        }
    }

    /// Largest payload that fits one datagram now (grows with MTU discovery).
    pub fn max_size(&self) -> usize {
        match &self.tx {
            DgTx::Quic { conn, header } => conn
                .max_datagram_size()
                .unwrap_or(0)
                .saturating_sub(header.len()),
            DgTx::Mem(_) => 1200,
        }
    }

    pub fn send(&self, payload: &[u8]) -> Result<(), PipeError> {
        match &self.tx {
            DgTx::Quic { conn, header } => {
                let mut b = BytesMut::with_capacity(header.len() + payload.len());
                b.extend_from_slice(header);
                b.extend_from_slice(payload);
                conn.send_datagram(b.freeze()).map_err(|e| match e {
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

    /// The next message, `None` when the channel or connection is gone.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// Two in-memory datagram pipes wired to each other.
pub fn datagram_pair(depth: usize) -> (DatagramPipe, DatagramPipe) {
    let (a_tx, b_rx) = mpsc::channel(depth);
    let (b_tx, a_rx) = mpsc::channel(depth);
    (
        DatagramPipe {
            channel: 1,
            tx: DgTx::Mem(a_tx),
            rx: a_rx,
        },
        DatagramPipe {
            channel: 1,
            tx: DgTx::Mem(b_tx),
            rx: b_rx,
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
        assert!(a.control_tx.send(ControlBody::Break { millis: 1 }));
        assert_eq!(
            b.control_rx.recv().await,
            Some(ControlBody::Break { millis: 1 })
        );
    }
}
