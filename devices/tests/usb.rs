//! USB devices over an in-memory session, with stand-ins for the two kernels: a fake lab host
//! whose `usbip-host` answers USB/IP (an echo device: bulk out stores, bulk in returns it) and a
//! fake `vhci-hcd` whose attached sockets this test drives as the client's kernel would. The
//! real kernels are exercised in the qemu guest (tests/tests/usb_guest.rs); here the parts in
//! between: listing and matching, import and release, gone and back, a lost link, what a
//! hostile client or exporter sends, and the record a crashed exporter leaves.

use bytes::Bytes;
use jmp_devices::serve::DeviceSet;
use jmp_devices::testing::mem_session;
use jmp_devices::usb::sysfs::{Host, SysDevice, STUB};
use jmp_devices::usb::uevent::{Uevent, UeventSource};
use jmp_devices::usb::vhci::{Port, Vhci};
use jmp_devices::usb::{UsbBridge, UsbDriver, UsbSpec};
use jmp_devices::{Bridge, BridgeExit, Channel, Driver, Endpoint, Local};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::usb::*;
use jmp_protocol::{ChannelMode, DeviceInfo, ErrorCode, Kind, Open, Refusal};
use jmp_transport::{BoxFuture, ChannelIo, Channels};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Guards against hangs only.
const GUARD: Duration = Duration::from_secs(30);

async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress in {GUARD:?}"))
}

fn dup(fd: RawFd) -> UnixStream {
    // SAFETY: dup(2) of a descriptor the caller holds open; the copy is owned at once.
    let d = unsafe { libc::dup(fd) };
    assert!(d >= 0, "dup");
    let s = UnixStream::from(unsafe { OwnedFd::from_raw_fd(d) });
    s.set_nonblocking(false).expect("blocking");
    s
}

fn device(busid: &str, product: u16, devnum: u32) -> SysDevice {
    SysDevice {
        busid: busid.into(),
        vendor: 0x1209,
        product,
        class: 0,
        manufacturer: "jmp".into(),
        name: format!("test {product:04x}"),
        serial: format!("s-{busid}"),
        speed: Speed::High,
        busnum: 1,
        devnum,
        driver: Some("usb".into()),
    }
}

/// The lab host: its devices, what was done to them, and a usbip-host that answers.
#[derive(Default)]
struct FakeHost {
    devices: Mutex<Vec<SysDevice>>,
    log: Mutex<Vec<String>>,
    /// The stub's socket per bus id (to unplug: shut down).
    stubs: Mutex<HashMap<String, UnixStream>>,
    /// Every command header usbip-host received: (command, seqnum, endpoint).
    seen: Arc<Mutex<Vec<(u32, u32, u32)>>>,
}

impl FakeHost {
    fn new(devices: Vec<SysDevice>) -> Arc<FakeHost> {
        Arc::new(FakeHost {
            devices: Mutex::new(devices),
            ..Default::default()
        })
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn driver(&self, busid: &str) -> Option<String> {
        self.device(busid).and_then(|d| d.driver)
    }
    fn set_driver(&self, busid: &str, d: Option<&str>) {
        for x in self.devices.lock().unwrap().iter_mut() {
            if x.busid == busid {
                x.driver = d.map(str::to_string);
            }
        }
    }
    /// The device leaves the bus: usbip-host drops its connection.
    fn unplug(&self, busid: &str) {
        self.devices.lock().unwrap().retain(|d| d.busid != busid);
        if let Some(s) = self.stubs.lock().unwrap().remove(busid) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
    fn plug(&self, d: SysDevice) {
        self.devices.lock().unwrap().push(d);
    }
}

/// usbip-host's side of one device: an echo on bulk 2 out / bulk 1 in, descriptors on ep 0.
fn stub(mut s: UnixStream, seen: Arc<Mutex<Vec<(u32, u32, u32)>>>) {
    let mut stored = Vec::new();
    loop {
        let mut h = [0u8; HEADER];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let w = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (cmd, seq, dir, ep, len) = (w(0), w(4), w(12), w(16), w(24));
        seen.lock().unwrap().push((cmd, seq, ep));
        let mut out = Vec::new();
        if cmd == CMD_UNLINK {
            out.extend(build::ret_unlink(seq, -104));
        } else if dir == 0 {
            stored = vec![0; len as usize];
            if s.read_exact(&mut stored).is_err() {
                return;
            }
            out.extend(build::ret_submit(seq, 0, len, 0, 0));
        } else {
            let data: Vec<u8> = if ep == 0 {
                vec![0x12; len as usize]
            } else {
                stored.iter().copied().take(len as usize).collect()
            };
            out.extend(build::ret_submit(seq, 0, data.len() as u32, 0, 0));
            out.extend(&data);
        }
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

impl Host for FakeHost {
    fn devices(&self) -> std::io::Result<Vec<SysDevice>> {
        Ok(self.devices.lock().unwrap().clone())
    }
    fn device(&self, busid: &str) -> Option<SysDevice> {
        self.devices
            .lock()
            .unwrap()
            .iter()
            .find(|d| d.busid == busid)
            .cloned()
    }
    fn endpoints(&self, _busid: &str) -> std::io::Result<Endpoints> {
        let mut e = Endpoints::control_only();
        e.set(1, true, EpType::Bulk);
        e.set(2, false, EpType::Bulk);
        Ok(e)
    }
    fn bind_stub(&self, busid: &str) -> Result<Option<String>, String> {
        let had = self.driver(busid);
        self.log.lock().unwrap().push(format!("bind {busid}"));
        self.set_driver(busid, Some(STUB));
        Ok(had)
    }
    fn hand_socket(&self, busid: &str, fd: RawFd) -> Result<(), String> {
        let s = dup(fd);
        self.stubs
            .lock()
            .unwrap()
            .insert(busid.into(), s.try_clone().expect("clone"));
        let seen = self.seen.clone();
        std::thread::spawn(move || stub(s, seen));
        Ok(())
    }
    fn release(&self, busid: &str, original: Option<&str>) -> Result<(), String> {
        self.log
            .lock()
            .unwrap()
            .push(format!("release {busid} {}", original.unwrap_or("-")));
        if let Some(s) = self.stubs.lock().unwrap().remove(busid) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.set_driver(busid, Some(original.unwrap_or("usb")));
        Ok(())
    }
    fn present(&self, busid: &str) -> bool {
        self.device(busid).is_some()
    }
}

/// An attach as vhci-hcd gets it: port, devid, speed, and the socket it serves.
type AttachedPort = (u32, u32, Speed, UnixStream);

/// The client's vhci-hcd: attached sockets go to the test, which plays the kernel, and sends
/// the kernel's events (`events`) for them. A device shows its usb node at once, its tty once
/// the test lists its bus id in `probed`.
struct FakeVhci {
    ports: Mutex<Vec<(u32, u32)>>,
    next: Mutex<u32>,
    attached: mpsc::UnboundedSender<AttachedPort>,
    detached: Mutex<Vec<u32>>,
    events: mpsc::UnboundedSender<Option<Uevent>>,
    source: Mutex<Option<mpsc::UnboundedReceiver<Option<Uevent>>>>,
    probed: Mutex<Vec<String>>,
}

/// The kernel's events as the test sends them.
struct FakeEvents(mpsc::UnboundedReceiver<Option<Uevent>>);

impl UeventSource for FakeEvents {
    fn next(&mut self) -> BoxFuture<'_, std::io::Result<Vec<Option<Uevent>>>> {
        Box::pin(async move {
            match self.0.recv().await {
                Some(e) => Ok(vec![e]),
                None => std::future::pending().await,
            }
        })
    }
}

/// A kernel event about the vhci device at `busid` (or, with `tty`, its interface's tty).
fn vhci_event(action: &str, busid: &str, tty: bool) -> Option<Uevent> {
    let dev = format!("/devices/platform/vhci_hcd.0/usb9/{busid}");
    Some(if tty {
        Uevent {
            action: action.into(),
            devpath: format!("{dev}/{busid}:1.0/tty/ttyACM0"),
            subsystem: Some("tty".into()),
            devtype: None,
        }
    } else {
        Uevent {
            action: action.into(),
            devpath: dev,
            subsystem: Some("usb".into()),
            devtype: Some("usb_device".into()),
        }
    })
}

impl FakeVhci {
    fn new() -> (Arc<FakeVhci>, mpsc::UnboundedReceiver<AttachedPort>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, source) = mpsc::unbounded_channel();
        (
            Arc::new(FakeVhci {
                ports: Mutex::new(Vec::new()),
                next: Mutex::new(0),
                attached: tx,
                detached: Mutex::new(Vec::new()),
                events,
                source: Mutex::new(Some(source)),
                probed: Mutex::new(Vec::new()),
            }),
            rx,
        )
    }
    fn in_use(&self) -> usize {
        self.ports.lock().unwrap().len()
    }
}

impl Vhci for FakeVhci {
    fn attach(&self, fd: RawFd, devid: u32, speed: Speed) -> Result<u32, String> {
        let mut n = self.next.lock().unwrap();
        let port = *n;
        *n += 1;
        self.ports.lock().unwrap().push((port, devid));
        let _ = self.attached.send((port, devid, speed, dup(fd)));
        Ok(port)
    }
    fn detach(&self, port: u32, devid: u32) -> Result<(), String> {
        let mut p = self.ports.lock().unwrap();
        if p.contains(&(port, devid)) {
            p.retain(|x| *x != (port, devid));
            self.detached.lock().unwrap().push(port);
        }
        Ok(())
    }
    fn ports(&self) -> Vec<Port> {
        self.ports
            .lock()
            .unwrap()
            .iter()
            .map(|(port, devid)| Port {
                port: *port,
                superspeed: false,
                free: false,
                devid: *devid,
                local_busid: Some(format!("9-{}", port + 1)),
            })
            .collect()
    }
    fn nodes(&self, busid: &str) -> Vec<Endpoint> {
        let mut v = vec![Endpoint::with_role(
            "usb",
            Local::Path(PathBuf::from(format!("/dev/bus/usb/fake-{busid}"))),
        )];
        if self.probed.lock().unwrap().iter().any(|b| b == busid) {
            v.push(Endpoint::with_role(
                "tty",
                Local::Path(PathBuf::from(format!("/dev/fake-{busid}"))),
            ));
        }
        v
    }
    fn events(&self) -> std::io::Result<Box<dyn UeventSource>> {
        match self.source.lock().unwrap().take() {
            Some(rx) => Ok(Box::new(FakeEvents(rx))),
            None => Err(std::io::Error::other("one bridge per fake")),
        }
    }
}

fn spec() -> UsbSpec {
    serde_norway::from_str("{ids: ['1209:0001', '1209:0002']}").expect("spec")
}

/// A scratch directory, removed when dropped (also when the test fails).
fn temp(tag: &str) -> jmp_e2e::TempDir {
    jmp_e2e::TempDir::new(&format!("usb-test-{tag}"))
}

/// As the client's kernel: a bulk out of `data`, then a bulk in that must bring it back.
fn echo_through(k: &mut UnixStream, devid: u32, seq: u32, data: &[u8]) {
    let mut cmd = build::submit(seq, devid, 2, false, data.len() as u32, 0, [0; 8]);
    cmd.extend(data);
    cmd.extend(build::submit(
        seq + 1,
        devid,
        1,
        true,
        data.len() as u32,
        0,
        [0; 8],
    ));
    k.write_all(&cmd).expect("commands");
    let mut h = [0u8; HEADER];
    k.read_exact(&mut h).expect("answer to the out");
    assert_eq!(
        &h[..8],
        &[0, 0, 0, 3, 0, 0, 0, seq as u8][..8],
        "RET_SUBMIT {seq}"
    );
    k.read_exact(&mut h).expect("answer to the in");
    let mut back = vec![0; data.len()];
    k.read_exact(&mut back).expect("data");
    assert_eq!(back, data);
}

fn params(d: &dyn Driver) -> DeviceParams {
    DeviceParams::decode_exact(&d.status().borrow().params).expect("params")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_imported_carry_usbip_and_come_back() {
    let host = FakeHost::new(vec![device("1-1", 0x0001, 5), device("1-2", 0x0666, 6)]);
    let state = temp("import");
    let driver = Arc::new(UsbDriver::new(
        "board",
        &spec(),
        host.clone(),
        Some(state.path()),
    ));
    driver.rescan();
    let p = params(driver.as_ref());
    assert_eq!(p.devices.len(), 1, "only what ids match is listed: {p:?}");
    let first = p.devices[0].id;
    assert_eq!(
        (p.devices[0].busid.as_str(), p.devices[0].state),
        ("1-1", DevState::Present)
    );

    let (link, _session) = mem_session(DeviceSet::new(
        "lab",
        vec![driver.clone() as Arc<dyn Driver>],
    ));
    let (vhci, mut attached) = FakeVhci::new();
    let info = jmp_devices::info(driver.as_ref());
    let dev_dir = temp("import-dev");
    let mut bridge = UsbBridge::new(&info, dev_dir.path(), vhci.clone());
    let mut eps = bridge.live_endpoints().expect("live endpoints");
    let link2: Arc<dyn Channels> = link.clone();
    let run = tokio::spawn(async move {
        let exit = bridge.run(link2).await;
        (bridge, exit)
    });

    // Imported: bound to usbip-host, recorded, attached with the device's id and speed.
    let (port, devid, speed, mut k) = guard("attach", attached.recv()).await.expect("attached");
    assert_eq!((devid, speed), ((1 << 16) | 5, Speed::High));
    assert_eq!(host.log(), ["bind 1-1"]);
    assert!(std::fs::read_to_string(state.join("usb-board.json"))
        .expect("record")
        .contains("1-1"));
    assert_eq!(params(driver.as_ref()).devices[0].state, DevState::Imported);
    let k2 = tokio::task::spawn_blocking(move || {
        echo_through(&mut k, devid, 1, b"hello through usbip");
        k
    })
    .await
    .expect("echo");
    // Its nodes show as the device's endpoints.
    guard("endpoints", eps.wait_for(|e| !e.is_empty()))
        .await
        .expect("endpoints");
    assert_eq!(
        eps.borrow()[0].to_string(),
        format!("usb:/dev/bus/usb/fake-9-{}", port + 1)
    );

    // Unplugged on the lab host: gone there, detached here (the kernel's socket ends).
    host.unplug("1-1");
    driver.rescan();
    assert_eq!(params(driver.as_ref()).devices[0].state, DevState::Gone);
    let k3 = tokio::task::spawn_blocking(move || {
        let mut k = k2;
        let mut b = [0u8; 1];
        assert_eq!(k.read(&mut b).expect("read"), 0, "the kernel's socket ends");
    });
    guard("end of the kernel's socket", k3).await.expect("join");
    guard("detach", async {
        while vhci.in_use() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(*vhci.detached.lock().unwrap(), [port]);
    guard("no endpoints", eps.wait_for(|e| e.is_empty()))
        .await
        .expect("endpoints");
    // The record keeps a device that left while bound (usbip-host keeps its bus id).
    assert!(
        host.log().contains(&"release 1-1 usb".to_string()),
        "{:?}",
        host.log()
    );

    // Back, in another mode: a new id that remembers the old one; imported again unasked.
    host.plug(device("1-1", 0x0002, 7));
    driver.rescan();
    let p = params(driver.as_ref());
    let back = p
        .devices
        .iter()
        .find(|d| d.state != DevState::Gone)
        .expect("back");
    assert_eq!((back.product, back.was), (0x0002, Some(first)));
    assert!(back.id > first);
    let (_, devid, _, mut k) = guard("attach again", attached.recv())
        .await
        .expect("attached");
    assert_eq!(devid, (1 << 16) | 7);
    tokio::task::spawn_blocking(move || echo_through(&mut k, devid, 1, b"again"))
        .await
        .expect("echo");

    // The link is lost: detached here (an unplug for local programs), given back there.
    _session.abort();
    let (bridge, exit) = guard("bridge ends", run).await.expect("run");
    assert_eq!(exit, BridgeExit::LinkLost);
    assert_eq!(vhci.in_use(), 0);
    // Given back, then taken off the record (in that order, on the exporter's task: waiting
    // for the driver alone and then looking at the record raced its removal).
    guard("given back and nothing left recorded as bound", async {
        while host.driver("1-1").as_deref() != Some("usb") || state.join("usb-board.json").exists()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_gets_nothing_it_was_not_offered() {
    let host = FakeHost::new(vec![device("1-1", 0x0001, 5), device("1-2", 0x0666, 6)]);
    let driver = Arc::new(UsbDriver::new("board", &spec(), host.clone(), None));
    driver.rescan();
    let listed = params(driver.as_ref()).devices[0].id;
    let (link, _session) = mem_session(DeviceSet::new(
        "lab",
        vec![driver.clone() as Arc<dyn Driver>],
    ));
    // Ids the exporter did not list, and parameters that are not an open.
    for id in (0..100).filter(|i| *i != listed) {
        let e = link
            .open_stream("board", to_bytes(&OpenParams::Import { id }))
            .await
            .err()
            .unwrap_or_else(|| panic!("device {id} imported"));
        assert_eq!(e.code, ErrorCode::NoSuchDevice, "{e:?}");
    }
    let e = link
        .open_stream("board", Bytes::from_static(b"\x011-2"))
        .await
        .err()
        .expect("a bus id refused");
    assert_eq!(e.code, ErrorCode::Protocol, "{e:?}");
    assert!(host.log().is_empty(), "nothing was bound: {:?}", host.log());

    // Imported, then commands usbip-host must not see: each ends the import, nothing of it
    // reaches the stub, and the device goes back to its driver.
    let hostile: [(&str, Vec<u8>); 3] = [
        (
            "no such endpoint",
            build::submit(1, (1 << 16) | 5, 3, true, 8, 0, [0; 8]),
        ),
        (
            "too large",
            build::submit(1, (1 << 16) | 5, 1, true, 1 << 30, 0, [0; 8]),
        ),
        ("not a command", build::ret_submit(1, 0, 0, 0, 0)),
    ];
    for (what, bad) in hostile {
        let (pipe, opened) = link
            .open_stream("board", to_bytes(&OpenParams::Import { id: listed }))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let imp = Imported::decode_exact(&opened).expect("imported");
        assert_eq!(imp.devid, (1 << 16) | 5);
        // A second import of the same device while this one holds it is refused.
        let busy = link
            .open_stream("board", to_bytes(&OpenParams::Import { id: listed }))
            .await
            .err()
            .expect("busy");
        assert_eq!(busy.code, ErrorCode::Busy, "{busy:?}");
        let (mut tx, mut rx) = pipe.split();
        // A good command first, answered; then the bad one, which ends the import.
        tx.send(Bytes::from(build::submit(
            7,
            imp.devid,
            0,
            true,
            18,
            0,
            [0x80, 6, 0, 1, 0, 0, 18, 0],
        )))
        .await
        .expect("send");
        let mut got = Vec::new();
        while got.len() < HEADER + 18 {
            match guard(what, rx.recv()).await {
                Ok(Some(b)) => got.extend_from_slice(&b),
                other => panic!("{what}: the good command was not answered: {other:?}"),
            }
        }
        tx.send(Bytes::from(bad)).await.expect("send");
        let end = guard(what, rx.recv()).await;
        assert!(matches!(end, Ok(None) | Err(_)), "{what}: {end:?}");
        guard("given back", async {
            while host.driver("1-1").as_deref() != Some("usb") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let seen = std::mem::take(&mut *host.seen.lock().unwrap());
        assert_eq!(
            seen,
            [(CMD_SUBMIT, 7, 0)],
            "{what}: usbip-host saw {seen:?}"
        );
    }
    assert!(
        !host.log().iter().any(|l| l.contains("1-2")),
        "{:?}",
        host.log()
    );
}

#[tokio::test]
async fn what_a_killed_exporter_left_bound_is_given_back_at_start() {
    let state = temp("restore");
    std::fs::write(
        state.join("usb-board.json"),
        r#"[{"busid":"1-1","driver":"usb","vendor":4617,"product":1},{"busid":"1-3","driver":"usb","vendor":4617,"product":1}]"#,
    )
    .expect("record");
    let mut on_stub = device("1-1", 0x0001, 5);
    on_stub.driver = Some(STUB.into());
    // Matched, on usbip-host, but in no record (a run without a state directory).
    let mut unrecorded = device("1-4", 0x0002, 8);
    unrecorded.driver = Some(STUB.into());
    let host = FakeHost::new(vec![on_stub, unrecorded, device("1-2", 0x0666, 6)]);
    let driver = UsbDriver::new("board", &spec(), host.clone(), Some(state.path()));
    driver.restore();
    assert_eq!(host.log(), ["release 1-1 usb", "release 1-4 -"]);
    // 1-3 left the bus while bound: usbip-host keeps its bus id, so the record keeps it ...
    let rec = std::fs::read_to_string(state.join("usb-board.json")).expect("record");
    assert!(rec.contains("1-3") && !rec.contains("1-1"), "{rec}");
    // ... and whatever usbip-host takes there next is given back, matched or not.
    let mut stranger = device("1-3", 0x0666, 9);
    stranger.driver = Some(STUB.into());
    host.plug(stranger);
    driver.rescan();
    assert_eq!(host.driver("1-3").as_deref(), Some("usb"));
    assert!(!state.join("usb-board.json").exists());
}

/// An exporter that lists one device and answers its import with USB/IP nobody asked for.
struct HostileExporter {
    status: watch::Sender<jmp_devices::DeviceStatus>,
    answer: Vec<u8>,
}

impl HostileExporter {
    /// Lists `listing` and answers every import with `answer`.
    fn new(listing: &DeviceParams, answer: Vec<u8>) -> Arc<HostileExporter> {
        Arc::new(HostileExporter {
            status: watch::Sender::new(jmp_devices::DeviceStatus::available(to_bytes(listing))),
            answer,
        })
    }
}

/// What the hostile exporter lists: one device, 1-1 (1209:0001 at high speed).
fn hostile_listing() -> DeviceParams {
    DeviceParams {
        ids: vec![(0x1209, 1)],
        devices: vec![UsbDevice {
            id: 1,
            busid: "1-1".into(),
            vendor: 0x1209,
            product: 1,
            class: 0,
            manufacturer: String::new(),
            name: String::new(),
            serial: String::new(),
            speed: Speed::High,
            busnum: 1,
            devnum: 5,
            state: DevState::Present,
            was: None,
        }],
    }
}

/// The hostile exporter's device as the client sees it, listing `listing`.
fn hostile_info(listing: &DeviceParams) -> DeviceInfo {
    DeviceInfo {
        name: "board".into(),
        kind: Kind::Usb,
        state: jmp_protocol::DeviceState::Available,
        params: to_bytes(listing),
        detail: String::new(),
    }
}

/// The kernel's first command to an imported device: GET_DESCRIPTOR (device, 18 bytes) on
/// endpoint 0, seqnum 1.
fn get_device_descriptor(devid: u32) -> Vec<u8> {
    build::submit(1, devid, 0, true, 18, 0, [0x80, 6, 0, 1, 0, 0, 18, 0])
}

struct HostileChannel {
    params: Bytes,
    answer: Option<Vec<u8>>,
}

impl Channel for HostileChannel {
    fn params(&self) -> Bytes {
        self.params.clone()
    }
    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Stream(pipe) = io else { return };
            // Kept: a channel whose control sender is gone has ended for the client.
            let _control = pipe.control_tx.clone();
            let (mut tx, mut rx) = pipe.split();
            if let Some(a) = self.answer {
                // Waits for the client's first command, then answers with its own bytes.
                let _ = rx.recv().await;
                let _ = tx.send(Bytes::from(a)).await;
            }
            while let Ok(Some(_)) = rx.recv().await {}
        })
    }
}

impl Driver for HostileExporter {
    fn name(&self) -> &str {
        "board"
    }
    fn kind(&self) -> Kind {
        Kind::Usb
    }
    fn detail(&self) -> String {
        String::new()
    }
    fn status(&self) -> watch::Receiver<jmp_devices::DeviceStatus> {
        self.status.subscribe()
    }
    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Stream]
    }
    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let ch = match OpenParams::decode_exact(&req.params) {
                Ok(OpenParams::Watch) => HostileChannel {
                    params: self.status.borrow().params.clone(),
                    answer: None,
                },
                Ok(OpenParams::Import { id }) => HostileChannel {
                    params: to_bytes(&Imported {
                        id,
                        devid: 0x10005,
                        speed: Speed::High,
                    }),
                    answer: Some(self.answer.clone()),
                },
                Err(e) => return Err(Refusal::new(ErrorCode::Protocol, e.to_string())),
            };
            Ok(Box::new(ch) as Box<dyn Channel>)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_exporter_cannot_feed_the_client_kernel() {
    let listing = hostile_listing();
    // An answer to a command never sent, an answer longer than asked, data for an out.
    let answers: [(&str, Vec<u8>); 3] = [
        ("unknown seqnum", build::ret_submit(99, 0, 0, 0, 0)),
        (
            "longer than asked",
            [build::ret_submit(1, 0, 4096, 0, 0), vec![0x41; 4096]].concat(),
        ),
        ("a positive status", build::ret_submit(1, 1, 0, 0, 0)),
    ];
    for (what, answer) in answers {
        let driver = HostileExporter::new(&listing, answer);
        let (link, _session) = mem_session(DeviceSet::new(
            "lab",
            vec![driver.clone() as Arc<dyn Driver>],
        ));
        let (vhci, mut attached) = FakeVhci::new();
        let info = hostile_info(&listing);
        let dev_dir = temp("hostile-exporter");
        let mut bridge = UsbBridge::new(&info, dev_dir.path(), vhci.clone());
        let l: Arc<dyn Channels> = link.clone();
        let run = tokio::spawn(async move { bridge.run(l).await });
        let (_, devid, _, mut k) = guard("attach", attached.recv()).await.expect("attached");
        // The kernel asks for 18 bytes; what comes back must never reach it.
        let got = tokio::task::spawn_blocking(move || {
            k.write_all(&get_device_descriptor(devid))
                .unwrap_or_else(|e| panic!("{what}: writing the command: {e}"));
            let mut all = Vec::new();
            k.read_to_end(&mut all).expect("read");
            all
        });
        let got = guard(what, got).await.expect("join");
        assert!(got.is_empty(), "{what}: the kernel got {} bytes", got.len());
        guard("detached", async {
            while vhci.in_use() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        run.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_the_checks_ended_is_imported_again() {
    let host = FakeHost::new(vec![device("1-1", 0x0001, 5)]);
    let driver = Arc::new(UsbDriver::new("board", &spec(), host.clone(), None));
    driver.rescan();
    let (link, _session) = mem_session(DeviceSet::new(
        "lab",
        vec![driver.clone() as Arc<dyn Driver>],
    ));
    let (vhci, mut attached) = FakeVhci::new();
    let info = jmp_devices::info(driver.as_ref());
    let dev_dir = temp("again-dev");
    let mut bridge = UsbBridge::new(&info, dev_dir.path(), vhci.clone());
    let eps = bridge.live_endpoints().expect("live endpoints");
    let mut settled = bridge.settled().expect("settled");
    assert!(!*settled.borrow(), "nothing imported yet");
    let l: Arc<dyn Channels> = link.clone();
    let run = tokio::spawn(async move { bridge.run(l).await });

    let (port, devid, _, mut k) = guard("attach", attached.recv()).await.expect("attached");
    let busid = format!("9-{}", port + 1);
    let shown = |eps: &watch::Receiver<Vec<Endpoint>>| -> Vec<String> {
        eps.borrow().iter().map(|e| e.to_string()).collect()
    };
    let (usb_node, tty_node) = (
        format!("usb:/dev/bus/usb/fake-{busid}"),
        format!("tty:/dev/fake-{busid}"),
    );
    // Enumerated here, its interfaces not probed yet: the usb node only.
    vhci.events
        .send(vhci_event("add", &busid, false))
        .expect("event");
    let mut watching = eps.clone();
    guard("usb node", watching.wait_for(|e| !e.is_empty()))
        .await
        .expect("endpoints");
    assert_eq!(shown(&eps), std::slice::from_ref(&usb_node));
    // The interface's driver made its tty, but the device's `bind` has not come: its other
    // interfaces may still be probing, so it is not up yet (the refresh that showed the tty
    // was done with the device as it is now).
    vhci.probed.lock().unwrap().push(busid.clone());
    vhci.events
        .send(vhci_event("add", &busid, true))
        .expect("event");
    guard("tty node", watching.wait_for(|e| e.len() == 2))
        .await
        .expect("endpoints");
    assert!(!*settled.borrow(), "settled before the device's bind event");
    // Settled at the device's bind, with every node already published (what `jmp attach`
    // puts in its ready line).
    vhci.events
        .send(vhci_event("bind", &busid, false))
        .expect("event");
    guard("settled", settled.wait_for(|s| *s))
        .await
        .expect("settled");
    assert_eq!(shown(&eps), [usb_node, tty_node]);
    // A command for an endpoint the device does not have: the exporter's checks end the
    // import (usbip-host never sees it), and the device goes back to its driver.
    let k = tokio::task::spawn_blocking(move || {
        k.write_all(&build::submit(1, devid, 3, true, 8, 0, [0; 8]))
            .expect("command");
        let mut rest = Vec::new();
        k.read_to_end(&mut rest).expect("read");
        rest
    });
    assert!(guard("import ends", k).await.expect("join").is_empty());
    // Imported again, unasked, with the device neither re-enumerated nor the link lost.
    let (port2, devid2, _, mut k) = guard("attach again", attached.recv())
        .await
        .expect("attached again");
    assert_eq!(devid2, devid);
    assert_ne!(port2, port);
    assert_eq!(*vhci.detached.lock().unwrap(), [port]);
    tokio::task::spawn_blocking(move || echo_through(&mut k, devid2, 1, b"imported again"))
        .await
        .expect("echo");
    assert_eq!(host.log(), ["bind 1-1", "release 1-1 usb", "bind 1-1"]);
    assert!(
        !host.seen.lock().unwrap().iter().any(|(_, _, ep)| *ep == 3),
        "usbip-host saw the refused command"
    );
    run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_refused_every_time_is_tried_a_bounded_number_of_times() {
    let listing = hostile_listing();
    let driver = HostileExporter::new(&listing, build::ret_submit(99, 0, 0, 0, 0));
    let (link, _session) = mem_session(DeviceSet::new(
        "lab",
        vec![driver.clone() as Arc<dyn Driver>],
    ));
    let (vhci, mut attached) = FakeVhci::new();
    let info = hostile_info(&listing);
    let dev_dir = temp("bounded");
    let mut bridge = UsbBridge::new(&info, dev_dir.path(), vhci.clone());
    let mut notes = bridge.local_status().expect("notes");
    let l: Arc<dyn Channels> = link.clone();
    let run = tokio::spawn(async move { bridge.run(l).await });
    // Each import: the kernel's command is answered with a seqnum never sent, which the
    // client refuses; the first and RETRIES more.
    for n in 0..=jmp_devices::usb::bridge::RETRIES {
        let (_, devid, _, mut k) = guard("attach", attached.recv())
            .await
            .unwrap_or_else(|| panic!("import {n}"));
        let got = tokio::task::spawn_blocking(move || {
            k.write_all(&get_device_descriptor(devid)).expect("command");
            let mut all = Vec::new();
            k.read_to_end(&mut all).expect("read");
            all
        });
        assert!(guard("refused", got).await.expect("join").is_empty());
    }
    guard("given up", notes.wait_for(|n| n.contains("not imported")))
        .await
        .expect("notes");
    assert!(
        notes.borrow().contains(&format!(
            "{} attempts in a row",
            jmp_devices::usb::bridge::RETRIES + 1
        )),
        "{}",
        notes.borrow().as_str()
    );
    // Given up after the last attempt ended: no import after it.
    assert!(attached.try_recv().is_err(), "imported once more");
    assert_eq!(vhci.in_use(), 0);
    run.abort();
}
