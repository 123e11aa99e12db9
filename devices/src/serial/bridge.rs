//! Client side of a serial console: a pty at a stable path, pumped over one stream channel per
//! link. The pty, its path and its settings outlive connections: after a network blip the
//! local program keeps its open file and simply sees the output resume.
//!
//! Documented behaviour during an outage: board output is not lost (the exporter keeps it in
//! its history and sends what the bridge missed when the link returns, from the offset it had
//! reached); bytes typed locally meanwhile are read and **discarded**, with a warning counting
//! them: delivering keystrokes to a board seconds or minutes late (it may have rebooted
//! meanwhile) is worse than losing them, which is also what a console cable to an unpowered
//! board does.

use super::pty::{Packet, Pty, StableLink};
use crate::{BoxFuture, Bridge, BridgeExit, Refusal};
use bytes::BytesMut;
use jmp_protocol::{ControlBody, ErrorCode, LineSettings};
use jmp_transport::LinkHandle;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often termios is polled in addition to packet-mode events (which a program that clears
/// EXTPROC stops producing until it is set again).
const SETTINGS_POLL: Duration = Duration::from_millis(500);

/// Out-of-band requests for the console's real port (`jmp serial break|set|modem`), usable
/// while the bridge runs. Holds the current channel's control sender and the line settings the
/// real port has as far as we know (configured, then whatever was applied since).
#[derive(Clone)]
pub struct SerialControl {
    inner: Arc<Mutex<ControlState>>,
}

struct ControlState {
    tx: Option<jmp_transport::ControlTx>,
    settings: LineSettings,
}

impl SerialControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn settings(&self) -> LineSettings {
        self.lock().settings
    }

    /// Sends `body` on the current channel. Line settings become the known settings.
    pub fn send(&self, body: ControlBody) -> Result<(), String> {
        let mut st = self.lock();
        let sent = st.tx.as_ref().is_some_and(|tx| tx.send(body.clone()));
        if !sent {
            return Err("the link to the exporter is down; try again once it is back".into());
        }
        if let ControlBody::LineSettings(s) = body {
            st.settings = s;
        }
        Ok(())
    }
}

/// Parses the settings an exporter advertises in a serial device's detail ("115200 8N1 ...").
pub fn parse_detail(detail: &str) -> Option<LineSettings> {
    let mut words = detail.split_whitespace();
    let baud: u32 = words.next()?.parse().ok()?;
    let frame = words.next()?.as_bytes();
    if frame.len() != 3 {
        return None;
    }
    let data_bits = (frame[0] as char).to_digit(10)? as u8;
    let parity = match frame[1] {
        b'N' => jmp_protocol::Parity::None,
        b'O' => jmp_protocol::Parity::Odd,
        b'E' => jmp_protocol::Parity::Even,
        _ => return None,
    };
    let stop_bits = (frame[2] as char).to_digit(10)? as u8;
    let flow = match words.next() {
        Some("rts/cts") => jmp_protocol::FlowControl::Hardware,
        Some("xon/xoff") => jmp_protocol::FlowControl::Software,
        _ => jmp_protocol::FlowControl::None,
    };
    Some(LineSettings {
        baud,
        data_bits,
        parity,
        stop_bits,
        flow,
    })
}

pub struct SerialBridge {
    control: SerialControl,
    device: String,
    pty: Pty,
    link: StableLink,
    /// Exporter instance and device offset reached: where to resume after a reconnect.
    seen: Option<(u64, u64)>,
    instance: u64,
    /// Settings a local program chose during this attachment (re-applied after a reconnect:
    /// the exporter may have restarted with its configured defaults).
    local_settings: Option<LineSettings>,
    /// Last settings sent or found, to forward changes only.
    last_settings: Option<LineSettings>,
}

impl SerialBridge {
    /// Creates the pty and its stable link `dir/<exporter>/<device>`. `owner`: uid/gid to give
    /// the device to (the invoking user); `configured`: the exporter's line settings, whose
    /// speed is preset so local programs read it back.
    pub fn create(
        device: &str,
        exporter: &str,
        dir: &Path,
        owner: Option<(u32, u32)>,
        configured: Option<LineSettings>,
    ) -> std::io::Result<SerialBridge> {
        let baud = configured.map(|c| c.baud);
        let pty = Pty::open()?;
        if let Some((uid, gid)) = owner {
            pty.set_owner(uid, gid)?;
        }
        if let Some(b) = baud {
            pty.set_speed(b)?;
        }
        let path = dir.join(exporter).join(device);
        let link = StableLink::create(&path, pty.slave_path()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        let last_settings = pty.line_settings().ok();
        Ok(SerialBridge {
            control: SerialControl {
                inner: Arc::new(Mutex::new(ControlState {
                    tx: None,
                    settings: configured.unwrap_or_default(),
                })),
            },
            device: device.to_string(),
            pty,
            link,
            seen: None,
            instance: 0,
            local_settings: None,
            last_settings,
        })
    }

    pub fn control(&self) -> SerialControl {
        self.control.clone()
    }

    pub fn path(&self) -> PathBuf {
        self.link.path().to_path_buf()
    }

    /// The exporter instance of the current link (from `Welcome`). A different instance than
    /// before means offsets restarted: the next open replays history instead of resuming.
    pub fn set_instance(&mut self, instance: u64) {
        self.instance = instance;
    }

    async fn run_link(&mut self, link: &LinkHandle) -> BridgeExit {
        let resume = match self.seen {
            Some((inst, off)) if inst == self.instance => Some(off),
            _ => None,
        };
        let (pipe, offset) = loop {
            match link.open_stream(&self.device, resume).await {
                Ok(x) => break x,
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
        if let Some(s) = self.local_settings {
            pipe.control_tx.send(ControlBody::LineSettings(s));
            self.control.lock().settings = s;
        }
        self.control.lock().tx = Some(pipe.control_tx.clone());
        let instance = self.instance;
        let jmp_transport::Pipe {
            mut tx,
            mut rx,
            mut control_rx,
            control_tx,
            ..
        } = pipe;
        let SerialBridge {
            control,
            device,
            pty,
            seen,
            local_settings,
            last_settings,
            ..
        } = self;
        let pty = &*pty;
        let device = &*device;
        // Board → local program. The offset is advanced only after the bytes are in the pty,
        // so a cancelled future never skips output.
        let inbound = async {
            loop {
                match rx.recv().await {
                    Ok(Some(b)) => {
                        if let Err(e) = pty.write_all(&b).await {
                            warn!(%device, "cannot write to the local pty: {e}");
                            return BridgeExit::LinkLost;
                        }
                        if let Some((_, off)) = seen.as_mut() {
                            *off += b.len() as u64;
                        } else {
                            *seen = Some((instance, offset + b.len() as u64));
                        }
                    }
                    Ok(None) | Err(_) => return BridgeExit::LinkLost,
                }
            }
        };
        // Local program → board, and settings changes.
        let outbound = async {
            let mut buf = BytesMut::new();
            let mut poll = tokio::time::interval(SETTINGS_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    p = pty.read(&mut buf) => match p {
                        Ok(Packet::Data(d)) => {
                            if tx.send(d).await.is_err() {
                                return BridgeExit::LinkLost;
                            }
                        }
                        Ok(Packet::SettingsChanged) => {
                            forward_settings(pty, device, last_settings, local_settings, &control_tx, control);
                        }
                        Ok(Packet::Status(_)) => {}
                        Err(e) => {
                            warn!(%device, "cannot read the local pty: {e}");
                            return BridgeExit::LinkLost;
                        }
                    },
                    _ = poll.tick() => {
                        forward_settings(pty, device, last_settings, local_settings, &control_tx, control);
                    }
                    c = control_rx.recv() => match c {
                        Some(ControlBody::Notice(text)) => warn!(%device, "exporter: {text}"),
                        Some(other) => debug!(%device, ?other, "ignoring control message"),
                        None => return BridgeExit::LinkLost,
                    },
                }
            }
        };
        tokio::select! {
            r = inbound => r,
            r = outbound => r,
        }
    }
}

/// Sends the pty's settings to the exporter if a local program changed them.
fn forward_settings(
    pty: &Pty,
    device: &str,
    last: &mut Option<LineSettings>,
    local: &mut Option<LineSettings>,
    control_tx: &jmp_transport::ControlTx,
    control: &SerialControl,
) {
    let _ = pty.ensure_extproc();
    let Ok(now) = pty.line_settings() else {
        return;
    };
    if *last == Some(now) {
        return;
    }
    info!(%device, settings = %now, "local program changed line settings; applying them on the exporter");
    *last = Some(now);
    *local = Some(now);
    // What a pty cannot carry (data bits, parity) stays as the port has it.
    let mut applied = now;
    let known = control.settings();
    applied.data_bits = known.data_bits;
    applied.parity = known.parity;
    *local = Some(applied);
    control.lock().settings = applied;
    control_tx.send(ControlBody::LineSettings(applied));
}

impl Bridge for SerialBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> &str {
        "serial"
    }

    fn local(&self) -> String {
        self.link.path().display().to_string()
    }

    fn on_welcome(&mut self, welcome: &jmp_protocol::Welcome) {
        self.set_instance(welcome.instance);
    }

    fn run<'a>(&'a mut self, link: &'a LinkHandle) -> BoxFuture<'a, BridgeExit> {
        Box::pin(self.run_link(link))
    }

    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut buf = BytesMut::new();
            let mut discarded = 0usize;
            loop {
                match self.pty.read(&mut buf).await {
                    Ok(Packet::Data(d)) => {
                        discarded += d.len();
                        warn!(
                            device = %self.device,
                            "link down: discarded {} typed bytes ({discarded} in this outage)",
                            d.len()
                        );
                    }
                    Ok(Packet::SettingsChanged) => {
                        let _ = self.pty.ensure_extproc();
                        if let Ok(s) = self.pty.line_settings() {
                            if self.last_settings != Some(s) {
                                self.last_settings = Some(s);
                                self.local_settings = Some(s);
                            }
                        }
                    }
                    Ok(Packet::Status(_)) => {}
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        })
    }
}
