//! `jmp attach`: connect to an exporter, create the local devices, keep them working across
//! network blips, remove them on the way out.
//!
//! The local devices are created once, after the first Welcome, and live until the attachment
//! ends; connections come and go underneath them. The first connection's failure is final (a
//! typo'd address or a wrong token should fail fast); later losses are retried with backoff,
//! except refusals that a retry cannot fix (wrong token, board taken by someone else).

use crate::known;
use futures::stream::{FuturesUnordered, StreamExt};
use jmp_devices::serial::bridge::{parse_detail, SerialControl};
use jmp_devices::serial::SerialBridge;
use jmp_devices::tcp::TcpBridge;
use jmp_devices::{Bridge, BridgeExit};
use jmp_protocol::{features, ControlBody, ErrorCode, Hello, Welcome};
use jmp_transport::link::LinkError;
use jmp_transport::token::peek;
use jmp_transport::{client_endpoint, connect, ConnectError, Fingerprint, Link, LinkEvent};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub enum Pin {
    /// `--fingerprint`: exactly this certificate.
    Fingerprint(Fingerprint),
    /// Trust on first use, recorded in the known-exporters file under this name.
    Tofu { file: PathBuf, name: String },
}

/// Fetches a fresh token before a reconnect (controller mode: a lease token carries the lease's
/// end, which an extension moves). `None`: keep the one we have.
pub type TokenRefresh =
    Box<dyn Fn() -> futures::future::BoxFuture<'static, Option<String>> + Send + Sync>;

pub struct Options {
    pub addr: SocketAddr,
    pub token: String,
    pub token_refresh: Option<TokenRefresh>,
    pub pin: Pin,
    pub dev_dir: PathBuf,
    /// device name → local address for TCP forwards.
    pub forwards: HashMap<String, SocketAddr>,
    pub client: String,
    pub owner: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub name: String,
    pub kind: String,
    pub local: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    pub exporter: String,
    pub fingerprint: String,
    pub pid: u32,
    pub devices: Vec<DeviceRow>,
}

impl Ready {
    pub fn table(&self) -> String {
        let w0 = self.devices.iter().map(|d| d.name.len()).max().unwrap_or(0);
        let w1 = self.devices.iter().map(|d| d.kind.len()).max().unwrap_or(0);
        let mut s = String::new();
        for d in &self.devices {
            s.push_str(&format!("{:w0$}  {:w1$}  {}\n", d.name, d.kind, d.local));
        }
        s
    }
}

/// Why the attachment ended.
#[derive(Debug)]
pub enum Outcome {
    /// We were asked to stop (Ctrl-C, SIGTERM, `jmp detach`).
    Detached,
    /// The exporter ended it for good.
    Ended { code: ErrorCode, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("the exporter refused: {reason}")]
    Refused { code: ErrorCode, reason: String },
    #[error("{0}")]
    Other(String),
}

impl AttachError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AttachError::Refused { code, .. } => code.exit_code(),
            _ => 1,
        }
    }
}

/// A request from `jmp serial` (through the control socket).
pub struct ControlRequest {
    pub device: String,
    pub op: SerialOp,
    pub reply: oneshot::Sender<Result<String, String>>,
}

pub enum SerialOp {
    Break {
        millis: u32,
    },
    Set(Box<dyn FnOnce(jmp_protocol::LineSettings) -> jmp_protocol::LineSettings + Send>),
    Modem {
        dtr: Option<bool>,
        rts: Option<bool>,
    },
}

struct Session {
    opts: Options,
    endpoint: quinn::Endpoint,
    session_id: u64,
    token: std::sync::Mutex<String>,
}

impl Session {
    /// After the exporter ended the session for its lease: asks the controller (when attached
    /// by lease) for a fresh token. One that ends later than ours means the lease was extended
    /// and the exporter had not heard (it was cut off from the controller): keep it and
    /// reconnect. A lease that really ended yields no token, or none that ends later.
    async fn extended_token(&self) -> bool {
        let Some(fresh) = self.fresh_token().await else {
            return false;
        };
        let exp = |t: &str| peek(t).ok().and_then(|c| c.exp).unwrap_or(0);
        let Ok(mut cur) = self.token.lock() else {
            return false;
        };
        if exp(&fresh) > exp(&cur).max(jmp_transport::unix_now()) {
            *cur = fresh;
            return true;
        }
        false
    }

    /// A fresh token from the controller, when attached by lease and it answers within 3 s.
    async fn fresh_token(&self) -> Option<String> {
        let refresh = self.opts.token_refresh.as_ref()?;
        tokio::time::timeout(Duration::from_secs(3), refresh())
            .await
            .ok()
            .flatten()
    }

    async fn connect(&self) -> Result<(Link, Welcome, Fingerprint), AttachError> {
        let pin = match &self.opts.pin {
            Pin::Fingerprint(f) => Some(*f),
            Pin::Tofu { file, name } => known::lookup(file, name).map_err(AttachError::Other)?,
        };
        let (conn, fp) = connect(
            &self.endpoint,
            self.opts.addr,
            jmp_protocol::ALPN_EXPORTER,
            pin,
        )
        .await?;
        if let (Pin::Tofu { file, name }, None) = (&self.opts.pin, pin) {
            match known::record(file, name, fp) {
                Ok(()) => info!(
                    "trusting exporter {name} ({fp}) from now on; recorded in {}",
                    file.display()
                ),
                Err(e) => warn!(
                    "cannot record {name}'s fingerprint in {}: {e}",
                    file.display()
                ),
            }
        }
        let hello = Hello {
            features: features::ALL,
            client: self.opts.client.clone(),
            session: self.session_id,
            token: self.token.lock().map(|t| t.clone()).unwrap_or_default(),
        };
        match Link::client(conn, hello).await {
            Ok((link, welcome)) => Ok((link, welcome, fp)),
            Err(LinkError::Refused { code, reason }) => Err(AttachError::Refused { code, reason }),
            Err(e) => Err(AttachError::Other(e.to_string())),
        }
    }
}

/// Refusals a retry cannot fix.
fn is_final(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unauthorized | ErrorCode::Busy | ErrorCode::Replaced | ErrorCode::LeaseEnded
    )
}

/// Runs an attachment until `shutdown` or a final refusal. `on_ready` is called once the local
/// devices exist (it prints the table, writes state files).
pub async fn run(
    opts: Options,
    on_ready: impl FnOnce(&Ready) -> Result<(), String>,
    shutdown: impl Future<Output = ()>,
    mut controls: mpsc::Receiver<ControlRequest>,
) -> Result<Outcome, AttachError> {
    let endpoint = client_endpoint(opts.addr)
        .map_err(|e| AttachError::Other(format!("cannot open a UDP socket: {e}")))?;
    let mut id = [0u8; 8];
    rand::Rng::fill(&mut rand::thread_rng(), &mut id);
    let session = Session {
        token: std::sync::Mutex::new(opts.token.clone()),
        opts,
        endpoint,
        session_id: u64::from_le_bytes(id),
    };
    let (link, welcome, fp) = session.connect().await?;

    // Local devices, in the exporter's order.
    let mut bridges: Vec<Box<dyn Bridge>> = Vec::new();
    let mut serial_controls: HashMap<String, SerialControl> = HashMap::new();
    let mut rows = Vec::new();
    for d in &welcome.devices {
        let b: Box<dyn Bridge> = match d.kind.as_str() {
            "serial" => {
                let b = SerialBridge::create(
                    &d.name,
                    &welcome.exporter,
                    &session.opts.dev_dir,
                    session.opts.owner,
                    parse_detail(&d.detail),
                )
                .map_err(|e| {
                    AttachError::Other(format!(
                        "{}: cannot create the local serial device: {e}",
                        d.name
                    ))
                })?;
                serial_controls.insert(d.name.clone(), b.control());
                Box::new(b)
            }
            "tcp" => {
                let addr = session
                    .opts
                    .forwards
                    .get(&d.name)
                    .copied()
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
                Box::new(
                    TcpBridge::bind(d.name.clone(), addr)
                        .await
                        .map_err(|e| AttachError::Other(format!("{}: {e}", d.name)))?,
                )
            }
            other => {
                warn!(
                    "{}: device kind {other:?} is not supported by this jmp; skipping it",
                    d.name
                );
                continue;
            }
        };
        if d.detail.contains("unavailable") {
            warn!("{}: {}", d.name, d.detail);
        }
        rows.push(DeviceRow {
            name: d.name.clone(),
            kind: b.kind().to_string(),
            local: b.local(),
        });
        bridges.push(b);
    }
    for f in session.opts.forwards.keys() {
        if !welcome
            .devices
            .iter()
            .any(|d| &d.name == f && d.kind == "tcp")
        {
            return Err(AttachError::Other(format!(
                "--forward names {f:?}, which is not a TCP device of {}",
                welcome.exporter
            )));
        }
    }
    let ready = Ready {
        exporter: welcome.exporter.clone(),
        fingerprint: fp.to_string(),
        pid: std::process::id(),
        devices: rows,
    };
    on_ready(&ready).map_err(AttachError::Other)?;
    info!(exporter = %welcome.exporter, "attached");

    tokio::pin!(shutdown);
    let mut disabled = vec![false; bridges.len()];
    let mut current = Some((link, welcome));
    loop {
        // ---- connected ----
        let Some((mut link, welcome)) = current.take() else {
            unreachable!("the loop always reconnects before coming back here");
        };
        for b in bridges.iter_mut() {
            b.on_welcome(&welcome);
        }
        let ended: (ErrorCode, String) = {
            let handle = link.handle.clone();
            let mut runs: FuturesUnordered<_> = bridges
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| !disabled[*i])
                .map(|(i, b)| {
                    let h = &handle;
                    async move { (i, b.device().to_string(), b.run(h).await) }
                })
                .collect();
            loop {
                tokio::select! {
                    _ = &mut shutdown => {
                        link.handle.bye(ErrorCode::Ok, "client detached");
                        // Let the Bye leave before the endpoint goes.
                        drop(runs);
                        let _ = tokio::time::timeout(Duration::from_millis(300), link.handle.connection().closed()).await;
                        return Ok(Outcome::Detached);
                    }
                    ev = link.events.recv() => match ev {
                        Some(LinkEvent::Ended { code, reason, .. }) => break (code, reason),
                        Some(LinkEvent::Control(ControlBody::Notice(text))) => warn!("exporter: {text}"),
                        Some(_) => {}
                        None => break (ErrorCode::Internal, "the link task ended".into()),
                    },
                    Some((i, device, exit)) = runs.next(), if !runs.is_empty() => {
                        if let BridgeExit::Refused(r) = exit {
                            warn!("{device}: {} ({}); this device stays unavailable", r.reason, r.code);
                            disabled[i] = true;
                        }
                    }
                    Some(req) = controls.recv() => answer(req, &serial_controls),
                }
            }
        };
        let (code, reason) = ended;
        if is_final(code) {
            if !(code == ErrorCode::LeaseEnded && session.extended_token().await) {
                return Ok(Outcome::Ended { code, reason });
            }
            warn!("{reason} according to the exporter, but the controller has extended it; reconnecting");
        }
        warn!(
            "link to {} lost: {reason}; keeping the local devices and reconnecting",
            welcome.exporter
        );

        // ---- disconnected: reconnect with backoff while bridges idle ----
        let lost_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut idles: FuturesUnordered<_> = bridges.iter_mut().map(|b| b.idle()).collect();
        let reconnected = loop {
            let wait = backoff;
            let attempt = async {
                tokio::time::sleep(wait).await;
                if let Some(t) = session.fresh_token().await {
                    if let Ok(mut cur) = session.token.lock() {
                        *cur = t;
                    }
                }
                session.connect().await
            };
            tokio::pin!(attempt);
            let res = loop {
                tokio::select! {
                    _ = &mut shutdown => return Ok(Outcome::Detached),
                    r = &mut attempt => break r,
                    _ = idles.next(), if !idles.is_empty() => {}
                    Some(req) = controls.recv() => {
                        let _ = req.reply.send(Err("the link to the exporter is down; try again once it is back".into()));
                    }
                }
            };
            match res {
                Ok((l, w, _)) => break (l, w),
                Err(AttachError::Refused { code, reason }) if is_final(code) => {
                    return Ok(Outcome::Ended { code, reason });
                }
                Err(AttachError::Connect(e @ ConnectError::FingerprintMismatch { .. })) => {
                    return Err(AttachError::Connect(e));
                }
                Err(e) => {
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    info!(
                        "reconnect failed: {e}; next try in {:.1}s",
                        backoff.as_secs_f64()
                    );
                }
            }
        };
        drop(idles);
        info!(
            "reconnected to {} after {:.1}s",
            reconnected.1.exporter,
            lost_at.elapsed().as_secs_f64()
        );
        current = Some(reconnected);
    }
}

fn answer(req: ControlRequest, controls: &HashMap<String, SerialControl>) {
    let Some(c) = controls.get(&req.device) else {
        let mut have: Vec<&String> = controls.keys().collect();
        have.sort();
        let _ = req.reply.send(Err(format!(
            "no serial device {:?} in this attachment (serial devices: {})",
            req.device,
            have.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
        return;
    };
    let res = match req.op {
        SerialOp::Break { millis } => c
            .send(ControlBody::Break { millis })
            .map(|_| format!("{}: break of {millis} ms sent", req.device)),
        SerialOp::Set(f) => {
            let s = f(c.settings());
            c.send(ControlBody::LineSettings(s))
                .map(|_| format!("{}: line settings {s} sent", req.device))
        }
        SerialOp::Modem { dtr, rts } => c
            .send(ControlBody::ModemLines { dtr, rts })
            .map(|_| format!("{}: modem lines sent", req.device)),
    };
    let _ = req.reply.send(res);
}
