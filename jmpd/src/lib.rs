//! jmpd: the exporter daemon. Reads an ExporterConfig, keeps the exporter's TLS identity, and
//! serves the board's devices to the one client holding it.
//!
//! Owns: the command line, logging, the identity's location, binding, signals, and controller
//! mode (registering, lease tokens, relayed sessions: [`controller`]), lease hooks
//! ([`hooks`]), its own `/metrics` ([`metrics`]) and systemd's notify protocol. The serving
//! itself is jmp-exporter
//! (shared with `jmp local`). Does not own: leases (the controller), device logic
//! (jmp-devices).

pub mod controller;
pub mod hooks;
pub mod metrics;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use jmp_exporter::{Authorizer, Exporter, ExporterConfig, TokenAuth};
use jmp_transport::{server_endpoint, Identity};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "jmpd",
    version,
    about = "jmp exporter daemon: serves a lab board's devices over QUIC"
)]
pub struct Args {
    /// Exporter configuration (YAML).
    #[arg(short, long, default_value = "/etc/jmp/exporter.yaml")]
    pub config: PathBuf,
    /// Validate the configuration and exit, without opening devices or binding.
    #[arg(long)]
    pub check_config: bool,
    /// Print the exporter's certificate fingerprint (creating the identity if needed) and exit.
    #[arg(long)]
    pub print_fingerprint: bool,
    /// Override `listen` from the config.
    #[arg(long)]
    pub listen: Option<String>,
    /// Print a systemd drop-in granting what this config's devices need beyond the hardened
    /// unit (serial paths outside ttyS/ttyUSB/ttyACM, a network tunnel's CAP_NET_ADMIN), and
    /// exit. Install it with `systemctl edit jmpd` (or jmpd@NAME).
    #[arg(long)]
    pub print_systemd: bool,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    jmp_transport::init_logging(true);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jmpd: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Default place for the identity: /var/lib/jmp/<name> for root, else under XDG_DATA_HOME.
fn default_state_dir(name: &str) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/jmp").join(name);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("jmp/exporters").join(name)
}

pub fn run(args: Args) -> Result<()> {
    let mut cfg = ExporterConfig::load(&args.config)?;
    if let Some(l) = &args.listen {
        cfg.listen = l.clone();
        cfg.validate().map_err(|e| anyhow!("--listen: {e}"))?;
    }
    if cfg.auth.is_none() && cfg.controller.is_none() {
        bail!(
            "{}: either auth.tokenFile (direct mode: the token clients present with --token-file) \
             or controller.tokenFile (leases from a controller) is required",
            args.config.display()
        );
    }
    if args.print_systemd {
        print!("{}", systemd_dropin(&cfg, &args.config));
        return Ok(());
    }
    if args.check_config {
        // The controller credential is checked too (readable, an exporter credential for this
        // name, signed by the key it names): no network, nothing bound.
        if let Some(c) = &cfg.controller {
            let cred = std::fs::read_to_string(&c.token_file)
                .with_context(|| format!("controller.tokenFile {}", c.token_file.display()))?;
            let r = controller::Registrar::new(&cfg.metadata.name, cred, c.endpoint.clone(), None)
                .map_err(|e| anyhow!("{}: {e}", c.token_file.display()))?;
            println!("controller: {} (credential ok)", r.controller());
        }
        println!(
            "{}: ok: exporter {} with {} device(s): {}",
            args.config.display(),
            cfg.metadata.name,
            cfg.export.0.len(),
            cfg.export
                .0
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    let state_dir = cfg
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&cfg.metadata.name));
    let identity = Identity::load_or_create(&state_dir)?;
    if args.print_fingerprint {
        println!("{}", identity.fingerprint());
        return Ok(());
    }
    let mut created_token = None;
    let direct = match &cfg.auth {
        Some(a) => {
            let (t, created) = TokenAuth::from_file(&a.token_file).map_err(|e| anyhow!(e))?;
            if created {
                created_token = Some(a.token_file.clone());
            }
            Some(t)
        }
        None => None,
    };
    let (registrar, direct) = match &cfg.controller {
        Some(c) => {
            let cred = std::fs::read_to_string(&c.token_file).with_context(|| {
                format!(
                    "controller.tokenFile {} (create it with: jmp admin create exporter {} > FILE)",
                    c.token_file.display(),
                    cfg.metadata.name
                )
            })?;
            let r =
                controller::Registrar::new(&cfg.metadata.name, cred, c.endpoint.clone(), direct)
                    .map_err(|e| anyhow!("{}: {e}", c.token_file.display()))?
                    .renew_into(c.token_file.clone(), c.renew_before.map(|d| d.0.as_secs()))
                    .remember_ended_in(state_dir.join("ended-leases.json"));
            (Some(r), None)
        }
        None => (None, direct),
    };
    let auth: Arc<dyn Authorizer> = match (&registrar, direct) {
        (Some(r), _) => r.auth.clone(),
        (None, Some(d)) => Arc::new(d),
        (None, None) => unreachable!("checked above"),
    };
    let listen = cfg.listen_addr().map_err(|e| anyhow!(e))?;
    let rt = jmp_transport::runtime().context("cannot start the runtime")?;
    rt.block_on(async move {
        let socket = std::net::UdpSocket::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
        let local = socket.local_addr()?;
        // Relay punches leave from the QUIC socket itself (a duplicate of it), so that the
        // relay's datagrams come back to the address QUIC listens on.
        let relay_socket = match cfg.controller.as_ref().filter(|c| c.relay) {
            Some(_) => Some(socket.try_clone().context("cannot duplicate the QUIC socket for the relay")?),
            None => None,
        };
        let endpoint = server_endpoint(socket, &identity, jmp_protocol::ALPN_EXPORTER)?;
        if let Some(f) = created_token {
            warn!(
                "created token file {}; clients attach with: jmp attach --exporter HOST:{} --token-file <a copy of it>",
                f.display(),
                local.port()
            );
        }
        let exporter = Arc::new(Exporter::from_config(&cfg, auth).map_err(|e| anyhow!(e))?);
        let holder: metrics::Holder = Arc::default();
        let metrics_line = match &cfg.metrics {
            Some(m) => {
                let addr: std::net::SocketAddr = m.parse().map_err(|_| anyhow!("metrics {m:?} is not an address"))?;
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot bind metrics {addr}"))?;
                let shown = l.local_addr()?;
                let jm = metrics::JmpdMetrics::new(exporter.clone(), holder.clone());
                tokio::spawn(async move {
                    if let Err(e) = metrics::serve(l, jm).await {
                        warn!("metrics server ended: {e}");
                    }
                });
                Some(format!("jmpd: metrics on http://{shown}/metrics"))
            }
            None => None,
        };
        let hooks = hooks::LeaseHooks::new(&cfg, exporter.clone(), &state_dir);
        if let Some(r) = registrar {
            let address = cfg
                .controller
                .as_ref()
                .and_then(|c| c.address.clone())
                .unwrap_or_else(|| advertised(local));
            let devices = cfg
                .export
                .0
                .iter()
                .map(|(n, spec)| jmp_protocol::ctl::DeviceSummary {
                    name: n.clone(),
                    kind: spec.kind().as_str().to_string(),
                })
                .collect();
            info!("registering with controller {} as reachable at {address}", r.controller());
            let (hooks, reports) = match hooks {
                Some((h, rx)) => (Some(h), Some(rx)),
                None => (None, None),
            };
            tokio::spawn(r.run(
                exporter.clone(),
                address,
                identity.clone(),
                cfg.metadata.labels.clone(),
                devices,
                controller::Extras {
                    relay: relay_socket,
                    hooks,
                    reports,
                    holder: Some(holder.clone()),
                },
            ));
        }
        let shutdown = jmp_transport::shutdown_signal("shutting down");
        if let Some(l) = &metrics_line {
            println!("{l}");
        }
        // One line on stdout when ready, for people, scripts and tests alike.
        println!(
            "jmpd: exporter {} listening on {local} fingerprint {}",
            exporter.name(),
            identity.fingerprint()
        );
        let _ = std::io::stdout().flush();
        info!(devices = cfg.export.0.len(), "serving");
        jmp_transport::systemd::ready(&format!("serving {} on {local}", exporter.name()));
        jmp_transport::systemd::spawn_watchdog();
        exporter.serve(endpoint, shutdown).await;
        info!("stopped");
        Ok(())
    })
}

/// A drop-in for the hardened units (systemd/jmpd.service): only what this config's devices
/// need beyond what the unit grants every exporter (serial ports of the usual classes).
pub fn systemd_dropin(cfg: &ExporterConfig, file: &std::path::Path) -> String {
    use jmp_devices::registry::DeviceSpec;
    let mut lines = vec![
        format!(
            "# systemd drop-in for jmpd: exporter {} from {}.",
            cfg.metadata.name,
            file.display()
        ),
        "# What its devices need beyond the hardened unit; install with `systemctl edit jmpd`."
            .into(),
        "[Service]".into(),
    ];
    let mut tunnel = false;
    for (name, spec) in &cfg.export.0 {
        match spec {
            DeviceSpec::Serial(s) => {
                let real = std::fs::canonicalize(&s.path)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| s.path.clone());
                let base = std::path::Path::new(&real)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if ["ttyS", "ttyUSB", "ttyACM"]
                    .iter()
                    .any(|c| base.starts_with(c) && base[c.len()..].bytes().all(|b| b.is_ascii_digit()))
                {
                    lines.push(format!("# {name}: {real} is a serial port the unit already allows"));
                } else {
                    lines.push(format!("# {name}: serial port {}", s.path));
                    lines.push(format!("DeviceAllow={} rw", s.path));
                }
            }
            DeviceSpec::Power(_) => lines.push(format!(
                "# {name}: power commands run inside this sandbox; grant what they use (e.g. DeviceAllow=char-usb_device rw is there for USB relays, IPAddressAllow= for a PDU)"
            )),
            other => {
                let kind = other.kind();
                if matches!(kind.as_str(), "net" | "tun" | "network") {
                    tunnel = true;
                    lines.push(format!("# {name}: a network tunnel"));
                }
            }
        }
    }
    if tunnel {
        lines.extend([
            "AmbientCapabilities=CAP_NET_ADMIN".to_string(),
            "CapabilityBoundingSet=CAP_NET_ADMIN".to_string(),
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK".to_string(),
            "DeviceAllow=/dev/net/tun rw".to_string(),
        ]);
    }
    if cfg.hooks.is_some() {
        lines.push(
            "# lease hooks run inside this sandbox too (no new privileges, read-only OS, no W^X memory: a JIT needs MemoryDenyWriteExecute=no)"
                .into(),
        );
    }
    lines.join("\n") + "\n"
}

/// The address clients should use: the bound one, with this host's name if bound to all.
fn advertised(local: std::net::SocketAddr) -> String {
    if local.ip().is_unspecified() {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", local.port())
    } else {
        local.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_drop_in_grants_only_what_the_devices_need() {
        let cfg = ExporterConfig::parse(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {name: b1}\n\
             auth: {tokenFile: /tmp/t}\nexport:\n  usb: {type: serial, path: /dev/ttyUSB7}\n\
             \x20 byid: {type: serial, path: /dev/serial/by-id/usb-FTDI_x-if00}\n\
             \x20 sim: {type: sim-console}\n",
        )
        .expect("config");
        let d = systemd_dropin(&cfg, std::path::Path::new("/etc/jmp/b1.yaml"));
        assert!(d.contains("[Service]"), "{d}");
        assert!(
            d.contains("DeviceAllow=/dev/serial/by-id/usb-FTDI_x-if00 rw"),
            "{d}"
        );
        assert!(
            !d.contains("DeviceAllow=/dev/ttyUSB7"),
            "already allowed: {d}"
        );
        assert!(
            !d.contains("CAP_NET_ADMIN"),
            "no tunnel, no capability: {d}"
        );
    }
}
