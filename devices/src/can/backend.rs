//! The bus tasks behind a CAN driver, one per backend: the simulated ECU, an slcan adapter on
//! a serial path, a SocketCAN interface. Each owns its backend for the life of the exporter,
//! hands received frames to the [`Hub`] and sends the frames clients queued. A backend that is
//! missing or vanishes is reopened every second; frames that arrive for it meanwhile are
//! refused, counted, and their channels told once per outage.

use super::driver::{now_us, Hub};
use super::sim::SimEcu;
use super::slcan::{self, AdapterLine, LineSplitter};
use crate::board::Board;
use bytes::BytesMut;
use jmp_protocol::kinds::can::{error, BusState, Frame};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// What the simulated ECU needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub bitrate: u32,
    pub period: Option<Duration>,
    pub counter_id: u32,
    pub request_id: u32,
    pub response_id: u32,
    pub load: u32,
    pub board: Board,
}

/// Counts a refused frame and tells the channels the first time in an outage.
fn refuse(hub: &Hub, why: &str, told: &mut bool) {
    hub.params().refused += 1;
    if !*told {
        *told = true;
        hub.notice_all(&format!("{}: frames not sent: {why}", hub.name()));
    }
}

/// Refuses the frames that arrive for `d` (the backend is down), until `d` has passed.
async fn refuse_for(hub: &Hub, why: &str, bus: &mut mpsc::Receiver<Frame>, d: Duration) -> bool {
    let deadline = tokio::time::sleep(d);
    tokio::pin!(deadline);
    let mut told = false;
    loop {
        tokio::select! {
            _ = &mut deadline => return true,
            f = bus.recv() => match f {
                None => return false,
                Some(_) => refuse(hub, why, &mut told),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated ECU

pub async fn sim_task(hub: Arc<Hub>, c: SimConfig, mut bus: mpsc::Receiver<Frame>) {
    let mut ecu = SimEcu::new(c.counter_id, c.request_id, c.response_id);
    let mut power = c.board.subscribe();
    let first = *power.borrow_and_update();
    let mut on = first.on;
    let mut ons = first.ons;
    let set_state = |on: bool| {
        hub.params().state = if on {
            BusState::ErrorActive
        } else {
            BusState::Stopped
        };
        hub.publish();
    };
    set_state(on);
    let mut counter = tokio::time::interval(c.period.unwrap_or(Duration::from_secs(3600)));
    counter.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Background load: whole frames per millisecond tick, the remainder carried over.
    let mut load_tick = tokio::time::interval(Duration::from_millis(1));
    load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = tokio::time::Instant::now();
    let mut loaded: u64 = 0;
    let mut out = Vec::new();
    loop {
        tokio::select! {
            f = bus.recv() => {
                let Some(f) = f else { return };
                hub.params().tx_frames += 1;
                // An unpowered ECU hears nothing and answers nothing.
                if on {
                    ecu.on_frame(&f, &mut out);
                    let t = now_us();
                    for o in out.drain(..) {
                        hub.deliver(o, t);
                    }
                }
            }
            _ = counter.tick(), if c.period.is_some() => {
                if on {
                    hub.deliver(ecu.counter_frame(), now_us());
                }
            }
            _ = load_tick.tick(), if c.load > 0 => {
                let due = started.elapsed().as_micros() as u64 * u64::from(c.load) / 1_000_000;
                if on {
                    let t = now_us();
                    while loaded < due {
                        hub.deliver(ecu.load_frame(), t);
                        loaded += 1;
                    }
                }
                loaded = due;
            }
            changed = power.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *power.borrow_and_update();
                // A cycle too quick to see as two changes resets the ECU all the same.
                if !now.on || now.ons != ons {
                    ecu.reset();
                }
                (on, ons) = (now.on, now.ons);
                info!(device = %hub.name(), on, "simulated ECU power");
                set_state(on);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// slcan adapters

fn open_tty(
    path: &str,
    baud: u32,
) -> Result<(serialport::TTYPort, tokio::io::unix::AsyncFd<OwnedFd>), String> {
    let port = serialport::new(path, baud)
        .open_native()
        .map_err(|e| format!("cannot open {path}: {}", e.description))?;
    // SAFETY: dup returns a new descriptor we own (or -1, checked).
    let fd = unsafe { libc::dup(port.as_raw_fd()) };
    if fd < 0 {
        return Err(format!(
            "cannot use {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let afd = crate::async_fd(fd).map_err(|e| format!("cannot use {path}: {e}"))?;
    Ok((port, afd))
}

pub async fn slcan_task(
    hub: Arc<Hub>,
    path: String,
    tty_baud: u32,
    bitrate: u32,
    data_bitrate: Option<u32>,
    mut bus: mpsc::Receiver<Frame>,
) {
    let s_code = super::spec::slcan_bitrate_code(bitrate).unwrap_or('6');
    let y_code = data_bitrate.and_then(super::spec::slcan_data_bitrate_code);
    loop {
        let (port, fd) = match open_tty(&path, tty_baud) {
            Ok(p) => p,
            Err(e) => {
                hub.params().state = BusState::Stopped;
                hub.set_unavailable(Some(e.clone()));
                if !refuse_for(&hub, &e, &mut bus, REOPEN_INTERVAL).await {
                    return;
                }
                continue;
            }
        };
        // Close whatever an earlier user left open, drop what it left unread (frames from
        // before this open would carry wrong receive times), set the rates, open.
        let mut init = String::from("\rC\r");
        init.push_str(&format!("S{s_code}\r"));
        if let Some(y) = y_code {
            init.push_str(&format!("Y{y}\r"));
        }
        let _ = crate::common::fdio::write_all(&fd, init.as_bytes()).await;
        // SAFETY: tcflush on a descriptor we own.
        unsafe { libc::tcflush(fd.get_ref().as_raw_fd(), libc::TCIFLUSH) };
        if let Err(e) = crate::common::fdio::write_all(&fd, b"O\r").await {
            let why = format!("{path}: cannot start the adapter: {e}");
            hub.set_unavailable(Some(why.clone()));
            drop((port, fd));
            if !refuse_for(&hub, &why, &mut bus, REOPEN_INTERVAL).await {
                return;
            }
            continue;
        }
        info!(device = %hub.name(), %path, bitrate, "slcan adapter open");
        hub.params().state = BusState::Unknown;
        hub.set_unavailable(None);
        let reason = slcan_session(&hub, &fd, &mut bus).await;
        let Some(reason) = reason else { return };
        let why = format!("{path} vanished: {reason}");
        hub.params().state = BusState::Stopped;
        hub.set_unavailable(Some(why.clone()));
        drop(fd);
        drop(port);
        if !refuse_for(&hub, &why, &mut bus, REOPEN_INTERVAL).await {
            return;
        }
    }
}

/// Runs an open adapter until it fails (`Some(reason)`) or the driver is gone (`None`).
async fn slcan_session(
    hub: &Hub,
    fd: &tokio::io::unix::AsyncFd<OwnedFd>,
    bus: &mut mpsc::Receiver<Frame>,
) -> Option<String> {
    let reader = async {
        let mut buf = BytesMut::new();
        let mut lines = LineSplitter::default();
        let mut bad: u64 = 0;
        let mut refused: u64 = 0;
        loop {
            match crate::common::fdio::read(fd, &mut buf, 16 * 1024, false).await {
                Ok(0) => return "end of file".to_string(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
            let t = now_us();
            lines.feed(&buf, |l| match l.and_then(slcan::parse_adapter_line) {
                Ok(AdapterLine::Frame { frame, .. }) => hub.deliver(frame, t),
                Ok(AdapterLine::Ok) => {}
                Ok(AdapterLine::Error) => {
                    refused += 1;
                    // The adapter refused a command or frame: count it; say so now and then.
                    hub.params().refused += 1;
                    if refused.is_power_of_two() {
                        warn!(device = %hub.name(), refused, "the adapter answered an error (BEL)");
                    }
                }
                Ok(AdapterLine::Info(i)) => debug!(device = %hub.name(), "adapter says {i:?}"),
                Err(e) => {
                    bad += 1;
                    if bad.is_power_of_two() {
                        warn!(device = %hub.name(), bad, "{e}");
                    }
                }
            });
        }
    };
    let writer = async {
        let mut frames = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(256 * 32);
        loop {
            if bus.recv_many(&mut frames, 256).await == 0 {
                return None;
            }
            out.clear();
            let mut n = 0u64;
            for f in frames.drain(..) {
                if slcan::encode_frame(&mut out, &f, None).is_some() {
                    n += 1;
                }
            }
            if let Err(e) = crate::common::fdio::write_all(fd, &out).await {
                hub.params().refused += n;
                return Some(e.to_string());
            }
            hub.params().tx_frames += n;
        }
    };
    tokio::select! {
        r = reader => Some(r),
        w = writer => w,
    }
}

// ---------------------------------------------------------------------------------------------
// SocketCAN

pub async fn socketcan_task(
    hub: Arc<Hub>,
    interface: String,
    bitrate: Option<u32>,
    mut bus: mpsc::Receiver<Frame>,
) {
    loop {
        let sock = match super::vcan::open_socket(&interface) {
            Ok(s) => s,
            Err(e) => {
                hub.params().state = BusState::Stopped;
                hub.set_unavailable(Some(e.clone()));
                if !refuse_for(&hub, &e, &mut bus, REOPEN_INTERVAL).await {
                    return;
                }
                continue;
            }
        };
        if let Some(b) = bitrate {
            super::vcan::apply_bitrate(&interface, b);
        }
        info!(device = %hub.name(), %interface, "SocketCAN interface open");
        hub.set_unavailable(None);
        let reason = socketcan_session(&hub, &interface, &sock, &mut bus).await;
        let Some(reason) = reason else { return };
        hub.params().state = BusState::Stopped;
        hub.set_unavailable(Some(format!("{interface}: {reason}")));
        drop(sock);
        if !refuse_for(&hub, &reason, &mut bus, REOPEN_INTERVAL).await {
            return;
        }
    }
}

async fn socketcan_session(
    hub: &Hub,
    interface: &str,
    sock: &socketcan::tokio::CanFdSocket,
    bus: &mut mpsc::Receiver<Frame>,
) -> Option<String> {
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let mut told = false;
    let writer = match super::vcan::Writer::start(interface, sock) {
        Ok(w) => w,
        Err(e) => return Some(e),
    };
    loop {
        tokio::select! {
            r = sock.read_frame_with_timestamp() => match r {
                Ok((f, at)) => {
                    let t = at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_micros() as u64)
                        .unwrap_or_else(|_| now_us());
                    if let Some(f) = super::vcan::from_socketcan(&f) {
                        if f.is_error() {
                            note_error_frame(hub, &f);
                        }
                        hub.deliver(f, t);
                    }
                }
                Err(e) => return Some(format!("cannot read: {e}")),
            },
            f = bus.recv() => {
                let f = f?;
                if writer.send(&f) {
                    told = false;
                    hub.params().tx_frames += 1;
                } else {
                    refuse(hub, &format!("{interface}: the transmit queue is full"), &mut told);
                }
            }
            _ = poll.tick() => {
                if let Some((state, tec, rec)) = super::vcan::bus_state(interface) {
                    let mut p = hub.params();
                    p.state = state;
                    p.tx_errors = tec;
                    p.rx_errors = rec;
                }
            }
        }
    }
}

/// Follows the bus state that error frames announce (between the netlink polls).
fn note_error_frame(hub: &Hub, f: &Frame) {
    let d = f.data();
    let mut p = hub.params();
    if f.id & error::BUSOFF != 0 {
        p.state = BusState::BusOff;
    } else if f.id & error::RESTARTED != 0 {
        p.state = BusState::ErrorActive;
    } else if f.id & error::CRTL != 0 && d.len() > 1 {
        let c = d[1];
        if c & (error::CRTL_RX_PASSIVE | error::CRTL_TX_PASSIVE) != 0 {
            p.state = BusState::ErrorPassive;
        } else if c & (error::CRTL_RX_WARNING | error::CRTL_TX_WARNING) != 0 {
            p.state = BusState::ErrorWarning;
        } else if c & error::CRTL_ACTIVE != 0 {
            p.state = BusState::ErrorActive;
        }
    }
    if f.id & error::CNT != 0 && d.len() >= 8 {
        p.tx_errors = d[6].into();
        p.rx_errors = d[7].into();
    }
}
