//! The kernel's device events (a `NETLINK_KOBJECT_UEVENT` socket, what udev listens to): USB
//! devices coming and going on the lab host, and device nodes appearing for an imported
//! device on the client. An event only says that something changed: the truth is read from
//! sysfs again, so a lost event (a full socket buffer: `ENOBUFS`) costs nothing but a rescan.
//! Chosen over polling sysfs because a board that resets comes back in milliseconds and is
//! seen at once, and an idle lab host costs nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// A socket receiving the kernel's uevents.
pub struct Uevents {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl Uevents {
    /// Fails where the sandbox refuses `AF_NETLINK`.
    pub fn open() -> io::Result<Uevents> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // Group 1: the kernel's own events (udev re-sends on group 2, which may not exist).
        addr.nl_groups = 1;
        // SAFETY: addr is a valid sockaddr_nl of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uevents {
            fd: crate::async_fd(fd)?,
            buf: vec![0; 16 * 1024],
        })
    }

    /// Waits for events and returns the subsystems of those that came (`usb`, `tty`,
    /// `block`, ...; `None` in the list for an overflow, whose events are unknown). Drains
    /// whatever is queued, so a burst is one wake-up.
    pub async fn next(&mut self) -> io::Result<Vec<Option<String>>> {
        let mut got = Vec::new();
        loop {
            let mut guard = self.fd.readable().await?;
            loop {
                // SAFETY: buf is valid for its length; recv writes at most that much.
                let n = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        self.buf.as_mut_ptr().cast(),
                        self.buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => {
                            guard.clear_ready();
                            break;
                        }
                        Some(libc::EINTR) => continue,
                        Some(libc::ENOBUFS) => {
                            got.push(None);
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
                got.push(subsystem(&self.buf[..n as usize]));
            }
            if !got.is_empty() {
                return Ok(got);
            }
        }
    }
}

/// The `SUBSYSTEM=` of one uevent message (`ACTION@DEVPATH\0KEY=VALUE\0...`).
pub fn subsystem(msg: &[u8]) -> Option<String> {
    msg.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"SUBSYSTEM="))
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subsystem_is_read_from_a_message() {
        let m = b"add@/devices/platform/dummy_hcd.0/usb1/1-1\0ACTION=add\0DEVPATH=/devices/platform/dummy_hcd.0/usb1/1-1\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0SEQNUM=1234\0";
        assert_eq!(subsystem(m).as_deref(), Some("usb"));
        assert_eq!(subsystem(b"libudev\0\xfe\xed"), None);
    }

    #[tokio::test]
    async fn the_socket_opens_here() {
        // Receiving the kernel's events needs no privilege: this machine's tests run it.
        Uevents::open().expect("a uevent socket");
    }
}
