//! The medium on the exporter: a block device or an image file, read and written with
//! `pread`/`pwritev` at the offsets the client asks (no seek position, so any number of
//! requests run at once on one descriptor). Every failure is a [`Failure`] naming the medium
//! and mapped to the wire's [`StorageError`].
//!
//! Work runs in pieces of at most [`CHUNK`] bytes (a hash of a whole card, a zeroing of it),
//! and between pieces it checks its [`Job`]: when whoever asked is gone it stops with
//! [`StorageError::Io`] ("stopped"), and it reports each piece as progress.

use crate::budget::Job;
use bytes::{Bytes, BytesMut};
use jmp_protocol::kinds::storage::StorageError;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a request on the medium failed, for the client's program (the code) and its user (the
/// message names the medium).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub error: StorageError,
    pub message: String,
}

impl Failure {
    pub fn new(error: StorageError, message: impl Into<String>) -> Self {
        Failure {
            error,
            message: message.into(),
        }
    }
}

mod ioctl {
    // <linux/fs.h>: BLKGETSIZE64 _IOR(0x12,114,size_t), BLKSSZGET _IO(0x12,104),
    // BLKROGET _IO(0x12,94), BLKDISCARD _IO(0x12,119), BLKZEROOUT _IO(0x12,127).
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_read_bad!(blkroget, nix::request_code_none!(0x12, 94), libc::c_int);
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// Largest `iovec` count one `pwritev` takes (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

/// Unit of a hash read, and of every other piece of work between two looks at its [`Job`]:
/// large enough to stream, small enough that a stopped job ends within milliseconds.
pub const CHUNK: usize = 1 << 20;

/// Largest range one `BLKZEROOUT`/`BLKDISCARD` covers: the kernel cannot be interrupted
/// inside one, so a whole card is done in pieces with a look at the job between them.
const RANGE_PIECE: u64 = 256 << 20;

#[derive(Debug)]
pub struct Medium {
    path: PathBuf,
    file: File,
    pub size: u64,
    pub block_size: u32,
    /// A block device (else an image file).
    pub block: bool,
    /// Opened for writing, and the device is not read-only.
    pub writable: bool,
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl Medium {
    /// Opens `path`, for writing if `writable` (a block device whose read-only switch is set
    /// is opened read-only instead, and says so in `writable`).
    pub fn open(path: &Path, writable: bool) -> io::Result<Medium> {
        let open = |rw: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(rw)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
        };
        let (file, mut writable) = match open(writable) {
            Ok(f) => (f, writable),
            // A card with its lock switch set, a read-only loop device.
            Err(e) if writable && errno_of(&e) == libc::EROFS => (open(false)?, false),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let (size, block_size, block) = if ft.is_block_device() {
            let fd = file.as_raw_fd();
            let mut size = 0u64;
            let mut ssz: libc::c_int = 512;
            let mut ro: libc::c_int = 0;
            // SAFETY: each ioctl writes one value of the pointed-to type, which lives on
            // this stack frame; `fd` is open for the whole call.
            unsafe {
                ioctl::blkgetsize64(fd, &mut size)?;
                ioctl::blksszget(fd, &mut ssz)?;
                ioctl::blkroget(fd, &mut ro)?;
            }
            if ro != 0 {
                writable = false;
            }
            (size, u32::try_from(ssz).unwrap_or(512), true)
        } else if ft.is_file() {
            // Disk images use 512-byte sectors whatever the host's file system block is.
            (meta.len(), 512, false)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a block device nor a regular file",
                    path.display()
                ),
            ));
        };
        Ok(Medium {
            path: path.to_path_buf(),
            file,
            size,
            block_size,
            block,
            writable,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, what: &str, e: io::Error) -> Failure {
        let p = self.path.display();
        let error = match errno_of(&e) {
            libc::ENOSPC | libc::EDQUOT => {
                return Failure::new(
                    StorageError::NoSpace,
                    format!("{what} {p}: the lab host's disk is full ({e})"),
                )
            }
            libc::EROFS | libc::EPERM | libc::EACCES => StorageError::ReadOnly,
            libc::ENODEV | libc::ENXIO | libc::ENOMEDIUM | libc::ESHUTDOWN => {
                return Failure::new(
                    StorageError::Gone,
                    format!("{what} {p}: the medium is gone ({e})"),
                )
            }
            libc::EOPNOTSUPP | libc::ENOTTY => StorageError::Unsupported,
            _ => StorageError::Io,
        };
        Failure::new(error, format!("{what} {p}: {e}"))
    }

    /// Checks that `[offset, offset+len)` lies on the medium.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), Failure> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Failure::new(
                StorageError::OutOfRange,
                format!(
                    "{}: {len} bytes at {offset} are past the end of the medium ({} bytes)",
                    self.path.display(),
                    self.size
                ),
            )),
        }
    }

    /// Fails when the job's asker is gone (its channel or session ended).
    fn check_job(&self, job: &Job) -> Result<(), Failure> {
        if job.stopped() {
            return Err(Failure::new(
                StorageError::Io,
                format!(
                    "{}: stopped: the channel or session that asked has ended",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    fn check_write(&self) -> Result<(), Failure> {
        if self.writable {
            return Ok(());
        }
        Err(Failure::new(
            StorageError::ReadOnly,
            format!("{} is read-only", self.path.display()),
        ))
    }

    /// `len` bytes at `offset` if the page cache holds all of them, read without waiting for
    /// the device (`preadv2` with `RWF_NOWAIT`; the medium is opened without `O_DIRECT`, so
    /// the flag means "only from the cache"). `None` when any of it would wait, or on any
    /// error: the caller then reads with [`Medium::read`] on a blocking thread, which reports
    /// errors. For small reads on an async thread: a cached 4 KiB costs a copy, not two
    /// thread hand-offs.
    pub fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        if len == 0 || self.check_range(offset, len as u64).is_err() {
            return None;
        }
        let off = libc::off_t::try_from(offset).ok()?;
        let mut buf = BytesMut::zeroed(len);
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: one iovec over `buf`, which is `len` bytes long and outlives the call; the
        // descriptor is this medium's open file.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        // A short read (part cached) is as good as a miss: the blocking read does it whole.
        (usize::try_from(n).ok() == Some(len)).then(|| buf.freeze())
    }

    pub fn read(&self, offset: u64, len: usize, job: &Job) -> Result<Bytes, Failure> {
        self.check_range(offset, len as u64)?;
        let mut buf = ReadBuf::take(len);
        let mut done = 0;
        while done < len {
            self.check_job(job)?;
            let end = (done + CHUNK).min(len);
            match self.file.read_at(&mut buf[done..end], offset + done as u64) {
                Ok(0) => {
                    // A file shrunk under us, a device that lost its tail.
                    return Err(Failure::new(
                        StorageError::Io,
                        format!(
                            "reading {}: unexpected end at {}",
                            self.path.display(),
                            offset + done as u64
                        ),
                    ));
                }
                Ok(n) => {
                    done += n;
                    job.progress(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail("reading", e)),
            }
        }
        Ok(buf.freeze())
    }

    /// Writes `data` (the chunks as they came off the link, written together with
    /// `pwritev`) at `offset`.
    pub fn write(&self, offset: u64, data: &[Bytes], job: &Job) -> Result<(), Failure> {
        self.check_write()?;
        let len: usize = data.iter().map(|b| b.len()).sum();
        self.check_range(offset, len as u64)?;
        let mut parts: Vec<&[u8]> = data
            .iter()
            .map(|b| &b[..])
            .filter(|b| !b.is_empty())
            .collect();
        let mut at = offset;
        let mut first = 0;
        while first < parts.len() {
            self.check_job(job)?;
            // At most IOV_MAX slices and about CHUNK bytes per call.
            let mut end = first;
            let mut bytes = 0;
            while end < parts.len() && end - first < IOV_MAX && (bytes < CHUNK || end == first) {
                bytes += parts[end].len();
                end += 1;
            }
            let iov: Vec<io::IoSlice> = parts[first..end]
                .iter()
                .map(|p| io::IoSlice::new(p))
                .collect();
            let n = match nix::sys::uio::pwritev(&self.file, &iov, at as libc::off_t) {
                Ok(0) => {
                    return Err(Failure::new(
                        StorageError::Io,
                        format!("writing {}: no progress at {at}", self.path.display()),
                    ))
                }
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.fail("writing", io::Error::from(e))),
            };
            at += n as u64;
            job.progress(n as u64);
            // Skip what was written, possibly part of one slice.
            let mut left = n;
            while left > 0 && first < parts.len() {
                if parts[first].len() <= left {
                    left -= parts[first].len();
                    first += 1;
                } else {
                    parts[first] = &parts[first][left..];
                    left = 0;
                }
            }
        }
        Ok(())
    }

    /// Makes the range read back as zeros: `BLKZEROOUT` on a device, a punched hole in a file
    /// (which also gives the lab host its space back).
    pub fn zero(&self, offset: u64, len: u64, job: &Job) -> Result<(), Failure> {
        self.check_write()?;
        self.check_range(offset, len)?;
        if self.block {
            self.pieces(offset, len, job, |range| {
                // SAFETY: BLKZEROOUT reads two u64 from the pointer, valid for the call.
                unsafe { ioctl::blkzeroout(self.file.as_raw_fd(), range) }
                    .map(|_| ())
                    .map_err(|e| self.fail("zeroing", io::Error::from(e)))
            })
        } else {
            self.punch(offset, len, "zeroing", job)
        }
    }

    /// TRIM: `BLKDISCARD` on a device, a punched hole in a file.
    pub fn discard(&self, offset: u64, len: u64, job: &Job) -> Result<(), Failure> {
        self.check_write()?;
        self.check_range(offset, len)?;
        if self.block {
            self.pieces(offset, len, job, |range| {
                // SAFETY: BLKDISCARD reads two u64 from the pointer, valid for the call.
                unsafe { ioctl::blkdiscard(self.file.as_raw_fd(), range) }
                    .map(|_| ())
                    .map_err(|e| self.fail("discarding", io::Error::from(e)))
            })
        } else {
            self.punch(offset, len, "discarding", job)
        }
    }

    /// Runs `op` over `[offset, offset+len)` in pieces of [`RANGE_PIECE`], looking at the job
    /// between them.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        job: &Job,
        op: impl Fn(&[u64; 2]) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            self.check_job(job)?;
            let n = (end - at).min(RANGE_PIECE);
            op(&[at, n])?;
            job.progress(n);
            at += n;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64, what: &str, job: &Job) -> Result<(), Failure> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        self.check_job(job)?;
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => {
                job.progress(len);
                Ok(())
            }
            // A file system without hole punching: write the zeros instead.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = Bytes::from(vec![0u8; CHUNK]);
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(CHUNK as u64) as usize;
                    self.write(at, &[zeros.slice(..n)], job)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(self.fail(what, io::Error::from(e))),
        }
    }

    pub fn flush(&self) -> Result<(), Failure> {
        self.file.sync_data().map_err(|e| self.fail("flushing", e))
    }

    /// SHA-256 of the range as the medium holds it. On a block device the range is read with
    /// `O_DIRECT` from a descriptor of its own: a hash over the host's page cache would vouch
    /// for data the card may never have stored. An image file *is* the medium, so its page
    /// cache is the truth.
    pub fn hash(&self, offset: u64, len: u64, job: &Job) -> Result<[u8; 32], Failure> {
        self.check_range(offset, len)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let direct = if self.block {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                .open(&self.path)
                .ok()
        } else {
            None
        };
        let bs = u64::from(self.block_size.max(512));
        let aligned = direct.is_some() && offset.is_multiple_of(bs) && len.is_multiple_of(bs);
        let mut buf = AlignedBuf::new(CHUNK);
        let mut at = offset;
        while at < offset + len {
            self.check_job(job)?;
            let n = (offset + len - at).min(CHUNK as u64) as usize;
            let chunk = &mut buf.as_mut()[..n];
            let file = match (&direct, aligned) {
                (Some(f), true) => f,
                _ => &self.file,
            };
            file.read_exact_at(chunk, at)
                .map_err(|e| self.fail("hashing", e))?;
            ctx.update(chunk);
            at += n as u64;
            job.progress(n as u64);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Ok(out)
    }
}

/// A page-aligned buffer, as `O_DIRECT` reads need.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .unwrap_or_else(|_| std::alloc::Layout::new::<[u8; 4096]>());
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Idle read buffers of [`CHUNK`] bytes kept for the next large read. A fresh megabyte from
/// the allocator is fresh pages: the read faults each of its 256 pages in (the kernel zeroes
/// each), and freeing it unmaps them again. Measured on a sequential read through a mount
/// (2026-12-08), page faults and unmapping were a fifth of jmpd's CPU time; a buffer used
/// before costs neither.
static READ_POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Idle buffers kept at most (the buffers in use are bounded by the channels' budgets).
const READ_POOL_KEEP: usize = 16;
/// Reads from this size take a pooled buffer; smaller ones are cheap to allocate.
const READ_POOL_MIN: usize = 128 << 10;

/// A read's buffer: pooled (given back when the last `Bytes` of it is dropped, after QUIC has
/// sent it) or allocated for this read.
enum ReadBuf {
    Pooled(Pooled),
    Plain(BytesMut),
}

/// A pooled buffer and how much of it a read filled.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = READ_POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < READ_POOL_KEEP {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

impl ReadBuf {
    fn take(len: usize) -> ReadBuf {
        if !(READ_POOL_MIN..=CHUNK).contains(&len) {
            return ReadBuf::Plain(BytesMut::zeroed(len));
        }
        let buf = READ_POOL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0; CHUNK]);
        ReadBuf::Pooled(Pooled { buf, len })
    }

    fn freeze(self) -> Bytes {
        match self {
            ReadBuf::Pooled(p) => Bytes::from_owner(p),
            ReadBuf::Plain(b) => b.freeze(),
        }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBuf::Pooled(p) => &p.buf[..p.len],
            ReadBuf::Plain(b) => b,
        }
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            ReadBuf::Pooled(p) => &mut p.buf[..p.len],
            ReadBuf::Plain(b) => b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(tag: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("jmp-medium-{tag}-{}.img", std::process::id()));
        let f = File::create(&p).expect("create");
        f.set_len(size).expect("size");
        p
    }

    #[test]
    fn reads_writes_zeros_and_hashes_an_image_file() {
        let p = image("rw", 1 << 20);
        let m = Medium::open(&p, true).expect("open");
        let j = &Job::detached();
        assert_eq!((m.size, m.block, m.writable), (1 << 20, false, true));
        let data = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")];
        m.write(4096, &data, j).expect("write");
        assert_eq!(&m.read(4096, 11, j).expect("read")[..], b"hello world");
        m.zero(4096, 4096, j).expect("zero");
        assert_eq!(&m.read(4096, 11, j).expect("read")[..], &[0u8; 11]);
        let want = ring::digest::digest(&ring::digest::SHA256, &[0u8; 8192]);
        assert_eq!(&m.hash(0, 8192, j).expect("hash")[..], want.as_ref());
        let e = m.read((1 << 20) - 1, 2, j).expect_err("past the end");
        assert_eq!(e.error, StorageError::OutOfRange);
        assert!(e.message.contains(&p.display().to_string()), "{e}");
        let ro = Medium::open(&p, false).expect("open ro");
        let e = ro.write(0, &data, j).expect_err("read-only");
        assert_eq!(e.error, StorageError::ReadOnly);
        let _ = std::fs::remove_file(&p);
    }

    /// Large reads reuse pooled buffers: a buffer given back holds the last read's bytes, and
    /// a shorter read into it returns exactly its own bytes; a buffer is back in the pool once
    /// the last `Bytes` of it is dropped, not before.
    #[test]
    fn pooled_read_buffers_return_exactly_each_reads_bytes() {
        let p = image("pool", 4 << 20);
        let m = Medium::open(&p, true).expect("open");
        let j = &Job::detached();
        let a = vec![0xaa_u8; CHUNK];
        let b: Vec<u8> = (0..300u32 << 10).map(|i| (i % 251) as u8).collect();
        m.write(0, &[Bytes::from(a.clone())], j).expect("write a");
        m.write(CHUNK as u64, &[Bytes::from(b.clone())], j).expect("write b");
        for _ in 0..3 {
            let got = m.read(0, CHUNK, j).expect("read a");
            let half = got.slice(..CHUNK / 2);
            drop(got);
            // A slice still holds the buffer: the next read must not get it.
            let got_b = m.read(CHUNK as u64, b.len(), j).expect("read b");
            assert_eq!(&half[..], &a[..CHUNK / 2], "a held buffer was reused");
            assert_eq!(got_b.len(), b.len());
            assert_eq!(&got_b[..], &b[..], "a reused buffer leaked another read's bytes");
            drop(half);
            drop(got_b);
        }
        let _ = std::fs::remove_file(&p);
    }

    /// `read_cached` answers from the page cache only: the data when every page is cached,
    /// nothing once the pages are dropped (until a blocking read brings them back), nothing
    /// out of range.
    #[test]
    fn read_cached_answers_only_from_the_page_cache() {
        use std::io::Write;
        let p = std::env::temp_dir().join(format!("jmp-medium-cached-{}.img", std::process::id()));
        let data: Vec<u8> = (0..256u32 << 10)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut f = File::create(&p).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("sync");
        let m = Medium::open(&p, false).expect("open");
        let j = &Job::detached();
        // Just written: in the page cache.
        let got = m.read_cached(8192, 4096).expect("cached after writing");
        assert_eq!(&got[..], &data[8192..8192 + 4096]);
        // Clean pages of a synced file are dropped by DONTNEED.
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("fadvise");
        // Dropped pages are a miss, except that the kernel starts read-ahead for a RWF_NOWAIT
        // miss, and when that I/O completes before it checks the page (a fast disk, or this
        // thread preempted in between, as happened under load), the read is answered from it.
        // Either way nothing blocked, and the bytes are right: asserting None here was flaky.
        if let Some(got) = m.read_cached(8192, 4096) {
            assert_eq!(&got[..], &data[8192..8192 + 4096], "dropped, then read ahead");
        }
        assert_eq!(&m.read(8192, 4096, j).expect("read")[..], &data[8192..8192 + 4096]);
        let got = m.read_cached(8192, 4096).expect("cached after the blocking read");
        assert_eq!(&got[..], &data[8192..8192 + 4096]);
        assert_eq!(m.read_cached((256 << 10) - 1, 2), None, "past the end");
        assert_eq!(m.read_cached(0, 0), None);
        let _ = std::fs::remove_file(&p);
    }

    #[tokio::test]
    async fn stopped_work_ends_at_its_next_chunk_and_says_so() {
        use crate::budget::{SessionBudget, Usage, LIMITS};
        let p = image("stop", 64 << 20);
        let m = Medium::open(&p, true).expect("open");
        let usage = std::sync::Arc::new(Usage::default());
        let (job, guard) = SessionBudget::new(LIMITS, usage.clone()).channel().jobs();
        m.hash(0, 4 << 20, &job).expect("hash");
        let done = usage.job_bytes.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(done, 4 << 20, "progress counts every byte hashed");
        guard.stop();
        for e in [
            m.hash(0, 64 << 20, &job).map(|_| ()),
            m.read(0, 8 << 20, &job).map(|_| ()),
            m.write(0, &[Bytes::from(vec![1u8; 4 << 20])], &job),
            m.zero(0, 64 << 20, &job),
        ] {
            let e = e.expect_err("stopped");
            assert!(e.message.contains("stopped"), "{e}");
        }
        assert_eq!(
            usage.job_bytes.load(std::sync::atomic::Ordering::Relaxed),
            done,
            "nothing more was done once stopped"
        );
        let _ = std::fs::remove_file(&p);
    }
}
