//! Where jmp keeps things on the user's machine.

use std::path::PathBuf;

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

/// Where local devices appear: `/dev/jmp` for root, else `$XDG_RUNTIME_DIR/jmp`.
pub fn default_dev_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/dev/jmp")
    } else if let Some(r) = xdg_runtime() {
        r.join("jmp")
    } else {
        PathBuf::from(format!("/tmp/jmp-{}/dev", uid()))
    }
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
        PathBuf::from(format!("/tmp/jmp-{}/state", uid()))
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
