//! One imported device's USB/IP stream between a kernel's Unix socket and a stream channel,
//! both ways at once, parsed on the way (`jmp_protocol::kinds::usb::Framer`): the commands and
//! answers the local kernel sends are recorded, and what the peer sends is checked against
//! them before the local kernel reads a byte of it.
//!
//! The socket is read and written directly (registered for readability only, like the
//! consoles' descriptors: a writable registration would wake this side each time the kernel
//! reads); payload moves as `Bytes` slices, written with one `writev` per batch. Everything
//! one read brought goes to the stream in one write, and reads share one buffer until it runs
//! low (no allocation per message). The stream's figures ([`Stats`]: reads, writes and
//! wake-ups per USB/IP message) are logged when it ends.

use bytes::{Bytes, BytesMut};
use jmp_protocol::kinds::usb::{Endpoints, Flow, Framer, Ledger, Progress, UsbipError};
use jmp_transport::{PipeRx, PipeTx};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Largest read from the kernel at once, and the size of the buffer reads share.
const READ: usize = 256 * 1024;
/// A read with less room than this left in the shared buffer takes a new one (the old one is
/// freed once the stream has sent what was read into it).
const READ_MIN: usize = 64 * 1024;
/// Chunks taken from the channel per wake-up (written with one `writev`).
const BATCH: usize = 32;

/// What one stream moved and how many crossings that took: the figures that say where a USB/IP
/// exchange's time goes (each read, write and wake-up is a syscall or a task switch, which
/// under emulation costs more than the work).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// USB/IP messages the local kernel sent.
    pub local_frames: u64,
    /// Reads from the local kernel's socket, and the bytes they brought.
    pub kernel_reads: u64,
    pub kernel_bytes: u64,
    /// Writes to the stream (each wakes the connection, which sends).
    pub stream_writes: u64,
    /// USB/IP messages the peer sent.
    pub peer_frames: u64,
    /// Wake-ups with data from the stream, the chunks and bytes they brought.
    pub stream_wakeups: u64,
    pub stream_chunks: u64,
    pub stream_bytes: u64,
    /// `writev` calls into the local kernel's socket.
    pub kernel_writes: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        write!(
            f,
            "{} messages from the kernel in {} reads ({} bytes, {:.2} reads and {:.2} stream writes a message); \
             {} from the peer in {} wake-ups ({} chunks, {} bytes; {:.2} wake-ups and {:.2} kernel writes a message)",
            self.local_frames,
            self.kernel_reads,
            self.kernel_bytes,
            per(self.kernel_reads, self.local_frames),
            per(self.stream_writes, self.local_frames),
            self.peer_frames,
            self.stream_wakeups,
            self.stream_chunks,
            self.stream_bytes,
            per(self.stream_wakeups, self.peer_frames),
            per(self.kernel_writes, self.peer_frames),
        )
    }
}

/// Which end of the stream this side is.
pub enum Side {
    /// The exporter: the peer's commands go into `usbip-host`. `refresh` reads the device's
    /// endpoints again after a command that changes them.
    Exporter {
        refresh: Box<dyn Fn() -> io::Result<Endpoints> + Send + Sync>,
    },
    /// The client: the peer's answers go into `vhci-hcd`.
    Client,
}

/// Why a pump ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The local kernel closed its end (on the exporter: the device left or was reset; on the
    /// client: the port was detached), or writing to it failed.
    Kernel(String),
    /// The channel ended (the peer closed it, or the link is gone).
    Peer(String),
    /// The peer sent USB/IP this side refused to pass to its kernel.
    Refused(UsbipError),
    /// The local kernel sent USB/IP this side could not follow.
    Local(UsbipError),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Kernel(s) => write!(f, "the kernel closed the device's socket ({s})"),
            End::Peer(s) => write!(f, "the channel ended ({s})"),
            End::Refused(e) => write!(f, "refused the peer's USB/IP: {e}"),
            End::Local(e) => write!(f, "the local kernel's USB/IP: {e}"),
        }
    }
}

/// Moves the stream until either side ends; `sock` is this side's end of the kernel's
/// socket pair (non-blocking).
pub async fn run(sock: OwnedFd, tx: PipeTx, rx: PipeRx, ledger: Ledger, side: Side) -> End {
    let which = match side {
        Side::Exporter { .. } => "exporter",
        Side::Client => "client",
    };
    // Each direction counts its own half; the figures are logged however the stream ends
    // (also when the pump is dropped: an attachment that ends aborts its imports).
    let out_stats = Shared::default();
    let in_stats = Shared::default();
    let _report = Report {
        which,
        out: &out_stats,
        inw: &in_stats,
    };
    pump(sock, tx, rx, ledger, side, &out_stats, &in_stats).await
}

/// One direction's figures, read by the report (a lock, not a `Cell`: the pump's future must be
/// `Send`; it is never contended).
#[derive(Default)]
struct Shared(Mutex<Stats>);

impl Shared {
    fn get(&self) -> Stats {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set(&self, s: Stats) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// Logs a stream's figures when it is dropped.
struct Report<'a> {
    which: &'static str,
    out: &'a Shared,
    inw: &'a Shared,
}

impl Drop for Report<'_> {
    fn drop(&mut self) {
        let (o, i) = (self.out.get(), self.inw.get());
        let stats = Stats {
            local_frames: o.local_frames,
            kernel_reads: o.kernel_reads,
            kernel_bytes: o.kernel_bytes,
            stream_writes: o.stream_writes,
            peer_frames: i.peer_frames,
            stream_wakeups: i.stream_wakeups,
            stream_chunks: i.stream_chunks,
            stream_bytes: i.stream_bytes,
            kernel_writes: i.kernel_writes,
        };
        tracing::info!("USB/IP stream ended ({} side): {stats}", self.which);
    }
}

async fn pump(
    sock: OwnedFd,
    mut tx: PipeTx,
    mut rx: PipeRx,
    ledger: Ledger,
    side: Side,
    out_stats: &Shared,
    in_stats: &Shared,
) -> End {
    let (local, peer, refresh) = match side {
        Side::Exporter { refresh } => (Flow::LocalReturns, Flow::PeerCommands, Some(refresh)),
        Side::Client => (Flow::LocalCommands, Flow::PeerReturns, None),
    };
    let writer = match sock.try_clone() {
        Ok(w) => w,
        Err(e) => return End::Kernel(e.to_string()),
    };
    let reader = match crate::async_fd(sock) {
        Ok(r) => r,
        Err(e) => return End::Kernel(e.to_string()),
    };
    let ledger = Arc::new(Mutex::new(ledger));
    let answered = Notify::new();

    // The local kernel to the channel.
    let outward = async {
        let mut framer = Framer::new(local);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut st = Stats::default();
        let end = loop {
            // Into what is left of the shared buffer while it has room: the bytes read are
            // split off it as they go out, and the allocation is reused.
            let room = if buf.capacity() >= READ_MIN {
                buf.capacity()
            } else {
                READ
            };
            match crate::common::fdio::read(&reader, &mut buf, room, false).await {
                Ok(0) => break End::Kernel("end of stream".into()),
                Ok(n) => {
                    st.kernel_reads += 1;
                    st.kernel_bytes += n as u64;
                }
                Err(e) => break End::Kernel(e.to_string()),
            }
            let mut chunk = buf.split().freeze();
            {
                let mut l = lock(&ledger);
                let stalled = l.stalled();
                if let Err(e) = framer.feed(&mut l, &mut chunk, &mut out) {
                    break End::Local(e);
                }
                if stalled.is_some() && l.stalled().is_none() {
                    answered.notify_one();
                }
            }
            st.local_frames = framer.frames();
            out_stats.set(st);
            if out.is_empty() {
                continue;
            }
            st.stream_writes += 1;
            if let Err(e) = tx.send_all(&mut out).await {
                break End::Peer(e.to_string());
            }
            out_stats.set(st);
        };
        st.local_frames = framer.frames();
        out_stats.set(st);
        end
    };

    // The channel to the local kernel.
    let inward = async {
        let mut framer = Framer::new(peer);
        let mut chunks = Vec::with_capacity(BATCH);
        let mut out: Vec<Bytes> = Vec::new();
        let mut st = Stats::default();
        let end = 'wake: loop {
            chunks.clear();
            match rx.recv_many(&mut chunks, BATCH).await {
                Ok(true) => {}
                Ok(false) => break End::Peer("finished".into()),
                Err(e) => break End::Peer(e.to_string()),
            }
            st.stream_wakeups += 1;
            st.stream_chunks += chunks.len() as u64;
            st.stream_bytes += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
            for mut c in chunks.drain(..) {
                loop {
                    let p = match framer.feed(&mut lock(&ledger), &mut c, &mut out) {
                        Ok(p) => p,
                        Err(e) => break 'wake End::Refused(e),
                    };
                    if p == Progress::Done {
                        break;
                    }
                    // A command that changes the endpoints went out: write it, wait for the
                    // kernel's answer, read the endpoints again, then go on.
                    st.kernel_writes += 1;
                    if let Err(e) = write_all(&writer, &mut out).await {
                        break 'wake End::Kernel(e.to_string());
                    }
                    while lock(&ledger).stalled().is_some() {
                        answered.notified().await;
                    }
                    if let Some(r) = &refresh {
                        match r() {
                            Ok(eps) => lock(&ledger).set_endpoints(eps),
                            Err(e) => {
                                break 'wake End::Kernel(format!("reading its endpoints: {e}"))
                            }
                        }
                    }
                }
            }
            st.peer_frames = framer.frames();
            if !out.is_empty() {
                st.kernel_writes += 1;
            }
            in_stats.set(st);
            if let Err(e) = write_all(&writer, &mut out).await {
                break End::Kernel(e.to_string());
            }
        };
        st.peer_frames = framer.frames();
        in_stats.set(st);
        end
    };

    tokio::select! {
        e = outward => e,
        e = inward => e,
    }
}

/// Writes every chunk of `out` (emptied), one `writev` at a time; waits for room only when the
/// socket is full.
async fn write_all(fd: &OwnedFd, out: &mut Vec<Bytes>) -> io::Result<()> {
    let mut at = 0usize;
    let mut skip = 0usize;
    while at < out.len() {
        let n = match writev(fd, &out[at..], skip) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let dup = fd.try_clone()?;
                // SAFETY: `dup` is owned by the AsyncFd and closed only when it is dropped.
                let w = unsafe {
                    AsyncFd::register_with_interest(dup, tokio::io::Interest::WRITABLE)
                }?;
                let _ready = w.writable().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut n = n;
        while n > 0 && at < out.len() {
            let left = out[at].len() - skip;
            if n >= left {
                n -= left;
                at += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    out.clear();
    Ok(())
}

/// Most chunks one `writev` takes.
const IOV: usize = 64;

/// One `writev` of `chunks` (the first without its first `skip` bytes; at most [`IOV`]).
fn writev(fd: &OwnedFd, chunks: &[Bytes], skip: usize) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; IOV];
    let used = chunks.len().min(IOV);
    for (i, b) in chunks[..used].iter().enumerate() {
        let s = if i == 0 { &b[skip..] } else { &b[..] };
        iov[i] = libc::iovec {
            iov_base: s.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        };
    }
    // SAFETY: the first `used` iovecs point into Bytes borrowed for the duration of the call.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), used as i32) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn lock(l: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Unix stream socket pair, non-blocking and close-on-exec: one end for a kernel, one for
/// the pump.
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    a.set_nonblocking(true)?;
    Ok((a.into(), b.into()))
}
