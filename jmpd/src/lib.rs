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
    /// unit (AF_CAN for SocketCAN, block devices and writable images for storage, a network
    /// tunnel's CAP_NET_ADMIN, serial paths outside ttyS/ttyUSB/ttyACM), and exit. Install it
    /// with `systemctl edit jmpd` (or jmpd@NAME).
    #[arg(long)]
    pub print_systemd: bool,
}

pub fn main() -> ExitCode {
    fixed_mmap_threshold();
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

/// Buffers of 1 MiB and more (storage reads and writes of up to 8 MiB) get mappings of their
/// own, so that their memory goes back to the system when they are freed (a flooding session
/// ended). By default glibc raises its mmap threshold once such a buffer is freed and serves
/// later ones from the arenas of the blocking threads that allocate them, where freed memory
/// stays resident: jmpd's RSS crept up by 8-16 MiB with every flooding session
/// (`jmp-bench storage-flood`). Setting the threshold turns that adjustment off.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
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
    // Devices keep what must outlive a crash there too (what they changed on the host).
    cfg.state_dir = Some(state_dir.clone());
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
                .map(|(n, spec)| jmp_protocol::api::DeviceSummary {
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
/// need beyond what the unit grants every exporter (Internet and Unix sockets, serial ports of
/// the usual classes, ptys, its state directory), from each device kind's `sandbox()`.
pub fn systemd_dropin(cfg: &ExporterConfig, file: &std::path::Path) -> String {
    let mut need = jmp_devices::kind::Sandbox::default();
    for (name, spec) in &cfg.export.0 {
        need.merge(spec.sandbox(name));
    }
    // The unit grants its StateDirectory (/var/lib/jmp) only: a stateDir elsewhere would be
    // read-only under ProtectSystem=strict, and jmpd could not create its identity there.
    if let Some(path) = cfg.state_dir.as_deref() {
        if !path.starts_with("/var/lib/jmp") {
            if let Some(dir) = need.unit_path("stateDir", path) {
                need.note(format!(
                    "stateDir {dir} is outside the unit's StateDirectory (/var/lib/jmp)"
                ));
                // `-`: jmpd creates it at its first start.
                need.set(format!("ReadWritePaths=-{dir}"));
                if ["/home", "/root", "/run/user"]
                    .iter()
                    .any(|h| path.starts_with(h))
                {
                    need.set("ProtectHome=read-only".into());
                }
            }
        }
    }
    if cfg.hooks.is_some() {
        need.note(
            "lease hooks run inside this sandbox too (no new privileges, read-only OS, no W^X memory: a JIT needs MemoryDenyWriteExecute=no)"
                .into(),
        );
    }
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
    lines.extend(need.render());
    lines.join("\n") + "\n"
}

/// The address clients should use: the bound one. Bound to all addresses (`0.0.0.0:PORT`),
/// it is sent as it is and the controller puts in the address this host's registration comes
/// from: this host's own name may resolve to a loopback address (Debian's 127.0.1.1), which on
/// a client's machine is the client itself.
fn advertised(local: std::net::SocketAddr) -> String {
    local.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dropin(export: &str) -> String {
        let cfg = ExporterConfig::parse(&format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: b1}}\n\
             auth: {{tokenFile: /tmp/t}}\nexport:\n{export}"
        ))
        .expect("config");
        systemd_dropin(&cfg, std::path::Path::new("/etc/jmp/b1.yaml"))
    }

    /// The directives (not the comments) after `[Service]`.
    fn directives(d: &str) -> Vec<&str> {
        let body = d.split_once("[Service]\n").expect("[Service]").1;
        body.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn the_systemd_drop_in_grants_only_what_the_devices_need() {
        let d = dropin(
            "  usb: {type: serial, path: /dev/ttyUSB7}\n\
             \x20 byid: {type: serial, path: /dev/serial/by-id/usb-FTDI_x-if00}\n\
             \x20 sim: {type: sim-console}\n",
        );
        assert!(d.contains("[Service]"), "{d}");
        assert_eq!(
            directives(&d),
            ["DeviceAllow=/dev/serial/by-id/usb-FTDI_x-if00 rw"],
            "ttyUSB7 is allowed already, a simulated console needs nothing: {d}"
        );
    }

    #[test]
    fn a_state_dir_outside_var_lib_jmp_is_made_writable() {
        let cfg = |extra: &str| {
            ExporterConfig::parse(&format!(
                "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: b1}}\n\
                 {extra}auth: {{tokenFile: /tmp/t}}\nexport:\n  sim: {{type: sim-console}}\n"
            ))
            .expect("config")
        };
        let f = std::path::Path::new("/etc/jmp/b1.yaml");
        let d = systemd_dropin(&cfg("stateDir: /srv/jmp/b1\n"), f);
        assert_eq!(directives(&d), ["ReadWritePaths=-/srv/jmp/b1"], "{d}");
        let d = systemd_dropin(&cfg("stateDir: /var/lib/jmp/b1\n"), f);
        assert!(directives(&d).is_empty(), "the unit's own directory: {d}");
        let d = systemd_dropin(&cfg(""), f);
        assert!(directives(&d).is_empty(), "the default: {d}");
        let d = systemd_dropin(&cfg("stateDir: \"/srv/x\\nExecStartPre=/bin/evil\"\n"), f);
        assert!(directives(&d).is_empty(), "a path a unit cannot hold: {d}");
    }

    /// What tests/tests/systemd_guest.rs found each kind needs under the hardened unit.
    #[test]
    fn every_kind_gets_what_it_needs_each_grant_once() {
        let d = dropin(
            "  can0: {type: can, interface: can0, bitrate: 500000}\n\
             \x20 vcan: {type: can, interface: vcan0}\n\
             \x20 canable: {type: can, slcan: {path: /dev/serial/by-id/usb-canable-if00}, bitrate: 500000}\n\
             \x20 sd: {type: storage, path: /dev/sdz, writable: true}\n\
             \x20 card: {type: storage, path: /dev/mmcblk9}\n\
             \x20 img: {type: storage, path: /srv/jmp/b1.img, writable: true}\n\
             \x20 golden: {type: storage, path: /srv/jmp/golden.img}\n\
             \x20 console: {type: serial, path: /dev/ttyUSB7}\n\
             \x20 lan: {type: network, subnets: [192.168.10.0/24], via: lo}\n",
        );
        let mut got = directives(&d);
        got.sort();
        let mut want = vec![
            // SocketCAN: raw CAN sockets, the bus state and the bit rate over netlink, the
            // writer pinned to a CPU; the bit rate and the tunnel need CAP_NET_ADMIN.
            "RestrictAddressFamilies=AF_CAN AF_NETLINK",
            "AmbientCapabilities=CAP_NET_ADMIN",
            "CapabilityBoundingSet=CAP_NET_ADMIN",
            "SystemCallFilter=sched_setaffinity",
            // slcan on a by-id path.
            "DeviceAllow=/dev/serial/by-id/usb-canable-if00 rw",
            // Block devices, read-write only when writable.
            "DeviceAllow=/dev/sdz rw",
            "DeviceAllow=/dev/mmcblk9 r",
            // A writable image; a read-only one is readable under ProtectSystem=strict.
            "ReadWritePaths=/srv/jmp/b1.img",
            // The tunnel: TUN, /proc/sys for forwarding.
            "DeviceAllow=/dev/net/tun rw",
            "ProcSubset=all",
            "ReadWritePaths=/proc/sys/net/ipv4/conf",
        ];
        want.sort();
        assert_eq!(got, want, "{d}");
        for name in [
            "can0", "vcan", "canable", "sd", "card", "img", "golden", "console", "lan",
        ] {
            assert!(
                d.contains(&format!("\n# {name}: ")),
                "no word on {name}: {d}"
            );
        }
    }

    /// usbip-host's files (bind, unbind, match_busid, rebind under /sys/bus/usb; each device's
    /// usbip_sockfd under /sys/devices) and the kernel's device events; the module is loaded
    /// at boot, which the drop-in says.
    #[test]
    fn usb_devices_get_usbip_hosts_files_and_the_kernels_events() {
        let d = dropin("  probe: {type: usb, ids: ['0483:3748']}\n");
        let mut got = directives(&d);
        got.sort();
        assert_eq!(
            got,
            [
                "ReadWritePaths=/sys/bus/usb /sys/devices",
                "RestrictAddressFamilies=AF_NETLINK"
            ],
            "{d}"
        );
        assert!(
            d.contains("\n# probe: ") && d.contains("modules-load.d"),
            "{d}"
        );
    }

    #[test]
    fn a_virtual_can_bus_needs_no_capability() {
        let d = dropin("  vcan: {type: can, interface: vcan0}\n");
        assert_eq!(
            directives(&d),
            [
                "RestrictAddressFamilies=AF_CAN AF_NETLINK",
                "SystemCallFilter=sched_setaffinity"
            ],
            "{d}"
        );
    }

    #[test]
    fn images_in_home_or_tmp_and_simulated_cards() {
        let d = dropin(
            "  home: {type: storage, path: /root/b.img, writable: true}\n\
             \x20 tmp: {type: storage, path: /tmp/b.img}\n\
             \x20 sim: {type: storage-sim, size: 64MiB}\n\
             \x20 kept: {type: storage-sim, size: 64MiB, path: /var/lib/jmp-sim/kept.img}\n",
        );
        let mut got = directives(&d);
        got.sort();
        assert_eq!(
            got,
            [
                "PrivateTmp=no",
                "ProtectHome=read-only",
                "ReadWritePaths=-/var/lib/jmp-sim",
                "ReadWritePaths=/root/b.img",
            ],
            "{d}"
        );
        assert!(
            d.contains("# sim: its image is made in the service's private /tmp"),
            "{d}"
        );
    }

    #[test]
    fn a_path_that_would_add_to_the_unit_is_not_written_into_it() {
        let d = dropin(
            "  a: {type: serial, path: \"/dev/x\\nExecStartPre=/bin/sh -c evil\"}\n\
             \x20 b: {type: storage, path: \"/srv/%h.img\", writable: true}\n",
        );
        assert!(directives(&d).is_empty(), "{d}");
        assert!(!d.contains("\nExecStartPre"), "{d}");
        assert!(d.contains("cannot be written into a unit file"), "{d}");
    }
}
