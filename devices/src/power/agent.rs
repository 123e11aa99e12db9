//! The power switch for coding agents: `power {action: on|off|cycle|status, device?,
//! delay?}`, the request `jmp power` sends, through the same host.

use crate::agent::{parse, pick, AgentHost, AgentTool, ToolReply, ToolSpec};
use crate::kind::VerbError;
use crate::registry::{DeviceRequest, DeviceResponse};
use crate::BoxFuture;
use jmp_protocol::kinds::power::Request;
use jmp_protocol::{exit as code, Kind};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub fn tools() -> Vec<Box<dyn AgentTool>> {
    vec![Box::new(PowerTool)]
}

struct PowerTool;

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    On,
    Off,
    Cycle,
    Status,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    action: Action,
    device: Option<String>,
    /// Seconds to stay off in a cycle (default: the exporter's cycleDelay).
    delay: Option<f64>,
}

impl AgentTool for PowerTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "power",
            description: "Switch the board's power: on, off, cycle (off, wait, on) or status. \
                Answers with the power state afterwards. The device defaults to the board's \
                first power switch.",
            input: json!({
                "type": "object",
                "properties": {
                    "action": {"type": "string", "enum": ["on", "off", "cycle", "status"]},
                    "device": {"type": "string", "description": "the power device (default: the first)"},
                    "delay": {"type": "number", "minimum": 0, "maximum": 600,
                              "description": "cycle: seconds to stay off (default: the exporter's)"}
                },
                "required": ["action"],
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
            let a: Args = parse("power", args)?;
            let req = match a.action {
                Action::On => Request::On,
                Action::Off => Request::Off,
                Action::Status => Request::Status,
                Action::Cycle => {
                    let off_ms = match a.delay {
                        None => None,
                        Some(d) if d.is_finite() && (0.0..=600.0).contains(&d) => {
                            Some((d * 1000.0).round() as u32)
                        }
                        Some(d) => {
                            return Err(VerbError::new(
                                code::USAGE,
                                format!("power: delay {d}: expected 0 to 600 seconds"),
                            ))
                        }
                    };
                    Request::Cycle { off_ms }
                }
            };
            let target = host.target()?;
            let device = pick(host, &Kind::Power, a.device.as_deref())?;
            let (device, resp, message) = host
                .verbs()
                .request(&target, Some(device), DeviceRequest::Power(req))
                .await?;
            let state = match &resp {
                DeviceResponse::Power(r) => json!({"state": r.state.to_string(), "readable": r.readable}),
                other => json!(other),
            };
            Ok(ToolReply {
                text: message,
                data: json!({"device": device, "power": state}),
            })
        })
    }
}
