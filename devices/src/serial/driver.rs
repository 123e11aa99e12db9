//! Exporter side of a serial console.
//!
//! One port task per device, alive as long as the exporter: it reads the port continuously into
//! the [`History`] (so output printed while nobody is attached is kept) and performs writes,
//! settings changes and requests sent by channels. A port that cannot be opened or vanishes
//! (USB unplugged) is retried every second; meanwhile channels and requests are refused with
//! the reason, the device's status says why, and the rest of the exporter keeps serving.

use super::history::History;
use super::pace::{self, SlowReader};
use super::sim::SimConsole;
use super::spec::LinePolicy;
use crate::board::Board;
use crate::{BoxFuture, Channel, DeviceStatus, Driver, Refusal};
use bytes::{Bytes, BytesMut};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::serial::{
    Control, DeviceParams, FlowControl, LineSettings, OpenParams, OpenedParams, Pacing, Parity,
    put_timed, Request, Response, MAX_BREAK_MS, MAX_TIMED_CHUNK,
};
use jmp_protocol::{ChannelMode, DeviceState, ErrorCode, Kind, Open};
use jmp_transport::{ChannelIo, ChannelMsg};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
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
        policy: LinePolicy,
    },
    /// The built-in simulated board, following the board's power; `slow`: it reads its input
    /// as slowly as a bootloader does, losing what comes faster.
    Sim {
        hostname: String,
        board: Board,
        slow: Option<SlowReader>,
    },
}

enum PortCmd {
    /// Bytes to write, with the pauses to make between them.
    Write(Bytes, Pacing),
    Request(Request, oneshot::Sender<Result<LineSettings, String>>),
}

pub struct SerialDriver {
    name: String,
    detail: String,
    history: Arc<History>,
    cmds: mpsc::Sender<PortCmd>,
    status: watch::Receiver<DeviceStatus>,
    /// The pacing of channels that ask for none (the config's `txDelay`, `lineDelay`).
    pacing: Pacing,
}

fn status_of(settings: LineSettings, unavailable: Option<String>) -> DeviceStatus {
    DeviceStatus {
        state: match unavailable {
            None => DeviceState::Available,
            Some(why) => DeviceState::Unavailable(why),
        },
        params: to_bytes(&DeviceParams { settings }),
    }
}

impl SerialDriver {
    /// Starts the device's port task (requires a tokio runtime).
    pub fn start(name: String, source: Source, history_bytes: usize) -> Self {
        let history = Arc::new(History::new(history_bytes));
        let (tx, rx) = mpsc::channel(64);
        let (detail, initial) = match &source {
            Source::Tty { path, settings, .. } => (
                format!("{settings} {path}"),
                // A tty is unusable until its task has opened it (moments after start).
                status_of(*settings, Some(format!("{path} is being opened"))),
            ),
            Source::Sim { .. } => (
                format!("{} simulated board", LineSettings::default()),
                status_of(LineSettings::default(), None),
            ),
        };
        let (status_tx, status) = watch::channel(initial);
        match source {
            Source::Tty {
                path,
                settings,
                policy,
            } => {
                tokio::spawn(tty_task(
                    name.clone(),
                    path,
                    settings,
                    policy,
                    history.clone(),
                    rx,
                    status_tx,
                ));
            }
            Source::Sim {
                hostname,
                board,
                slow,
            } => {
                tokio::spawn(sim_task(hostname, board, slow, history.clone(), rx));
            }
        }
        SerialDriver {
            name,
            detail,
            history,
            cmds: tx,
            status,
            pacing: Pacing::default(),
        }
    }

    /// Paces what channels type, unless they ask for their own pacing.
    pub fn with_pacing(mut self, pacing: Pacing) -> Self {
        self.pacing = pacing;
        self
    }

    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    fn unavailable(&self) -> Option<String> {
        match &self.status.borrow().state {
            DeviceState::Available => None,
            DeviceState::Unavailable(why) => Some(why.clone()),
        }
    }
}

impl SerialDriver {
    /// A channel from `req`'s offset; `watching`: read-only, and why.
    fn channel(
        &self,
        req: &Open,
        watching: Option<Arc<str>>,
    ) -> Result<Box<dyn Channel>, Refusal> {
        let params = OpenParams::decode_exact(&req.params).map_err(|e| {
            Refusal::new(
                ErrorCode::Protocol,
                format!("{}: bad open parameters: {e}", self.name),
            )
        })?;
        if let Some(why) = self.unavailable() {
            return Err(Refusal::new(
                ErrorCode::DeviceUnavailable,
                format!("{}: {why} (retrying every second)", self.name),
            ));
        }
        let start = self.history.start();
        let end = self.history.end();
        let offset = match params.resume_from {
            Some(r) => r.clamp(start, end),
            None => start,
        };
        Ok(Box::new(SerialChannel {
            name: self.name.clone(),
            history: self.history.clone(),
            cmds: self.cmds.clone(),
            offset,
            pacing: params.pacing.unwrap_or(self.pacing),
            timed: params.timed,
            watching,
        }) as Box<dyn Channel>)
    }
}

impl Driver for SerialDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> Kind {
        Kind::Serial
    }

    fn detail(&self) -> String {
        self.detail.clone()
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.status.clone()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Stream]
    }

    /// The history starts again: a new holder's channels replay nothing printed before.
    fn new_holder(&self) {
        self.history.forget();
    }

    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move { self.channel(req, None) })
    }

    /// A console can be watched: the watcher reads what the board prints like any other
    /// channel (two terminals on one pty), and what it types is refused with a notice.
    fn watch<'a>(
        &'a self,
        req: &'a Open,
        why: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move { self.channel(req, Some(why.into())) })
    }

    fn request<'a>(&'a self, body: Bytes) -> BoxFuture<'a, Result<Bytes, Refusal>> {
        Box::pin(async move {
            let req = Request::decode_exact(&body).map_err(|e| {
                Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: bad request: {e}", self.name),
                )
            })?;
            if let Request::Break { millis } = req {
                if millis > MAX_BREAK_MS {
                    return Err(Refusal::new(
                        ErrorCode::Unsupported,
                        format!(
                            "{}: a break of {millis} ms is longer than the {MAX_BREAK_MS} ms allowed",
                            self.name
                        ),
                    ));
                }
            }
            if let Some(why) = self.unavailable() {
                return Err(Refusal::new(
                    ErrorCode::DeviceUnavailable,
                    format!("{}: {why}", self.name),
                ));
            }
            let (tx, rx) = oneshot::channel();
            let gone = || {
                Refusal::new(
                    ErrorCode::Shutdown,
                    format!("{}: the port task ended", self.name),
                )
            };
            self.cmds
                .send(PortCmd::Request(req, tx))
                .await
                .map_err(|_| gone())?;
            match rx.await.map_err(|_| gone())? {
                Ok(settings) => Ok(to_bytes(&Response { settings })),
                Err(why) => Err(Refusal::new(
                    ErrorCode::Failed,
                    format!("{}: {why}", self.name),
                )),
            }
        })
    }
}

struct SerialChannel {
    name: String,
    history: Arc<History>,
    cmds: mpsc::Sender<PortCmd>,
    offset: u64,
    pacing: Pacing,
    /// Output goes as timed frames (the client asked).
    timed: bool,
    /// Read-only (a colleague watching a shared lease): why, for the notices.
    watching: Option<Arc<str>>,
}

/// A watcher is reminded that its typing is refused at its first keystroke and then once per
/// this many refused writes (a notice per keystroke would flood its terminal).
const WATCH_NOTICE_EVERY: u64 = 64;

impl Channel for SerialChannel {
    fn params(&self) -> Bytes {
        to_bytes(&OpenedParams {
            offset: self.offset,
            timed: self.timed,
        })
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let ChannelIo::Stream(pipe) = io {
                serve_channel(*self, pipe).await;
            }
        })
    }
}

async fn serve_channel(ch: SerialChannel, pipe: jmp_transport::Pipe) {
    let jmp_transport::Pipe {
        mut tx,
        mut rx,
        mut control_rx,
        control_tx,
        channel,
    } = pipe;
    // Console output goes before bulk channels' data queued on the same connection.
    tx.set_priority(jmp_transport::PRIORITY_INTERACTIVE);
    let history = ch.history.clone();
    let mut offset = ch.offset;
    let cursor = history.cursor(offset);
    // Device → client: from our offset, as fast as the channel takes it.
    let out = async {
        let mut end = history.subscribe();
        loop {
            let (r, time_us) = if ch.timed {
                history.read_timed(offset, SEND_CHUNK.min(MAX_TIMED_CHUNK))
            } else {
                (history.read(offset, SEND_CHUNK), 0)
            };
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
            let data = if ch.timed {
                let mut b = BytesMut::with_capacity(r.data.len() + 20);
                put_timed(&mut b, time_us, &r.data);
                b.freeze()
            } else {
                r.data
            };
            if tx.send(data).await.is_err() {
                return;
            }
            cursor.advance(offset);
        }
    };
    // Client → device.
    let cmds = ch.cmds.clone();
    let inp = async {
        let mut refused = 0u64;
        while let Ok(Some(b)) = rx.recv().await {
            if let Some(why) = &ch.watching {
                if refused.is_multiple_of(WATCH_NOTICE_EVERY) {
                    control_tx.notice(format!(
                        "{}: typing refused ({} bytes dropped): {why}",
                        ch.name,
                        b.len()
                    ));
                }
                refused += 1;
                continue;
            }
            if cmds.send(PortCmd::Write(b, ch.pacing)).await.is_err() {
                return;
            }
        }
        // The client finished sending: end the channel only once the port task has written
        // everything (its queue is in order), so `jmp console --send` knows it was typed.
        let (tx, rx) = oneshot::channel();
        if cmds.send(PortCmd::Request(Request::Get, tx)).await.is_ok() {
            let _ = rx.await;
        }
    };
    // A local program's settings, to follow on the real port. Failures go back as notices.
    let ctl = async {
        while let Some(m) = control_rx.recv().await {
            let ChannelMsg::Control(body) = m else {
                continue;
            };
            let change = match Control::decode_exact(&body) {
                // A watcher's terminal settings stay its own: the port follows the holder's.
                Ok(Control::Follow(_)) if ch.watching.is_some() => continue,
                Ok(Control::Follow(c)) => c,
                Err(e) => {
                    control_tx.notice(format!("{}: bad control message: {e}", ch.name));
                    continue;
                }
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            if ch
                .cmds
                .send(PortCmd::Request(Request::Set(change), reply_tx))
                .await
                .is_err()
            {
                return;
            }
            match reply_rx.await {
                Ok(Ok(s)) => debug!(device = %ch.name, settings = %s, "applied"),
                Ok(Err(why)) => {
                    warn!(device = %ch.name, "{why}");
                    control_tx.notice(format!("{}: {why}", ch.name));
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

/// Performs a request on the real port; returns the settings afterwards.
async fn apply(
    port: &mut serialport::TTYPort,
    path: &str,
    req: &Request,
    current: &mut LineSettings,
    policy: LinePolicy,
) -> Result<LineSettings, String> {
    use serialport::SerialPort;
    let fail = |what: &str, e: serialport::Error| {
        format!("cannot set {what} on {path}: {}", e.description)
    };
    match req {
        Request::Set(change) => {
            let s = change.apply(*current);
            if s == *current {
                return Ok(s);
            }
            if policy == LinePolicy::Fixed {
                return Err(format!(
                    "line settings are fixed at {current} by the exporter's config (lineSettings: fixed); {s} not applied"
                ));
            }
            let (data_bits, parity, stop_bits, flow) = to_serialport(&s);
            port.set_baud_rate(s.baud)
                .map_err(|e| fail("baud rate", e))?;
            port.set_data_bits(data_bits)
                .map_err(|e| fail("data bits", e))?;
            port.set_parity(parity).map_err(|e| fail("parity", e))?;
            port.set_stop_bits(stop_bits)
                .map_err(|e| fail("stop bits", e))?;
            port.set_flow_control(flow)
                .map_err(|e| fail("flow control", e))?;
            *current = s;
            info!(%path, settings = %s, "line settings applied");
            Ok(s)
        }
        Request::Break { millis } => {
            port.set_break().map_err(|e| fail("break", e))?;
            tokio::time::sleep(Duration::from_millis((*millis).into())).await;
            port.clear_break().map_err(|e| fail("break", e))?;
            Ok(*current)
        }
        Request::Modem { dtr, rts } => {
            if let Some(v) = dtr {
                port.write_data_terminal_ready(*v)
                    .map_err(|e| fail("DTR", e))?;
            }
            if let Some(v) = rts {
                port.write_request_to_send(*v).map_err(|e| fail("RTS", e))?;
            }
            Ok(*current)
        }
        Request::Get => Ok(*current),
    }
}

async fn tty_task(
    name: String,
    path: String,
    mut settings: LineSettings,
    policy: LinePolicy,
    history: Arc<History>,
    mut cmds: mpsc::Receiver<PortCmd>,
    status: watch::Sender<DeviceStatus>,
) {
    let set_status = |settings: LineSettings, s: Option<String>| {
        status.send_if_modified(|cur| {
            let new = status_of(settings, s);
            let changed = *cur != new;
            *cur = new;
            changed
        });
    };
    let mut last_error = String::new();
    loop {
        let (mut port, fd) = match open_tty(&path, &settings) {
            Ok(p) => p,
            Err(e) => {
                if e != last_error {
                    warn!(device = %name, "{e}; retrying every second");
                    last_error = e.clone();
                }
                set_status(settings, Some(e.clone()));
                // Keep answering channels meanwhile, so nothing waits on a dead port.
                let deadline = tokio::time::sleep(REOPEN_INTERVAL);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        c = cmds.recv() => match c {
                            None => return,
                            Some(PortCmd::Write(..)) => {}
                            Some(PortCmd::Request(_, reply)) => { let _ = reply.send(Err(e.clone())); }
                        }
                    }
                }
                continue;
            }
        };
        info!(device = %name, %path, %settings, "serial port open");
        last_error.clear();
        set_status(settings, None);
        // Reading and writing run side by side: a write waiting for the board to read must
        // never stop us reading what the board prints (it may be waiting for exactly that).
        let chunk = (history.capacity() / 2).clamp(1, 16 * 1024);
        let reader = async {
            let mut buf = BytesMut::new();
            loop {
                history.wait_room(chunk).await;
                match crate::common::fdio::read(&fd, &mut buf, chunk, false).await {
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
                    Some(PortCmd::Write(b, pacing)) => {
                        for (run, pause) in pace::runs(&pacing, &b) {
                            if let Err(e) = crate::common::fdio::write_all(&fd, &run).await {
                                return Some(e.to_string());
                            }
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                        }
                    }
                    Some(PortCmd::Request(req, reply)) => {
                        let r = apply(&mut port, &path, &req, &mut settings, policy).await;
                        if r.is_ok() {
                            set_status(settings, None);
                        }
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
        set_status(settings, Some(why));
        drop(fd);
        drop(port);
        tokio::time::sleep(REOPEN_INTERVAL).await;
    }
}

/// The simulated board's console. While the board's power is off it prints nothing and
/// ignores what is typed (an unpowered UART); power on boots it again, boot log first.
async fn sim_task(
    hostname: String,
    board: Board,
    mut slow: Option<SlowReader>,
    history: Arc<History>,
    mut cmds: mpsc::Receiver<PortCmd>,
) {
    let mut sim = SimConsole::new(&hostname);
    let mut power = board.subscribe();
    let mut seen = *power.borrow_and_update();
    if seen.on {
        history.push(&sim.boot());
    }
    // Follows the power as it is when something happens, not as of the last change this loop
    // got to: `select!` may take a write before a pending change, and a quick off and on may
    // reach it as one change.
    let follow = |sim: &mut SimConsole, seen: &mut crate::board::Power, now: crate::board::Power| {
        if now.on && now.ons != seen.ons {
            history.push(&sim.boot());
        }
        *seen = now;
    };
    let mut settings = LineSettings::default();
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return,
                Some(PortCmd::Write(b, pacing)) => {
                    for (run, pause) in pace::runs(&pacing, &b) {
                        follow(&mut sim, &mut seen, *power.borrow_and_update());
                        if seen.on {
                            let taken = match slow.as_mut() {
                                Some(s) => s.accept(tokio::time::Instant::now().into_std(), &run),
                                None => run.to_vec(),
                            };
                            history.push(&sim.input(&taken));
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    if let Some(s) = &slow {
                        debug!(dropped = s.dropped(), "simulated slow reader");
                    }
                }
                Some(PortCmd::Request(req, reply)) => {
                    // A simulated UART takes any settings.
                    if let Request::Set(c) = req {
                        settings = c.apply(settings);
                    }
                    let _ = reply.send(Ok(settings));
                }
            },
            changed = power.changed() => {
                if changed.is_err() {
                    return;
                }
                follow(&mut sim, &mut seen, *power.borrow_and_update());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(h: &History) -> String {
        String::from_utf8_lossy(&h.read(0, usize::MAX).data).into_owned()
    }

    /// Sends a request through the console's command queue and waits for its answer: every
    /// write queued before it has then been handled (one queue, in order).
    async fn barrier(cmds: &mpsc::Sender<PortCmd>) {
        let (tx, rx) = oneshot::channel();
        cmds.send(PortCmd::Request(Request::Get, tx))
            .await
            .expect("console task");
        rx.await.expect("answer").expect("settings");
    }

    /// An unpowered board echoes nothing and keeps nothing typed for later; a quick off and on
    /// the console could not see as two changes still boots it again.
    #[tokio::test]
    async fn typed_while_off_is_dropped_and_a_missed_cycle_still_boots() {
        let board = Board::new();
        let history = Arc::new(History::new(64 * 1024));
        let (cmds, rx) = mpsc::channel(16);
        tokio::spawn(sim_task(
            "simb".into(),
            board.clone(),
            None,
            history.clone(),
            rx,
        ));
        barrier(&cmds).await;
        let boots = |h: &History| text(h).matches("U-Boot SPL").count();
        assert_eq!(boots(&history), 1);

        board.set_power(false);
        cmds.send(PortCmd::Write(
            Bytes::from_static(b"root\n"),
            Pacing::default(),
        ))
            .await
            .expect("write");
        barrier(&cmds).await;
        board.set_power(true);
        barrier(&cmds).await;
        assert_eq!(boots(&history), 2, "{}", text(&history));
        assert!(!text(&history).contains("root"), "{}", text(&history));

        // Off and on before the console task runs at all: still a second boot.
        board.set_power(false);
        board.set_power(true);
        barrier(&cmds).await;
        assert_eq!(boots(&history), 3, "{}", text(&history));
    }
}
