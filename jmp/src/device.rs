//! The kinds' verbs (`jmp power`, `jmp serial`, `jmp storage`, defined by each kind in
//! jmp-devices): what `jmp` lends them ([`Host`], a `VerbHost`) to reach the board their
//! target names. Through the running attachment's control socket when there is one (it has the
//! connection), else on a connection of their own: direct mode with `--exporter HOST:PORT
//! --token-file F`, or the lease's token from the controller. A request on an own connection
//! is *one-shot* (`features::ONE_SHOT`: it never takes the board); a channel on one holds the
//! board while the verb runs. Either way the command returns when the exporter reports the
//! result, and a failure exits with the code of the table.

use crate::attach::{Connector, Pin};
use crate::ctlsock::{self, Op, ReplyBody};
use crate::{exit, known, paths, print_out, resolve, runtime, state};
use anyhow::Result;
use jmp_devices::kind::{
    BoxFuture, ChannelOrigin, Target, VerbChannel, VerbError, VerbHost, VerbStream,
};
use jmp_devices::registry::{DeviceRequest, DeviceResponse, Verbs};
use jmp_protocol::exit as code;
use jmp_protocol::{features, ErrorCode, Kind};
use jmp_transport::Channels;
use std::time::Duration;

/// Runs a kind's verb to its end; its failure becomes the table's exit code.
pub(crate) fn run_verb(verb: Verbs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(verb.run(&Host))
        .map_err(|e| exit(e.code, e.message))
}

/// What `jmp` lends a verb (also `jmp mcp`'s tools, through `crate::mcp`).
pub(crate) struct Host;

fn fail(message: impl Into<String>) -> VerbError {
    VerbError::new(code::FAILURE, message)
}

/// An `anyhow` error of `jmp`'s own (its exit code, when it carries one) as a verb's.
fn from_anyhow(e: anyhow::Error) -> VerbError {
    let code = e
        .downcast_ref::<crate::Exit>()
        .map_or(code::FAILURE, |x| x.code);
    VerbError::new(code, format!("{e:#}"))
}

/// The running attachment `target` names (by exporter, by lease, or the only one), if any.
/// An exporter named without a token must be a running attachment's.
fn running(target: &Target) -> Result<Option<state::StateFile>, VerbError> {
    running_as(target, true)
}

/// [`running`] without saying which board it picked when none was named (the console's
/// devices key: the console said so when it started, and its terminal is raw now).
fn running_quietly(target: &Target) -> Result<Option<state::StateFile>, VerbError> {
    running_as(target, false)
}

fn running_as(target: &Target, say: bool) -> Result<Option<state::StateFile>, VerbError> {
    if target.token_file.is_some() || target.token.is_some() {
        return Ok(None);
    }
    let found = match (&target.exporter, &target.lease) {
        (Some(e), _) => state::find(Some(e)).ok(),
        // The caller's own attachment of that lease: a lease shared with a colleague may be
        // attached on this machine by its holder too, and the colleague's command must go
        // under its own credential (its own connection), never through the holder's.
        (None, Some(l)) => {
            let caller = state::Owner::caller();
            state::all()
                .into_iter()
                .find(|s| s.ready.lease.as_deref() == Some(l) && s.is_callers(&caller))
        }
        (None, None) => {
            // The caller's own only: another user's, client config's or job's never counts,
            // even as the only one running (then the caller's lease is asked for instead).
            let caller = state::Owner::caller();
            let mut all = state::all();
            let others = state::others_of(&all, &caller);
            all.retain(|s| s.is_callers(&caller));
            if all.is_empty() && !others.is_empty() && say {
                tracing::info!("not using the attachments of others ({others}); asking the controller for your lease");
            }
            if all.len() > 1 {
                // Not "the only one", and not the controller's lease either: the user means one
                // of these (saying "no attachment is running" here would be false).
                return Err(VerbError::new(
                    code::USAGE,
                    format!(
                        "several attachments are running ({}); name one with --exporter NAME",
                        all.iter()
                            .map(|s| s.ready.exporter.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let found = all.into_iter().next();
            if let Some(st) = found.as_ref().filter(|_| say) {
                // Said, since nothing was named: which board this acts on.
                eprintln!(
                    "jmp: {} (your attachment{})",
                    jmp_protocol::name::escape(&st.ready.exporter),
                    st.ready
                        .lease
                        .as_deref()
                        .map(|l| format!(", lease {l}"))
                        .unwrap_or_default()
                );
            }
            found
        }
    };
    if found.is_none() {
        if let Some(e) = &target.exporter {
            return Err(VerbError::new(
                code::USAGE,
                format!(
                    "no attachment of exporter {e:?} is running; to reach it directly give --exporter HOST:PORT with --token-file"
                ),
            ));
        }
    }
    Ok(found)
}

impl VerbHost for Host {
    fn request<'a>(
        &'a self,
        target: &'a Target,
        device: Option<String>,
        req: DeviceRequest,
    ) -> BoxFuture<'a, Result<(String, DeviceResponse, String), VerbError>> {
        Box::pin(async move {
            if let Some(st) = running(target)? {
                return via_attachment(&st, device, req).await;
            }
            let reach = reach(target).await?;
            let connector = reach.connector(features::CLIENT | features::ONE_SHOT)?;
            one_shot(connector, device, &req).await
        })
    }

    fn channel_with<'a>(
        &'a self,
        target: &'a Target,
        kind: Kind,
        device: Option<String>,
        params: bytes::Bytes,
    ) -> BoxFuture<'a, Result<VerbChannel, VerbError>> {
        Box::pin(async move {
            if let Some(st) = running(target)? {
                return channel_via_attachment(&st, kind, device, &params).await;
            }
            own_channel(target, kind, device, params).await
        })
    }

    fn settle<'a>(
        &'a self,
        ch: &'a ChannelOrigin,
        generation: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(settle_local_caches(ch, generation))
    }

    fn print(&self, text: &str) -> Result<(), VerbError> {
        print_out(text).map_err(from_anyhow)
    }

    fn local_devices<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<String, VerbError>> {
        Box::pin(async move {
            match running_quietly(target)? {
                Some(st) => Ok(tokio::task::spawn_blocking(move || {
                    state::live_text(&state::live(&st))
                })
                .await
                .map_err(|e| fail(e.to_string()))?),
                None => Err(VerbError::new(
                    code::UNAVAILABLE,
                    "no attachment of this board runs here, so its devices have no local endpoints (jmp attach makes them)",
                )),
            }
        })
    }
}

/// A request through the running attachment's control socket.
async fn via_attachment(
    st: &state::StateFile,
    device: Option<String>,
    request: DeviceRequest,
) -> Result<(String, DeviceResponse, String), VerbError> {
    let req = ctlsock::Request {
        v: ctlsock::VERSION,
        op: Op::Device { device, request },
    };
    let socket = st.socket.clone();
    // The attachment applies the request's own timeout; this only guards a hang.
    let reply = tokio::task::spawn_blocking(move || {
        ctlsock::call(&socket, &req, Duration::from_secs(1400))
    })
    .await
    .map_err(|e| fail(e.to_string()))?
    .map_err(fail)?;
    match reply.body {
        ReplyBody::Done {
            device,
            response,
            message,
        } => Ok((device, response, message)),
        ReplyBody::Error {
            exit: x, message, ..
        } => Err(VerbError::new(x, message)),
        ReplyBody::Status(_) | ReplyBody::Channel { .. } | ReplyBody::Settled { .. } => {
            Err(fail("unexpected reply from the attachment"))
        }
    }
}

/// One request on a one-shot connection (it does not take the board).
async fn one_shot(
    connector: Connector,
    device: Option<String>,
    req: &DeviceRequest,
) -> Result<(String, DeviceResponse, String), VerbError> {
    let (link, welcome, _) = connector.connect().await.map_err(connect_error)?;
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
            .map(|(resp, msg)| (device, resp, msg))
            .map_err(VerbError::from),
        Err(r) => Err(r.into()),
    };
    link.handle.bye(ErrorCode::Ok, "done");
    connector.linger(&link).await;
    result
}

fn connect_error(e: crate::attach::AttachError) -> VerbError {
    match e {
        crate::attach::AttachError::Refused { code, reason } => {
            // Direct mode's refusals ("<exporter>: " and what the exporter's shared-token check
            // says) get the hint of where the token goes; a lease token's refusals say more.
            let hint = if reason.ends_with(": invalid token")
                || reason.ends_with(": no token presented")
            {
                crate::direct_token_hint(&crate::attach::AttachError::Refused {
                    code,
                    reason: reason.clone(),
                })
            } else {
                String::new()
            };
            VerbError::new(code.exit_code(), format!("{reason}{hint}"))
        }
        other => fail(other.to_string()),
    }
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
    pub(crate) fn connector(self, features: u64) -> Result<Connector, VerbError> {
        let mut c = Connector::new(
            self.addr,
            self.pin,
            paths::default_client_name(),
            self.token,
            features,
        )
        .map_err(|e| fail(e.to_string()))?;
        c.relay = self.relay;
        Ok(c)
    }
}

/// The exporter `target` names directly (a token given), else its lease's.
async fn reach(target: &Target) -> Result<Reach, VerbError> {
    if target.token_file.is_some() || target.token.is_some() {
        direct_reach(target).map_err(from_anyhow)
    } else {
        lease_reach(target).await
    }
}

/// The exporter of the lease `target` names (or the caller's only lease): its address, its
/// pinned certificate and a lease token. The controller's refusals keep their exit codes.
async fn lease_reach(target: &Target) -> Result<Reach, VerbError> {
    let fail_ctl = |e: anyhow::Error| {
        let mut v = from_anyhow(e);
        v.message = format!(
            "no attachment is running, and the controller: {}",
            v.message
        );
        v
    };
    let (cfg, _) = crate::controller::load_client(target.client.as_deref()).map_err(fail_ctl)?;
    let ctl = crate::controller::Ctl::connect(&cfg)
        .await
        .map_err(fail_ctl)?;
    let access = crate::controller::access(&ctl, target.lease.clone())
        .await
        .map_err(fail_ctl)?;
    ctl.close();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&access.address)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            fail(format!(
                "exporter address {:?} does not resolve",
                access.address
            ))
        })?;
    let fp = access.fingerprint.parse().map_err(fail)?;
    // An exporter behind NAT is reached through the controller's relay, as by attach (and
    // `--via relay` asks for the relay even when the exporter did not say it takes it: the
    // controller's answer is then the error to show).
    use jmp_devices::kind::ViaChoice;
    let via = match target.via {
        ViaChoice::Auto => crate::attach::Via::Auto,
        ViaChoice::Direct => crate::attach::Via::Direct,
        ViaChoice::Relay => crate::attach::Via::Relay,
    };
    let relay = (access.relay || target.via == ViaChoice::Relay)
        .then(|| crate::verbs::relay_route(&cfg, via));
    Ok(Reach {
        addr,
        pin: Pin::Fingerprint(fp),
        token: access.token,
        relay,
    })
}

/// The exporter `--exporter HOST:PORT` with `--token-file F` (or `--token`, `JMP_TOKEN`)
/// names (direct mode); what is missing or unreadable is a usage error.
fn direct_reach(target: &Target) -> Result<Reach> {
    let exporter = target.exporter.as_ref().ok_or_else(|| {
        exit(
            code::USAGE,
            "--token/JMP_TOKEN and --token-file/JMP_TOKEN_FILE need --exporter HOST:PORT",
        )
    })?;
    let addr = resolve(exporter)?;
    let token = crate::direct_token(&target.token, &target.token_file)?.ok_or_else(|| {
        exit(
            code::USAGE,
            format!("no token given: {}", crate::DIRECT_TOKEN_WAYS),
        )
    })?;
    let pin = match &target.fingerprint {
        Some(f) => Pin::Fingerprint(f.parse().map_err(|e: String| exit(code::USAGE, e))?),
        None => Pin::Tofu {
            file: known::file(),
            name: known::normalize(exporter),
        },
    };
    Ok(Reach {
        addr,
        pin,
        token,
        relay: None,
    })
}

/// A stream channel relayed by the running attachment's control socket.
async fn channel_via_attachment(
    st: &state::StateFile,
    kind: Kind,
    device: Option<String>,
    params: &[u8],
) -> Result<VerbChannel, VerbError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::UnixStream::connect(&st.socket)
        .await
        .map_err(|e| {
            fail(format!(
                "cannot reach the attachment at {}: {e}",
                st.socket.display()
            ))
        })?;
    let req = ctlsock::Request {
        v: ctlsock::VERSION,
        op: Op::Channel {
            device,
            kind,
            params: hex::encode(params),
        },
    };
    let mut line = serde_json::to_string(&req).map_err(|e| fail(e.to_string()))?;
    line.push('\n');
    sock.write_all(line.as_bytes())
        .await
        .map_err(|e| fail(e.to_string()))?;
    // Byte by byte up to the newline: what follows it is the channel's.
    let mut reply = Vec::new();
    loop {
        let b = sock
            .read_u8()
            .await
            .map_err(|e| fail(format!("the attachment closed the socket: {e}")))?;
        if b == b'\n' || reply.len() > 64 * 1024 {
            break;
        }
        reply.push(b);
    }
    let reply: ctlsock::Reply = serde_json::from_slice(&reply)
        .map_err(|e| fail(format!("bad reply from the attachment: {e}")))?;
    let (device, params, instance) = match reply.body {
        ReplyBody::Channel {
            device,
            params,
            instance,
        } => (device, params, instance),
        ReplyBody::Error {
            exit: x, message, ..
        } => return Err(VerbError::new(x, message)),
        _ => return Err(fail("unexpected reply from the attachment")),
    };
    let params =
        hex::decode(&params).map_err(|_| fail("bad channel parameters from the attachment"))?;
    let (r, w) = sock.into_split();
    Ok(VerbChannel {
        origin: ChannelOrigin {
            device,
            exporter: st.ready.exporter.clone(),
            fingerprint: st.ready.fingerprint.clone(),
            instance,
        },
        params: params.into(),
        stream: VerbStream::Socket(w, r),
        close: None,
    })
}

/// A stream channel on a connection of the verb's own (it holds the board while it runs).
async fn own_channel(
    target: &Target,
    kind: Kind,
    device: Option<String>,
    params: bytes::Bytes,
) -> Result<VerbChannel, VerbError> {
    let connector = reach(target).await?.connector(features::CLIENT)?;
    let (link, welcome, fingerprint) = connector.connect().await.map_err(connect_error)?;
    let device = ctlsock::pick(
        &welcome.exporter,
        welcome.devices.iter().map(|d| (d.name.as_str(), &d.kind)),
        device.as_deref(),
        &kind,
    )?;
    let (pipe, params) = link.handle.open_stream(&device, params).await?;
    let (tx, rx) = pipe.split();
    let origin = ChannelOrigin {
        device,
        exporter: welcome.exporter.clone(),
        fingerprint: fingerprint.to_string(),
        instance: Some(welcome.instance),
    };
    Ok(VerbChannel {
        origin,
        params,
        stream: VerbStream::Pipe(tx, rx),
        close: Some(Box::new(move || {
            Box::pin(async move {
                link.handle.bye(ErrorCode::Ok, "done");
                connector.linger(&link).await;
            })
        })),
    })
}

/// Asks every attachment of this user that has the device `ch` reached (same exporter name
/// and fingerprint) to settle its local cache of it to `generation`; returns once each has,
/// or says which one could not (within the control socket's `SETTLE_WAIT`). An attachment
/// whose bridge of the device caches nothing answers at once.
async fn settle_local_caches(ch: &ChannelOrigin, generation: u64) -> Result<(), String> {
    let holding: Vec<state::StateFile> = state::all()
        .into_iter()
        .filter(|s| {
            s.ready.exporter == ch.exporter
                && s.ready.fingerprint == ch.fingerprint
                && s.ready.devices.iter().any(|d| d.name == ch.device)
        })
        .collect();
    // One at a time: there is one attachment per exporter and user, so this is one wait.
    for st in holding {
        let req = ctlsock::Request {
            v: ctlsock::VERSION,
            op: Op::Settle {
                device: ch.device.clone(),
                generation,
                instance: ch.instance,
            },
        };
        let socket = st.socket.clone();
        // Past the attachment's own wait: its answer (or its timeout error) comes first.
        let guard = ctlsock::SETTLE_WAIT + Duration::from_secs(5);
        let reply = tokio::task::spawn_blocking(move || ctlsock::call(&socket, &req, guard))
            .await
            .map_err(|e| e.to_string())?;
        let who = format!("the attachment of {} (pid {})", ch.exporter, st.ready.pid);
        match reply.map(|r| r.body) {
            Ok(ReplyBody::Settled { .. }) => {}
            Ok(ReplyBody::Error { message, code, .. })
                if code == ErrorCode::Protocol.as_str() && message.contains("settle") =>
            {
                // An attachment older than `settle`: it drops its cache when the change
                // reaches it, which nothing here can wait for.
                tracing::warn!(
                    "{who} is older than this jmp and cannot confirm that its mount dropped its cache; a read through it right now may show the old data"
                );
            }
            Ok(ReplyBody::Error { message, .. }) => return Err(format!("{who}: {message}")),
            Ok(_) => return Err(format!("{who} answered `settle` with something else")),
            Err(e) => return Err(format!("{who} could not be asked to drop its cache: {e}")),
        }
    }
    Ok(())
}
