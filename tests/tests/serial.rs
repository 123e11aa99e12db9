//! The serial console end to end with a real third-party client: pyserial opens the local pty
//! `jmp attach` made, jmpd serves a real pty whose far end (tests/board/echo_board.py) echoes.

use jmp_e2e::*;
use std::path::PathBuf;
use std::time::Duration;

/// The echo board, running, and the slave path jmpd should open.
fn start_board(env: &TestEnv, py: &PathBuf, speed_file: Option<&PathBuf>) -> (Proc, String) {
    let mut cmd = command(py);
    cmd.arg(board_dir().join("echo_board.py"))
        .arg("--record")
        .arg(env.root.join("board-received"));
    if let Some(f) = speed_file {
        cmd.arg("--speed-file").arg(f);
    }
    let mut board = Proc::spawn("echo-board", cmd, &env.logs);
    let slave = board.expect_line(READY, "the board's pty path", |l| l.starts_with("/dev/"));
    (board, slave)
}

fn read_speed(f: &PathBuf) -> Option<u32> {
    std::fs::read_to_string(f).ok()?.trim().parse().ok()
}

#[test]
fn pyserial_all_byte_values_and_bulk_echo() {
    let py = require!(python());
    let env = TestEnv::new("serial-bulk");
    let (_board, slave) = start_board(&env, &py, None);
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "echo-board",
        "127.0.0.1:0",
        &format!("console: {{type: serial, path: {slave}, baudrate: 115200}}"),
    ));
    let (_attach, v) = env.attach(&jmpd, &[]);
    let console = local_of(&v, "console");
    assert_eq!(device(&v, "console")["kind"], "serial", "{v}");
    assert_eq!(
        PathBuf::from(&console),
        env.dev.join("echo-board").join("console"),
        "serial device path must be DIR/<exporter>/<device>"
    );
    assert!(
        std::fs::symlink_metadata(&console).is_ok_and(|m| m.file_type().is_symlink()),
        "{console} is not a symlink"
    );

    let mut cmd = command(&py);
    cmd.arg(board_dir().join("pyserial_bulk.py"))
        .arg(&console)
        .arg((1024 * 1024).to_string())
        .arg("20240607")
        .arg("--all-bytes")
        .arg("--record")
        .arg(env.root.join("board-received"));
    let out = run("pyserial-bulk", cmd, &env.logs, Duration::from_secs(300));
    assert!(
        out.status.success() && out.stdout.contains("OK256") && out.stdout.contains("OK 1048576"),
        "pyserial bulk failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

#[test]
fn pyserial_baud_changes_reach_the_real_port() {
    let py = require!(python());
    let env = TestEnv::new("serial-baud");
    let speed_file = env.root.join("speed");
    let (_board, slave) = start_board(&env, &py, Some(&speed_file));
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "baud-board",
        "127.0.0.1:0",
        &format!("console: {{type: serial, path: {slave}, baudrate: 115200}}"),
    ));
    let (_attach, v) = env.attach(&jmpd, &[]);
    let console = local_of(&v, "console");

    let mut cmd = command(&py);
    cmd.arg(board_dir().join("pyserial_baud.py"))
        .arg(&console)
        .args(["57600", "230400", "250000", "9600"]);
    let mut client = Proc::spawn_with_stdin("pyserial-baud", cmd, &env.logs);
    for (i, baud) in [57600u32, 230400, 250000, 9600].into_iter().enumerate() {
        if i > 0 {
            client.send_line("next");
        }
        client.expect_line(READY, &format!("SET {baud}"), |l| {
            l == format!("SET {baud}")
        });
        let reached = poll_until(READY, || read_speed(&speed_file) == Some(baud));
        assert!(
            reached,
            "the board's port never showed {baud} baud (it shows {:?}) after pyserial set it on {console}",
            read_speed(&speed_file)
        );
    }
}
