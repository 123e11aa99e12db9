//! Byte forwarding between a TCP socket and a stream channel. Both ends of a TCP forward use
//! it: the exporter for its connection to the target, the client for an accepted local
//! connection, so the two ends treat half-close and errors the same way.

use bytes::BytesMut;
use jmp_protocol::ErrorCode;
use jmp_transport::{Pipe, PipeError, PipeRx, PipeTx};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tracing::debug;

/// Size of a fresh read buffer: one read never yields more than this.
const CHUNK: usize = 64 * 1024;
/// A buffer with less spare room than this is renewed, so that reads do not shrink to slivers
/// while earlier chunks, still in flight, hold the rest of the allocation.
const MIN_SPARE: usize = 8 * 1024;

/// How a forward ended, for the caller's log.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Bytes read from TCP and sent on the channel.
    pub sent: u64,
    /// Bytes received on the channel and written to TCP.
    pub received: u64,
    /// Why it was cut short; `None` when both directions ended with a clean half-close.
    pub error: Option<String>,
}

enum Failure {
    Tcp(std::io::Error),
    Pipe(PipeError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Tcp(e) => write!(f, "tcp: {e}"),
            Failure::Pipe(e) => write!(f, "channel: {e}"),
        }
    }
}

/// Moves bytes both ways until both directions have ended. A TCP EOF finishes the channel's
/// sending side and a channel end-of-stream shuts down the TCP write half, each independently,
/// so protocols that half-close (a request, then the reply) work. An error on either side
/// aborts both: the channel is reset and stopped, the socket is closed with an RST.
///
/// Runs in the caller's task and spawns nothing; when it returns, the socket and the pipe are
/// gone. The pipe's control messages are ignored: TCP has none.
pub(crate) async fn forward(mut stream: TcpStream, pipe: Pipe) -> Outcome {
    let channel = pipe.channel;
    let Pipe { mut tx, mut rx, .. } = pipe;
    let mut sent = 0u64;
    let mut received = 0u64;
    let failure = {
        let (mut rd, mut wr) = stream.split();
        let up = tcp_to_pipe(&mut rd, &mut tx, &mut sent);
        let down = pipe_to_tcp(&mut rx, &mut wr, &mut received);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(f) = r {
                        break Some(f);
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(f) = r {
                        break Some(f);
                    }
                }
                else => break None,
            }
        }
    };
    if failure.is_some() {
        // Dropping a send stream finishes it, which the peer would take for a clean end: only
        // an explicit reset tells it the data is incomplete.
        let code = ErrorCode::ConnectFailed.to_wire();
        tx.reset(code);
        rx.stop(code);
        // Likewise an RST, unlike a FIN, tells the TCP peer the stream was cut short.
        if let Err(e) = stream.set_zero_linger() {
            debug!(channel, "cannot arrange an RST on close: {e}");
        }
    }
    Outcome {
        sent,
        received,
        error: failure.map(|f| f.to_string()),
    }
}

async fn tcp_to_pipe(
    rd: &mut ReadHalf<'_>,
    tx: &mut PipeTx,
    count: &mut u64,
) -> Result<(), Failure> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        if buf.capacity() < MIN_SPARE {
            buf.reserve(CHUNK);
        }
        let n = rd.read_buf(&mut buf).await.map_err(Failure::Tcp)?;
        if n == 0 {
            return tx.finish().map_err(Failure::Pipe);
        }
        *count += n as u64;
        tx.send(buf.split().freeze()).await.map_err(Failure::Pipe)?;
    }
}

async fn pipe_to_tcp(
    rx: &mut PipeRx,
    wr: &mut WriteHalf<'_>,
    count: &mut u64,
) -> Result<(), Failure> {
    // Many packet-sized chunks per writev: one syscall per chunk would dominate the cost.
    let mut chunks: Vec<bytes::Bytes> = Vec::with_capacity(32);
    while rx.recv_many(&mut chunks, 32).await.map_err(Failure::Pipe)? {
        *count += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        write_all_vectored(wr, &mut chunks)
            .await
            .map_err(Failure::Tcp)?;
    }
    wr.shutdown().await.map_err(Failure::Tcp)
}

/// Writes every chunk (emptying `chunks`), as few syscalls as the socket allows.
async fn write_all_vectored(
    wr: &mut WriteHalf<'_>,
    chunks: &mut Vec<bytes::Bytes>,
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        drop(slices);
        while n > 0 {
            let c = &mut chunks[first];
            if n >= c.len() {
                n -= c.len();
                first += 1;
            } else {
                c.advance(n);
                n = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}
