//! What `jmp mcp` lends the kinds' agent tools: the session's board as a verb's target, and
//! `jmp`'s own verb host (the running attachment's control socket, or a connection of its
//! own), whose progress goes to the agent as MCP progress notifications.

use super::board::BoardNow;
use crate::device::Host;
use jmp_devices::agent::AgentHost;
use jmp_devices::kind::{Target, VerbError, VerbHost, VerbOutput, WithOutput};
use jmp_protocol::exit as code;
use jmp_protocol::Kind;
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::Peer;
use rmcp::RoleServer;
use std::sync::Mutex;

/// A call's progress notifications: sent in order by one task, at most one per percent.
pub(super) struct Progress {
    tx: tokio::sync::mpsc::UnboundedSender<ProgressNotificationParam>,
    token: ProgressToken,
    last: Mutex<Option<(u64, String)>>,
}

impl Progress {
    pub(super) fn new(peer: Peer<RoleServer>, token: ProgressToken) -> Progress {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProgressNotificationParam>();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                if peer.notify_progress(p).await.is_err() {
                    break;
                }
            }
        });
        Progress {
            tx,
            token,
            last: Mutex::new(None),
        }
    }

    /// `done` of `total` (the unit is the message's), said as `message`.
    pub(super) fn tell(&self, done: u64, total: Option<u64>, message: String) {
        let step = match total {
            Some(t) if t > 0 => done.min(t) * 100 / t,
            _ => done,
        };
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last
                .as_ref()
                .is_some_and(|(s, m)| *s == step && *m == message)
            {
                return;
            }
            *last = Some((step, message.clone()));
        }
        let mut p = ProgressNotificationParam::new(self.token.clone(), done as f64);
        p.total = total.map(|t| t as f64);
        p.message = Some(message);
        let _ = self.tx.send(p);
    }
}

/// Where a call's verb output goes: its progress to the agent, no text (the tool's reply
/// carries it).
pub(super) struct ToAgent<'a> {
    progress: Option<&'a Progress>,
}

/// `jmp`'s own verb host, with a call's progress going to the agent.
pub(super) type Verbs<'a> = WithOutput<Host, ToAgent<'a>>;

impl VerbOutput for ToAgent<'_> {
    fn print(&self, _text: &str) -> Result<(), VerbError> {
        // stdout is the protocol's: a tool returns what it has to say in its reply.
        Err(VerbError::new(
            code::FAILURE,
            "a verb printed outside a tool's reply (a bug in jmp mcp)",
        ))
    }

    fn progress(&self, what: &str, done: u64, total: Option<u64>) {
        if let Some(p) = self.progress {
            let msg = match total {
                Some(t) if t > 0 => format!(
                    "{what}: {}% ({} of {} MiB)",
                    done.min(t) * 100 / t,
                    done >> 20,
                    t >> 20
                ),
                _ => format!("{what}: {} MiB", done >> 20),
            };
            p.tell(done, total, msg);
        }
    }
}

/// The board a kind's tool works on: a snapshot taken when the call began.
pub(super) struct McpHost<'a> {
    board: Result<BoardNow, VerbError>,
    verbs: Verbs<'a>,
}

impl<'a> McpHost<'a> {
    pub(super) fn new(board: Result<BoardNow, VerbError>, progress: Option<&'a Progress>) -> Self {
        McpHost {
            board,
            verbs: WithOutput {
                base: Host,
                out: ToAgent { progress },
            },
        }
    }
}

impl AgentHost for McpHost<'_> {
    fn verbs(&self) -> &dyn VerbHost {
        &self.verbs
    }

    fn target(&self) -> Result<Target, VerbError> {
        self.board
            .as_ref()
            .map(|b| b.target.clone())
            .map_err(Clone::clone)
    }

    fn devices(&self) -> Result<Vec<(String, Kind)>, VerbError> {
        self.board
            .as_ref()
            .map(|b| b.devices.clone())
            .map_err(Clone::clone)
    }
}
