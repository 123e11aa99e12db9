//! Exporter side of a CAN bus.
//!
//! One bus task per device, alive as long as the exporter, owns the backend (a SocketCAN
//! interface, an slcan adapter, the simulated ECU). Frames it receives are stamped with the
//! receive time and handed to the [`Hub`], which gives each open channel the frames passing
//! its filters, numbered per channel. A channel whose client does not keep up has a bounded
//! queue: a frame that does not fit is dropped and counted, and its number is skipped, so the
//! client sees the gap and reports it (a real bus does not wait for a slow reader). Frames
//! from clients go to the bus task in order; one that cannot be sent (adapter gone, bus
//! refuses) is counted and its channel told with a notice.
//!
//! A backend that cannot be opened or vanishes is retried every second, like a serial port;
//! meanwhile opens are refused with the reason, open channels end (their clients retry), the
//! device's status says why, and the rest of the exporter keeps serving.

use super::backend;
use crate::{BoxFuture, Channel, DeviceStatus, Driver, Refusal};
use bytes::{Bytes, BytesMut};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::can::{
    decode_datagram, passes, BusState, DeviceParams, Filter, Frame, OpenParams, OpenedParams,
    Record, RecordReader, SeqTracker,
};
use jmp_protocol::{ChannelMode, DeviceState, ErrorCode, Kind, Open};
use jmp_transport::{ChannelIo, ControlTx, DatagramPipe, Pipe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Frames queued for one channel before new ones are dropped (about 0.4 s of a full 1 Mbit/s
/// bus).
pub const CHANNEL_QUEUE: usize = 4096;
/// Frames from clients queued for the bus (backpressure beyond: the client's stream waits).
const BUS_QUEUE: usize = 1024;
/// How often counters are republished while they change.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Sub {
    id: u64,
    filters: Vec<Filter>,
    tx: mpsc::Sender<Record>,
    seq: u64,
    notices: ControlTx,
}

/// What the bus task and the channels share.
pub struct Hub {
    name: String,
    subs: Mutex<Vec<Sub>>,
    next_sub: AtomicU64,
    /// Frames received while no channel was open, since the last one closed.
    missed: AtomicU64,
    params: Mutex<DeviceParams>,
    unavailable: Mutex<Option<String>>,
    /// Bumped when the backend goes away: open channels end.
    gone: watch::Sender<u64>,
    status: watch::Sender<DeviceStatus>,
}

impl Hub {
    fn new(name: &str, params: DeviceParams, unavailable: Option<String>) -> Arc<Hub> {
        let status = watch::Sender::new(status_of(&params, unavailable.clone()));
        Arc::new(Hub {
            name: name.to_string(),
            subs: Mutex::new(Vec::new()),
            next_sub: AtomicU64::new(1),
            missed: AtomicU64::new(0),
            params: Mutex::new(params),
            unavailable: Mutex::new(unavailable),
            gone: watch::Sender::new(0),
            status,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A frame from the bus, received at `time_us`.
    pub fn deliver(&self, frame: Frame, time_us: u64) {
        let mut dropped = 0;
        {
            let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
            if subs.is_empty() {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
            for s in subs.iter_mut() {
                if !passes(&s.filters, &frame) {
                    continue;
                }
                let rec = Record {
                    seq: s.seq,
                    time_us,
                    frame,
                };
                // The number is used even when the frame is dropped: the gap is the count.
                s.seq += 1;
                if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send(rec) {
                    dropped += 1;
                }
            }
        }
        let mut p = self.params();
        p.rx_frames += 1;
        p.dropped += dropped;
    }

    /// The params under lock (counters are updated in place; published every second).
    pub fn params(&self) -> std::sync::MutexGuard<'_, DeviceParams> {
        self.params.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every open channel (a frame could not be sent, the bus changed state).
    pub fn notice_all(&self, text: &str) {
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        for s in subs.iter() {
            s.notices.notice(text.to_string());
        }
    }

    /// The backend is up (`None`) or down and why. Going down ends the open channels.
    pub fn set_unavailable(&self, why: Option<String>) {
        let mut u = self.unavailable.lock().unwrap_or_else(|e| e.into_inner());
        if *u == why {
            return;
        }
        if let Some(w) = &why {
            warn!(device = %self.name, "{w}; retrying every second");
            self.gone.send_modify(|g| *g += 1);
        } else {
            info!(device = %self.name, "bus available");
        }
        *u = why;
        drop(u);
        self.publish();
    }

    fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pushes the current params and state to the status watch if they changed.
    pub fn publish(&self) {
        let st = status_of(&self.params(), self.unavailable());
        self.status.send_if_modified(|cur| {
            let changed = *cur != st;
            *cur = st;
            changed
        });
    }

    fn subscribe(
        &self,
        filters: Vec<Filter>,
        notices: ControlTx,
    ) -> (u64, mpsc::Receiver<Record>, u64) {
        let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        let missed = if subs.is_empty() {
            self.missed.swap(0, Ordering::Relaxed)
        } else {
            0
        };
        subs.push(Sub {
            id,
            filters,
            tx,
            seq: 0,
            notices,
        });
        (id, rx, missed)
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| s.id != id);
    }
}

fn status_of(p: &DeviceParams, unavailable: Option<String>) -> DeviceStatus {
    DeviceStatus {
        state: match unavailable {
            None => DeviceState::Available,
            Some(w) => DeviceState::Unavailable(w),
        },
        params: to_bytes(p),
    }
}

/// Where a CAN device's frames come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A SocketCAN interface of this host.
    SocketCan {
        interface: String,
        bitrate: Option<u32>,
        data_bitrate: Option<u32>,
        fd: bool,
    },
    /// An slcan adapter on a serial path.
    Slcan {
        path: String,
        tty_baud: u32,
        bitrate: u32,
        data_bitrate: Option<u32>,
        fd: bool,
    },
    /// The simulated ECU.
    Sim(backend::SimConfig),
}

pub struct CanDriver {
    name: String,
    detail: String,
    hub: Arc<Hub>,
    bus: mpsc::Sender<Frame>,
}

impl CanDriver {
    /// Starts the device's bus task (requires a tokio runtime).
    pub fn start(name: &str, source: Source) -> CanDriver {
        let (detail, params, unavailable) = match &source {
            Source::SocketCan {
                interface,
                bitrate,
                data_bitrate,
                fd,
            } => (
                format!("SocketCAN {interface}"),
                DeviceParams::new(
                    bitrate.unwrap_or(0),
                    data_bitrate.unwrap_or(0),
                    *fd,
                    BusState::Unknown,
                ),
                Some(format!("{interface} is being opened")),
            ),
            Source::Slcan {
                path,
                bitrate,
                data_bitrate,
                fd,
                ..
            } => (
                format!("slcan {path}"),
                DeviceParams::new(*bitrate, data_bitrate.unwrap_or(0), *fd, BusState::Unknown),
                Some(format!("{path} is being opened")),
            ),
            Source::Sim(c) => (
                "simulated ECU".to_string(),
                DeviceParams::new(c.bitrate, 0, true, BusState::ErrorActive),
                None,
            ),
        };
        let hub = Hub::new(name, params, unavailable);
        let (tx, rx) = mpsc::channel(BUS_QUEUE);
        let h = hub.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(STATUS_EVERY);
            loop {
                t.tick().await;
                if h.status.is_closed() && Arc::strong_count(&h) <= 2 {
                    return;
                }
                h.publish();
            }
        });
        match source {
            Source::SocketCan {
                interface, bitrate, ..
            } => {
                tokio::spawn(backend::socketcan_task(hub.clone(), interface, bitrate, rx));
            }
            Source::Slcan {
                path,
                tty_baud,
                bitrate,
                data_bitrate,
                ..
            } => {
                tokio::spawn(backend::slcan_task(
                    hub.clone(),
                    path,
                    tty_baud,
                    bitrate,
                    data_bitrate,
                    rx,
                ));
            }
            Source::Sim(c) => {
                tokio::spawn(backend::sim_task(hub.clone(), c, rx));
            }
        }
        CanDriver {
            name: name.to_string(),
            detail,
            hub,
            bus: tx,
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

impl Driver for CanDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> Kind {
        Kind::Can
    }

    fn detail(&self) -> String {
        self.detail.clone()
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.hub.status.subscribe()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Stream, ChannelMode::Datagram]
    }

    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let params = OpenParams::decode_exact(&req.params).map_err(|e| {
                Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: bad open parameters: {e}", self.name),
                )
            })?;
            if let Some(why) = self.hub.unavailable() {
                return Err(Refusal::new(
                    ErrorCode::DeviceUnavailable,
                    format!("{}: {why} (retrying every second)", self.name),
                ));
            }
            Ok(Box::new(CanChannel {
                hub: self.hub.clone(),
                bus: self.bus.clone(),
                filters: params.filters,
                missed: self.hub.missed.load(Ordering::Relaxed),
            }) as Box<dyn Channel>)
        })
    }
}

struct CanChannel {
    hub: Arc<Hub>,
    bus: mpsc::Sender<Frame>,
    filters: Vec<Filter>,
    missed: u64,
}

impl Channel for CanChannel {
    fn params(&self) -> Bytes {
        to_bytes(&OpenedParams {
            missed: self.missed,
        })
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ch = *self;
            match io {
                ChannelIo::Stream(p) => serve_stream(ch, p).await,
                ChannelIo::Datagram(d) => serve_datagram(ch, d).await,
            }
        })
    }
}

/// Most records encoded into one stream write.
const BATCH: usize = 512;

/// Frames from a client, checked and handed to the bus in order.
struct Inbound {
    seq: SeqTracker,
    reported_lost: u64,
}

impl Inbound {
    async fn take(&mut self, hub: &Hub, bus: &mpsc::Sender<Frame>, r: Record) -> bool {
        if self.seq.accept(r.seq).is_none() {
            return true;
        }
        if self.seq.lost > self.reported_lost {
            warn!(device = %hub.name(), lost = self.seq.lost - self.reported_lost, "frames from the client were lost on the way");
            self.reported_lost = self.seq.lost;
        }
        bus.send(r.frame).await.is_ok()
    }
}

async fn serve_stream(ch: CanChannel, pipe: Pipe) {
    let Pipe {
        channel,
        mut tx,
        mut rx,
        control_tx,
        mut control_rx,
    } = pipe;
    let (sub, mut frames, _) = ch.hub.subscribe(ch.filters.clone(), control_tx.clone());
    let mut gone = ch.hub.gone.subscribe();
    gone.borrow_and_update();
    let hub = ch.hub.clone();
    let out = async {
        let mut batch = Vec::with_capacity(BATCH);
        let mut buf = BytesMut::new();
        while frames.recv_many(&mut batch, BATCH).await > 0 {
            for r in batch.drain(..) {
                r.encode(&mut buf);
            }
            if tx.send(buf.split().freeze()).await.is_err() {
                return;
            }
        }
    };
    let inp = async {
        let mut reader = RecordReader::new();
        let mut inbound = Inbound {
            seq: SeqTracker::default(),
            reported_lost: 0,
        };
        while let Ok(Some(b)) = rx.recv().await {
            reader.push(&b);
            loop {
                match reader.next_record() {
                    Ok(Some(r)) => {
                        if !inbound.take(&hub, &ch.bus, r).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let msg = format!(
                            "{}: bad frame from the client: {e}; closing the channel",
                            hub.name()
                        );
                        warn!("{msg}");
                        control_tx.notice(msg);
                        return;
                    }
                }
            }
        }
    };
    let ctl = async {
        // No control bodies in this kind; the queue is drained so the link never sees it full.
        while control_rx.recv().await.is_some() {}
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = out => {},
        _ = inp => {},
        _ = ctl => {},
        _ = gone.changed() => {
            tx.reset(ErrorCode::DeviceUnavailable.to_wire());
        },
    }
    ch.hub.unsubscribe(sub);
    debug!(device = %ch.hub.name(), channel, "can channel ended");
}

async fn serve_datagram(ch: CanChannel, d: DatagramPipe) {
    let DatagramPipe {
        channel,
        tx,
        mut rx,
        control_tx,
        mut control_rx,
    } = d;
    let (sub, mut frames, _) = ch.hub.subscribe(ch.filters.clone(), control_tx.clone());
    let hub = ch.hub.clone();
    let out = async {
        let mut batch = Vec::with_capacity(BATCH);
        let mut buf = BytesMut::new();
        while frames.recv_many(&mut batch, BATCH).await > 0 {
            let max = tx.max_size();
            for r in batch.drain(..) {
                if !buf.is_empty() && buf.len() + r.encoded_len() > max {
                    // A full datagram that QUIC cannot take now is lost like any other; the
                    // client counts it from the sequence numbers.
                    if let Err(
                        jmp_transport::PipeError::Closed
                        | jmp_transport::PipeError::ConnectionLost(_),
                    ) = tx.send(&buf)
                    {
                        return;
                    }
                    buf.clear();
                }
                r.encode(&mut buf);
            }
            if !buf.is_empty() {
                if let Err(
                    jmp_transport::PipeError::Closed | jmp_transport::PipeError::ConnectionLost(_),
                ) = tx.send(&buf)
                {
                    return;
                }
                buf.clear();
            }
        }
    };
    let inp = async {
        let mut inbound = Inbound {
            seq: SeqTracker::default(),
            reported_lost: 0,
        };
        while let Some(d) = rx.recv().await {
            match decode_datagram(&d) {
                Ok(rs) => {
                    for r in rs {
                        if !inbound.take(&hub, &ch.bus, r).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let msg = format!("{}: bad datagram from the client: {e}", hub.name());
                    warn!("{msg}");
                    control_tx.notice(msg);
                }
            }
        }
    };
    let ctl = async {
        while control_rx.recv().await.is_some() {}
        std::future::pending::<()>().await
    };
    // A datagram channel has no stream to end when the backend goes away: it stays open, and
    // frames sent meanwhile are refused by the bus task with a notice.
    tokio::select! {
        _ = out => {},
        _ = inp => {},
        _ = ctl => {},
    }
    ch.hub.unsubscribe(sub);
    debug!(device = %ch.hub.name(), channel, "can datagram channel ended");
}
