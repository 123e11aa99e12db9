//! Client side of a serial console: a pty at a stable path, pumped over one stream channel per
//! link. The pty, its path and its settings outlive connections: after a network blip the
//! local program keeps its open file and simply sees the output resume.
//!
//! Board output waits in a bounded buffer (64 KiB, oldest dropped) while no program has the
//! device open, and is delivered once a program has opened it and finished setting it up (no
//! termios change or input flush for 50 ms): programs such as pyserial, picocom or
//! `tty.setraw` flush pending input when they open a port, and would otherwise throw away the
//! boot log the exporter replayed.
//!
//! Documented behaviour during an outage: board output is not lost (the exporter keeps it in
//! its history and sends what the bridge missed when the link returns, from the offset it had
//! reached); bytes typed locally meanwhile are read and **discarded**, with a warning counting
//! them: delivering keystrokes to a board seconds or minutes late (it may have rebooted
//! meanwhile) is worse than losing them, which is also what a console cable to an unpowered
//! board does.

use crate::common::pty::{Packet, Pty, StableLink, TIOCPKT_FLUSHREAD};
use crate::{BoxFuture, Bridge, BridgeCtx, BridgeExit, Endpoint, Local, Refusal};
use bytes::{Bytes, BytesMut};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::serial::{
    Control, DeviceParams, FlowControl, LineChange, LineSettings, OpenParams, OpenedParams, Parity,
};
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::{ChannelMsg, Channels, ControlTx, PipeRx, PipeTx};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How often termios is polled in addition to packet-mode events (which a program that clears
/// EXTPROC stops producing until it is set again).
const SETTINGS_POLL: Duration = Duration::from_millis(500);
/// How often a closed device is checked for a program opening it, where opens cannot be
/// watched (see [`crate::common::pty::OpenWatch`]).
const OPEN_POLL: Duration = Duration::from_millis(20);
/// Quiet time after an open (no settings change, no flush) before held output is delivered.
const SETTLE: Duration = Duration::from_millis(50);
/// Board output held while no program reads it.
const HOLD_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tty {
    /// No program has the device open.
    Closed,
    /// Just opened; output is held until the program is done configuring.
    Settling(Instant),
    Open,
}

/// The channel of the current link, while there is one.
struct Chan {
    tx: PipeTx,
    rx: PipeRx,
    control_rx: tokio::sync::mpsc::Receiver<ChannelMsg>,
    control_tx: ControlTx,
}

/// Typed bytes waiting for the channel, at most. The pump writes them itself, with a
/// cancel-safe write beside its other branches (no task or queue between the pty and the
/// stream: one wake-up less per keystroke), so it never stops reading board output while QUIC
/// flow control holds typed bytes back (the board may be waiting for us to read before it reads
/// more); past this limit it stops reading the pty, which holds the rest.
const TYPED_LIMIT: usize = 64 * 1024;

pub struct SerialBridge {
    device: String,
    pty: Pty,
    link: StableLink,
    /// Exporter instance and device offset reached: where to resume after a reconnect.
    seen: Option<(u64, u64)>,
    instance: u64,
    /// What a local program set during this attachment (re-applied after a reconnect: the
    /// exporter may have restarted with its configured defaults).
    local_settings: Option<LineChange>,
    /// Last settings sent or found, to forward changes only.
    last_settings: Option<LineSettings>,
    /// Board output not yet in the pty (survives reconnects: it is ours once received).
    held: VecDeque<u8>,
    tty: Tty,
    /// The program on the pty was told the link is lost (once per outage).
    told_lost: bool,
    /// Pacing asked of the exporter for what is typed here (`jmp attach --char-delay`);
    /// `None`: the device's own.
    pacing: Option<jmp_protocol::kinds::serial::Pacing>,
}

impl SerialBridge {
    /// Creates the pty and its stable link `<dev dir>/<exporter>/<device>` (see
    /// [`crate::places`]: the names are checked and the link never leaves the device directory).
    /// The pty belongs to `ctx.owner`; its speed is preset to the exporter's configured one so
    /// local programs read it back.
    pub fn create(info: &DeviceInfo, ctx: &BridgeCtx) -> std::io::Result<SerialBridge> {
        let configured = DeviceParams::decode_exact(&info.params)
            .ok()
            .map(|p| p.settings);
        let pty = Pty::open()?;
        if let Some((uid, gid)) = ctx.owner {
            pty.set_owner(uid, gid)?;
        }
        if let Some(c) = configured {
            pty.set_speed(c.baud)?;
        }
        let dir = crate::places::exporter_dir(&ctx.dev_dir, &ctx.exporter)?;
        let path = crate::places::entry(&dir, &info.name)?;
        let link = StableLink::create(&path, pty.slave_path()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        let last_settings = line_settings(&pty).ok();
        Ok(SerialBridge {
            device: info.name.clone(),
            pty,
            link,
            seen: None,
            instance: 0,
            local_settings: None,
            last_settings,
            held: VecDeque::new(),
            tty: Tty::Closed,
            told_lost: false,
            pacing: None,
        })
    }

    /// Asks the exporter to pace what is typed on this pty (`None`: the device's own pacing).
    pub fn with_pacing(mut self, pacing: Option<jmp_protocol::kinds::serial::Pacing>) -> Self {
        self.pacing = pacing;
        self
    }

    pub fn path(&self) -> PathBuf {
        self.link.path().to_path_buf()
    }

    /// The exporter instance of the current link (from `Welcome`). A different instance than
    /// before means offsets restarted: the next open replays history instead of resuming.
    pub fn set_instance(&mut self, instance: u64) {
        self.instance = instance;
    }

    async fn run_link(&mut self, link: Arc<dyn Channels>) -> BridgeExit {
        let resume = match self.seen {
            Some((inst, off)) if inst == self.instance => Some(off),
            _ => None,
        };
        let params = to_bytes(&OpenParams {
            resume_from: resume,
            pacing: self.pacing,
            // The pty carries bytes only: times would have nowhere to go.
            timed: false,
        });
        let (pipe, offset) = loop {
            match link.open_stream(&self.device, params.clone()).await {
                Ok((pipe, opened)) => match OpenedParams::decode_exact(&opened) {
                    Ok(o) => break (pipe, o.offset),
                    Err(e) => {
                        return BridgeExit::Refused(Refusal::new(
                            ErrorCode::Protocol,
                            format!("{}: bad answer to the open: {e}", self.device),
                        ))
                    }
                },
                Err(e) if e.code == ErrorCode::DeviceUnavailable => {
                    // The port is gone for now (unplugged); the exporter retries it. So do we,
                    // keeping the local device in place.
                    warn!(device = %self.device, "{}", e.reason);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) if matches!(e.code, ErrorCode::NoSuchDevice | ErrorCode::Unsupported) => {
                    return BridgeExit::Refused(Refusal::new(e.code, e.reason));
                }
                Err(e) => {
                    debug!(device = %self.device, "open failed: {e}");
                    return BridgeExit::LinkLost;
                }
            }
        };
        match resume {
            Some(r) if offset > r => warn!(
                device = %self.device,
                "{} bytes of console output were lost while disconnected (more than the exporter's history holds)",
                offset - r
            ),
            Some(_) => info!(device = %self.device, "console resumed"),
            None => {}
        }
        self.seen = Some((self.instance, offset));
        if std::mem::take(&mut self.told_lost) {
            self.tell("the link to the exporter is back");
        }
        if let Some(c) = self.local_settings {
            pipe.control_tx.control(to_bytes(&Control::Follow(c)));
        }
        let chan = Chan {
            tx: pipe.tx,
            rx: pipe.rx,
            control_rx: pipe.control_rx,
            control_tx: pipe.control_tx,
        };
        self.pump(Some(chan), link.stalled()).await
    }

    /// A line from jmp itself on the pty, between the board's output, for the person at the
    /// console: what they type is not reaching the board. Only while a program has the device
    /// open (a program opening it later would read a stale line).
    fn tell(&mut self, what: &str) {
        if self.tty == Tty::Open {
            self.held.extend(format!("\r\n[jmp: {what}]\r\n").bytes());
        }
    }

    /// Moves bytes between the pty and the channel (or, without a channel, keeps the pty
    /// serviced: typed bytes are discarded, held output is delivered to a program that opens
    /// the device). State that must outlive a cancelled pump lives in `self`.
    /// `stalled`: whether the exporter has stopped answering (see
    /// `jmp_transport::liveness`); the pty is told, typed bytes keep queueing.
    async fn pump(
        &mut self,
        chan: Option<Chan>,
        mut stalled: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> BridgeExit {
        let (mut rx, mut control_rx, control_tx, mut tx) = match chan {
            Some(c) => {
                // Keystrokes go before bulk channels' data queued on the same connection.
                c.tx.set_priority(jmp_transport::PRIORITY_INTERACTIVE);
                (
                    Some(c.rx),
                    Some(c.control_rx),
                    Some(c.control_tx),
                    Some(c.tx),
                )
            }
            None => (None, None, None, None),
        };
        // Typed bytes the channel has not taken yet (at most `TYPED_LIMIT` in all): `sending`
        // is being written, `queued` came meanwhile (each byte is copied at most once).
        let mut sending = Bytes::new();
        let mut queued = BytesMut::new();
        let mut buf = BytesMut::new();
        let mut settings_poll = tokio::time::interval(SETTINGS_POLL);
        settings_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open_watch = self.pty.open_watch(OPEN_POLL);
        let mut discarded = 0usize;
        let mut silent = false;
        // Without a channel the link is lost: said once per outage to whoever has the pty open.
        if tx.is_none() && !self.told_lost {
            self.tell("the link to the exporter is lost; reconnecting, and what you type is discarded until it is back");
            self.told_lost = self.tty == Tty::Open;
        }
        loop {
            let open = self.tty == Tty::Open;
            let closed = self.tty == Tty::Closed;
            let settle_at = match self.tty {
                Tty::Settling(t) => Some(t),
                _ => None,
            };
            let can_take = rx.is_some() && (closed || self.held.len() < HOLD_LIMIT);
            if sending.is_empty() && !queued.is_empty() {
                sending = queued.split().freeze();
            }
            // Read typed bytes only when they can be queued (or are discarded: no link).
            let can_type = sending.len() + queued.len() < TYPED_LIMIT;
            let (front, _) = self.held.as_slices();
            tokio::select! {
                // Board → held output.
                r = async { rx.as_mut().expect("guarded").recv().await }, if can_take => match r {
                    Ok(Some(b)) => {
                        tracing::trace!(device = %self.device, len = b.len(), "board output");
                        if let Some((_, off)) = self.seen.as_mut() {
                            *off += b.len() as u64;
                        }
                        self.held.extend(b.iter());
                        // Only while no program has the device open is old output dropped; an
                        // open (or settling) device applies backpressure instead: `can_take`
                        // stops taking at the limit, so `held` exceeds it by one chunk at most.
                        let over = self.held.len().saturating_sub(HOLD_LIMIT);
                        if over > 0 && self.tty == Tty::Closed {
                            self.held.drain(..over);
                            debug!(device = %self.device, "dropped {over} bytes of output nobody was reading");
                        }
                    }
                    Ok(None) | Err(_) => return BridgeExit::LinkLost,
                },
                // Held output → the local program.
                w = self.pty.write_some(front), if open && !front.is_empty() => match w {
                    Ok(n) => {
                        self.held.drain(..n);
                    }
                    Err(e) => {
                        debug!(device = %self.device, "pty write: {e}");
                        self.tty = Tty::Closed;
                    }
                },
                // Typed bytes → the channel (cancel-safe: what it did not take stays queued).
                w = async { tx.as_mut().expect("guarded").write_some(&mut sending).await }, if tx.is_some() && !sending.is_empty() => {
                    if let Err(e) = w {
                        debug!(device = %self.device, "channel send: {e}");
                        return BridgeExit::LinkLost;
                    }
                }
                // The local program → board, settings, open/close.
                c = async { stalled.as_mut().expect("guarded").changed().await }, if stalled.is_some() => {
                    let Some(rx) = stalled.as_mut().filter(|_| c.is_ok()) else {
                        stalled = None;
                        continue;
                    };
                    let now = *rx.borrow_and_update();
                    if now != silent {
                        silent = now;
                        if now {
                            self.tell("no answer from the exporter; what you type is held for it, and lost if the link is given up");
                        } else {
                            self.tell("the exporter answers again");
                        }
                    }
                }
                p = self.pty.read(&mut buf), if !closed && can_type => match p {
                    // While the exporter is silent typed bytes still queue (bounded: see
                    // `can_type`): a slow host or a short blip must not eat keystrokes QUIC
                    // would have delivered. Only a link that is given up loses them.
                    Ok(Packet::Data(d)) => match tx.as_ref() {
                        Some(_) if sending.is_empty() && queued.is_empty() => sending = d,
                        Some(_) => queued.extend_from_slice(&d),
                        None => {
                            discarded += d.len();
                            warn!(device = %self.device, "link down: discarded {} typed bytes ({discarded} in this outage)", d.len());
                        }
                    },
                    Ok(Packet::SettingsChanged) => {
                        self.settings_changed(control_tx.as_ref());
                        if let Tty::Settling(_) = self.tty {
                            self.tty = Tty::Settling(Instant::now() + SETTLE);
                        }
                    }
                    Ok(Packet::Status(flags)) => {
                        if flags & TIOCPKT_FLUSHREAD != 0 {
                            if let Tty::Settling(_) = self.tty {
                                self.tty = Tty::Settling(Instant::now() + SETTLE);
                            }
                        }
                    }
                    Ok(Packet::Hangup) => {
                        debug!(device = %self.device, "closed by the local program");
                        self.tty = Tty::Closed;
                    }
                    Err(e) => {
                        warn!(device = %self.device, "cannot read the local pty: {e}");
                        self.tty = Tty::Closed;
                    }
                },
                _ = open_watch.wait(), if closed => {
                    if self.pty.slave_open() {
                        debug!(device = %self.device, "opened by a local program");
                        if let Err(e) = self.pty.reregister() {
                            warn!(device = %self.device, "cannot watch the local pty: {e}");
                            continue;
                        }
                        self.tty = Tty::Settling(Instant::now() + SETTLE);
                    }
                }
                _ = tokio::time::sleep_until(settle_at.unwrap_or_else(Instant::now)), if settle_at.is_some() => {
                    debug!(device = %self.device, held = self.held.len(), "settled: delivering output");
                    self.tty = Tty::Open;
                }
                // Only a program that has the device open changes its settings.
                _ = settings_poll.tick(), if !closed => {
                    self.settings_changed(control_tx.as_ref());
                }
                c = async { control_rx.as_mut().expect("guarded").recv().await }, if control_rx.is_some() => match c {
                    Some(ChannelMsg::Notice(text)) => warn!(device = %self.device, "exporter: {}", jmp_protocol::name::escape(&text)),
                    Some(ChannelMsg::Control(_)) => debug!(device = %self.device, "ignoring a control message"),
                    None => return BridgeExit::LinkLost,
                },
            }
        }
    }

    /// A local program may have changed line settings: forward them (with a channel) or
    /// remember them for the next link.
    fn settings_changed(&mut self, control_tx: Option<&ControlTx>) {
        let _ = self.pty.ensure_extproc();
        let Ok(now) = line_settings(&self.pty) else {
            return;
        };
        if self.last_settings == Some(now) {
            return;
        }
        self.last_settings = Some(now);
        // Only what a pty carries: data bits and parity stay as the real port has them (the
        // exporter merges).
        let change = LineChange {
            baud: Some(now.baud),
            stop_bits: Some(now.stop_bits),
            flow: Some(now.flow),
            ..LineChange::default()
        };
        self.local_settings = Some(change);
        if let Some(tx) = control_tx {
            info!(device = %self.device, baud = now.baud, stop_bits = now.stop_bits, flow = ?now.flow, "local program changed line settings; applying them on the exporter");
            tx.control(to_bytes(&Control::Follow(change)));
        }
    }
}

impl Bridge for SerialBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Serial
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        vec![Endpoint::new(Local::Path(self.link.path().to_path_buf()))]
    }

    fn on_welcome(&mut self, _info: &DeviceInfo, instance: u64) {
        self.set_instance(instance);
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(self.run_link(link))
    }

    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.pump(None, None).await;
        })
    }
}

/// The line settings a local program has set on a pty's slave. A pty always reports 8 data
/// bits and no parity (the kernel forces them), so those are never forwarded from here.
pub(crate) fn line_settings(pty: &Pty) -> std::io::Result<LineSettings> {
    let t = pty.termios()?;
    let flow = if t.c_cflag & libc::CRTSCTS != 0 {
        FlowControl::Hardware
    } else if t.c_iflag & (libc::IXON | libc::IXOFF) != 0 {
        FlowControl::Software
    } else {
        FlowControl::None
    };
    let data_bits = match t.c_cflag & libc::CSIZE {
        libc::CS5 => 5,
        libc::CS6 => 6,
        libc::CS7 => 7,
        _ => 8,
    };
    let parity = if t.c_cflag & libc::PARENB == 0 {
        Parity::None
    } else if t.c_cflag & libc::PARODD != 0 {
        Parity::Odd
    } else {
        Parity::Even
    };
    Ok(LineSettings {
        baud: t.c_ospeed.max(1),
        data_bits,
        parity,
        stop_bits: if t.c_cflag & libc::CSTOPB != 0 { 2 } else { 1 },
        flow,
    })
}
