//! `jmp serial` and `jmp power`: an operation on one device, sent where the board is. Through
//! the running attachment's control socket when there is one (it has the connection), else on a
//! one-shot connection of its own: direct mode with `--exporter HOST:PORT --token-file F`, or
//! the lease's token from the controller. Either way the command returns when the exporter
//! reports the result, and a failure exits with the code of the table.

use crate::attach::{Connector, Pin};
use crate::cli::{FlowArg, Format, OnOff, ParityArg, PowerCmd, SerialCmd, Target};
use crate::ctlsock::{self, Op, ReplyBody};
use crate::{exit, known, paths, print_out, resolve, runtime, state};
use anyhow::Result;
use jmp_devices::registry::{DeviceRequest, DeviceResponse};
use jmp_protocol::exit as code;
use jmp_protocol::kinds::{power, serial};
use jmp_protocol::{features, ErrorCode, Refusal};
use std::time::Duration;

pub(crate) fn serial_cmd(cmd: SerialCmd) -> Result<()> {
    let (device, target, req) = match cmd {
        SerialCmd::Break { device, ms, target } => {
            (device, target, serial::Request::Break { millis: ms })
        }
        SerialCmd::Set {
            device,
            baud,
            data_bits,
            parity,
            stop_bits,
            flow,
            target,
        } => (
            device,
            target,
            serial::Request::Set(serial::LineChange {
                baud,
                data_bits,
                parity: parity.map(|p| match p {
                    ParityArg::None => serial::Parity::None,
                    ParityArg::Odd => serial::Parity::Odd,
                    ParityArg::Even => serial::Parity::Even,
                }),
                stop_bits,
                flow: flow.map(|f| match f {
                    FlowArg::None => serial::FlowControl::None,
                    FlowArg::Xonxoff => serial::FlowControl::Software,
                    FlowArg::Rtscts => serial::FlowControl::Hardware,
                }),
            }),
        ),
        SerialCmd::Modem {
            device,
            dtr,
            rts,
            target,
        } => {
            let on = |v: Option<OnOff>| v.map(|v| matches!(v, OnOff::On));
            (
                device,
                target,
                serial::Request::Modem {
                    dtr: on(dtr),
                    rts: on(rts),
                },
            )
        }
        SerialCmd::Get { device, target } => (device, target, serial::Request::Get),
    };
    run(device, target, DeviceRequest::Serial(req))
}

pub(crate) fn power_cmd(cmd: PowerCmd) -> Result<()> {
    let (device, target, req) = match cmd {
        PowerCmd::On { device, target } => (device, target, power::Request::On),
        PowerCmd::Off { device, target } => (device, target, power::Request::Off),
        PowerCmd::Status { device, target } => (device, target, power::Request::Status),
        PowerCmd::Cycle {
            device,
            delay,
            target,
        } => {
            let off_ms = match delay {
                None => None,
                Some(d) => {
                    let d = humantime::parse_duration(d.trim())
                        .or_else(|_| d.trim().parse::<u64>().map(Duration::from_secs))
                        .map_err(|_| {
                            exit(
                                code::USAGE,
                                format!("--delay {d:?}: not a duration (examples: 500ms, 5s)"),
                            )
                        })?;
                    Some(
                        u32::try_from(d.as_millis())
                            .map_err(|_| exit(code::USAGE, format!("--delay {d:?} is too long")))?,
                    )
                }
            };
            (device, target, power::Request::Cycle { off_ms })
        }
    };
    run(device, target, DeviceRequest::Power(req))
}

/// The answer, printed as the user asked; a failure becomes the table's exit code.
fn finish(
    target: &Target,
    result: Result<(String, DeviceResponse, String), Refusal>,
) -> Result<()> {
    match result {
        Ok((device, response, message)) => {
            if target.output == Format::Json {
                let v =
                    serde_json::json!({"device": device, "response": response, "message": message});
                print_out(&format!("{v}\n"))
            } else {
                print_out(&format!("{}\n", jmp_protocol::name::escape(&message)))
            }
        }
        Err(r) => Err(exit(r.code.exit_code(), r.reason)),
    }
}

pub(crate) fn run(device: Option<String>, target: Target, req: DeviceRequest) -> Result<()> {
    if target.token_file.is_some() || target.token.is_some() {
        let r = direct(device, &target, &req)?;
        return finish(&target, r);
    }
    // A running attachment of that exporter (or the only one, or the lease's).
    let running = match (&target.exporter, &target.lease) {
        (Some(e), _) => state::find(Some(e)).ok(),
        (None, Some(l)) => state::all()
            .into_iter()
            .find(|s| s.ready.lease.as_deref() == Some(l)),
        (None, None) => state::find(None).ok(),
    };
    if let Some(st) = running {
        let reply = ctlsock::call(
            &st.socket,
            &ctlsock::Request {
                v: ctlsock::VERSION,
                op: Op::Device {
                    device,
                    request: req,
                },
            },
            // The attachment applies the request's own timeout; this only guards a hang.
            Duration::from_secs(1400),
        )
        .map_err(|e| exit(code::FAILURE, e))?;
        return match reply.body {
            ReplyBody::Done {
                device,
                response,
                message,
            } => finish(&target, Ok((device, response, message))),
            ReplyBody::Error {
                exit: x, message, ..
            } => Err(exit(x, message)),
            ReplyBody::Status(_) | ReplyBody::Channel { .. } | ReplyBody::Settled { .. } => {
                Err(exit(code::FAILURE, "unexpected reply from the attachment"))
            }
        };
    }
    if let Some(e) = &target.exporter {
        return Err(exit(
            code::USAGE,
            format!(
                "no attachment of exporter {e:?} is running; to reach it directly give --exporter HOST:PORT with --token-file"
            ),
        ));
    }
    finish(&target, by_lease(device, &target, &req))
}

/// One request on a one-shot connection (it does not take the board).
async fn one_shot(
    connector: Connector,
    device: Option<String>,
    req: &DeviceRequest,
) -> Result<(String, DeviceResponse, String), Refusal> {
    let (link, welcome, _) = connector.connect().await.map_err(|e| match e {
        crate::attach::AttachError::Refused { code, reason } => Refusal::new(code, reason),
        other => Refusal::new(ErrorCode::Internal, other.to_string()),
    })?;
    let device = ctlsock::pick(
        &welcome.exporter,
        welcome.devices.iter().map(|d| (d.name.as_str(), &d.kind)),
        device.as_deref(),
        &req.kind(),
    );
    let result = match device {
        Ok(device) => req
            .run(&link.handle, &device)
            .await
            .map(|(resp, msg)| (device, resp, msg)),
        Err(r) => Err(r),
    };
    link.handle.bye(ErrorCode::Ok, "done");
    connector.linger(&link).await;
    result
}

/// Direct mode. Usage errors (no address, an unreadable token file) are the outer error; what
/// the exporter answered is the inner result.
fn direct(
    device: Option<String>,
    target: &Target,
    req: &DeviceRequest,
) -> Result<Result<(String, DeviceResponse, String), Refusal>> {
    let (addr, pin, token) = direct_parts(target)?;
    let reach = Reach {
        addr,
        pin,
        token,
        relay: None,
    };
    Ok(one_shot_at(reach, device, req))
}

/// How to reach an exporter without an attachment: its address, pinned certificate and
/// token, and for one behind NAT the controller's relay.
pub(crate) struct Reach {
    pub addr: std::net::SocketAddr,
    pub pin: Pin,
    pub token: String,
    pub relay: Option<crate::attach::RelayRoute>,
}

impl Reach {
    pub(crate) fn connector(self, features: u64) -> Result<Connector, Refusal> {
        let mut c = Connector::new(
            self.addr,
            self.pin,
            paths::default_client_name(),
            self.token,
            features,
        )
        .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        c.relay = self.relay;
        Ok(c)
    }
}

fn one_shot_at(
    reach: Reach,
    device: Option<String>,
    req: &DeviceRequest,
) -> Result<(String, DeviceResponse, String), Refusal> {
    let rt = runtime().map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
    rt.block_on(async {
        let connector = reach.connector(features::CLIENT | features::ONE_SHOT)?;
        one_shot(connector, device, req).await
    })
}

fn by_lease(
    device: Option<String>,
    target: &Target,
    req: &DeviceRequest,
) -> Result<(String, DeviceResponse, String), Refusal> {
    let rt = runtime().map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
    let reach = rt.block_on(lease_access(target))?;
    drop(rt);
    one_shot_at(reach, device, req)
}

/// The exporter of the lease `target` names (or the caller's only lease): its address, its
/// pinned certificate and a lease token.
pub(crate) async fn lease_access(target: &Target) -> Result<Reach, Refusal> {
    let fail = |e: anyhow::Error| {
        let code = e.downcast_ref::<crate::Exit>().map(|x| x.code);
        Refusal::new(
            match code {
                Some(3) => ErrorCode::Unauthorized,
                Some(4) => ErrorCode::Busy,
                Some(5) => ErrorCode::NoSuchDevice,
                _ => ErrorCode::Internal,
            },
            format!("no attachment is running, and the controller: {e:#}"),
        )
    };
    let (cfg, _) = crate::ctl::load_client(target.client.client.as_deref()).map_err(fail)?;
    let ctl = crate::ctl::Ctl::connect(&cfg).await.map_err(fail)?;
    let access = crate::ctl::access(&ctl, target.lease.clone())
        .await
        .map_err(fail)?;
    ctl.close();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&access.address)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::Internal,
                format!("exporter address {:?} does not resolve", access.address),
            )
        })?;
    let fp = access
        .fingerprint
        .parse()
        .map_err(|e: String| Refusal::new(ErrorCode::Internal, e))?;
    // An exporter behind NAT is reached through the controller's relay, as by attach.
    let relay = access
        .relay
        .then(|| crate::verbs::relay_route(&cfg, crate::attach::Via::Auto));
    Ok(Reach {
        addr,
        pin: Pin::Fingerprint(fp),
        token: access.token,
        relay,
    })
}

/// The exporter `--exporter HOST:PORT` with `--token-file F` (or `--token`, `JMP_TOKEN`)
/// names (direct mode); what is missing or unreadable is a usage error.
fn direct_parts(target: &Target) -> Result<(std::net::SocketAddr, Pin, String)> {
    let exporter = target.exporter.as_ref().ok_or_else(|| {
        exit(
            code::USAGE,
            "--token-file (or JMP_TOKEN) needs --exporter HOST:PORT",
        )
    })?;
    let addr = resolve(exporter)?;
    let token = crate::direct_token(&target.token, &target.token_file)?
        .ok_or_else(|| exit(code::USAGE, "no token given"))?;
    let pin = match &target.fingerprint {
        Some(f) => Pin::Fingerprint(f.parse().map_err(|e: String| exit(code::USAGE, e))?),
        None => Pin::Tofu {
            file: known::file(),
            name: known::normalize(exporter),
        },
    };
    Ok((addr, pin, token))
}

/// [`direct_parts`] for callers that report a refusal (`jmp storage`).
pub(crate) fn direct_access(target: &Target) -> Result<Reach, Refusal> {
    let (addr, pin, token) =
        direct_parts(target).map_err(|e| Refusal::new(ErrorCode::Protocol, format!("{e:#}")))?;
    Ok(Reach {
        addr,
        pin,
        token,
        relay: None,
    })
}
