//! OpenSSH, the baseline that the TCP forward (`ssh -L`) and network tunnel (`ssh -w`, `ssh
//! -D`) benchmarks compare jmp against: the keys of a private sshd and its clients' options.

use crate::proc::command;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Options of an ssh client of a private sshd made for the run: no host-key prompt and no
/// known_hosts entry left behind, no password prompt (the key or nothing), and a forward or
/// tunnel that cannot be set up ends ssh instead of leaving it running without it.
pub const CLIENT_OPTIONS: [&str; 10] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "ExitOnForwardFailure=yes",
    "-o",
    "LogLevel=ERROR",
];

/// Makes an ed25519 key pair without a passphrase: the private key at `path`, the public one
/// at `path`.pub.
pub fn keygen(path: &Path) -> Result<()> {
    let st = command("ssh-keygen")
        .args(["-q", "-N", "", "-t", "ed25519", "-f"])
        .arg(path)
        .status()
        .context("ssh-keygen")?;
    if !st.success() {
        bail!("ssh-keygen failed");
    }
    Ok(())
}
