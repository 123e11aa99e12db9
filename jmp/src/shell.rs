//! `jmp shell [ATTACH OPTIONS] [-- CMD ARGS]`: a command run with a board attached, the way a
//! test finds its board without parsing `jmp status`: each device's local endpoint is in the
//! command's environment, and `jmp power`/`jmp serial` inside it mean this board.
//!
//! The environment: `JMP_EXPORTER` (the exporter's name; `jmp power` and friends pick the
//! attachment by it), `JMP_LEASE` when attached by lease, and per device `JMP_DEV_<NAME>` (its
//! first local endpoint as text) and, for an address, `JMP_DEV_<NAME>_HOST` and
//! `JMP_DEV_<NAME>_PORT`; `<NAME>` is the device name upper-cased with every other character
//! than A-Z and 0-9 turned into `_` (`ssh-debug` → `JMP_DEV_SSH_DEBUG`). The `DEV_` keeps a
//! device name (chosen by the exporter) from ever naming one of jmp's own variables.

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
    s.extend(device.chars().map(|c| {
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
    for d in &r.devices {
        let base = env_name(&d.name);
        let Some(e) = d.endpoints.first() else {
            continue;
        };
        env.push((base.clone(), e.to_string()));
        if let Local::Address(a) = &e.local {
            env.push((format!("{base}_HOST"), a.ip().to_string()));
            env.push((format!("{base}_PORT"), a.port().to_string()));
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
    let (ready, ours, local) = if let Some(cfg) = &s.exporter_config {
        let (ready, ours) = local_board(&s, cfg)?;
        (ready, ours, true)
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
    let status = std::process::Command::new(&program)
        .args(&rest)
        .envs(environment(&ready))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::DeviceRow;
    use jmp_devices::Endpoint;
    use jmp_protocol::{DeviceState, Kind};

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
    }
}
