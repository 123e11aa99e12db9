//! `jmp local start|stop`: an exporter in-process on this machine (the built-in simulated
//! board, or a config's board wired here), attached like any other, in the background.

use crate::attach::Pin;
use crate::cli::{Format, LocalArgs};
use crate::state::{self, LocalState};
use crate::{exit, print_out, run_attachment, runtime};
use anyhow::{anyhow, Context, Result};
use jmp_exporter::{Exporter, ExporterConfig, TokenAuth};
use jmp_protocol::exit as code;
use std::path::PathBuf;

fn canonical(config: &Option<PathBuf>) -> Result<Option<PathBuf>> {
    match config {
        None => Ok(None),
        Some(p) => std::fs::canonicalize(p)
            .map(Some)
            .map_err(|e| exit(code::USAGE, format!("cannot read {}: {e}", p.display()))),
    }
}

/// Starts a local exporter in the background, or reports the one running with this config.
pub(crate) fn start(l: LocalArgs) -> Result<()> {
    let wanted = canonical(&l.config)?;
    if let Some(existing) = state::local_running() {
        if existing.config == wanted {
            // Idempotent for CI: a second start reports what is already there.
            let text = if l.common.output == Format::Json {
                serde_json::to_string(&existing.ready)? + "\n"
            } else {
                existing.ready.table()
            };
            return print_out(&text);
        }
        let what = |c: &Option<PathBuf>| {
            c.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the built-in simulated board".into())
        };
        if !l.restart {
            return Err(exit(
                code::USAGE,
                format!(
                    "a local exporter is already running {} (pid {}); `jmp local stop` first, or give --restart",
                    what(&existing.config),
                    existing.ready.pid
                ),
            ));
        }
        // stdout is for the new exporter's ready line (scripts parse it).
        if let Some(name) = state::stop_local()? {
            eprintln!("jmp: stopped local exporter {name} (--restart)");
        }
    }
    if let Some(p) = &l.config {
        // Fail here, with the config's own message, rather than in the background child.
        ExporterConfig::load(p).map_err(|e| exit(code::USAGE, e.to_string()))?;
    }
    state::spawn_background(l.common.output == Format::Json)
}

/// The background child of `start`: the exporter and its attachment in one process.
pub(crate) fn run(l: LocalArgs) -> Result<()> {
    let mut cfg = match &l.config {
        Some(p) => ExporterConfig::load(p).map_err(|e| exit(code::USAGE, e.to_string()))?,
        None => ExporterConfig::simulated(),
    };
    // In-process: nothing but this process can reach it.
    cfg.listen = "127.0.0.1:0".into();
    // A fresh board: the last run's writes to a simulated card are not this run's.
    cfg.fresh_scratch = !l.keep_card;
    let token = jmp_exporter::auth::random_token().map_err(|e| anyhow!(e))?;
    let identity = jmp_transport::Identity::generate()?;
    let json = l.common.output == Format::Json;
    let local = LocalState {
        file: state::local_file(),
        config: canonical(&l.config)?,
    };
    runtime()?.block_on(async move {
        let socket =
            std::net::UdpSocket::bind("127.0.0.1:0").context("cannot bind the local exporter")?;
        let addr = socket.local_addr()?;
        let endpoint =
            jmp_transport::server_endpoint(socket, &identity, jmp_protocol::ALPN_EXPORTER)?;
        let exporter = std::sync::Arc::new(
            Exporter::from_config(&cfg, std::sync::Arc::new(TokenAuth::new(&token)))
                .map_err(|e| anyhow!(e))?,
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(exporter.serve(endpoint, async move {
            let _ = stop_rx.await;
        }));
        let opts = l
            .common
            .options(addr, token, Pin::Fingerprint(identity.fingerprint()))?;
        let res = run_attachment(opts, json, Some(local)).await;
        let _ = stop_tx.send(());
        let _ = server.await;
        res
    })
}
