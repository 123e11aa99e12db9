//! Carrying IP packets between a TUN and a tunnel's channels, the same way on both ends.
//!
//! Out of the TUN, one read returns an ordinary packet or a super-packet (TSO/GSO, up to
//! 64 KiB). An ordinary packet is one QUIC datagram (its checksum completed first); one that
//! does not fit the datagram size the path allows now (before MTU discovery, on a narrow path)
//! goes on the tunnel's stream instead, late rather than lost. A super-packet goes whole on
//! the stream with its segment size, and the far kernel cuts it up again: one write for 64 KiB
//! on both ends, where splitting it into datagrams would cost a QUIC packet's bookkeeping,
//! a wake-up and a GRO pass per 1400 bytes. [`Carry::Datagrams`] (`JMP_NET_CARRY=datagrams`,
//! for measurements) splits super-packets into datagrams instead. The numbers behind the
//! choice, and what it means under loss, are in docs/benchmarks.md.
//!
//! Into the TUN, datagrams that arrived together are coalesced (tun-rs GRO) into as few
//! writes as possible.
//!
//! Every packet from the other side is checked ([`super::packet`]) and filtered by the caller
//! before it reaches the kernel; what is dropped is counted ([`Drops`]).

use super::packet::{parse_ipv4, Ipv4Info};
use crate::common::Drops;
use bytes::{Bytes, BytesMut};
use jmp_protocol::kinds::net::put_fallback_frame;
use jmp_transport::{DatagramRx, DatagramTx, PipeError, PipeRx, PipeTx};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use tun_rs::{AsyncDevice, GROTable, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

// From linux/virtio_net.h (tun-rs exports the GSO types it splits, not these two).
const GSO_NONE: u8 = 0;
const F_NEEDS_CSUM: u8 = 1;

/// Segments one TUN read can yield (64 KiB of 536-byte segments fit).
const SEGMENTS: usize = 128;
/// Room for one segment; the first buffer also takes whole unsplit packets.
const SEGMENT_ROOM: usize = 4096;
const READ_ROOM: usize = VIRTIO_NET_HDR_LEN + 65535;
/// Packets coalesced per TUN write batch.
const WRITE_BATCH: usize = 64;
/// Frames queued for the tunnel's stream. Full, the TUN reader waits: the TUN's own queue
/// then fills and the kernel drops there, which is the inner TCP's congestion signal.
pub(crate) const FALLBACK_DEPTH: usize = 64;
/// Bytes framed into one write on the tunnel's stream.
const FALLBACK_CHUNK: usize = 256 * 1024;
/// Frames at least this long are sent as their own chunk rather than copied into a batch.
const SMALL_FRAME: usize = 4096;

/// How super-packets travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carry {
    /// Whole, on the tunnel's stream (the default).
    Stream,
    /// Split into segments, one datagram each.
    Datagrams,
}

impl Carry {
    pub fn from_env() -> Carry {
        match std::env::var("JMP_NET_CARRY").as_deref() {
            Ok("datagrams") => Carry::Datagrams,
            _ => Carry::Stream,
        }
    }
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

/// A packet for the tunnel's stream: its segment size (0: ordinary) and bytes.
pub(crate) type Frame = (u16, Bytes);

/// The way to the peer: datagrams, and the tunnel's stream.
#[derive(Clone)]
pub(crate) struct PeerTx {
    pub dg: DatagramTx,
    pub fallback: Arc<OnceLock<mpsc::Sender<Frame>>>,
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

    /// An ordinary packet: a datagram, or the stream if it does not fit one (dropped and
    /// counted if that is congested).
    pub fn send(&self, pkt: &[u8], device: &str, stats: &Stats) -> Result<(), Gone> {
        match self.dg.send(pkt) {
            Ok(()) => Ok(()),
            Err(PipeError::TooLarge { size, max }) => {
                match self.fallback.get() {
                    Some(f) => match f.try_send((0, Bytes::copy_from_slice(pkt))) {
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

    /// Whether super-packets can go on the stream.
    pub fn has_stream(&self) -> bool {
        self.fallback.get().is_some_and(|f| !f.is_closed())
    }

    /// A super-packet, whole, on the stream: waits while the stream is behind.
    pub async fn send_super(&self, segment: u16, pkt: &[u8]) -> Result<(), Gone> {
        let Some(f) = self.fallback.get() else {
            return Err(Gone);
        };
        f.send((segment, Bytes::copy_from_slice(pkt)))
            .await
            .map_err(|_| Gone)
    }
}

/// What one TUN read yielded.
pub(crate) enum Read<'a> {
    /// Packets, checksums complete (an ordinary packet, or a super-packet's segments).
    Packets(Vec<&'a [u8]>),
    /// A super-packet, whole: its segment size and bytes (transport checksum partial, as the
    /// receiving kernel expects it with the segment size).
    Super(u16, &'a [u8]),
    /// Nothing usable (counted).
    Nothing,
}

/// Reads the TUN, one packet or super-packet at a time.
pub(crate) struct TunReader {
    dev: Arc<AsyncDevice>,
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl TunReader {
    pub fn new(dev: Arc<AsyncDevice>) -> Self {
        TunReader {
            dev,
            original: vec![0u8; READ_ROOM],
            bufs: vec![vec![0u8; SEGMENT_ROOM]; SEGMENTS],
            sizes: vec![0; SEGMENTS],
        }
    }

    /// Waits for the next read. An error is the descriptor's (the TUN is gone); a packet the
    /// kernel handed over that cannot be used is counted as malformed.
    pub async fn read(
        &mut self,
        carry: Carry,
        device: &str,
        stats: &Stats,
    ) -> std::io::Result<Read<'_>> {
        let n = self.dev.recv(&mut self.original).await?;
        if n <= VIRTIO_NET_HDR_LEN {
            stats
                .malformed
                .hit(device, format_args!("a TUN read of {n} bytes"));
            return Ok(Read::Nothing);
        }
        let Ok(hdr) = VirtioNetHdr::decode(&self.original[..VIRTIO_NET_HDR_LEN]) else {
            stats
                .malformed
                .hit(device, "an unreadable offload header from the TUN");
            return Ok(Read::Nothing);
        };
        let (head, pkt) = self.original[..n].split_at_mut(VIRTIO_NET_HDR_LEN);
        let _ = head;
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0
                && !complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)
            {
                stats
                    .malformed
                    .hit(device, "a checksum offset outside the packet");
                return Ok(Read::Nothing);
            }
            return Ok(Read::Packets(vec![&*pkt]));
        }
        if carry == Carry::Stream && hdr.gso_type == tun_rs::VIRTIO_NET_HDR_GSO_TCPV4 {
            return Ok(Read::Super(hdr.gso_size, &*pkt));
        }
        match tun_rs::gso_split(pkt, hdr, &mut self.bufs, &mut self.sizes, 0, false) {
            Ok(k) => Ok(Read::Packets(
                self.bufs[..k]
                    .iter()
                    .zip(&self.sizes)
                    .map(|(b, n)| &b[..*n])
                    .collect(),
            )),
            Err(e) => {
                stats
                    .malformed
                    .hit(device, format_args!("a super-packet from the TUN: {e}"));
                Ok(Read::Nothing)
            }
        }
    }
}

/// Completes a partial transport checksum (the kernel's CHECKSUM_PARTIAL: the field holds the
/// pseudo-header sum). `false` if the offsets do not fit the packet.
fn complete_checksum(p: &mut [u8], start: u16, offset: u16) -> bool {
    let (start, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if at + 2 > p.len() || start > p.len() {
        return false;
    }
    let initial = u16::from_be_bytes([p[at], p[at + 1]]);
    p[at] = 0;
    p[at + 1] = 0;
    let sum = !tun_rs::checksum(&p[start..], u64::from(initial));
    p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// The offload header for a super-packet of `segment`-byte segments (TCP over IPv4, checksum
/// partial), or `None` if the packet is not one.
fn super_header(p: &[u8], len: usize, segment: u16) -> Option<[u8; VIRTIO_NET_HDR_LEN]> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    if *p.get(9)? != 6 || segment == 0 {
        return None;
    }
    let tcp_len = usize::from(*p.get(ihl + 12)? >> 4) * 4;
    let hdr_len = ihl + tcp_len;
    if tcp_len < 20 || hdr_len > len {
        return None;
    }
    let h = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: hdr_len as u16,
        gso_size: segment,
        csum_start: ihl as u16,
        csum_offset: 16,
    };
    let mut out = [0u8; VIRTIO_NET_HDR_LEN];
    h.encode(&mut out).ok()?;
    Some(out)
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

impl TunWriter {
    /// Writes one super-packet whole, gathered from `parts` (after the batch so far, to keep
    /// the order); `head` holds its first bytes. `false`: not a TCP/IPv4 super-packet.
    pub async fn write_super(
        &mut self,
        device: &str,
        segment: u16,
        head: &[u8],
        parts: &[Bytes],
    ) -> std::io::Result<bool> {
        let len = parts.iter().map(|p| p.len()).sum();
        let Some(h) = super_header(head, len, segment) else {
            return Ok(false);
        };
        self.flush(device).await?;
        let mut iov = Vec::with_capacity(parts.len() + 1);
        iov.push(std::io::IoSlice::new(&h));
        iov.extend(parts.iter().map(|p| std::io::IoSlice::new(p)));
        match self.dev.send_vectored(&iov).await {
            Ok(_) => Ok(true),
            Err(e)
                if e.raw_os_error() == Some(libc::EBADFD)
                    || e.raw_os_error() == Some(libc::EBADF) =>
            {
                Err(e)
            }
            Err(e) => {
                debug!("{device}: writing a super-packet to the TUN: {e}");
                Ok(true)
            }
        }
    }
}

/// Cuts the tunnel stream into frames without copying what they carry: each frame is the list
/// of received chunks (slices of them) that hold it.
#[derive(Default)]
pub(crate) struct Frames {
    head: BytesMut,
    segment: u16,
    /// Bytes of the current frame's packet still missing (`None`: its header is incomplete).
    missing: Option<usize>,
    parts: Vec<Bytes>,
}

impl Frames {
    /// Feeds one chunk; appends the frames it completes (segment size, packet parts).
    pub fn feed(&mut self, mut chunk: Bytes, out: &mut Vec<(u16, Vec<Bytes>)>) {
        while !chunk.is_empty() {
            let missing = match self.missing {
                Some(m) => m,
                None => {
                    let k = (4 - self.head.len()).min(chunk.len());
                    self.head.extend_from_slice(&chunk.split_to(k));
                    if self.head.len() < 4 {
                        return;
                    }
                    let len = usize::from(u16::from_be_bytes([self.head[0], self.head[1]]));
                    self.segment = u16::from_be_bytes([self.head[2], self.head[3]]);
                    self.head.clear();
                    len
                }
            };
            let k = missing.min(chunk.len());
            if k > 0 {
                self.parts.push(chunk.split_to(k));
            }
            if missing > k {
                self.missing = Some(missing - k);
                return;
            }
            self.missing = None;
            out.push((self.segment, std::mem::take(&mut self.parts)));
        }
    }
}

/// The first bytes of a packet in parts (enough for its IPv4 and TCP headers).
fn head_of(parts: &[Bytes], head: &mut [u8; 128]) -> usize {
    let mut n = 0;
    for p in parts {
        let k = (head.len() - n).min(p.len());
        head[n..n + k].copy_from_slice(&p[..k]);
        n += k;
        if n == head.len() {
            break;
        }
    }
    n
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

/// Frames queued for the tunnel's stream, written until the queue or the stream ends. Small
/// frames are batched into one chunk; a super-packet's bytes go as their own chunk, uncopied.
pub(crate) async fn fallback_writer(mut q: mpsc::Receiver<Frame>, mut tx: PipeTx) {
    let mut buf = BytesMut::new();
    while let Some(mut f) = q.recv().await {
        loop {
            if f.1.len() < SMALL_FRAME {
                put_fallback_frame(&mut buf, f.0, &f.1);
            } else {
                put_fallback_frame(&mut buf, f.0, &[]);
                // The header said 0 bytes: rewrite the length for the packet sent apart.
                let at = buf.len() - 4;
                buf[at..at + 2].copy_from_slice(&(f.1.len() as u16).to_be_bytes());
                if tx.send(buf.split().freeze()).await.is_err() || tx.send(f.1).await.is_err() {
                    return;
                }
            }
            if buf.len() >= FALLBACK_CHUNK {
                break;
            }
            match q.try_recv() {
                Ok(next) => f = next,
                Err(_) => break,
            }
        }
        if !buf.is_empty() && tx.send(buf.split().freeze()).await.is_err() {
            return;
        }
    }
    let _ = tx.finish();
}

/// Frames from the tunnel's stream into the TUN until the stream ends.
pub(crate) async fn fallback_to_tun(
    mut rx: PipeRx,
    mut w: TunWriter,
    device: &str,
    stats: &Stats,
    accept: impl Fn(&Ipv4Info) -> bool,
) {
    let mut frames = Frames::default();
    let mut done = Vec::new();
    let mut chunks = Vec::with_capacity(32);
    let mut head = [0u8; 128];
    loop {
        chunks.clear();
        match rx.recv_many(&mut chunks, 32).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
        for c in chunks.drain(..) {
            frames.feed(c, &mut done);
        }
        for (seg, parts) in done.drain(..) {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            let n = head_of(&parts, &mut head);
            let ok = match super::packet::parse_ipv4_head(&head[..n], len) {
                Ok(info) => accept(&info),
                Err(e) => {
                    stats
                        .malformed
                        .hit(device, format_args!("from the link: {e}"));
                    false
                }
            };
            if !ok {
                continue;
            }
            if seg == 0 {
                let mut p = BytesMut::with_capacity(len);
                for part in &parts {
                    p.extend_from_slice(part);
                }
                w.push(&p);
                if w.is_full() && w.flush(device).await.is_err() {
                    return;
                }
                continue;
            }
            match w.write_super(device, seg, &head[..n], &parts).await {
                Ok(true) => {}
                Ok(false) => stats
                    .malformed
                    .hit(device, "a super-packet from the link that is not TCP/IPv4"),
                Err(_) => return,
            }
        }
        if w.flush(device).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// However the stream is cut into chunks, the frames come out whole and in order.
        #[test]
        fn frames_survive_any_chunking(packets in proptest::collection::vec((proptest::prelude::any::<u16>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000)), 0..6), cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..12)) {
            let mut wire = BytesMut::new();
            for (seg, p) in &packets {
                put_fallback_frame(&mut wire, *seg, p);
            }
            let wire = wire.freeze();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(wire.len());
            let mut f = Frames::default();
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts {
                f.feed(wire.slice(at..c), &mut out);
                at = c;
            }
            let got: Vec<(u16, Vec<u8>)> = out
                .into_iter()
                .map(|(s, parts)| (s, parts.concat()))
                .collect();
            proptest::prop_assert_eq!(got, packets);
        }
    }
}
