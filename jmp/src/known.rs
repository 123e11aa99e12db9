//! Where this user's trusted exporter fingerprints live; the file's format and rules are
//! `jmp_transport::known`'s.

pub use jmp_transport::known::*;
use std::path::PathBuf;

pub fn file() -> PathBuf {
    crate::paths::config_dir().join("known_exporters")
}
