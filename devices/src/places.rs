//! Local paths made from names the exporter sent. The one place that turns an exporter's and a
//! device's name into a path under the device directory, so that every kind's local objects
//! (pty links, slcan links, mount points) stay inside the directory jmp owns:
//!
//! - both names must follow `jmp_protocol::name` (no `/`, no `..`, no leading `-` or `.`);
//! - the exporter's folder is created with `mkdir` (never through a symlink) and must be a real
//!   directory owned by this user, not writable by others;
//! - an existing entry is replaced only if it is a symlink inside that folder (a stale link of
//!   an earlier run), never followed.

use jmp_protocol::name;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

fn refuse(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// Checks that `dir` is a real directory (not a symlink) owned by this user and not writable
/// by group or others.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(dir)?;
    if m.file_type().is_symlink() || !m.is_dir() {
        return Err(refuse(format!(
            "{} is not a directory (a symlink or a file is in its place); not using it",
            dir.display()
        )));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if m.uid() != euid {
        return Err(refuse(format!(
            "{} belongs to uid {}, not to this user (uid {euid}); not using it",
            dir.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "{} is writable by others (mode {:o}); not using it",
            dir.display(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Creates `dir` (and its parents) if missing, mode 0755 for the last component, and checks it
/// with [`check_private_dir`].
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::DirBuilder::new().mode(0o755).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    check_private_dir(dir)
}

/// `base/<exporter>`, created and checked. `base` is the device directory (`/dev/jmp`).
pub fn exporter_dir(base: &Path, exporter: &str) -> io::Result<PathBuf> {
    name::check("exporter name", exporter).map_err(|e| refuse(e.to_string()))?;
    ensure_dir(base)?;
    let dir = base.join(exporter);
    ensure_dir(&dir)?;
    Ok(dir)
}

/// `dir/<device>` for a new entry: the name checked, and a stale symlink there removed. Any
/// other file in the way is an error (it is not ours to replace).
pub fn entry(dir: &Path, device: &str) -> io::Result<PathBuf> {
    name::check("device name", device).map_err(|e| refuse(e.to_string()))?;
    let path = dir.join(device);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(&path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a symlink; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    Ok(path)
}

/// `<base>/current`: a link to the folder of the attachment made last, so that a script can
/// name `/dev/jmp/current/console` without knowing the exporter. Removed when that attachment
/// ends (if it still points at its folder). With several attachments at once it names the
/// newest; `jmp shell` gives each command its own board's paths instead.
pub struct CurrentLink {
    path: PathBuf,
    target: PathBuf,
}

impl CurrentLink {
    pub fn place(base: &Path, exporter: &str) -> io::Result<CurrentLink> {
        name::check("exporter name", exporter).map_err(|e| refuse(e.to_string()))?;
        ensure_dir(base)?;
        let path = base.join("current");
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_symlink() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a symlink", path.display()),
                ))
            }
            _ => {}
        }
        // Relative, so the link stays right if the device directory is moved or bind-mounted;
        // made beside it and renamed over it, so a reader never finds it missing.
        let target = PathBuf::from(exporter);
        let tmp = base.join(format!(".current.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(CurrentLink { path, target })
    }
}

impl Drop for CurrentLink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.path).ok().as_deref() == Some(self.target.as_path()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `dir/<device>/` as a mount point, created if missing: the name checked; a mount left
/// there by a killed process ("transport endpoint is not connected") unmounted first; a stale
/// symlink removed. A live mount, a file, or a directory with something in it is an error.
pub fn mount_point(dir: &Path, device: &str) -> io::Result<PathBuf> {
    name::check("device name", device).map_err(|e| refuse(e.to_string()))?;
    let path = dir.join(device);
    if is_dead_mount(&path) {
        tracing::warn!(
            "{}: a dead mount of an earlier run; unmounting it",
            path.display()
        );
        detach(&path)?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(&path)?,
        Ok(m) if m.is_dir() => {
            if is_mount_point(&path) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} is mounted already (by another running jmp?)",
                        path.display()
                    ),
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a directory; not using it",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    match std::fs::DirBuilder::new().mode(0o755).create(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if std::fs::read_dir(&path)?.next().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} is not empty; not mounting over it", path.display()),
        ));
    }
    Ok(path)
}

/// Whether `path` is a FUSE mount whose process is gone ("transport endpoint is not
/// connected"). Listing it asks the (dead) server; a plain stat may be answered from the
/// kernel's attribute cache for a moment after the kill.
pub fn is_dead_mount(path: &Path) -> bool {
    let dead = |e: &io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    match std::fs::symlink_metadata(path) {
        Err(e) => dead(&e),
        Ok(_) => std::fs::read_dir(path).is_err_and(|e| dead(&e)),
    }
}

/// Whether `path` is listed as a mount point in this process's mount table.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    // Field 5 is the mount point, with spaces and the like octal-escaped.
    table.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m.replace("\\040", " ") == want)
    })
}

/// Detaches the mount at `path` now (the kernel ends it when its last user lets go): as root
/// with `umount2(MNT_DETACH)`, else with `fusermount3 -uz` (a user's own FUSE mount).
pub fn detach(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(path)
                .status()?;
            if st.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "fusermount3 -uz {} failed ({st})",
                    path.display()
                )))
            }
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("jmp-places-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn names_that_climb_out_are_refused_and_nothing_is_created() {
        let base = tmp("climb");
        for bad in ["x/../../victim", "..", ".", "-x", "a b", ""] {
            let e = exporter_dir(&base, bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{bad}: {e}");
        }
        assert!(!base.exists(), "nothing was created for refused names");
        let dir = exporter_dir(&base, "rpi4").expect("good name");
        assert_eq!(dir, base.join("rpi4"));
        assert!(entry(&dir, "../escape").is_err());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_symlinked_or_foreign_folder_is_not_used() {
        let base = tmp("symlink");
        std::fs::create_dir_all(&base).expect("mkdir");
        let elsewhere = tmp("elsewhere");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, base.join("rpi4")).expect("symlink");
        let e = exporter_dir(&base, "rpi4").expect_err("symlinked folder");
        assert!(e.to_string().contains("not a directory"), "{e}");
        std::fs::remove_file(base.join("rpi4")).expect("rm");
        let open = base.join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let e = exporter_dir(&base, "open").expect_err("world-writable folder");
        assert!(e.to_string().contains("writable by others"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&elsewhere);
    }

    #[test]
    fn current_points_at_the_newest_and_goes_with_it() {
        let base = tmp("current");
        let a = CurrentLink::place(&base, "board-a").expect("a");
        assert_eq!(
            std::fs::read_link(base.join("current")).ok(),
            Some(PathBuf::from("board-a"))
        );
        let b = CurrentLink::place(&base, "board-b").expect("b");
        assert_eq!(
            std::fs::read_link(base.join("current")).ok(),
            Some(PathBuf::from("board-b"))
        );
        drop(a);
        assert!(
            base.join("current").symlink_metadata().is_ok(),
            "a does not remove b's"
        );
        drop(b);
        assert!(base.join("current").symlink_metadata().is_err());
        assert!(CurrentLink::place(&base, "../x").is_err());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn stale_links_are_replaced_files_are_not() {
        let base = tmp("stale");
        let dir = exporter_dir(&base, "rpi4").expect("dir");
        std::os::unix::fs::symlink("/nonexistent", dir.join("console")).expect("link");
        let p = entry(&dir, "console").expect("stale link replaced");
        assert!(std::fs::symlink_metadata(&p).is_err());
        std::fs::write(dir.join("file"), b"x").expect("write");
        assert!(entry(&dir, "file").is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
