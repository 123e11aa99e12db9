//! jmp-controller: the lab's controller. Identities (clients, exporters, admins) with signed
//! credentials; exporters registering with their labels; leases on exporters chosen by label
//! selector, queued fairly and ended on time; lease tokens jmpd verifies offline; metrics.
//!
//! Owns: [`book`] (the lease logic, pure and driven by `now`), [`store`] (the `LeaseStore`
//! trait and its embedded redb default), [`etcd`] (the etcd backend), [`cluster`] (several
//! controllers on one etcd: election, fencing, stepping down), [`core`] (the one task that
//! owns state and commits it), [`api`] (the QUIC endpoint), token signing, [`metrics`] and
//! `/metrics`, and the [`relay`] for exporters behind NAT (it splices QUIC packets it cannot
//! read).
//! Does not own: the data path (clients connect straight to exporters), the wire codec
//! (jmp-protocol), QUIC and token crypto (jmp-transport).

pub mod api;
pub mod book;
pub mod cluster;
pub mod core;
pub mod etcd;
pub mod metrics;
pub mod relay;
pub mod store;
pub mod usage;
pub mod web;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
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
    /// A lease that nothing uses for this long ends (no session attached at its exporter,
    /// no `jmp` command naming it), unless it asks for another idle timeout
    /// (`--idle-timeout`); `0`: leases that ask for none have none. A client's policy may
    /// cap it (`jmp admin update client --max-idle-timeout`).
    #[arg(long, default_value = "10m", value_parser = parse_duration_arg)]
    pub default_idle_timeout: u64,
    /// Waiting lease requests one client may have at once (more are refused, saying so).
    #[arg(long, default_value_t = core::MAX_WAITING_PER_CLIENT)]
    pub max_waiting_per_client: usize,
    /// Where leases and identities are kept: `redb` (a file in --data-dir, one controller) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (an etcd cluster shared by several controllers, one
    /// of which is elected leader; all must share signing.key and tls/ from --data-dir).
    #[arg(long, default_value = "redb")]
    pub store: String,
    /// Key prefix in etcd (one prefix per lab).
    #[arg(long, default_value = "/jmp")]
    pub etcd_prefix: String,
    /// TTL of the etcd lease that keeps this controller the leader: how long a dead leader
    /// goes unnoticed. At least 2s (etcd's minimum with its default timings).
    #[arg(long, default_value = "2s", value_parser = parse_duration_arg)]
    pub leader_ttl: u64,
    /// Lifetime of the client and exporter credentials issued (created, rotated, renewed),
    /// e.g. `90d`; `jmp` and `jmpd` renew theirs when a third of it is left. `0`: they never
    /// expire.
    #[arg(long, default_value = "90d", value_parser = parse_duration_arg)]
    pub credential_ttl: u64,
    /// How long after its expiry a credential is still accepted, for clocks that disagree.
    #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
    pub credential_skew: u64,
    /// How long the history of ended leases is kept for usage reports (`jmp admin usage`),
    /// e.g. `400d`; `0` keeps it forever.
    #[arg(long, default_value = "400d", value_parser = parse_duration_arg)]
    pub usage_retention: u64,
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
    /// Serve the lab dashboard on this address (HTTP; off by default; people sign in with a
    /// link from `jmp web --lab`). A loopback address only, unless --web-plain-http: the
    /// session cookie would be seen by anyone on the path (reach it through an SSH tunnel, an
    /// IDE's port forwarding or a TLS proxy on the same host).
    #[arg(long)]
    pub web: Option<SocketAddr>,
    /// Let --web listen on a non-loopback address over plain HTTP (a network you trust).
    #[arg(long)]
    pub web_plain_http: bool,
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
    let ctl = ControllerRef {
        endpoint: advertise(&args, bound),
        fingerprint: fingerprint.clone(),
        key: signer.public_key(),
    };
    let auth = Arc::new(core::Authority::new(signer, ctl));
    let metrics = Arc::new(metrics::Metrics::new());
    if args.store != "redb" {
        return run_cluster(args, auth, metrics, endpoint, bound, fingerprint, verifier).await;
    }
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
    core.set_default_idle_timeout(args.default_idle_timeout);
    core.set_usage_retention(args.usage_retention.saturating_mul(1000));
    if let Some(r) = relay_config(&args, bound)? {
        core.set_relay(r);
    }

    // The admin credential: readable by its owner (root) only. Removing the file and
    // restarting issues a new one and revokes the old; one near its expiry is renewed.
    core.set_credential_ttl(args.credential_ttl);
    let admin_file = args.data_dir.join("admin.yaml");
    core.ensure_admin_file(&admin_file, true)?;

    let shutdown = jmp_transport::shutdown_signal("controller shutting down");
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let core_task = tokio::spawn(core.run(rx));
    serve_metrics(&args, &metrics).await?;
    print_listening(&args, bound, &fingerprint);
    let api = api::Api::new(tx, verifier);
    api.set_credential_skew(args.credential_skew);
    serve_web(&args, &api).await?;
    jmp_transport::systemd::ready(&format!("serving on {bound}"));
    jmp_transport::systemd::spawn_watchdog();
    tokio::select! {
        _ = api.serve(endpoint, shutdown) => Ok(()),
        // The core only ends if it fails (the store refused a commit, or a bug): serving on
        // without it would answer every call with an error forever, so the process ends and
        // its supervisor restarts it, which reloads the durable state.
        r = core_task => {
            let why = match r {
                Ok(Err(e)) => format!("the store did not take a commit: {e:#}"),
                Err(e) if e.is_panic() => "it panicked".to_string(),
                _ => "unexpectedly".to_string(),
            };
            eprintln!("jmp-controller: error: the controller's core task ended ({why}); exiting so that a restart reloads the store");
            std::process::exit(70);
        }
    }
}

/// The relay's settings from `--relay-bind/--relay-ports/--relay-host` (`None`: disabled).
fn relay_config(args: &Args, bound: SocketAddr) -> Result<Option<relay::RelayConfig>> {
    let bind = match args.relay_bind.as_deref() {
        None => bound.ip(),
        Some("") => return Ok(None),
        Some(a) => a
            .parse::<std::net::IpAddr>()
            .map_err(|e| anyhow!("--relay-bind {a:?}: {e}"))?,
    };
    Ok(Some(relay::RelayConfig {
        bind,
        ports: args.relay_ports,
        host: args.relay_host.clone(),
    }))
}

async fn serve_metrics(args: &Args, metrics: &Arc<metrics::Metrics>) -> Result<()> {
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
    Ok(())
}

async fn serve_web(args: &Args, api: &Arc<api::Api>) -> Result<()> {
    if let Some(addr) = args.web {
        if !addr.ip().is_loopback() && !args.web_plain_http {
            anyhow::bail!(
                "--web {addr} is not a loopback address: the dashboard is plain HTTP and its sign-in links and session cookies would be seen by anyone on the path. Serve it on 127.0.0.1 and reach it through an SSH tunnel, an IDE's port forwarding or a TLS proxy on this host, or give --web-plain-http on a network you trust"
            );
        }
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind --web {addr}"))?;
        let shown = l.local_addr()?;
        let links = web::SignIns::new(format!("http://{shown}/"));
        api.set_web_links(links.clone());
        tokio::spawn(web::serve(l, api.clone(), links));
        info!("lab dashboard on http://{shown}/");
        println!("jmp-controller: lab dashboard on http://{shown}/");
    }
    Ok(())
}

fn print_listening(args: &Args, bound: SocketAddr, fingerprint: &str) {
    println!(
        "jmp-controller: listening on {bound} fingerprint {fingerprint} admin {}",
        args.data_dir.join("admin.yaml").display()
    );
    let _ = std::io::stdout().flush();
}

/// `--store etcd://...`: this controller takes part in its cluster's election and serves
/// while it leads.
async fn run_cluster(
    args: Args,
    auth: Arc<core::Authority>,
    metrics: Arc<metrics::Metrics>,
    endpoint: quinn::Endpoint,
    bound: SocketAddr,
    fingerprint: String,
    verifier: jmp_transport::token::Verifier,
) -> Result<()> {
    let members = etcd::parse_url(&args.store).map_err(|e| anyhow!(e))?;
    let prefix = etcd::check_prefix(&args.etcd_prefix).map_err(|e| anyhow!(e))?;
    if args.leader_ttl < 2 {
        anyhow::bail!("--leader-ttl must be at least 2s (etcd refuses shorter leases)");
    }
    let cargs = cluster::ClusterArgs {
        members,
        prefix,
        advertise: advertise(&args, bound),
        ttl: std::time::Duration::from_secs(args.leader_ttl),
        data_dir: args.data_dir.clone(),
        max_duration: args.max_duration,
        default_idle: args.default_idle_timeout,
        max_waiting: args.max_waiting_per_client,
        usage_retention: args.usage_retention.saturating_mul(1000),
        credential_ttl: args.credential_ttl,
        relay: relay_config(&args, bound)?,
    };
    let (role_tx, role_rx) = tokio::sync::watch::channel(cluster::Role::Electing);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = jmp_transport::shutdown_signal("controller shutting down");
    tokio::spawn(async move {
        signal.await;
        stop_tx.send_replace(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    serve_metrics(&args, &metrics).await?;
    print_listening(&args, bound, &fingerprint);
    info!(
        store = %args.store,
        prefix = %args.etcd_prefix,
        "joining the controller cluster"
    );
    let api = api::Api::with_role(role_rx, verifier);
    api.set_credential_skew(args.credential_skew);
    serve_web(&args, &api).await?;
    jmp_transport::systemd::ready(&format!("joining the cluster on {bound}"));
    jmp_transport::systemd::spawn_watchdog();
    let mut api_task = tokio::spawn(api.serve(endpoint, stopped(stop_rx.clone())));
    let cluster = cluster::run(cargs, auth, metrics, role_tx, stopped(stop_rx));
    tokio::select! {
        r = cluster => {
            // Resigned on a signal (the API stops too), or refused to join.
            r?;
            let _ = api_task.await;
            Ok(())
        }
        _ = &mut api_task => Ok(()),
    }
}
