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

/// The attach options as typed: the arguments between `shell` and `--`.
fn attach_args() -> Vec<OsString> {
    let all: Vec<OsString> = std::env::args_os().collect();
    let start = all
        .iter()
        .position(|a| a == "shell")
        .map_or(all.len(), |i| i + 1);
    let end = all.iter().position(|a| a == "--").unwrap_or(all.len());
    all.get(start..end.max(start)).unwrap_or_default().to_vec()
}

pub(crate) fn run(s: ShellArgs) -> Result<()> {
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
    let (ready, ours) = match existing {
        Some(st) => (st.ready, None),
        None => {
            let mut args: Vec<OsString> = vec!["attach".into()];
            args.extend(attach_args());
            args.extend(["-o".into(), "json".into()]);
            let (_, ready) = state::start_background(&args)?;
            let st = state::find(Some(&ready.exporter))?;
            (ready, Some(st))
        }
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
        if let Err(e) = state::stop_attachment(st) {
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
