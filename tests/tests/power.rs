//! `jmp power` end to end: through a running attachment (the simulated board's console, seen
//! with pyserial, goes quiet when off and boots again when on; `jmp status` follows), and on its
//! own one-shot connection to a jmpd whose power device runs commands (a script recording its
//! calls, a failing command, a hanging one), with the exit codes of the table.

use jmp_e2e::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn power_through_the_attachment_silences_and_reboots_the_console() {
    let py = require!(python());
    let env = TestEnv::new("power-attach");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "pboard",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: pboard}\npower: {type: power-sim}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let console = local_of(&v, "console");
    let power = device(&v, "power");
    assert_eq!(power["kind"], "power", "{v}");
    assert_eq!(
        power["endpoints"],
        serde_json::json!([]),
        "power has no local endpoint: {v}"
    );
    assert_eq!(
        power["summary"], "power on",
        "the simulated board starts on: {v}"
    );

    let mut cmd = command(&py);
    cmd.arg(board_dir().join("power_console.py"))
        .arg(&console)
        .arg(jmp_bin())
        .env("JMP_RUNTIME_DIR", &env.runtime)
        .env("JMP_CONFIG_DIR", &env.config);
    let out = run("power-console", cmd, &env.logs, TIMEOUT);
    assert!(
        out.status.success(),
        "power_console.py: {}\n{}",
        out.stdout,
        out.stderr
    );
    let r: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(r["first_boot"], 1, "{r}");
    assert_eq!(r["off"][0], 0, "jmp power off: {r}");
    assert!(
        r["off"][1]
            .as_str()
            .is_some_and(|s| s.contains("switched off")),
        "{r}"
    );
    assert_eq!(r["on"][0], 0, "jmp power on: {r}");
    assert_eq!(
        r["echoed_while_off"], false,
        "an unpowered board echoed: {r}"
    );
    assert_eq!(
        r["second_boot"], 1,
        "the boot log came again after power on: {r}"
    );

    // The state follows in `jmp status` (pushed by the exporter) and in `jmp power status`.
    let mut c = env.jmp();
    c.args(["power", "off"]);
    assert!(run("power-off", c, &env.logs, TIMEOUT).status.success());
    let mut c = env.jmp();
    c.args(["power", "status", "-o", "json"]);
    let st = run("power-status", c, &env.logs, TIMEOUT);
    assert!(st.status.success(), "{}", st.stderr);
    // Nothing was named: the command says which board it acts on.
    assert!(
        st.stderr.contains("jmp: pboard (your attachment"),
        "{}",
        st.stderr
    );
    let sv: serde_json::Value = serde_json::from_str(st.stdout.trim()).expect("json");
    assert_eq!(sv["response"]["response"]["state"], "off", "{sv}");
    let status_shows_off = poll_until(TIMEOUT, || {
        let mut c = env.jmp();
        c.args(["status", "-o", "json"]);
        let o = run("status", c, &env.logs, TIMEOUT);
        serde_json::from_str::<serde_json::Value>(o.stdout.trim())
            .ok()
            .and_then(|v| {
                v[0]["devices"]
                    .as_array()?
                    .iter()
                    .find(|d| d["name"] == "power")
                    .map(|d| d["summary"] == "power off")
            })
            .unwrap_or(false)
    });
    assert!(status_shows_off, "jmp status does not show the power off");
    // A device of another kind, or none of that name: exit 5 naming what exists.
    let mut c = env.jmp();
    c.args(["power", "on", "console"]);
    let o = run("power-wrong-kind", c, &env.logs, TIMEOUT);
    assert_eq!(o.status.code(), Some(5), "{}", o.stderr);
    assert!(o.stderr.contains("power devices: power"), "{}", o.stderr);
    attach.stop();
}

/// A fake relay CLI: records `on`/`off` calls, prints the state for `status`, fails or hangs on
/// request.
fn relay(env: &TestEnv) -> std::path::PathBuf {
    let script = env.root.join("relay.sh");
    let d = env.root.path().display().to_string();
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
case "$1" in
  on|off) echo "$1 $JMP_DEVICE" >> {d}/calls; echo "$1" > {d}/relaystate ;;
  status) cat {d}/relaystate 2>/dev/null || echo off ;;
  fail) echo "relay board busy: port 3 locked" >&2; exit 1 ;;
  hang) sleep 60 ;;
esac
"#
        ),
    )
    .expect("write relay script");
    script
}

#[test]
fn power_without_an_attachment_runs_the_exporters_commands() {
    let env = TestEnv::new("power-direct");
    let r = relay(&env);
    let r = r.display();
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "relayboard",
        "127.0.0.1:0",
        &format!(
            "power: {{type: power, command: {{on: [sh, {r}, on], off: [sh, {r}, off], status: [sh, {r}, status]}}, cycleDelay: 200ms}}\n\
             bad: {{type: power, command: {{on: [sh, {r}, fail], off: [sh, {r}, off]}}}}\n\
             hung: {{type: power, command: {{on: [sh, {r}, hang], off: [sh, {r}, off]}}, timeout: 300ms}}"
        ),
    ));
    let power = |args: &[&str]| {
        let mut c = env.jmp();
        c.arg("power")
            .args(args)
            .arg("--exporter")
            .arg(jmpd.addr.to_string())
            .arg("--token-file")
            .arg(&env.token_file)
            .arg("--fingerprint")
            .arg(&jmpd.fingerprint);
        run("jmp-power", c, &env.logs, TIMEOUT)
    };
    let o = power(&["on", "power"]);
    assert!(o.status.success(), "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "power: switched on; power is on");
    let o = power(&["status", "power"]);
    assert_eq!(o.stdout.trim(), "power: power is on", "{}", o.stderr);
    let o = power(&["cycle", "power", "--delay", "300ms"]);
    assert!(o.status.success(), "{}", o.stderr);
    let calls = std::fs::read_to_string(env.root.join("calls")).expect("calls");
    assert_eq!(calls, "on power\noff power\non power\n");

    // Failures carry the command's stderr and exit 8; a hanging command is killed.
    let o = power(&["on", "bad"]);
    assert_eq!(o.status.code(), Some(8), "{}", o.stderr);
    assert!(
        o.stderr.contains("relay board busy: port 3 locked"),
        "{}",
        o.stderr
    );
    let o = power(&["on", "hung"]);
    assert_eq!(o.status.code(), Some(8), "{}", o.stderr);
    assert!(o.stderr.contains("was killed"), "{}", o.stderr);
    // No such device, and no device named while there are several: exit 5.
    let o = power(&["on", "nope"]);
    assert_eq!(o.status.code(), Some(5), "{}", o.stderr);
    let o = power(&["on"]);
    assert_eq!(o.status.code(), Some(5), "{}", o.stderr);
    assert!(o.stderr.contains("several"), "{}", o.stderr);
    // A bad --delay is a usage error.
    let o = power(&["cycle", "power", "--delay", "soonish"]);
    assert_eq!(o.status.code(), Some(2), "{}", o.stderr);
    // The token from the environment (CI secrets), no file.
    let mut c = env.jmp();
    c.args(["power", "status", "power", "--exporter"])
        .arg(jmpd.addr.to_string())
        .arg("--fingerprint")
        .arg(&jmpd.fingerprint)
        .env("JMP_TOKEN", TOKEN);
    let o = run("jmp-power-env-token", c, &env.logs, TIMEOUT);
    assert!(o.status.success(), "{}", o.stderr);
    assert!(o.stdout.contains("power is"), "{}", o.stdout);
}

#[test]
fn a_one_shot_power_request_never_takes_or_steals_the_board() {
    let env = TestEnv::new("power-oneshot");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "shared",
        "127.0.0.1:0",
        "console: {type: sim-console}\npower: {type: power-sim}",
    ));
    let power = |args: &[&str]| {
        let mut c = env.jmp();
        c.arg("power")
            .args(args)
            .arg("--exporter")
            .arg(jmpd.addr.to_string())
            .arg("--token-file")
            .arg(&env.token_file)
            .arg("--fingerprint")
            .arg(&jmpd.fingerprint);
        run("jmp-power", c, &env.logs, TIMEOUT)
    };
    // Someone else holds the board: refused as busy, naming them, and they keep it.
    let (mut other, _) = env.attach(&jmpd, &["--name", "bob@elsewhere"]);
    let o = power(&["off"]);
    assert_eq!(o.status.code(), Some(4), "{}", o.stderr);
    assert!(o.stderr.contains("bob@elsewhere"), "{}", o.stderr);
    assert!(other.is_running(), "the holder was not disturbed");
    other.stop();
    // Nobody holds it: the request is served, and the board stays free for an attach.
    let o = power(&["off"]);
    assert!(o.status.success(), "{}", o.stderr);
    let (mut mine, v) = env.attach(&jmpd, &[]);
    assert_eq!(device(&v, "power")["summary"], "power off", "{v}");
    mine.stop();
}
