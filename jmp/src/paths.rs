//! Where jmp keeps things on the user's machine.

use std::path::{Path, PathBuf};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn xdg_runtime() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The fallback when `XDG_RUNTIME_DIR` is unset: `/tmp/jmp-<uid>`. Another local user can
/// create that name first, so it is only used once [`private_dir`] has made sure it is ours.
fn tmp_base() -> PathBuf {
    PathBuf::from(format!("/tmp/jmp-{}", uid()))
}

/// Makes `dir` (mode 0700 when created) and checks that it is a real directory owned by this
/// user that nobody else can write: a directory someone else created first (in /tmp anyone
/// can), or one others may write, would let them replace the console link and read what is
/// typed.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    let fix = "set XDG_RUNTIME_DIR (or JMP_RUNTIME_DIR) to a directory of your own";
    if m.file_type().is_symlink() || !m.is_dir() {
        return Err(format!(
            "{} is not a directory; not using it ({fix})",
            dir.display()
        ));
    }
    if m.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to you (uid {me}): someone created it first; not using it ({fix})",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by other users (mode {:o}); not using it (chmod 700 it, or {fix})",
            dir.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Where local devices appear: `/dev/jmp` for root, else `$XDG_RUNTIME_DIR/jmp`, else
/// `/tmp/jmp-<uid>/dev` (checked by [`private_dir`] before use).
pub fn default_dev_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/dev/jmp")
    } else if let Some(r) = xdg_runtime() {
        r.join("jmp")
    } else {
        tmp_base().join("dev")
    }
}

/// Checks the private parent of a default directory that lives under /tmp (nothing to check
/// for the others: /run and `$XDG_RUNTIME_DIR` are the system's).
pub fn check_fallback(dir: &Path) -> Result<(), String> {
    let base = tmp_base();
    if dir.starts_with(&base) {
        private_dir(&base)?;
    }
    Ok(())
}

/// Where mounts appear (storage): `/run/jmp` for root (FUSE mounts have no place in /dev),
/// else the dev dir.
pub fn default_mount_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/jmp")
    } else {
        default_dev_dir()
    }
}

/// Runtime state of attachments (pid files, control sockets, logs). `JMP_RUNTIME_DIR` overrides.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("JMP_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if is_root() {
        PathBuf::from("/run/jmp")
    } else if let Some(r) = xdg_runtime() {
        r.join("jmp-state")
    } else {
        tmp_base().join("state")
    }
}

/// Client configuration (known exporters, client configs). `JMP_CONFIG_DIR` overrides.
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("JMP_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(x).join("jmp");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".config/jmp"),
        None => PathBuf::from("/etc/jmp/client"),
    }
}

/// The user the local devices belong to: the one who ran `sudo jmp ...`, else the caller.
pub fn invoking_user() -> (u32, u32) {
    if is_root() {
        let parse = |k| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
        if let (Some(u), Some(g)) = (parse("SUDO_UID"), parse("SUDO_GID")) {
            return (u, g);
        }
    }
    (uid(), nix::unistd::getgid().as_raw())
}

/// "user@host", shown to others who find the board busy.
pub fn default_client_name() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", uid()));
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_squatted_or_open_runtime_dir_is_refused() {
        let base = std::env::temp_dir().join(format!("jmp-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mine = base.join("mine");
        private_dir(&mine).expect("created 0700");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&mine).expect("stat").permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = private_dir(&mine).expect_err("open to others");
        assert!(e.contains("writable by other users"), "{e}");
        if nix::unistd::geteuid().is_root() {
            // Made by another user first: refused even though we could write into it.
            let theirs = base.join("theirs");
            std::fs::create_dir_all(&theirs).expect("mkdir");
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4242)), None)
                .expect("chown");
            let e = private_dir(&theirs).expect_err("someone else's");
            assert!(e.contains("belongs to uid 4242"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
