//! `jmp shell`: a command runs with the board attached and finds each device in its
//! environment; `jmp power` inside it means this board; the attachment it made is gone after;
//! the command's exit status is jmp's; `<dev dir>/current` names the newest attachment.

use jmp_e2e::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_command_gets_the_boards_devices_and_the_attachment_goes_with_it() {
    let env = TestEnv::new("shell");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "shell-board",
        "127.0.0.1:0",
        "console: {type: sim-console}\npower: {type: power-sim}\nweb: {type: tcp, host: 127.0.0.1, port: 9}",
    ));
    let script = format!(
        r#"set -e
test -L "$JMP_DEV_CONSOLE"
echo "console=$JMP_DEV_CONSOLE"
echo "web=$JMP_DEV_WEB_HOST:$JMP_DEV_WEB_PORT"
echo "exporter=$JMP_EXPORTER"
test "$(readlink {dev}/current)" = shell-board
"{jmp}" power off
"{jmp}" power status
"#,
        dev = env.dev.display(),
        jmp = jmp_bin().display()
    );
    let mut c = env.jmp();
    c.arg("shell")
        .arg("--exporter")
        .arg(jmpd.addr.to_string())
        .arg("--token-file")
        .arg(&env.token_file)
        .arg("--fingerprint")
        .arg(&jmpd.fingerprint)
        .arg("--dev-dir")
        .arg(&env.dev)
        .args(["--", "sh", "-c", &script]);
    let out = run("jmp-shell", c, &env.logs, T);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let console = env.dev.join("shell-board").join("console");
    assert!(
        out.stdout
            .contains(&format!("console={}", console.display())),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("web=127.0.0.1:"), "{}", out.stdout);
    assert!(
        out.stdout.contains("exporter=shell-board"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("power: power is off"), "{}", out.stdout);
    // The attachment `jmp shell` made is gone, with its devices and `current`.
    assert!(
        std::fs::symlink_metadata(&console).is_err(),
        "the console link is gone"
    );
    assert!(std::fs::symlink_metadata(env.dev.join("current")).is_err());
    let mut s = env.jmp();
    s.args(["status", "-o", "json"]);
    assert_eq!(run("status", s, &env.logs, T).stdout.trim(), "[]");

    // The command's status is jmp's.
    let mut c = env.jmp();
    c.arg("shell")
        .arg("--exporter")
        .arg(jmpd.addr.to_string())
        .arg("--token-file")
        .arg(&env.token_file)
        .arg("--fingerprint")
        .arg(&jmpd.fingerprint)
        .arg("--dev-dir")
        .arg(&env.dev)
        .args(["--", "sh", "-c", "exit 3"]);
    assert_eq!(
        run("jmp-shell-exit", c, &env.logs, T).status.code(),
        Some(3)
    );
}

#[test]
fn inside_a_running_attachment_the_shell_uses_it_and_leaves_it() {
    let env = TestEnv::new("shell-existing");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "kept-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let mut c = env.jmp();
    c.args(["shell", "--", "sh", "-c", "echo \"$JMP_DEV_CONSOLE\""]);
    let out = run("jmp-shell-existing", c, &env.logs, T);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), local_of(&v, "console"));
    assert!(
        attach.is_running(),
        "the shell did not stop an attachment it did not make"
    );
    attach.stop();
}
