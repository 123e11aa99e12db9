//! The kernel's device events (a `NETLINK_KOBJECT_UEVENT` socket, what udev listens to): USB
//! devices coming and going on the lab host, and device nodes appearing for an imported
//! device on the client. An event only says that something changed: the truth is read from
//! sysfs again, so a lost event (a full socket buffer: `ENOBUFS`) costs nothing but a rescan.
//! Chosen over polling sysfs because a board that resets comes back in milliseconds and is
//! seen at once, and an idle lab host costs nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use crate::BoxFuture;

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

    /// Waits for events and returns those that came (`None` in the list for an overflow,
    /// whose events are unknown). Drains whatever is queued, so a burst is one wake-up.
    /// Messages not from the kernel (a sender port other than 0) are ignored: only a
    /// privileged process can send on this group, and what the kernel says is all we act on.
    pub async fn next(&mut self) -> io::Result<Vec<Option<Uevent>>> {
        let mut got = Vec::new();
        loop {
            let mut guard = self.fd.readable().await?;
            loop {
                // SAFETY: sockaddr_nl is plain data; all-zero is a valid start.
                let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                // SAFETY: buf is valid for its length; recvfrom writes at most that much, and
                // at most `from_len` bytes of the sender's address.
                let n = unsafe {
                    libc::recvfrom(
                        guard.get_inner().as_raw_fd(),
                        self.buf.as_mut_ptr().cast(),
                        self.buf.len(),
                        libc::MSG_DONTWAIT,
                        (&mut from as *mut libc::sockaddr_nl).cast(),
                        &mut from_len,
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
                if from.nl_pid != 0 {
                    continue;
                }
                if let Some(ev) = Uevent::parse(&self.buf[..n as usize]) {
                    got.push(Some(ev));
                }
            }
            if !got.is_empty() {
                return Ok(got);
            }
        }
    }
}

impl UeventSource for Uevents {
    fn next(&mut self) -> BoxFuture<'_, io::Result<Vec<Option<Uevent>>>> {
        Box::pin(Uevents::next(self))
    }
}

/// Where a reader's kernel events come from: [`Uevents`], or a test's own.
pub trait UeventSource: Send {
    /// As [`Uevents::next`].
    fn next(&mut self) -> BoxFuture<'_, io::Result<Vec<Option<Uevent>>>>;
}

/// One kernel event: what happened (`add`, `remove`, `bind`, `unbind`, `change`, ...) to which
/// device (its path under /sys), of which subsystem and device type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub subsystem: Option<String>,
    pub devtype: Option<String>,
}

impl Uevent {
    /// Parses one kernel message (`ACTION@DEVPATH\0KEY=VALUE\0...`); `None` for anything
    /// else (udev's re-sent messages begin `libudev\0`).
    pub fn parse(msg: &[u8]) -> Option<Uevent> {
        let mut fields = msg.split(|b| *b == 0);
        let head = fields.next()?;
        if !head.contains(&b'@') {
            return None;
        }
        let (mut action, mut devpath, mut subsystem, mut devtype) = (None, None, None, None);
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        for f in fields {
            if let Some(v) = f.strip_prefix(b"ACTION=") {
                action = Some(text(v));
            } else if let Some(v) = f.strip_prefix(b"DEVPATH=") {
                devpath = Some(text(v));
            } else if let Some(v) = f.strip_prefix(b"SUBSYSTEM=") {
                subsystem = Some(text(v));
            } else if let Some(v) = f.strip_prefix(b"DEVTYPE=") {
                devtype = Some(text(v));
            }
        }
        Some(Uevent {
            action: action?,
            devpath: devpath?,
            subsystem,
            devtype,
        })
    }

    /// The bus id (`3-1`) of a USB device (not an interface, whose id has a colon) on a
    /// `vhci-hcd` controller that this event is about.
    pub fn vhci_usb_device(&self) -> Option<&str> {
        if self.subsystem.as_deref() != Some("usb")
            || self.devtype.as_deref() != Some("usb_device")
            || !self.devpath.starts_with("/devices/platform/vhci_hcd.")
        {
            return None;
        }
        let busid = self.devpath.rsplit('/').next()?;
        (!busid.is_empty() && !busid.contains(':') && busid.contains('-')).then_some(busid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_read() {
        let m = b"add@/devices/platform/dummy_hcd.0/usb1/1-1\0ACTION=add\0DEVPATH=/devices/platform/dummy_hcd.0/usb1/1-1\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0SEQNUM=1234\0";
        assert_eq!(
            Uevent::parse(m),
            Some(Uevent {
                action: "add".into(),
                devpath: "/devices/platform/dummy_hcd.0/usb1/1-1".into(),
                subsystem: Some("usb".into()),
                devtype: Some("usb_device".into()),
            })
        );
        assert_eq!(Uevent::parse(b"libudev\0\xfe\xed"), None);
        assert_eq!(Uevent::parse(b"add@/x\0SUBSYSTEM=usb\0"), None, "no action");
    }

    #[test]
    fn only_usb_devices_on_vhci_name_a_bus_id() {
        let ev = |path: &str, sub: &str, ty: &str| Uevent {
            action: "bind".into(),
            devpath: path.into(),
            subsystem: Some(sub.into()),
            devtype: Some(ty.into()),
        };
        let dev = ev("/devices/platform/vhci_hcd.0/usb3/3-1", "usb", "usb_device");
        assert_eq!(dev.vhci_usb_device(), Some("3-1"));
        let hub = ev("/devices/platform/vhci_hcd.0/usb3/3-1/3-1.2", "usb", "usb_device");
        assert_eq!(hub.vhci_usb_device(), Some("3-1.2"));
        for other in [
            ev("/devices/platform/vhci_hcd.0/usb3/3-1/3-1:1.0", "usb", "usb_interface"),
            ev("/devices/platform/dummy_hcd.0/usb1/1-1", "usb", "usb_device"),
            ev("/devices/platform/vhci_hcd.0/usb3/3-1/3-1:1.0/tty/ttyACM0", "tty", "usb_device"),
            ev("/devices/platform/vhci_hcd.0/usb3", "usb", "usb_device"),
        ] {
            assert_eq!(other.vhci_usb_device(), None, "{other:?}");
        }
    }

    #[tokio::test]
    async fn the_socket_opens_here() {
        // Receiving the kernel's events needs no privilege: this machine's tests run it.
        Uevents::open().expect("a uevent socket");
    }
}
