//! The board behind the page: the running attachment `jmp web` serves, driven through the
//! kinds' own agent tools (`jmp_devices::registry::agent_tools`, the ones `jmp mcp` offers) on
//! `jmp`'s own verb host, so the page's power cycle is a `jmp power cycle`, its flash a `jmp
//! storage flash`, its console a stream channel through the attachment's control socket, and
//! this module names no kind.
//!
//! One reader per board, whatever the number of tabs: a task reads the console (and one the
//! CAN bus) and fans out to every tab; a tab that opens later gets the console's recent output
//! ([`HISTORY`]) first, then the live stream, in order and without a byte twice (history and
//! subscription are taken under one lock).

use crate::ctlsock::{self, Op, ReplyBody};
use crate::device::Host;
use crate::state;
use jmp_devices::agent::{AgentHost, AgentTool};
use jmp_devices::kind::{Target, VerbError, VerbHost, VerbOutput, WithOutput};
use jmp_protocol::Kind;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// Console output kept for tabs that open later (the exporter's history comes first, then
/// what arrived since).
pub(crate) const HISTORY: usize = 256 * 1024;
/// CAN frames kept for tabs that open later.
const CAN_KEEP: usize = 200;
/// Events queued per tab; a tab further behind is disconnected (its page reconnects and gets
/// the history again) rather than holding memory for it.
pub(crate) const TAB_QUEUE: usize = 1024;
/// How often the attachment's status is asked for (a local socket call).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// The wait before a reader tries again after a failure (the link is down, the attachment
/// restarting): the next attempt is the event, there is nothing to wait on.
const RETRY: Duration = Duration::from_secs(1);

struct Shared {
    /// The console's recent output (text, as the console tool decodes it).
    history: String,
    can: VecDeque<Value>,
    status: Value,
    console: Value,
    power: Option<Value>,
    /// The running attachment's devices, as the status reader last found them (`None`: no
    /// attachment found).
    devices: Option<Vec<(String, Kind)>>,
}

pub(crate) struct Board {
    pub(crate) exporter: String,
    target: Target,
    tools: Vec<Box<dyn AgentTool>>,
    events: broadcast::Sender<Arc<str>>,
    shared: Mutex<Shared>,
    /// One flash at a time: a second upload waits for the first.
    pub(crate) flashing: tokio::sync::Mutex<()>,
    verbs: Verbs,
}

/// Where the page's verb output goes: its progress to every tab, no text (`Capture` keeps the
/// verb's text for the tool's reply).
struct ToTabs {
    events: broadcast::Sender<Arc<str>>,
    last: Mutex<(u64, u64)>,
}

/// `jmp`'s verb host, whose progress reports go to every tab.
type Verbs = WithOutput<Host, ToTabs>;

impl VerbOutput for ToTabs {
    fn print(&self, _text: &str) -> Result<(), VerbError> {
        // Verbs run here through `Capture`, which keeps their text for the reply.
        Ok(())
    }

    fn progress(&self, _what: &str, done: u64, total: Option<u64>) {
        // At most one report per percent (or per MiB without a total).
        let step = match total {
            Some(t) if t > 0 => done.min(t) * 100 / t,
            _ => done >> 20,
        };
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if *last == (step, total.unwrap_or(0)) {
                return;
            }
            *last = (step, total.unwrap_or(0));
        }
        let _ = self.events.send(
            json!({"t": "flash", "done": done, "total": total})
                .to_string()
                .into(),
        );
    }
}

impl AgentHost for Board {
    fn verbs(&self) -> &dyn VerbHost {
        &self.verbs
    }

    fn target(&self) -> Result<Target, VerbError> {
        Ok(self.target.clone())
    }

    /// The attachment's devices as the status reader last found them (every keystroke asks,
    /// through the console tool: reading every attachment's state file each time made typing
    /// in the page slow); read from the state file while it has not found them.
    fn devices(&self) -> Result<Vec<(String, Kind)>, VerbError> {
        if let Some(d) = self.shared().devices.clone() {
            return Ok(d);
        }
        let st = state::find(Some(&self.exporter))
            .map_err(|e| VerbError::new(jmp_protocol::exit::UNAVAILABLE, format!("{e:#}")))?;
        Ok(devices_of(&st))
    }
}

fn devices_of(st: &state::StateFile) -> Vec<(String, Kind)> {
    st.ready
        .devices
        .iter()
        .map(|d| (d.name.clone(), d.kind.clone()))
        .collect()
}

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl Board {
    pub(crate) fn new(exporter: String) -> Arc<Board> {
        let (events, _) = broadcast::channel(TAB_QUEUE);
        Arc::new(Board {
            target: Target {
                exporter: Some(exporter.clone()),
                ..Target::default()
            },
            exporter,
            tools: jmp_devices::registry::agent_tools(),
            verbs: WithOutput {
                base: Host,
                out: ToTabs {
                    events: events.clone(),
                    last: Mutex::new((u64::MAX, 0)),
                },
            },
            events,
            shared: Mutex::new(Shared {
                history: String::new(),
                can: VecDeque::new(),
                status: json!({"t": "status", "live": null, "error": "starting"}),
                console: json!({"t": "console-state"}),
                power: None,
                devices: None,
            }),
            flashing: tokio::sync::Mutex::new(()),
        })
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls the kinds' tool `name` on this board.
    pub(crate) async fn call(&self, name: &str, a: Value) -> Result<Value, VerbError> {
        let Some(tool) = self.tools.iter().find(|t| t.spec().name == name) else {
            return Err(VerbError::new(
                jmp_protocol::exit::FAILURE,
                format!("this jmp has no {name} tool"),
            ));
        };
        let r = tool.call(self, args(a)).await?;
        Ok(json!({"text": r.text, "data": r.data}))
    }

    /// Sends `event` to every tab; `keep` updates what a new tab is told first, under the
    /// same lock as the send (see [`Board::subscribe`]).
    fn publish(&self, event: Value, keep: impl FnOnce(&mut Shared, &Value)) {
        let mut s = self.shared();
        keep(&mut s, &event);
        let _ = self.events.send(event.to_string().into());
    }

    /// What a new tab is sent first (hello, status, the console's recent output, recent CAN
    /// frames, the last power state), and the live events after it.
    pub(crate) fn subscribe(&self) -> (Vec<String>, broadcast::Receiver<Arc<str>>) {
        let s = self.shared();
        let rx = self.events.subscribe();
        let mut first = vec![
            json!({"t": "hello", "exporter": self.exporter}).to_string(),
            s.status.to_string(),
            s.console.to_string(),
        ];
        if !s.history.is_empty() {
            first.push(json!({"t": "console", "data": s.history}).to_string());
        }
        if !s.can.is_empty() {
            let frames: Vec<&Value> = s.can.iter().rev().collect();
            first.push(json!({"t": "can", "frames": frames}).to_string());
        }
        if let Some(p) = &s.power {
            first.push(p.to_string());
        }
        (first, rx)
    }

    /// Types `data` on the console.
    pub(crate) async fn input(&self, data: String) {
        if let Err(e) = self.call("console_write", json!({"data": data})).await {
            self.publish(json!({"t": "console-state", "error": e.message}), |_, _| {});
        }
    }

    /// Switches the power; every tab sees the result.
    pub(crate) async fn power(&self, action: &str) {
        let ev = match self.call("power", json!({"action": action})).await {
            Ok(r) => json!({
                "t": "power",
                "ok": true,
                "text": r["text"],
                "state": r["data"]["power"]["state"],
            }),
            Err(e) => json!({"t": "power", "ok": false, "text": e.message, "state": null}),
        };
        self.publish(ev, |s, e| {
            if e["ok"] == true {
                s.power = Some(e.clone());
            }
        });
    }

    /// Writes the image at `path` to the board's storage; the tool's report, or why not.
    pub(crate) async fn flash(&self, path: &std::path::Path) -> Result<String, String> {
        let _one = self.flashing.lock().await;
        let Some(tool) = self.tools.iter().find(|t| t.spec().name == "flash") else {
            return Err("this jmp has no flash tool".into());
        };
        // The tool keeps the verb's text for its reply; its progress reaches every tab
        // through `Verbs::progress`.
        tool.call(self, args(json!({"path": path.to_string_lossy()})))
            .await
            .map(|r| r.text)
            .map_err(|e| e.message)
    }

    /// Reads the console for as long as the server runs.
    pub(crate) async fn console_reader(self: Arc<Self>) {
        let mut failing: Option<String> = None;
        loop {
            let r = self
                .call("console_read", json!({"max_bytes": 65536, "timeout": 30}))
                .await;
            match r {
                Ok(r) => {
                    if failing.take().is_some() || self.shared().console["device"].is_null() {
                        self.publish(
                            json!({"t": "console-state", "device": r["data"]["device"]}),
                            |s, e| s.console = e.clone(),
                        );
                    }
                    let mut out = r["data"]["output"].as_str().unwrap_or("").to_string();
                    let lost = r["data"]["lost"].as_u64().unwrap_or(0);
                    if lost > 0 {
                        out = format!("\r\n[jmp web: {lost} bytes of output were lost]\r\n{out}");
                    }
                    if !out.is_empty() {
                        self.publish(json!({"t": "console", "data": out}), |s, e| {
                            s.history.push_str(e["data"].as_str().unwrap_or(""));
                            if s.history.len() > HISTORY {
                                let mut cut = s.history.len() - HISTORY;
                                while !s.history.is_char_boundary(cut) {
                                    cut += 1;
                                }
                                s.history.drain(..cut);
                            }
                        });
                    }
                }
                Err(e) => {
                    if failing.as_deref() != Some(e.message.as_str()) {
                        self.publish(json!({"t": "console-state", "error": e.message}), |s, e| {
                            s.console = e.clone()
                        });
                        failing = Some(e.message);
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Reads the CAN bus (the board's first) for as long as the server runs.
    pub(crate) async fn can_reader(self: Arc<Self>) {
        loop {
            match self
                .call("can_recv", json!({"timeout": 30, "max_frames": 256}))
                .await
            {
                Ok(r) => {
                    let device = r["data"]["device"].clone();
                    let frames: Vec<Value> = r["data"]["frames"]
                        .as_array()
                        .map(|v| {
                            v.iter()
                                .map(|f| {
                                    let mut f = f.clone();
                                    f["device"] = device.clone();
                                    f
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    if !frames.is_empty() {
                        self.publish(json!({"t": "can", "frames": frames}), |s, e| {
                            for f in e["frames"].as_array().into_iter().flatten() {
                                s.can.push_front(f.clone());
                            }
                            s.can.truncate(CAN_KEEP);
                        });
                    }
                }
                // No bus on this board (or the link is down): asked again later.
                Err(_) => tokio::time::sleep(RETRY * 5).await,
            }
        }
    }

    /// Follows the attachment's status (link up or reconnecting, devices, their endpoints)
    /// through its control socket, as `jmp status` does; its end is the lease's or the
    /// attachment's.
    pub(crate) async fn status_reader(self: Arc<Self>) {
        let mut asked_power = false;
        loop {
            let exporter = self.exporter.clone();
            let me = self.clone();
            let got = tokio::task::spawn_blocking(move || -> Result<Value, String> {
                let found = state::find(Some(&exporter));
                me.shared().devices = found.as_ref().ok().map(devices_of);
                let st = found.map_err(|_| {
                    format!(
                        "the attachment of {exporter} has ended (jmp detach, the lease ended or was released, or the exporter ended it)"
                    )
                })?;
                let req = ctlsock::Request {
                    v: ctlsock::VERSION,
                    op: Op::Status,
                };
                match ctlsock::call(&st.socket, &req, Duration::from_secs(5))?.body {
                    ReplyBody::Status(live) => {
                        serde_json::to_value(&live).map_err(|e| e.to_string())
                    }
                    ReplyBody::Error { message, .. } => Err(message),
                    other => Err(format!("unexpected answer from the attachment: {other:?}")),
                }
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let ev = match got {
                Ok(live) => json!({"t": "status", "live": live}),
                Err(e) => json!({"t": "status", "live": null, "error": e}),
            };
            let changed = self.shared().status != ev;
            if changed {
                let up = ev["live"]["link"] == "up";
                self.publish(ev, |s, e| s.status = e.clone());
                if up && !asked_power {
                    asked_power = true;
                    let me = self.clone();
                    tokio::spawn(async move { me.power("status").await });
                }
            }
            tokio::time::sleep(STATUS_EVERY).await;
        }
    }
}
