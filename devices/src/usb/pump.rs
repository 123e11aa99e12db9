//! One imported device's USB/IP stream between a kernel's Unix socket and a stream channel,
//! both ways at once, parsed on the way (`jmp_protocol::kinds::usb::Framer`): the commands and
//! answers the local kernel sends are recorded, and what the peer sends is checked against
//! them before the local kernel reads a byte of it.
//!
//! The socket is read and written directly (registered for readability only, like the
//! consoles' descriptors: a writable registration would wake this side each time the kernel
//! reads); payload moves as `Bytes` slices, written with one `writev` per batch.

use bytes::{Bytes, BytesMut};
use jmp_protocol::kinds::usb::{Endpoints, Flow, Framer, Ledger, Progress, UsbipError};
use jmp_transport::{PipeRx, PipeTx};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Largest read from the kernel at once.
const READ: usize = 256 * 1024;
/// Chunks taken from the channel per wake-up (written with one `writev`).
const BATCH: usize = 32;

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
pub async fn run(sock: OwnedFd, mut tx: PipeTx, mut rx: PipeRx, ledger: Ledger, side: Side) -> End {
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
        loop {
            match crate::common::fdio::read(&reader, &mut buf, READ, false).await {
                Ok(0) => return End::Kernel("end of stream".into()),
                Ok(_) => {}
                Err(e) => return End::Kernel(e.to_string()),
            }
            let mut chunk = buf.split().freeze();
            {
                let mut l = lock(&ledger);
                let stalled = l.stalled();
                if let Err(e) = framer.feed(&mut l, &mut chunk, &mut out) {
                    return End::Local(e);
                }
                if stalled.is_some() && l.stalled().is_none() {
                    answered.notify_one();
                }
            }
            for c in out.drain(..) {
                if let Err(e) = tx.send(c).await {
                    return End::Peer(e.to_string());
                }
            }
        }
    };

    // The channel to the local kernel.
    let inward = async {
        let mut framer = Framer::new(peer);
        let mut chunks = Vec::with_capacity(BATCH);
        let mut out: Vec<Bytes> = Vec::new();
        loop {
            chunks.clear();
            match rx.recv_many(&mut chunks, BATCH).await {
                Ok(true) => {}
                Ok(false) => return End::Peer("finished".into()),
                Err(e) => return End::Peer(e.to_string()),
            }
            for mut c in chunks.drain(..) {
                loop {
                    let p = match framer.feed(&mut lock(&ledger), &mut c, &mut out) {
                        Ok(p) => p,
                        Err(e) => return End::Refused(e),
                    };
                    if p == Progress::Done {
                        break;
                    }
                    // A command that changes the endpoints went out: write it, wait for the
                    // kernel's answer, read the endpoints again, then go on.
                    if let Err(e) = write_all(&writer, &mut out).await {
                        return End::Kernel(e.to_string());
                    }
                    while lock(&ledger).stalled().is_some() {
                        answered.notified().await;
                    }
                    if let Some(r) = &refresh {
                        match r() {
                            Ok(eps) => lock(&ledger).set_endpoints(eps),
                            Err(e) => return End::Kernel(format!("reading its endpoints: {e}")),
                        }
                    }
                }
            }
            if let Err(e) = write_all(&writer, &mut out).await {
                return End::Kernel(e.to_string());
            }
        }
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

/// One `writev` of `chunks` (the first without its first `skip` bytes).
fn writev(fd: &OwnedFd, chunks: &[Bytes], skip: usize) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = chunks
        .iter()
        .take(64)
        .enumerate()
        .map(|(i, b)| {
            let s = if i == 0 { &b[skip..] } else { &b[..] };
            libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            }
        })
        .collect();
    // SAFETY: every iovec points into a Bytes borrowed for the duration of the call.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
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
