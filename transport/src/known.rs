//! Trust on first use: `known_exporters` maps an exporter's address (normalized: `host:port`,
//! port 7700 when none was given, host lowercased; so `127.0.0.1` and `127.0.0.1:7700` are one
//! entry) to the certificate fingerprint seen the first time. A different fingerprint later is a
//! loud error, never a silent re-pin: `jmp trust pin|forget` changes an entry on purpose.

use crate::Fingerprint;
use std::path::Path;

/// The key an address is pinned under.
pub fn normalize(addr: &str) -> String {
    let a = addr.trim().to_ascii_lowercase();
    if a.parse::<std::net::SocketAddr>().is_ok() {
        return a;
    }
    if let Ok(ip) = a.parse::<std::net::IpAddr>() {
        return std::net::SocketAddr::new(ip, jmp_protocol::DEFAULT_EXPORTER_PORT).to_string();
    }
    match a.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => a,
        _ => format!("{a}:{}", jmp_protocol::DEFAULT_EXPORTER_PORT),
    }
}

/// Every entry, in file order.
pub fn list(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next().unwrap_or("").to_string()))
        })
        .collect())
}

/// Rewrites the file without `addr`'s entries (as typed or normalized); returns how many went.
pub fn forget(path: &Path, addr: &str) -> Result<usize, String> {
    let key = normalize(addr);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut removed = 0;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let first = l.split_whitespace().next().unwrap_or("");
            let hit = !l.trim_start().starts_with('#')
                && !first.is_empty()
                && (first == addr || normalize(first) == key);
            if hit {
                removed += 1;
            }
            !hit
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::write_secret_file(path, out.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(removed)
}

/// Pins `addr` to `fp`, replacing what was pinned.
pub fn pin(path: &Path, addr: &str, fp: Fingerprint) -> Result<(), String> {
    forget(path, addr)?;
    record(path, &normalize(addr), fp).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The pinned fingerprint for `addr` (normalized; an entry written as typed by an older jmp
/// counts too), if any. Lines: `ADDR FINGERPRINT`; `#` comments.
pub fn lookup(path: &Path, addr: &str) -> Result<Option<Fingerprint>, String> {
    let key = normalize(addr);
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
        let first = parts.next().unwrap_or("");
        if first == addr || normalize(first) == key {
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
    writeln!(f, "{} {fp}", normalize(addr))
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

    #[test]
    fn addresses_are_one_key_with_or_without_the_default_port() {
        assert_eq!(normalize("127.0.0.1"), "127.0.0.1:7700");
        assert_eq!(normalize("127.0.0.1:7700"), "127.0.0.1:7700");
        assert_eq!(normalize("Lab-Host"), "lab-host:7700");
        assert_eq!(normalize("lab-host:9000"), "lab-host:9000");
        assert_eq!(normalize("::1"), "[::1]:7700");
        let dir = std::env::temp_dir().join(format!("jmp-known2-{}", std::process::id()));
        let path = dir.join("known_exporters");
        let _ = std::fs::remove_dir_all(&dir);
        let fp = Fingerprint::of(b"one");
        record(&path, "127.0.0.1", fp).expect("record");
        assert_eq!(lookup(&path, "127.0.0.1:7700"), Ok(Some(fp)), "one entry");
        let fp2 = Fingerprint::of(b"two");
        pin(&path, "127.0.0.1:7700", fp2).expect("pin");
        assert_eq!(lookup(&path, "127.0.0.1"), Ok(Some(fp2)), "re-pinned");
        assert_eq!(list(&path).expect("list").len(), 1);
        assert_eq!(forget(&path, "127.0.0.1"), Ok(1));
        assert_eq!(lookup(&path, "127.0.0.1"), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
