//! Storage: a board's SD card, eMMC or disk image, as a FUSE mount on the client (`disk` and
//! one file per partition) and as `jmp storage flash|dump`.
//!
//! - [`medium`]: the block device or image file on the exporter (pread/pwritev, fsync, discard,
//!   O_DIRECT hashing); [`driver`]: serves storage channels and device requests, follows the
//!   board's power for a medium shared with it.
//! - [`client`]: the client half of a storage channel: many requests in flight, answers
//!   matched by id, used by the filesystem and by flash/dump.
//! - [`parts`]: partitions from the MBR or GPT; [`fs`]: the FUSE filesystem (served in-process
//!   by [`bridge`] during `jmp attach`, and by the `jmp-mount` binary); [`mount`]: mount points,
//!   stale mounts.
//! - [`image`]: image formats (raw, gz, xz, zst, bz2 by content) and bmap files; [`flash`]:
//!   flash and dump over a client.
//! - [`sim`]: the simulated card (`storage-sim`).

pub mod bridge;
pub mod client;
pub mod driver;
pub mod flash;
pub mod fs;
pub mod image;
pub mod medium;
pub mod mount;
pub mod ops;
pub mod parts;
pub mod sim;
pub mod spec;
pub mod verb;

pub use bridge::StorageBridge;
pub use driver::{SlowRange, StorageDriver};
pub use spec::{StorageSimSpec, StorageSpec};

use crate::kind::{BuildCtx, DeviceKind, NoOptions, Sandbox, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::storage as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;
use std::time::Duration;

/// The storage kind.
pub struct Storage;

crate::config_types! {
    /// `type: storage` (a block device or an image file) or `type: storage-sim` (a simulated
    /// card).
    pub enum StorageConfig {
        Medium(StorageSpec) = "storage" => "{path: /dev/sda, writable: true, sharedWithBoard: true}",
        Sim(StorageSimSpec) = "storage-sim" => "{size: 64MiB, table: gpt}",
    }
}

impl DeviceKind for Storage {
    const KIND: Kind = Kind::Storage;
    /// A hang guard: hashing a large card on the exporter reads all of it.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
    type Config = StorageConfig;
    type Options = NoOptions;
    type Verb = verb::StorageVerb;
    type Request = wire::DeviceRequest;
    type Response = wire::DeviceResponse;

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        _opts: &'a NoOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, String>> {
        Box::pin(async move {
            let b = StorageBridge::create(info, ctx)
                .map_err(|e| format!("cannot mount the storage device: {e}"))?;
            Ok(Box::new(b) as Box<dyn Bridge>)
        })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params).ok().map(|p| {
            let rw = if p.accepts_writes() {
                "rw"
            } else if p.writable {
                "ro: board on"
            } else {
                "ro"
            };
            format!("{} MiB {rw}", p.size >> 20)
        })
    }

    fn describe(device: &str, _req: &wire::DeviceRequest, resp: &wire::DeviceResponse) -> String {
        ops::describe(device, resp)
    }
}

/// A medium at `path`: a device node is allowed by path (`r` or `rw`), an image file written
/// in place needs its path writable under `ProtectSystem=strict`.
fn medium_sandbox(name: &str, path: &std::path::Path, writable: bool) -> Sandbox {
    use std::os::unix::fs::FileTypeExt;
    let is_device = path.starts_with("/dev")
        || std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let mut s = Sandbox::default();
    if is_device {
        s.devices.push((
            path.display().to_string(),
            if writable { "rw" } else { "r" },
        ));
        s.notes.push(format!("{name}: block device {}", path.display()));
    } else if writable {
        s.write_paths.push(path.to_path_buf());
        s.notes
            .push(format!("{name}: image file {}, written in place", path.display()));
    } else {
        s.notes.push(format!(
            "{name}: image file {}, read only (readable under the unit unless it is in /home, /root or /run/user: then add ProtectHome=read-only)",
            path.display()
        ));
    }
    s
}

impl Spec for StorageSpec {
    fn validate(&self) -> Result<(), String> {
        StorageSpec::validate(self)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        StorageSpec::start(self, name, ctx.board)
    }

    fn sandbox(&self, name: &str) -> Sandbox {
        medium_sandbox(name, &self.path, self.writable)
    }
}

impl Spec for StorageSimSpec {
    fn validate(&self) -> Result<(), String> {
        StorageSimSpec::validate(self)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        StorageSimSpec::start(self, name, ctx.exporter, ctx.board)
    }

    /// The default image lives in the unit's private /tmp; one of a given path is made at
    /// first start, so its folder must be writable.
    fn sandbox(&self, name: &str) -> Sandbox {
        match &self.path {
            None => Sandbox::default(),
            Some(p) => Sandbox {
                write_paths: vec![p.parent().unwrap_or(p).to_path_buf()],
                notes: vec![format!("{name}: simulated card image {}", p.display())],
                ..Sandbox::default()
            },
        }
    }
}
