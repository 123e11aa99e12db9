//! The FUSE filesystem of a storage device: a directory holding `disk` (the whole medium) and
//! `p1`, `p2`, ... (one file per partition, sized exactly). Used in-process by `jmp attach`
//! and by the `jmp-mount` binary.
//!
//! One fuser thread reads the kernel's requests and never waits for the exporter: each read
//! or write is submitted to the storage [`Client`] with its reply, which is sent when the
//! answer arrives. So the kernel's many requests (read-ahead, async direct I/O at queue depth
//! 16, several programs) are all in flight on the link at once.
//!
//! **Page cache.** The kernel keeps the files' pages across opens (`FOPEN_KEEP_CACHE`) while
//! this attachment is the only writer: its own writes go through the cache (write-through,
//! so the exporter has every write as soon as `write(2)` returns). When the device's
//! generation changes (the board's power came on, or another channel, such as `jmp storage
//! flash`, wrote the medium) every file's cache is invalidated and the partition table read
//! again. Reads with `O_DIRECT` (fio `--direct=1`) bypass the cache as usual.

use super::client::{Client, Reply};
use super::parts::Partition;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use jmp_protocol::kinds::storage::Op;
use std::ffi::OsStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

/// Largest read and write the kernel sends (its FUSE limit is 256 pages).
pub const MAX_IO: u32 = 1 << 20;
/// How long the kernel may cache attributes and names. Short: a re-read partition table
/// changes them, and the invalidation covers the rest.
const TTL: Duration = Duration::from_secs(1);
const DISK_INO: u64 = 2;
/// How long a lookup waits for the first partition table before answering with what it has.
const TABLE_WAIT: Duration = Duration::from_secs(15);

/// One file of the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u64,
    pub offset: u64,
    pub len: u64,
}

/// The files as the partition table last said, and whether it has been read yet.
#[derive(Debug, Default)]
pub struct Table {
    pub entries: Vec<Entry>,
    pub ready: bool,
}

/// Shared between the filesystem (fuser's thread) and the code that reads the table.
#[derive(Debug, Default)]
pub struct Files {
    table: Mutex<Table>,
    changed: Condvar,
}

impl Files {
    /// Sets the files: `disk` of `size` bytes and the partitions.
    pub fn set(&self, size: u64, parts: &[Partition]) {
        let mut entries = vec![Entry {
            name: "disk".into(),
            ino: DISK_INO,
            offset: 0,
            len: size,
        }];
        entries.extend(parts.iter().map(|p| Entry {
            name: format!("p{}", p.number),
            ino: DISK_INO + u64::from(p.number),
            offset: p.offset,
            len: p.len,
        }));
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.entries = entries;
        t.ready = true;
        drop(t);
        self.changed.notify_all();
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.wait().entries.clone()
    }

    fn wait(&self) -> std::sync::MutexGuard<'_, Table> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (t, _) = self
            .changed
            .wait_timeout_while(t, TABLE_WAIT, |t| !t.ready)
            .unwrap_or_else(|e| e.into_inner());
        t
    }

    fn by_ino(&self, ino: u64) -> Option<Entry> {
        self.wait().entries.iter().find(|e| e.ino == ino).cloned()
    }

    fn by_name(&self, name: &OsStr) -> Option<Entry> {
        self.wait()
            .entries
            .iter()
            .find(|e| OsStr::new(&e.name) == name)
            .cloned()
    }
}

pub struct StorageFs {
    client: Client,
    files: Arc<Files>,
    uid: u32,
    gid: u32,
    writable: bool,
    started: SystemTime,
}

impl StorageFs {
    /// `owner`: who the files belong to; `writable`: the files' mode says so (the exporter
    /// decides each write anyway).
    pub fn new(client: Client, files: Arc<Files>, owner: (u32, u32), writable: bool) -> Self {
        StorageFs {
            client,
            files,
            uid: owner.0,
            gid: owner.1,
            writable,
            started: SystemTime::now(),
        }
    }

    fn attr(&self, ino: u64, size: u64, dir: bool) -> FileAttr {
        let perm = match (dir, self.writable) {
            (true, _) => 0o755,
            (false, true) => 0o644,
            (false, false) => 0o444,
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm,
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: MAX_IO,
            flags: 0,
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Filesystem for StorageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests, read-ahead of a whole request, many in the background, and direct
        // I/O that stays asynchronous (fio's QD16 reaches the exporter as 16 requests).
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_ASYNC_READ);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self.files.by_name(name) {
            Some(e) => reply.entry(&TTL, &self.attr(e.ino, e.len, false), fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &self.attr(1, 0, true));
        }
        match self.files.by_ino(ino.0) {
            Some(e) => reply.attr(&TTL, &self.attr(e.ino, e.len, false)),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino == INodeNo::ROOT {
            // chown/chmod/utimes of the mount point: its owner is the attachment's user.
            return reply.attr(&TTL, &self.attr(1, 0, true));
        }
        let Some(e) = self.files.by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // A medium has the size it has. Truncation is ignored, as a block device ignores
        // `O_TRUNC` (bmaptool and dd open their destination so); times are ignored too.
        let _ = size;
        reply.attr(&TTL, &self.attr(e.ino, e.len, false))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.files.by_ino(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if acc != libc::O_RDONLY && !self.writable {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(e) = self.files.by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if offset >= e.len || size == 0 {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(e.len - offset);
        self.client.submit(
            Op::Read {
                offset: e.offset + offset,
                len,
                compress: false,
            },
            None,
            Box::new(move |r| match r {
                Ok(Reply::Data(d)) => reply.data(&d),
                Ok(_) => reply.error(Errno::EIO),
                Err(f) => reply.error(errno(f.error.errno())),
            }),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(e) = self.files.by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if data.is_empty() {
            return reply.written(0);
        }
        if offset >= e.len {
            // A medium does not grow.
            return reply.error(Errno::ENOSPC);
        }
        let n = (data.len() as u64).min(e.len - offset) as usize;
        // The one copy of a write: fuser's buffer is reused for the next request.
        let payload = bytes::Bytes::copy_from_slice(&data[..n]);
        self.client.submit(
            Op::Write {
                offset: e.offset + offset,
                len: n as u64,
            },
            Some(payload),
            Box::new(move |r| match r {
                Ok(_) => reply.written(n as u32),
                Err(f) => reply.error(errno(f.error.errno())),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are write-through: nothing is held here at close.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.client.submit(
            Op::Flush,
            None,
            Box::new(move |r| match r {
                Ok(_) => reply.ok(),
                Err(f) => reply.error(errno(f.error.errno())),
            }),
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(e) = self.files.by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if offset.checked_add(length).is_none_or(|end| end > e.len) {
            return reply.error(Errno::ENOSPC);
        }
        let op = if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            Op::Zero {
                offset: e.offset + offset,
                len: length,
            }
        } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Allocating inside a medium: everything is allocated already.
            return reply.ok();
        } else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        if length == 0 {
            return reply.ok();
        }
        self.client.submit(
            op,
            None,
            Box::new(move |r| match r {
                Ok(_) => reply.ok(),
                Err(f) => reply.error(errno(f.error.errno())),
            }),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut all = vec![
            (1u64, FileType::Directory, ".".to_string()),
            (1u64, FileType::Directory, "..".to_string()),
        ];
        all.extend(
            self.files
                .entries()
                .into_iter()
                .map(|e| (e.ino, FileType::RegularFile, e.name)),
        );
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    // Extended attributes are not kept: ENOSYS tells the kernel once, and it stops asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let size = self.files.entries().first().map_or(0, |e| e.len);
        reply.statfs(size / 512, 0, 0, 0, 0, 512, 255, 512);
    }
}

/// Mount options of a storage mount. `others`: let other users in (root mounting for the
/// user who ran `sudo jmp attach`); file modes still apply (`default_permissions`).
pub fn config(device: &str, writable: bool, others: bool) -> fuser::Config {
    use fuser::MountOption as M;
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        M::FSName(format!("jmp:{device}")),
        M::Subtype("jmp-storage".into()),
        M::DefaultPermissions,
        M::NoDev,
        M::NoSuid,
        M::NoExec,
        M::NoAtime,
        if writable { M::RW } else { M::RO },
    ];
    c.acl = if others {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    c.n_threads = Some(1);
    c
}
