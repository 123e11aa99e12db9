//! The client's `vhci-hcd`: a free port of the right speed, attach and detach, the local bus
//! id a device enumerated as, and the device nodes it became (read from sysfs: a tty, a disk,
//! hidraw, video, a network interface, and the raw `/dev/bus/usb` node libusb tools open).
//!
//! Ports are machine-wide. Each `jmp attach` lists the ports it attached in a file of its own
//! (`<dev dir>/.usb-vhci/<pid>.json`); one that finds the file of a process that is gone
//! detaches what it lists that is still attached with the same device id. (The kernel detaches
//! a port by itself when the process holding the other end of its socket dies; the file covers
//! a socket that outlived it.)

use super::uevent::{UeventSource, Uevents};
use crate::{Endpoint, Local};
use jmp_protocol::kinds::usb::Speed;
use serde::{Deserialize, Serialize};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MODULE: &str = "vhci-hcd";

/// One port of vhci-hcd's status files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub port: u32,
    /// On a SuperSpeed hub (else high speed and slower).
    pub superspeed: bool,
    /// Nothing attached.
    pub free: bool,
    pub devid: u32,
    /// The bus id the device enumerated as here (`3-1`), once it has.
    pub local_busid: Option<String>,
}

/// Parses vhci-hcd's `status` files: `hub port sta spd dev sockfd local_busid` lines.
pub fn parse_status(text: &str) -> Vec<Port> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 7 || !matches!(f[0], "hs" | "ss") {
                return None;
            }
            let sta: u32 = f[2].parse().ok()?;
            let local = f[6];
            Some(Port {
                port: f[1].parse().ok()?,
                superspeed: f[0] == "ss",
                // VDEV_ST_NULL
                free: sta == 4,
                devid: u32::from_str_radix(f[4], 16).ok()?,
                // VDEV_ST_USED, and a real bus id (`0-0` before that).
                local_busid: (sta == 6 && local != "0-0").then(|| local.to_string()),
            })
        })
        .collect()
}

/// What the bridge does with the local `vhci-hcd`. [`SysVhci`] is the real one.
pub trait Vhci: Send + Sync + 'static {
    /// Attaches the device on a free port of the right speed; the port.
    fn attach(&self, fd: RawFd, devid: u32, speed: Speed) -> Result<u32, String>;
    /// Detaches `port` if it still holds `devid`.
    fn detach(&self, port: u32, devid: u32) -> Result<(), String>;
    /// The ports as they are now.
    fn ports(&self) -> Vec<Port>;
    /// What the device at local bus id `busid` became.
    fn nodes(&self, busid: &str) -> Vec<Endpoint>;
    /// Whether the device at local bus id `busid` looks up from sysfs alone: every interface
    /// of its configuration there and bound to a driver. Only a fallback for when the kernel's
    /// events cannot be had or some were lost: an interface's `driver` link appears before its
    /// driver's probe has made the nodes (a tty about 0.2 s later under emulation), and an
    /// interface no loaded driver takes (a vendor interface for libusb) keeps it `false`
    /// (waiters bound their wait).
    fn configured(&self, _busid: &str) -> bool {
        true
    }
    /// The kernel's device events, which say when an imported device is up: its `bind`
    /// (see `bridge`).
    fn events(&self) -> std::io::Result<Box<dyn UeventSource>> {
        Ok(Box::new(Uevents::open()?))
    }
}

/// vhci-hcd through sysfs under `sys`, device nodes under `dev`.
#[derive(Debug, Clone)]
pub struct SysVhci {
    sys: PathBuf,
    dev: PathBuf,
}

impl Default for SysVhci {
    fn default() -> Self {
        SysVhci::new("/sys", "/dev")
    }
}

fn write_attr(p: &Path, value: &str) -> std::io::Result<()> {
    super::sysfs::write_existing(p, value)
}

impl SysVhci {
    pub fn new(sys: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> Self {
        SysVhci {
            sys: sys.into(),
            dev: dev.into(),
        }
    }

    fn platform(&self) -> PathBuf {
        self.sys.join("devices/platform/vhci_hcd.0")
    }

    /// Whether the module is loaded (its first controller exists).
    pub fn loaded(&self) -> bool {
        self.platform().join("attach").exists()
    }

    fn load(&self) -> Result<(), String> {
        if self.loaded() {
            return Ok(());
        }
        let out = std::process::Command::new("modprobe")
            .arg(MODULE)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run modprobe {MODULE}: {e}"))?;
        if self.loaded() {
            return Ok(());
        }
        Err(format!(
            "{MODULE} is not loaded and modprobe {MODULE} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Vhci for SysVhci {
    fn attach(&self, fd: RawFd, devid: u32, speed: Speed) -> Result<u32, String> {
        self.load()?;
        // vhci-hcd takes SuperSpeed Plus devices as SuperSpeed.
        let kspeed = if speed == Speed::SuperPlus {
            Speed::Super.wire()
        } else {
            speed.wire()
        };
        let mut last = None;
        for p in self
            .ports()
            .into_iter()
            .filter(|p| p.free && p.superspeed == speed.superspeed())
        {
            // Another program may take the same port at the same moment: the kernel refuses
            // one of us, who tries the next.
            match write_attr(
                &self.platform().join("attach"),
                &format!("{} {fd} {devid} {kspeed}", p.port),
            ) {
                Ok(()) => return Ok(p.port),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => format!("{MODULE} refused every free port: {e}"),
            None => format!(
                "{MODULE} has no free {} port",
                if speed.superspeed() {
                    "SuperSpeed"
                } else {
                    "high-speed"
                }
            ),
        })
    }

    fn detach(&self, port: u32, devid: u32) -> Result<(), String> {
        let holds = self
            .ports()
            .iter()
            .any(|p| p.port == port && !p.free && p.devid == devid);
        if !holds {
            return Ok(());
        }
        write_attr(&self.platform().join("detach"), &port.to_string())
            .map_err(|e| format!("detaching vhci port {port}: {e}"))
    }

    fn ports(&self) -> Vec<Port> {
        let Ok(rd) = std::fs::read_dir(self.platform()) else {
            return Vec::new();
        };
        let mut v: Vec<Port> = rd
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n == "status" || n.starts_with("status.")
            })
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|t| parse_status(&t))
            .collect();
        v.sort_by_key(|p| p.port);
        v
    }

    fn configured(&self, busid: &str) -> bool {
        let dev = self.sys.join("bus/usb/devices").join(busid);
        // The device's own driver link comes before its probe adds the interfaces.
        let Some(want) = std::fs::read_to_string(dev.join("bNumInterfaces"))
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
        else {
            return false;
        };
        let Ok(rd) = std::fs::read_dir(&dev) else {
            return false;
        };
        let prefix = format!("{busid}:");
        let mut bound = 0;
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                if !e.path().join("driver").exists() {
                    return false;
                }
                bound += 1;
            }
        }
        want > 0 && bound >= want
    }

    fn nodes(&self, busid: &str) -> Vec<Endpoint> {
        let root = self.sys.join("bus/usb/devices").join(busid);
        let mut out = Vec::new();
        let read = |f: &str| {
            std::fs::read_to_string(root.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        };
        if let (Some(b), Some(d)) = (read("busnum"), read("devnum")) {
            out.push(Endpoint::with_role(
                "usb",
                Local::Path(self.dev.join(format!("bus/usb/{b:03}/{d:03}"))),
            ));
        }
        let Ok(real) = std::fs::canonicalize(&root) else {
            return out;
        };
        let mut found = Vec::new();
        walk(&real, 0, &mut 0, &mut found);
        found.sort();
        found.dedup();
        for (class, name) in found {
            let (role, local) = match class.as_str() {
                "tty" => ("tty", Local::Path(self.dev.join(&name))),
                "block" => ("disk", Local::Path(self.dev.join(&name))),
                "hidraw" => ("hidraw", Local::Path(self.dev.join(&name))),
                "video4linux" => ("video", Local::Path(self.dev.join(&name))),
                "net" => ("net", Local::Interface(name)),
                _ => continue,
            };
            out.push(Endpoint::with_role(role, local));
        }
        out
    }
}

/// Class directories below a device (`.../tty/ttyACM0`, `.../block/sda`, `.../net/usb0`);
/// symbolic links are not followed (they lead out of the device), and the walk is bounded.
fn walk(dir: &Path, depth: usize, seen: &mut usize, out: &mut Vec<(String, String)>) {
    const CLASSES: [&str; 5] = ["tty", "block", "hidraw", "video4linux", "net"];
    if depth > 10 || *seen > 4000 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        *seen += 1;
        let Ok(t) = e.file_type() else { continue };
        if !t.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if CLASSES.contains(&name.as_str()) {
            if let Ok(inner) = std::fs::read_dir(e.path()) {
                for n in inner.flatten() {
                    if n.file_type().is_ok_and(|t| t.is_dir()) {
                        let node = n.file_name().to_string_lossy().into_owned();
                        if node_name_ok(&node) {
                            out.push((name.clone(), node));
                        }
                    }
                }
            }
            continue;
        }
        walk(&e.path(), depth + 1, seen, out);
    }
}

/// A node or interface name as the kernel makes them (no path tricks).
pub(crate) fn node_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// One port this process attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub port: u32,
    pub devid: u32,
}

/// The ports this process attached, listed in a file of its own (see the module's
/// documentation).
#[derive(Debug)]
pub struct PortsFile {
    dir: PathBuf,
    path: PathBuf,
    ports: Mutex<Vec<Attached>>,
}

impl PortsFile {
    pub fn new(dev_dir: &Path) -> PortsFile {
        let dir = dev_dir.join(".usb-vhci");
        PortsFile {
            path: dir.join(format!("{}.json", std::process::id())),
            dir,
            ports: Mutex::new(Vec::new()),
        }
    }

    fn save(&self, ports: &[Attached]) {
        let r = if ports.is_empty() {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            std::fs::create_dir_all(&self.dir).and_then(|_| {
                let tmp = self.path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(ports).unwrap_or_default())?;
                std::fs::rename(&tmp, &self.path)
            })
        };
        if let Err(e) = r {
            tracing::warn!("cannot record vhci ports in {}: {e}", self.path.display());
        }
        if ports.is_empty() {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    pub fn add(&self, a: Attached) {
        let mut p = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        p.push(a);
        self.save(&p);
    }

    pub fn remove(&self, a: Attached) {
        let mut p = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|x| *x != a);
        self.save(&p);
    }

    /// Detaches what processes that are gone left attached; what it detached.
    pub fn clean_stale(&self, vhci: &dyn Vhci) -> Vec<(u32, Attached)> {
        let mut done = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return done;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_suffix(".json")
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if pid as u32 == std::process::id() || pid_alive(pid) {
                continue;
            }
            let listed: Vec<Attached> = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let now = vhci.ports();
            for a in listed {
                if now
                    .iter()
                    .any(|p| p.port == a.port && !p.free && p.devid == a.devid)
                {
                    match vhci.detach(a.port, a.devid) {
                        Ok(()) => done.push((pid as u32, a)),
                        Err(err) => tracing::warn!("{err}"),
                    }
                }
            }
            let _ = std::fs::remove_file(e.path());
        }
        done
    }
}

impl Drop for PortsFile {
    fn drop(&mut self) {
        self.save(&[]);
    }
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks only; EPERM means it exists (another user's).
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "hub port sta spd dev      sockfd local_busid\n\
hs  0000 006 003 00010002 000005 3-1\n\
hs  0001 005 000 00000000 000000 0-0\n\
hs  0002 004 000 00000000 000000 0-0\n\
ss  0015 004 000 00000000 000000 0-0\n";

    #[test]
    fn the_status_file_is_read() {
        let p = parse_status(STATUS);
        assert_eq!(p.len(), 4);
        assert_eq!(
            p[0],
            Port {
                port: 0,
                superspeed: false,
                free: false,
                devid: 0x10002,
                local_busid: Some("3-1".into())
            }
        );
        assert!(!p[1].free && p[1].local_busid.is_none(), "attached, not enumerated yet");
        assert!(p[2].free && !p[2].superspeed);
        assert!(p[3].free && p[3].superspeed && p[3].port == 15);
    }

    fn tree(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("jmp-vhci-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let p = root.join("sys/devices/platform/vhci_hcd.0");
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join("status"), STATUS).expect("status");
        std::fs::write(p.join("status.1"), "hub port sta spd dev      sockfd local_busid\nhs  0030 004 000 00000000 000000 0-0\n").expect("status");
        std::fs::write(p.join("attach"), "").expect("attach");
        std::fs::write(p.join("detach"), "").expect("detach");
        root
    }

    #[test]
    fn a_free_port_of_the_right_speed_is_attached_and_detached() {
        let root = tree("attach");
        let v = SysVhci::new(root.join("sys"), root.join("dev"));
        assert_eq!(v.ports().len(), 5);
        assert_eq!(v.attach(7, 0x10005, Speed::High), Ok(2));
        let attach = root.join("sys/devices/platform/vhci_hcd.0/attach");
        assert_eq!(std::fs::read_to_string(&attach).expect("read"), "2 7 65541 3");
        assert_eq!(v.attach(7, 0x10005, Speed::SuperPlus), Ok(15));
        assert_eq!(std::fs::read_to_string(&attach).expect("read"), "15 7 65541 5");
        // Only a port still holding the device is detached.
        let detach = root.join("sys/devices/platform/vhci_hcd.0/detach");
        v.detach(0, 0x10003).expect("not ours: nothing");
        assert_eq!(std::fs::read_to_string(&detach).expect("read"), "");
        v.detach(0, 0x10002).expect("detach");
        assert_eq!(std::fs::read_to_string(&detach).expect("read"), "0");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn nodes_are_found_below_the_device_and_links_not_followed() {
        let root = tree("nodes");
        let real = root.join("sys/devices/platform/vhci_hcd.0/usb3/3-1");
        for d in [
            "3-1:1.0/tty/ttyACM0",
            "3-1:1.2/host0/target0:0:0/0:0:0:0/block/sda/sda1",
            "3-1:1.3/0003:1209:0001.0001/hidraw/hidraw0",
            "3-1:1.4/net/usb0",
            "3-1:1.5/video4linux/video0",
        ] {
            std::fs::create_dir_all(real.join(d)).expect("mkdir");
        }
        std::fs::write(real.join("busnum"), "3\n").expect("busnum");
        std::fs::write(real.join("devnum"), "2\n").expect("devnum");
        // A link out of the device (as `driver` and `subsystem` are) is not followed.
        std::fs::create_dir_all(root.join("sys/class/tty/ttyS0")).expect("mkdir");
        std::os::unix::fs::symlink(root.join("sys/class"), real.join("3-1:1.0/subsystem")).expect("link");
        std::fs::create_dir_all(root.join("sys/bus/usb/devices")).expect("mkdir");
        std::os::unix::fs::symlink(&real, root.join("sys/bus/usb/devices/3-1")).expect("link");
        let v = SysVhci::new(root.join("sys"), "/dev");
        // Up once every interface it has is there with a driver.
        assert!(!v.configured("3-1"), "no configuration read yet");
        std::fs::write(real.join("bNumInterfaces"), " 6\n").expect("bNumInterfaces");
        for i in [0, 2, 3, 4, 5] {
            std::os::unix::fs::symlink(root.join("sys/class"), real.join(format!("3-1:1.{i}/driver"))).expect("link");
        }
        assert!(!v.configured("3-1"), "five of six interfaces");
        std::fs::create_dir_all(real.join("3-1:1.1")).expect("mkdir");
        assert!(!v.configured("3-1"), "the sixth has no driver yet");
        std::os::unix::fs::symlink(root.join("sys/class"), real.join("3-1:1.1/driver")).expect("link");
        assert!(v.configured("3-1"));
        let got: Vec<String> = v.nodes("3-1").iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                "usb:/dev/bus/usb/003/002",
                "disk:/dev/sda",
                "hidraw:/dev/hidraw0",
                "net:usb0",
                "tty:/dev/ttyACM0",
                "video:/dev/video0",
            ]
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn ports_left_by_a_process_that_is_gone_are_detached() {
        let root = tree("stale");
        let v = SysVhci::new(root.join("sys"), root.join("dev"));
        let dev = root.join("dev/jmp");
        let dir = dev.join(".usb-vhci");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // A dead process (a PID far beyond pid_max) left port 0 (still holding 0x10002) and
        // port 2 (free by now: the kernel detached it).
        let left = [Attached { port: 0, devid: 0x10002 }, Attached { port: 2, devid: 0x10009 }];
        std::fs::write(dir.join("99999999.json"), serde_json::to_vec(&left).expect("json")).expect("write");
        let mine = PortsFile::new(&dev);
        let done = mine.clean_stale(&v);
        assert_eq!(done, vec![(99_999_999, left[0])]);
        let detach = root.join("sys/devices/platform/vhci_hcd.0/detach");
        assert_eq!(std::fs::read_to_string(detach).expect("read"), "0");
        assert!(!dir.join("99999999.json").exists());
        // Our own file comes and goes with our ports.
        mine.add(Attached { port: 5, devid: 1 });
        assert!(dir.join(format!("{}.json", std::process::id())).exists());
        mine.remove(Attached { port: 5, devid: 1 });
        assert!(!dir.exists(), "an empty list leaves nothing");
        let _ = std::fs::remove_dir_all(&root);
    }
}
