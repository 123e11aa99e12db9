//! Client side: every device the exporter lists is imported through the local `vhci-hcd`, one
//! stream channel each, and becomes a real local USB device (`lsusb`, `/dev/ttyACM*`,
//! `/dev/sd*`, ...). A watch channel follows the exporter's list, so a device that comes back
//! (a board reset, a mode switch, a probe replugged) is imported again without anyone asking.
//!
//! Imports live only as long as the link: when it is lost the vhci ports are detached, so
//! local programs see an unplugged device (their reads and writes fail as on an unplug), never
//! a hang; the next link imports again. The same happens when the attachment ends. The nodes a
//! device became are read from sysfs as the kernel makes them (its events say when) and shown
//! as the device's endpoints.

use super::pump::{self, End, Side};
use super::uevent::Uevent;
use super::vhci::{Attached, PortsFile, Vhci};
use crate::common::TaskGuard;
use crate::{BoxFuture, Bridge, BridgeExit, Endpoint, Refusal};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::usb::{Control, DevState, DeviceParams, Imported, Ledger, OpenParams, UsbDevice};
use jmp_protocol::name::escape;
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::{ChannelMsg, Channels};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

/// How long before opening the watch channel again after the exporter ended it.
const RETRY: Duration = Duration::from_secs(2);
/// How often the nodes are read while the kernel's events cannot be had.
const POLL: Duration = Duration::from_millis(500);
/// An import that ended because one side's checks refused the other's USB/IP (or the exporter
/// ended it while the device stayed) is tried again: at most this many times in a row ...
pub const RETRIES: u32 = 4;
/// ... after this long first, doubling up to [`RETRY_MAX`] (about 4 s in all before giving up):
/// time for the exporter to give the device back to its driver and list it as present again,
/// and no busy loop against a peer that refuses every time.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// An import that lasted this long counts as having worked: the next failure starts afresh.
const STEADY: Duration = Duration::from_secs(30);

pub struct UsbBridge {
    device: String,
    vhci: Arc<dyn Vhci>,
    ports: Arc<PortsFile>,
    views: Arc<Views>,
    _follower: TaskGuard,
}

/// What this side knows of each import, shared by the import tasks and the node follower.
struct Views {
    device: String,
    map: Mutex<BTreeMap<u64, View>>,
    endpoints: watch::Sender<Vec<Endpoint>>,
    notes: watch::Sender<String>,
    changed: Notify,
    /// Devices no longer tried on this link, and why (shown in the notes).
    given_up: Mutex<BTreeMap<u64, String>>,
    /// The first link's imports not yet up (enumerated and configured here) or failed.
    pending: Mutex<HashSet<u64>>,
    /// Local bus ids of vhci devices whose `bind` event came (and no `unbind`, `remove` or
    /// new `add` since). The kernel sends a USB device's `bind` after its generic driver's
    /// probe returned, which set its configuration and probed every interface: the nodes
    /// those probes made (a ttyACM, a hidraw) exist by then. Bounded by the vhci ports.
    bound: Mutex<HashSet<String>>,
    settled: watch::Sender<bool>,
}

struct View {
    /// The device, for people (escaped).
    what: String,
    port: u32,
    local: Option<String>,
    nodes: Vec<Endpoint>,
}

impl Views {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, View>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, map: &BTreeMap<u64, View>) {
        let eps: Vec<Endpoint> = map.values().flat_map(|v| v.nodes.iter().cloned()).collect();
        self.endpoints.send_if_modified(|e| {
            let changed = *e != eps;
            *e = eps;
            changed
        });
        let mut notes: Vec<String> = map
            .values()
            .map(|v| match &v.local {
                Some(b) => format!("{} here as {b} (vhci port {})", v.what, v.port),
                None => format!("{} attaching on vhci port {}", v.what, v.port),
            })
            .collect();
        notes.extend(
            self.given_up
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        self.notes.send_if_modified(|n| {
            let s = notes.join("; ");
            let changed = *n != s;
            *n = s;
            changed
        });
    }

    /// The first link's imports to wait for before the bridge counts as settled (nothing more
    /// once it has).
    fn expect(&self, ids: impl IntoIterator<Item = u64>) {
        if *self.settled.borrow() {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.extend(ids);
        if p.is_empty() {
            self.settled.send_replace(true);
        }
    }

    /// Import `id` is up or has failed.
    fn resolve(&self, id: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.remove(&id) && p.is_empty() {
            self.settled.send_replace(true);
        }
    }

    /// Nothing more to wait for (the first link ended or listed nothing usable).
    fn settle(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.settled.send_replace(true);
    }

    fn give_up(&self, id: u64, note: String) {
        self.given_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, note);
        self.publish(&self.lock());
    }

    /// A new link tries every device again.
    fn forget_given_up(&self) {
        let was = std::mem::take(&mut *self.given_up.lock().unwrap_or_else(|e| e.into_inner()));
        if !was.is_empty() {
            self.publish(&self.lock());
        }
    }

    /// Follows one kernel event: which imported devices are up.
    fn note(&self, ev: &Uevent) {
        let Some(busid) = ev.vhci_usb_device() else {
            return;
        };
        let mut b = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        match ev.action.as_str() {
            "bind" => {
                b.insert(busid.to_string());
            }
            "unbind" | "remove" | "add" => {
                b.remove(busid);
            }
            _ => {}
        }
    }

    /// Reads what each import became here. An import counts as up once its device's `bind`
    /// event came (`events`: the kernel's events are followed), or, without events or after
    /// some were lost (`lost`), once sysfs shows every interface with a driver.
    fn refresh(&self, vhci: &dyn Vhci, events: bool, lost: bool) {
        let ports = vhci.ports();
        let mut up = Vec::new();
        let mut map = self.lock();
        for (id, v) in map.iter_mut() {
            let local = ports
                .iter()
                .find(|p| p.port == v.port)
                .and_then(|p| p.local_busid.clone());
            let nodes = local.as_deref().map(|b| vhci.nodes(b)).unwrap_or_default();
            if nodes != v.nodes && !nodes.is_empty() {
                let list: Vec<String> = nodes.iter().map(|e| e.to_string()).collect();
                info!(
                    "{}: {} is here as {}: {}",
                    self.device,
                    v.what,
                    local.as_deref().unwrap_or("?"),
                    list.join(" ")
                );
            }
            if let Some(b) = local.as_deref() {
                let is_up = if events && !lost {
                    self.bound
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(b)
                } else {
                    vhci.configured(b)
                };
                if is_up {
                    up.push(*id);
                }
            }
            v.local = local;
            v.nodes = nodes;
        }
        self.publish(&map);
        drop(map);
        // After the nodes are published: whoever waits for this reads them next.
        for id in up {
            self.resolve(id);
        }
    }
}

/// Follows the kernel's events for as long as the bridge lives, reading the imports' nodes
/// again at each.
async fn follow(views: Arc<Views>, vhci: Arc<dyn Vhci>) {
    let mut events = vhci
        .events()
        .map_err(|e| {
            warn!(
                "{}: no kernel events ({e}); reading the imported devices' nodes every {POLL:?}",
                views.device
            )
        })
        .ok();
    loop {
        let mut lost = false;
        match &mut events {
            Some(ev) => {
                tokio::select! {
                    r = ev.next() => match r {
                        Ok(list) => {
                            for e in list {
                                match e {
                                    Some(e) => views.note(&e),
                                    None => lost = true,
                                }
                            }
                        }
                        Err(e) => {
                            warn!(
                                "{}: kernel events: {e}; reading the imported devices' nodes every {POLL:?}",
                                views.device
                            );
                            events = None;
                        }
                    },
                    _ = views.changed.notified() => {}
                }
            }
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = views.changed.notified() => {}
                }
            }
        }
        let (v, h, by_events) = (views.clone(), vhci.clone(), events.is_some());
        let _ = tokio::task::spawn_blocking(move || v.refresh(h.as_ref(), by_events, lost)).await;
    }
}

impl UsbBridge {
    pub fn new(info: &DeviceInfo, dev_dir: &std::path::Path, vhci: Arc<dyn Vhci>) -> UsbBridge {
        let ports = Arc::new(PortsFile::new(dev_dir));
        for (pid, a) in ports.clean_stale(vhci.as_ref()) {
            warn!(
                "{}: detached vhci port {} (device 0x{:08x}) that a previous jmp (pid {pid}) left behind",
                info.name, a.port, a.devid
            );
        }
        let views = Arc::new(Views {
            device: info.name.clone(),
            map: Mutex::new(BTreeMap::new()),
            endpoints: watch::Sender::new(Vec::new()),
            notes: watch::Sender::new(String::new()),
            changed: Notify::new(),
            given_up: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(HashSet::new()),
            bound: Mutex::new(HashSet::new()),
            settled: watch::Sender::new(false),
        });
        let follower = tokio::spawn(follow(views.clone(), vhci.clone()));
        UsbBridge {
            device: info.name.clone(),
            vhci,
            ports,
            views,
            _follower: TaskGuard(follower),
        }
    }

    async fn run_link(&mut self, link: Arc<dyn Channels>) -> BridgeExit {
        let exit = self.follow_list(link).await;
        self.views.settle();
        exit
    }

    async fn follow_list(&mut self, link: Arc<dyn Channels>) -> BridgeExit {
        self.views.forget_given_up();
        loop {
            let (pipe, opened) = match link
                .open_stream(&self.device, to_bytes(&OpenParams::Watch))
                .await
            {
                Ok(x) => x,
                Err(e) if matches!(e.code, ErrorCode::NoSuchDevice | ErrorCode::Unsupported) => {
                    return BridgeExit::Refused(e)
                }
                Err(e) => {
                    debug!(device = %self.device, "watch: {e}");
                    return BridgeExit::LinkLost;
                }
            };
            let params = match DeviceParams::decode_exact(&opened) {
                Ok(p) => p,
                Err(e) => {
                    return BridgeExit::Refused(Refusal::new(
                        ErrorCode::Protocol,
                        format!("{}: bad device list from the exporter: {e}", self.device),
                    ))
                }
            };
            let mut imports = Imports {
                tried: HashSet::new(),
                tasks: HashMap::new(),
                done: mpsc::unbounded_channel(),
            };
            self.sync(&params, &link, &mut imports);
            let jmp_transport::Pipe {
                tx: _tx,
                mut rx,
                mut control_rx,
                ..
            } = pipe;
            let lost = loop {
                tokio::select! {
                    // The link is gone: the imports end with it (an unplug for local programs).
                    _ = link.closed() => break true,
                    m = control_rx.recv() => match m {
                        Some(ChannelMsg::Control(b)) => match Control::decode_exact(&b) {
                            Ok(Control::Changed(p)) => self.sync(&p, &link, &mut imports),
                            Ok(other) => debug!(device = %self.device, "watch: {other:?}"),
                            Err(e) => warn!(device = %self.device, "a bad message from the exporter: {e}"),
                        },
                        Some(ChannelMsg::Notice(t)) => warn!(device = %self.device, "{}", escape(&t)),
                        None => break false,
                    },
                    r = rx.recv() => if !matches!(r, Ok(Some(_))) { break false },
                    Some(id) = imports.done.1.recv() => { imports.tasks.remove(&id); }
                }
            };
            imports.stop().await;
            if lost || link.is_closed() {
                return BridgeExit::LinkLost;
            }
            warn!(device = %self.device, "the exporter ended the device list; asking again in {RETRY:?}");
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Imports what the exporter lists as present and this link has not tried yet (a device
    /// back after a reset has a new id, so it is tried).
    fn sync(&self, params: &DeviceParams, link: &Arc<dyn Channels>, imports: &mut Imports) {
        let new: Vec<&UsbDevice> = params
            .devices
            .iter()
            .filter(|d| d.state == DevState::Present && imports.tried.insert(d.id))
            .collect();
        self.views.expect(new.iter().map(|d| d.id));
        for d in new {
            if let Some(was) = d.was {
                info!(device = %self.device, "{} is back (it was device {was})", escape(&d.describe()));
            }
            let task = ImportTask {
                link: link.clone(),
                device: self.device.clone(),
                dev: d.clone(),
                vhci: self.vhci.clone(),
                ports: self.ports.clone(),
                views: self.views.clone(),
                done: imports.done.0.clone(),
            };
            imports
                .tasks
                .insert(d.id, TaskGuard(tokio::spawn(task.run())));
        }
    }
}

struct Imports {
    tried: HashSet<u64>,
    tasks: HashMap<u64, TaskGuard>,
    done: (mpsc::UnboundedSender<u64>, mpsc::UnboundedReceiver<u64>),
}

impl Imports {
    /// Ends every import and waits until their ports are detached.
    async fn stop(mut self) {
        let tasks: Vec<TaskGuard> = self.tasks.drain().map(|(_, t)| t).collect();
        for t in &tasks {
            t.0.abort();
        }
        for mut t in tasks {
            let _ = (&mut t.0).await;
        }
    }
}

struct ImportTask {
    link: Arc<dyn Channels>,
    device: String,
    dev: UsbDevice,
    vhci: Arc<dyn Vhci>,
    ports: Arc<PortsFile>,
    views: Arc<Views>,
    done: mpsc::UnboundedSender<u64>,
}

/// A vhci port this side attached: detached when dropped (the import ended, the link was
/// lost, the attachment ends).
struct PortGuard {
    vhci: Arc<dyn Vhci>,
    ports: Arc<PortsFile>,
    views: Arc<Views>,
    id: u64,
    at: Attached,
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        if let Err(e) = self.vhci.detach(self.at.port, self.at.devid) {
            warn!("{}: {e}", self.views.device);
        }
        self.ports.remove(self.at);
        let mut map = self.views.lock();
        map.remove(&self.id);
        self.views.publish(&map);
    }
}

/// How an import attempt ended.
enum Ended {
    /// For good (the device left the lab host, was detached here, or the exporter's answers
    /// make no sense).
    Done,
    /// Worth another import, and why.
    Again(String),
}

impl ImportTask {
    async fn run(self) {
        let id = self.dev.id;
        let device = &self.device;
        let what = self.what();
        let mut failures = 0u32;
        let mut wait = RETRY_FIRST;
        loop {
            let started = tokio::time::Instant::now();
            let ended = self.import(&what).await;
            self.views.resolve(id);
            let Ended::Again(why) = ended else { break };
            if started.elapsed() >= STEADY {
                failures = 0;
                wait = RETRY_FIRST;
            }
            if failures >= RETRIES {
                warn!(
                    "{device}: {what}: not imported again after {} attempts in a row ({why}); it is once it re-enumerates or the link reconnects",
                    RETRIES + 1
                );
                self.views.give_up(
                    id,
                    format!("{what} not imported: {} attempts in a row ended ({why})", RETRIES + 1),
                );
                break;
            }
            failures += 1;
            warn!("{device}: {what}: importing it again in {wait:?} (retry {failures} of {RETRIES}): {why}");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
            if self.link.is_closed() {
                break;
            }
        }
        let _ = self.done.send(id);
    }

    /// The device, for people (escaped).
    fn what(&self) -> String {
        escape(&format!(
            "{} {}",
            self.dev.ids(),
            [self.dev.manufacturer.as_str(), self.dev.name.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        ))
        .trim()
        .to_string()
    }

    /// One import, until it ends.
    async fn import(&self, what: &str) -> Ended {
        let device = &self.device;
        let (pipe, opened) = match self
            .link
            .open_stream(device, to_bytes(&OpenParams::Import { id: self.dev.id }))
            .await
        {
            Ok(x) => x,
            // The exporter is still giving the device back after the last import.
            Err(e) if e.code == ErrorCode::Busy => {
                return Ended::Again(format!("the exporter says: {}", escape(&e.reason)))
            }
            Err(e) => {
                warn!("{device}: {what} not imported: {}", escape(&e.reason));
                return Ended::Done;
            }
        };
        let imp = match Imported::decode_exact(&opened) {
            Ok(i) if i.id == self.dev.id => i,
            Ok(i) => {
                warn!("{device}: the exporter answered an import of {} for device {}", self.dev.id, i.id);
                return Ended::Done;
            }
            Err(e) => {
                warn!("{device}: a bad import answer from the exporter: {e}");
                return Ended::Done;
            }
        };
        let (ours, kernels) = match pump::socket_pair() {
            Ok(p) => p,
            Err(e) => {
                warn!("{device}: socket pair: {e}");
                return Ended::Done;
            }
        };
        let vhci = self.vhci.clone();
        let fd = kernels.as_raw_fd();
        let attached = tokio::task::spawn_blocking(move || {
            let r = vhci.attach(fd, imp.devid, imp.speed);
            // vhci-hcd holds its own reference to its end now.
            drop(kernels);
            r
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let port = match attached {
            Ok(p) => p,
            Err(e) => {
                warn!("{device}: {what} not imported: {e}");
                return Ended::Done;
            }
        };
        let at = Attached {
            port,
            devid: imp.devid,
        };
        self.ports.add(at);
        {
            let mut map = self.views.lock();
            map.insert(
                self.dev.id,
                View {
                    what: what.to_string(),
                    port,
                    local: None,
                    nodes: Vec::new(),
                },
            );
            self.views.publish(&map);
        }
        let _guard = PortGuard {
            vhci: self.vhci.clone(),
            ports: self.ports.clone(),
            views: self.views.clone(),
            id: self.dev.id,
            at,
        };
        self.views.changed.notify_one();
        info!("{device}: importing {what} on vhci port {port}");
        let jmp_transport::Pipe {
            tx,
            rx,
            mut control_rx,
            ..
        } = pipe;
        let pump = pump::run(ours, tx, rx, Ledger::client(imp.devid), Side::Client);
        tokio::pin!(pump);
        let mut gone: Option<String> = None;
        let mut listening = true;
        let end = loop {
            tokio::select! {
                e = &mut pump => break e,
                m = control_rx.recv(), if listening => match m {
                    Some(ChannelMsg::Control(b)) => {
                        if let Ok(Control::Gone { reason }) = Control::decode_exact(&b) {
                            gone = Some(reason);
                        }
                    }
                    Some(ChannelMsg::Notice(t)) => warn!("{device}: {}", escape(&t)),
                    None => listening = false,
                },
            }
        };
        // The exporter's word may come just after its stream's end.
        if gone.is_none() {
            if let Ok(ChannelMsg::Control(b)) = control_rx.try_recv() {
                if let Ok(Control::Gone { reason }) = Control::decode_exact(&b) {
                    gone = Some(reason);
                }
            }
        }
        match (gone, end) {
            (Some(reason), _) => {
                info!(
                    "{device}: {what} is gone on the exporter ({}); unplugged here",
                    escape(&reason)
                );
                Ended::Done
            }
            (None, End::Refused(e)) => {
                warn!("{device}: {what} unplugged here: the exporter's USB/IP was refused: {e}");
                Ended::Again(format!("the exporter's USB/IP was refused: {e}"))
            }
            (None, e @ End::Local(_)) => {
                warn!("{device}: {what} unplugged here: {e}");
                Ended::Again(e.to_string())
            }
            (None, End::Kernel(_)) => {
                info!("{device}: {what} was detached here");
                Ended::Done
            }
            // The exporter ended the stream and did not say the device left: its checks
            // refused what the kernel here sent, or its usbip-host closed the connection.
            (None, e @ End::Peer(_)) => {
                info!("{device}: {what} unplugged here: {e}");
                if self.link.is_closed() {
                    Ended::Done
                } else {
                    Ended::Again(format!("the exporter ended the import: {e}"))
                }
            }
        }
    }
}

impl Bridge for UsbBridge {
    fn device(&self) -> &str {
        &self.device
    }
    fn kind(&self) -> Kind {
        Kind::Usb
    }
    fn endpoints(&self) -> Vec<Endpoint> {
        self.views.endpoints.borrow().clone()
    }
    fn live_endpoints(&self) -> Option<watch::Receiver<Vec<Endpoint>>> {
        Some(self.views.endpoints.subscribe())
    }
    fn local_status(&self) -> Option<watch::Receiver<String>> {
        Some(self.views.notes.subscribe())
    }
    fn settled(&self) -> Option<watch::Receiver<bool>> {
        Some(self.views.settled.subscribe())
    }
    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(self.run_link(link))
    }
}
