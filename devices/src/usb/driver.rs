//! Exporter side: the lab host's USB devices that match the config, followed as they come and
//! go (kernel uevents, [`super::uevent`]), each bound to `usbip-host` only while the lease
//! holder imports it and given back to its own driver when the import ends, at stop, and (from
//! the record in the state directory) at the next start after a crash.
//!
//! A client names a device only by the id this driver gave it; nothing it sends is written to
//! sysfs. The USB/IP it sends is checked before `usbip-host` reads it ([`super::pump`]).

use super::pump::{self, End, Side};
use super::record::{Bound, Record};
use super::spec::UsbSpec;
use super::sysfs::{Host, SysDevice, STUB};
use crate::common::TaskGuard;
use crate::{BoxFuture, Channel, DeviceStatus, Driver};
use bytes::Bytes;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::usb::{
    Control, DevState, DeviceParams, Imported, Ledger, OpenParams, Speed, UsbDevice, MAX_DEVICES,
};
use jmp_protocol::{ChannelMode, DeviceState, ErrorCode, Kind, Open, Refusal};
use jmp_transport::ChannelIo;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often sysfs is read when the kernel's events cannot be had (a sandbox without
/// `AF_NETLINK`).
const POLL: Duration = Duration::from_secs(1);

pub struct UsbDriver {
    inner: Arc<Inner>,
    _watcher: Option<TaskGuard>,
}

struct Inner {
    name: String,
    spec: UsbSpec,
    ids: Vec<(u16, u16)>,
    host: Arc<dyn Host>,
    record: Record,
    state: Mutex<Devices>,
    status: watch::Sender<DeviceStatus>,
}

#[derive(Default)]
struct Devices {
    list: Vec<UsbDevice>,
    next_id: u64,
    problem: Option<String>,
    /// Matched devices left out because the list was full (warned once each).
    dropped: Vec<String>,
}

fn from_sys(d: &SysDevice, id: u64) -> UsbDevice {
    UsbDevice {
        id,
        busid: d.busid.clone(),
        vendor: d.vendor,
        product: d.product,
        class: d.class,
        manufacturer: d.manufacturer.clone(),
        name: d.name.clone(),
        serial: d.serial.clone(),
        speed: d.speed,
        busnum: d.busnum,
        devnum: d.devnum,
        state: DevState::Present,
        was: None,
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Devices> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn matches(&self, d: &SysDevice) -> bool {
        self.ids.contains(&(d.vendor, d.product))
            && self.spec.serial.as_ref().is_none_or(|s| *s == d.serial)
            && self.spec.port.as_ref().is_none_or(|p| *p == d.busid)
    }

    fn params(&self, d: &Devices) -> DeviceParams {
        DeviceParams {
            ids: self.ids.clone(),
            devices: d.list.clone(),
        }
    }

    fn publish(&self, d: &Devices) {
        let params = to_bytes(&self.params(d));
        let state = match &d.problem {
            None => DeviceState::Available,
            Some(p) => DeviceState::Unavailable(p.clone()),
        };
        self.status.send_if_modified(|s| {
            let changed = s.params != params || s.state != state;
            s.params = params;
            s.state = state;
            changed
        });
    }

    /// Reads sysfs again: new matching devices are listed (present), those no longer there
    /// marked gone.
    fn rescan(&self) {
        let mut scanned = self.host.devices();
        if let Ok(all) = &scanned {
            if self.give_back_taken(all) {
                scanned = self.host.devices();
            }
        }
        let mut d = self.lock();
        let matched: Vec<SysDevice> = match scanned {
            Ok(v) => v.into_iter().filter(|s| self.matches(s)).collect(),
            Err(e) => {
                d.problem = Some(format!("cannot read /sys/bus/usb/devices: {e}"));
                self.publish(&d);
                return;
            }
        };
        d.problem = self.host.problem();
        // Devices that left: the same port with another device number is a new appearance.
        for e in d.list.iter_mut().filter(|e| e.state != DevState::Gone) {
            if !matched
                .iter()
                .any(|m| m.busid == e.busid && m.devnum == e.devnum)
            {
                info!(
                    "{}: {} left the bus",
                    self.name,
                    jmp_protocol::name::escape(&e.describe())
                );
                e.state = DevState::Gone;
            }
        }
        for m in &matched {
            if d
                .list
                .iter()
                .any(|e| e.state != DevState::Gone && e.busid == m.busid && e.devnum == m.devnum)
            {
                continue;
            }
            // A device back at a port where one left: the same board, after a reset or a
            // mode switch.
            let was = d
                .list
                .iter()
                .position(|e| e.state == DevState::Gone && e.busid == m.busid);
            let was = was.map(|i| d.list.remove(i).id);
            // Gone devices make room for new ones, oldest first.
            while d.list.len() >= MAX_DEVICES {
                match d.list.iter().position(|e| e.state == DevState::Gone) {
                    Some(i) => {
                        d.list.remove(i);
                    }
                    None => break,
                }
            }
            if d.list.len() >= MAX_DEVICES {
                if !d.dropped.contains(&m.busid) {
                    warn!(
                        "{}: {} matches too, but at most {MAX_DEVICES} devices are listed; narrow ids, serial or port",
                        self.name, m.busid
                    );
                    d.dropped.push(m.busid.clone());
                }
                continue;
            }
            d.next_id += 1;
            let mut dev = from_sys(m, d.next_id);
            dev.was = was;
            info!(
                "{}: {}{}",
                self.name,
                jmp_protocol::name::escape(&dev.describe()),
                if was.is_some() { " (back)" } else { "" }
            );
            d.list.push(dev);
        }
        self.publish(&d);
    }

    /// A device that left while imported leaves its bus id in usbip-host's table (the kernel
    /// forgets it only while a device is there), so whatever is plugged in there next is bound
    /// to usbip-host. Such devices are given back at once; whether this driver matches them
    /// is decided afterwards, like any other's. Whether it gave any back.
    fn give_back_taken(&self, all: &[SysDevice]) -> bool {
        let recorded = self.record.entries();
        let mut any = false;
        for s in all.iter().filter(|s| s.driver.as_deref() == Some(STUB)) {
            let Some(b) = recorded.iter().find(|b| b.busid == s.busid) else {
                continue;
            };
            let ours = self.lock().list.iter().any(|e| {
                e.busid == s.busid && matches!(e.state, DevState::Exported | DevState::Imported)
            });
            if ours {
                continue;
            }
            match self.host.release(&s.busid, b.driver.as_deref()) {
                Ok(()) => info!(
                    "{}: {} ({:04x}:{:04x}) plugged in where an imported device left: given back to {} from {STUB}",
                    self.name,
                    s.busid,
                    s.vendor,
                    s.product,
                    b.driver.as_deref().unwrap_or("the kernel's choice of driver")
                ),
                Err(e) => warn!("{}: giving {} back: {e}", self.name, s.busid),
            }
            if let Err(e) = self.record.remove(&s.busid) {
                warn!("{}: {e}", self.name);
            }
            any = true;
        }
        any
    }

    fn set_state(&self, id: u64, state: DevState) {
        let mut d = self.lock();
        if let Some(e) = d
            .list
            .iter_mut()
            .find(|e| e.id == id && e.state != DevState::Gone)
        {
            e.state = state;
        }
        self.publish(&d);
    }

    /// Gives back what a previous run left bound to `usbip-host`: what its record lists, and
    /// matching devices found on `usbip-host` anyway (a run without a state directory).
    fn restore(&self) {
        for b in self.record.entries() {
            if !self.host.present(&b.busid) {
                // Left while bound: given back when a device is there again (rescan).
                continue;
            }
            match self.host.release(&b.busid, b.driver.as_deref()) {
                Ok(()) => warn!(
                    "{}: gave {} ({:04x}:{:04x}) back to {}: a previous jmpd left it bound to {STUB}",
                    self.name,
                    b.busid,
                    b.vendor,
                    b.product,
                    b.driver.as_deref().unwrap_or("the kernel's choice of driver")
                ),
                Err(e) => warn!("{}: giving {} back: {e}", self.name, b.busid),
            }
            if let Err(e) = self.record.remove(&b.busid) {
                warn!("{}: {e}", self.name);
            }
        }
        if let Ok(devs) = self.host.devices() {
            for d in devs
                .iter()
                .filter(|d| self.matches(d) && d.driver.as_deref() == Some(STUB))
            {
                match self.host.release(&d.busid, None) {
                    Ok(()) => warn!(
                        "{}: took {} off {STUB}, where something left it, and let the kernel pick its driver",
                        self.name, d.busid
                    ),
                    Err(e) => warn!("{}: taking {} off {STUB}: {e}", self.name, d.busid),
                }
            }
        }
    }
}

impl UsbDriver {
    /// Starts following the host's devices (needs a tokio runtime): gives back what a previous
    /// run left bound, reads sysfs, then follows the kernel's events.
    pub fn start(name: &str, spec: &UsbSpec, host: Arc<dyn Host>, state_dir: Option<&Path>) -> UsbDriver {
        let d = Self::new(name, spec, host, state_dir);
        d.inner.restore();
        d.inner.rescan();
        let inner = d.inner.clone();
        let watcher = tokio::spawn(async move { follow(inner).await });
        UsbDriver {
            _watcher: Some(TaskGuard(watcher)),
            ..d
        }
    }

    /// A driver that reads sysfs only when told ([`UsbDriver::rescan`]), for tests.
    pub fn new(name: &str, spec: &UsbSpec, host: Arc<dyn Host>, state_dir: Option<&Path>) -> UsbDriver {
        let ids = spec.pairs();
        let params = to_bytes(&DeviceParams {
            ids: ids.clone(),
            devices: Vec::new(),
        });
        let inner = Arc::new(Inner {
            name: name.to_string(),
            spec: spec.clone(),
            ids,
            host,
            record: Record::open(state_dir, name),
            state: Mutex::new(Devices::default()),
            status: watch::Sender::new(DeviceStatus::available(params)),
        });
        if inner.record.path().is_none() {
            warn!("{name}: no state directory: devices bound when jmpd is killed are not given back at its next start");
        }
        UsbDriver {
            inner,
            _watcher: None,
        }
    }

    /// Reads sysfs again now.
    pub fn rescan(&self) {
        self.inner.rescan();
    }

    /// Gives back what a previous run left bound.
    pub fn restore(&self) {
        self.inner.restore();
    }
}

/// Rescans on every USB event; polls if events cannot be had.
async fn follow(inner: Arc<Inner>) {
    match super::uevent::Uevents::open() {
        Ok(mut ev) => loop {
            match ev.next().await {
                Ok(events) => {
                    if events
                        .iter()
                        .any(|e| e.as_ref().is_none_or(|e| e.subsystem.as_deref() == Some("usb")))
                    {
                        let i = inner.clone();
                        let _ = tokio::task::spawn_blocking(move || i.rescan()).await;
                    }
                }
                Err(e) => {
                    warn!("{}: kernel events: {e}; reading sysfs every {POLL:?} instead", inner.name);
                    break;
                }
            }
        },
        Err(e) => warn!(
            "{}: no kernel events ({e}: the sandbox needs AF_NETLINK); reading sysfs every {POLL:?} instead",
            inner.name
        ),
    }
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let i = inner.clone();
        let _ = tokio::task::spawn_blocking(move || i.rescan()).await;
    }
}

impl Driver for UsbDriver {
    fn name(&self) -> &str {
        &self.inner.name
    }
    fn kind(&self) -> Kind {
        Kind::Usb
    }
    fn detail(&self) -> String {
        let mut s = format!("USB {}", self.inner.spec.ids.join(" "));
        if let Some(x) = &self.inner.spec.serial {
            s.push_str(&format!(" serial {x}"));
        }
        if let Some(p) = &self.inner.spec.port {
            s.push_str(&format!(" at {p}"));
        }
        s
    }
    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.inner.status.subscribe()
    }
    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Stream]
    }

    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let p = OpenParams::decode_exact(&req.params).map_err(|e| {
                Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: bad open parameters: {e}", self.inner.name),
                )
            })?;
            match p {
                OpenParams::Watch => Ok(Box::new(WatchChannel {
                    status: self.inner.status.subscribe(),
                }) as Box<dyn Channel>),
                OpenParams::Import { id } => import(self.inner.clone(), id)
                    .await
                    .map(|c| Box::new(c) as Box<dyn Channel>),
            }
        })
    }
}

/// Binds device `id` to `usbip-host` and hands it its end of a socket pair.
async fn import(inner: Arc<Inner>, id: u64) -> Result<ImportChannel, Refusal> {
    let name = inner.name.clone();
    let dev = {
        let mut d = inner.lock();
        let Some(e) = d.list.iter_mut().find(|e| e.id == id) else {
            return Err(Refusal::new(
                ErrorCode::NoSuchDevice,
                format!("{name}: no device {id} (it lists only devices its ids match)"),
            ));
        };
        match e.state {
            DevState::Present => {}
            DevState::Gone => {
                return Err(Refusal::new(
                    ErrorCode::DeviceUnavailable,
                    format!("{name}: device {id} ({}) is gone", e.ids()),
                ))
            }
            DevState::Exported | DevState::Imported => {
                return Err(Refusal::new(
                    ErrorCode::Busy,
                    format!("{name}: device {id} ({}) is already imported", e.ids()),
                ))
            }
        }
        e.state = DevState::Exported;
        let dev = e.clone();
        inner.publish(&d);
        dev
    };
    let i2 = inner.clone();
    let d2 = dev.clone();
    let bound = tokio::task::spawn_blocking(move || bind(&i2, &d2))
        .await
        .unwrap_or_else(|e| Err((None, format!("binding: {e}"))));
    match bound {
        Ok((kernel_side, devid, speed, original)) => {
            inner.set_state(id, DevState::Imported);
            info!(
                "{name}: {} {} ({}) imported",
                dev.ids(),
                jmp_protocol::name::escape(&dev.name),
                dev.busid
            );
            Ok(ImportChannel {
                guard: ImportGuard {
                    inner,
                    id,
                    busid: dev.busid.clone(),
                    devnum: dev.devnum,
                    original,
                    released: false,
                },
                sock: Some(kernel_side),
                imported: Imported { id, devid, speed },
            })
        }
        Err((original, why)) => {
            // Whatever got done is undone: the device goes back to its driver.
            let g = ImportGuard {
                inner,
                id,
                busid: dev.busid.clone(),
                devnum: dev.devnum,
                original,
                released: false,
            };
            drop(g);
            Err(Refusal::new(
                ErrorCode::DeviceUnavailable,
                format!("{name}: cannot export {}: {why}", dev.busid),
            ))
        }
    }
}

/// The blocking part of an import: record, bind, check, hand over the socket. On failure,
/// the driver the device had (to give it back to) and why.
#[allow(clippy::type_complexity)]
fn bind(inner: &Inner, dev: &UsbDevice) -> Result<(OwnedFd, u32, Speed, Option<String>), (Option<String>, String)> {
    let host = &inner.host;
    let now = host
        .device(&dev.busid)
        .filter(|s| s.devnum == dev.devnum)
        .ok_or((None, "it left the bus".to_string()))?;
    let original = now.driver.clone().filter(|d| d != STUB);
    // Recorded before binding: a jmpd killed from here on gives it back at its next start.
    inner
        .record
        .add(Bound {
            busid: dev.busid.clone(),
            driver: original.clone(),
            vendor: dev.vendor,
            product: dev.product,
        })
        .map_err(|e| (original.clone(), e))?;
    let had = host.bind_stub(&dev.busid).map_err(|e| (original.clone(), e))?;
    let original = had.or(original);
    let now = host
        .device(&dev.busid)
        .filter(|s| s.devnum == dev.devnum)
        .ok_or((original.clone(), "it left the bus".to_string()))?;
    let (ours, kernels) =
        pump::socket_pair().map_err(|e| (original.clone(), format!("socket pair: {e}")))?;
    host.hand_socket(&dev.busid, kernels.as_raw_fd())
        .map_err(|e| (original.clone(), e))?;
    // usbip-host holds its own reference to its end now.
    drop(kernels);
    Ok((ours, now.devid(), now.speed, original))
}

/// The device is bound to `usbip-host` until this is released (explicitly at the end of
/// serving, or when dropped: a channel never served, a task cancelled at shutdown).
struct ImportGuard {
    inner: Arc<Inner>,
    id: u64,
    busid: String,
    devnum: u32,
    original: Option<String>,
    released: bool,
}

impl ImportGuard {
    fn release_now(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let host = &self.inner.host;
        let name = &self.inner.name;
        match host.release(&self.busid, self.original.as_deref()) {
            Ok(()) => info!(
                "{name}: {} back on {}",
                self.busid,
                self.original.as_deref().unwrap_or("its driver")
            ),
            Err(e) => warn!("{name}: giving {} back: {e}", self.busid),
        }
        // A device that left keeps its entry in usbip-host's table: the record keeps it too,
        // so that whatever is plugged in there next is given back (`give_back_taken`).
        if host.present(&self.busid) {
            if let Err(e) = self.inner.record.remove(&self.busid) {
                warn!("{name}: {e}");
            }
        }
        self.inner.set_state(self.id, DevState::Present);
        // It may have re-enumerated meanwhile.
        self.inner.rescan();
    }

    /// Whether the device this import had is still on the bus.
    fn still_there(&self) -> bool {
        self.inner
            .host
            .device(&self.busid)
            .is_some_and(|d| d.devnum == self.devnum)
    }
}

impl Drop for ImportGuard {
    fn drop(&mut self) {
        self.release_now();
    }
}

struct ImportChannel {
    guard: ImportGuard,
    sock: Option<OwnedFd>,
    imported: Imported,
}

impl Channel for ImportChannel {
    fn params(&self) -> Bytes {
        to_bytes(&self.imported)
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        let ImportChannel {
            guard,
            sock,
            imported,
        } = *self;
        Box::pin(async move {
            let (ChannelIo::Stream(pipe), Some(sock)) = (io, sock) else {
                return;
            };
            let control = pipe.control_tx.clone();
            let (tx, rx) = pipe.split();
            let host = guard.inner.host.clone();
            let busid = guard.busid.clone();
            let refresh = Box::new(move || host.endpoints(&busid));
            let endpoints = match guard.inner.host.endpoints(&guard.busid) {
                Ok(e) => e,
                Err(e) => {
                    warn!("{}: reading {}'s endpoints: {e}", guard.inner.name, guard.busid);
                    return;
                }
            };
            let ledger = Ledger::exporter(imported.devid, endpoints);
            let end = pump::run(sock, tx, rx, ledger, Side::Exporter { refresh }).await;
            let name = guard.inner.name.clone();
            let (gone, mut guard) = tokio::task::spawn_blocking(move || {
                let gone = !guard.still_there();
                (gone, guard)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            if gone {
                let reason = "the device left the lab host's bus (unplugged, reset or switched mode)";
                control.control(to_bytes(&Control::Gone {
                    reason: reason.into(),
                }));
                info!("{name}: import of {} ended: {reason}", guard.busid);
            } else {
                match &end {
                    End::Refused(e) => warn!("{name}: import of {} ended: the client's USB/IP was refused: {e}", guard.busid),
                    e => info!("{name}: import of {} ended: {e}", guard.busid),
                }
            }
            guard = tokio::task::spawn_blocking(move || {
                guard.release_now();
                guard
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            drop(guard);
        })
    }
}

/// A watch channel: the device list now, then again at every change, until the client
/// closes it.
struct WatchChannel {
    status: watch::Receiver<DeviceStatus>,
}

impl Channel for WatchChannel {
    fn params(&self) -> Bytes {
        self.status.borrow().params.clone()
    }

    fn serve(mut self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Stream(pipe) = io else {
                return;
            };
            let control = pipe.control_tx.clone();
            let (_tx, mut rx) = pipe.split();
            self.status.mark_unchanged();
            loop {
                tokio::select! {
                    c = self.status.changed() => {
                        if c.is_err() {
                            return;
                        }
                        let params = self.status.borrow_and_update().params.clone();
                        let mut body = Vec::with_capacity(params.len() + 1);
                        body.push(1u8);
                        body.extend_from_slice(&params);
                        if !control.control(Bytes::from(body)) {
                            return;
                        }
                    }
                    r = rx.recv() => {
                        // The client sends nothing on a watch channel: its end is the end.
                        if !matches!(r, Ok(Some(_))) {
                            return;
                        }
                    }
                }
            }
        })
    }
}
