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

pub use bridge::StorageBridge;
pub use driver::{SlowRange, StorageDriver};
pub use spec::{StorageSimSpec, StorageSpec};
