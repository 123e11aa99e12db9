//! `jmp storage flash|dump|info`. `info` is a device request like `jmp power`. Flash and dump
//! move data, so they need a channel: `jmp` lends one through the running attachment (its
//! control socket relays a channel over the attachment's connection), else on a connection of
//! the verb's own, which holds the board for the duration ([`VerbHost::channel`]). The
//! flashing itself is [`super::flash`]; this module shows progress (a bar with rate and ETA
//! on a terminal, a line per 10% otherwise) and maps failures to exit codes.
//!
//! **What a successful flash promises.** When `jmp storage flash` exits 0, every mount of the
//! device served by a `jmp attach` of this user (the attachments `jmp status` lists, of the
//! same exporter: name and fingerprint) has dropped its cache of what was written, so a read
//! through it right after sees the new bytes. How: the exporter moves the device's generation
//! after the flash's last write (at its flush) and sends the change on the flash's channel
//! before the flush's answer, so the flash knows that generation when it is flushed; then it
//! asks `jmp` to settle every such attachment to it ([`VerbHost::settle`]), and fails if one
//! cannot within its wait. A `jmp-mount` of its own drops its cache when the change reaches
//! it, with no such wait.

use super::client::{Client, Retry, StreamRx, StreamTx};
use super::flash::{self, Progress};
use super::image;
use crate::kind::{KindVerb, Target, VerbChannel, VerbError, VerbHost, VerbStream};
use crate::registry::{run_request, DeviceRequest};
use crate::BoxFuture;
use clap::Subcommand;
use jmp_protocol::codec::Codec;
use jmp_protocol::exit as code;
use jmp_protocol::kinds::storage::{self as wire, DeviceParams, StorageError};
use jmp_protocol::{ErrorCode, Kind};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum StorageVerb {
    /// The board's storage: flash an image onto it, dump it, show it.
    Storage {
        #[command(subcommand)]
        cmd: StorageCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum StorageCmd {
    /// Write an image onto the medium: raw, .gz, .xz, .zst or .bz2 (told by content); zero
    /// runs and bmap-unmapped ranges cost nothing on the link; flushed before success.
    // clap would show the first of the two positionals as required: the device is optional.
    #[command(override_usage = "jmp storage flash [OPTIONS] [DEVICE] IMAGE")]
    Flash {
        /// [DEVICE] IMAGE: the storage device (default: the only one) and the image file.
        #[arg(num_args = 1..=2, value_name = "[DEVICE] IMAGE", required = true)]
        args: Vec<String>,
        /// bmaptool's block map: only its mapped ranges are written, their checksums checked.
        #[arg(long)]
        bmap: Option<PathBuf>,
        /// Afterwards compare SHA-256s computed on the exporter with the image's.
        #[arg(long)]
        verify: bool,
        /// Send data uncompressed (compression is used where it saves a tenth or more).
        #[arg(long)]
        no_compress: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Read the whole medium into a file: raw and sparse, or compressed as its name says
    /// (.zst, .gz, .xz, .bz2).
    #[command(override_usage = "jmp storage dump [OPTIONS] [DEVICE] OUTPUT")]
    Dump {
        /// [DEVICE] OUTPUT: the storage device (default: the only one) and the output file.
        #[arg(num_args = 1..=2, value_name = "[DEVICE] OUTPUT", required = true)]
        args: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Show the medium's size, block size and whether it can be written now.
    Info {
        /// The storage device (default: the only one).
        device: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

impl KindVerb for StorageVerb {
    fn run(self, host: &dyn VerbHost) -> BoxFuture<'_, Result<(), VerbError>> {
        Box::pin(async move {
            let StorageVerb::Storage { cmd } = self;
            match cmd {
                StorageCmd::Info { device, target } => {
                    run_request(
                        host,
                        &target,
                        device,
                        DeviceRequest::Storage(wire::DeviceRequest::Info),
                    )
                    .await
                }
                StorageCmd::Flash {
                    args,
                    bmap,
                    verify,
                    no_compress,
                    target,
                } => {
                    let (device, img) = split(args);
                    let opts = FlashArgs {
                        img: PathBuf::from(img),
                        bmap,
                        verify,
                        compress: !no_compress,
                    };
                    flash_verb(host, &target, device, opts).await
                }
                StorageCmd::Dump { args, target } => {
                    let (device, out) = split(args);
                    dump_verb(host, &target, device, PathBuf::from(out)).await
                }
            }
        })
    }
}

fn split(mut args: Vec<String>) -> (Option<String>, String) {
    let last = args.pop().unwrap_or_default();
    (args.pop(), last)
}

/// A storage client serving a channel the host lent, in a task.
struct Opened {
    client: Client,
    params: DeviceParams,
    ch_close: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
    origin: crate::kind::ChannelOrigin,
    serve: tokio::task::JoinHandle<()>,
}

impl Opened {
    async fn close(self) {
        self.serve.abort();
        if let Some(close) = self.ch_close {
            close().await;
        }
    }
}

async fn open(
    host: &dyn VerbHost,
    target: &Target,
    device: Option<String>,
) -> Result<Opened, VerbError> {
    let VerbChannel {
        origin,
        params,
        stream,
        close,
    } = host.channel(target, Kind::Storage, device).await?;
    let params = DeviceParams::decode_exact(&params).map_err(|e| {
        VerbError::new(
            code::FAILURE,
            format!(
                "{}: bad storage parameters from the exporter: {e}",
                origin.device
            ),
        )
    })?;
    let client = Client::new(&origin.device, Retry::Fail);
    client.set_params(params);
    let c = client.clone();
    let serve = match stream {
        VerbStream::Pipe(tx, rx) => tokio::spawn(async move {
            let _ = c.serve(tx, rx).await;
        }),
        VerbStream::Socket(w, r) => tokio::spawn(async move {
            let _ = c.serve(StreamTx(w), StreamRx(r)).await;
        }),
    };
    Ok(Opened {
        client,
        params,
        ch_close: close,
        origin,
        serve,
    })
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

pub(super) struct FlashArgs {
    pub(super) img: PathBuf,
    pub(super) bmap: Option<PathBuf>,
    pub(super) verify: bool,
    pub(super) compress: bool,
}

pub(super) async fn flash_verb(
    host: &dyn VerbHost,
    target: &Target,
    device: Option<String>,
    a: FlashArgs,
) -> Result<(), VerbError> {
    let FlashArgs {
        img,
        bmap,
        verify,
        compress,
    } = a;
    let bad_file =
        |p: &Path, e: String| VerbError::new(code::USAGE, format!("{}: {e}", p.display()));
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
    let opened = open(host, target, device).await?;
    let stop = stop_on_interrupt();
    // As flash::flash counts: acknowledged bytes of the image, or of a bmap's mapped ranges.
    let total = match &bmap {
        Some(b) => Some(b.mapped_bytes()),
        None => image.size,
    };
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
        |p| {
            shown.update(p);
            host.progress("flashing", p.done, p.total);
        },
    )
    .await;
    shown.done();
    // The generation the flush made (its change came before the flush's answer).
    let generation = opened.client.params().map(|p| p.generation);
    let origin = opened.origin.clone();
    let device = origin.device.clone();
    opened.close().await;
    if let (Ok(_), Some(g)) = (&r, generation) {
        host.settle(&origin, g).await.map_err(|e| {
            VerbError::new(
                ErrorCode::Timeout.exit_code(),
                format!("{device}: flashed {} and flushed, but {e}", img.display()),
            )
        })?;
    }
    match r {
        Ok(rep) => {
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            host.print(&format!(
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
                None => code::INTERRUPTED,
                Some(StorageError::Io) if e.what.contains("link to the exporter is lost") => {
                    code::FAILURE
                }
                Some(_) => ErrorCode::Failed.exit_code(),
            };
            Err(VerbError::new(
                x,
                format!("{device}: flashing {} failed: {e}", img.display()),
            ))
        }
    }
}

async fn dump_verb(
    host: &dyn VerbHost,
    target: &Target,
    device: Option<String>,
    out: PathBuf,
) -> Result<(), VerbError> {
    let opened = open(host, target, device).await?;
    let stop = stop_on_interrupt();
    let mut shown = Shown::new("dumping", Some(opened.params.size));
    let started = Instant::now();
    let r = flash::dump(&opened.client, opened.params, &out, stop, |p| {
        shown.update(p)
    })
    .await;
    shown.done();
    let device = opened.origin.device.clone();
    opened.close().await;
    match r {
        Ok(n) => host.print(&format!(
            "{device}: dumped {} MiB to {} in {:.1}s\n",
            n >> 20,
            out.display(),
            started.elapsed().as_secs_f64()
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            Err(VerbError::new(
                ErrorCode::Failed.exit_code(),
                format!("{device}: dump failed: {e}; {} removed", out.display()),
            ))
        }
    }
}
