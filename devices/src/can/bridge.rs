//! Client side of a CAN bus: the local fronts (a vcan interface; or an slcan pty at
//! `<dev dir>/<exporter>/<device>` and a socketcand port on 127.0.0.1) and the pump that moves
//! frames between them and the device's channel on the current link.
//!
//! The fronts are tasks that live as long as the attachment, so local programs keep their
//! open pty, socket or interface across outages. They hand frames for the bus to the pump
//! (one queue for all fronts) and receive the bus's frames from a broadcast. While there is no
//! channel, frames from local programs are refused at once (`\a` on slcan, an error message on
//! socketcand, dropped with an error frame on vcan) and counted: delivering them seconds later
//! would be worse than not at all. Frames lost on the way (a sequence number skipped: the
//! exporter's queue overflowed, a datagram was lost) are counted, logged, shown in `jmp status`
//! and announced to local readers as an error frame (controller: receive overflow).

use super::ops::{DeviceOptions, Fronts, Transport};
use super::slcan::{self, HostLine, LineSplitter};
use super::socketcand::{self, Command, Splitter};
use super::spec::{slcan_bitrate_code, slcan_data_bitrate_code};
use crate::common::pty::{Packet, Pty, StableLink};
use crate::{BoxFuture, Bridge, BridgeCtx, BridgeExit, Endpoint, Local, Refusal};
use bytes::BytesMut;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::can::{
    decode_datagram, error, DeviceParams, Frame, OpenParams, OpenedParams, Record, RecordReader,
    SeqTracker,
};
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::{ChannelMsg, Channels};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

/// Frames buffered for each front before a slow one loses them (counted).
const FRONT_QUEUE: usize = 8192;
/// Frames from local programs queued for the channel.
const TO_BUS_QUEUE: usize = 1024;
/// How long before retrying an open the exporter refused as unavailable.
const RETRY: Duration = Duration::from_secs(2);
/// socketcand: frames wait this long after `< ok >` to rawmode, so that the answer arrives on
/// its own (python-can compares one `recv` with the exact answer).
const RAWMODE_HOLDOFF: Duration = Duration::from_millis(30);

/// At most one overflow error frame per this long (see [`Shared::lost`]).
const INJECT_GAP_US: u64 = 100_000;

/// The bridge's counters, shown in `jmp status` and the log.
#[derive(Default)]
struct Counters {
    /// Frames from the bus that never arrived (sequence gaps) or that a front could not take.
    lost: AtomicU64,
    /// Frames from local programs refused while the device had no channel.
    refused: AtomicU64,
    /// Frames the bus carried while this client had no channel (reported by the exporter).
    missed: AtomicU64,
    /// Lines or messages from local programs that were refused as malformed.
    bad_input: AtomicU64,
    /// Frames a local reader did not take in time (an slcan pty nobody reads): dropped here,
    /// as a real adapter drops what its host does not read.
    slow_reader: AtomicU64,
    /// When the last overflow error frame was injected (Unix microseconds).
    last_inject_us: AtomicU64,
}

impl Counters {
    fn text(&self) -> String {
        let mut parts = Vec::new();
        let l = self.lost.load(Ordering::Relaxed);
        let r = self.refused.load(Ordering::Relaxed);
        let m = self.missed.load(Ordering::Relaxed);
        let b = self.bad_input.load(Ordering::Relaxed);
        let s = self.slow_reader.load(Ordering::Relaxed);
        if l > 0 {
            parts.push(format!("{l} frames lost"));
        }
        if m > 0 {
            parts.push(format!("{m} missed while disconnected"));
        }
        if r > 0 {
            parts.push(format!("{r} local frames refused while disconnected"));
        }
        if b > 0 {
            parts.push(format!("{b} malformed local commands"));
        }
        if s > 0 {
            parts.push(format!("{s} frames dropped for a local reader that did not keep up"));
        }
        parts.join(", ")
    }
}

/// What the fronts share with the pump.
#[derive(Clone)]
struct Shared {
    device: String,
    to_bus: mpsc::Sender<Frame>,
    from_bus: broadcast::Sender<Record>,
    up: watch::Receiver<bool>,
    params: watch::Receiver<DeviceParams>,
    counters: Arc<Counters>,
    status: Arc<watch::Sender<String>>,
}

impl Shared {
    fn update_status(&self) {
        let t = self.counters.text();
        self.status.send_if_modified(|s| {
            let c = *s != t;
            *s = t;
            c
        });
    }

    /// A frame from a local program: queued for the channel, or refused (false) when there is
    /// none.
    async fn send(&self, f: Frame) -> bool {
        if !*self.up.borrow() {
            let n = self.counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(device = %self.device, refused = n, "no link to the exporter: local frames are refused, not queued");
            }
            self.update_status();
            return false;
        }
        self.to_bus.send(f).await.is_ok()
    }

    fn lost(&self, n: u64, why: &str) {
        if n == 0 {
            return;
        }
        let before = self.counters.lost.fetch_add(n, Ordering::Relaxed);
        let total = before + n;
        // Logged at the 1st, 2nd, 4th... lost frame: a flood must not become one of log lines.
        if before == 0 || before.ilog2() != total.ilog2() {
            warn!(device = %self.device, lost = n, total, "{why}");
        }
        self.update_status();
        // The error frame goes into the same broadcast the lagging reader reads: one at every
        // lag would evict the very frame that reader takes next and lag it again, without end
        // (a livelock CI caught: half a million lags of one frame, the attachment too busy to
        // answer `jmp status`). At most one per INJECT_GAP_US, so the reader catches up.
        let now = super::driver::now_us();
        let last = self.counters.last_inject_us.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= INJECT_GAP_US
            && self
                .counters
                .last_inject_us
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.inject(error::CRTL_RX_OVERFLOW);
        }
    }

    /// Frames dropped for one front's reader that is not reading: counted and logged (at the
    /// 1st, 2nd, 4th, ...), not announced to the other fronts' readers, which lost nothing.
    fn slow_reader(&self, n: u64) {
        if n == 0 {
            return;
        }
        let before = self.counters.slow_reader.fetch_add(n, Ordering::Relaxed);
        let total = before + n;
        if before == 0 || before.ilog2() != total.ilog2() {
            warn!(device = %self.device, dropped = n, total, "the slcan pty's reader is not reading: frames dropped, as an adapter drops what its host does not read");
        }
        self.update_status();
    }

    /// An error frame for local readers (controller problem `detail`).
    fn inject(&self, detail: u8) {
        let f = Frame::error(error::CRTL, [0, detail, 0, 0, 0, 0, 0, 0]);
        let _ = self.from_bus.send(Record {
            seq: 0,
            time_us: super::driver::now_us(),
            frame: f,
        });
    }
}

pub struct CanBridge {
    device: String,
    opts: DeviceOptions,
    endpoints: Vec<Endpoint>,
    shared: Shared,
    to_bus_rx: mpsc::Receiver<Frame>,
    up_tx: watch::Sender<bool>,
    params_tx: watch::Sender<DeviceParams>,
    status_rx: watch::Receiver<String>,
    instance: Option<u64>,
    linked_before: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _link: Option<StableLink>,
    vcan: Option<Arc<super::vcan::VcanFront>>,
}

impl Drop for CanBridge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl CanBridge {
    /// Creates the local fronts for `info` with `opts`.
    pub async fn create(
        info: &DeviceInfo,
        ctx: &BridgeCtx,
        opts: DeviceOptions,
    ) -> Result<CanBridge, String> {
        let params = DeviceParams::decode_exact(&info.params).unwrap_or_else(|_| {
            DeviceParams::new(0, 0, true, jmp_protocol::kinds::can::BusState::Unknown)
        });
        let (to_bus, to_bus_rx) = mpsc::channel(TO_BUS_QUEUE);
        let (from_bus, _) = broadcast::channel(FRONT_QUEUE);
        let (up_tx, up) = watch::channel(false);
        let (params_tx, params_rx) = watch::channel(params);
        let (status_tx, status_rx) = watch::channel(String::new());
        let shared = Shared {
            device: info.name.clone(),
            to_bus,
            from_bus,
            up,
            params: params_rx,
            counters: Arc::new(Counters::default()),
            status: Arc::new(status_tx),
        };
        let mut b = CanBridge {
            device: info.name.clone(),
            opts: opts.clone(),
            endpoints: Vec::new(),
            shared,
            to_bus_rx,
            up_tx,
            params_tx,
            status_rx,
            instance: None,
            linked_before: false,
            tasks: Vec::new(),
            _link: None,
            vcan: None,
        };
        let fronts = match opts.fronts {
            Some(f) => f,
            None => {
                // The default: vcan if this machine can, else both userspace fronts.
                match b.start_vcan(ctx) {
                    Ok(()) => return Ok(b),
                    Err(e) => {
                        debug!(device = %info.name, "no vcan front ({e}); using slcan and socketcand");
                        Fronts {
                            vcan: false,
                            slcan: true,
                            socketcand: true,
                        }
                    }
                }
            }
        };
        if fronts.vcan {
            b.start_vcan(ctx)
                .map_err(|e| format!("cannot create the vcan interface: {e}"))?;
        }
        if fronts.slcan {
            b.start_slcan(ctx)
                .map_err(|e| format!("cannot create the slcan pty: {e}"))?;
        }
        if fronts.socketcand {
            b.start_socketcand(opts.port, ctx.local_users.clone())
                .await
                .map_err(|e| format!("cannot listen for socketcand: {e}"))?;
        }
        Ok(b)
    }

    fn start_vcan(&mut self, ctx: &BridgeCtx) -> Result<(), String> {
        let lock_dir = ctx.dev_dir.join(".vcan");
        let v = Arc::new(super::vcan::VcanFront::create(
            self.opts.ifname.as_deref(),
            &lock_dir,
        )?);
        info!(device = %self.device, interface = %v.name, "vcan interface created");
        self.endpoints.push(Endpoint::with_role(
            "vcan",
            Local::Interface(v.name.clone()),
        ));
        let sh = self.shared.clone();
        self.tasks.push(tokio::spawn(vcan_front(v.clone(), sh)));
        self.vcan = Some(v);
        Ok(())
    }

    fn start_slcan(&mut self, ctx: &BridgeCtx) -> std::io::Result<()> {
        let pty = Pty::open()?;
        if let Some((uid, gid)) = ctx.owner {
            pty.set_owner(uid, gid)?;
        }
        let dir = crate::places::exporter_dir(&ctx.dev_dir, &ctx.exporter)?;
        let path = crate::places::entry(&dir, &self.device)?;
        let link = StableLink::create(&path, pty.slave_path()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
        })?;
        self.endpoints
            .push(Endpoint::with_role("slcan", Local::Path(path)));
        self._link = Some(link);
        let sh = self.shared.clone();
        self.tasks.push(tokio::spawn(slcan_front(pty, sh)));
        Ok(())
    }

    async fn start_socketcand(
        &mut self,
        port: Option<u16>,
        users: crate::common::listen::LocalUsers,
    ) -> std::io::Result<()> {
        let l =
            tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))))
                .await?;
        let addr = l.local_addr()?;
        self.endpoints
            .push(Endpoint::with_role("socketcand", Local::Address(addr)));
        let sh = self.shared.clone();
        self.tasks.push(tokio::spawn(socketcand_front(l, addr, users, sh)));
        Ok(())
    }

    /// Frames local programs queued while the channel was going away: refused, not kept.
    fn drain_refused(&mut self) {
        let mut n = 0;
        while self.to_bus_rx.try_recv().is_ok() {
            n += 1;
        }
        if n > 0 {
            self.shared.counters.refused.fetch_add(n, Ordering::Relaxed);
            self.shared.update_status();
        }
    }

    async fn run_link(&mut self, link: Arc<dyn Channels>) -> BridgeExit {
        let params = to_bytes(&OpenParams {
            filters: self.opts.filters.clone(),
        });
        let mut told = false;
        loop {
            let r = match self.opts.transport {
                Transport::Stream => link
                    .open_stream(&self.device, params.clone())
                    .await
                    .map(|(p, o)| (Chan::Stream(p), o)),
                Transport::Datagram => link
                    .open_datagram(&self.device, params.clone())
                    .await
                    .map(|(p, o)| (Chan::Datagram(p), o)),
            };
            match r {
                Ok((chan, opened)) => {
                    told = false;
                    let missed = OpenedParams::decode_exact(&opened)
                        .map(|o| o.missed)
                        .unwrap_or(0);
                    if self.linked_before && missed > 0 {
                        self.shared
                            .counters
                            .missed
                            .fetch_add(missed, Ordering::Relaxed);
                        warn!(device = %self.device, missed, "the bus carried frames while this client was disconnected; they were not delivered");
                        self.shared.update_status();
                        self.shared.inject(error::CRTL_RX_OVERFLOW);
                    }
                    self.linked_before = true;
                    self.up_tx.send_replace(true);
                    let ended = self.pump(chan, link.as_ref()).await;
                    self.up_tx.send_replace(false);
                    self.drain_refused();
                    if link.is_closed() {
                        return BridgeExit::LinkLost;
                    }
                    if let Some(why) = ended {
                        warn!(device = %self.device, "channel ended: {why}; reopening");
                    }
                }
                Err(e) if e.code == ErrorCode::DeviceUnavailable => {
                    if !told {
                        warn!(device = %self.device, "{}", e.reason);
                        told = true;
                    }
                    self.wait_refusing(RETRY).await;
                }
                Err(e) if matches!(e.code, ErrorCode::NoSuchDevice | ErrorCode::Unsupported) => {
                    return BridgeExit::Refused(Refusal::new(e.code, e.reason));
                }
                Err(e) => {
                    debug!(device = %self.device, "open failed: {e}");
                    return BridgeExit::LinkLost;
                }
            }
        }
    }

    async fn wait_refusing(&mut self, d: Duration) {
        let deadline = tokio::time::sleep(d);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                f = self.to_bus_rx.recv() => if f.is_some() {
                    self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    self.shared.update_status();
                }
            }
        }
    }

    /// Moves frames until the channel ends; `Some(reason)` when it ended for a reason worth
    /// telling (the link's end is seen by the caller).
    async fn pump(&mut self, chan: Chan, link: &dyn Channels) -> Option<String> {
        let sh = self.shared.clone();
        let mut seq_out: u64 = 0;
        let mut track = SeqTracker::default();
        let mut frames = Vec::with_capacity(256);
        let mut buf = BytesMut::new();
        let deliver = |r: Record, track: &mut SeqTracker| match track.accept(r.seq) {
            // Overtaken by a later record: dropped to keep the order (it was counted lost
            // when the gap opened).
            None => {}
            Some(gap) => {
                sh.lost(
                    gap,
                    "frames from the bus were lost on the way (sequence gap)",
                );
                let _ = sh.from_bus.send(r);
            }
        };
        match chan {
            Chan::Stream(p) => {
                let jmp_transport::Pipe {
                    mut tx,
                    mut rx,
                    mut control_rx,
                    ..
                } = p;
                let mut reader = RecordReader::new();
                loop {
                    tokio::select! {
                        _ = link.closed() => return None,
                        c = rx.recv() => match c {
                            Ok(Some(b)) => {
                                reader.push(&b);
                                loop {
                                    match reader.next_record() {
                                        Ok(Some(r)) => deliver(r, &mut track),
                                        Ok(None) => break,
                                        Err(e) => return Some(format!("bad data from the exporter: {e}")),
                                    }
                                }
                            }
                            Ok(None) => return Some("the exporter closed it".into()),
                            Err(e) => return Some(e.to_string()),
                        },
                        n = self.to_bus_rx.recv_many(&mut frames, 256) => {
                            if n == 0 {
                                return None;
                            }
                            for f in frames.drain(..) {
                                Record { seq: seq_out, time_us: 0, frame: f }.encode(&mut buf);
                                seq_out += 1;
                            }
                            if let Err(e) = tx.send(buf.split().freeze()).await {
                                self.shared.counters.refused.fetch_add(n as u64, Ordering::Relaxed);
                                return Some(e.to_string());
                            }
                        }
                        m = control_rx.recv() => match m {
                            Some(ChannelMsg::Notice(t)) => warn!(device = %self.device, "exporter: {}", jmp_protocol::name::escape(&t)),
                            Some(ChannelMsg::Control(_)) => {}
                            None => return None,
                        },
                    }
                }
            }
            Chan::Datagram(d) => {
                let jmp_transport::DatagramPipe {
                    tx,
                    mut rx,
                    mut control_rx,
                    ..
                } = d;
                loop {
                    tokio::select! {
                        _ = link.closed() => return None,
                        d = rx.recv() => match d {
                            Some(d) => match decode_datagram(&d) {
                                Ok(rs) => for r in rs { deliver(r, &mut track) },
                                Err(e) => warn!(device = %self.device, "bad datagram from the exporter: {e}"),
                            },
                            None => return None,
                        },
                        n = self.to_bus_rx.recv_many(&mut frames, 256) => {
                            if n == 0 {
                                return None;
                            }
                            let max = tx.max_size();
                            for f in frames.drain(..) {
                                let r = Record { seq: seq_out, time_us: 0, frame: f };
                                seq_out += 1;
                                if !buf.is_empty() && buf.len() + r.encoded_len() > max {
                                    let _ = tx.send(&buf);
                                    buf.clear();
                                }
                                r.encode(&mut buf);
                            }
                            if let Err(e) = tx.send(&buf) {
                                buf.clear();
                                return Some(e.to_string());
                            }
                            buf.clear();
                        }
                        m = control_rx.recv() => match m {
                            Some(ChannelMsg::Notice(t)) => warn!(device = %self.device, "exporter: {}", jmp_protocol::name::escape(&t)),
                            Some(ChannelMsg::Control(_)) => {}
                            None => return None,
                        },
                    }
                }
            }
        }
    }
}

enum Chan {
    Stream(jmp_transport::Pipe),
    Datagram(jmp_transport::DatagramPipe),
}

impl Bridge for CanBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Can
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints.clone()
    }

    fn on_welcome(&mut self, info: &DeviceInfo, instance: u64) {
        if let Ok(p) = DeviceParams::decode_exact(&info.params) {
            self.params_tx.send_replace(p);
        }
        if self.instance.is_some_and(|i| i != instance) {
            info!(device = %self.device, "the exporter restarted: frames of the outage are not known to it");
        }
        self.instance = Some(instance);
    }

    fn local_status(&self) -> Option<watch::Receiver<String>> {
        Some(self.status_rx.clone())
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(self.run_link(link))
    }

    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.up_tx.send_replace(false);
            loop {
                if self.to_bus_rx.recv().await.is_some() {
                    self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    self.shared.update_status();
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// vcan front

async fn vcan_front(v: Arc<super::vcan::VcanFront>, sh: Shared) {
    let mut bus = sh.from_bus.subscribe();
    loop {
        tokio::select! {
            r = v.read() => match r {
                Ok(Some(f)) => {
                    if f.is_error() {
                        continue;
                    }
                    if !sh.send(f).await {
                        // The writer's frame is already on the local bus; readers learn it
                        // went nowhere from an error frame (controller: transmit overflow).
                        sh.inject(error::CRTL_TX_OVERFLOW);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(device = %sh.device, interface = %v.name, "cannot read the vcan interface: {e}");
                    return;
                }
            },
            r = bus.recv() => match r {
                Ok(rec) => {
                    if !v.write(&rec.frame) {
                        sh.lost(1, "the vcan interface's readers fell behind");
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => sh.lost(n, "the vcan front fell behind"),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// slcan front: this side is the adapter

struct SlcanState {
    open: bool,
    listen_only: bool,
    timestamps: bool,
}

fn rate_text(b: u32) -> String {
    if b.is_multiple_of(1000) {
        format!("{} kbit/s", b / 1000)
    } else {
        format!("{b} bit/s")
    }
}

/// Handles one line from the local program; appends the answer to `out`.
async fn slcan_line(
    sh: &Shared,
    st: &mut SlcanState,
    line: Result<&[u8], slcan::SlcanError>,
    out: &mut Vec<u8>,
) {
    const OK: &[u8] = b"\r";
    const ERR: &[u8] = b"\x07";
    let parsed = line.and_then(slcan::parse_host_line);
    let p = *sh.params.borrow();
    match parsed {
        Err(e) => {
            let n = sh.counters.bad_input.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(device = %sh.device, "{e}");
            }
            sh.update_status();
            out.extend_from_slice(ERR);
        }
        Ok(HostLine::Frame(f)) => {
            if !st.open || st.listen_only {
                out.extend_from_slice(ERR);
            } else if f.is_fd() && !p.fd {
                warn!(device = %sh.device, "a CAN FD frame was refused: the exporter's bus runs classic CAN");
                out.extend_from_slice(ERR);
            } else if sh.send(f).await {
                out.extend_from_slice(if f.is_extended() { b"Z\r" } else { b"z\r" });
            } else {
                out.extend_from_slice(ERR);
            }
        }
        Ok(HostLine::Open) => {
            st.open = true;
            st.listen_only = false;
            out.extend_from_slice(OK);
        }
        Ok(HostLine::ListenOnly) => {
            st.open = true;
            st.listen_only = true;
            out.extend_from_slice(OK);
        }
        Ok(HostLine::Close) => {
            st.open = false;
            out.extend_from_slice(OK);
        }
        Ok(HostLine::Bitrate(c)) => {
            if p.bitrate == 0 || slcan_bitrate_code(p.bitrate) == Some(c) {
                out.extend_from_slice(OK);
            } else {
                warn!(device = %sh.device, "a local program asked for bit rate S{c}, but the exporter runs this bus at {} and sets it; refused", rate_text(p.bitrate));
                out.extend_from_slice(ERR);
            }
        }
        Ok(HostLine::DataBitrate(c)) => {
            if p.data_bitrate == 0 && !p.fd {
                warn!(device = %sh.device, "a local program asked for CAN FD data bit rate Y{c}, but the exporter's bus runs classic CAN; refused");
                out.extend_from_slice(ERR);
            } else if p.data_bitrate == 0 || slcan_data_bitrate_code(p.data_bitrate) == Some(c) {
                out.extend_from_slice(OK);
            } else {
                warn!(device = %sh.device, "a local program asked for data bit rate Y{c}, but the exporter runs the data phase at {}; refused", rate_text(p.data_bitrate));
                out.extend_from_slice(ERR);
            }
        }
        Ok(HostLine::Btr(b)) => {
            warn!(device = %sh.device, "a local program set bit timing registers s{b}; the exporter sets this bus's bit rate ({}); refused", rate_text(p.bitrate));
            out.extend_from_slice(ERR);
        }
        Ok(HostLine::Timestamps(on)) => {
            st.timestamps = on;
            out.extend_from_slice(OK);
        }
        Ok(HostLine::Version) => out.extend_from_slice(b"V1013\r"),
        Ok(HostLine::SoftwareVersion) => out.extend_from_slice(b"vjmp\r"),
        Ok(HostLine::SerialNumber) => out.extend_from_slice(b"NJMP0\r"),
        Ok(HostLine::Status) => {
            // SJA1000 status flags: bit 5 error passive, bit 7 bus error.
            use jmp_protocol::kinds::can::BusState as B;
            let flags: u8 = match p.state {
                B::ErrorPassive => 0x20,
                B::BusOff => 0xa0,
                B::ErrorWarning => 0x04,
                _ => 0,
            };
            out.extend_from_slice(format!("F{flags:02X}\r").as_bytes());
        }
        Ok(HostLine::Ignored(_)) | Ok(HostLine::Empty) => out.extend_from_slice(OK),
    }
}

/// What the slcan front has written for the local program that the pty has not taken yet.
/// Whole lines only: a line that does not fit is dropped, never cut, so a program that falls
/// behind reads fewer frames, never a frame spliced with another. Answers to the program's own
/// commands have a little room that frames cannot take.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
}

/// Bytes of frames the slcan front holds for a pty that is full, beyond what the kernel holds
/// (about 20 KiB): past this, frames are dropped as a real adapter drops what its host does
/// not read.
const SLCAN_HOLD: usize = 4096;
/// Extra room for answers (`z\r`, `\r`, `\a`): a program that reads them late still finds
/// its answers in order.
const SLCAN_ANSWER_ROOM: usize = 1024;

impl Outbox {
    /// Queues one frame's line; false (dropped) if the reader is that far behind.
    fn frame(&mut self, line: &[u8]) -> bool {
        if self.buf.len() + line.len() > SLCAN_HOLD {
            return false;
        }
        self.buf.extend_from_slice(line);
        true
    }

    /// Queues answers; false (dropped) if even the answers' room is full.
    fn answers(&mut self, a: &[u8]) -> bool {
        if self.buf.len() + a.len() > SLCAN_HOLD + SLCAN_ANSWER_ROOM {
            return false;
        }
        self.buf.extend_from_slice(a);
        true
    }

    /// Writes what the pty takes now. `Ok(true)` when all of it went.
    fn flush(&mut self, pty: &Pty) -> std::io::Result<bool> {
        while !self.buf.is_empty() {
            let n = pty.try_write(&self.buf)?;
            if n == 0 {
                return Ok(false);
            }
            let _ = self.buf.split_to(n);
        }
        Ok(true)
    }
}

/// The slcan pty, played as an adapter. It never waits for the local program to read: while
/// the pty is full, frames beyond [`SLCAN_HOLD`] are dropped and counted, so a program that
/// only writes (python-can's slcan reads only in `recv`) is never blocked by frames it does
/// not read. When the program closes the device, what it left unread is discarded, so the
/// next program starts with the bus as it is now.
async fn slcan_front(mut pty: Pty, sh: Shared) {
    let mut bus = sh.from_bus.subscribe();
    let mut st = SlcanState {
        open: false,
        listen_only: false,
        timestamps: false,
    };
    let mut buf = BytesMut::new();
    let mut lines = LineSplitter::default();
    let mut answers = Vec::new();
    let mut line = Vec::new();
    let mut out = Outbox::default();
    // Registered for room only while the pty is full.
    let mut full: Option<crate::common::fdio::RoomWaiter> = None;
    let mut opened = false;
    let mut open_watch = pty.open_watch(Duration::from_millis(20));
    // Closes the session with the local program: nothing of it is kept for the next one.
    let closed = |pty: &Pty, st: &mut SlcanState, out: &mut Outbox| {
        st.open = false;
        out.buf.clear();
        if let Err(e) = pty.discard_unread() {
            debug!(device = %sh.device, "cannot discard what the slcan pty's last reader left: {e}");
        }
    };
    loop {
        tokio::select! {
            p = pty.read(&mut buf), if opened => match p {
                Ok(Packet::Data(d)) => {
                    let mut ls: Vec<Result<Vec<u8>, slcan::SlcanError>> = Vec::new();
                    lines.feed(&d, |l| ls.push(l.map(|l| l.to_vec())));
                    answers.clear();
                    for l in ls {
                        slcan_line(&sh, &mut st, l.as_deref().map_err(Clone::clone), &mut answers).await;
                    }
                    if !answers.is_empty() && !out.answers(&answers) {
                        debug!(device = %sh.device, "the slcan pty's reader is behind: answers dropped");
                    }
                }
                Ok(Packet::Hangup) => {
                    debug!(device = %sh.device, "slcan pty closed by the local program");
                    opened = false;
                    full = None;
                    closed(&pty, &mut st, &mut out);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(device = %sh.device, "cannot read the slcan pty: {e}");
                    opened = false;
                    full = None;
                    closed(&pty, &mut st, &mut out);
                    continue;
                }
            },
            _ = open_watch.wait(), if !opened => {
                if pty.slave_open() && pty.reregister().is_ok() {
                    debug!(device = %sh.device, "slcan pty opened by a local program");
                    opened = true;
                }
                continue;
            }
            r = async { full.as_ref().expect("guarded").room().await }, if full.is_some() && opened => match r {
                Ok(true) => {}
                Ok(false) => {
                    debug!(device = %sh.device, "slcan pty closed by the local program");
                    opened = false;
                    full = None;
                    closed(&pty, &mut st, &mut out);
                    continue;
                }
                Err(e) => {
                    debug!(device = %sh.device, "cannot wait for room in the slcan pty: {e}");
                    full = None;
                }
            },
            r = bus.recv() => {
                let mut first = Some(r);
                let mut dropped = 0u64;
                // Everything waiting goes out in one write.
                loop {
                    let r = match first.take() {
                        Some(r) => r,
                        None => match bus.try_recv() {
                            Ok(r) => Ok(r),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                            Err(_) => break,
                        },
                    };
                    match r {
                        Ok(rec) => {
                            if st.open && opened {
                                let ts = st.timestamps.then_some(((rec.time_us / 1000) % 60_000) as u16);
                                line.clear();
                                if slcan::encode_frame(&mut line, &rec.frame, ts).is_some() && !out.frame(&line) {
                                    dropped += 1;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => sh.lost(n, "the slcan pty's reader fell behind"),
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    if out.buf.len() >= SLCAN_HOLD {
                        break;
                    }
                }
                sh.slow_reader(dropped);
            }
        }
        // Whatever is queued goes to the pty as far as it takes it, without waiting.
        if opened && !out.buf.is_empty() {
            match out.flush(&pty) {
                Ok(true) => full = None,
                Ok(false) => {
                    if full.is_none() {
                        match pty.room_waiter() {
                            Ok(w) => full = Some(w),
                            Err(e) => debug!(device = %sh.device, "cannot watch the slcan pty for room: {e}"),
                        }
                    }
                }
                Err(e) => {
                    debug!(device = %sh.device, "slcan pty write: {e}");
                    opened = false;
                    full = None;
                    closed(&pty, &mut st, &mut out);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// socketcand front: this side is the server

async fn socketcand_front(
    l: tokio::net::TcpListener,
    local: SocketAddr,
    users: crate::common::listen::LocalUsers,
    sh: Shared,
) {
    let mut clients = tokio::task::JoinSet::new();
    let refused = crate::common::Drops::new("socketcand connection refused");
    loop {
        tokio::select! {
            a = l.accept() => match a {
                Ok((s, peer)) => {
                    if let Err(why) = users.admit_tcp(local, peer) {
                        refused.hit(&sh.device, why);
                        continue;
                    }
                    debug!(device = %sh.device, %peer, "socketcand client");
                    let _ = s.set_nodelay(true);
                    clients.spawn(socketcand_client(s, sh.clone()));
                }
                Err(e) => {
                    warn!(device = %sh.device, "socketcand accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

#[derive(PartialEq, Eq)]
enum Mode {
    NoBus,
    Bcm,
    Raw,
}

async fn socketcand_client(s: tokio::net::TcpStream, sh: Shared) {
    let (mut rd, mut wr) = s.into_split();
    if wr.write_all(b"< hi >").await.is_err() {
        return;
    }
    let mut mode = Mode::NoBus;
    let mut bus: Option<broadcast::Receiver<Record>> = None;
    let mut hold_until = tokio::time::Instant::now();
    let mut split = Splitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let holding = tokio::time::Instant::now() < hold_until;
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut msgs: Vec<Result<String, socketcand::Refused>> = Vec::new();
                split.feed(&buf[..n], |m| msgs.push(m.map(str::to_string)));
                for m in msgs {
                    let reply: Option<Vec<u8>> = match m.and_then(|m| socketcand::parse(&m)) {
                        Ok(Command::Open(name)) if mode == Mode::NoBus => {
                            if name == sh.device {
                                mode = Mode::Bcm;
                                Some(b"< ok >".to_vec())
                            } else {
                                Some(format!("< error no bus {} here (this port serves {}) >", jmp_protocol::name::escape(&name), sh.device).into_bytes())
                            }
                        }
                        Ok(Command::RawMode) if mode != Mode::NoBus => {
                            mode = Mode::Raw;
                            bus = Some(sh.from_bus.subscribe());
                            hold_until = tokio::time::Instant::now() + RAWMODE_HOLDOFF;
                            Some(b"< ok >".to_vec())
                        }
                        Ok(Command::BcmMode) if mode != Mode::NoBus => {
                            mode = Mode::Bcm;
                            bus = None;
                            Some(b"< ok >".to_vec())
                        }
                        Ok(Command::Echo) => Some(b"< echo >".to_vec()),
                        Ok(Command::Send(f)) if mode != Mode::NoBus => {
                            let p = *sh.params.borrow();
                            if f.is_fd() && !p.fd {
                                Some(b"< error CAN FD frame refused: the exporter's bus runs classic CAN >".to_vec())
                            } else if sh.send(f).await {
                                None
                            } else {
                                // An error frame (controller: transmit overflow), which python-can
                                // reads as such.
                                let mut e = Vec::new();
                                socketcand::encode_frame(&mut e, &Frame::error(error::CRTL, [0, error::CRTL_TX_OVERFLOW, 0, 0, 0, 0, 0, 0]), super::driver::now_us());
                                Some(e)
                            }
                        }
                        Ok(Command::ControlMode) => Some(b"< error controlmode is not supported >".to_vec()),
                        Ok(_) => Some(b"< error open a bus first: < open NAME > >".to_vec()),
                        Err(e) => {
                            let n = sh.counters.bad_input.fetch_add(1, Ordering::Relaxed) + 1;
                            if n.is_power_of_two() {
                                warn!(device = %sh.device, "socketcand client: {e}");
                            }
                            sh.update_status();
                            Some(format!("< error {} >", e.0.replace(['<', '>'], "")).into_bytes())
                        }
                    };
                    // Each answer in its own write: python-can compares one recv with it.
                    if let Some(r) = reply {
                        if wr.write_all(&r).await.is_err() {
                            return;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(hold_until), if holding => {}
            r = async { bus.as_mut().expect("guarded").recv().await }, if bus.is_some() && !holding => {
                let mut first = Some(r);
                out.clear();
                loop {
                    let r = match first.take() {
                        Some(r) => r,
                        None => match bus.as_mut().expect("guarded").try_recv() {
                            Ok(r) => Ok(r),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                            Err(_) => break,
                        },
                    };
                    match r {
                        Ok(rec) => socketcand::encode_frame(&mut out, &rec.frame, if rec.time_us == 0 { super::driver::now_us() } else { rec.time_us }),
                        Err(broadcast::error::RecvError::Lagged(n)) => sh.lost(n, "a socketcand client fell behind"),
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    if out.len() > 32 * 1024 {
                        break;
                    }
                }
                if !out.is_empty() && wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}
