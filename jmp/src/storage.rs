//! `jmp storage flash|dump|info`. `info` is a device request like `jmp power`. Flash and dump
//! move data, so they need a channel: through the running attachment's control socket (its
//! `channel` op relays one over the attachment's connection), else on a connection of their
//! own (direct mode with `--exporter HOST:PORT --token-file F`, or the lease's token from the
//! controller), which holds the board for the duration. The flashing itself is
//! `jmp_devices::storage::flash`; this module picks the connection, shows progress (a bar
//! with rate and ETA on a terminal, a line per 10% otherwise) and maps failures to exit codes.
//!
//! **What a successful flash promises.** When `jmp storage flash` exits 0, every mount of the
//! device served by a `jmp attach` of this user (the attachments `jmp status` lists, of the
//! same exporter: name and fingerprint) has dropped its cache of what was written, so a read
//! through it right after sees the new bytes. How: the exporter moves the device's generation
//! after the flash's last write (at its flush) and sends the change on the flash's channel
//! before the flush's answer, so the flash knows that generation when it is flushed; then it
//! asks each such attachment to `settle` the device to it (the control socket waits until the
//! mount has dropped its cache at that generation, see `ctlsock`), and fails if one cannot
//! within 10 s. A `jmp-mount` of its own drops its cache when the change reaches it, with no
//! such wait.

use crate::attach::Connector;
use crate::cli::{StorageCmd, Target};
use crate::ctlsock::{self, Op, ReplyBody};
use crate::device::{direct_access, lease_access};
use crate::{exit, print_out, runtime, state};
use anyhow::Result;
use jmp_devices::registry::DeviceRequest;
use jmp_devices::storage::client::{self, Client, Retry, StreamRx, StreamTx};
use jmp_devices::storage::flash::{self, Progress};
use jmp_devices::storage::image;
use jmp_protocol::codec::Codec;
use jmp_protocol::exit as code;
use jmp_protocol::kinds::storage::{self as wire, DeviceParams, StorageError};
use jmp_protocol::{features, ErrorCode, Kind, Refusal};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub(crate) fn storage_cmd(cmd: StorageCmd) -> Result<()> {
    match cmd {
        StorageCmd::Info { device, target } => crate::device::run(
            device,
            target,
            DeviceRequest::Storage(wire::DeviceRequest::Info),
        ),
        StorageCmd::Flash {
            args,
            bmap,
            verify,
            no_compress,
            target,
        } => {
            let (device, img) = split(args);
            flash_cmd(
                device,
                PathBuf::from(img),
                bmap,
                verify,
                !no_compress,
                target,
            )
        }
        StorageCmd::Dump { args, target } => {
            let (device, out) = split(args);
            dump_cmd(device, PathBuf::from(out), target)
        }
    }
}

fn split(mut args: Vec<String>) -> (Option<String>, String) {
    let last = args.pop().unwrap_or_default();
    (args.pop(), last)
}

/// A channel to the device, served by a client in a task; the connection it lives on (own
/// connections only) is kept alive with it.
struct Opened {
    client: Client,
    params: DeviceParams,
    device: String,
    /// Whose device it is: the exporter's name and fingerprint (as attachments list them),
    /// and the exporter instance when known.
    exporter: String,
    fingerprint: String,
    instance: Option<u64>,
    serve: tokio::task::JoinHandle<()>,
    link: Option<(jmp_transport::Link, Connector)>,
}

impl Opened {
    async fn close(self) {
        self.serve.abort();
        if let Some((link, connector)) = self.link {
            link.handle.bye(ErrorCode::Ok, "done");
            connector.linger(&link).await;
        }
    }
}

fn refused(r: Refusal) -> anyhow::Error {
    exit(r.code.exit_code(), r.reason)
}

/// Through the running attachment of the target, if there is one.
async fn via_attachment(target: &Target, device: Option<String>) -> Result<Option<Opened>> {
    if target.token_file.is_some() || target.token.is_some() {
        return Ok(None);
    }
    let running = match (&target.exporter, &target.lease) {
        (Some(e), _) => state::find(Some(e)).ok(),
        (None, Some(l)) => state::all()
            .into_iter()
            .find(|s| s.ready.lease.as_deref() == Some(l)),
        (None, None) => state::find(None).ok(),
    };
    let Some(st) = running else {
        if let Some(e) = &target.exporter {
            return Err(exit(
                code::USAGE,
                format!("no attachment of exporter {e:?} is running; to reach it directly give --exporter HOST:PORT with --token-file"),
            ));
        }
        return Ok(None);
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::UnixStream::connect(&st.socket)
        .await
        .map_err(|e| {
            exit(
                code::FAILURE,
                format!(
                    "cannot reach the attachment at {}: {e}",
                    st.socket.display()
                ),
            )
        })?;
    let req = ctlsock::Request {
        v: ctlsock::VERSION,
        op: Op::Channel {
            device,
            kind: Kind::Storage,
            params: String::new(),
        },
    };
    let mut line = serde_json::to_string(&req)?;
    line.push('\n');
    sock.write_all(line.as_bytes()).await?;
    // Byte by byte up to the newline: what follows it is the channel's.
    let mut reply = Vec::new();
    loop {
        let b = sock.read_u8().await.map_err(|e| {
            exit(
                code::FAILURE,
                format!("the attachment closed the socket: {e}"),
            )
        })?;
        if b == b'\n' || reply.len() > 64 * 1024 {
            break;
        }
        reply.push(b);
    }
    let reply: ctlsock::Reply = serde_json::from_slice(&reply)
        .map_err(|e| exit(code::FAILURE, format!("bad reply from the attachment: {e}")))?;
    let (device, params, instance) = match reply.body {
        ReplyBody::Channel {
            device,
            params,
            instance,
        } => (device, params, instance),
        ReplyBody::Error {
            exit: x, message, ..
        } => return Err(exit(x, message)),
        _ => return Err(exit(code::FAILURE, "unexpected reply from the attachment")),
    };
    let params = hex::decode(&params)
        .ok()
        .and_then(|b| DeviceParams::decode_exact(&b).ok())
        .ok_or_else(|| exit(code::FAILURE, "bad storage parameters from the attachment"))?;
    let (r, w) = sock.into_split();
    let client = Client::new(&device, Retry::Fail);
    client.set_params(params);
    let c = client.clone();
    let serve = tokio::spawn(async move {
        let _ = c.serve(StreamTx(w), StreamRx(r)).await;
    });
    Ok(Some(Opened {
        client,
        params,
        device,
        exporter: st.ready.exporter.clone(),
        fingerprint: st.ready.fingerprint.clone(),
        instance,
        serve,
        link: None,
    }))
}

/// On a connection of its own (it holds the board while it runs).
async fn own_connection(target: &Target, device: Option<String>) -> Result<Opened> {
    let reach = if target.token_file.is_some() || target.token.is_some() {
        direct_access(target).map_err(refused)?
    } else {
        lease_access(target).await.map_err(refused)?
    };
    let connector = reach.connector(features::CLIENT).map_err(refused)?;
    let (link, welcome, fingerprint) = connector.connect().await.map_err(|e| match e {
        crate::attach::AttachError::Refused { code, reason } => exit(code.exit_code(), reason),
        other => exit(code::FAILURE, other.to_string()),
    })?;
    let device = ctlsock::pick(
        &welcome.exporter,
        welcome.devices.iter().map(|d| (d.name.as_str(), &d.kind)),
        device.as_deref(),
        &Kind::Storage,
    )
    .map_err(refused)?;
    let (tx, rx, params) = client::open(&link.handle, &device).await.map_err(refused)?;
    let client = Client::new(&device, Retry::Fail);
    client.set_params(params);
    let c = client.clone();
    let serve = tokio::spawn(async move {
        let _ = c.serve(tx, rx).await;
    });
    Ok(Opened {
        client,
        params,
        device,
        exporter: welcome.exporter.clone(),
        fingerprint: fingerprint.to_string(),
        instance: Some(welcome.instance),
        serve,
        link: Some((link, connector)),
    })
}

async fn open(target: &Target, device: Option<String>) -> Result<Opened> {
    match via_attachment(target, device.clone()).await? {
        Some(o) => Ok(o),
        None => own_connection(target, device).await,
    }
}

/// Progress for people: a bar on a terminal, else a line per 10%.
struct Shown {
    bar: Option<indicatif::ProgressBar>,
    what: &'static str,
    last_tenth: u64,
    start: Instant,
}

impl Shown {
    fn new(what: &'static str, total: Option<u64>) -> Shown {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what);
            b
        });
        Shown {
            bar,
            what,
            last_tenth: 0,
            start: Instant::now(),
        }
    }

    fn update(&mut self, p: &Progress) {
        if let Some(b) = &self.bar {
            if let Some(t) = p.total {
                b.set_length(t);
            }
            b.set_position(p.done);
            return;
        }
        let Some(total) = p.total.filter(|t| *t > 0) else {
            return;
        };
        let tenth = (p.done.min(total) * 10 / total).min(10);
        if tenth > self.last_tenth {
            self.last_tenth = tenth;
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "jmp: {} {}% ({} of {} MiB, {:.0} MiB/s)",
                self.what,
                tenth * 10,
                p.done >> 20,
                total >> 20,
                p.done as f64 / secs / 1048576.0
            );
        }
    }

    fn done(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// Ctrl-C stops the operation cleanly (what was written is reported), not the process.
fn stop_on_interrupt() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            s.store(true, Ordering::Relaxed);
        }
    });
    stop
}

fn flash_cmd(
    device: Option<String>,
    img: PathBuf,
    bmap: Option<PathBuf>,
    verify: bool,
    compress: bool,
    target: Target,
) -> Result<()> {
    let bad_file = |p: &Path, e: String| exit(code::USAGE, format!("{}: {e}", p.display()));
    let bmap = match &bmap {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| bad_file(p, e.to_string()))?;
            Some(
                image::parse_bmap(&text)
                    .map_err(|e| bad_file(p, format!("not a usable bmap: {e}")))?,
            )
        }
        None => None,
    };
    let image = image::open(&img).map_err(|e| bad_file(&img, e.to_string()))?;
    let format = image.format;
    let rt = runtime()?;
    rt.block_on(async move {
        let opened = open(&target, device).await?;
        let stop = stop_on_interrupt();
        let total = image.size.or(bmap.as_ref().map(|b| b.image_size));
        let mut shown = Shown::new("flashing", total);
        let started = Instant::now();
        let r = flash::flash(
            &opened.client,
            opened.params,
            image,
            flash::Options {
                bmap,
                verify,
                compress,
            },
            stop,
            |p| shown.update(p),
        )
        .await;
        shown.done();
        let device = opened.device.clone();
        // The generation the flush made (its change came before the flush's answer).
        let generation = opened.client.params().map(|p| p.generation);
        let whose = (
            opened.exporter.clone(),
            opened.fingerprint.clone(),
            opened.instance,
        );
        opened.close().await;
        if let (Ok(_), Some(g)) = (&r, generation) {
            settle_local_mounts(&whose.0, &whose.1, &device, whose.2, g)
                .await
                .map_err(|e| {
                    exit(
                        ErrorCode::Timeout.exit_code(),
                        format!("{device}: flashed {} and flushed, but {e}", img.display()),
                    )
                })?;
        }
        match r {
            Ok(rep) => {
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                print_out(&format!(
                    "{device}: flashed {} ({}, {} MiB): {} MiB written, {} MiB zeroed, {} MiB left out by the bmap, {} MiB on the link, {:.1}s ({:.0} MiB/s){}; flushed\n",
                    img.display(),
                    format.as_str(),
                    rep.image >> 20,
                    rep.written >> 20,
                    rep.zeroed >> 20,
                    rep.skipped >> 20,
                    rep.wire >> 20,
                    secs,
                    rep.image as f64 / secs / 1048576.0,
                    if rep.verified { "; verified on the exporter" } else { "" },
                ))
            }
            Err(e) => {
                let x = match e.code {
                    // The image or its bmap is bad: a bad file, like a bad argument.
                    None if e.what != "interrupted" => code::USAGE,
                    None => 130,
                    Some(StorageError::Io) if e.what.contains("link to the exporter is lost") => code::FAILURE,
                    Some(_) => ErrorCode::Failed.exit_code(),
                };
                Err(exit(x, format!("{device}: flashing {} failed: {e}", img.display())))
            }
        }
    })
}

/// Asks every attachment of this user that serves a mount of `device` of the exporter
/// (`exporter`, `fingerprint`) to drop its cache up to `generation`; returns once each has,
/// or says which one could not (within the control socket's `SETTLE_WAIT`).
async fn settle_local_mounts(
    exporter: &str,
    fingerprint: &str,
    device: &str,
    instance: Option<u64>,
    generation: u64,
) -> Result<(), String> {
    let mounting: Vec<state::StateFile> = state::all()
        .into_iter()
        .filter(|s| {
            s.ready.exporter == exporter
                && s.ready.fingerprint == fingerprint
                && s.ready.devices.iter().any(|d| {
                    d.name == device
                        && d.kind == Kind::Storage
                        && d.endpoints
                            .iter()
                            .any(|e| matches!(e.local, jmp_devices::Local::Mount(_)))
                })
        })
        .collect();
    // One at a time: there is one attachment per exporter and user, so this is one wait.
    for st in mounting {
        let req = ctlsock::Request {
            v: ctlsock::VERSION,
            op: Op::Settle {
                device: device.to_string(),
                generation,
                instance,
            },
        };
        let socket = st.socket.clone();
        // Past the attachment's own wait: its answer (or its timeout error) comes first.
        let guard = ctlsock::SETTLE_WAIT + std::time::Duration::from_secs(5);
        let reply = tokio::task::spawn_blocking(move || ctlsock::call(&socket, &req, guard))
            .await
            .map_err(|e| e.to_string())?;
        let who = format!("the attachment of {exporter} (pid {})", st.ready.pid);
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

fn dump_cmd(device: Option<String>, out: PathBuf, target: Target) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        let opened = open(&target, device).await?;
        let stop = stop_on_interrupt();
        let mut shown = Shown::new("dumping", Some(opened.params.size));
        let started = Instant::now();
        let r = flash::dump(&opened.client, opened.params, &out, stop, |p| {
            shown.update(p)
        })
        .await;
        shown.done();
        let device = opened.device.clone();
        opened.close().await;
        match r {
            Ok(n) => print_out(&format!(
                "{device}: dumped {} MiB to {} in {:.1}s\n",
                n >> 20,
                out.display(),
                started.elapsed().as_secs_f64()
            )),
            Err(e) => {
                let _ = std::fs::remove_file(&out);
                Err(exit(
                    ErrorCode::Failed.exit_code(),
                    format!("{device}: dump failed: {e}; {} removed", out.display()),
                ))
            }
        }
    })
}
