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

pub mod agent;
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

use crate::kind::{
    BridgeError, InvalidSpec, BuildCtx, DeviceKind, NoOptions, Sandbox, Spec};
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
    const BULK: bool = true;
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
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            let b = StorageBridge::create(info, ctx)
                .map_err(|e| BridgeError::Local(format!("cannot mount the storage device: {e}")))?;
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

    fn agent_tools() -> Vec<Box<dyn crate::agent::AgentTool>> {
        agent::tools()
    }
}

impl Spec for StorageSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        StorageSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        StorageSpec::start(self, name, ctx.board)
    }

    fn sandbox(&self, name: &str) -> Sandbox {
        Sandbox::medium(name, &self.path, self.writable, false)
    }
}

impl Spec for StorageSimSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        StorageSimSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        StorageSimSpec::start(self, name, ctx.exporter, ctx.board, ctx.fresh_scratch)
    }

    /// The default image is made in the unit's private /tmp, so anew at each start; one of
    /// a given path is made at first start, so its folder must be writable.
    fn sandbox(&self, name: &str) -> Sandbox {
        match &self.path {
            Some(p) => Sandbox::medium(name, p, self.writable, true),
            None => {
                let mut s = Sandbox::default();
                s.note(format!(
                    "{name}: its image is made in the service's private /tmp (PrivateTmp=yes), so anew at each start: give it a path to keep it"
                ));
                s
            }
        }
    }
}
