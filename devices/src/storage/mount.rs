//! A storage device mounted: the FUSE session, keeping its files in step with the medium
//! (the partition table, read at the start and again whenever the generation changes, and
//! the kernel's cache dropped then), and unmounting when dropped, lazily if a program still
//! has a file open. Stale mounts of killed processes are cleaned by
//! [`crate::places::mount_point`] before mounting.
//!
//! Unmounting ends the FUSE connection first ([`abort_connection`]): a copy of the mount in
//! another mount namespace (`unshare -m`, `ip netns exec`, a container started meanwhile)
//! keeps the connection open after our umount, and the session thread, which only ends when
//! the kernel says the connection is gone, would wait for that namespace to go.

use super::client::{Client, Reply};
use super::fs::{self, Files, StorageFs};
use super::parts;
use jmp_protocol::kinds::storage::{DeviceParams, Op};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{info, warn};

/// A live mount; dropping it unmounts.
pub struct Mounted {
    path: PathBuf,
    /// Taken by [`Mounted::unmount`] (the bridge's drop) or the last reference's drop: the
    /// bridge must not leave the unmount to whichever blocking task holds a reference last.
    session: std::sync::Mutex<Option<fuser::BackgroundSession>>,
    pub files: Arc<Files>,
    notifier: fuser::Notifier,
    /// The FUSE connection's number (the mount's device number), as
    /// `/sys/fs/fuse/connections/` names it; `None` if the mount could not be looked at.
    conn: Option<u64>,
}

impl Mounted {
    /// Mounts the filesystem of `client` at `path` (which must exist and be empty).
    pub fn mount(
        path: &Path,
        client: Client,
        owner: (u32, u32),
        writable: bool,
    ) -> io::Result<Mounted> {
        let files = Arc::new(Files::default());
        let others = nix::unistd::geteuid().is_root() && owner.0 != 0;
        let fs = StorageFs::new(client.clone(), files.clone(), owner, writable);
        let cfg = fs::config(client.device(), writable, others);
        let session = fuser::Session::new(fs, path, &cfg)?.spawn()?;
        let notifier = session.notifier();
        // A getattr of the root: answered by the fuser thread without waiting on anything.
        let dev = std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
        if let Ok(dev) = dev {
            raise_readahead(dev);
        }
        info!(device = client.device(), "mounted at {}", path.display());
        Ok(Mounted {
            path: path.to_path_buf(),
            session: std::sync::Mutex::new(Some(session)),
            files,
            notifier,
            conn: dev.ok().map(connection_number),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The FUSE connection's number, as fusectl names it (`None`: the mount could not be
    /// looked at after mounting).
    pub fn connection(&self) -> Option<u64> {
        self.conn
    }

    /// Drops the kernel's cached pages and names of every file (the medium changed behind
    /// this mount).
    pub fn invalidate(&self) {
        for e in self.files.entries() {
            let _ = self.notifier.inval_inode(fuser::INodeNo(e.ino), 0, -1);
            let _ = self
                .notifier
                .inval_entry(fuser::INodeNo::ROOT, OsStr::new(&e.name));
        }
    }
}

/// Read-ahead of the mount, in KiB: four 1 MiB requests in flight on a sequential read.
const READAHEAD_KB: u32 = 4096;

/// The kernel offers a FUSE mount only 128 KiB of read-ahead at INIT (the negotiated maximum
/// cannot be raised there), which keeps one small request in flight on a sequential read.
/// Root can raise it on the mount's backing device info (`dev`: the mount's device number);
/// for others it stays as it is.
fn raise_readahead(dev: u64) {
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    if let Err(e) = std::fs::write(&knob, READAHEAD_KB.to_string()) {
        tracing::debug!("{knob}: {e}; read-ahead stays at the kernel's default");
    }
}

impl Mounted {
    /// Unmounts now (once; later calls and the drop do nothing), without waiting on anything
    /// outside this process: the connection is ended first, so copies of the mount in other
    /// mount namespaces die with it (their users get ENOTCONN) and the session thread ends.
    /// Other holders of the mount (an invalidation or a table read in flight) find their
    /// requests to the kernel failing, which they ignore.
    pub fn unmount(&self) {
        let taken = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(s) = taken else {
            return;
        };
        let aborted = match self.conn {
            Some(conn) => abort_connection(conn, &self.path),
            None => Err(io::Error::other("its connection number is unknown")),
        };
        match aborted {
            // The session thread's next read fails (ENODEV): the join cannot wait long.
            Ok(()) => {
                if let Err(e) = s.umount_and_join() {
                    // Busy (a program has a file open, a loop device sits on a partition):
                    // detach it now; the kernel ends it when the last user lets go.
                    warn!(
                        "unmounting {}: {e}; detaching it lazily",
                        self.path.display()
                    );
                    let _ = crate::places::detach(&self.path);
                }
            }
            Err(e) => {
                // Unmounted here (fuser does it lazily for a user), and the session thread
                // left to end when the last copy of the mount goes, or with this process.
                warn!(
                    "cannot end the FUSE connection of {} ({e}); unmounting it here only: a copy in another mount namespace stays open until this process exits",
                    self.path.display()
                );
                drop(s);
                if crate::places::is_mount_point(&self.path) {
                    let _ = crate::places::detach(&self.path);
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The FUSE connection number of a mount whose device number is `dev` (the kernel's own
/// encoding of `st_dev`: major << 20 | minor), as `/sys/fs/fuse/connections/` names it.
fn connection_number(dev: u64) -> u64 {
    (nix::sys::stat::major(dev) << 20) | nix::sys::stat::minor(dev)
}

/// Where fusectl is mounted on a systemd host.
pub const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Ends FUSE connection `conn`, mounted (among other places) at `path`: every mount of it,
/// in every mount namespace, then answers ENOTCONN, and its server's reads fail with ENODEV.
/// Through fusectl when it is mounted (systemd mounts it; the mount's owner may write its
/// `abort`), else, as root, by [`abort_by_force`].
pub fn abort_connection(conn: u64, path: &Path) -> io::Result<()> {
    let fusectl = Path::new(FUSECTL);
    if fusectl.join(conn.to_string()).is_dir() {
        return abort_through_fusectl(fusectl, conn);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("fusectl is not mounted at {FUSECTL}"),
        ));
    }
    abort_by_force(path)
}

/// Ends connection `conn` through fusectl mounted at `fusectl`.
pub fn abort_through_fusectl(fusectl: &Path, conn: u64) -> io::Result<()> {
    std::fs::write(fusectl.join(conn.to_string()).join("abort"), "1")
}

/// Ends the FUSE connection mounted at `path` by a forced unmount, which aborts it, of the
/// copy of the mount in a private mount namespace made for that: nothing else is unmounted.
/// Needs root.
pub fn abort_by_force(path: &Path) -> io::Result<()> {
    let path = path.to_path_buf();
    // A thread of its own: unsharing the mount namespace changes only the calling thread's,
    // and this one ends right after (its namespace with it).
    std::thread::Builder::new()
        .name("fuse-abort".into())
        .spawn(move || -> io::Result<()> {
            use nix::mount::{MntFlags, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            // Nothing done in this namespace may propagate back.
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            // The kernel aborts the connection before it looks at whether the mount is busy.
            match nix::mount::umount2(&path, MntFlags::MNT_FORCE) {
                Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })?
        .join()
        .map_err(|_| io::Error::other("the thread ending the FUSE connection panicked"))?
}

/// Reads the medium's partition table through `client` (blocking: call from a blocking
/// thread, with the runtime that serves the client's channel in `rt`).
pub fn read_table(
    client: &Client,
    rt: &tokio::runtime::Handle,
    p: &DeviceParams,
) -> Vec<parts::Partition> {
    let read = |off: u64, buf: &mut [u8]| -> io::Result<()> {
        let r = rt.block_on(client.call(
            Op::Read {
                offset: off,
                len: buf.len() as u64,
                compress: false,
            },
            None,
        ));
        match r {
            Ok(Reply::Data(d)) if d.len() == buf.len() => {
                buf.copy_from_slice(&d);
                Ok(())
            }
            Ok(_) => Err(io::Error::other("short read")),
            Err(f) => Err(io::Error::other(f.message)),
        }
    };
    parts::read(&read, p.size, p.block_size)
}

/// Invalidation waits for pages the kernel has locked, some of them for reads whose answers
/// this runtime delivers: never do it on the runtime's own thread.
async fn invalidate(mounted: &Arc<Mounted>) {
    let m = mounted.clone();
    let _ = tokio::task::spawn_blocking(move || m.invalidate()).await;
}

/// Keeps `mounted`'s files in step with the medium for as long as it runs: reads the table
/// now, and again (after dropping the kernel's cache) whenever the generation or the
/// exporter instance changes. `settled` says, after each, which (instance, generation) the
/// cache has caught up with.
///
/// Why that is enough for a reader to see a flash's bytes once `settled` covers the
/// generation the flash ended with: the exporter sends the change on this mount's channel
/// after every answer to a read it ran before the flash's last write was done, so those
/// answers reach the kernel first; invalidation then drops every cached page, and waits for
/// pages still locked by reads in flight and drops them too. Reads after it go to the
/// exporter and see the written data.
///
/// Holds the mount weakly: the bridge's reference is the one whose drop unmounts.
pub async fn follow(
    client: Client,
    mounted: std::sync::Weak<Mounted>,
    settled: tokio::sync::watch::Sender<crate::CacheState>,
) {
    let mut params = client.watch_params();
    let mut seen: Option<(u64, u64)> = None;
    loop {
        // The pair as `set_origin` set it: the instance is read under the watch's borrow.
        let (p, instance) = {
            let g = params.borrow_and_update();
            (*g, client.instance())
        };
        if let Some(p) = p {
            let Some(mounted) = mounted.upgrade() else {
                return;
            };
            let key = (instance, p.generation);
            if seen != Some(key) {
                if seen.is_some() {
                    info!(
                        device = client.device(),
                        "the medium changed (generation {}): dropping the cache", p.generation
                    );
                    invalidate(&mounted).await;
                }
                seen = Some(key);
                let c = client.clone();
                let rt = tokio::runtime::Handle::current();
                let parts = tokio::task::spawn_blocking(move || read_table(&c, &rt, &p))
                    .await
                    .unwrap_or_default();
                mounted.files.set(p.size, &parts);
                invalidate(&mounted).await;
                settled.send_replace(crate::CacheState {
                    instance,
                    generation: Some(p.generation),
                });
            }
        }
        if params.changed().await.is_err() {
            return;
        }
    }
}
