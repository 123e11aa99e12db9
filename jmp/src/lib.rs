//! jmp: the client CLI. `attach` makes a remote board's devices local; `local` runs a board on
//! this machine (the built-in simulated one, or a config's); `serial` sends what a pty cannot
//! carry; `detach` ends a background attachment.
//!
//! Owns: command line, output formats, exit codes, background processes and their state files,
//! the control socket of a running attachment. Does not own: the wire (jmp-transport), devices
//! (jmp-devices).

pub mod attach;
pub mod ctl;
pub mod known;
pub mod paths;
mod state;

use anyhow::{anyhow, bail, Context, Result};
use attach::{ControlRequest, Outcome, Pin, Ready, SerialOp};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jmp_protocol::{FlowControl, LineSettings, Parity};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::mpsc;
use tracing::error;

/// An error that carries the process exit code (the table in docs/protocol.md).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

fn exit(code: i32, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

#[derive(Parser, Debug)]
#[command(
    name = "jmp",
    version,
    about = "jmp: a remote lab board as local devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attach an exporter: its serial consoles become local ptys, its TCP ports local ports.
    Attach(AttachArgs),
    /// Stop a background attachment (`jmp attach -d`).
    Detach {
        /// Exporter name (default: the only attachment).
        exporter: Option<String>,
        /// Stop all attachments.
        #[arg(long)]
        all: bool,
    },
    /// Run a board on this machine: the built-in simulated board, or an exporter config.
    Local {
        #[command(subcommand)]
        cmd: LocalCmd,
    },
    /// What a pty cannot carry: break, parity and data bits, modem lines.
    Serial {
        #[command(subcommand)]
        cmd: SerialCmd,
    },
    /// List attachments on this machine.
    Status {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Client configurations (which controller, as whom).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Create a lease.
    Create {
        #[command(subcommand)]
        what: CreateCmd,
    },
    /// List leases or exporters.
    Get {
        #[command(subcommand)]
        what: GetCmd,
    },
    /// Change a lease's duration.
    Update {
        #[command(subcommand)]
        what: UpdateCmd,
    },
    /// Release leases.
    Delete {
        #[command(subcommand)]
        what: DeleteCmd,
    },
    /// Identities: create, list and delete clients and exporters (needs the admin credential).
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
        /// Admin credential (default: ~/.config/jmp/admin.yaml, then
        /// /var/lib/jmp-controller/admin.yaml).
        #[arg(long, env = "JMP_ADMIN_CONFIG", global = true)]
        admin_config: Option<PathBuf>,
    },
    /// The client's own credential.
    Auth {
        #[command(subcommand)]
        cmd: AuthCmd,
    },
}

#[derive(Args, Debug, Clone)]
struct ClientSel {
    /// Client config to use (default: the current one, see `jmp config client use`).
    #[arg(long, env = "JMP_CLIENT")]
    client: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Manage client configs under ~/.config/jmp/clients/.
    Client {
        #[command(subcommand)]
        cmd: ConfigClientCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigClientCmd {
    /// Create (or replace) a client config from a file (`jmp admin create client --out`) or
    /// from its parts.
    Create {
        name: String,
        /// A client config file to import.
        #[arg(long, conflicts_with_all = ["endpoint", "fingerprint", "token"])]
        from: Option<PathBuf>,
        #[arg(long, requires_all = ["fingerprint", "token"])]
        endpoint: Option<String>,
        #[arg(long)]
        fingerprint: Option<String>,
        #[arg(long)]
        token: Option<String>,
        /// Do not make it the current client.
        #[arg(long)]
        no_use: bool,
    },
    /// Make a client config the current one.
    Use { name: String },
    /// List client configs (the current one marked with *).
    List {
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
    /// Delete a client config.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum CreateCmd {
    /// Lease an exporter chosen by label selector (or by name); prints the lease's name.
    Lease {
        /// Label selector (Kubernetes syntax); repeated selectors must all match.
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        /// A specific exporter by name.
        #[arg(short = 'n', long = "name")]
        exporter: Option<String>,
        /// How long to hold it, e.g. 30m, 2h.
        #[arg(long, default_value = "30m")]
        duration: String,
        /// Not before this time (RFC 3339, e.g. 2026-11-25T14:00:00Z).
        #[arg(long)]
        begin_time: Option<String>,
        /// Wait in the queue up to this many seconds if nothing is free (0: fail at once).
        #[arg(long, default_value_t = 0)]
        wait: u64,
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Name)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
enum GetCmd {
    /// Your leases (and waiting requests); -a: everyone's.
    Leases {
        #[arg(short, long)]
        all: bool,
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
    /// Exporters you may lease.
    Exporters {
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        /// Extra columns: leases, online.
        #[arg(long, value_delimiter = ',')]
        with: Vec<String>,
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
enum UpdateCmd {
    /// Set a lease's total duration (from its start) or extend it.
    Lease {
        name: String,
        #[arg(long, conflicts_with = "extend", required_unless_present = "extend")]
        duration: Option<String>,
        #[arg(long)]
        extend: Option<String>,
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
enum DeleteCmd {
    /// Release leases by name (default: your only lease); --all: all of yours.
    Lease {
        names: Vec<String>,
        #[arg(long, conflicts_with = "names")]
        all: bool,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    Create {
        #[command(subcommand)]
        what: AdminCreate,
    },
    Get {
        #[command(subcommand)]
        what: AdminGet,
    },
    Delete {
        #[command(subcommand)]
        what: AdminDelete,
    },
    /// Take an exporter out of service (its lease ends; it is not leased until enabled).
    Disable { kind: ExporterWord, name: String },
    /// Put an exporter back into service.
    Enable { kind: ExporterWord, name: String },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ExporterWord {
    Exporter,
}

#[derive(Subcommand, Debug)]
enum AdminCreate {
    /// A client identity and its policy; prints (or writes) its client config.
    Client {
        name: String,
        /// Labels (k=v), e.g. team=platform for metrics.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Selector of exporters it may lease (default: any).
        #[arg(long, default_value = "")]
        allow: String,
        /// Longest lease it may hold, e.g. 2h (default: the controller's --max-duration).
        #[arg(long)]
        max_duration: Option<String>,
        /// Give it admin rights.
        #[arg(long)]
        admin: bool,
        /// Write the client config to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also store it under ~/.config/jmp/clients/ (and make it current if none is).
        #[arg(long)]
        save: bool,
    },
    /// An exporter identity; prints its credential (jmpd's controller.tokenFile).
    Exporter {
        name: String,
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AdminGet {
    Clients {
        name: Option<String>,
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
    Exporters {
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
}

#[derive(Subcommand, Debug)]
enum AdminDelete {
    /// Delete a client: its leases end, its credential is revoked.
    Client { name: String },
    /// Delete an exporter: its lease ends, its credential is revoked.
    Exporter { name: String },
}

#[derive(Subcommand, Debug)]
enum AuthCmd {
    /// Replace this client's credential with a new one; the old one is revoked at once.
    Rotate {
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
struct AttachArgs {
    /// Direct mode: exporter address, HOST:PORT (port 7700 if omitted). Without it, attach
    /// the exporter of a lease from the controller.
    #[arg(long, requires = "token_file", conflicts_with = "lease")]
    exporter: Option<String>,
    /// Direct mode: file holding the exporter's token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The lease to attach (default: your only active lease).
    #[arg(long)]
    lease: Option<String>,
    #[command(flatten)]
    client: ClientSel,
    /// Expected certificate fingerprint (sha256:...). Default: trust on first use, recorded in
    /// ~/.config/jmp/known_exporters.
    #[arg(long)]
    fingerprint: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// Where serial devices appear (default /dev/jmp as root, else $XDG_RUNTIME_DIR/jmp).
    #[arg(long)]
    dev_dir: Option<PathBuf>,
    /// Local address of a TCP forward: LOCAL=DEVICE, LOCAL a port or ADDR:PORT (default: an
    /// ephemeral port on 127.0.0.1).
    #[arg(long = "forward", value_name = "LOCAL=DEVICE")]
    forwards: Vec<String>,
    /// Name shown to others who find the board busy (default user@host).
    #[arg(long)]
    name: Option<String>,
    /// Output once ready: a table, or exactly one JSON line.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Return once the devices are ready, leaving the attachment in the background.
    #[arg(short, long)]
    detach: bool,
}

impl CommonArgs {
    /// The attachment's options from what every attaching command shares.
    fn options(&self, addr: SocketAddr, token: String, pin: Pin) -> Result<attach::Options> {
        Ok(attach::Options {
            addr,
            token,
            token_refresh: None,
            pin,
            dev_dir: self.dev_dir.clone().unwrap_or_else(paths::default_dev_dir),
            forwards: parse_forwards(&self.forwards)?,
            client: self.name.clone().unwrap_or_else(paths::default_client_name),
            owner: Some(paths::invoking_user()),
        })
    }
}

#[derive(Subcommand, Debug)]
enum LocalCmd {
    /// Start a local exporter in the background and attach it.
    Start(LocalArgs),
    /// Stop the local exporter started by `jmp local start`.
    Stop,
    #[command(hide = true)]
    Run(LocalArgs),
}

#[derive(Args, Debug, Clone)]
struct LocalArgs {
    /// Exporter config of a board wired to this machine (default: the simulated board).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Subcommand, Debug)]
enum SerialCmd {
    /// Send a break on the real port.
    Break {
        device: String,
        #[arg(long, default_value_t = 250)]
        ms: u32,
        #[arg(long)]
        exporter: Option<String>,
    },
    /// Set line settings on the real port, including those a pty cannot carry (parity, 5-7
    /// data bits). Unspecified settings stay as they are.
    Set {
        device: String,
        #[arg(long)]
        baud: Option<u32>,
        #[arg(long, value_parser = clap::value_parser!(u8).range(5..=8))]
        data_bits: Option<u8>,
        #[arg(long, value_enum)]
        parity: Option<ParityArg>,
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        stop_bits: Option<u8>,
        #[arg(long, value_enum)]
        flow: Option<FlowArg>,
        #[arg(long)]
        exporter: Option<String>,
    },
    /// Set the modem control lines DTR and RTS on the real port.
    Modem {
        device: String,
        #[arg(long, value_enum)]
        dtr: Option<OnOff>,
        #[arg(long, value_enum)]
        rts: Option<OnOff>,
        #[arg(long)]
        exporter: Option<String>,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ParityArg {
    None,
    Odd,
    Even,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum FlowArg {
    None,
    Xonxoff,
    Rtscts,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    jmp_transport::init_logging(false);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Exit>().map(|x| x.code).unwrap_or(1);
            eprintln!("jmp: error: {e:#}");
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Attach(a) => {
            if a.common.detach && std::env::var_os(state::CHILD_ENV).is_none() {
                return state::spawn_background(a.common.output == Format::Json);
            }
            attach_cmd(a)
        }
        Cmd::Detach { exporter, all } => state::detach(exporter.as_deref(), all),
        Cmd::Local { cmd } => match cmd {
            LocalCmd::Start(l) => local_start(l),
            LocalCmd::Stop => local_stop(),
            LocalCmd::Run(l) => local_run(l),
        },
        Cmd::Serial { cmd } => serial_cmd(cmd),
        Cmd::Status { output } => state::status(output == Format::Json),
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Client { cmd } => config_client(cmd),
        },
        Cmd::Create { what } => create_cmd(what),
        Cmd::Get { what } => get_cmd(what),
        Cmd::Update { what } => update_cmd(what),
        Cmd::Delete { what } => delete_cmd(what),
        Cmd::Admin { cmd, admin_config } => admin_cmd(cmd, admin_config),
        Cmd::Auth { cmd } => auth_cmd(cmd),
    }
}

mod verbs;
use verbs::*;

fn resolve(exporter: &str) -> Result<SocketAddr> {
    let with_port = if exporter
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        exporter.to_string()
    } else {
        format!("{exporter}:{}", jmp_devices::config::DEFAULT_PORT)
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| {
            exit(
                2,
                format!("cannot resolve exporter address {exporter:?}: {e}"),
            )
        })?
        .next()
        .ok_or_else(|| {
            exit(
                2,
                format!("exporter address {exporter:?} resolves to nothing"),
            )
        })
}

fn parse_forwards(list: &[String]) -> Result<HashMap<String, SocketAddr>> {
    let mut out = HashMap::new();
    for f in list {
        let (local, device) = f.split_once('=').ok_or_else(|| {
            exit(
                2,
                format!("--forward {f:?}: expected LOCAL=DEVICE, e.g. 2222=ssh"),
            )
        })?;
        let addr = if let Ok(port) = local.parse::<u16>() {
            SocketAddr::from(([127, 0, 0, 1], port))
        } else {
            local.parse().map_err(|_| {
                exit(
                    2,
                    format!("--forward {f:?}: {local:?} is not a port or ADDR:PORT"),
                )
            })?
        };
        out.insert(device.to_string(), addr);
    }
    Ok(out)
}

fn read_token(path: &PathBuf) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| exit(2, format!("cannot read token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(exit(2, format!("token file {} is empty", path.display())));
    }
    Ok(t)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    jmp_transport::runtime().context("cannot start the runtime")
}

fn print_ready(ready: &Ready, json: bool) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let text = if json || std::env::var_os(state::CHILD_ENV).is_some() {
        // A background child always reports JSON to its parent, which formats it.
        serde_json::to_string(ready).map_err(|e| e.to_string())? + "\n"
    } else {
        ready.table()
    };
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    state::after_ready();
    Ok(())
}

fn outcome_to_result(o: Outcome, exporter: &str) -> Result<()> {
    match o {
        Outcome::Detached => Ok(()),
        Outcome::Ended { code, reason } => {
            error!("{exporter}: session ended: {reason} ({code})");
            Err(exit(code.exit_code(), format!("session ended: {reason}")))
        }
    }
}

fn attach_cmd(a: AttachArgs) -> Result<()> {
    let (Some(exporter), Some(token_file)) = (&a.exporter, &a.token_file) else {
        return attach_lease(a);
    };
    let addr = resolve(exporter)?;
    let token = read_token(token_file)?;
    let pin = match &a.fingerprint {
        Some(f) => Pin::Fingerprint(f.parse().map_err(|e: String| exit(2, e))?),
        None => Pin::Tofu {
            file: known::file(),
            name: exporter.clone(),
        },
    };
    let opts = a.common.options(addr, token, pin)?;
    let json = a.common.output == Format::Json;
    runtime()?.block_on(run_attachment(opts, json, None))
}

/// Runs one attachment with its state file and control socket; `extra` is registered as the
/// owner of the state (local mode).
async fn run_attachment(
    opts: attach::Options,
    json: bool,
    local_pid_file: Option<PathBuf>,
) -> Result<()> {
    let (ctl_tx, ctl_rx) = mpsc::channel::<ControlRequest>(8);
    let exporter_name = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let guard = std::sync::Arc::new(std::sync::Mutex::new(None::<state::StateGuard>));
    let (g2, n2) = (guard.clone(), exporter_name.clone());
    let on_ready = move |r: &Ready| -> Result<(), String> {
        let sg = state::StateGuard::create(r, ctl_tx.clone(), local_pid_file.clone())?;
        *g2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sg);
        *n2.lock().unwrap_or_else(|e| e.into_inner()) = r.exporter.clone();
        print_ready(r, json)
    };
    let res = attach::run(
        opts,
        on_ready,
        jmp_transport::shutdown_signal("removing local devices"),
        ctl_rx,
    )
    .await;
    // Devices are gone once `attach::run` returns; now the state files.
    guard.lock().unwrap_or_else(|e| e.into_inner()).take();
    let name = exporter_name
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match res {
        Ok(o) => outcome_to_result(o, &name),
        Err(e) => Err(exit(e.exit_code(), e.to_string())),
    }
}

fn local_start(l: LocalArgs) -> Result<()> {
    if let Some(existing) = state::local_running()? {
        // Idempotent for CI: a second start reports what is already there.
        let text = if l.common.output == Format::Json {
            serde_json::to_string(&existing)? + "\n"
        } else {
            existing.table()
        };
        print!("{text}");
        return Ok(());
    }
    state::spawn_background(l.common.output == Format::Json)
}

fn local_stop() -> Result<()> {
    state::local_stop()
}

fn local_run(l: LocalArgs) -> Result<()> {
    use jmp_devices::config::ExporterConfig;
    use jmp_devices::exporter::{Exporter, TokenAuth};
    let mut cfg = match &l.config {
        Some(p) => ExporterConfig::load(p).map_err(|e| exit(2, e.to_string()))?,
        None => ExporterConfig::simulated(),
    };
    // In-process: nothing but this process can reach it.
    cfg.listen = "127.0.0.1:0".into();
    let token = jmp_devices::exporter::random_token().map_err(|e| anyhow!(e))?;
    let identity = jmp_transport::Identity::generate()?;
    let json = l.common.output == Format::Json;
    runtime()?.block_on(async move {
        let socket =
            std::net::UdpSocket::bind("127.0.0.1:0").context("cannot bind the local exporter")?;
        let addr = socket.local_addr()?;
        let endpoint =
            jmp_transport::server_endpoint(socket, &identity, jmp_protocol::ALPN_EXPORTER)?;
        let exporter = std::sync::Arc::new(Exporter::from_config(
            &cfg,
            std::sync::Arc::new(TokenAuth::new(&token)),
        ));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(exporter.serve(endpoint, async move {
            let _ = stop_rx.await;
        }));
        let opts = l
            .common
            .options(addr, token, Pin::Fingerprint(identity.fingerprint()))?;
        let res = run_attachment(opts, json, Some(state::local_file())).await;
        let _ = stop_tx.send(());
        let _ = server.await;
        res
    })
}

fn serial_cmd(cmd: SerialCmd) -> Result<()> {
    let (device, exporter, req) = match cmd {
        SerialCmd::Break {
            device,
            ms,
            exporter,
        } => (
            device,
            exporter,
            serde_json::json!({"op": "break", "ms": ms}),
        ),
        SerialCmd::Set {
            device,
            baud,
            data_bits,
            parity,
            stop_bits,
            flow,
            exporter,
        } => (
            device,
            exporter,
            serde_json::json!({
                "op": "set",
                "baud": baud,
                "data_bits": data_bits,
                "parity": parity.map(|p| format!("{p:?}").to_lowercase()),
                "stop_bits": stop_bits,
                "flow": flow.map(|f| format!("{f:?}").to_lowercase()),
            }),
        ),
        SerialCmd::Modem {
            device,
            dtr,
            rts,
            exporter,
        } => (
            device,
            exporter,
            serde_json::json!({
                "op": "modem",
                "dtr": dtr.map(|v| matches!(v, OnOff::On)),
                "rts": rts.map(|v| matches!(v, OnOff::On)),
            }),
        ),
    };
    let st = state::find(exporter.as_deref())?;
    let mut req = req;
    req["device"] = serde_json::Value::String(device);
    let mut sock = std::os::unix::net::UnixStream::connect(&st.socket).map_err(|e| {
        anyhow!(
            "cannot reach the attachment of {} at {}: {e}",
            st.ready.exporter,
            st.socket.display()
        )
    })?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    writeln!(sock, "{req}")?;
    let mut line = String::new();
    std::io::BufReader::new(&sock).read_line(&mut line)?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| anyhow!("bad reply from the attachment: {e}"))?;
    if let Some(ok) = reply.get("ok").and_then(|v| v.as_str()) {
        println!("{ok}");
        Ok(())
    } else {
        let err = reply
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown error");
        bail!("{err}")
    }
}

/// Turns a control-socket request into an attachment request.
pub(crate) fn parse_request(v: &serde_json::Value) -> Result<(String, SerialOp), String> {
    let device = v
        .get("device")
        .and_then(|d| d.as_str())
        .ok_or("request without device")?
        .to_string();
    let op = match v.get("op").and_then(|o| o.as_str()) {
        Some("break") => SerialOp::Break {
            millis: v
                .get("ms")
                .and_then(|m| m.as_u64())
                .unwrap_or(250)
                .min(60_000) as u32,
        },
        Some("modem") => SerialOp::Modem {
            dtr: v.get("dtr").and_then(|x| x.as_bool()),
            rts: v.get("rts").and_then(|x| x.as_bool()),
        },
        Some("set") => {
            let baud = v.get("baud").and_then(|x| x.as_u64()).map(|b| b as u32);
            let data_bits = v.get("data_bits").and_then(|x| x.as_u64()).map(|b| b as u8);
            let stop_bits = v.get("stop_bits").and_then(|x| x.as_u64()).map(|b| b as u8);
            let parity = match v.get("parity").and_then(|x| x.as_str()) {
                None => None,
                Some("none") => Some(Parity::None),
                Some("odd") => Some(Parity::Odd),
                Some("even") => Some(Parity::Even),
                Some(p) => return Err(format!("unknown parity {p:?}")),
            };
            let flow = match v.get("flow").and_then(|x| x.as_str()) {
                None => None,
                Some("none") => Some(FlowControl::None),
                Some("xonxoff") => Some(FlowControl::Software),
                Some("rtscts") => Some(FlowControl::Hardware),
                Some(f) => return Err(format!("unknown flow control {f:?}")),
            };
            SerialOp::Set(Box::new(move |mut s: LineSettings| {
                if let Some(b) = baud {
                    s.baud = b;
                }
                if let Some(d) = data_bits {
                    s.data_bits = d;
                }
                if let Some(p) = parity {
                    s.parity = p;
                }
                if let Some(st) = stop_bits {
                    s.stop_bits = st;
                }
                if let Some(f) = flow {
                    s.flow = f;
                }
                s
            }))
        }
        other => return Err(format!("unknown operation {other:?}")),
    };
    Ok((device, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_ports_and_addresses_and_name_bad_ones() {
        let f = parse_forwards(&["2222=ssh".into(), "127.0.0.2:8080=web".into()]).expect("valid");
        assert_eq!(f["ssh"], SocketAddr::from(([127, 0, 0, 1], 2222)));
        assert_eq!(
            f["web"],
            "127.0.0.2:8080".parse::<SocketAddr>().expect("addr")
        );
        for bad in ["ssh", "x=ssh", "99999=ssh"] {
            let e = parse_forwards(&[bad.into()]).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
            assert_eq!(e.downcast_ref::<Exit>().map(|x| x.code), Some(2));
        }
    }

    #[test]
    fn exporter_address_gets_the_default_port() {
        assert_eq!(resolve("127.0.0.1").expect("resolves").port(), 7700);
        assert_eq!(resolve("127.0.0.1:9").expect("resolves").port(), 9);
    }

    #[test]
    fn serial_set_requests_merge_into_current_settings() {
        let v =
            serde_json::json!({"device": "console", "op": "set", "parity": "even", "data_bits": 7});
        let (device, op) = parse_request(&v).expect("valid");
        assert_eq!(device, "console");
        let SerialOp::Set(f) = op else {
            panic!("not a set")
        };
        let s = f(LineSettings::default());
        assert_eq!(
            (s.baud, s.data_bits, s.parity, s.stop_bits),
            (115_200, 7, Parity::Even, 1)
        );
        let bad = serde_json::json!({"device": "console", "op": "set", "parity": "mark"});
        assert!(parse_request(&bad)
            .err()
            .is_some_and(|e| e.contains("mark")));
        let unknown = serde_json::json!({"device": "console", "op": "explode"});
        assert!(parse_request(&unknown).is_err());
    }

    #[test]
    fn table_aligns_columns() {
        let r = Ready {
            exporter: "x".into(),
            fingerprint: "sha256:00".into(),
            pid: 1,
            devices: vec![
                attach::DeviceRow {
                    name: "console".into(),
                    kind: "serial".into(),
                    local: "/dev/jmp/x/console".into(),
                },
                attach::DeviceRow {
                    name: "ssh".into(),
                    kind: "tcp".into(),
                    local: "127.0.0.1:2222".into(),
                },
            ],
        };
        assert_eq!(
            r.table(),
            "console  serial  /dev/jmp/x/console\nssh      tcp     127.0.0.1:2222\n"
        );
    }
}
