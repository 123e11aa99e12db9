//! The serial console for coding agents: `console_write {data, device?}`, `console_read
//! {device?, max_bytes?, timeout?}` (new output since the last read) and `console_expect
//! {pattern, timeout, device?}` (waits for a regex; what was read, or a timeout with the last
//! lines).
//!
//! A console the session uses is a stream channel of its own, opened through the running
//! attachment like `jmp storage flash`'s (the exporter serves several channels of a console,
//! each with its own position in the board's output). A task reads it for as long as the
//! session lasts into a bounded buffer ([`KEEP`]): reads and waits consume from it by position,
//! as the Python console does, so a wait never misses output that came before it was asked
//! for. A channel that ends (the attachment was detached, its link reconnected) is opened again
//! at the next call, from the offset reached, so nothing is read twice or lost while the
//! exporter still has it.

use crate::agent::{
    board_key, bounded, parse, pick, AgentHost, AgentTool, ChannelTx, OpenChannel, ToolReply,
    ToolSpec, MAX_REPLY,
};
use crate::kind::VerbError;
use crate::BoxFuture;
use bytes::Bytes;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::serial::{OpenParams, OpenedParams};
use jmp_protocol::{exit as code, ErrorCode, Kind};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An offset in the board's output (counting every byte since the exporter started).
type Offset = u64;

/// Console output kept per device and session, not yet consumed or not: older output is
/// dropped (and the next read says how much).
pub const KEEP: usize = 1 << 20;
/// The most one `console_write` sends.
pub const MAX_WRITE: usize = 64 * 1024;
/// The longest wait one call may ask for.
pub const MAX_WAIT_SECS: f64 = 3600.0;
/// A regex larger than this once compiled is refused (a hostile pattern must not take the
/// server's memory).
const MAX_REGEX: usize = 1 << 20;

pub fn tools() -> Vec<Box<dyn AgentTool>> {
    let consoles = Arc::new(Consoles::default());
    vec![
        Box::new(Write(consoles.clone())),
        Box::new(Read(consoles.clone())),
        Box::new(Expect(consoles)),
    ]
}

/// The consoles one session reads, by board and device.
#[derive(Default)]
struct Consoles {
    open: tokio::sync::Mutex<HashMap<String, Arc<Console>>>,
}

/// Output of one console as this session sees it.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    /// Offset (in the board's output) of `data[0]`.
    base: Offset,
    /// Offset of the first byte not yet consumed.
    pos: Offset,
    /// Output dropped before it was consumed (the buffer was full), not yet reported.
    lost: u64,
    /// Why the channel ended, once it has.
    ended: Option<String>,
}

impl Buf {
    fn end(&self) -> Offset {
        self.base + self.data.len() as u64
    }

    fn unread(&self) -> &[u8] {
        &self.data[(self.pos - self.base) as usize..]
    }

    fn push(&mut self, at: Offset, chunk: &[u8]) {
        if at > self.end() {
            // The exporter no longer had what came in between: say so at the next read.
            self.lost += at - self.end();
            self.data.clear();
            self.base = at;
            self.pos = self.pos.max(at);
        }
        self.data.extend_from_slice(chunk);
        let over = self.data.len().saturating_sub(KEEP);
        if over > 0 {
            self.data.drain(..over);
            self.base += over as u64;
            if self.pos < self.base {
                self.lost += self.base - self.pos;
                self.pos = self.base;
            }
        }
    }

    /// The exporter restarted (its offsets begin again) and its output goes on at `end`: what
    /// was not consumed stays, ending there.
    fn restart_at(&mut self, end: Offset) {
        let unread = self.unread().to_vec();
        let keep = unread.len().min(usize::try_from(end).unwrap_or(usize::MAX));
        self.data = unread[unread.len() - keep..].to_vec();
        self.base = end - keep as u64;
        self.pos = self.base;
    }

    /// Consumes up to `max` bytes (cut back to a character boundary when that is near).
    fn take(&mut self, max: usize) -> Vec<u8> {
        let unread = self.unread();
        let mut n = unread.len().min(max);
        if n < unread.len() {
            n = utf8_cut(&unread[..n]);
        }
        self.take_exact(n)
    }

    /// Consumes exactly `n` unread bytes (a match's end).
    fn take_exact(&mut self, n: usize) -> Vec<u8> {
        let out = self.unread()[..n].to_vec();
        self.pos += n as u64;
        out
    }

    /// The last `lines` lines printed (consumed or not), at most 4 KiB.
    fn tail(&self, lines: usize) -> String {
        let from = self.data.len().saturating_sub(4096);
        let text = String::from_utf8_lossy(&self.data[from..]).replace("\r\n", "\n");
        let rows: Vec<&str> = text.split(['\n', '\r']).collect();
        rows[rows.len().saturating_sub(lines)..].join("\n")
    }
}

/// The length of `b` without a UTF-8 sequence cut at its end (when the cut is within the
/// last three bytes).
fn utf8_cut(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0xC0 {
            // A lead byte: is its sequence complete within `back` bytes?
            let need = if c >= 0xF0 {
                4
            } else if c >= 0xE0 {
                3
            } else {
                2
            };
            return if back >= need { b.len() } else { b.len() - back };
        }
        if c & 0xC0 != 0x80 {
            break;
        }
    }
    b.len()
}

struct Console {
    device: String,
    buf: Mutex<Buf>,
    changed: tokio::sync::Notify,
    tx: tokio::sync::Mutex<ChannelTx>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Console {
    fn buf(&self) -> std::sync::MutexGuard<'_, Buf> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Consoles {
    /// The session's reader of `device` on the current board, opened (again) if need be.
    async fn get(&self, host: &dyn AgentHost, device: Option<&str>) -> Result<Arc<Console>, VerbError> {
        let target = host.target()?;
        let device = pick(host, &Kind::Serial, device)?;
        let key = board_key(&target, &device);
        let mut open = self.open.lock().await;
        let resume = match open.get(&key) {
            Some(c) => {
                let b = c.buf();
                if b.ended.is_none() {
                    drop(b);
                    return Ok(c.clone());
                }
                Some(b.end())
            }
            None => None,
        };
        let params = to_bytes(&OpenParams {
            resume_from: resume,
            // The device's own pacing (its config's txDelay/lineDelay) applies.
            pacing: None,
            timed: false,
        });
        let ch: OpenChannel = host
            .verbs()
            .channel_with(&target, Kind::Serial, Some(device.clone()), params)
            .await?
            .into();
        let start = OpenedParams::decode_exact(&ch.params).map(|o| o.offset).map_err(|e| {
            VerbError::new(
                code::FAILURE,
                format!("{device}: bad answer from the exporter: {e}"),
            )
        })?;
        // What was read before the channel ended stays readable.
        let mut buf = open.get(&key).map(|c| std::mem::take(&mut *c.buf())).unwrap_or_default();
        buf.ended = None;
        match resume {
            None => {
                buf.base = start;
                buf.pos = start;
            }
            Some(r) if start < r => buf.restart_at(start),
            Some(_) => {}
        }
        let console = Arc::new_cyclic(|me: &std::sync::Weak<Console>| {
            let me = me.clone();
            let OpenChannel { mut rx, close, .. } = ch;
            let reader = tokio::spawn(async move {
                let mut at = start;
                let why = loop {
                    let r = rx.recv().await;
                    let Some(c) = me.upgrade() else { break String::new() };
                    match r {
                        Ok(Some(chunk)) => {
                            c.buf().push(at, &chunk);
                            at += chunk.len() as u64;
                            c.changed.notify_waiters();
                        }
                        Ok(None) => break "the console's channel closed".to_string(),
                        Err(e) => break format!("the console's channel failed: {e}"),
                    }
                };
                if let Some(c) = me.upgrade() {
                    c.buf().ended = Some(why);
                    c.changed.notify_waiters();
                }
                if let Some(close) = close {
                    close().await;
                }
            });
            Console {
                device: device.clone(),
                buf: Mutex::new(buf),
                changed: tokio::sync::Notify::new(),
                tx: tokio::sync::Mutex::new(ch.tx),
                reader,
            }
        });
        open.insert(key, console.clone());
        Ok(console)
    }
}

fn seconds(tool: &str, what: &str, v: Option<f64>, default: f64) -> Result<Duration, VerbError> {
    let s = v.unwrap_or(default);
    if !(s.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&s)) {
        return Err(VerbError::new(
            code::USAGE,
            format!("{tool}: {what} {s}: expected 0 to {MAX_WAIT_SECS} seconds"),
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Write(Arc<Consoles>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    data: String,
    device: Option<String>,
}

impl AgentTool for Write {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "console_write",
            description: "Type on the board's serial console: `data` is sent as is (a terminal's \
                Enter is \"\\r\"; no newline is added). The device defaults to the board's \
                first console.",
            input: json!({
                "type": "object",
                "properties": {
                    "data": {"type": "string", "maxLength": MAX_WRITE},
                    "device": {"type": "string", "description": "the console (default: the first)"}
                },
                "required": ["data"],
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
            let a: WriteArgs = parse("console_write", args)?;
            if a.data.len() > MAX_WRITE {
                return Err(VerbError::new(
                    code::USAGE,
                    format!(
                        "console_write: data of {} bytes; at most {MAX_WRITE} per call",
                        a.data.len()
                    ),
                ));
            }
            let c = self.0.get(host, a.device.as_deref()).await?;
            let n = a.data.len();
            c.tx
                .lock()
                .await
                .send(Bytes::from(a.data.into_bytes()))
                .await
                .map_err(|e| VerbError::new(code::FAILURE, format!("{}: {e}", c.device)))?;
            Ok(ToolReply {
                text: format!("{}: wrote {n} bytes", c.device),
                data: json!({"device": c.device, "written": n}),
            })
        })
    }
}

struct Read(Arc<Consoles>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    device: Option<String>,
    max_bytes: Option<usize>,
    timeout: Option<f64>,
}

impl AgentTool for Read {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "console_read",
            description: "What the board's serial console printed since the last console_read or \
                console_expect (the first call also returns what the exporter still has from \
                before). At most `max_bytes` per call: the rest waits for the next call, and \
                the reply says how much. Waits up to `timeout` seconds (default 1) when there \
                is nothing new yet.",
            input: json!({
                "type": "object",
                "properties": {
                    "device": {"type": "string", "description": "the console (default: the first)"},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_REPLY,
                                  "description": "at most this many bytes (default 4096)"},
                    "timeout": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECS}
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
            let a: ReadArgs = parse("console_read", args)?;
            let max = a.max_bytes.unwrap_or(4096);
            if max == 0 || max > MAX_REPLY {
                return Err(VerbError::new(
                    code::USAGE,
                    format!("console_read: max_bytes {max}: expected 1 to {MAX_REPLY}"),
                ));
            }
            let wait = seconds("console_read", "timeout", a.timeout, 1.0)?;
            let c = self.0.get(host, a.device.as_deref()).await?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let changed = c.changed.notified();
                {
                    let mut b = c.buf();
                    if !b.unread().is_empty() || b.ended.is_some() || tokio::time::Instant::now() >= deadline {
                        let lost = std::mem::take(&mut b.lost);
                        let got = b.take(max);
                        let pending = b.unread().len();
                        let ended = b.ended.clone();
                        drop(b);
                        let mut text = String::new();
                        if lost > 0 {
                            text.push_str(&format!("[jmp: {lost} bytes of output were lost before this read]\n"));
                        }
                        text.push_str(&lossy(&got));
                        if pending > 0 {
                            text.push_str(&format!("\n[jmp: {pending} more bytes pending: call console_read again]"));
                        }
                        if let Some(why) = &ended {
                            text.push_str(&format!("\n[jmp: {why}; the next call opens it again]"));
                        }
                        return Ok(ToolReply {
                            text,
                            data: json!({
                                "device": c.device,
                                "output": lossy(&got),
                                "bytes": got.len(),
                                "pending": pending,
                                "lost": lost,
                            }),
                        });
                    }
                }
                let _ = tokio::time::timeout_at(deadline, changed).await;
            }
        })
    }
}

struct Expect(Arc<Consoles>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectArgs {
    pattern: String,
    timeout: Option<f64>,
    device: Option<String>,
}

impl AgentTool for Expect {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "console_expect",
            description: "Wait until the board's serial console prints what the regular \
                expression `pattern` matches (in output not yet consumed by console_read or an \
                earlier console_expect), at most `timeout` seconds (default 30). Returns what \
                was printed up to the end of the match (consumed; at most 64 KiB, the latest), \
                or fails with the console's last lines.",
            input: json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "a regular expression (Rust regex syntax)"},
                    "timeout": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECS,
                                "description": "seconds (default 30)"},
                    "device": {"type": "string", "description": "the console (default: the first)"}
                },
                "required": ["pattern"],
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
            let a: ExpectArgs = parse("console_expect", args)?;
            let rx = regex::bytes::RegexBuilder::new(&a.pattern)
                .size_limit(MAX_REGEX)
                .build()
                .map_err(|e| {
                    VerbError::new(code::USAGE, format!("console_expect: pattern: {e}"))
                })?;
            let wait = seconds("console_expect", "timeout", a.timeout, 30.0)?;
            let c = self.0.get(host, a.device.as_deref()).await?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let changed = c.changed.notified();
                {
                    let mut b = c.buf();
                    if let Some((start, end)) = rx.find(b.unread()).map(|m| (m.start(), m.end())) {
                        let lost = std::mem::take(&mut b.lost);
                        let got = b.take_exact(end);
                        let matched = lossy(&got[start..]);
                        drop(b);
                        let mut text = bounded(&lossy(&got), MAX_REPLY, false);
                        if lost > 0 {
                            text = format!("[jmp: {lost} bytes of output were lost before this]\n{text}");
                        }
                        return Ok(ToolReply {
                            data: json!({"device": c.device, "output": text, "match": matched}),
                            text,
                        });
                    }
                    if let Some(why) = &b.ended {
                        return Err(VerbError::new(
                            code::FAILURE,
                            format!(
                                "{}: {why} before /{}/ appeared; the console's last lines:\n{}",
                                c.device,
                                a.pattern,
                                b.tail(20)
                            ),
                        ));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(VerbError::new(
                            ErrorCode::Timeout.exit_code(),
                            format!(
                                "{}: /{}/ did not appear within {}s; the console's last lines:\n{}",
                                c.device,
                                a.pattern,
                                wait.as_secs_f64(),
                                b.tail(20)
                            ),
                        ));
                    }
                }
                let _ = tokio::time::timeout_at(deadline, changed).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_drops_the_oldest_and_says_how_much() {
        let mut b = Buf::default();
        b.push(0, &vec![b'a'; KEEP]);
        b.push(KEEP as u64, b"tail");
        assert_eq!(b.lost, 4, "the 4 oldest unread bytes went");
        assert_eq!(b.unread().len(), KEEP);
        assert!(b.unread().ends_with(b"tail"));
        let got = b.take(10);
        assert_eq!(got, vec![b'a'; 10]);
        assert_eq!(b.unread().len(), KEEP - 10);
    }

    #[test]
    fn a_gap_in_the_exporter_history_counts_as_lost() {
        let mut b = Buf::default();
        b.push(0, b"abc");
        b.push(10, b"xyz");
        assert_eq!(b.lost, 7);
        assert_eq!(b.unread(), b"xyz");
    }

    #[test]
    fn reads_are_cut_between_characters() {
        let mut b = Buf::default();
        b.push(0, "aé".as_bytes()); // 61 C3 A9
        assert_eq!(b.take(2), b"a");
        assert_eq!(b.take(2), "é".as_bytes());
        assert_eq!(utf8_cut("€".as_bytes()), 3);
        assert_eq!(utf8_cut(&"x€".as_bytes()[..3]), 1);
    }
}
