//! `jmp mcp`: a Model Context Protocol server on stdin/stdout (the `rmcp` crate), so that a
//! coding agent can lease a board and drive it.
//!
//! Every tool is a thin call into what the command line does: the board tools ([`board`]:
//! `list_boards`, `lease`, `release`, `extend`, `attach`, `detach`, `devices`, `usage`) call
//! the controller client the lease verbs use (`crate::controller`) and the background
//! attachment `jmp attach -d` starts (`crate::state`); the device tools are the kinds' own
//! (`jmp_devices::registry::agent_tools`: `power`, `console_*`, `can_*`, `flash`, ...), run on
//! the host `jmp`'s verbs use ([`host`]), so this module names no kind. The client config and
//! its policy are the CLI's (`--client`, `JMP_CLIENT`, the current one): the controller refuses
//! an agent what it refuses the user.
//!
//! One board per session. What the session made is given back when it ends (the agent closed
//! stdin, or SIGTERM/SIGINT): the attachment it started is stopped, the leases it created are
//! released. A session killed outright leaves its lease to expire and its attachment to end
//! with it. Logging goes to stderr (stdout is the protocol's); every tool call is logged with
//! the agent's name, and the attachment carries it to the exporter (`--name`), whose log names
//! it for every channel and request.

mod board;
mod host;

use crate::cli::McpArgs;
use anyhow::{Context, Result};
use board::Session;
use host::{McpHost, Progress};
use jmp_devices::agent::{AgentTool, ToolReply, ToolSpec, MAX_REPLY};
use jmp_devices::kind::VerbError;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Map, Value};
use std::sync::Arc;
use tracing::{info, warn};

/// Runs the server until the agent closes stdin (or SIGTERM/SIGINT), then gives back what the
/// session made.
pub(crate) fn run(args: McpArgs) -> Result<()> {
    crate::runtime()?.block_on(async move {
        let server = Server::new(args);
        let session = server.session.clone();
        let running = server
            .serve(rmcp::transport::io::stdio())
            .await
            .context("the MCP handshake failed")?;
        let stop = jmp_transport::shutdown_signal("ending the MCP session");
        tokio::select! {
            r = running.waiting() => {
                if let Err(e) = r {
                    warn!("mcp: the session ended: {e}");
                }
            }
            _ = stop => {}
        }
        for problem in session.give_back().await {
            warn!("mcp: giving back: {problem}");
        }
        Ok(())
    })
}

/// A tool of the session ([`board`]) or of a kind.
enum Handler {
    Board(board::Tool),
    Kind(Box<dyn AgentTool>),
}

struct Entry {
    spec: ToolSpec,
    handler: Handler,
}

struct Server {
    session: Arc<Session>,
    tools: Arc<Vec<Entry>>,
}

impl Server {
    fn new(args: McpArgs) -> Server {
        let mut tools: Vec<Entry> = board::Tool::ALL
            .iter()
            .map(|t| Entry {
                spec: t.spec(),
                handler: Handler::Board(*t),
            })
            .collect();
        for t in jmp_devices::registry::agent_tools() {
            tools.push(Entry {
                spec: t.spec(),
                handler: Handler::Kind(t),
            });
        }
        Server {
            session: Arc::new(Session::new(args.client, args.name)),
            tools: Arc::new(tools),
        }
    }
}

/// The reply as MCP has it: text (bounded) and the same as structured content; a failure is a
/// tool error (`isError`) with the exit code the CLI would have exited with.
fn reply(r: Result<ToolReply, VerbError>) -> CallToolResult {
    match r {
        Ok(ToolReply { text, data }) => {
            let text = jmp_devices::agent::bounded(&text, MAX_REPLY, true);
            let mut res = CallToolResult::success(vec![ContentBlock::text(text)]);
            res.structured_content = Some(data);
            res
        }
        Err(e) => {
            let text = jmp_devices::agent::bounded(&e.message, MAX_REPLY, false);
            let mut res = CallToolResult::error(vec![ContentBlock::text(text.clone())]);
            res.structured_content = Some(serde_json::json!({"error": text, "exit_code": e.code}));
            res
        }
    }
}

/// Arguments as text for the log, bounded (a console_write's data can be long).
fn args_text(args: &Map<String, Value>) -> String {
    jmp_devices::agent::bounded(&Value::Object(args.clone()).to_string(), 200, true)
        .replace('\n', " ")
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("jmp", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "Boards of a hardware lab through jmp. Start with list_boards, then lease {selector} \
             (it attaches the board: its devices become local), then the device tools (power, \
             console_expect, console_write, console_read, can_send, can_recv, flash), and \
             release at the end. With `jmp local start` running, attach uses that board without \
             a lease."
                .into(),
        );
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let tools = self
            .tools
            .iter()
            .map(|e| {
                let schema = match &e.spec.input {
                    Value::Object(m) => m.clone(),
                    _ => Map::new(),
                };
                Tool::new(e.spec.name, e.spec.description, Arc::new(schema))
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let Some(entry) = self.tools.iter().find(|e| e.spec.name == request.name) else {
            return Err(McpError::invalid_params(
                format!(
                    "no tool {:?} (jmp mcp has: {})",
                    jmp_protocol::name::escape(&request.name),
                    self.tools
                        .iter()
                        .map(|e| e.spec.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
            ));
        };
        if let Some(peer) = context.peer.peer_info() {
            self.session.set_agent(&peer.client_info.name);
        }
        let args = request.arguments.unwrap_or_default();
        let agent = self.session.agent();
        info!(
            agent = %agent,
            changes_board = entry.spec.changes_board,
            "mcp: {} {}",
            entry.spec.name,
            args_text(&args)
        );
        let progress = context
            .meta
            .get_progress_token()
            .map(|token| Arc::new(Progress::new(context.peer.clone(), token)));
        let r = match &entry.handler {
            Handler::Board(t) => self.session.call(*t, args, progress.as_ref()).await,
            Handler::Kind(t) => {
                let host = McpHost::new(self.session.board().await, progress.as_deref());
                t.call(&host, args).await
            }
        };
        if let Err(e) = &r {
            info!(agent = %agent, "mcp: {} failed: {}", entry.spec.name, e.message);
        }
        Ok(reply(r).into())
    }
}
