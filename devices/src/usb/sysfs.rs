//! The lab host's USB devices as sysfs shows them, and what `usbip-host` is told there.
//!
//! Everything read here is the devices' own description of themselves (descriptor strings in
//! particular): it is kept as text, cut to the wire's limits, and escaped wherever printed.
//! Writes go to the attributes the kernel documents for this (`match_busid`, `bind`,
//! `unbind`, `usbip_sockfd`, `drivers_probe`), each without a trailing newline: `match_busid`
//! compares the whole string.

use jmp_protocol::kinds::usb::{cut_text, EpType, Endpoints, Speed};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// The driver that exports devices over USB/IP.
pub const STUB: &str = "usbip-host";

/// One USB device (not an interface) as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysDevice {
    pub busid: String,
    pub vendor: u16,
    pub product: u16,
    pub class: u8,
    pub manufacturer: String,
    pub name: String,
    pub serial: String,
    pub speed: Speed,
    pub busnum: u32,
    pub devnum: u32,
    /// The driver bound to the device itself (`usb`, the generic one, for almost all;
    /// `usbip-host` while exported), if any.
    pub driver: Option<String>,
}

impl SysDevice {
    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | (self.devnum & 0xffff)
    }
}

/// What the exporter does with the lab host's USB devices. [`Sysfs`] is the real one; tests
/// use a stand-in.
pub trait Host: Send + Sync + 'static {
    /// Every USB device but hubs and root hubs (never exported).
    fn devices(&self) -> io::Result<Vec<SysDevice>>;
    /// The device at `busid` now.
    fn device(&self, busid: &str) -> Option<SysDevice>;
    /// The endpoints the device has in its current configuration and alternate settings.
    fn endpoints(&self, busid: &str) -> io::Result<Endpoints>;
    /// Unbinds the device from its driver and binds it to `usbip-host`; the driver it had.
    fn bind_stub(&self, busid: &str) -> Result<Option<String>, String>;
    /// Hands `usbip-host` its end of the device's socket (it takes its own reference).
    fn hand_socket(&self, busid: &str, fd: RawFd) -> Result<(), String>;
    /// Takes the device from `usbip-host` and gives it back to `original` (or whatever driver
    /// the kernel picks); forgets its bus id in `usbip-host`'s table either way (a device
    /// that is gone is only forgotten).
    fn release(&self, busid: &str, original: Option<&str>) -> Result<(), String>;
    /// Why devices cannot be exported here at all (`usbip-host` missing), if so.
    fn problem(&self) -> Option<String> {
        None
    }
    /// Whether a device (of any kind, a hub too) is at `busid`.
    fn present(&self, busid: &str) -> bool;
}

/// sysfs under `root` (`/sys`; tests use a tree of their own).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

fn read_text(p: &Path) -> Option<String> {
    std::fs::read(p)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim_end_matches('\n').to_string())
}

fn read_hex16(p: &Path) -> Option<u16> {
    u16::from_str_radix(read_text(p)?.trim(), 16).ok()
}

/// Writes an attribute exactly (no newline), naming it and the kernel's answer on failure.
fn write_attr(p: &Path, value: &str) -> Result<(), String> {
    write_existing(p, value).map_err(|e| format!("writing {value:?} to {}: {e}", p.display()))
}

/// Writes `value` to a file that must exist (an attribute: never created).
pub(crate) fn write_existing(p: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(p)?;
    f.write_all(value.as_bytes())
}

/// The basename of a `driver` link, if the device has one.
fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn dev(&self, busid: &str) -> PathBuf {
        self.root.join("bus/usb/devices").join(busid)
    }

    fn stub(&self) -> PathBuf {
        self.root.join("bus/usb/drivers").join(STUB)
    }

    /// Reads one device directory; `None` for interfaces, root hubs, hubs and what is not
    /// (or no longer) a complete device.
    fn read(&self, busid: &str) -> Option<SysDevice> {
        if busid.contains(':') || busid.starts_with("usb") || busid.len() > 32 {
            return None;
        }
        let d = self.dev(busid);
        let class = u8::from_str_radix(read_text(&d.join("bDeviceClass"))?.trim(), 16).ok()?;
        if class == 0x09 {
            return None;
        }
        // A device imported here over USB/IP (on a vhci-hcd port) is never exported again: on
        // a host that is a client too, it would be imported from itself without end.
        let real = std::fs::canonicalize(&d).ok()?;
        if real
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with("vhci_hcd."))
        {
            return None;
        }
        let text = |f: &str| read_text(&d.join(f)).map(|s| cut_text(&s)).unwrap_or_default();
        Some(SysDevice {
            busid: busid.to_string(),
            vendor: read_hex16(&d.join("idVendor"))?,
            product: read_hex16(&d.join("idProduct"))?,
            class,
            manufacturer: text("manufacturer"),
            name: text("product"),
            serial: text("serial"),
            speed: Speed::from_sysfs(&read_text(&d.join("speed"))?)?,
            busnum: read_text(&d.join("busnum"))?.trim().parse().ok()?,
            devnum: read_text(&d.join("devnum"))?.trim().parse().ok()?,
            driver: link_name(&d.join("driver")),
        })
    }

    fn stub_loaded(&self) -> bool {
        self.stub().join("match_busid").exists()
    }
}

impl Host for Sysfs {
    fn devices(&self) -> io::Result<Vec<SysDevice>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(self.root.join("bus/usb/devices"))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(d) = self.read(&name) {
                v.push(d);
            }
        }
        v.sort_by(|a, b| a.busid.cmp(&b.busid));
        Ok(v)
    }

    fn device(&self, busid: &str) -> Option<SysDevice> {
        self.read(busid)
    }

    fn endpoints(&self, busid: &str) -> io::Result<Endpoints> {
        let d = self.dev(busid);
        let mut eps = Endpoints::control_only();
        let prefix = format!("{busid}:");
        for e in std::fs::read_dir(&d)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(d.join(&name)) else {
                continue;
            };
            for ep in rd.flatten() {
                let epname = ep.file_name().to_string_lossy().into_owned();
                let Some(addr) = epname
                    .strip_prefix("ep_")
                    .and_then(|a| u8::from_str_radix(a, 16).ok())
                else {
                    continue;
                };
                let t = match read_text(&ep.path().join("type")).as_deref() {
                    Some("Control") => EpType::Control,
                    Some("Isoc") => EpType::Isoc,
                    Some("Bulk") => EpType::Bulk,
                    Some("Interrupt") => EpType::Interrupt,
                    _ => continue,
                };
                eps.set(addr & 0x0f, addr & 0x80 != 0, t);
            }
        }
        Ok(eps)
    }

    fn problem(&self) -> Option<String> {
        (!self.stub_loaded()).then(|| {
            format!(
                "{STUB} is not loaded (load it at boot: echo {STUB} > /etc/modules-load.d/jmp-usb.conf; now: modprobe {STUB})"
            )
        })
    }

    fn bind_stub(&self, busid: &str) -> Result<Option<String>, String> {
        if !self.stub_loaded() {
            // Without the hardened unit's ProtectKernelModules this loads it.
            let _ = std::process::Command::new("modprobe")
                .arg(STUB)
                .stdin(std::process::Stdio::null())
                .output();
        }
        if let Some(p) = self.problem() {
            return Err(p);
        }
        let d = self.dev(busid);
        let original = link_name(&d.join("driver"));
        write_attr(&self.stub().join("match_busid"), &format!("add {busid}"))?;
        if original.as_deref() == Some(STUB) {
            return Ok(None);
        }
        if original.is_some() {
            write_attr(&d.join("driver/unbind"), busid)?;
        }
        write_attr(&self.stub().join("bind"), busid)?;
        match link_name(&d.join("driver")) {
            Some(s) if s == STUB => Ok(original),
            other => Err(format!(
                "{busid} is on {} after binding it to {STUB}",
                other.as_deref().unwrap_or("no driver")
            )),
        }
    }

    fn hand_socket(&self, busid: &str, fd: RawFd) -> Result<(), String> {
        write_attr(&self.dev(busid).join("usbip_sockfd"), &fd.to_string())
    }

    fn release(&self, busid: &str, original: Option<&str>) -> Result<(), String> {
        let d = self.dev(busid);
        let mut errors = Vec::new();
        if link_name(&d.join("driver")).as_deref() == Some(STUB) {
            if let Err(e) = write_attr(&self.stub().join("unbind"), busid) {
                errors.push(e);
            }
        }
        if d.join("idVendor").exists() {
            // usbip-host forgets a bus id only through `rebind` (it marks the entry, lets the
            // kernel probe the device's own driver, then deletes it): `del` alone leaves an
            // entry that grabs the next device plugged in there. Without an entry, the kernel
            // is asked to probe directly.
            let rebound = self.stub_loaded()
                && write_attr(&self.stub().join("rebind"), busid).is_ok();
            if !rebound && link_name(&d.join("driver")).is_none() {
                if let Err(e) = write_attr(&self.root.join("bus/usb/drivers_probe"), busid) {
                    errors.push(e);
                }
            }
            // The driver it had, if the kernel picked another.
            if let Some(o) = original.filter(|o| *o != STUB) {
                let bind = self.root.join("bus/usb/drivers").join(o).join("bind");
                let now = link_name(&d.join("driver"));
                if now.as_deref() != Some(o) && bind.exists() {
                    if now.is_some() {
                        let _ = write_attr(&d.join("driver/unbind"), busid);
                    }
                    if let Err(e) = write_attr(&bind, busid) {
                        errors.push(e);
                    }
                }
            }
        } else if self.stub_loaded() {
            // A device that left while bound: its entry stays (the kernel keeps it until a
            // device is there to rebind); the driver gives back whatever usbip-host takes
            // there next.
            let _ = write_attr(&self.stub().join("match_busid"), &format!("del {busid}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn present(&self, busid: &str) -> bool {
        self.dev(busid).join("idVendor").exists()
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A sysfs tree in a temporary directory, as the kernel lays it out for USB devices,
    //! drivers and `usbip-host`.
    use super::*;

    pub struct Tree {
        pub root: PathBuf,
    }

    impl Tree {
        pub fn new(tag: &str) -> Tree {
            let root = std::env::temp_dir().join(format!(
                "jmp-usb-sysfs-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&root);
            for d in ["bus/usb/devices", "bus/usb/drivers/usb", "devices/pci0000:00"] {
                std::fs::create_dir_all(root.join(d)).expect("mkdir");
            }
            std::fs::write(root.join("bus/usb/drivers_probe"), "").expect("probe");
            Tree { root }
        }

        pub fn load_stub(&self) {
            let s = self.root.join("bus/usb/drivers").join(STUB);
            std::fs::create_dir_all(&s).expect("mkdir");
            for f in ["match_busid", "bind", "unbind", "rebind"] {
                std::fs::write(s.join(f), "").expect("attr");
            }
        }

        /// A device at `busid` with these ids and strings, on `driver`.
        #[allow(clippy::too_many_arguments)]
        pub fn add(&self, busid: &str, vid: u16, pid: u16, class: u8, product: &str, serial: &str, driver: Option<&str>) {
            let real = self.root.join("devices/pci0000:00").join(busid);
            std::fs::create_dir_all(&real).expect("mkdir");
            let w = |f: &str, v: &str| std::fs::write(real.join(f), v).expect("write");
            w("idVendor", &format!("{vid:04x}\n"));
            w("idProduct", &format!("{pid:04x}\n"));
            w("bDeviceClass", &format!("{class:02x}\n"));
            w("product", &format!("{product}\n"));
            w("manufacturer", "jmp\n");
            w("serial", &format!("{serial}\n"));
            w("speed", "480\n");
            w("busnum", "1\n");
            w("devnum", &format!("{}\n", 2 + busid.len()));
            w("usbip_sockfd", "");
            let link = self.root.join("bus/usb/devices").join(busid);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&real, &link).expect("link");
            self.set_driver(busid, driver);
        }

        pub fn set_driver(&self, busid: &str, driver: Option<&str>) {
            let real = self.root.join("devices/pci0000:00").join(busid);
            let _ = std::fs::remove_file(real.join("driver"));
            if let Some(d) = driver {
                let dir = self.root.join("bus/usb/drivers").join(d);
                std::fs::create_dir_all(&dir).expect("mkdir");
                for f in ["bind", "unbind"] {
                    if !dir.join(f).exists() {
                        std::fs::write(dir.join(f), "").expect("attr");
                    }
                }
                std::os::unix::fs::symlink(&dir, real.join("driver")).expect("link");
            }
        }

        pub fn remove(&self, busid: &str) {
            let _ = std::fs::remove_file(self.root.join("bus/usb/devices").join(busid));
            let _ = std::fs::remove_dir_all(self.root.join("devices/pci0000:00").join(busid));
        }

        /// An interface with endpoints (`(address, type)`).
        pub fn interface(&self, busid: &str, name: &str, eps: &[(u8, &str)]) {
            let dir = self.root.join("devices/pci0000:00").join(busid).join(name);
            for (addr, t) in eps {
                let ep = dir.join(format!("ep_{addr:02x}"));
                std::fs::create_dir_all(&ep).expect("mkdir");
                std::fs::write(ep.join("type"), format!("{t}\n")).expect("type");
            }
        }

        pub fn read(&self, rel: &str) -> String {
            std::fs::read_to_string(self.root.join(rel)).unwrap_or_default()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Tree;
    use super::*;

    #[test]
    fn devices_are_read_hubs_and_interfaces_left_out() {
        let t = Tree::new("scan");
        t.add("1-1", 0x1209, 0x0001, 0, "ACM \u{1b}[31m", "s1", Some("usb"));
        t.add("1-2", 0x05e3, 0x0608, 0x09, "Hub", "", Some("usb"));
        t.add("usb1", 0x1d6b, 0x0002, 0x09, "root hub", "", Some("usb"));
        t.add("1-1:1.0", 0, 0, 0, "", "", None);
        // Imported here through vhci-hcd: not exported again.
        t.add("3-1", 0x1209, 0x0001, 0, "ACM", "s1", Some("usb"));
        let vhci = t.root.join("devices/platform/vhci_hcd.0/usb3");
        std::fs::create_dir_all(&vhci).expect("mkdir");
        std::fs::rename(t.root.join("devices/pci0000:00/3-1"), vhci.join("3-1")).expect("move");
        std::fs::remove_file(t.root.join("bus/usb/devices/3-1")).expect("rm");
        std::os::unix::fs::symlink(vhci.join("3-1"), t.root.join("bus/usb/devices/3-1")).expect("link");
        let s = Sysfs::new(&t.root);
        let d = s.devices().expect("scan");
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].busid, "1-1");
        assert_eq!((d[0].vendor, d[0].product), (0x1209, 0x0001));
        assert_eq!(d[0].name, "ACM \u{1b}[31m", "kept as the device says, escaped when shown");
        assert_eq!(d[0].driver.as_deref(), Some("usb"));
        assert_eq!(d[0].speed, Speed::High);
    }

    #[test]
    fn endpoints_are_those_of_the_current_interfaces() {
        let t = Tree::new("eps");
        t.add("1-1", 0x1209, 0x0001, 0, "x", "", Some("usb"));
        let s = Sysfs::new(&t.root);
        assert_eq!(s.endpoints("1-1").expect("eps"), Endpoints::control_only());
        t.interface("1-1", "1-1:1.0", &[(0x81, "Bulk"), (0x02, "Bulk")]);
        t.interface("1-1", "1-1:1.1", &[(0x83, "Isoc"), (0x84, "Interrupt")]);
        let e = s.endpoints("1-1").expect("eps");
        assert_eq!(e.get(1, true), Some(EpType::Bulk));
        assert_eq!(e.get(2, false), Some(EpType::Bulk));
        assert_eq!(e.get(1, false), None);
        assert_eq!(e.get(3, true), Some(EpType::Isoc));
        assert_eq!(e.get(4, true), Some(EpType::Interrupt));
        assert_eq!(e.get(0, true), Some(EpType::Control));
    }

    #[test]
    fn binding_and_releasing_write_what_usbip_host_expects() {
        let t = Tree::new("bind");
        t.add("1-1", 0x1209, 0x0001, 0, "x", "", Some("usb"));
        let s = Sysfs::new(&t.root);
        // The fake kernel does not move the driver link: the check after binding says so.
        std::fs::remove_file(t.root.join("bus/usb/drivers/usb/unbind")).ok();
        assert!(s.bind_stub("1-1").is_err(), "usbip-host is not loaded");
        t.load_stub();
        std::fs::write(t.root.join("bus/usb/drivers/usb/unbind"), "").expect("attr");
        let e = s.bind_stub("1-1").expect_err("the driver did not move");
        assert!(e.contains("1-1 is on usb after binding it to usbip-host"), "{e}");
        assert_eq!(t.read("bus/usb/drivers/usbip-host/match_busid"), "add 1-1");
        assert_eq!(t.read("bus/usb/drivers/usb/unbind"), "1-1");
        assert_eq!(t.read("bus/usb/drivers/usbip-host/bind"), "1-1");
        // Released from usbip-host: unbound, then rebound through usbip-host (which forgets
        // the bus id and lets the kernel pick the device's driver).
        t.set_driver("1-1", Some(STUB));
        s.release("1-1", None).expect("release");
        assert_eq!(t.read("bus/usb/drivers/usbip-host/unbind"), "1-1");
        assert_eq!(t.read("bus/usb/drivers/usbip-host/rebind"), "1-1");
        assert_eq!(t.read("bus/usb/drivers_probe"), "", "rebind did it");
        // The kernel picked another driver than the one it had: that one gets it back.
        t.set_driver("1-1", Some("generic-other"));
        s.release("1-1", Some("usb")).expect("release");
        assert_eq!(t.read("bus/usb/drivers/generic-other/unbind"), "1-1");
        assert_eq!(t.read("bus/usb/drivers/usb/bind"), "1-1");
        // Not in usbip-host's table and on no driver: the kernel is asked to probe.
        std::fs::remove_file(t.root.join("bus/usb/drivers/usbip-host/rebind")).expect("rm");
        t.set_driver("1-1", None);
        s.release("1-1", None).expect("release");
        assert_eq!(t.read("bus/usb/drivers_probe"), "1-1");
        // A device that is gone is only forgotten, as far as the kernel lets it.
        t.remove("1-1");
        s.release("1-1", Some("usb")).expect("release");
        assert_eq!(t.read("bus/usb/drivers/usbip-host/match_busid"), "del 1-1");
    }
}
