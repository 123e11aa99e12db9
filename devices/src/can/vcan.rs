//! SocketCAN, both sides: the raw CAN FD socket the exporter's `type: can, interface:` backend
//! reads and writes (with the kernel's receive timestamps, error frames and the bus state over
//! netlink), and the client's vcan front: a vcan interface `jmpN` (or `--can-name`) created
//! over netlink, removed when the attachment ends. A lock file per interface, held with
//! `flock` for the interface's life, tells a crashed run's leftovers from a live attachment's:
//! at start, interfaces whose lock nobody holds are removed.

use jmp_protocol::kinds::can::{BusState, Frame, BRS, ERROR, ESI, EXTENDED, FD, RTR};
use socketcan::{CanAnyFrame, CanInterface, EmbeddedFrame, Frame as _, SocketOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

const CAN_EFF_FLAG: u32 = 0x8000_0000;
const CAN_RTR_FLAG: u32 = 0x4000_0000;
const CAN_ERR_FLAG: u32 = 0x2000_0000;
const CANFD_BRS: u8 = 0x01;
const CANFD_ESI: u8 = 0x02;

/// Why a raw CAN socket cannot be made here, or `None` if it can.
///
/// A kernel without SocketCAN and a sandbox that forbids AF_CAN (systemd's
/// `RestrictAddressFamilies`) both answer EAFNOSUPPORT; the kernel's own CAN files tell
/// them apart, so the operator is sent to the right fix.
pub fn can_unavailable() -> Option<String> {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_CAN, libc::SOCK_RAW, libc::CAN_RAW) };
    if fd >= 0 {
        // SAFETY: closing the descriptor just made.
        unsafe { libc::close(fd) };
        return None;
    }
    let err = io::Error::last_os_error();
    let kernel_has_it = ["/proc/net/can", "/sys/module/can", "/sys/module/can_raw"]
        .iter()
        .any(|p| Path::new(p).exists());
    Some(if kernel_has_it {
        format!(
            "this process may not open CAN sockets (socket(AF_CAN): {err}) although the \
             kernel has SocketCAN: a sandbox forbids AF_CAN (under systemd, regenerate the \
             drop-in with `jmpd --print-systemd`, which grants it for `type: can` devices)"
        )
    } else {
        format!("this machine's kernel has no SocketCAN (socket(AF_CAN): {err})")
    })
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Opens a raw CAN FD socket on `interface`, with receive timestamps and every error frame.
pub fn open_socket(interface: &str) -> Result<socketcan::tokio::CanFdSocket, String> {
    if let Some(why) = can_unavailable() {
        return Err(format!("{why}, so {interface} cannot be opened"));
    }
    if ifindex(interface).is_none() {
        return Err(format!("interface {interface} does not exist on this host"));
    }
    let s = socketcan::tokio::CanFdSocket::open(interface)
        .map_err(|e| format!("cannot open {interface}: {e}"))?;
    s.set_recv_timestamp(true)
        .map_err(|e| format!("{interface}: cannot enable receive timestamps: {e}"))?;
    s.set_error_filter_accept_all()
        .map_err(|e| format!("{interface}: cannot receive error frames: {e}"))?;
    Ok(s)
}

/// A frame read from SocketCAN, in jmp's form (`None`: one jmp cannot represent).
pub fn from_socketcan(f: &CanAnyFrame) -> Option<Frame> {
    let raw = f.id_word();
    let id = raw & 0x1fff_ffff;
    let ext = if raw & CAN_EFF_FLAG != 0 { EXTENDED } else { 0 };
    match f {
        CanAnyFrame::Normal(d) => Frame::new(id, ext, d.data()).ok(),
        CanAnyFrame::Remote(r) => Frame::remote(id, ext != 0, r.dlc() as u8).ok(),
        CanAnyFrame::Error(e) => {
            let mut d = [0u8; 8];
            let src = e.data();
            d[..src.len().min(8)].copy_from_slice(&src[..src.len().min(8)]);
            Some(Frame::error(id, d))
        }
        CanAnyFrame::Fd(fd) => {
            let flags =
                FD | ext | if fd.is_brs() { BRS } else { 0 } | if fd.is_esi() { ESI } else { 0 };
            Frame::new(id, flags, fd.data()).ok()
        }
    }
}

/// A frame as the kernel's `can_frame` or `canfd_frame`.
enum Raw {
    Classic(libc::can_frame),
    Fd(libc::canfd_frame),
}

impl Raw {
    fn bytes(&self) -> &[u8] {
        // SAFETY: both are plain C structs; their bytes are what the kernel reads.
        unsafe {
            match self {
                Raw::Classic(c) => std::slice::from_raw_parts(
                    (c as *const libc::can_frame).cast::<u8>(),
                    std::mem::size_of::<libc::can_frame>(),
                ),
                Raw::Fd(c) => std::slice::from_raw_parts(
                    (c as *const libc::canfd_frame).cast::<u8>(),
                    std::mem::size_of::<libc::canfd_frame>(),
                ),
            }
        }
    }
}

fn to_socketcan(f: &Frame) -> Raw {
    let mut can_id = f.id;
    if f.flags & EXTENDED != 0 {
        can_id |= CAN_EFF_FLAG;
    }
    if f.flags & ERROR != 0 {
        can_id = (f.id & 0x1fff_ffff) | CAN_ERR_FLAG;
    }
    if f.is_fd() {
        // SAFETY: canfd_frame is plain data; all-zero is a valid value.
        let mut c: libc::canfd_frame = unsafe { std::mem::zeroed() };
        c.can_id = can_id;
        c.len = f.len;
        c.flags = if f.flags & BRS != 0 { CANFD_BRS } else { 0 }
            | if f.flags & ESI != 0 { CANFD_ESI } else { 0 };
        c.data[..f.data().len()].copy_from_slice(f.data());
        Raw::Fd(c)
    } else {
        if f.flags & RTR != 0 {
            can_id |= CAN_RTR_FLAG;
        }
        // SAFETY: can_frame is plain data; all-zero is a valid value.
        let mut c: libc::can_frame = unsafe { std::mem::zeroed() };
        c.can_id = can_id;
        c.can_dlc = f.len.min(8);
        let d = f.data();
        c.data[..d.len().min(8)].copy_from_slice(&d[..d.len().min(8)]);
        Raw::Classic(c)
    }
}

/// The controller's state and error counters over netlink (`None` for a virtual bus).
pub fn bus_state(interface: &str) -> Option<(BusState, u32, u32)> {
    let i = CanInterface::open(interface).ok()?;
    let st = i.state().ok()??;
    let (tec, rec) = i
        .berr_counter()
        .ok()
        .flatten()
        .map(|b| (u32::from(b.txerr), u32::from(b.rxerr)))
        .unwrap_or((0, 0));
    use socketcan::nl::CanState as S;
    let s = match st {
        S::ErrorActive => BusState::ErrorActive,
        S::ErrorWarning => BusState::ErrorWarning,
        S::ErrorPassive => BusState::ErrorPassive,
        S::BusOff => BusState::BusOff,
        _ => BusState::Stopped,
    };
    Some((s, tec, rec))
}

/// Sets a real controller's bit rate if it differs (the interface must go down for that).
/// A virtual interface has none and is left alone.
pub fn apply_bitrate(interface: &str, bitrate: u32) {
    let Ok(i) = CanInterface::open(interface) else {
        return;
    };
    match i.bit_rate() {
        Ok(Some(b)) if b == bitrate => {}
        Ok(Some(_)) => {
            let r = i
                .bring_down()
                .and_then(|_| i.set_bitrate(bitrate, None))
                .and_then(|_| i.bring_up());
            match r {
                Ok(()) => info!(%interface, bitrate, "bit rate set"),
                Err(e) => warn!(%interface, bitrate, "cannot set the bit rate: {e}"),
            }
        }
        _ => {}
    }
}

/// The client's vcan interface: created at attach, removed on drop.
///
/// Frames for local readers are written by one thread pinned to one CPU. A vcan hands each
/// written frame to the receive backlog of the CPU the writer runs on; when the kernel defers
/// that work (a loaded machine) and the writer has moved to another CPU meanwhile, two frames
/// can reach readers in the wrong order. One writer on one CPU keeps them in order.
pub struct VcanFront {
    pub name: String,
    pub sock: socketcan::tokio::CanFdSocket,
    writer: Writer,
    lock_path: PathBuf,
    _lock: std::fs::File,
}

/// Pins the calling thread to the CPU it runs on now.
fn pin_to_current_cpu() {
    // SAFETY: sched_getcpu has no preconditions; cpu_set_t is plain data, zeroed then filled
    // with CPU_SET for a CPU number the kernel just reported.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            warn!(
                "cannot pin the vcan writer to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Frames written to a SocketCAN interface in order, by one thread pinned to one CPU (see
/// [`VcanFront`] for why); the exporter's SocketCAN backend writes through one too. It writes
/// on a duplicate of the reading socket's descriptor: the same socket, so the kernel does not
/// loop the frames back to the reader (a frame read back would be sent to the bus again).
pub struct Writer(std::sync::mpsc::SyncSender<Frame>);

impl Writer {
    pub fn start(name: &str, sock: &impl AsRawFd) -> Result<Writer, String> {
        // SAFETY: dup of a descriptor that is open for the duration of the call.
        let fd = unsafe { libc::dup(sock.as_raw_fd()) };
        if fd < 0 {
            return Err(format!("cannot use {name}: {}", io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let (tx, rx) = std::sync::mpsc::sync_channel(4096);
        writer_thread(name.to_string(), fd, rx)?;
        Ok(Writer(tx))
    }

    /// Queues `f`; false when the queue is full or the writer ended (the interface is gone).
    pub fn send(&self, f: &Frame) -> bool {
        self.0.try_send(*f).is_ok()
    }
}

/// Writes one frame on the (non-blocking) socket, waiting out a full socket or transmit queue.
fn write_raw(fd: &std::os::fd::OwnedFd, f: &Frame) -> io::Result<()> {
    let raw = to_socketcan(f);
    let b = raw.bytes();
    let mut full = 0;
    loop {
        // SAFETY: writing `b.len()` bytes from a live slice.
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        if n == b.len() as isize {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            Some(libc::ENOBUFS) if full < 200 => {
                full += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}

fn writer_thread(
    name: String,
    fd: std::os::fd::OwnedFd,
    rx: std::sync::mpsc::Receiver<Frame>,
) -> Result<(), String> {
    let what = format!("can-{name}");
    std::thread::Builder::new()
        .name(what.clone())
        .spawn(move || {
            pin_to_current_cpu();
            while let Ok(f) = rx.recv() {
                match write_raw(&fd, &f) {
                    Ok(()) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENETDOWN)) => {
                        return
                    }
                    Err(e) => warn!(interface = %name, "cannot write {f}: {e}"),
                }
            }
        })
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    Ok(())
}

fn try_lock(path: &Path) -> io::Result<Option<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(Some(f))
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

fn delete_interface(name: &str) -> Result<(), String> {
    let i = CanInterface::open(name).map_err(|e| e.to_string())?;
    i.delete().map_err(|(_, e)| e.to_string())
}

/// Removes interfaces an earlier run created and left behind (its lock is free).
pub fn cleanup_stale(lock_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(lock_dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".lock"))
            .map(str::to_string)
        else {
            continue;
        };
        if super::spec::check_ifname("interface", &name).is_err() {
            continue;
        }
        if let Ok(Some(_held)) = try_lock(&p) {
            if ifindex(&name).is_some() {
                match delete_interface(&name) {
                    Ok(()) => {
                        info!(interface = %name, "removed a vcan interface a previous jmp left behind")
                    }
                    Err(e) => warn!(interface = %name, "cannot remove a stale vcan interface: {e}"),
                }
            }
            let _ = std::fs::remove_file(&p);
        }
    }
}

impl VcanFront {
    /// Creates the interface `name` (or the first free `jmpN`) and opens a socket on it.
    /// `lock_dir` holds the lock files (created if missing).
    pub fn create(name: Option<&str>, lock_dir: &Path) -> Result<VcanFront, String> {
        if let Some(why) = can_unavailable() {
            return Err(why);
        }
        crate::places::ensure_dir(lock_dir)
            .map_err(|e| format!("cannot use {}: {e}", lock_dir.display()))?;
        cleanup_stale(lock_dir);
        let name = match name {
            Some(n) => n.to_string(),
            None => (0..1000)
                .map(|i| format!("jmp{i}"))
                .find(|n| ifindex(n).is_none() && !lock_dir.join(format!("{n}.lock")).exists())
                .ok_or("no free jmpN interface name")?,
        };
        super::spec::check_ifname("interface", &name)?;
        let lock_path = lock_dir.join(format!("{name}.lock"));
        let lock = try_lock(&lock_path)
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?
            .ok_or_else(|| format!("{name} is in use by another jmp attach"))?;
        if ifindex(&name).is_some() {
            return Err(format!(
                "an interface {name} already exists and is not jmp's; choose another with --can-name"
            ));
        }
        let i = CanInterface::create_vcan(&name, None)
            .map_err(|e| format!("cannot create vcan interface {name}: {e}"))?;
        if let Err(e) = i.bring_up() {
            let _ = delete_interface(&name);
            return Err(format!("cannot bring {name} up: {e}"));
        }
        let sock = match socketcan::tokio::CanFdSocket::open(&name) {
            Ok(s) => s,
            Err(e) => {
                let _ = delete_interface(&name);
                return Err(format!("cannot open {name}: {e}"));
            }
        };
        // A full queue means local readers do not keep up: the caller counts the loss.
        let writer = match Writer::start(&name, &sock) {
            Ok(w) => w,
            Err(e) => {
                let _ = delete_interface(&name);
                return Err(e);
            }
        };
        Ok(VcanFront {
            name,
            sock,
            writer,
            lock_path,
            _lock: lock,
        })
    }

    pub async fn read(&self) -> io::Result<Option<Frame>> {
        let f = self.sock.read_frame().await?;
        Ok(from_socketcan(&f))
    }

    /// Queues `f` for local readers; false when the queue is full (readers fell behind).
    pub fn write(&self, f: &Frame) -> bool {
        self.writer.send(f)
    }
}

impl Drop for VcanFront {
    fn drop(&mut self) {
        if let Err(e) = delete_interface(&self.name) {
            warn!(interface = %self.name, "cannot remove the vcan interface: {e}");
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}
