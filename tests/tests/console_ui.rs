//! Interactive terminal programs (picocom, tio) on the local pty, driven through tmux: the
//! console of a simulated board must be usable exactly as a local serial port is.

use jmp_e2e::*;
use std::time::Duration;

fn login_through(tool: &str, command: impl Fn(&str) -> String) {
    for t in [tool, "tmux"] {
        require!(skips::tool(t));
    }
    let env = TestEnv::new(&format!("ui-{tool}"));
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "ui-board",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: uibox}",
    ));
    let (_attach, v) = env.attach(&jmpd, &[]);
    let console = local_of(&v, "console");

    // The shell around the tool keeps the pane (and the tool's complaint) if it exits.
    let tmux = Tmux::start(&format!(
        "sh -c '{}; echo \"TOOL EXITED $?\"; sleep 600'",
        command(&console)
    ));
    // The replayed boot log normally shows the prompt; a terminal program may flush pending
    // input when it opens the port, so Enter asks for a fresh prompt if it is not there yet.
    let shown = poll_until(Duration::from_secs(5), || tmux.capture().contains("login:"));
    if !shown {
        tmux.send("", true);
    }
    tmux.wait_for("the login prompt", READY, |s| s.contains("uibox login:"));
    tmux.send("root", true);
    tmux.wait_for("Password:", READY, |s| s.contains("Password:"));
    tmux.send("x", true);
    tmux.wait_for("a shell prompt", READY, |s| s.contains("root@uibox:~#"));
    tmux.send("echo hello-e2e", true);
    let screen = tmux.wait_for("the echo's output line", READY, |s| {
        s.lines().any(|l| l.trim() == "hello-e2e")
    });
    assert!(!screen.contains("TOOL EXITED"), "{tool} exited:\n{screen}");
}

#[test]
fn picocom_logs_into_the_sim_board() {
    login_through("picocom", |p| format!("picocom -b 115200 {p}"));
}

#[test]
fn tio_logs_into_the_sim_board() {
    login_through("tio", |p| format!("tio -b 115200 {p}"));
}
