//! The session's own tools: which board it works on and how it got it. `list_boards`, `lease`
//! (which also attaches, unless told not to), `release`, `extend`, `attach`, `detach`,
//! `devices`, `usage`: each the controller call of the matching `jmp` verb (`get exporters`,
//! `create lease --wait`, `delete lease`, `update lease --extend`, `admin usage`) or the
//! background attachment of `jmp attach -d`, with the session's client config.

use super::host::Progress;
use crate::controller::{self as ctl, Ctl};
use crate::state::{self, StateFile};
use jmp_devices::agent::{parse, ToolReply, ToolSpec};
use jmp_devices::kind::{Target, VerbError};
use jmp_protocol::api::{ClientConfig, LeaseInfo, LeaseRequest, Reply, Request};
use jmp_protocol::exit as code;
use jmp_protocol::Kind;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The longest a `lease` call waits in the queue.
const MAX_WAIT_SECS: u64 = 3600;

/// What a kind's tool works on: the session's board as it is when the call begins.
pub(crate) struct BoardNow {
    pub target: Target,
    pub devices: Vec<(String, Kind)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    ListBoards,
    Lease,
    Release,
    Extend,
    Attach,
    Detach,
    Devices,
    Usage,
}

impl Tool {
    pub(crate) const ALL: &'static [Tool] = &[
        Tool::ListBoards,
        Tool::Lease,
        Tool::Release,
        Tool::Extend,
        Tool::Attach,
        Tool::Detach,
        Tool::Devices,
        Tool::Usage,
    ];

    pub(crate) fn spec(self) -> ToolSpec {
        let object = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
        match self {
            Tool::ListBoards => ToolSpec {
                name: "list_boards",
                description: "The boards (exporters) this client may lease, with their labels, \
                    whether they are online, and who holds them; and a board run on this machine \
                    by `jmp local start`. `selector` narrows the list (label selector, e.g. \
                    \"board=rpi4,site=lab1\").",
                input: object(json!({"selector": {"type": "string"}}), &[]),
                changes_board: false,
            },
            Tool::Lease => ToolSpec {
                name: "lease",
                description: "Lease a board by label selector (as `jmp create lease --selector`) \
                    and attach it: its devices become usable by the other tools and appear on \
                    this machine (a console as a pty, ports as local addresses). When every \
                    matching board is taken, waits in the lab's queue up to `wait` seconds \
                    (default 60), sending the queue position as progress. `duration` e.g. \
                    \"30m\", \"2h\" (default 30m). `attach: false` only leases. One board per \
                    session; released by release or when the session ends.",
                input: object(
                    json!({
                        "selector": {"type": "string"},
                        "duration": {"type": "string"},
                        "wait": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_SECS},
                        "attach": {"type": "boolean"}
                    }),
                    &["selector"],
                ),
                changes_board: true,
            },
            Tool::Release => ToolSpec {
                name: "release",
                description: "Give the board back: detach it and delete its lease (default: \
                    this session's lease).",
                input: object(json!({"lease": {"type": "string"}}), &[]),
                changes_board: true,
            },
            Tool::Extend => ToolSpec {
                name: "extend",
                description: "Make the lease last longer: `duration` more (e.g. \"30m\"), up to \
                    what the client's policy allows (default: this session's lease).",
                input: object(
                    json!({"duration": {"type": "string"}, "lease": {"type": "string"}}),
                    &["duration"],
                ),
                changes_board: false,
            },
            Tool::Attach => ToolSpec {
                name: "attach",
                description: "Attach a leased board (default: this session's lease; a lease \
                    made elsewhere by name), or, with no lease at all, the board `jmp local \
                    start` runs on this machine. Lists its devices.",
                input: object(json!({"lease": {"type": "string"}}), &[]),
                changes_board: false,
            },
            Tool::Detach => ToolSpec {
                name: "detach",
                description: "Remove the board's devices from this machine; the lease stays \
                    (lease tools and power still work through it).",
                input: object(json!({}), &[]),
                changes_board: false,
            },
            Tool::Devices => ToolSpec {
                name: "devices",
                description: "The board's devices: name, kind, state, where each appears on \
                    this machine (pty path, local address, mount) and a short status.",
                input: object(json!({}), &[]),
                changes_board: false,
            },
            Tool::Usage => ToolSpec {
                name: "usage",
                description: "Administrators: leased time over a window per team, client, \
                    exporter or lease (as `jmp admin usage`). `since`/`until`: a date \
                    (2026-11-01), an RFC 3339 time, or a duration ago (30d).",
                input: object(
                    json!({
                        "since": {"type": "string"},
                        "until": {"type": "string"},
                        "by": {"type": "string", "enum": ["team", "client", "exporter", "lease"]}
                    }),
                    &["since"],
                ),
                changes_board: false,
            },
        }
    }
}

/// The board the session works on.
struct Board {
    exporter: String,
    lease: Option<String>,
    /// The attachment that makes its devices local, when attached.
    attachment: Option<StateFile>,
    /// The attachment was started by this session (so detach, release and the session's end
    /// stop it).
    ours: bool,
}

#[derive(Default)]
struct State {
    board: Option<Board>,
    /// Leases this session created: released when it ends.
    leases: Vec<String>,
}

pub(crate) struct Session {
    client: Option<String>,
    name: Option<String>,
    agent: std::sync::Mutex<String>,
    state: tokio::sync::Mutex<State>,
}

/// A `jmp` error as a tool's (its exit code kept).
fn verr(e: anyhow::Error) -> VerbError {
    let c = e
        .downcast_ref::<crate::Exit>()
        .map_or(code::FAILURE, |x| x.code);
    VerbError::new(c, format!("{e:#}"))
}

fn usage(msg: impl Into<String>) -> VerbError {
    VerbError::new(code::USAGE, msg)
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    crate::table::render(Some(header), rows)
}

/// The last lines of a failed background attachment's log, whose path its error names.
fn log_tail(message: &str) -> String {
    let Some(path) = message
        .split("(log: ")
        .nth(1)
        .and_then(|r| r.strip_suffix(')'))
    else {
        return String::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

impl Session {
    pub(crate) fn new(client: Option<String>, name: Option<String>) -> Session {
        Session {
            client,
            name,
            agent: std::sync::Mutex::new(String::new()),
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// The agent's name as its MCP client says (`initialize`'s clientInfo).
    pub(crate) fn set_agent(&self, name: &str) {
        let mut a = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        if a.is_empty() {
            *a = jmp_protocol::name::escape(name).chars().take(64).collect();
        }
    }

    pub(crate) fn agent(&self) -> String {
        let a = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        if a.is_empty() {
            "an MCP client".into()
        } else {
            a.clone()
        }
    }

    /// Who the exporter's log names for this session's attachment (`jmp attach --name`).
    fn attach_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "{} via jmp mcp ({})",
                crate::paths::default_client_name(),
                self.agent()
            )
        })
    }

    fn target(&self, exporter: &str) -> Target {
        Target {
            exporter: Some(exporter.to_string()),
            client: self.client.clone(),
            ..Target::default()
        }
    }

    /// The board as a kind's tool sees it now, or what to call first.
    pub(crate) async fn board(&self) -> Result<BoardNow, VerbError> {
        let st = self.state.lock().await;
        let Some(b) = &st.board else {
            return Err(usage(
                "no board yet: call lease {selector} (list_boards shows what this client may lease), or attach to use a board leased elsewhere or started with `jmp local start`",
            ));
        };
        let Some(a) = &b.attachment else {
            return Err(usage(format!(
                "{} is leased ({}) but not attached: call attach",
                b.exporter,
                b.lease.as_deref().unwrap_or("-")
            )));
        };
        if state::find(Some(&b.exporter)).is_err() {
            return Err(VerbError::new(
                code::UNAVAILABLE,
                format!(
                    "the attachment of {} has ended{}: call attach again",
                    b.exporter,
                    a.log
                        .as_ref()
                        .map(|l| format!(" (its log: {})", l.display()))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(BoardNow {
            target: self.target(&b.exporter),
            devices: a
                .ready
                .devices
                .iter()
                .map(|d| (d.name.clone(), d.kind.clone()))
                .collect(),
        })
    }

    fn config(&self) -> Result<ClientConfig, VerbError> {
        ctl::load_client(self.client.as_deref())
            .map(|(c, _)| c)
            .map_err(verr)
    }

    async fn controller(&self) -> Result<(Ctl, ClientConfig), VerbError> {
        let cfg = self.config()?;
        let c = Ctl::connect(&cfg).await.map_err(verr)?;
        Ok((c, cfg))
    }

    pub(crate) async fn call(
        &self,
        tool: Tool,
        args: Map<String, Value>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<ToolReply, VerbError> {
        let name = tool.spec().name;
        match tool {
            Tool::ListBoards => self.list_boards(parse(name, args)?).await,
            Tool::Lease => self.lease(parse(name, args)?, progress.cloned()).await,
            Tool::Release => self.release(parse(name, args)?).await,
            Tool::Extend => self.extend(parse(name, args)?).await,
            Tool::Attach => {
                let a: LeaseArg = parse(name, args)?;
                let mut st = self.state.lock().await;
                self.attach(&mut st, a.lease).await
            }
            Tool::Detach => {
                let _: NoArgs = parse(name, args)?;
                self.detach().await
            }
            Tool::Devices => {
                let _: NoArgs = parse(name, args)?;
                self.devices().await
            }
            Tool::Usage => self.usage(parse(name, args)?).await,
        }
    }

    async fn list_boards(&self, a: ListArgs) -> Result<ToolReply, VerbError> {
        let selector = match &a.selector {
            Some(s) => crate::verbs::selector_arg(std::slice::from_ref(s)).map_err(verr)?,
            None => String::new(),
        };
        let mut rows = Vec::new();
        let mut boards = Vec::new();
        let mut notes = Vec::new();
        match self.controller().await {
            Ok((c, _)) => {
                let r = c
                    .call(Request::GetExporters {
                        selector: Some(selector),
                    })
                    .await;
                c.close();
                match r.map_err(verr)? {
                    Reply::Exporters { exporters } => {
                        for e in exporters {
                            let labels = e
                                .labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(",");
                            let state = match (e.enabled, e.online, &e.lease, &e.state) {
                                (false, _, _, _) => "disabled".to_string(),
                                (_, false, _, _) => "offline".to_string(),
                                (_, _, _, Some(s)) => s.clone(),
                                (_, _, Some(_), _) => "leased".to_string(),
                                _ => "free".to_string(),
                            };
                            rows.push(vec![
                                e.name.clone(),
                                labels,
                                state.clone(),
                                e.client.clone().unwrap_or_else(|| "-".into()),
                            ]);
                            boards.push(json!({
                                "name": e.name,
                                "labels": e.labels,
                                "state": state,
                                "online": e.online,
                                "enabled": e.enabled,
                                "leased_by": e.client,
                                "lease": e.lease,
                                "devices": e.devices.iter().map(|d| json!({"name": d.name, "kind": d.kind})).collect::<Vec<_>>(),
                            }));
                        }
                    }
                    other => return Err(verr(ctl::unexpected(other))),
                }
            }
            Err(e) => notes.push(format!("no lab: {}", e.message)),
        }
        if let Some(l) = state::local_running() {
            rows.push(vec![
                l.ready.exporter.clone(),
                "(jmp local start: attach without a lease)".into(),
                "local".into(),
                "-".into(),
            ]);
            boards.push(json!({"name": l.ready.exporter, "state": "local", "local": true}));
        }
        if boards.is_empty() && !notes.is_empty() {
            return Err(VerbError::new(
                code::UNAVAILABLE,
                format!(
                    "{}; and no board runs on this machine (jmp local start)",
                    notes.join("; ")
                ),
            ));
        }
        let mut text = if rows.is_empty() {
            "no board matches".to_string()
        } else {
            table(&["NAME", "LABELS", "STATE", "LEASED BY"], &rows)
        };
        for n in &notes {
            text.push_str(&format!("\n{n}"));
        }
        Ok(ToolReply {
            text,
            data: json!({"boards": boards, "notes": notes}),
        })
    }

    async fn lease(
        &self,
        a: LeaseArgs,
        progress: Option<Arc<Progress>>,
    ) -> Result<ToolReply, VerbError> {
        let mut st = self.state.lock().await;
        if let Some(b) = &st.board {
            return Err(usage(format!(
                "this session already has {} ({}): release it first (one board per session)",
                b.exporter,
                b.lease.as_deref().unwrap_or("local")
            )));
        }
        let selector =
            crate::verbs::selector_arg(std::slice::from_ref(&a.selector)).map_err(verr)?;
        if selector.is_empty() {
            return Err(usage(
                "lease: selector: say which board, e.g. \"board=rpi4\"",
            ));
        }
        let duration_secs =
            crate::verbs::duration_arg("duration", a.duration.as_deref().unwrap_or("30m"))
                .map_err(verr)?;
        let wait = a.wait.unwrap_or(60);
        if wait > MAX_WAIT_SECS {
            return Err(usage(format!(
                "lease: wait {wait}: at most {MAX_WAIT_SECS} seconds"
            )));
        }
        let cfg = self.config()?;
        let on_queue = progress.map(|p| {
            Box::new(move |position: u32, behind: Option<&str>| {
                let behind = behind
                    .map(|b| format!(", behind lease {b}"))
                    .unwrap_or_default();
                p.tell(
                    u64::from(position),
                    None,
                    format!("waiting: position {position} in the queue{behind}"),
                );
            }) as Box<dyn Fn(u32, Option<&str>) + Send + Sync>
        });
        let lease: LeaseInfo = ctl::create_lease(
            &cfg,
            ctl::CreateLease {
                request: LeaseRequest {
                    request_id: crate::verbs::random_id(),
                    selector,
                    exporter: None,
                    duration_secs,
                    begin_time: None,
                    wait_secs: wait,
                    job: ctl::current_job(),
                    // The controller's default idle timeout: the agent's attachment keeps the
                    // lease in use, and an agent that goes away frees the board.
                    idle_timeout_secs: None,
                    auto_extend: false,
                    max_duration_secs: None,
                },
                out: ctl::Out::Name,
                on_queue,
            },
        )
        .await
        .map_err(verr)?;
        st.leases.push(lease.name.clone());
        st.board = Some(Board {
            exporter: lease.exporter.clone(),
            lease: Some(lease.name.clone()),
            attachment: None,
            ours: false,
        });
        let head = format!(
            "leased {} (lease {}, until {})",
            lease.exporter,
            lease.name,
            ctl::fmt_time(lease.end)
        );
        let lease_json = json!({"name": lease.name, "exporter": lease.exporter, "end": lease.end});
        if !a.attach.unwrap_or(true) {
            return Ok(ToolReply {
                text: format!("{head}; not attached (attach makes its devices usable)"),
                data: json!({"lease": lease_json}),
            });
        }
        match self.attach(&mut st, None).await {
            Ok(r) => Ok(ToolReply {
                text: format!("{head}\n{}", r.text),
                data: json!({"lease": lease_json, "devices": r.data["devices"]}),
            }),
            Err(e) => Err(VerbError::new(
                e.code,
                format!(
                    "{head}, but attaching it failed: {} (the lease is held: attach again, or release)",
                    e.message
                ),
            )),
        }
    }

    /// Attaches `lease` (default: the session's), or the machine's local board.
    async fn attach(&self, st: &mut State, lease: Option<String>) -> Result<ToolReply, VerbError> {
        if let Some(b) = &st.board {
            let other = lease.as_ref().is_some_and(|l| b.lease.as_ref() != Some(l));
            if other {
                return Err(usage(format!(
                    "this session works on {} ({}): release or detach it first",
                    b.exporter,
                    b.lease.as_deref().unwrap_or("local")
                )));
            }
            if b.attachment.is_some() && state::find(Some(&b.exporter)).is_ok() {
                return self.describe(b).await;
            }
        }
        let lease = lease.or_else(|| st.board.as_ref().and_then(|b| b.lease.clone()));
        let (attachment, ours) = match &lease {
            None => {
                let found = state::local_running().or_else(|| match state::all().as_slice() {
                    [only] => Some(only.clone()),
                    _ => None,
                });
                let Some(a) = found else {
                    return Err(usage(
                        "nothing to attach: call lease {selector} first (or start a board here with `jmp local start`)",
                    ));
                };
                (a, false)
            }
            Some(l) => match state::all()
                .into_iter()
                .find(|s| s.ready.lease.as_deref() == Some(l.as_str()))
            {
                Some(a) => (a, false),
                None => (self.start_attachment(l).await?, true),
            },
        };
        let b = Board {
            exporter: attachment.ready.exporter.clone(),
            lease: lease.clone(),
            attachment: Some(attachment),
            ours,
        };
        let r = self.describe(&b).await;
        st.board = Some(b);
        r
    }

    /// `jmp attach -d --lease L`, named after the agent.
    async fn start_attachment(&self, lease: &str) -> Result<StateFile, VerbError> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "attach".into(),
            "--lease".into(),
            lease.into(),
            "-o".into(),
            "json".into(),
            "--name".into(),
            self.attach_name().into(),
        ];
        if let Some(c) = &self.client {
            args.push("--client".into());
            args.push(c.into());
        }
        let started = tokio::task::spawn_blocking(move || state::start_background(&args))
            .await
            .map_err(|e| VerbError::new(code::FAILURE, e.to_string()))?;
        let (_, ready) = started.map_err(|e| {
            let mut v = verr(e);
            let tail = log_tail(&v.message);
            if !tail.is_empty() {
                v.message = format!("{}:\n{tail}", v.message);
            }
            v
        })?;
        state::find(Some(&ready.exporter)).map_err(verr)
    }

    /// The board's devices, from its attachment's control socket.
    async fn describe(&self, b: &Board) -> Result<ToolReply, VerbError> {
        let Some(a) = b.attachment.clone() else {
            return Err(usage(format!(
                "{} is not attached: call attach",
                b.exporter
            )));
        };
        let live = tokio::task::spawn_blocking(move || state::live(&a))
            .await
            .map_err(|e| VerbError::new(code::FAILURE, e.to_string()))?;
        let rows: Vec<Vec<String>> = live
            .ready
            .devices
            .iter()
            .map(|d| {
                let mut state = serde_json::to_value(&d.state)
                    .ok()
                    .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string))
                    .unwrap_or_default();
                if let Some(s) = &d.summary {
                    state = format!("{state}, {s}");
                }
                vec![
                    d.name.clone(),
                    d.kind.to_string(),
                    if d.endpoints.is_empty() {
                        "-".into()
                    } else {
                        d.endpoints
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("  ")
                    },
                    state,
                ]
            })
            .collect();
        let text = format!(
            "{}{} (link {}):\n{}",
            b.exporter,
            b.lease
                .as_ref()
                .map(|l| format!(", lease {l}"))
                .unwrap_or_else(|| ", local board".into()),
            live.link,
            table(&["DEVICE", "KIND", "LOCAL", "STATE"], &rows)
        );
        Ok(ToolReply {
            text,
            data: json!({
                "exporter": b.exporter,
                "lease": b.lease,
                "link": live.link,
                "devices": live.ready.devices,
            }),
        })
    }

    async fn devices(&self) -> Result<ToolReply, VerbError> {
        let st = self.state.lock().await;
        match &st.board {
            Some(b) => self.describe(b).await,
            None => Err(usage("no board yet: call lease {selector} or attach")),
        }
    }

    async fn detach(&self) -> Result<ToolReply, VerbError> {
        let mut st = self.state.lock().await;
        let Some(b) = st.board.as_mut() else {
            return Err(usage("no board is attached"));
        };
        let Some(a) = b.attachment.take() else {
            return Err(usage(format!("{} is not attached", b.exporter)));
        };
        let text = if b.ours {
            let exporter = b.exporter.clone();
            tokio::task::spawn_blocking(move || state::stop_attachment(&a))
                .await
                .map_err(|e| VerbError::new(code::FAILURE, e.to_string()))?
                .map_err(verr)?;
            format!("detached {exporter}")
        } else {
            format!(
                "{} stays attached (this session did not start its attachment); the session no longer uses it",
                b.exporter
            )
        };
        b.ours = false;
        if b.lease.is_none() {
            st.board = None;
        } else {
            let lease = b.lease.clone();
            return Ok(ToolReply {
                text: format!(
                    "{text}; lease {} is still held",
                    lease.as_deref().unwrap_or("-")
                ),
                data: json!({"detached": true, "lease": lease}),
            });
        }
        Ok(ToolReply {
            text,
            data: json!({"detached": true}),
        })
    }

    async fn release(&self, a: LeaseArg) -> Result<ToolReply, VerbError> {
        let mut st = self.state.lock().await;
        let name = a
            .lease
            .or_else(|| st.board.as_ref().and_then(|b| b.lease.clone()))
            .ok_or_else(|| usage("no lease to release (this session holds none; name one)"))?;
        let mut notes = Vec::new();
        let ours = st
            .board
            .as_ref()
            .filter(|b| b.lease.as_deref() == Some(name.as_str()));
        if let Some(b) = ours {
            if let (true, Some(att)) = (b.ours, b.attachment.clone()) {
                let r = tokio::task::spawn_blocking(move || state::stop_attachment(&att)).await;
                if let Ok(Err(e)) = r {
                    notes.push(format!("detaching: {e:#}"));
                }
            }
        }
        let (c, _) = self.controller().await?;
        let r = c
            .call(Request::DeleteLease {
                names: vec![name.clone()],
                all: false,
            })
            .await;
        c.close();
        match r.map_err(verr)? {
            Reply::Deleted { .. } => {}
            other => return Err(verr(ctl::unexpected(other))),
        }
        st.leases.retain(|l| *l != name);
        if st
            .board
            .as_ref()
            .is_some_and(|b| b.lease.as_deref() == Some(name.as_str()))
        {
            st.board = None;
        }
        let mut text = format!("lease {name} released");
        for n in &notes {
            text.push_str(&format!("; {n}"));
        }
        Ok(ToolReply {
            text,
            data: json!({"released": name}),
        })
    }

    async fn extend(&self, a: ExtendArgs) -> Result<ToolReply, VerbError> {
        let secs = crate::verbs::duration_arg("duration", &a.duration).map_err(verr)?;
        let name = match a.lease {
            Some(l) => l,
            None => {
                let st = self.state.lock().await;
                st.board
                    .as_ref()
                    .and_then(|b| b.lease.clone())
                    .ok_or_else(|| {
                        usage("no lease to extend (this session holds none; name one)")
                    })?
            }
        };
        let (c, _) = self.controller().await?;
        let r = c
            .call(Request::UpdateLease {
                name: name.clone(),
                duration_secs: None,
                extend_secs: Some(secs),
            })
            .await;
        c.close();
        match r.map_err(verr)? {
            Reply::Lease(l) => Ok(ToolReply {
                text: format!("lease {} now ends at {}", l.name, ctl::fmt_time(l.end)),
                data: json!({"lease": l.name, "end": l.end}),
            }),
            other => Err(verr(ctl::unexpected(other))),
        }
    }

    async fn usage(&self, a: UsageArgs) -> Result<ToolReply, VerbError> {
        use jmp_protocol::usage::{UsageBy, UsageQuery};
        let now = jmp_transport::unix_now().saturating_mul(1000);
        let since = crate::verbs::time_arg("since", &a.since, now).map_err(verr)?;
        let until = a
            .until
            .as_deref()
            .map(|u| crate::verbs::time_arg("until", u, now))
            .transpose()
            .map_err(verr)?;
        if until.is_some_and(|u| u <= since) {
            return Err(usage("usage: until must be after since"));
        }
        let by = match a.by.as_deref().unwrap_or("team") {
            "team" => UsageBy::Team,
            "client" => UsageBy::Client,
            "exporter" => UsageBy::Exporter,
            "lease" => UsageBy::Lease,
            other => {
                return Err(usage(format!(
                    "usage: by {other:?}: expected team, client, exporter or lease"
                )))
            }
        };
        let (c, _) = self.controller().await?;
        let r = c
            .call(Request::Usage(UsageQuery { since, until, by }))
            .await;
        c.close();
        match r.map_err(verr)? {
            Reply::Usage(r) => {
                let (header, rows) = r.table();
                Ok(ToolReply {
                    text: table(&header, &rows),
                    data: r.json(),
                })
            }
            other => Err(verr(ctl::unexpected(other))),
        }
    }

    /// Gives back what this session made: its attachment is stopped, its leases released.
    /// The problems met (each step is tried regardless).
    pub(crate) async fn give_back(&self) -> Vec<String> {
        let mut st = self.state.lock().await;
        let mut problems = Vec::new();
        if let Some(b) = st.board.take() {
            if let (true, Some(a)) = (b.ours, b.attachment) {
                match tokio::task::spawn_blocking(move || state::stop_attachment(&a)).await {
                    Ok(Err(e)) => problems.push(format!("detaching {}: {e:#}", b.exporter)),
                    Err(e) => problems.push(e.to_string()),
                    Ok(Ok(())) => {}
                }
            }
        }
        let leases = std::mem::take(&mut st.leases);
        if leases.is_empty() {
            return problems;
        }
        match self.controller().await {
            Ok((c, _)) => {
                match c
                    .call(Request::DeleteLease {
                        names: leases.clone(),
                        all: false,
                    })
                    .await
                {
                    Ok(_) => tracing::info!("mcp: released {}", leases.join(", ")),
                    Err(e) => problems.push(format!("releasing {}: {e:#}", leases.join(", "))),
                }
                c.close();
            }
            Err(e) => problems.push(format!("releasing {}: {}", leases.join(", "), e.message)),
        }
        problems
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    selector: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseArgs {
    selector: String,
    duration: Option<String>,
    wait: Option<u64>,
    attach: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseArg {
    lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendArgs {
    duration: String,
    lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageArgs {
    since: String,
    until: Option<String>,
    by: Option<String>,
}
