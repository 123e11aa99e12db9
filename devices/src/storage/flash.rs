//! Flash and dump over a storage [`Client`].
//!
//! **Flash.** A producer thread reads the image (decompressing it), splits each megabyte into
//! what carries data and runs of zeros, and for a bmap keeps only the mapped ranges, checking
//! each range's checksum as it passes. Zero runs become `zero` requests (a punched hole or
//! `BLKZEROOUT` on the exporter: nothing crosses the link); data that compresses well travels
//! as zstd. Writes are acknowledged one by one and recorded, so an interruption reports exactly
//! which ranges reached the exporter; success is claimed only after a flush, and `verify`
//! compares SHA-256s computed on the exporter (no read-back over the link).
//!
//! **Dump.** Reads the medium in order, many requests in flight, asking the exporter to
//! compress (zeros cost nothing on the link), and writes raw (sparse: zero blocks become holes)
//! or compressed as the output's name says.

use super::client::{Client, Reply, MAX_IN_FLIGHT};
use super::image::{Bmap, Format, Image};
use super::medium::Failure;
use bytes::Bytes;
use jmp_protocol::kinds::storage::{DeviceParams, Op, StorageError};
use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Unit of reading and writing.
pub const UNIT: usize = 1 << 20;
/// Granularity of zero detection: a run of zeros shorter than this is sent as data.
pub const ZERO_GRAIN: usize = 64 << 10;
/// Writes of [`UNIT`] a flash keeps outstanding. Every one queued ahead is data the link must
/// carry before anything sent later on the same connection (a console's keystroke) reaches the
/// exporter, and the stream's flow-control window (8 MiB, jmp_transport) already caps what a
/// flash has on the link, so fewer looked like a shorter queue for keystrokes. Measured, 4
/// made the console's p99 during a flash worse, not better (2 rounds on a loaded machine,
/// 2026-12-08: 250 and 645 ms against 20 and 352 ms with 64), so it stays at the client's
/// maximum until an idle-machine run says otherwise. `JMP_FLASH_IN_FLIGHT` (1 to 64) overrides
/// it, for those measurements.
pub const FLASH_IN_FLIGHT: usize = MAX_IN_FLIGHT;

fn flash_in_flight() -> usize {
    std::env::var("JMP_FLASH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(FLASH_IN_FLIGHT, |n| n.clamp(1, MAX_IN_FLIGHT))
}

/// Byte ranges `[start, end)`, merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let v = &mut self.0;
        let i = v.partition_point(|r| r.1 < start);
        let mut s = start;
        let mut e = end;
        let mut j = i;
        while j < v.len() && v[j].0 <= e {
            s = s.min(v[j].0);
            e = e.max(v[j].1);
            j += 1;
        }
        v.splice(i..j, [(s, e)]);
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

impl fmt::Display for Ranges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, (s, e)) in self.0.iter().take(12).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}..{e}")?;
        }
        if self.0.len() > 12 {
            write!(f, ", and {} more ranges", self.0.len() - 12)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub bmap: Option<Bmap>,
    pub verify: bool,
    /// Compress data on the link when it helps.
    pub compress: bool,
}

/// Where a flash or dump is, for a progress display.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Bytes of the image (flash) or medium (dump) dealt with.
    pub done: u64,
    /// What `done` will reach, when known.
    pub total: Option<u64>,
    /// Bytes that crossed the link.
    pub wire: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The image's (decompressed) length.
    pub image: u64,
    /// Bytes written as data.
    pub written: u64,
    /// Bytes zeroed without data on the link.
    pub zeroed: u64,
    /// Bytes a bmap left out.
    pub skipped: u64,
    pub wire: u64,
    pub verified: bool,
}

/// A flash that did not complete: why, and exactly what the exporter acknowledged before.
#[derive(Debug, Clone)]
pub struct FlashError {
    pub what: String,
    pub code: Option<StorageError>,
    pub acknowledged: Ranges,
    /// The acknowledged ranges were flushed to the medium afterwards.
    pub flushed: bool,
}

impl fmt::Display for FlashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; the exporter acknowledged {} bytes before it stopped (byte ranges {}){}",
            self.what,
            self.acknowledged.bytes(),
            self.acknowledged,
            if self.acknowledged.0.is_empty() {
                ""
            } else if self.flushed {
                ", flushed to the medium"
            } else {
                ", not flushed: the medium may not hold all of them"
            }
        )
    }
}

impl std::error::Error for FlashError {}

/// SHA-256s of the image's data, per range `[start, end)`, for verifying.
type Hashes = Vec<(u64, u64, [u8; 32])>;

/// What the producer hands the sender.
enum Piece {
    Data {
        offset: u64,
        raw: u64,
        zstd: bool,
        bytes: Bytes,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// The image ended after this many bytes; sha256 of its data per verify range.
    End {
        image: u64,
        hashes: Hashes,
    },
}

fn is_zero(b: &[u8]) -> bool {
    // An OR over each page without an early exit vectorises; `all()` would not.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
}

struct Producer {
    image: Image,
    params: DeviceParams,
    opts: Options,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::Sender<Result<Piece, String>>,
}

impl Producer {
    fn send(&self, p: Piece) -> bool {
        self.tx.blocking_send(Ok(p)).is_ok()
    }

    /// Sends `b` as zstd if that saves the link a tenth; `None`: not compressed.
    fn try_zstd(&self, offset: u64, b: &[u8]) -> Option<bool> {
        if !self.opts.compress {
            return None;
        }
        let z = zstd::bulk::compress(b, 1).ok()?;
        (z.len() < b.len() - b.len() / 10).then(|| {
            self.send(Piece::Data {
                offset,
                raw: b.len() as u64,
                zstd: true,
                bytes: Bytes::from(z),
            })
        })
    }

    fn data(&self, offset: u64, b: &[u8]) -> bool {
        if let Some(sent) = self.try_zstd(offset, b) {
            return sent;
        }
        self.send(Piece::Data {
            offset,
            raw: b.len() as u64,
            zstd: false,
            bytes: Bytes::copy_from_slice(b),
        })
    }

    /// [`Self::data`] for bytes already copied out of the read buffer.
    fn data_bytes(&self, offset: u64, b: Bytes) -> bool {
        if let Some(sent) = self.try_zstd(offset, &b) {
            return sent;
        }
        self.send(Piece::Data {
            offset,
            raw: b.len() as u64,
            zstd: false,
            bytes: b,
        })
    }

    fn run(mut self) -> Result<(), String> {
        let size = self.params.size;
        if let Some(s) = self
            .image
            .size
            .or(self.opts.bmap.as_ref().map(|b| b.image_size))
        {
            if s > size {
                return Err(format!(
                    "the image is larger than the medium: {s} bytes onto {size}; nothing was written"
                ));
            }
        }
        let mut out = Out {
            zero: None,
            verify: self.opts.verify.then(Vec::new),
            stopped: false,
        };
        let end = match (self.opts.bmap.take(), self.image.raw.take()) {
            (Some(b), raw) => self.mapped(&b, raw.as_ref(), &mut out)?,
            (None, Some(f)) => self.raw_holes(&f, &mut out)?,
            (None, None) => self.stream(&mut out)?,
        };
        if out.stopped {
            return Ok(());
        }
        out.flush_zero(&self)?;
        let hashes = out
            .verify
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|(s, e, c)| (s, e, digest(c)))
            .collect();
        self.send(Piece::End { image: end, hashes });
        Ok(())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// A compressed image without a bmap: everything is decompressed and classified.
    fn stream(&mut self, out: &mut Out) -> Result<u64, String> {
        let size = self.params.size;
        let mut buf = vec![0u8; UNIT];
        let mut pos = 0u64;
        loop {
            if self.stopped() {
                return Err("interrupted".into());
            }
            let n = self.read_stream(&mut buf, pos)?;
            if n == 0 {
                return Ok(pos);
            }
            if pos + n as u64 > size {
                return Err(format!(
                    "the image is larger than the medium ({size} bytes): it goes on past byte {size}"
                ));
            }
            if !out.classify(self, pos, &buf[..n]) {
                return Ok(pos);
            }
            pos += n as u64;
        }
    }

    fn read_stream(&mut self, buf: &mut [u8], pos: u64) -> Result<usize, String> {
        super::image::read_up_to(&mut self.image.reader, buf).map_err(|e| {
            format!(
                "the {} image is truncated or corrupt at byte {pos} of its data: {e}",
                self.image.format.as_str()
            )
        })
    }

    /// A raw image without a bmap: its holes (`SEEK_DATA`/`SEEK_HOLE`) are zeroed without
    /// being read; what it holds is read with `pread` and classified.
    fn raw_holes(&mut self, f: &std::fs::File, out: &mut Out) -> Result<u64, String> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let len = self.image.size.unwrap_or(0);
        let fd = f.as_raw_fd();
        let seek = |at: u64, whence: libc::c_int| -> u64 {
            // SAFETY: lseek on an open descriptor; it only moves that descriptor's offset,
            // which nothing else here uses (reads are positioned).
            let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
            if r < 0 {
                // ENXIO past the last data; a file system without holes: all data.
                if whence == libc::SEEK_DATA {
                    len
                } else {
                    len.max(at)
                }
            } else {
                (r as u64).min(len)
            }
        };
        let mut buf = vec![0u8; UNIT];
        let mut pos = 0u64;
        while pos < len {
            if self.stopped() {
                return Err("interrupted".into());
            }
            let data = seek(pos, libc::SEEK_DATA);
            if data > pos {
                out.zero_run(self, pos, data)?;
                pos = data;
                continue;
            }
            let hole = seek(pos, libc::SEEK_HOLE).max(pos + 1);
            let n = (hole - pos).min(UNIT as u64) as usize;
            f.read_exact_at(&mut buf[..n], pos)
                .map_err(|e| format!("reading the image at byte {pos}: {e}"))?;
            if !out.classify(self, pos, &buf[..n]) {
                return Ok(pos);
            }
            pos += n as u64;
        }
        Ok(len)
    }

    /// With a bmap: only the mapped ranges are written (read with `pread` from a raw image,
    /// picked out of the decompressed stream otherwise), each checked against its checksum.
    ///
    /// The checksums are computed on a thread of their own ([`Checker`]), beside this one's
    /// reading, compressing and handing data to the link: hashing a megabyte costs about as
    /// much as compressing it, and on one thread the two took turns. A range's data goes out
    /// before its checksum is known either way (the flash fails, reporting what was written,
    /// if a range turns out corrupt); success waits for every range's checksum.
    fn mapped(
        &mut self,
        b: &Bmap,
        raw: Option<&std::fs::File>,
        out: &mut Out,
    ) -> Result<u64, String> {
        let verify = out.verify.is_some();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Check>(CHECK_QUEUE);
        let failed = AtomicBool::new(false);
        let (sent, checked) = std::thread::scope(|s| {
            let checker = std::thread::Builder::new()
                .name("jmp-bmap-check".into())
                .spawn_scoped(s, || Checker::run(b.checksum, verify, rx, &failed))
                .map_err(|e| format!("starting the checksum thread: {e}"))?;
            let sent = self.mapped_send(b, raw, &tx, &failed, &mut out.stopped);
            drop(tx);
            let checked = checker
                .join()
                .unwrap_or_else(|_| Err("the checksum thread panicked".into()));
            Ok::<_, String>((sent, checked))
        })?;
        // A checksum mismatch explains an early stop better than the stop itself.
        let hashes = checked?;
        let end = sent?;
        if let Some(v) = out.verify.as_mut() {
            v.extend(hashes.into_iter().map(|(s, e, h)| (s, e, Hash::Done(h))));
        }
        Ok(end)
    }

    /// [`Self::mapped`]'s reading and sending; each chunk also goes to the checker.
    fn mapped_send(
        &mut self,
        b: &Bmap,
        raw: Option<&std::fs::File>,
        check: &std::sync::mpsc::SyncSender<Check>,
        failed: &AtomicBool,
        stopped: &mut bool,
    ) -> Result<u64, String> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; UNIT];
        let mut pos = 0u64; // stream position (compressed images)
        let checker_gone = || "the checksum thread ended early".to_string();
        for r in &b.ranges {
            let mut at = r.start;
            if raw.is_none() {
                // Skip the unmapped stretch of the stream before this range.
                while pos < r.start {
                    let k = (r.start - pos).min(UNIT as u64) as usize;
                    let n = self.read_stream(&mut buf[..k], pos)?;
                    if n == 0 {
                        return Err(format!("the image ends at byte {pos}, before its bmap's range {}..{}: it is truncated", r.start, r.end));
                    }
                    pos += n as u64;
                }
            }
            while at < r.end {
                if self.stopped() {
                    return Err("interrupted".into());
                }
                if failed.load(Ordering::Relaxed) {
                    // The checker has the reason.
                    return Err("a checksum failed".into());
                }
                let k = (r.end - at).min(UNIT as u64) as usize;
                match raw {
                    Some(f) => f
                        .read_exact_at(&mut buf[..k], at)
                        .map_err(|e| format!("reading the image at byte {at}: {e}"))?,
                    None => {
                        let n = self.read_stream(&mut buf[..k], pos)?;
                        if n < k {
                            return Err(format!("the image ends at byte {}, inside its bmap's range {}..{}: it is truncated", pos + n as u64, r.start, r.end));
                        }
                        pos += n as u64;
                    }
                }
                // One copy, shared by the checker and the link.
                let part = Bytes::copy_from_slice(&buf[..k]);
                check
                    .send(Check::Data(part.clone()))
                    .map_err(|_| checker_gone())?;
                if !self.data_bytes(at, part) {
                    *stopped = true;
                    return Ok(at);
                }
                at += k as u64;
            }
            check
                .send(Check::End {
                    start: r.start,
                    end: r.end,
                    want: r.checksum.clone(),
                })
                .map_err(|_| checker_gone())?;
        }
        if raw.is_none() {
            // The rest of the stream must decompress (a corrupt tail is still a corrupt image)
            // and must not be longer than the bmap says.
            loop {
                let n = self.read_stream(&mut buf, pos)?;
                if n == 0 {
                    break;
                }
                pos += n as u64;
                if pos > b.image_size {
                    return Err(format!(
                        "the image is longer than its bmap says ({} bytes)",
                        b.image_size
                    ));
                }
            }
            if pos < b.image_size {
                return Err(format!(
                    "the image ends at byte {pos}, but its bmap says {} bytes: it is truncated",
                    b.image_size
                ));
            }
        }
        Ok(b.image_size)
    }
}

/// Chunks of a bmap flash queued for the checker at most: memory of this process only
/// (each chunk is shared with the link's queue, not copied).
const CHECK_QUEUE: usize = 16;

/// What [`Producer::mapped_send`] gives the checker.
enum Check {
    /// The next bytes of the current range.
    Data(Bytes),
    /// The current range ends; its bmap checksum, if it has one.
    End {
        start: u64,
        end: u64,
        want: Option<Vec<u8>>,
    },
}

/// Checks each mapped range against its bmap checksum and computes its verify hash
/// (SHA-256; a sha256 bmap's own checksum serves for both).
struct Checker;

impl Checker {
    fn run(
        algo: super::image::Checksum,
        verify: bool,
        rx: std::sync::mpsc::Receiver<Check>,
        failed: &AtomicBool,
    ) -> Result<Vec<(u64, u64, [u8; 32])>, String> {
        let r = Self::check(algo, verify, rx);
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r
    }

    fn check(
        algo: super::image::Checksum,
        verify: bool,
        rx: std::sync::mpsc::Receiver<Check>,
    ) -> Result<Vec<(u64, u64, [u8; 32])>, String> {
        use ring::digest::Context;
        let new = || Context::new(algo.algorithm());
        let reuse = algo == super::image::Checksum::Sha256;
        let new_v = || (verify && !reuse).then(|| Context::new(&ring::digest::SHA256));
        let mut check = new();
        let mut vhash = new_v();
        let mut hashes = Vec::new();
        // Ends when the sender is done (or gone: then its own error is reported).
        while let Ok(m) = rx.recv() {
            match m {
                Check::Data(b) => {
                    check.update(&b);
                    if let Some(v) = vhash.as_mut() {
                        v.update(&b);
                    }
                }
                Check::End { start, end, want } => {
                    let got = std::mem::replace(&mut check, new()).finish();
                    if let Some(want) = &want {
                        if got.as_ref() != want.as_slice() {
                            return Err(format!(
                                "bmap checksum mismatch for bytes {start}..{end}: the image or its bmap is corrupt (expected {}, the image has {})",
                                hex::encode(want),
                                hex::encode(got.as_ref())
                            ));
                        }
                    }
                    let v = std::mem::replace(&mut vhash, new_v());
                    if verify {
                        // Without a verify context the checksum is SHA-256 (computed also for a
                        // range the bmap gives no checksum).
                        let d = match v {
                            Some(c) => c.finish(),
                            None => got,
                        };
                        let mut h = [0u8; 32];
                        h.copy_from_slice(d.as_ref());
                        hashes.push((start, end, h));
                    }
                }
            }
        }
        Ok(hashes)
    }
}

/// A verify hash: still being computed, or known (a sha256 bmap's checksum).
enum Hash {
    Running(ring::digest::Context),
    Done([u8; 32]),
}

fn digest(h: Hash) -> [u8; 32] {
    match h {
        Hash::Done(d) => d,
        Hash::Running(c) => {
            let mut d = [0u8; 32];
            d.copy_from_slice(c.finish().as_ref());
            d
        }
    }
}

/// Verify ranges are cut at this size so a mismatch names a useful range.
const VERIFY_RANGE: u64 = 64 << 20;

/// What the producer has pending: a run of zeros not yet sent, and the verify hashes.
struct Out {
    zero: Option<(u64, u64)>,
    verify: Option<Vec<(u64, u64, Hash)>>,
    /// The sender is gone (the flash is ending): stop quietly.
    stopped: bool,
}

impl Out {
    fn flush_zero(&mut self, p: &Producer) -> Result<(), String> {
        if let Some((s, e)) = self.zero.take() {
            if !p.send(Piece::Zero {
                offset: s,
                len: e - s,
            }) {
                self.stopped = true;
            }
        }
        Ok(())
    }

    fn zero_run(&mut self, p: &Producer, s: u64, e: u64) -> Result<(), String> {
        self.zero = match self.zero {
            Some((zs, ze)) if ze == s => Some((zs, e)),
            Some(_) => {
                self.flush_zero(p)?;
                Some((s, e))
            }
            None => Some((s, e)),
        };
        Ok(())
    }

    fn hash(&mut self, off: u64, b: &[u8]) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let end = off + b.len() as u64;
        if let Some((s, e, Hash::Running(c))) = v.last_mut() {
            if *e == off && end - *s <= VERIFY_RANGE {
                c.update(b);
                *e = end;
                return;
            }
        }
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(b);
        v.push((off, end, Hash::Running(c)));
    }

    /// Sends `block` at `off` as zero runs and data; false once the sender is gone.
    fn classify(&mut self, p: &Producer, off: u64, block: &[u8]) -> bool {
        let n = block.len();
        let mut at = 0;
        while at < n {
            let end = (at + ZERO_GRAIN).min(n);
            if is_zero(&block[at..end]) {
                let _ = self.zero_run(p, off + at as u64, off + end as u64);
                at = end;
                continue;
            }
            let mut dend = end;
            while dend < n {
                let ge = (dend + ZERO_GRAIN).min(n);
                if is_zero(&block[dend..ge]) {
                    break;
                }
                dend = ge;
            }
            let _ = self.flush_zero(p);
            self.hash(off + at as u64, &block[at..dend]);
            if self.stopped || !p.data(off + at as u64, &block[at..dend]) {
                self.stopped = true;
                return false;
            }
            at = dend;
        }
        !self.stopped
    }
}

#[derive(Default)]
struct Shared {
    acked: Ranges,
    failure: Option<Failure>,
}

/// Flashes `image` onto the medium behind `client`. `progress` is called as the exporter
/// acknowledges pieces as written (never for what is only queued or on the wire: with a fast
/// link and a slow card that ran far ahead), its total what will be written (with a bmap, the
/// mapped bytes); `stop` set (Ctrl-C) ends it early, reporting what was written.
pub async fn flash(
    client: &Client,
    params: DeviceParams,
    image: Image,
    opts: Options,
    stop: Arc<AtomicBool>,
    mut progress: impl FnMut(&Progress) + Send,
) -> Result<Report, FlashError> {
    if !params.accepts_writes() {
        let what = if params.writable {
            "the board's power is on and the medium is shared with it: switch the board off first"
        } else {
            "the medium is read-only (the exporter's config does not say `writable: true`, or the device is write-protected)"
        };
        return Err(FlashError {
            what: format!("{}: {what}", client.device()),
            code: Some(if params.writable {
                StorageError::BoardHolds
            } else {
                StorageError::ReadOnly
            }),
            acknowledged: Ranges::default(),
            flushed: false,
        });
    }
    // What acknowledgements add up to: every byte of the image (written or zeroed), or with a
    // bmap only the mapped ones.
    let total = match &opts.bmap {
        Some(b) => Some(b.mapped_bytes()),
        None => image.size,
    };
    let in_flight = flash_in_flight();
    // The producer's read-ahead (image read and compressed, not yet sent) stays deep: it is
    // memory of this process only, not data queued on the link.
    let (tx, mut rx) = tokio::sync::mpsc::channel(MAX_IN_FLIGHT);
    let verify = opts.verify;
    let mut report = Report {
        skipped: opts
            .bmap
            .as_ref()
            .map_or(0, |b| b.image_size - b.mapped_bytes()),
        ..Report::default()
    };
    let producer = Producer {
        image,
        params,
        opts,
        stop: stop.clone(),
        tx: tx.clone(),
    };
    let prod = tokio::task::spawn_blocking(move || {
        if let Err(e) = producer.run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let shared = Arc::new(Mutex::new(Shared::default()));
    let lock = |s: &Arc<Mutex<Shared>>| s.lock().unwrap_or_else(|e| e.into_inner()).acked.clone();
    let mut end: Option<(u64, Hashes)> = None;
    let mut failed: Option<(String, Option<StorageError>)> = None;
    while let Some(piece) = rx.recv().await {
        if let Some(f) = shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failure
            .clone()
        {
            failed = Some((f.message, Some(f.error)));
            break;
        }
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                failed = Some((e, None));
                break;
            }
        };
        let (op, payload, start, len) = match piece {
            Piece::Data {
                offset,
                raw,
                zstd,
                bytes,
            } => {
                report.written += raw;
                report.wire += bytes.len() as u64;
                let op = if zstd {
                    Op::WriteZstd {
                        offset,
                        len: raw,
                        clen: bytes.len() as u64,
                    }
                } else {
                    Op::Write { offset, len: raw }
                };
                (op, Some(bytes), offset, raw)
            }
            Piece::Zero { offset, len } => {
                report.zeroed += len;
                (Op::Zero { offset, len }, None, offset, len)
            }
            Piece::End { image, hashes } => {
                end = Some((image, hashes));
                break;
            }
        };
        client.wait_below(in_flight).await;
        let s = shared.clone();
        client.submit(
            op,
            payload,
            Box::new(move |r| {
                let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(_) => g.acked.add(start, start + len),
                    Err(f) => {
                        g.failure.get_or_insert(f);
                    }
                }
            }),
        );
        progress(&Progress {
            done: lock(&shared).bytes(),
            total,
            wire: report.wire,
        });
    }
    if failed.is_some() {
        stop.store(true, Ordering::Relaxed);
    }
    drop(rx);
    let _ = prod.await;
    // Everything submitted has its answer before anything is claimed; the display follows
    // each answer meanwhile.
    loop {
        let left = client.outstanding();
        if left == 0 {
            break;
        }
        client.wait_below(left).await;
        progress(&Progress {
            done: lock(&shared).bytes(),
            total,
            wire: report.wire,
        });
    }
    if let Some(f) = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .failure
        .clone()
    {
        failed.get_or_insert((f.message, Some(f.error)));
    }
    if failed.is_none() && end.is_none() {
        failed = Some(("the image reader stopped without finishing".into(), None));
    }
    // Flush what was acknowledged either way, so the report can say it is on the medium.
    let flushed = client.call(Op::Flush, None).await;
    if let Some((what, code)) = failed {
        return Err(FlashError {
            what,
            code,
            acknowledged: lock(&shared),
            flushed: flushed.is_ok(),
        });
    }
    if let Err(f) = flushed {
        return Err(FlashError {
            what: format!("flushing failed: {}", f.message),
            code: Some(f.error),
            acknowledged: lock(&shared),
            flushed: false,
        });
    }
    let (image_len, hashes) = end.unwrap_or_default();
    report.image = image_len;
    if verify {
        for (s, e, want) in hashes {
            match client.call(Op::Hash { offset: s, len: e - s }, None).await {
                Ok(Reply::Hash(got)) if got == want => {}
                Ok(Reply::Hash(got)) => {
                    return Err(FlashError {
                        what: format!(
                            "verification failed: bytes {s}..{e} on the medium have sha256 {}, the image {}",
                            hex::encode(got),
                            hex::encode(want)
                        ),
                        code: Some(StorageError::Io),
                        acknowledged: lock(&shared),
                        flushed: true,
                    })
                }
                Ok(_) | Err(_) => {
                    return Err(FlashError {
                        what: format!("verification of bytes {s}..{e} could not be done on the exporter"),
                        code: None,
                        acknowledged: lock(&shared),
                        flushed: true,
                    })
                }
            }
        }
        report.verified = true;
    }
    // All acknowledged, flushed (and verified): the figure is what was written.
    let written = lock(&shared).bytes();
    progress(&Progress {
        done: written,
        total: Some(written),
        wire: report.wire,
    });
    Ok(report)
}

/// Reads the whole medium into `out` (raw and sparse, or compressed as its name says).
pub async fn dump(
    client: &Client,
    params: DeviceParams,
    out: &Path,
    stop: Arc<AtomicBool>,
    mut progress: impl FnMut(&Progress) + Send,
) -> Result<u64, String> {
    const CHUNK: u64 = 4 << 20;
    let size = params.size;
    let format = Format::for_output(out);
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let outp = out.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut w: Box<dyn Write> = match format {
            Format::Raw => Box::new(Sparse {
                f: file,
                pos: 0,
                len: 0,
            }),
            Format::Zstd => Box::new(zstd::stream::write::Encoder::new(file, 3)?.auto_finish()),
            Format::Gzip => Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            )),
            Format::Xz => Box::new(liblzma::write::XzEncoder::new(file, 3)),
            Format::Bzip2 => Box::new(bzip2::write::BzEncoder::new(
                file,
                bzip2::Compression::fast(),
            )),
        };
        while let Some(b) = rx.blocking_recv() {
            w.write_all(&b)?;
        }
        w.flush()?;
        drop(w);
        let _ = outp;
        Ok(())
    });
    let mut next = 0u64;
    let mut pending = std::collections::VecDeque::new();
    let mut wire_done = 0u64;
    let result: Result<(), String> = async {
        loop {
            while next < size && pending.len() < 16 {
                let len = CHUNK.min(size - next);
                let c = client.clone();
                let off = next;
                pending.push_back(tokio::spawn(async move {
                    c.call(
                        Op::Read {
                            offset: off,
                            len,
                            compress: true,
                        },
                        None,
                    )
                    .await
                }));
                next += len;
            }
            let Some(h) = pending.pop_front() else { break };
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            let d = match h.await.map_err(|e| e.to_string())? {
                Ok(Reply::Data(d)) => d,
                Ok(_) => return Err("the exporter answered a read with something else".into()),
                Err(f) => return Err(f.message),
            };
            wire_done += d.len() as u64;
            if tx.send(d).await.is_err() {
                return Err(format!("writing {} failed", out.display()));
            }
            progress(&Progress {
                done: wire_done,
                total: Some(size),
                wire: wire_done,
            });
        }
        Ok(())
    }
    .await;
    drop(tx);
    let w = writer.await.map_err(|e| e.to_string())?;
    result?;
    w.map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(size)
}

/// A raw output that leaves zero blocks as holes.
struct Sparse {
    f: std::fs::File,
    pos: u64,
    len: u64,
}

impl Write for Sparse {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        for block in buf.chunks(4096) {
            if !is_zero(block) {
                self.f.write_all_at(block, self.pos)?;
            }
            self.pos += block.len() as u64;
        }
        self.len = self.len.max(self.pos);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.f.set_len(self.len)?;
        self.f.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        let mut r = Ranges::default();
        r.add(10, 20);
        r.add(30, 40);
        r.add(20, 30);
        r.add(0, 5);
        assert_eq!(r.0, vec![(0, 5), (10, 40)]);
        r.add(4, 11);
        assert_eq!(r.0, vec![(0, 40)]);
        assert_eq!(r.bytes(), 40);
        assert_eq!(r.to_string(), "0..40");
    }
}
