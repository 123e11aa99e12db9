//! Exporter side of a serial console.
//!
//! One port task per device, alive as long as the exporter: it reads the port continuously into
//! the [`History`] (so output printed while nobody is attached is kept) and performs writes and
//! settings changes sent by channels. A port that cannot be opened or vanishes (USB unplugged) is
//! retried every second; meanwhile channels are refused with the reason, and the rest of the
//! exporter keeps serving.

use super::history::History;
use super::sim::SimConsole;
use crate::{BoxFuture, Channel, Driver, Refusal};
use bytes::{Bytes, BytesMut};
use jmp_protocol::{ControlBody, DeviceInfo, ErrorCode, FlowControl, LineSettings, Open, Parity};
use jmp_transport::Pipe;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

const REOPEN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest chunk a channel sends at once; more only adds latency behind it.
const SEND_CHUNK: usize = 64 * 1024;

/// Where a serial device's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A real tty (`/dev/ttyUSB0`) with its initial line settings.
    Tty {
        path: String,
        settings: LineSettings,
    },
    /// The built-in simulated board.
    Sim { hostname: String },
}

enum PortCmd {
    Write(Bytes),
    Control(ControlBody, oneshot::Sender<Result<(), String>>),
}

pub struct SerialDriver {
    name: String,
    detail: String,
    history: Arc<History>,
    cmds: mpsc::Sender<PortCmd>,
    /// `Some(reason)` while the port cannot be used.
    unavailable: Arc<Mutex<Option<String>>>,
}

impl SerialDriver {
    /// Starts the device's port task (requires a tokio runtime).
    pub fn start(name: String, source: Source, history_bytes: usize) -> Self {
        let history = Arc::new(History::new(history_bytes));
        let (tx, rx) = mpsc::channel(64);
        // A tty is unusable until its task has opened it (moments after start).
        let unavailable = Arc::new(Mutex::new(match &source {
            Source::Tty { path, .. } => Some(format!("{path} is being opened")),
            Source::Sim { .. } => None,
        }));
        let detail = match &source {
            Source::Tty { path, settings } => format!("{settings} {path}"),
            Source::Sim { .. } => format!("{} simulated board", LineSettings::default()),
        };
        match source {
            Source::Tty { path, settings } => {
                tokio::spawn(tty_task(
                    name.clone(),
                    path,
                    settings,
                    history.clone(),
                    rx,
                    unavailable.clone(),
                ));
            }
            Source::Sim { hostname } => {
                tokio::spawn(sim_task(hostname, history.clone(), rx));
            }
        }
        SerialDriver {
            name,
            detail,
            history,
            cmds: tx,
            unavailable,
        }
    }

    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// Why the port cannot be used now, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Driver for SerialDriver {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            kind: "serial".into(),
            detail: match self.unavailable() {
                Some(why) => format!("{} (unavailable: {why})", self.detail),
                None => self.detail.clone(),
            },
        }
    }

    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            if req.mode != jmp_protocol::ChannelMode::Stream {
                return Err(Refusal::new(
                    ErrorCode::Unsupported,
                    format!("{}: serial channels are streams", self.name),
                ));
            }
            if let Some(why) = self.unavailable() {
                return Err(Refusal::new(
                    ErrorCode::DeviceUnavailable,
                    format!("{}: {why} (retrying every second)", self.name),
                ));
            }
            let start = self.history.start();
            let end = self.history.end();
            let offset = match req.resume_from {
                Some(r) => r.clamp(start, end),
                None => start,
            };
            Ok(Box::new(SerialChannel {
                name: self.name.clone(),
                history: self.history.clone(),
                cmds: self.cmds.clone(),
                offset,
            }) as Box<dyn Channel>)
        })
    }
}

struct SerialChannel {
    name: String,
    history: Arc<History>,
    cmds: mpsc::Sender<PortCmd>,
    offset: u64,
}

impl Channel for SerialChannel {
    fn offset(&self) -> u64 {
        self.offset
    }

    fn serve(self: Box<Self>, pipe: Pipe) -> BoxFuture<'static, ()> {
        Box::pin(serve_channel(*self, pipe))
    }
}

async fn serve_channel(ch: SerialChannel, pipe: Pipe) {
    let Pipe {
        mut tx,
        mut rx,
        mut control_rx,
        control_tx,
        channel,
    } = pipe;
    let history = ch.history.clone();
    let mut offset = ch.offset;
    let cursor = history.cursor(offset);
    // Device → client: from our offset, as fast as the channel takes it.
    let out = async {
        let mut end = history.subscribe();
        loop {
            let r = history.read(offset, SEND_CHUNK);
            if r.data.is_empty() {
                if end.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if r.offset > offset {
                debug!(device = %ch.name, lost = r.offset - offset, "channel fell behind the history");
            }
            offset = r.offset + r.data.len() as u64;
            if tx.send(r.data).await.is_err() {
                return;
            }
            cursor.advance(offset);
        }
    };
    // Client → device.
    let cmds = ch.cmds.clone();
    let inp = async {
        while let Ok(Some(b)) = rx.recv().await {
            if cmds.send(PortCmd::Write(b)).await.is_err() {
                return;
            }
        }
    };
    let ctl = async {
        while let Some(body) = control_rx.recv().await {
            let (reply_tx, reply_rx) = oneshot::channel();
            if ch
                .cmds
                .send(PortCmd::Control(body.clone(), reply_tx))
                .await
                .is_err()
            {
                return;
            }
            match reply_rx.await {
                Ok(Ok(())) => debug!(device = %ch.name, ?body, "applied"),
                Ok(Err(why)) => {
                    warn!(device = %ch.name, "{why}");
                    control_tx.send(ControlBody::Notice(format!("{}: {why}", ch.name)));
                }
                Err(_) => return,
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = out => {},
        _ = inp => {},
        _ = ctl => {},
    }
    debug!(device = %ch.name, channel, "serial channel ended");
}

fn to_serialport(
    s: &LineSettings,
) -> (
    serialport::DataBits,
    serialport::Parity,
    serialport::StopBits,
    serialport::FlowControl,
) {
    (
        match s.data_bits {
            5 => serialport::DataBits::Five,
            6 => serialport::DataBits::Six,
            7 => serialport::DataBits::Seven,
            _ => serialport::DataBits::Eight,
        },
        match s.parity {
            Parity::None => serialport::Parity::None,
            Parity::Odd => serialport::Parity::Odd,
            Parity::Even => serialport::Parity::Even,
        },
        if s.stop_bits == 2 {
            serialport::StopBits::Two
        } else {
            serialport::StopBits::One
        },
        match s.flow {
            FlowControl::None => serialport::FlowControl::None,
            FlowControl::Software => serialport::FlowControl::Software,
            FlowControl::Hardware => serialport::FlowControl::Hardware,
        },
    )
}

fn open_tty(
    path: &str,
    s: &LineSettings,
) -> Result<(serialport::TTYPort, AsyncFd<OwnedFd>), String> {
    let (data_bits, parity, stop_bits, flow) = to_serialport(s);
    let port = serialport::new(path, s.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow)
        .open_native()
        .map_err(|e| format!("cannot open {path}: {}", e.description))?;
    // A second descriptor for non-blocking async I/O; the TTYPort keeps doing settings.
    // SAFETY: dup returns a new descriptor we own (or -1, checked).
    let fd = unsafe { libc::dup(port.as_raw_fd()) };
    if fd < 0 {
        return Err(format!(
            "cannot use {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let afd = crate::async_fd(fd).map_err(|e| format!("cannot use {path}: {e}"))?;
    Ok((port, afd))
}

async fn apply(
    port: &mut serialport::TTYPort,
    path: &str,
    body: &ControlBody,
    current: &mut LineSettings,
) -> Result<(), String> {
    use serialport::SerialPort;
    let fail = |what: &str, e: serialport::Error| {
        format!("cannot set {what} on {path}: {}", e.description)
    };
    match body {
        ControlBody::LineSettings(s) => {
            let (data_bits, parity, stop_bits, flow) = to_serialport(s);
            port.set_baud_rate(s.baud)
                .map_err(|e| fail("baud rate", e))?;
            port.set_data_bits(data_bits)
                .map_err(|e| fail("data bits", e))?;
            port.set_parity(parity).map_err(|e| fail("parity", e))?;
            port.set_stop_bits(stop_bits)
                .map_err(|e| fail("stop bits", e))?;
            port.set_flow_control(flow)
                .map_err(|e| fail("flow control", e))?;
            *current = *s;
            info!(%path, settings = %s, "line settings applied");
            Ok(())
        }
        ControlBody::Break { millis } => {
            port.set_break().map_err(|e| fail("break", e))?;
            tokio::time::sleep(Duration::from_millis((*millis).into())).await;
            port.clear_break().map_err(|e| fail("break", e))
        }
        ControlBody::ModemLines { dtr, rts } => {
            if let Some(v) = dtr {
                port.write_data_terminal_ready(*v)
                    .map_err(|e| fail("DTR", e))?;
            }
            if let Some(v) = rts {
                port.write_request_to_send(*v).map_err(|e| fail("RTS", e))?;
            }
            Ok(())
        }
        ControlBody::Notice(_) => Ok(()),
    }
}

async fn tty_task(
    name: String,
    path: String,
    mut settings: LineSettings,
    history: Arc<History>,
    mut cmds: mpsc::Receiver<PortCmd>,
    unavailable: Arc<Mutex<Option<String>>>,
) {
    let set_status = |s: Option<String>| *unavailable.lock().unwrap_or_else(|e| e.into_inner()) = s;
    let mut last_error = String::new();
    loop {
        let (mut port, fd) = match open_tty(&path, &settings) {
            Ok(p) => p,
            Err(e) => {
                if e != last_error {
                    warn!(device = %name, "{e}; retrying every second");
                    last_error = e.clone();
                }
                set_status(Some(e.clone()));
                // Keep answering channels meanwhile, so nothing waits on a dead port.
                let deadline = tokio::time::sleep(REOPEN_INTERVAL);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        c = cmds.recv() => match c {
                            None => return,
                            Some(PortCmd::Write(_)) => {}
                            Some(PortCmd::Control(_, reply)) => { let _ = reply.send(Err(e.clone())); }
                        }
                    }
                }
                continue;
            }
        };
        info!(device = %name, %path, %settings, "serial port open");
        last_error.clear();
        set_status(None);
        // Reading and writing run side by side: a write waiting for the board to read must
        // never stop us reading what the board prints (it may be waiting for exactly that).
        let chunk = (history.capacity() / 2).clamp(1, 16 * 1024);
        let reader = async {
            let mut buf = BytesMut::new();
            loop {
                history.wait_room(chunk).await;
                match crate::fdio::read(&fd, &mut buf, chunk, false).await {
                    Ok(0) => return "end of file".to_string(),
                    Ok(_) => history.push(&buf),
                    Err(e) => return e.to_string(),
                }
            }
        };
        let writer = async {
            loop {
                match cmds.recv().await {
                    None => return None,
                    Some(PortCmd::Write(b)) => {
                        if let Err(e) = crate::fdio::write_all(&fd, &b).await {
                            return Some(e.to_string());
                        }
                    }
                    Some(PortCmd::Control(body, reply)) => {
                        let r = apply(&mut port, &path, &body, &mut settings).await;
                        let _ = reply.send(r);
                    }
                }
            }
        };
        let reason = tokio::select! {
            r = reader => r,
            w = writer => match w {
                None => return,
                Some(r) => r,
            },
        };
        let why = format!("{path} vanished: {reason}");
        warn!(device = %name, "{why}; reopening");
        set_status(Some(why));
        drop(fd);
        drop(port);
        tokio::time::sleep(REOPEN_INTERVAL).await;
    }
}

async fn sim_task(hostname: String, history: Arc<History>, mut cmds: mpsc::Receiver<PortCmd>) {
    let mut sim = SimConsole::new(&hostname);
    history.push(&sim.boot());
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            PortCmd::Write(b) => history.push(&sim.input(&b)),
            PortCmd::Control(_, reply) => {
                // A simulated UART takes any settings.
                let _ = reply.send(Ok(()));
            }
        }
    }
}
