//! jmp-mount: a storage device of a jmp exporter as a FUSE mount, on a connection of its own
//! (what `jmp attach` serves in-process, for a machine that wants only the mount). A thin
//! main: the filesystem, the mount and its reconnecting bridge are in
//! `jmp_devices::storage`. Runs until SIGTERM/SIGINT, then unmounts.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use jmp_devices::storage::StorageBridge;
use jmp_devices::{Bridge, BridgeExit};
use jmp_protocol::{features, Kind};
use jmp_transport::connector::{Connector, Pin};
use jmp_transport::{Channels, LinkEvent};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "jmp-mount",
    version,
    about = "Mount a jmp exporter's storage device with FUSE"
)]
struct Args {
    /// The exporter's address, HOST:PORT.
    #[arg(long)]
    exporter: String,
    /// A file holding the token (direct mode).
    #[arg(long)]
    token_file: PathBuf,
    /// The exporter's certificate fingerprint (sha256:HEX); without it, the first one seen
    /// is trusted for the life of this process (and printed).
    #[arg(long)]
    fingerprint: Option<String>,
    /// The storage device (default: the exporter's only one).
    #[arg(long)]
    device: Option<String>,
    /// Where to mount (an empty directory; a dead mount of a killed jmp-mount is cleaned).
    mountpoint: PathBuf,
}

fn main() {
    jmp_transport::init_logging(false);
    if let Err(e) = run(Args::parse()) {
        eprintln!("jmp-mount: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let addr = args
        .exporter
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.exporter))?
        .next()
        .ok_or_else(|| anyhow!("{} does not resolve", args.exporter))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?
        .trim()
        .to_string();
    let pin = match &args.fingerprint {
        Some(f) => Pin::Fingerprint(
            f.parse()
                .map_err(|e: String| anyhow!("--fingerprint: {e}"))?,
        ),
        None => Pin::Any,
    };
    let client = format!(
        "jmp-mount@{}",
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    );
    let rt = jmp_transport::runtime()?;
    rt.block_on(async move {
        let mut connector = Connector::new(addr, pin, client, token, features::ALL)?;
        let (link, welcome, fp) = connector.connect().await?;
        if matches!(connector.pin, Pin::Any) {
            eprintln!(
                "jmp-mount: trusting {} ({fp}) for this run; pass --fingerprint {fp} next time",
                args.exporter
            );
            connector.pin = Pin::Fingerprint(fp);
        }
        let storage: Vec<_> = welcome
            .devices
            .iter()
            .filter(|d| d.kind == Kind::Storage)
            .collect();
        let info = match &args.device {
            Some(d) => storage
                .iter()
                .find(|i| &i.name == d)
                .ok_or_else(|| anyhow!("{} has no storage device {d:?}", welcome.exporter))?,
            None => match storage.as_slice() {
                [one] => one,
                [] => bail!("{} has no storage device", welcome.exporter),
                _ => bail!(
                    "{} has several storage devices; name one with --device",
                    welcome.exporter
                ),
            },
        };
        let owner = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let mut bridge = StorageBridge::at(info, &args.mountpoint, owner)?;
        // The exporter instance tags the mount's cache (a restarted exporter is a change).
        bridge.on_welcome(info, welcome.instance);
        println!(
            "jmp-mount: {} mounted at {}",
            info.name,
            args.mountpoint.display()
        );
        let shutdown = jmp_transport::shutdown_signal("unmounting");
        tokio::pin!(shutdown);
        let mut current = Some(link);
        let mut backoff = Duration::from_millis(200);
        // The link of the moment, to say goodbye on: an exporter that is not told keeps the
        // board held for this process until its idle timeout.
        let mut last: Option<jmp_transport::LinkHandle>;
        let bye = |h: Option<jmp_transport::LinkHandle>| async move {
            if let Some(h) = h {
                h.bye(jmp_protocol::ErrorCode::Ok, "unmounted");
                let _ =
                    tokio::time::timeout(Duration::from_millis(300), h.connection_closed()).await;
            }
        };
        loop {
            if let Some(mut link) = current.take() {
                last = Some(link.handle.clone());
                let handle: Arc<dyn Channels> = Arc::new(link.handle.clone());
                let ended = async {
                    while let Some(ev) = link.events.recv().await {
                        if let LinkEvent::Ended { reason, .. } = ev {
                            return reason;
                        }
                    }
                    "the link task ended".to_string()
                };
                tokio::select! {
                    _ = &mut shutdown => {
                        drop(bridge);
                        bye(last.take()).await;
                        return Ok(());
                    }
                    exit = bridge.run(handle) => {
                        if let BridgeExit::Refused(r) = exit {
                            bail!("{}: {}", info.name, r.reason);
                        }
                    }
                    why = ended => tracing::warn!("link lost: {why}; reconnecting"),
                }
            }
            tokio::select! {
                _ = &mut shutdown => {
                    drop(bridge);
                    return Ok(());
                }
                _ = bridge.idle() => {}
                r = async {
                    tokio::time::sleep(backoff).await;
                    connector.connect().await
                } => match r {
                    Ok((link, w, _)) => {
                        if let Some(d) = w.devices.iter().find(|d| d.name == info.name) {
                            bridge.on_welcome(d, w.instance);
                        }
                        backoff = Duration::from_millis(200);
                        current = Some(link);
                    }
                    Err(e) => {
                        tracing::warn!("reconnecting: {e:#}");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
            }
        }
    })
}
