//! jmp-controller: the lab's controller. Identities (clients, exporters, admins) with signed
//! credentials; exporters registering with their labels; leases on exporters chosen by label
//! selector, queued fairly and ended on time; lease tokens jmpd verifies offline; metrics.
//!
//! Owns: [`book`] (the lease logic, pure and driven by `now`), [`store`] (the `LeaseStore`
//! trait and its embedded redb default), [`core`] (the one task that owns state and commits
//! it), [`api`] (the QUIC endpoint), token signing, [`metrics`] and `/metrics`, and the
//! [`relay`] for exporters behind NAT (it splices QUIC packets it cannot read).
//! Does not own: the data path (clients connect straight to exporters), the wire codec
//! (jmp-protocol), QUIC and token crypto (jmp-transport).

pub mod api;
pub mod book;
pub mod core;
pub mod metrics;
pub mod relay;
pub mod store;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use jmp_protocol::ctl::ClientConfig;
use jmp_protocol::token::ControllerRef;
use jmp_transport::token::Signer;
use jmp_transport::{server_endpoint, Identity};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "jmp-controller",
    version,
    about = "jmp controller: identities, exporters, leases by label selector, lease tokens, metrics"
)]
pub struct Args {
    /// Where the signing key, TLS identity, admin credential and the lease database live.
    #[arg(long, default_value = "/var/lib/jmp-controller")]
    pub data_dir: PathBuf,
    /// QUIC address for clients and exporters.
    #[arg(long, default_value = "0.0.0.0:7800")]
    pub listen: SocketAddr,
    /// HTTP address for /metrics and /healthz ("" to disable).
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub metrics: String,
    /// `host:port` written into credentials (default: the listen address, with this host's
    /// name when listening on all addresses).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Longest lease for clients whose policy sets none, e.g. `24h`.
    #[arg(long, default_value = "24h", value_parser = parse_duration_arg)]
    pub max_duration: u64,
    /// Waiting lease requests one client may have at once (more are refused, saying so).
    #[arg(long, default_value_t = core::MAX_WAITING_PER_CLIENT)]
    pub max_waiting_per_client: usize,
    /// Address relay sessions bind, for exporters that accept no inbound connection
    /// (`controller: {relay: true}`); "" disables the relay. Default: the --listen address.
    #[arg(long)]
    pub relay_bind: Option<String>,
    /// Port range for relay sessions, one port each (e.g. 40000-40999, for firewalls).
    /// Default: any free port.
    #[arg(long, value_parser = relay::parse_ports)]
    pub relay_ports: Option<(u16, u16)>,
    /// Host clients and exporters send relayed packets to. Default: the controller's host as
    /// each of them reaches it.
    #[arg(long)]
    pub relay_host: Option<String>,
}

fn parse_duration_arg(s: &str) -> Result<u64, String> {
    jmp_protocol::duration::parse_secs(s).map_err(|e| e.to_string())
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    jmp_transport::init_logging(true);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jmp-controller: error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jmp-controller: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn advertise(args: &Args, bound: SocketAddr) -> String {
    if let Some(a) = &args.advertise {
        return a.clone();
    }
    if bound.ip().is_unspecified() {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    }
}

pub async fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let identity = Identity::load_or_create(&args.data_dir.join("tls"))
        .with_context(|| format!("TLS identity in {}", args.data_dir.display()))?;
    let signer = Signer::load_or_create(&args.data_dir.join("signing.key"))?;
    let verifier = signer.verifier();
    let socket = std::net::UdpSocket::bind(args.listen)
        .with_context(|| format!("cannot bind {}", args.listen))?;
    let bound = socket.local_addr()?;
    let endpoint = server_endpoint(socket, &identity, jmp_protocol::ALPN_CONTROLLER)?;
    let fingerprint = identity.fingerprint().to_string();
    let auth = Arc::new(core::Authority {
        ctl: ControllerRef {
            endpoint: advertise(&args, bound),
            fingerprint: fingerprint.clone(),
            key: signer.public_key(),
        },
        signer,
    });
    let metrics = Arc::new(metrics::Metrics::new());
    let db = args.data_dir.join("leases.redb");
    let store = store::RedbStore::open(&db)?;
    let mut core = core::Core::open(
        store,
        "redb",
        auth.clone(),
        metrics.clone(),
        args.max_duration,
    )
    .with_context(|| format!("loading {}", db.display()))?;
    core.set_max_waiting(args.max_waiting_per_client);
    let relay_bind = match args.relay_bind.as_deref() {
        None => Some(bound.ip()),
        Some("") => None,
        Some(a) => Some(
            a.parse::<std::net::IpAddr>()
                .map_err(|e| anyhow!("--relay-bind {a:?}: {e}"))?,
        ),
    };
    if let Some(ip) = relay_bind {
        core.set_relay(relay::RelayConfig {
            bind: ip,
            ports: args.relay_ports,
            host: args.relay_host.clone(),
        });
    }

    // The admin credential: written once, readable by its owner (root) only. Removing the file
    // and restarting issues a new one and revokes the old.
    let admin_file = args.data_dir.join("admin.yaml");
    if !admin_file.exists() || !core.has_client("admin") {
        let _ = std::fs::remove_file(&admin_file);
        let cred = core.issue_admin("admin")?;
        let yaml = serde_norway::to_string(&ClientConfig::new(&cred))?;
        jmp_transport::write_secret_file(&admin_file, yaml.as_bytes())
            .with_context(|| format!("cannot write {}", admin_file.display()))?;
        info!("admin credential written to {}", admin_file.display());
    }

    let shutdown = jmp_transport::shutdown_signal("controller shutting down");
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let core_task = tokio::spawn(core.run(rx));
    if let Some(addr) = metrics::parse_addr(&args.metrics).map_err(|e| anyhow!(e))? {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind --metrics {addr}"))?;
        let m = metrics.clone();
        let shown = l.local_addr()?;
        tokio::spawn(async move {
            let _ = metrics::serve_http(l, m, std::future::pending()).await;
        });
        info!("metrics on http://{shown}/metrics");
        println!("jmp-controller: metrics on http://{shown}/metrics");
    }
    println!(
        "jmp-controller: listening on {bound} fingerprint {fingerprint} admin {}",
        args.data_dir.join("admin.yaml").display()
    );
    let _ = std::io::stdout().flush();
    let api = api::Api::new(tx, verifier);
    jmp_transport::systemd::ready(&format!("serving on {bound}"));
    jmp_transport::systemd::spawn_watchdog();
    tokio::select! {
        _ = api.serve(endpoint, shutdown) => Ok(()),
        // The core only ends if it fails (a bug): serving on without it would answer every
        // call with an error forever, so the process ends and its supervisor restarts it.
        r = core_task => Err(anyhow!(
            "the controller's core task ended ({}); exiting so that a restart reloads the store",
            match r {
                Err(e) if e.is_panic() => "it panicked",
                _ => "unexpectedly",
            }
        )),
    }
}
