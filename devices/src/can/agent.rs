//! The CAN bus for coding agents: `can_send {id, data, extended?, fd?, device?}` and
//! `can_recv {timeout?, max_frames?, id?, device?}` (frames received since the bus was first
//! used in this session, or since the last `can_recv`).
//!
//! The session's bus is a stream channel of its own, opened through the running attachment
//! at the first call (the exporter gives every open channel of a bus the frames it receives,
//! so the attachment's own fronts see the same traffic). A task reads it into a bounded queue
//! ([`KEEP`] frames; older ones are dropped and counted), so an answer that comes before
//! `can_recv` is called is not missed.

use crate::agent::{
    board_key, parse, pick, AgentHost, AgentTool, ChannelTx, OpenChannel, ToolReply, ToolSpec,
};
use crate::kind::VerbError;
use crate::BoxFuture;
use bytes::BytesMut;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::can::{
    Frame, OpenParams, Record, RecordReader, EXTENDED, FD, MAX_STANDARD_ID,
};
use jmp_protocol::{exit as code, Kind};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Frames kept per bus and session until `can_recv` takes them.
pub const KEEP: usize = 4096;
/// The most frames one `can_recv` returns.
pub const MAX_FRAMES: usize = 1024;
/// The longest wait one call may ask for.
const MAX_WAIT_SECS: f64 = 600.0;

pub fn tools() -> Vec<Box<dyn AgentTool>> {
    let buses = Arc::new(Buses::default());
    vec![Box::new(CanSend(buses.clone())), Box::new(CanRecv(buses))]
}

#[derive(Default)]
struct Buses {
    open: tokio::sync::Mutex<HashMap<String, Arc<Bus>>>,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Record>,
    /// Frames dropped because the queue was full, or lost on the way (sequence gaps), not yet
    /// reported.
    lost: u64,
    next_seq: Option<u64>,
    ended: Option<String>,
}

struct Bus {
    device: String,
    queue: Mutex<Queue>,
    changed: tokio::sync::Notify,
    tx: tokio::sync::Mutex<(ChannelTx, u64)>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Bus {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Buses {
    async fn get(&self, host: &dyn AgentHost, device: Option<&str>) -> Result<Arc<Bus>, VerbError> {
        let target = host.target()?;
        let device = pick(host, &Kind::Can, device)?;
        let key = board_key(&target, &device);
        let mut open = self.open.lock().await;
        if let Some(b) = open.get(&key) {
            if b.queue().ended.is_none() {
                return Ok(b.clone());
            }
        }
        let params = to_bytes(&OpenParams::default());
        let ch: OpenChannel = host
            .verbs()
            .channel_with(&target, Kind::Can, Some(device.clone()), params)
            .await?
            .into();
        let bus = Arc::new_cyclic(|me: &std::sync::Weak<Bus>| {
            let me = me.clone();
            let OpenChannel { mut rx, close, .. } = ch;
            let reader = tokio::spawn(async move {
                let mut records = RecordReader::new();
                let why = 'read: loop {
                    let r = rx.recv().await;
                    let Some(b) = me.upgrade() else { break String::new() };
                    match r {
                        Ok(Some(chunk)) => {
                            records.push(&chunk);
                            let mut q = b.queue();
                            loop {
                                match records.next_record() {
                                    Ok(Some(rec)) => {
                                        if let Some(n) = q.next_seq.filter(|n| rec.seq > *n) {
                                            q.lost += rec.seq - n;
                                        }
                                        q.next_seq = Some(rec.seq + 1);
                                        if q.frames.len() >= KEEP {
                                            q.frames.pop_front();
                                            q.lost += 1;
                                        }
                                        q.frames.push_back(rec);
                                    }
                                    Ok(None) => break,
                                    Err(e) => break 'read format!("bad data from the exporter: {e}"),
                                }
                            }
                            drop(q);
                            b.changed.notify_waiters();
                        }
                        Ok(None) => break "the bus's channel closed".to_string(),
                        Err(e) => break format!("the bus's channel failed: {e}"),
                    }
                };
                if let Some(b) = me.upgrade() {
                    b.queue().ended = Some(why);
                    b.changed.notify_waiters();
                }
                if let Some(close) = close {
                    close().await;
                }
            });
            Bus {
                device: device.clone(),
                queue: Mutex::new(Queue::default()),
                changed: tokio::sync::Notify::new(),
                tx: tokio::sync::Mutex::new((ch.tx, 0)),
                reader,
            }
        });
        open.insert(key, bus.clone());
        Ok(bus)
    }
}

/// A CAN id as an agent writes it: a number, or hex text (`"7E0"`, `"0x7e0"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Num(u32),
    Text(String),
}

impl Id {
    fn value(&self, tool: &str) -> Result<u32, VerbError> {
        match self {
            Id::Num(n) => Ok(*n),
            Id::Text(t) => {
                let h = t.trim();
                let h = h
                    .strip_prefix("0x")
                    .or_else(|| h.strip_prefix("0X"))
                    .unwrap_or(h);
                u32::from_str_radix(h, 16).map_err(|_| {
                    VerbError::new(
                        code::USAGE,
                        format!("{tool}: id {t:?}: expected a number or hex text such as \"7E0\""),
                    )
                })
            }
        }
    }
}

/// Frame data as an agent writes it: hex text (`"021003"`, spaces allowed) or a list of
/// byte values.
#[derive(Deserialize)]
#[serde(untagged)]
enum Data {
    Bytes(Vec<u8>),
    Hex(String),
}

impl Data {
    fn bytes(&self) -> Result<Vec<u8>, VerbError> {
        match self {
            Data::Bytes(b) => Ok(b.clone()),
            Data::Hex(h) => {
                let compact: String = h.chars().filter(|c| !c.is_whitespace()).collect();
                hex::decode(&compact).map_err(|e| {
                    VerbError::new(code::USAGE, format!("can_send: data {h:?}: not hex bytes ({e})"))
                })
            }
        }
    }
}

fn frame_json(r: &Record) -> Value {
    json!({
        "id": format!("{:X}", r.frame.id),
        "extended": r.frame.is_extended(),
        "fd": r.frame.is_fd(),
        "rtr": r.frame.is_rtr(),
        "error": r.frame.is_error(),
        "data": hex::encode_upper(r.frame.data()),
        "time_us": r.time_us,
    })
}

struct CanSend(Arc<Buses>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendArgs {
    id: Id,
    #[serde(default = "no_data")]
    data: Data,
    extended: Option<bool>,
    fd: Option<bool>,
    device: Option<String>,
}

fn no_data() -> Data {
    Data::Bytes(Vec::new())
}

impl AgentTool for CanSend {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "can_send",
            description: "Send one frame on the board's CAN bus. `id` is a number or hex text \
                (\"7E0\"); it is extended when `extended` is true or it does not fit 11 bits. \
                `data` is hex text (\"021003\") or a list of bytes; more than 8 bytes make a CAN \
                FD frame. Answers received afterwards are read with can_recv. The device \
                defaults to the board's first bus.",
            input: json!({
                "type": "object",
                "properties": {
                    "id": {"type": ["integer", "string"]},
                    "data": {"type": ["string", "array"], "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                    "extended": {"type": "boolean"},
                    "fd": {"type": "boolean"},
                    "device": {"type": "string", "description": "the bus (default: the first)"}
                },
                "required": ["id"],
                "additionalProperties": false
            }),
            changes_board: true,
        }
    }

    fn call<'a>(
        &'a self,
        host: &'a dyn AgentHost,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<ToolReply, VerbError>> {
        Box::pin(async move {
            let a: SendArgs = parse("can_send", args)?;
            let id = a.id.value("can_send")?;
            let data = a.data.bytes()?;
            let mut flags = 0;
            if a.extended.unwrap_or(id > MAX_STANDARD_ID) {
                flags |= EXTENDED;
            }
            if a.fd.unwrap_or(data.len() > 8) {
                flags |= FD;
            }
            let frame = Frame::new(id, flags, &data)
                .map_err(|e| VerbError::new(code::USAGE, format!("can_send: {e}")))?;
            let bus = self.0.get(host, a.device.as_deref()).await?;
            let mut tx = bus.tx.lock().await;
            let mut buf = BytesMut::new();
            Record {
                seq: tx.1,
                time_us: 0,
                frame,
            }
            .encode(&mut buf);
            tx.0.send(buf.freeze())
                .await
                .map_err(|e| VerbError::new(code::FAILURE, format!("{}: {e}", bus.device)))?;
            tx.1 += 1;
            Ok(ToolReply {
                text: format!("{}: sent {frame}", bus.device),
                data: json!({"device": bus.device, "sent": frame.to_string()}),
            })
        })
    }
}

struct CanRecv(Arc<Buses>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecvArgs {
    timeout: Option<f64>,
    max_frames: Option<usize>,
    id: Option<Id>,
    device: Option<String>,
}

impl AgentTool for CanRecv {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "can_recv",
            description: "Frames the board's CAN bus carried since this session first used it \
                (can_send or can_recv), or since the last can_recv: waits up to `timeout` \
                seconds (default 1) for at least one. With `id`, only frames of that id are \
                returned (the others before them are skipped and counted). At most \
                `max_frames` (default 32) per call; the rest wait for the next.",
            input: json!({
                "type": "object",
                "properties": {
                    "timeout": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECS},
                    "max_frames": {"type": "integer", "minimum": 1, "maximum": MAX_FRAMES},
                    "id": {"type": ["integer", "string"]},
                    "device": {"type": "string", "description": "the bus (default: the first)"}
                },
                "additionalProperties": false
            }),
            changes_board: false,
        }
    }

    fn call<'a>(
        &'a self,
        host: &'a dyn AgentHost,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<ToolReply, VerbError>> {
        Box::pin(async move {
            let a: RecvArgs = parse("can_recv", args)?;
            let max = a.max_frames.unwrap_or(32);
            if max == 0 || max > MAX_FRAMES {
                return Err(VerbError::new(
                    code::USAGE,
                    format!("can_recv: max_frames {max}: expected 1 to {MAX_FRAMES}"),
                ));
            }
            let wait = a.timeout.unwrap_or(1.0);
            if !(wait.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&wait)) {
                return Err(VerbError::new(
                    code::USAGE,
                    format!("can_recv: timeout {wait}: expected 0 to {MAX_WAIT_SECS} seconds"),
                ));
            }
            let only = a.id.as_ref().map(|i| i.value("can_recv")).transpose()?;
            let bus = self.0.get(host, a.device.as_deref()).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
            let mut got = Vec::new();
            let mut skipped = 0u64;
            loop {
                let changed = bus.changed.notified();
                {
                    let mut q = bus.queue();
                    while got.len() < max {
                        let Some(r) = q.frames.pop_front() else { break };
                        if only.is_some_and(|id| id != r.frame.id) {
                            skipped += 1;
                        } else {
                            got.push(r);
                        }
                    }
                    let done = !got.is_empty()
                        || q.ended.is_some()
                        || tokio::time::Instant::now() >= deadline;
                    if done {
                        let lost = std::mem::take(&mut q.lost);
                        let pending = q.frames.len();
                        let ended = q.ended.clone();
                        drop(q);
                        let mut lines: Vec<String> =
                            got.iter().map(|r| r.frame.to_string()).collect();
                        if got.is_empty() {
                            lines.push(format!("{}: no frame within {wait}s", bus.device));
                        }
                        if skipped > 0 {
                            lines.push(format!("[jmp: {skipped} frames of other ids skipped]"));
                        }
                        if lost > 0 {
                            lines.push(format!("[jmp: {lost} frames were lost before this call]"));
                        }
                        if pending > 0 {
                            lines.push(format!("[jmp: {pending} more frames pending]"));
                        }
                        if let Some(why) = &ended {
                            lines.push(format!("[jmp: {why}; the next call opens it again]"));
                        }
                        return Ok(ToolReply {
                            text: lines.join("\n"),
                            data: json!({
                                "device": bus.device,
                                "frames": got.iter().map(frame_json).collect::<Vec<_>>(),
                                "skipped": skipped,
                                "lost": lost,
                                "pending": pending,
                            }),
                        });
                    }
                }
                let _ = tokio::time::timeout_at(deadline, changed).await;
            }
        })
    }
}
