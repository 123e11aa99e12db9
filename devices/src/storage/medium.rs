//! The medium on the exporter: a block device or an image file, read and written with
//! `pread`/`pwritev` at the offsets the client asks (no seek position, so any number of
//! requests run at once on one descriptor). Every failure is a [`Failure`] naming the medium
//! and mapped to the wire's [`StorageError`].

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

/// Unit of a hash read: large enough to stream, small enough to stay out of the way.
const HASH_CHUNK: usize = 1 << 20;

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

    fn check_write(&self) -> Result<(), Failure> {
        if self.writable {
            return Ok(());
        }
        Err(Failure::new(
            StorageError::ReadOnly,
            format!("{} is read-only", self.path.display()),
        ))
    }

    pub fn read(&self, offset: u64, len: usize) -> Result<Bytes, Failure> {
        self.check_range(offset, len as u64)?;
        let mut buf = BytesMut::zeroed(len);
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
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
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail("reading", e)),
            }
        }
        Ok(buf.freeze())
    }

    /// Writes `data` (the chunks as they came off the link, written together with
    /// `pwritev`) at `offset`.
    pub fn write(&self, offset: u64, data: &[Bytes]) -> Result<(), Failure> {
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
            let end = (first + IOV_MAX).min(parts.len());
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
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), Failure> {
        self.check_write()?;
        self.check_range(offset, len)?;
        if self.block {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64 from the pointer, valid for the call.
            unsafe { ioctl::blkzeroout(self.file.as_raw_fd(), &range) }
                .map(|_| ())
                .map_err(|e| self.fail("zeroing", io::Error::from(e)))
        } else {
            self.punch(offset, len, "zeroing")
        }
    }

    /// TRIM: `BLKDISCARD` on a device, a punched hole in a file.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), Failure> {
        self.check_write()?;
        self.check_range(offset, len)?;
        if self.block {
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 from the pointer, valid for the call.
            unsafe { ioctl::blkdiscard(self.file.as_raw_fd(), &range) }
                .map(|_| ())
                .map_err(|e| self.fail("discarding", io::Error::from(e)))
        } else {
            self.punch(offset, len, "discarding")
        }
    }

    fn punch(&self, offset: u64, len: u64, what: &str) -> Result<(), Failure> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // A file system without hole punching: write the zeros instead.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = Bytes::from(vec![0u8; HASH_CHUNK]);
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(HASH_CHUNK as u64) as usize;
                    self.write(at, &[zeros.slice(..n)])?;
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
    pub fn hash(&self, offset: u64, len: u64) -> Result<[u8; 32], Failure> {
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
        let mut buf = AlignedBuf::new(HASH_CHUNK);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(HASH_CHUNK as u64) as usize;
            let chunk = &mut buf.as_mut()[..n];
            let file = match (&direct, aligned) {
                (Some(f), true) => f,
                _ => &self.file,
            };
            file.read_exact_at(chunk, at)
                .map_err(|e| self.fail("hashing", e))?;
            ctx.update(chunk);
            at += n as u64;
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
        assert_eq!((m.size, m.block, m.writable), (1 << 20, false, true));
        let data = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")];
        m.write(4096, &data).expect("write");
        assert_eq!(&m.read(4096, 11).expect("read")[..], b"hello world");
        m.zero(4096, 4096).expect("zero");
        assert_eq!(&m.read(4096, 11).expect("read")[..], &[0u8; 11]);
        let want = ring::digest::digest(&ring::digest::SHA256, &[0u8; 8192]);
        assert_eq!(&m.hash(0, 8192).expect("hash")[..], want.as_ref());
        let e = m.read((1 << 20) - 1, 2).expect_err("past the end");
        assert_eq!(e.error, StorageError::OutOfRange);
        assert!(e.message.contains(&p.display().to_string()), "{e}");
        let ro = Medium::open(&p, false).expect("open ro");
        let e = ro.write(0, &data).expect_err("read-only");
        assert_eq!(e.error, StorageError::ReadOnly);
        let _ = std::fs::remove_file(&p);
    }
}
