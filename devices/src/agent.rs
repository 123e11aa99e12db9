//! Tools for coding agents: what `jmp mcp` offers an agent on the board's devices, contributed
//! by the kinds (`DeviceKind::agent_tools`, listed by the registry's [`agent_tools`]), so that
//! the MCP server in `jmp` names no kind. A tool is a thin call into what the kind's `jmp` verb
//! uses: the same [`VerbHost`] (device requests and stream channels through the running
//! attachment's control socket, or on a connection of their own), so an agent's power cycle
//! is a `jmp power cycle`.
//!
//! What a tool promises the agent: arguments are checked and a bad one is refused naming the
//! field ([`parse`]); no reply carries more than [`MAX_REPLY`] bytes of text, whatever the
//! board prints; a call that waits has a bounded timeout. Does not own: the MCP protocol, the
//! session's board (which lease, which attachment: the [`AgentHost`]), the leases.
//!
//! [`agent_tools`]: crate::registry::agent_tools

use crate::kind::{ChannelOrigin, Target, VerbChannel, VerbError, VerbHost, VerbStream};
use crate::registry::{DeviceRequest, DeviceResponse};
use crate::BoxFuture;
use bytes::Bytes;
use jmp_protocol::exit as code;
use jmp_protocol::{ErrorCode, Kind};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::sync::Mutex;

/// The most text one tool call hands the agent (a console flood comes in chunks of at most
/// this, never all at once).
pub const MAX_REPLY: usize = 64 * 1024;

/// A tool as the agent sees it in the tool list.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    /// The tool's name (`power`, `console_expect`): agents' prompts name tools, so these do
    /// not change.
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of its arguments (an object).
    pub input: Value,
    /// A call may change the board (switch its power, type on its console, write to its bus or
    /// medium): logged with the client's name.
    pub changes_board: bool,
}

/// What a call gives back: text for the agent, and the same as data.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolReply {
    pub text: String,
    pub data: Value,
}

/// One tool. Made fresh for each agent session ([`agent_tools`](crate::registry::agent_tools)),
/// so it may keep state between calls (a console's reading position).
pub trait AgentTool: Send + Sync {
    fn spec(&self) -> ToolSpec;
    fn call<'a>(
        &'a self,
        host: &'a dyn AgentHost,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<ToolReply, VerbError>>;
}

/// What the MCP server lends a tool: the board the session works on and the way to reach it.
pub trait AgentHost: Send + Sync {
    /// How the kinds' verbs reach the board (`jmp`'s own host, whose output and progress go
    /// to the agent).
    fn verbs(&self) -> &dyn VerbHost;
    /// The board this session works on, as a verb's target; when it has none, an error that
    /// tells the agent what to call first.
    fn target(&self) -> Result<Target, VerbError>;
    /// The board's devices with their kinds, in the exporter's order.
    fn devices(&self) -> Result<Vec<(String, Kind)>, VerbError>;
}

/// Reads a tool's arguments into `T` (which should deny unknown fields); a bad or missing one
/// is a usage error naming it.
pub fn parse<T: DeserializeOwned>(tool: &str, args: Map<String, Value>) -> Result<T, VerbError> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| VerbError::new(code::USAGE, format!("{tool}: bad arguments: {e}")))
}

/// The device a call means: `device` if it is one of the board's of `kind`, else the board's
/// only (or first) device of that kind.
pub fn pick(host: &dyn AgentHost, kind: &Kind, device: Option<&str>) -> Result<String, VerbError> {
    let all = host.devices()?;
    let of_kind: Vec<&str> = all
        .iter()
        .filter(|(_, k)| k == kind)
        .map(|(n, _)| n.as_str())
        .collect();
    let no_such = |what: String| VerbError::new(ErrorCode::NoSuchDevice.exit_code(), what);
    match device {
        Some(d) if of_kind.contains(&d) => Ok(d.to_string()),
        Some(d) => Err(no_such(format!(
            "the board has no {kind} device {:?} ({kind} devices: {})",
            jmp_protocol::name::escape(d),
            list(&of_kind)
        ))),
        None => of_kind.first().map(|d| d.to_string()).ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            no_such(format!(
                "the board has no {kind} device (it has: {})",
                list(&names)
            ))
        }),
    }
}

fn list(v: &[&str]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Where a session's per-device state belongs: the board (its exporter or lease) and the
/// device. A tool's state for one board is never used for another.
pub fn board_key(target: &Target, device: &str) -> String {
    format!(
        "{}/{}/{device}",
        target.exporter.as_deref().unwrap_or("-"),
        target.lease.as_deref().unwrap_or("-")
    )
}

/// `text` cut to at most `max` bytes at a character boundary (the first `max` bytes with
/// `from_start`, else the last); the cut is said in a line of its own.
pub fn bounded(text: &str, max: usize, from_start: bool) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    if from_start {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!(
            "{}\n[jmp: {} more bytes not shown]",
            &text[..end],
            text.len() - end
        )
    } else {
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!(
            "[jmp: {} earlier bytes not shown]\n{}",
            start,
            &text[start..]
        )
    }
}

/// A stream channel a tool holds open (a console it reads, a bus it listens to): the sending
/// half, and the receiving half to hand to a reader task.
pub struct OpenChannel {
    pub origin: ChannelOrigin,
    pub params: Bytes,
    pub tx: ChannelTx,
    pub rx: ChannelRx,
    /// Ends the verb's own connection, when the channel is not the attachment's.
    pub close: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

impl From<VerbChannel> for OpenChannel {
    fn from(ch: VerbChannel) -> Self {
        let (tx, rx) = match ch.stream {
            VerbStream::Pipe(tx, rx) => (ChannelTx::Pipe(tx), ChannelRx::Pipe(rx)),
            VerbStream::Socket(w, r) => (ChannelTx::Socket(w), ChannelRx::Socket(r)),
        };
        OpenChannel {
            origin: ch.origin,
            params: ch.params,
            tx,
            rx,
            close: ch.close,
        }
    }
}

/// The sending half of a tool's channel.
pub enum ChannelTx {
    Pipe(jmp_transport::PipeTx),
    Socket(tokio::net::unix::OwnedWriteHalf),
}

impl ChannelTx {
    pub async fn send(&mut self, data: Bytes) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        match self {
            ChannelTx::Pipe(tx) => tx.send(data).await.map_err(|e| e.to_string()),
            ChannelTx::Socket(w) => w.write_all(&data).await.map_err(|e| e.to_string()),
        }
    }
}

/// The receiving half of a tool's channel.
pub enum ChannelRx {
    Pipe(jmp_transport::PipeRx),
    Socket(tokio::net::unix::OwnedReadHalf),
}

impl ChannelRx {
    /// The next bytes; `None` when the channel ended.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, String> {
        use tokio::io::AsyncReadExt;
        match self {
            ChannelRx::Pipe(rx) => rx.recv().await.map_err(|e| e.to_string()),
            ChannelRx::Socket(r) => {
                let mut buf = vec![0u8; 64 * 1024];
                let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
                buf.truncate(n);
                Ok((n > 0).then(|| Bytes::from(buf)))
            }
        }
    }
}

/// A verb host that keeps what a verb prints (for the agent's reply) and passes everything
/// else to `inner`.
pub struct Capture<'a> {
    inner: &'a dyn VerbHost,
    out: Mutex<String>,
}

impl<'a> Capture<'a> {
    pub fn new(inner: &'a dyn VerbHost) -> Self {
        Capture {
            inner,
            out: Mutex::new(String::new()),
        }
    }

    /// What was printed, bounded to [`MAX_REPLY`].
    pub fn take(&self) -> String {
        let s = std::mem::take(&mut *self.out.lock().unwrap_or_else(|e| e.into_inner()));
        bounded(s.trim_end(), MAX_REPLY, false)
    }
}

impl VerbHost for Capture<'_> {
    fn request<'b>(
        &'b self,
        target: &'b Target,
        device: Option<String>,
        req: DeviceRequest,
    ) -> BoxFuture<'b, Result<(String, DeviceResponse, String), VerbError>> {
        self.inner.request(target, device, req)
    }

    fn channel_with<'b>(
        &'b self,
        target: &'b Target,
        kind: Kind,
        device: Option<String>,
        params: Bytes,
    ) -> BoxFuture<'b, Result<VerbChannel, VerbError>> {
        self.inner.channel_with(target, kind, device, params)
    }

    fn settle<'b>(
        &'b self,
        ch: &'b ChannelOrigin,
        generation: u64,
    ) -> BoxFuture<'b, Result<(), String>> {
        self.inner.settle(ch, generation)
    }

    fn print(&self, text: &str) -> Result<(), VerbError> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded here too: a verb printing without end must not grow the server.
        if out.len() < 4 * MAX_REPLY {
            out.push_str(text);
        }
        Ok(())
    }

    fn progress(&self, what: &str, done: u64, total: Option<u64>) {
        self.inner.progress(what, done, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_is_cut_at_a_character_and_says_so() {
        assert_eq!(bounded("short", 10, true), "short");
        let s = "é".repeat(10); // 20 bytes
        let head = bounded(&s, 5, true);
        assert!(head.starts_with("éé\n"), "{head}");
        assert!(head.ends_with("[jmp: 16 more bytes not shown]"), "{head}");
        let tail = bounded(&s, 5, false);
        assert!(
            tail.starts_with("[jmp: 16 earlier bytes not shown]\n"),
            "{tail}"
        );
        assert!(tail.ends_with("éé"), "{tail}");
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        data: String,
        device: Option<String>,
    }

    #[test]
    fn bad_arguments_are_refused_naming_the_field() {
        let mut m = Map::new();
        m.insert("dta".into(), Value::String("x".into()));
        let e = parse::<Args>("console_write", m).expect_err("unknown field");
        assert_eq!(e.code, code::USAGE);
        assert!(
            e.message.contains("console_write") && e.message.contains("dta"),
            "{e}"
        );
        let e = parse::<Args>("console_write", Map::new()).expect_err("missing field");
        assert!(e.message.contains("data"), "{e}");
    }

    struct Board(Vec<(String, Kind)>);
    impl AgentHost for Board {
        fn verbs(&self) -> &dyn VerbHost {
            unreachable!("not used by pick")
        }
        fn target(&self) -> Result<Target, VerbError> {
            Ok(Target::default())
        }
        fn devices(&self) -> Result<Vec<(String, Kind)>, VerbError> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn the_device_defaults_to_the_first_of_its_kind() {
        let k = |s: &str| Kind::from_wire(s);
        let b = Board(vec![
            ("pwr".into(), k("power")),
            ("c1".into(), k("serial")),
            ("c2".into(), k("serial")),
        ]);
        assert_eq!(pick(&b, &k("serial"), None).expect("first"), "c1");
        assert_eq!(pick(&b, &k("serial"), Some("c2")).expect("named"), "c2");
        let e = pick(&b, &k("serial"), Some("pwr")).expect_err("not a console");
        assert!(e.message.contains("c1, c2"), "{e}");
        let e = pick(&b, &k("can"), None).expect_err("none");
        assert!(e.message.contains("pwr, c1, c2"), "{e}");
    }
}
