//! What a `usb` device bound to `usbip-host`, kept in the exporter's state directory: a jmpd
//! killed with devices bound (kill -9, a crash, power loss in the middle) gives them back to
//! their drivers at its next start. Written before each bind and after each release, replaced
//! atomically (written aside, then renamed).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One device bound to `usbip-host`, and the driver it had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    pub busid: String,
    pub driver: Option<String>,
    pub vendor: u16,
    pub product: u16,
}

/// The record of one `usb` device (`<stateDir>/usb-<device>.json`); without a state
/// directory it lives in memory only.
#[derive(Debug)]
pub struct Record {
    path: Option<PathBuf>,
    entries: Mutex<Vec<Bound>>,
}

impl Record {
    /// The record of device `name` under `dir`, as a previous run left it.
    pub fn open(dir: Option<&Path>, name: &str) -> Record {
        let path = dir.map(|d| d.join(format!("usb-{name}.json")));
        let entries = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Vec<Bound>>(&b).ok())
            .unwrap_or_default();
        Record {
            path,
            entries: Mutex::new(entries),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Bound>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What it holds now.
    pub fn entries(&self) -> Vec<Bound> {
        self.lock().clone()
    }

    /// Adds (or replaces) the entry of `b.busid`, on disk before returning.
    pub fn add(&self, b: Bound) -> Result<(), String> {
        let mut e = self.lock();
        e.retain(|x| x.busid != b.busid);
        e.push(b);
        self.save(&e)
    }

    pub fn remove(&self, busid: &str) -> Result<(), String> {
        let mut e = self.lock();
        let before = e.len();
        e.retain(|x| x.busid != busid);
        if e.len() == before {
            return Ok(());
        }
        self.save(&e)
    }

    fn save(&self, entries: &[Bound]) -> Result<(), String> {
        let Some(p) = &self.path else {
            return Ok(());
        };
        let write = || -> std::io::Result<()> {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            if entries.is_empty() {
                return match std::fs::remove_file(p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
            }
            let tmp = p.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(entries).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, p)
        };
        write().map_err(|e| format!("cannot record the bound devices in {}: {e}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_restart_and_empties_to_nothing() {
        let dir = std::env::temp_dir().join(format!("jmp-usb-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r = Record::open(Some(&dir), "probe");
        assert!(r.entries().is_empty());
        let b = Bound {
            busid: "1-1".into(),
            driver: Some("usb".into()),
            vendor: 0x1209,
            product: 1,
        };
        r.add(b.clone()).expect("add");
        r.add(Bound { busid: "1-2".into(), ..b.clone() }).expect("add");
        let again = Record::open(Some(&dir), "probe");
        assert_eq!(again.entries().len(), 2);
        again.remove("1-2").expect("remove");
        again.remove("1-1").expect("remove");
        assert!(!dir.join("usb-probe.json").exists(), "an empty record leaves no file");
        assert!(Record::open(Some(&dir), "probe").entries().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
        // Without a state directory it only remembers.
        let m = Record::open(None, "probe");
        m.add(b).expect("add");
        assert_eq!(m.entries().len(), 1);
    }
}
