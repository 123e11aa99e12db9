//! Non-blocking reads and writes on a descriptor registered with tokio (a pty master, a tty):
//! the one place that turns readiness into `read(2)`/`write(2)`, for the serial driver and the
//! client pty alike.

use bytes::BytesMut;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// Reads at most `max` bytes into `buf` (cleared first). `Ok(0)` is end of file.
///
/// A tty read returns everything that is buffered, so a short read means the descriptor is
/// drained: its readiness is cleared then, which saves the `read` that would only return EAGAIN
/// on every wake-up (a console round trip is made of few bytes and many wake-ups). A later
/// arrival is still seen: tokio only clears the readiness this read observed. In pty packet mode
/// (`packet`), a status packet is one byte however much data waits behind it, so only data
/// packets (first byte 0) count as drained.
pub async fn read(
    fd: &AsyncFd<OwnedFd>,
    buf: &mut BytesMut,
    max: usize,
    packet: bool,
) -> io::Result<usize> {
    buf.clear();
    buf.reserve(max);
    loop {
        let mut guard = fd.readable().await?;
        let res = guard.try_io(|fd| {
            let spare = buf.spare_capacity_mut();
            let len = spare.len().min(max);
            // SAFETY: the kernel writes at most `len` bytes into the spare capacity; only the
            // bytes it reports as read are marked initialised.
            let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), len) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            unsafe { buf.set_len(n as usize) };
            Ok((n as usize, len))
        });
        match res {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Ok((n, len))) => {
                if n > 0 && n < len && (!packet || buf[0] == 0) {
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Writes what the descriptor takes now, without waiting: the count, 0 when it is full.
pub fn try_write(fd: &AsyncFd<OwnedFd>, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: data is a valid slice; the descriptor stays open while `fd` lives.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// A registration of a duplicate of a descriptor for writability, held while it is full.
///
/// `fd` is registered for readability only (see `crate::async_fd`), so a write is tried at once;
/// only when the descriptor is full does a temporary registration wait for room. Registering a
/// descriptor that is already writable reports it at once, so no wake-up is lost between the
/// failed write and the registration.
pub struct RoomWaiter(AsyncFd<OwnedFd>);

impl RoomWaiter {
    pub fn new(fd: &AsyncFd<OwnedFd>) -> io::Result<RoomWaiter> {
        let dup = fd.get_ref().try_clone()?;
        // SAFETY: `dup` is owned by the AsyncFd and closed only when it is dropped.
        let w = unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::WRITABLE) }?;
        Ok(RoomWaiter(w))
    }

    /// Completes when the descriptor has room again (`true`), or when its other end is gone
    /// for good (`false`: a pty whose program closed it, where writes fail with EAGAIN and
    /// waiting for room would spin). The readiness is consumed: the caller writes next, and if
    /// that finds the descriptor full again, the kernel reports the next room as a new event.
    pub async fn room(&self) -> io::Result<bool> {
        let mut g = self.0.writable().await?;
        if g.ready().is_write_closed() {
            return Ok(false);
        }
        g.clear_ready();
        Ok(true)
    }
}

/// Writes some of `data`, waiting until the descriptor takes at least one byte.
pub async fn write_some(fd: &AsyncFd<OwnedFd>, data: &[u8]) -> io::Result<usize> {
    loop {
        let n = try_write(fd, data)?;
        if n > 0 || data.is_empty() {
            return Ok(n);
        }
        let w = RoomWaiter::new(fd)?;
        if !w.room().await? {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
    }
}

/// Writes all of `data`.
pub async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = write_some(fd, data).await?;
        data = &data[n..];
    }
    Ok(())
}
