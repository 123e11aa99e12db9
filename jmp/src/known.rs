//! Trust on first use: `known_exporters` maps the address a user gave (`lab-host:7700`) to the
//! exporter certificate fingerprint seen the first time. A different fingerprint later is a loud
//! error, never a silent re-pin.

use jmp_transport::Fingerprint;
use std::path::{Path, PathBuf};

pub fn file() -> PathBuf {
    crate::paths::config_dir().join("known_exporters")
}

/// The pinned fingerprint for `addr`, if any. Lines: `ADDR FINGERPRINT`; `#` comments.
pub fn lookup(path: &Path, addr: &str) -> Result<Option<Fingerprint>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        if parts.next() == Some(addr) {
            let fp = parts.next().ok_or_else(|| {
                format!("{}:{}: no fingerprint after {addr}", path.display(), i + 1)
            })?;
            return fp
                .parse()
                .map(Some)
                .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1));
        }
    }
    Ok(None)
}

pub fn record(path: &Path, addr: &str, fp: Fingerprint) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{addr} {fp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_then_lookup() {
        let dir = std::env::temp_dir().join(format!("jmp-known-{}", std::process::id()));
        let path = dir.join("known_exporters");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(lookup(&path, "a:1"), Ok(None));
        let fp = Fingerprint::of(b"cert");
        record(&path, "a:1", fp).expect("record");
        assert_eq!(lookup(&path, "a:1"), Ok(Some(fp)));
        assert_eq!(lookup(&path, "b:1"), Ok(None));
        std::fs::write(&path, "a:1 sha256:zz\n").expect("write");
        assert!(lookup(&path, "a:1")
            .unwrap_err()
            .contains("known_exporters:1"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
