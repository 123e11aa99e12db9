//! `jmp shell [ATTACH OPTIONS] [-- CMD ARGS]`: a command run with a board attached, the way a
//! test finds its board without parsing `jmp status`: each device's local endpoint is in the
//! command's environment, and `jmp power`/`jmp serial` inside it mean this board.
//!
//! The environment: `JMP_EXPORTER` (the exporter's name; `jmp power` and friends pick the
//! attachment by it), `JMP_LEASE` when attached by lease, and per device `JMP_DEV_<NAME>` (its
//! first local endpoint as a program takes it: a path, `HOST:PORT` or an interface name, never
//! with jmp's `slcan:` label, so python-can takes it as its channel as is) and, for the first
//! address, `JMP_DEV_<NAME>_HOST` and `JMP_DEV_<NAME>_PORT`; an endpoint with a role (a CAN
//! device's `slcan`, `socketcand`) also as `JMP_DEV_<NAME>_<ROLE>`, with `_HOST`/`_PORT` for
//! an address. `<NAME>` is the device name upper-cased with every other character than A-Z
//! and 0-9 turned into `_` (`ssh-debug` → `JMP_DEV_SSH_DEBUG`). The `DEV_` keeps a device
//! name (chosen by the exporter) from ever naming one of jmp's own variables.

use crate::attach::Ready;
use crate::cli::ShellArgs;
use crate::{exit, state};
use anyhow::Result;
use jmp_devices::Local;
use jmp_protocol::exit as code;
use std::ffi::OsString;

/// `JMP_DEV_<NAME>` for a device name.
pub(crate) fn env_name(device: &str) -> String {
    let mut s = String::from("JMP_DEV_");
    s.push_str(&env_part(device));
    s
}

/// A name as a part of a variable's name: upper-cased, every other character than A-Z and
/// 0-9 turned into `_`.
fn env_part(name: &str) -> String {
    let mut s = String::new();
    s.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

/// The variables a command gets for attachment `r`.
pub(crate) fn environment(r: &Ready) -> Vec<(String, String)> {
    let mut env = vec![("JMP_EXPORTER".to_string(), r.exporter.clone())];
    if let Some(l) = &r.lease {
        env.push(("JMP_LEASE".into(), l.clone()));
    }
    let value = |l: &Local| match l {
        Local::Path(p) | Local::Mount(p) => p.display().to_string(),
        Local::Address(a) => a.to_string(),
        Local::Interface(i) => i.clone(),
    };
    for d in &r.devices {
        let base = env_name(&d.name);
        let Some(e) = d.endpoints.first() else {
            continue;
        };
        env.push((base.clone(), value(&e.local)));
        if let Some(a) = d.endpoints.iter().find_map(|e| match &e.local {
            Local::Address(a) => Some(a),
            _ => None,
        }) {
            env.push((format!("{base}_HOST"), a.ip().to_string()));
            env.push((format!("{base}_PORT"), a.port().to_string()));
        }
        for e in &d.endpoints {
            let Some(role) = &e.role else {
                continue;
            };
            let name = format!("{base}_{}", env_part(role));
            env.push((name.clone(), value(&e.local)));
            if let Local::Address(a) = &e.local {
                env.push((format!("{name}_HOST"), a.ip().to_string()));
                env.push((format!("{name}_PORT"), a.port().to_string()));
            }
        }
    }
    env
}

/// The attach options as typed: the arguments between `shell` and the command (which clap
/// took as the trailing words, after an optional `--`).
fn attach_args(command_len: usize) -> Vec<OsString> {
    let all: Vec<OsString> = std::env::args_os().collect();
    let start = all
        .iter()
        .position(|a| a == "shell")
        .map_or(all.len(), |i| i + 1);
    let mut end = all.len().saturating_sub(command_len).max(start);
    if end > start && all[end - 1] == "--" {
        end -= 1;
    }
    all.get(start..end).unwrap_or_default().to_vec()
}

/// What makes a background child started for the command ours: `--owner-pid` of this
/// process, so it ends with us even if we are killed before we can stop it (a cancelled CI
/// job), unless the user gave another owner.
fn owned_by_us(s: &ShellArgs) -> Vec<OsString> {
    match s.attach.common.owner_pid {
        Some(_) => Vec::new(),
        None => vec!["--owner-pid".into(), std::process::id().to_string().into()],
    }
}

/// `--exporter-config`: the local exporter running with that config, else one started for
/// the command (`Some` state: stop it afterwards).
fn local_board(
    s: &ShellArgs,
    config: &std::path::Path,
) -> Result<(Ready, Option<state::StateFile>)> {
    let wanted = std::fs::canonicalize(config).map_err(|e| {
        exit(
            code::USAGE,
            format!("cannot read {}: {e}", config.display()),
        )
    })?;
    if let Some(existing) = state::local_running() {
        if existing.config.as_deref() == Some(wanted.as_path()) {
            return Ok((existing.ready, None));
        }
        return Err(exit(
            code::USAGE,
            format!(
                "a local exporter is already running with {} (pid {}); `jmp local stop` first",
                existing
                    .config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "the built-in simulated board".into()),
                existing.ready.pid
            ),
        ));
    }
    // Fail here, with the config's own message, rather than in the background child.
    jmp_exporter::ExporterConfig::load(&wanted).map_err(|e| exit(code::USAGE, e.to_string()))?;
    let mut args: Vec<OsString> = vec!["local".into(), "run".into(), "--config".into()];
    args.push(wanted.into_os_string());
    // The other options as typed (--dev-dir, --forward, --name and the kinds' own): `jmp
    // local run` takes the same ones as attach does.
    let mut typed = attach_args(s.command.len()).into_iter();
    while let Some(a) = typed.next() {
        if a == "--exporter-config" {
            typed.next();
        } else if !a.to_string_lossy().starts_with("--exporter-config=") {
            args.push(a);
        }
    }
    args.extend(["-o".into(), "json".into()]);
    args.extend(owned_by_us(s));
    let (_, ready) = state::start_background(&args)?;
    let st = state::local_running()
        .ok_or_else(|| exit(code::FAILURE, "the local exporter ended at once"))?;
    Ok((ready, Some(st)))
}

/// The attachment of this board already running, else one started for the command (`Some`
/// state: stop it afterwards).
fn attached_board(s: &ShellArgs) -> Result<(Ready, Option<state::StateFile>)> {
    attached_board_with(s, None)
}

/// The options typed for `--selector` (`-l`, `--duration`, `--wait`, with their values) are
/// the shell's own, not attach's: dropped from what attach gets.
fn without_lease_request(typed: Vec<OsString>) -> Vec<OsString> {
    const WITH_VALUE: [&str; 4] = ["-l", "--selector", "--duration", "--wait"];
    let mut out = Vec::new();
    let mut it = typed.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if WITH_VALUE.contains(&s.as_ref()) {
            it.next();
            continue;
        }
        let joined = ["--selector=", "--duration=", "--wait="]
            .iter()
            .any(|p| s.starts_with(p))
            || (s.starts_with("-l") && !s.starts_with("--"));
        if !joined {
            out.push(a);
        }
    }
    out
}

/// This program, run as a `jmp` command of its own (stdout captured, stderr the user's).
fn jmp_command(args: &[OsString]) -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| {
        exit(
            code::FAILURE,
            format!("cannot find the jmp executable: {e}"),
        )
    })?;
    let out = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| exit(code::FAILURE, format!("cannot run jmp: {e}")))?;
    if !out.status.success() {
        // Its own message is already on stderr.
        let what: Vec<String> = args
            .iter()
            .take(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return Err(exit(
            out.status.code().unwrap_or(code::FAILURE),
            format!("`jmp {}` failed (above)", what.join(" ")),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `--selector`: a lease made for the command (released afterwards by [`LeaseForCommand`]).
fn lease_for_command(s: &ShellArgs) -> Result<LeaseForCommand> {
    let mut args: Vec<OsString> = vec!["create".into(), "lease".into()];
    for sel in &s.selector {
        args.extend(["--selector".into(), sel.into()]);
    }
    args.extend([
        "--duration".into(),
        s.duration.clone().into(),
        "--wait".into(),
        s.wait.to_string().into(),
        "-o".into(),
        "name".into(),
    ]);
    if let Some(c) = &s.attach.client.client {
        args.extend(["--client".into(), c.into()]);
    }
    let name = jmp_command(&args)?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(exit(
            code::FAILURE,
            format!("jmp create lease printed no lease name: {name:?}"),
        ));
    }
    Ok(LeaseForCommand {
        name,
        client: s.attach.client.client.clone(),
    })
}

/// A lease `jmp shell --selector` made; released when dropped.
struct LeaseForCommand {
    name: String,
    client: Option<String>,
}

impl Drop for LeaseForCommand {
    fn drop(&mut self) {
        let mut args: Vec<OsString> =
            vec!["delete".into(), "lease".into(), self.name.clone().into()];
        if let Some(c) = &self.client {
            args.extend(["--client".into(), c.into()]);
        }
        if jmp_command(&args).is_err() {
            eprintln!(
                "jmp: could not release lease {}; `jmp delete lease {}`",
                self.name, self.name
            );
        }
    }
}

/// As [`attached_board`], attaching lease `lease` when given (made for the command).
fn attached_board_with(
    s: &ShellArgs,
    lease: Option<&str>,
) -> Result<(Ready, Option<state::StateFile>)> {
    if let Some(l) = lease {
        let mut args: Vec<OsString> = vec!["attach".into(), "--lease".into(), l.into()];
        args.extend(without_lease_request(attach_args(s.command.len())));
        args.extend(["-o".into(), "json".into()]);
        let (_, ready) = state::start_background(&args)?;
        let st = state::find(Some(&ready.exporter))?;
        return Ok((ready, Some(st)));
    }
    // An attachment already running for this board is used as it is.
    let by_name = s
        .attach
        .exporter
        .as_deref()
        .filter(|_| s.attach.token_file.is_none() && s.attach.token.is_none());
    let existing = match (&s.attach.lease, by_name) {
        (Some(l), _) => state::all()
            .into_iter()
            .find(|st| st.ready.lease.as_deref() == Some(l.as_str())),
        (None, Some(e)) => state::find(Some(e)).ok(),
        (None, None) if s.attach.exporter.is_none() => state::find(None).ok(),
        _ => None,
    };
    match existing {
        Some(st) => Ok((st.ready, None)),
        None => {
            let mut args: Vec<OsString> = vec!["attach".into()];
            args.extend(attach_args(s.command.len()));
            args.extend(["-o".into(), "json".into()]);
            args.extend(owned_by_us(s));
            let (_, ready) = state::start_background(&args)?;
            let st = state::find(Some(&ready.exporter))?;
            Ok((ready, Some(st)))
        }
    }
}

pub(crate) fn run(s: ShellArgs) -> Result<()> {
    // Released after the attachment is stopped (dropped after `ours` is used below).
    let mut leased = None;
    let (ready, ours, local) = if let Some(cfg) = &s.exporter_config {
        let (ready, ours) = local_board(&s, cfg)?;
        (ready, ours, true)
    } else if !s.selector.is_empty() {
        let lease = leased.insert(lease_for_command(&s)?);
        let (ready, ours) = attached_board_with(&s, Some(&lease.name))?;
        (ready, ours, false)
    } else {
        let (ready, ours) = attached_board(&s)?;
        (ready, ours, false)
    };
    let (program, rest) = match s.command.split_first() {
        Some((p, rest)) => (p.clone(), rest.to_vec()),
        None => (
            std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into()),
            Vec::new(),
        ),
    };
    let mut path = jumpstarter_j().into_iter().collect::<Vec<_>>();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let status = std::process::Command::new(&program)
        .args(&rest)
        .envs(environment(&ready))
        .env(
            "PATH",
            std::env::join_paths(path)
                .unwrap_or_else(|_| std::env::var_os("PATH").unwrap_or_default()),
        )
        .status();
    if let Some(st) = &ours {
        let stopped = if local {
            state::stop_local().map(|_| ())
        } else {
            state::stop_attachment(st)
        };
        if let Err(e) = stopped {
            eprintln!("jmp: {e:#}");
        }
    }
    drop(leased);
    let status = status.map_err(|e| exit(code::FAILURE, format!("cannot run {program:?}: {e}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(c) => Err(exit(c, format!("{program} exited with status {c}"))),
        None => Err(exit(
            code::FAILURE,
            format!("{program} was killed by a signal"),
        )),
    }
}

/// A folder holding `j`, a link to this jmp: Jumpstarter's in-shell CLI is `j` (`j power
/// on`), so recipes copied from it work inside `jmp shell`. In the runtime directory (private
/// to this user); `None`, and no `j`, if it cannot be made.
fn jumpstarter_j() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = crate::paths::runtime_dir();
    crate::paths::check_fallback(&dir).ok()?;
    crate::paths::private_dir(&dir).ok()?;
    let bin = dir.join("bin");
    crate::paths::private_dir(&bin).ok()?;
    let j = bin.join("j");
    if std::fs::read_link(&j).ok().as_deref() != Some(exe.as_path()) {
        // Made beside it and renamed over it: a shell starting meanwhile never misses it.
        let tmp = bin.join(format!(".j.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&exe, &tmp).ok()?;
        std::fs::rename(&tmp, &j).ok()?;
    }
    Some(bin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::DeviceRow;
    use jmp_devices::Endpoint;
    use jmp_protocol::{DeviceState, Kind};

    #[test]
    fn the_lease_request_options_are_not_passed_to_attach() {
        let typed: Vec<OsString> = [
            "-l",
            "board=x",
            "--selector=a=b",
            "-lboard=y",
            "--duration",
            "00:30:00",
            "--wait=5",
            "--dev-dir",
            "/tmp/d",
            "--name",
            "me",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let kept: Vec<String> = without_lease_request(typed)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(kept, ["--dev-dir", "/tmp/d", "--name", "me"]);
    }

    #[test]
    fn each_device_is_one_variable_and_addresses_are_split() {
        let row = |name: &str, kind, e: Vec<Endpoint>| DeviceRow {
            name: name.into(),
            kind,
            local: e.first().map(|e| e.to_string()).unwrap_or_default(),
            endpoints: e,
            state: DeviceState::Available,
            summary: None,
            notes: None,
        };
        let r = Ready {
            exporter: "rpi4-01".into(),
            fingerprint: String::new(),
            pid: 1,
            lease: Some("L1".into()),
            devices: vec![
                row(
                    "console",
                    Kind::Serial,
                    vec![Endpoint::new(Local::Path(
                        "/dev/jmp/rpi4-01/console".into(),
                    ))],
                ),
                row(
                    "ssh-debug",
                    Kind::Tcp,
                    vec![Endpoint::new(Local::Address(
                        "127.0.0.1:2222".parse().expect("addr"),
                    ))],
                ),
                row("power", Kind::Power, vec![]),
                row(
                    "can0",
                    Kind::Can,
                    vec![
                        Endpoint {
                            role: Some("slcan".into()),
                            local: Local::Path("/dev/jmp/rpi4-01/can0".into()),
                        },
                        Endpoint {
                            role: Some("socketcand".into()),
                            local: Local::Address("127.0.0.1:29536".parse().expect("addr")),
                        },
                    ],
                ),
            ],
        };
        let env = environment(&r);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("JMP_EXPORTER"), Some("rpi4-01"));
        assert_eq!(get("JMP_LEASE"), Some("L1"));
        assert_eq!(get("JMP_DEV_CONSOLE"), Some("/dev/jmp/rpi4-01/console"));
        assert_eq!(get("JMP_DEV_SSH_DEBUG"), Some("127.0.0.1:2222"));
        assert_eq!(get("JMP_DEV_SSH_DEBUG_HOST"), Some("127.0.0.1"));
        assert_eq!(get("JMP_DEV_SSH_DEBUG_PORT"), Some("2222"));
        assert_eq!(get("JMP_DEV_POWER"), None, "no endpoint, no variable");
        // python-can's slcan channel as is, and the socketcand port's host and port.
        assert_eq!(get("JMP_DEV_CAN0"), Some("/dev/jmp/rpi4-01/can0"));
        assert_eq!(get("JMP_DEV_CAN0_SLCAN"), Some("/dev/jmp/rpi4-01/can0"));
        assert_eq!(get("JMP_DEV_CAN0_SOCKETCAND"), Some("127.0.0.1:29536"));
        assert_eq!(get("JMP_DEV_CAN0_SOCKETCAND_HOST"), Some("127.0.0.1"));
        assert_eq!(get("JMP_DEV_CAN0_SOCKETCAND_PORT"), Some("29536"));
        assert_eq!(get("JMP_DEV_CAN0_PORT"), Some("29536"));
    }
}
