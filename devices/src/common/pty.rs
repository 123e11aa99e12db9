//! A pty whose slave a local program opens like a tty: the client's side of a serial console,
//! and of a CAN bus's slcan front.
//!
//! Two kernel facts carry this file (see docs/machine-facts.md): with packet mode (TIOCPKT) on the
//! master and EXTPROC on the slave, every tcsetattr by the local program produces an event on
//! the master, so line settings can be forwarded to the real port; and the master can read the
//! slave's termios, including arbitrary speeds through termios2. We hold no slave fd: then the
//! master reads EIO (and polls as hung up) while no program has the device open, which is how
//! the bridge knows when to hold output back and when to deliver it.

use bytes::{Bytes, BytesMut};
use nix::sys::inotify::WatchDescriptor;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tracing::debug;

/// Packet-mode status bit: the slave's termios changed (with EXTPROC set).
const TIOCPKT_IOCTL: u8 = 0x40;

pub struct Pty {
    master: AsyncFd<OwnedFd>,
    slave_path: PathBuf,
}

/// One read from the master.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    /// Bytes the local program wrote.
    Data(Bytes),
    /// The local program changed line settings (tcsetattr).
    SettingsChanged,
    /// Other packet-mode status (flush, start/stop): nothing to forward.
    Status(u8),
    /// No program has the device open (the last one closed it).
    Hangup,
}

/// Packet-mode status bit: the program discarded its pending input (tcflush, TCSAFLUSH).
pub const TIOCPKT_FLUSHREAD: u8 = 0x01;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn get_termios2(fd: libc::c_int) -> io::Result<libc::termios2> {
    // SAFETY: termios2 is plain data; TCGETS2 fills it completely.
    unsafe {
        let mut t: libc::termios2 = std::mem::zeroed();
        cvt(libc::ioctl(
            fd,
            libc::TCGETS2,
            &mut t as *mut libc::termios2,
        ))?;
        Ok(t)
    }
}

fn set_termios2(fd: libc::c_int, t: &libc::termios2) -> io::Result<()> {
    // SAFETY: t is a valid termios2 for the duration of the call.
    unsafe { cvt(libc::ioctl(fd, libc::TCSETS2, t as *const libc::termios2)).map(|_| ()) }
}

impl Pty {
    pub fn open() -> io::Result<Pty> {
        let pair = nix::pty::openpty(None, None).map_err(io::Error::from)?;
        let (master, slave) = (pair.master, pair.slave);
        let slave_path = nix::unistd::ttyname(&slave).map_err(io::Error::from)?;
        let sfd = slave.as_raw_fd();
        // SAFETY: plain termios calls on fds we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            cvt(libc::tcgetattr(sfd, &mut t))?;
            libc::cfmakeraw(&mut t);
            t.c_lflag |= libc::EXTPROC;
            t.c_cflag |= libc::CLOCAL | libc::CREAD;
            cvt(libc::tcsetattr(sfd, libc::TCSANOW, &t))?;
            let one: libc::c_int = 1;
            cvt(libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCPKT,
                &one as *const libc::c_int,
            ))?;
            let flags = cvt(libc::fcntl(master.as_raw_fd(), libc::F_GETFL))?;
            cvt(libc::fcntl(
                master.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            ))?;
        }
        // Only its owner may open it: devpts makes a new slave 0620 with group tty (for
        // `write` and `wall`), and another local user must not type into the board.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&slave_path, std::fs::Permissions::from_mode(0o600))?;
        }
        // Settings stay with the pty after our descriptor closes (the master keeps it alive).
        drop(slave);
        Ok(Pty {
            master: crate::async_fd(master)?,
            slave_path,
        })
    }

    /// The kernel's name of the slave (`/dev/pts/N`).
    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    /// Gives the slave to `uid:gid`, readable and writable by that user only.
    pub fn set_owner(&self, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(&self.slave_path, Some(uid), Some(gid))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.slave_path, std::fs::Permissions::from_mode(0o600))
    }

    pub async fn read(&self, buf: &mut BytesMut) -> io::Result<Packet> {
        match crate::common::fdio::read(&self.master, buf, 16 * 1024, true).await {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => Ok(match buf[0] {
                0 => {
                    let _ = buf.split_to(1);
                    Packet::Data(buf.split().freeze())
                }
                status if status & TIOCPKT_IOCTL != 0 => Packet::SettingsChanged,
                status => Packet::Status(status),
            }),
            // The master reads EIO while no program has the slave open.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Packet::Hangup),
            Err(e) => Err(e),
        }
    }

    /// Registers the master with the reactor afresh. Needed whenever a program opens the
    /// device after a hangup: tokio takes the hangup as a permanent end of reading, so the old
    /// registration would report readable forever and reads would spin on EAGAIN.
    pub fn reregister(&mut self) -> io::Result<()> {
        let dup = self.master.get_ref().try_clone()?;
        // The old registration (and its descriptor) goes; the duplicate keeps the pty open.
        self.master = crate::async_fd(dup)?;
        Ok(())
    }

    /// A watch for programs opening the slave (see [`OpenWatch`]).
    pub fn open_watch(&self, fallback: Duration) -> OpenWatch {
        OpenWatch::new(&self.slave_path, fallback)
    }

    /// Whether a program has the slave open now (the master is not hung up).
    pub fn slave_open(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.master.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n >= 0 && pfd.revents & libc::POLLHUP == 0
    }

    /// Writes some of `data` (waits until the pty can take at least one byte).
    pub async fn write_some(&self, data: &[u8]) -> io::Result<usize> {
        crate::common::fdio::write_some(&self.master, data).await
    }

    /// Writes what the pty takes now, without waiting: the count, 0 when it is full.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        crate::common::fdio::try_write(&self.master, data)
    }

    /// A waiter for room in the pty, for a writer that must not wait in a write (see
    /// [`crate::common::fdio::RoomWaiter`]); hold it only while the pty is full.
    pub fn room_waiter(&self) -> io::Result<crate::common::fdio::RoomWaiter> {
        crate::common::fdio::RoomWaiter::new(&self.master)
    }

    /// Throws away what was written for the local program and not read: opens the slave for
    /// a moment and flushes its input. A pty keeps its line discipline's buffer while the master
    /// lives, so without this the next program to open the device would first read what the
    /// previous one left unread. Call it only while no other writer is writing to the pty.
    pub fn discard_unread(&self) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&self.slave_path)?;
        // SAFETY: tcflush on a descriptor we own for the duration of the call.
        cvt(unsafe { libc::tcflush(f.as_raw_fd(), libc::TCIFLUSH) })?;
        Ok(())
    }

    /// Writes all of `data` for the local program to read (waits while the pty is full).
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        crate::common::fdio::write_all(&self.master, data).await
    }

    /// The slave's termios as the local program set it (through the master; termios2, so
    /// arbitrary speeds read back exactly).
    pub fn termios(&self) -> io::Result<libc::termios2> {
        get_termios2(self.master.get_ref().as_raw_fd())
    }

    /// Presets the speed the local program will read back (the exporter's configured baud), so
    /// that `stty -F` or pyserial show the board's real rate before anyone changes it.
    pub fn set_speed(&self, baud: u32) -> io::Result<()> {
        let fd = self.master.get_ref().as_raw_fd();
        let mut t = get_termios2(fd)?;
        t.c_cflag &= !libc::CBAUD;
        t.c_cflag |= libc::BOTHER;
        t.c_ispeed = baud;
        t.c_ospeed = baud;
        set_termios2(fd, &t)
    }

    /// Whether settings changes are still reported as events. A program that writes its own
    /// lflag from scratch clears EXTPROC; then it is set again (through the master, which
    /// changes the slave's termios), so that the next change is reported too.
    pub fn ensure_extproc(&self) -> io::Result<bool> {
        let fd = self.master.get_ref().as_raw_fd();
        let mut t = get_termios2(fd)?;
        if t.c_lflag & libc::EXTPROC != 0 {
            return Ok(true);
        }
        t.c_lflag |= libc::EXTPROC;
        set_termios2(fd, &t)?;
        Ok(false)
    }
}

/// A symlink at a stable path pointing at the pty's slave; removed on drop if it still points
/// there (a newer attachment may have taken the path over).
pub struct StableLink {
    path: PathBuf,
    target: PathBuf,
}

impl StableLink {
    /// Places the link at `path`, which [`crate::places::entry`] has prepared (its folder
    /// checked, a stale link removed).
    pub fn create(path: &Path, target: &Path) -> io::Result<StableLink> {
        std::os::unix::fs::symlink(target, path)?;
        Ok(StableLink {
            path: path.to_path_buf(),
            target: target.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StableLink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.path).ok().as_deref() == Some(self.target.as_path()) {
            let _ = std::fs::remove_file(&self.path);
            if let Some(dir) = self.path.parent() {
                // Only removes the exporter's folder when it is empty.
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// The process's one inotify instance for [`OpenWatch`]es, read by a thread of its own.
///
/// One instance per process, not per pty: `fs.inotify.max_user_instances` (128 by default) is
/// shared by all of the user's programs, and an exporter that declares many consoles must not
/// be able to use it up (64 consoles attached twice would have taken all 128). Each watched
/// slave costs one watch instead (`max_user_watches`, in the tens of thousands). A thread, not
/// a reactor registration: watches are made from any runtime (each test has its own, and
/// a runtime may end while the process goes on), and a [`Notify`] wakes a task of any runtime.
struct Watcher {
    ino: nix::sys::inotify::Inotify,
    /// Watch descriptor → the watches waiting on it. One inode has one descriptor per
    /// instance, so two watches of the same slave share it (and its removal waits for the last).
    subs: Mutex<HashMap<WatchDescriptor, Vec<Sub>>>,
    next: AtomicU64,
    /// The reading thread ended (a read failed): watches poll from then on.
    dead: AtomicBool,
}

/// A watch's subscription: its id and what wakes it.
type Sub = (u64, Arc<Notify>);

/// The watcher, started on first use; `None` after a failed start (tried again next time).
static WATCHER: Mutex<Option<Arc<Watcher>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watcher {
    fn get() -> io::Result<Arc<Watcher>> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let mut g = lock(&WATCHER);
        if let Some(w) = g.as_ref() {
            if !w.dead.load(Ordering::Acquire) {
                return Ok(w.clone());
            }
        }
        // Blocking reads: the thread sleeps in read(2) until an event comes.
        let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let w = Arc::new(Watcher {
            ino,
            subs: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            dead: AtomicBool::new(false),
        });
        let t = w.clone();
        std::thread::Builder::new()
            .name("jmp-pty-opens".into())
            .spawn(move || t.read_loop())?;
        *g = Some(w.clone());
        Ok(w)
    }

    fn read_loop(&self) {
        use nix::sys::inotify::AddWatchFlags;
        loop {
            match self.ino.read_events() {
                Ok(events) => {
                    let mut subs = lock(&self.subs);
                    for e in events {
                        let wd = e.wd;
                        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            // Events were lost (the one queue serves every pty of the
                            // process): any watch may have missed its open, so all look again.
                            for (_, n) in subs.values().flatten() {
                                n.notify_one();
                            }
                            continue;
                        }
                        if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                            // The watch is gone (its slave was removed, or we removed it):
                            // whoever still waits on it looks once more, then polls.
                            if let Some(list) = subs.remove(&wd) {
                                for (_, n) in list {
                                    n.notify_one();
                                }
                            }
                            continue;
                        }
                        for (_, n) in subs.get(&wd).into_iter().flatten() {
                            n.notify_one();
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    debug!("reading inotify events: {e}; open watches poll from now on");
                    self.dead.store(true, Ordering::Release);
                    for (_, list) in lock(&self.subs).drain() {
                        for (_, n) in list {
                            n.notify_one();
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Watches `slave` for opens; (watch descriptor, subscription id).
    fn add(&self, slave: &Path, notify: Arc<Notify>) -> io::Result<(WatchDescriptor, u64)> {
        use nix::sys::inotify::AddWatchFlags;
        // Under the lock: a removal of the same inode's descriptor cannot come in between.
        let mut subs = lock(&self.subs);
        let wd = self.ino.add_watch(slave, AddWatchFlags::IN_OPEN)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        subs.entry(wd).or_default().push((id, notify));
        Ok((wd, id))
    }

    /// Whether watch `wd` still exists.
    fn has(&self, wd: WatchDescriptor) -> bool {
        lock(&self.subs).contains_key(&wd)
    }

    fn remove(&self, wd: WatchDescriptor, id: u64) {
        let mut subs = lock(&self.subs);
        let Some(list) = subs.get_mut(&wd) else {
            // Already gone with its slave (IN_IGNORED).
            return;
        };
        list.retain(|(i, _)| *i != id);
        if list.is_empty() {
            subs.remove(&wd);
            if let Err(e) = self.ino.rm_watch(wd) {
                debug!("removing an open watch: {e}");
            }
        }
    }
}

/// Wakes a bridge whose device no program has open when one may have opened it, so that a
/// closed device costs no wake-ups: an idle `jmp attach` used to check every console 50 times a
/// second. The kernel sends inotify's `IN_OPEN` for every open of the slave's node, under any
/// name (the dev-dir link included); the watch is held for the bridge's life, so an open that
/// comes while the bridge is busy is kept (as a [`Notify`] permit), never missed. A wake-up
/// only says "look": the caller checks [`Pty::slave_open`], which stays the truth (an open and
/// close in between, or our own descriptors, wake it for nothing). All watches of the process
/// share one inotify instance ([`Watcher`]). Without inotify (`fs.inotify.max_user_instances`
/// or `max_user_watches` used up) it falls back to polling every `fallback`.
pub struct OpenWatch {
    /// The watcher, the watch's descriptor and this subscription's id.
    sub: Option<(Arc<Watcher>, WatchDescriptor, u64)>,
    notify: Arc<Notify>,
    poll: tokio::time::Interval,
    /// The first wait returns at once: an open before the watch existed sent no event.
    primed: bool,
}

impl OpenWatch {
    fn new(slave: &Path, fallback: Duration) -> OpenWatch {
        let notify = Arc::new(Notify::new());
        let sub = Watcher::get().and_then(|w| {
            let (wd, id) = w.add(slave, notify.clone())?;
            Ok((w, wd, id))
        });
        let sub = match sub {
            Ok(s) => Some(s),
            Err(e) => {
                debug!(
                    "cannot watch {} for opens ({e}); checking every {fallback:?} instead",
                    slave.display()
                );
                None
            }
        };
        let mut poll = tokio::time::interval(fallback);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        OpenWatch {
            sub,
            notify,
            poll,
            primed: true,
        }
    }

    /// Whether opens are watched (false: polled).
    pub fn watched(&self) -> bool {
        self.sub
            .as_ref()
            .is_some_and(|(w, wd, _)| !w.dead.load(Ordering::Acquire) && w.has(*wd))
    }

    /// Returns once a program may have opened the slave since the last call, and at once the
    /// first time (cancel-safe: a wake-up not taken stays for the next call).
    pub async fn wait(&mut self) {
        if std::mem::take(&mut self.primed) {
            return;
        }
        if self.watched() {
            self.notify.notified().await;
        } else {
            // Also after the watch went away (the reading thread ended, the slave's node
            // was removed): whoever waited was woken once, and polls from then on.
            self.poll.tick().await;
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        if let Some((w, wd, id)) = self.sub.take() {
            w.remove(wd, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A closed device's bridge sleeps until a program opens the slave (no polling), and the
    /// open wakes it. The clock is paused: the runtime jumps it ahead whenever nothing is ready,
    /// so "no wake-up in an hour" is checked without waiting, and a fallback poll would fail it.
    #[tokio::test(start_paused = true)]
    async fn a_closed_pty_sleeps_until_a_program_opens_it() {
        let pty = Pty::open().expect("pty");
        let mut w = pty.open_watch(Duration::from_millis(20));
        assert!(w.watched(), "inotify is unavailable here");
        w.wait().await; // the first wait returns at once: look before sleeping
        let hour = Duration::from_secs(3600);
        assert!(
            tokio::time::timeout(hour, w.wait()).await.is_err(),
            "woke with nobody opening the device"
        );
        // The open's event comes from the watcher's thread: with the clock paused, the
        // runtime would jump past the hang guard before that thread runs.
        tokio::time::resume();
        let slave = open_slave(pty.slave_path());
        tokio::time::timeout(Duration::from_secs(60), w.wait())
            .await
            .expect("the open did not wake the watch");
        assert!(pty.slave_open());
        drop(slave);
    }

    fn open_slave(p: &Path) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(p)
            .expect("open slave")
    }

    /// This process's inotify instances (each is a descriptor on `anon_inode:inotify`).
    fn inotify_instances() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.as_os_str() == "anon_inode:inotify")
            .count()
    }

    /// Review finding L5: a hostile exporter declaring many consoles must not use up the
    /// user's inotify instances (128 by default, shared by all their programs). Many watches
    /// share the process's one instance, and an open wakes exactly the watch of its pty.
    #[tokio::test]
    async fn many_watches_share_one_inotify_instance_and_each_wakes() {
        const N: usize = 40;
        let ptys: Vec<Pty> = (0..N).map(|_| Pty::open().expect("pty")).collect();
        let mut watches: Vec<OpenWatch> = ptys
            .iter()
            .map(|p| p.open_watch(Duration::from_secs(3600)))
            .collect();
        // Two watches of one slave share its watch descriptor; both must wake.
        let mut twin = ptys[0].open_watch(Duration::from_secs(3600));
        twin.wait().await;
        for w in &mut watches {
            assert!(w.watched(), "inotify is unavailable here");
            w.wait().await; // the first wait returns at once
        }
        // Every watch of the process (other tests' too) shares one instance.
        assert_eq!(inotify_instances(), 1, "one inotify instance per process");
        let guard = Duration::from_secs(60);
        for (i, p) in ptys.iter().enumerate() {
            let slave = open_slave(p.slave_path());
            tokio::time::timeout(guard, watches[i].wait())
                .await
                .unwrap_or_else(|_| panic!("opening pty {i} did not wake its watch"));
            if i == 0 {
                tokio::time::timeout(guard, twin.wait())
                    .await
                    .expect("the second watch of pty 0 did not wake");
            }
            // The event was dispatched before the wake-up above: a watch it wrongly woke
            // would hold a permit now, and its wait would return at once.
            let next = (i + 1) % N;
            // (A timeout polls its future before its clock.)
            assert!(
                tokio::time::timeout(Duration::ZERO, watches[next].wait())
                    .await
                    .is_err(),
                "opening pty {i} woke the watch of pty {next}"
            );
            drop(slave);
        }
        // A dropped watch is removed; the other watch of the same slave still wakes.
        drop(watches.remove(0));
        let slave = open_slave(ptys[0].slave_path());
        tokio::time::timeout(guard, twin.wait())
            .await
            .expect("pty 0's remaining watch did not wake after the other was dropped");
        drop(slave);
        drop(watches);
        drop(twin);
        assert_eq!(inotify_instances(), 1, "the instance stays for the process");
    }

    #[tokio::test]
    async fn bytes_both_ways_and_settings_events() {
        let pty = Pty::open().expect("pty");
        assert!(!pty.slave_open(), "nobody has it open yet");
        let mut buf = BytesMut::new();
        assert_eq!(pty.read(&mut buf).await.expect("read"), Packet::Hangup);
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pty.slave_path())
            .expect("open slave");
        let all: Vec<u8> = (0..=255u8).collect();
        assert!(pty.slave_open());
        let mut pty = pty;
        pty.reregister().expect("fresh readiness after the hangup");
        slave.write_all(&all).expect("write");
        let mut got = Vec::new();
        while got.len() < all.len() {
            match pty.read(&mut buf).await.expect("read") {
                Packet::Data(d) => got.extend_from_slice(&d),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, all, "raw mode passes every byte value unchanged");

        pty.write_all(&all).await.expect("write master");
        let mut back = vec![0u8; 256];
        slave.read_exact(&mut back).expect("read slave");
        assert_eq!(back, all);

        // A settings change by the program is an event; the new speed can be read back.
        let fd = slave.as_raw_fd();
        let mut t = get_termios2(fd).expect("termios2");
        t.c_cflag &= !libc::CBAUD;
        t.c_cflag |= libc::BOTHER | libc::CSTOPB | libc::CRTSCTS;
        t.c_ispeed = 250_000;
        t.c_ospeed = 250_000;
        set_termios2(fd, &t).expect("set");
        loop {
            match pty.read(&mut buf).await.expect("read") {
                Packet::SettingsChanged => break,
                Packet::Status(_) => continue,
                Packet::Hangup => panic!("hung up while open"),
                Packet::Data(d) => panic!("unexpected data {d:?}"),
            }
        }
        let t = pty.termios().expect("termios");
        assert_eq!(t.c_ospeed, 250_000);
        assert_ne!(t.c_cflag & libc::CSTOPB, 0);
        assert_ne!(t.c_cflag & libc::CRTSCTS, 0);
        drop(slave);
        assert!(
            !pty.slave_open(),
            "closing the last slave fd hangs the master up"
        );
        // Settings survive the close: the next program finds them.
        assert_eq!(pty.termios().expect("termios").c_ospeed, 250_000);
    }

    #[test]
    fn stable_link_replaces_stale_links_and_cleans_up() {
        let base = std::env::temp_dir().join(format!("jmp-link-{}", std::process::id()));
        let dir = crate::places::exporter_dir(&base, "exp").expect("dir");
        std::os::unix::fs::symlink("/nonexistent", dir.join("console")).expect("stale link");
        {
            let path = crate::places::entry(&dir, "console").expect("entry");
            let l = StableLink::create(&path, Path::new("/dev/null")).expect("link");
            assert_eq!(
                std::fs::read_link(l.path()).expect("readlink"),
                Path::new("/dev/null")
            );
        }
        assert!(
            std::fs::symlink_metadata(dir.join("console")).is_err(),
            "removed on drop"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[tokio::test]
    async fn a_new_pty_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let p = Pty::open().expect("pty");
        let mode = std::fs::metadata(p.slave_path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}
