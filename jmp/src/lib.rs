//! jmp: the client CLI. `attach` makes a remote board's devices local; `local` runs a board on
//! this machine (the built-in simulated one, or a config's); the device kinds' verbs (`power`,
//! `serial`, `storage`, defined by the kinds) operate devices; `detach` ends a background
//! attachment; the lease verbs talk to a controller; `mcp` offers all of it to coding agents.
//!
//! Owns: the command line ([`cli`], definitions only), one module per job ([`attach`],
//! [`local`], [`device`], [`verbs`], [`state`]), output formats and the one table printer
//! ([`table`]), exit codes (from `jmp_protocol::exit`), background processes and their state
//! files, and the attachment's control socket ([`ctlsock`]). Does not own: the wire
//! (jmp-transport), devices (jmp-devices), the exporter (jmp-exporter).

use anyhow::{Context, Result};
use attach::{Outcome, Pin, Ready};
use clap::Parser;
use cli::*;
use jmp_protocol::exit as code;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::error;

/// An error that carries the process exit code (the table in docs/protocol.md).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

pub(crate) fn exit(code: i32, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// Writes `text` to stdout. A closed pipe (`jmp status | head -1`) ends the program quietly
/// with success, as Unix tools do; it is never a panic. Every normal output of `jmp` goes
/// through here ([`out!`], [`outln!`]).
pub(crate) fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e.into()),
    }
}

/// `print!` that survives a closed pipe (see [`print_out`]); other write errors are ignored
/// as `print!` would panic on them.
macro_rules! out {
    ($($t:tt)*) => {{
        let _ = $crate::print_out(&format!($($t)*));
    }};
}

/// `println!` that survives a closed pipe.
macro_rules! outln {
    () => { out!("\n") };
    ($($t:tt)*) => {{
        let _ = $crate::print_out(&format!("{}\n", format_args!($($t)*)));
    }};
}

pub mod attach;
pub mod cli;
pub mod controller;
pub mod ctlsock;
pub mod device;
pub mod known;
pub mod local;
mod mcp;
pub mod paths;
mod shell;
mod state;
pub mod table;
mod web;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    jmp_transport::init_logging(false);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<Exit>()
                .map(|x| x.code)
                .unwrap_or(code::FAILURE);
            eprintln!(
                "jmp: error: {}",
                jmp_protocol::name::escape(&format!("{e:#}"))
            );
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
        Cmd::Shell(s) => shell::run(s),
        Cmd::Detach { exporter, all } => state::detach(exporter.as_deref(), all),
        Cmd::Local { cmd } => match cmd {
            LocalCmd::Start(l) => local::start(l),
            LocalCmd::Stop => state::local_stop(),
            LocalCmd::Run(l) => local::run(l),
        },
        Cmd::Device(verb) => device::run_verb(verb),
        Cmd::Status { output } => state::status(output == Format::Json),
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Client { cmd } => verbs::config_client(cmd),
        },
        Cmd::Create { what } => verbs::create_cmd(what),
        Cmd::Get { what } => verbs::get_cmd(what),
        Cmd::Update { what } => verbs::update_cmd(what),
        Cmd::Delete { what } => verbs::delete_cmd(what),
        Cmd::Share { what } => controller::share_cmd(what),
        Cmd::Unshare { what } => controller::unshare_cmd(what),
        Cmd::Admin { cmd, admin_config } => verbs::admin_cmd(cmd, admin_config),
        Cmd::Auth { cmd } => verbs::auth_cmd(cmd),
        Cmd::Trust { cmd } => trust_cmd(cmd),
        Cmd::Mcp(a) => mcp::run(a),
        Cmd::Web(a) => web::run(a),
    }
}

fn trust_cmd(cmd: TrustCmd) -> Result<()> {
    let file = known::file();
    match cmd {
        TrustCmd::List => {
            let rows: Vec<Vec<String>> = known::list(&file)
                .map_err(|e| exit(code::FAILURE, e))?
                .into_iter()
                .map(|(a, f)| vec![a, f])
                .collect();
            if rows.is_empty() {
                outln!("no exporter is trusted yet ({})", file.display());
            } else {
                out!(
                    "{}",
                    table::render(Some(&["EXPORTER", "FINGERPRINT"]), &rows)
                );
            }
        }
        TrustCmd::Pin { addr, fingerprint } => {
            let fp: jmp_transport::Fingerprint = fingerprint
                .parse()
                .map_err(|e: String| exit(code::USAGE, e))?;
            known::pin(&file, &addr, fp).map_err(|e| exit(code::FAILURE, e))?;
            outln!("{} now trusted as {fp}", known::normalize(&addr));
        }
        TrustCmd::Forget { addr } => {
            match known::forget(&file, &addr).map_err(|e| exit(code::FAILURE, e))? {
                0 => {
                    return Err(exit(
                        code::UNAVAILABLE,
                        format!("{} is not trusted", known::normalize(&addr)),
                    ))
                }
                _ => outln!("forgot {}", known::normalize(&addr)),
            }
        }
    }
    Ok(())
}

mod verbs;

impl CommonArgs {
    /// The attachment's options from what every attaching command shares.
    pub(crate) fn options(
        &self,
        addr: SocketAddr,
        token: String,
        pin: Pin,
    ) -> Result<attach::Options> {
        self.devices
            .parse_check()
            .map_err(|e| exit(code::USAGE, e.to_string()))?;
        let dev_dir = match &self.dev_dir {
            Some(d) => d.clone(),
            None => {
                let d = paths::default_dev_dir();
                paths::check_fallback(&d).map_err(|e| exit(code::FAILURE, e))?;
                d
            }
        };
        Ok(attach::Options {
            addr,
            token,
            token_refresh: None,
            pin,
            mount_dir: self
                .dev_dir
                .clone()
                .unwrap_or_else(paths::default_mount_dir),
            dev_dir,
            devices: self.devices.clone(),
            client: self.name.clone().unwrap_or_else(paths::default_client_name),
            owner: Some(paths::invoking_user()),
            lease: None,
            relay: None,
            owner_pid: self.owner_pid,
        })
    }
}

pub(crate) fn resolve(exporter: &str) -> Result<SocketAddr> {
    let with_port = if exporter
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        exporter.to_string()
    } else {
        format!("{exporter}:{}", jmp_exporter::config::DEFAULT_PORT)
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| {
            exit(
                code::USAGE,
                format!("cannot resolve exporter address {exporter:?}: {e}"),
            )
        })?
        .next()
        .ok_or_else(|| {
            exit(
                code::USAGE,
                format!("exporter address {exporter:?} resolves to nothing"),
            )
        })
}

pub(crate) fn read_token(path: &PathBuf) -> Result<String> {
    let t = std::fs::read_to_string(path).map_err(|e| {
        exit(
            code::USAGE,
            format!("cannot read token file {}: {e}", path.display()),
        )
    })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(exit(
            code::USAGE,
            format!("token file {} is empty", path.display()),
        ));
    }
    Ok(t)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    jmp_transport::runtime().context("cannot start the runtime")
}

fn print_ready(ready: &Ready, json: bool) -> Result<(), String> {
    let text = if json || std::env::var_os(state::CHILD_ENV).is_some() {
        // A background child always reports JSON to its parent, which formats it.
        serde_json::to_string(ready).map_err(|e| e.to_string())? + "\n"
    } else {
        ready.table()
    };
    let mut out = std::io::stdout().lock();
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
            let reason = jmp_protocol::name::escape(&reason);
            error!("{exporter}: session ended: {reason} ({code})");
            Err(exit(code.exit_code(), format!("session ended: {reason}")))
        }
    }
}

/// Direct mode's token: `--token`/`JMP_TOKEN`, else the `--token-file`; `None` if neither.
pub(crate) fn direct_token(
    token: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>> {
    match (token, file) {
        (Some(t), _) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        (Some(_), _) => Err(exit(code::USAGE, "--token (JMP_TOKEN) is empty")),
        (None, Some(f)) => read_token(f).map(Some),
        (None, None) => Ok(None),
    }
}

fn attach_cmd(a: AttachArgs) -> Result<()> {
    let token = direct_token(&a.token, &a.token_file)?;
    let Some(exporter) = &a.exporter else {
        return verbs::attach_lease(a);
    };
    let Some(token) = token else {
        return Err(exit(
            code::USAGE,
            format!("--exporter needs the exporter's token: {DIRECT_TOKEN_WAYS}"),
        ));
    };
    let addr = resolve(exporter)?;
    let pin = match &a.fingerprint {
        Some(f) => Pin::Fingerprint(f.parse().map_err(|e: String| exit(code::USAGE, e))?),
        None => Pin::Tofu {
            file: known::file(),
            name: known::normalize(exporter),
        },
    };
    let opts = a.common.options(addr, token, pin)?;
    let json = a.common.output == Format::Json;
    runtime()?.block_on(run_attachment(opts, json, None))
}

/// Runs one attachment with its state file and control socket; in local mode, local mode's
/// state file is written too.
pub(crate) async fn run_attachment(
    opts: attach::Options,
    json: bool,
    local: Option<state::LocalState>,
) -> Result<()> {
    // An attachment started for a process (a test runner's `attach -d`) ends with it, even
    // when it is killed and cannot clean up: otherwise its board would stay attached, and its
    // lease in use, until someone noticed.
    // Direct mode: a token the user gave, not a lease's nor local mode's own.
    let direct = opts.lease.is_none() && opts.token_refresh.is_none() && local.is_none();
    let owner = match opts.owner_pid {
        Some(pid) => Some((pid, state::owner_exit(pid)?)),
        None => None,
    };
    // Registered here, before the session starts: inside the async block it would register
    // only when first polled, and a SIGTERM right after the ready line would kill the process
    // with its devices in place (CI caught it).
    let signal = jmp_transport::shutdown_signal("removing local devices");
    let shutdown = async move {
        match owner {
            Some((pid, gone)) => tokio::select! {
                _ = signal => {}
                _ = gone => tracing::info!("owner process {pid} ended; removing local devices"),
            },
            None => signal.await,
        }
    };
    let exporter_name = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let guard = std::sync::Arc::new(std::sync::Mutex::new(None::<state::StateGuard>));
    let (g2, n2) = (guard.clone(), exporter_name.clone());
    let on_ready = move |r: &Ready, shared| -> Result<(), String> {
        let sg = state::StateGuard::create(r, shared, local.clone())?;
        *g2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sg);
        *n2.lock().unwrap_or_else(|e| e.into_inner()) = r.exporter.clone();
        print_ready(r, json)
    };
    let res = attach::run(opts, on_ready, shutdown).await;
    // Devices are gone once `attach::run` returns; now the state files.
    guard.lock().unwrap_or_else(|e| e.into_inner()).take();
    let name = exporter_name
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match res {
        Ok(o) => outcome_to_result(o, &name),
        Err(e) => {
            let hint = if direct {
                direct_token_hint(&e)
            } else {
                String::new()
            };
            Err(exit(e.exit_code(), format!("{e}{hint}")))
        }
    }
}

/// How direct mode's token is given: the token itself, or a file holding it (one of the two;
/// clap refuses both).
pub(crate) const DIRECT_TOKEN_WAYS: &str = "the token itself with --token TOKEN or JMP_TOKEN, \
     or a file holding it with --token-file FILE or JMP_TOKEN_FILE (not both)";

/// What to do when an exporter refuses direct mode's token: which token it wants and where
/// jmp took the one it sent from. Empty for any other error.
pub(crate) fn direct_token_hint(e: &attach::AttachError) -> String {
    match e {
        attach::AttachError::Refused {
            code: jmp_protocol::ErrorCode::Unauthorized,
            ..
        } => format!(
            "; the exporter wants the token in its config's auth.tokenFile: give {DIRECT_TOKEN_WAYS}"
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_address_gets_the_default_port() {
        assert_eq!(resolve("127.0.0.1").expect("resolves").port(), 7700);
        assert_eq!(resolve("127.0.0.1:9").expect("resolves").port(), 9);
    }

    #[test]
    fn every_option_and_subcommand_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for s in cmd.get_subcommands() {
                if s.is_hide_set() || s.get_name() == "help" {
                    continue;
                }
                if s.get_about().is_none() {
                    missing.push(format!("{path} {}", s.get_name()));
                }
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "jmp", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
