//! Carrying IP packets between a TUN and a tunnel's channels, the same way on both ends.
//!
//! Out of the TUN: one read returns a packet or a super-packet (GSO, up to 64 KiB), which
//! tun-rs splits into MTU-sized segments with their checksums completed; each segment is
//! one QUIC datagram. A segment that does not fit the datagram size the path allows now
//! (before MTU discovery, or on a narrow path) goes on the fallback stream instead, so it is
//! late rather than lost. Into the TUN: datagrams that arrived together are coalesced again
//! (tun-rs GRO) and written as few super-packets, one write each.
//!
//! Why datagrams and not a stream for the bulk: a lost datagram is a lost packet for the inner
//! TCP, which recovers on its own; a stream would retransmit it and hold back everything
//! behind it, the TCP-over-TCP stall. The numbers behind the choice are in docs/benchmarks.md.
//!
//! Every packet from the other side is checked ([`super::packet`]) and filtered by the caller
//! before it reaches the kernel; what is dropped is counted ([`Drops`]).

use super::packet::{parse_ipv4, Ipv4Info};
use bytes::{Bytes, BytesMut};
use jmp_protocol::kinds::net::{next_fallback_frame, put_fallback_frame};
use jmp_transport::{DatagramRx, DatagramTx, PipeError, PipeRx, PipeTx};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

/// Segments one TUN read can yield (64 KiB of 536-byte segments fit).
const SEGMENTS: usize = 128;
/// Room for one segment; the first buffer also takes whole unsplit packets.
const SEGMENT_ROOM: usize = 4096;
const READ_ROOM: usize = VIRTIO_NET_HDR_LEN + 65535;
/// Packets coalesced per TUN write batch.
const WRITE_BATCH: usize = 64;
/// Packets queued for the fallback stream before more are dropped (it is for rare packets).
pub(crate) const FALLBACK_DEPTH: usize = 256;
/// Bytes framed into one write on the fallback stream.
const FALLBACK_CHUNK: usize = 256 * 1024;

/// One reason for dropping packets, counted. Logged at the 1st, 10th, 100th, ... drop so that
/// a flood does not flood the log.
pub(crate) struct Drops {
    what: &'static str,
    n: AtomicU64,
}

impl Drops {
    pub const fn new(what: &'static str) -> Self {
        Drops {
            what,
            n: AtomicU64::new(0),
        }
    }

    pub fn hit(&self, device: &str, detail: impl std::fmt::Display) {
        let n = self.n.fetch_add(1, Ordering::Relaxed) + 1;
        if is_power_of_ten(n) {
            warn!("{device}: {}: {detail} (dropped; {n} so far)", self.what);
        } else {
            debug!("{device}: dropped a packet: {}: {detail}", self.what);
        }
    }

    pub fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

/// What a tunnel end drops, by reason.
pub(crate) struct Stats {
    pub malformed: Drops,
    pub outside: Drops,
    pub spoofed: Drops,
    pub too_large: Drops,
    pub congested: Drops,
    pub unrouted: Drops,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            malformed: Drops::new("malformed"),
            outside: Drops::new("destination outside the exported subnets"),
            spoofed: Drops::new("source address not the tunnel's"),
            too_large: Drops::new("larger than a datagram, no fallback stream"),
            congested: Drops::new("fallback stream congested"),
            unrouted: Drops::new("no tunnel for the destination"),
        }
    }
}

/// The way to the peer: datagrams, and the fallback stream for what does not fit one.
#[derive(Clone)]
pub(crate) struct PeerTx {
    pub dg: DatagramTx,
    pub fallback: Arc<OnceLock<mpsc::Sender<Bytes>>>,
}

/// Why a packet could not be sent at all: the link is gone.
#[derive(Debug)]
pub(crate) struct Gone;

impl PeerTx {
    pub fn new(dg: DatagramTx) -> Self {
        PeerTx {
            dg,
            fallback: Arc::new(OnceLock::new()),
        }
    }

    pub fn send(&self, pkt: &[u8], device: &str, stats: &Stats) -> Result<(), Gone> {
        match self.dg.send(pkt) {
            Ok(()) => Ok(()),
            Err(PipeError::TooLarge { size, max }) => {
                match self.fallback.get() {
                    Some(f) => match f.try_send(Bytes::copy_from_slice(pkt)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            stats.congested.hit(device, format_args!("{size} bytes"))
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => stats
                            .too_large
                            .hit(device, format_args!("{size} bytes, datagrams up to {max}")),
                    },
                    None => stats
                        .too_large
                        .hit(device, format_args!("{size} bytes, datagrams up to {max}")),
                }
                Ok(())
            }
            Err(_) => Err(Gone),
        }
    }
}

/// Reads the TUN, a packet or a super-packet split into segments at a time.
pub(crate) struct TunReader {
    dev: Arc<AsyncDevice>,
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl TunReader {
    pub fn new(dev: Arc<AsyncDevice>) -> Self {
        let mut bufs = vec![vec![0u8; SEGMENT_ROOM]; SEGMENTS];
        bufs[0] = vec![0u8; 65535];
        TunReader {
            dev,
            original: vec![0u8; READ_ROOM],
            bufs,
            sizes: vec![0; SEGMENTS],
        }
    }

    /// Waits for the next read and hands each segment to `f`. An error is the descriptor's
    /// (the TUN is gone); a packet the kernel handed over that cannot be split is counted as
    /// malformed and skipped.
    pub async fn read(
        &mut self,
        device: &str,
        stats: &Stats,
        mut f: impl FnMut(&[u8]),
    ) -> std::io::Result<()> {
        match self
            .dev
            .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)
            .await
        {
            Ok(n) => {
                for i in 0..n {
                    f(&self.bufs[i][..self.sizes[i]]);
                }
                Ok(())
            }
            Err(e) if e.raw_os_error().is_some() => Err(e),
            Err(e) => {
                stats
                    .malformed
                    .hit(device, format_args!("from the TUN: {e}"));
                Ok(())
            }
        }
    }
}

/// Writes packets to the TUN in batches, coalescing what it can.
pub(crate) struct TunWriter {
    dev: Arc<AsyncDevice>,
    gro: GROTable,
    bufs: Vec<Vec<u8>>,
    n: usize,
}

impl TunWriter {
    pub fn new(dev: Arc<AsyncDevice>) -> Self {
        TunWriter {
            dev,
            gro: GROTable::default(),
            bufs: (0..WRITE_BATCH).map(|_| Vec::with_capacity(2048)).collect(),
            n: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.n >= self.bufs.len()
    }

    /// Queues a checked packet; flush before the batch is full.
    pub fn push(&mut self, pkt: &[u8]) {
        let Some(b) = self.bufs.get_mut(self.n) else {
            return;
        };
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(pkt);
        self.n += 1;
    }

    /// Writes the batch. A packet the kernel refuses is logged, not fatal; an error of the
    /// descriptor itself is returned.
    pub async fn flush(&mut self, device: &str) -> std::io::Result<()> {
        if self.n == 0 {
            return Ok(());
        }
        let n = std::mem::take(&mut self.n);
        match self
            .dev
            .send_multiple(&mut self.gro, &mut self.bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBADFD)
                    || e.raw_os_error() == Some(libc::EBADF) =>
            {
                Err(e)
            }
            Err(e) => {
                debug!("{device}: writing to the TUN: {e}");
                Ok(())
            }
        }
    }
}

/// The result of polling a future once without waiting.
fn now<F: Future>(f: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Checks a packet from the peer: well-formed IPv4, then `accept` (the caller's filter, which
/// counts what it refuses).
fn checked(pkt: &[u8], device: &str, stats: &Stats, accept: &impl Fn(&Ipv4Info) -> bool) -> bool {
    match parse_ipv4(pkt) {
        Ok(info) => accept(&info),
        Err(e) => {
            stats
                .malformed
                .hit(device, format_args!("from the link: {e}"));
            false
        }
    }
}

/// Datagrams from the peer into the TUN until the channel ends (or the TUN fails).
pub(crate) async fn datagrams_to_tun(
    mut rx: DatagramRx,
    mut w: TunWriter,
    device: &str,
    stats: &Stats,
    accept: impl Fn(&Ipv4Info) -> bool,
) {
    while let Some(first) = rx.recv().await {
        if checked(&first, device, stats, &accept) {
            w.push(&first);
        }
        // Whatever else has arrived goes in the same batch, so a burst of segments of one flow
        // becomes one super-packet for the kernel.
        while !w.is_full() {
            match now(rx.recv()) {
                Some(Some(d)) => {
                    if checked(&d, device, stats, &accept) {
                        w.push(&d);
                    }
                }
                Some(None) | None => break,
            }
        }
        if let Err(e) = w.flush(device).await {
            warn!("{device}: the TUN failed: {e}");
            return;
        }
    }
}

/// Packets queued for the fallback stream, framed and written until the queue or the stream
/// ends.
pub(crate) async fn fallback_writer(mut q: mpsc::Receiver<Bytes>, mut tx: PipeTx) {
    let mut buf = BytesMut::new();
    while let Some(p) = q.recv().await {
        put_fallback_frame(&mut buf, &p);
        while buf.len() < FALLBACK_CHUNK {
            match q.try_recv() {
                Ok(p) => {
                    put_fallback_frame(&mut buf, &p);
                }
                Err(_) => break,
            }
        }
        if tx.send(buf.split().freeze()).await.is_err() {
            return;
        }
    }
    let _ = tx.finish();
}

/// Frames from the fallback stream into the TUN until the stream ends.
pub(crate) async fn fallback_to_tun(
    mut rx: PipeRx,
    mut w: TunWriter,
    device: &str,
    stats: &Stats,
    accept: impl Fn(&Ipv4Info) -> bool,
) {
    let mut buf = BytesMut::new();
    loop {
        match rx.recv().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => return,
        }
        while let Some(p) = next_fallback_frame(&mut buf) {
            if checked(&p, device, stats, &accept) {
                w.push(&p);
            }
            if w.is_full() && w.flush(device).await.is_err() {
                return;
            }
        }
        if w.flush(device).await.is_err() {
            return;
        }
    }
}

/// A spawned task aborted when this is dropped (a bridge's `run` can be dropped at any time).
pub(crate) struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_logged_at_powers_of_ten() {
        let hits: Vec<u64> = (1..=1000).filter(|n| is_power_of_ten(*n)).collect();
        assert_eq!(hits, vec![1, 10, 100, 1000]);
    }
}
