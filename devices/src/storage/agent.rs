//! Storage for coding agents: `flash {path, device?, bmap?, verify?}` is `jmp storage flash`
//! itself (the same verb code on the same host), its progress sent to the agent as it goes.

use super::verb::{flash_verb, FlashArgs};
use crate::agent::{parse, pick, AgentHost, AgentTool, Capture, ToolReply, ToolSpec};
use crate::kind::VerbError;
use crate::BoxFuture;
use jmp_protocol::Kind;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

pub fn tools() -> Vec<Box<dyn AgentTool>> {
    vec![Box::new(Flash)]
}

struct Flash;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: PathBuf,
    device: Option<String>,
    bmap: Option<PathBuf>,
    verify: Option<bool>,
}

impl AgentTool for Flash {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "flash",
            description: "Write an image file of this machine onto the board's storage, as `jmp \
                storage flash` does: raw, .gz, .xz, .zst or .bz2; with `bmap` only its mapped \
                ranges; flushed before it answers; `verify` compares checksums computed on the \
                exporter. Progress comes as progress notifications. The medium must be \
                writable (a card shared with the board usually needs the board off). The \
                device defaults to the board's first storage device.",
            input: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "the image file (absolute, or relative to where jmp mcp runs)"},
                    "device": {"type": "string", "description": "the storage device (default: the first)"},
                    "bmap": {"type": "string", "description": "bmaptool's block map of the image"},
                    "verify": {"type": "boolean"}
                },
                "required": ["path"],
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
            let a: Args = parse("flash", args)?;
            let target = host.target()?;
            let device = pick(host, &Kind::Storage, a.device.as_deref())?;
            let out = Capture::new(host.verbs());
            flash_verb(
                &out,
                &target,
                Some(device.clone()),
                FlashArgs {
                    img: a.path.clone(),
                    bmap: a.bmap,
                    verify: a.verify.unwrap_or(false),
                    compress: true,
                },
            )
            .await?;
            let text = out.take();
            Ok(ToolReply {
                data: json!({"device": device, "image": a.path, "report": text}),
                text,
            })
        })
    }
}
