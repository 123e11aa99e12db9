//! What an exporter config says about a storage device: a block device or image file
//! (`type: storage`), or a simulated card (`type: storage-sim`, a sparse image with a
//! partition table, made at first start).

use crate::board::Board;
use crate::spec::ByteSize;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Smallest simulated card: room for the 1 MiB gap, a 32 MiB boot partition and a root.
pub const SIM_MIN: u64 = 48 << 20;
/// Largest simulated card (sparse, so this is about what a test may ask, not disk use).
pub const SIM_MAX: u64 = 64 << 30;

/// `type: storage`: a block device on the lab host (an SD-mux, a USB card reader) or an image
/// file. Read-only unless `writable: true`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StorageSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub writable: bool,
    /// The board uses the medium too (an SD-mux): writes are refused while the board's power
    /// is on. Needs a power device on the same exporter.
    #[serde(default)]
    pub shared_with_board: bool,
}

/// The partition table a simulated card gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    #[default]
    Mbr,
    Gpt,
}

/// `type: storage-sim`: a sparse image with a partition table, a FAT boot partition and an
/// ext4 root partition (made with `mkfs.vfat`/`mkfs.ext4` when installed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StorageSimSpec {
    pub size: ByteSize,
    /// Where the image lives (default: `$TMPDIR/jmp-sim-<uid>/<exporter>-<device>.img`); made
    /// at first start, kept afterwards.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub table: Table,
    /// A simulated card is scratch space: writable unless told otherwise.
    #[serde(default = "yes")]
    pub writable: bool,
    #[serde(default)]
    pub shared_with_board: bool,
}

fn yes() -> bool {
    true
}

impl StorageSpec {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.is_absolute() {
            return Err(format!(
                "path {:?} must be absolute",
                self.path.display().to_string()
            ));
        }
        Ok(())
    }

    pub fn start(&self, name: &str, board: &Board) -> Arc<dyn crate::Driver> {
        Arc::new(super::StorageDriver::start(
            name,
            self.path.clone(),
            self.writable,
            self.shared_with_board.then(|| board.clone()),
            None,
        ))
    }
}

impl StorageSimSpec {
    pub fn validate(&self) -> Result<(), String> {
        if !(SIM_MIN..=SIM_MAX).contains(&self.size.0) {
            return Err(format!(
                "size must be between {} MiB and {} GiB",
                SIM_MIN >> 20,
                SIM_MAX >> 30
            ));
        }
        if !self.size.0.is_multiple_of(1 << 20) {
            return Err("size must be a whole number of MiB".into());
        }
        if let Some(p) = &self.path {
            if !p.is_absolute() {
                return Err(format!(
                    "path {:?} must be absolute",
                    p.display().to_string()
                ));
            }
        }
        Ok(())
    }

    pub fn image_path(&self, exporter: &str, name: &str) -> PathBuf {
        self.path.clone().unwrap_or_else(|| {
            std::env::temp_dir()
                .join(format!("jmp-sim-{}", nix::unistd::geteuid().as_raw()))
                .join(format!("{exporter}-{name}.img"))
        })
    }

    /// Starts the driver of the card, made first if missing; `fresh`: a card at the default
    /// path is thrown away and made anew (one at a configured `path:` is the user's and kept).
    pub fn start(
        &self,
        name: &str,
        exporter: &str,
        board: &Board,
        fresh: bool,
    ) -> Arc<dyn crate::Driver> {
        let path = self.image_path(exporter, name);
        if fresh && self.path.is_none() {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(device = name, "a fresh simulated card replaces the last run's at {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(device = name, "cannot remove the last run's simulated card {}: {e}", path.display()),
            }
        }
        if let Err(e) = super::sim::ensure_image(&path, self.size.0, self.table) {
            // The driver then reports the device unavailable, naming the path.
            tracing::warn!(
                device = name,
                "cannot make the simulated card {}: {e}",
                path.display()
            );
        }
        Arc::new(super::StorageDriver::start(
            name,
            path,
            self.writable,
            self.shared_with_board.then(|| board.clone()),
            None,
        ))
    }
}
