//! Wrong, malformed or hostile input: the daemon refuses it with a clear message and keeps
//! serving everyone else.

use jmp_e2e::*;
use std::net::UdpSocket;

fn exit_code(st: std::process::ExitStatus) -> Option<i32> {
    st.code()
}

#[test]
fn wrong_token_is_refused_and_the_daemon_keeps_serving() {
    let env = TestEnv::new("badtoken");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "tok-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let bad = env.root.join("bad-token");
    write_private(&bad, "not-the-token\n");
    let mut cmd = env.jmp();
    cmd.arg("attach")
        .arg("--exporter")
        .arg(jmpd.addr.to_string())
        .arg("--token-file")
        .arg(&bad)
        .arg("--fingerprint")
        .arg(&jmpd.fingerprint)
        .arg("--dev-dir")
        .arg(&env.dev)
        .args(["-o", "json"]);
    let out = run("jmp-attach-badtoken", cmd, &env.logs, READY);
    assert_eq!(
        exit_code(out.status),
        Some(3),
        "wrong token must exit 3\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("invalid token"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        poll_until(READY, || {
            let log = jmpd.proc.stderr();
            log.contains("refused") && log.contains("invalid token")
        }),
        "jmpd's log does not mention the refusal:\n{}",
        jmpd.proc.stderr()
    );
    // No device was left behind by the refused attempt.
    assert!(
        !env.dev.join("tok-board").join("console").exists(),
        "a refused attach left a console behind"
    );

    // Without --fingerprint (trust on first use): the refusal says where the token goes, in
    // the order jmp looks (the token itself, else its file), and an exporter that refused our
    // token is not recorded as trusted.
    let mut cmd = env.jmp();
    cmd.arg("attach")
        .arg("--exporter")
        .arg(jmpd.addr.to_string())
        .arg("--dev-dir")
        .arg(&env.dev)
        .env("JMP_TOKEN", "not-the-token")
        .env_remove("JMP_TOKEN_FILE");
    let out = run("jmp-attach-badtoken-tofu", cmd, &env.logs, READY);
    assert_eq!(exit_code(out.status), Some(3), "stderr: {}", out.stderr);
    let err = &out.stderr;
    assert!(err.contains("auth.tokenFile"), "stderr: {err}");
    let at = |s: &str| err.find(s).unwrap_or_else(|| panic!("{s} missing: {err}"));
    assert!(
        at("--token TOKEN or JMP_TOKEN") < at("--token-file FILE or JMP_TOKEN_FILE"),
        "stderr: {err}"
    );
    let known = std::fs::read_to_string(env.config.join("known_exporters")).unwrap_or_default();
    assert!(
        !known.contains(&jmpd.addr.port().to_string()),
        "an exporter that refused the token became trusted: {known}"
    );

    let (_attach, v) = env.attach(&jmpd, &[]);
    let mut c = Console::open(local_of(&v, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
}

#[test]
fn unknown_config_field_is_named_by_check_config() {
    let env = TestEnv::new("badcfg");
    let yaml = env.exporter_yaml(
        "cfg-board",
        "127.0.0.1:0",
        "console: {type: serial, path: /dev/ttyUSB0, baud: 115200}",
    );
    let cfg = env.write_config(&yaml);
    let mut cmd = command(jmpd_bin());
    cmd.arg("--config").arg(&cfg).arg("--check-config");
    let out = run("jmpd-check", cmd, &env.logs, READY);
    assert_eq!(exit_code(out.status), Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("jmpd: error:"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("unknown field `baud`"),
        "stderr must name the field: {}",
        out.stderr
    );

    // A typo in a device's table names the device, the field and the line.
    assert!(out.stderr.contains("export.console"), "{}", out.stderr);
    assert!(out.stderr.contains("(line "), "{}", out.stderr);
    // A missing config file is reported once, with its path.
    let missing = env.root.join("nowhere.yaml");
    let mut cmd = command(jmpd_bin());
    cmd.arg("--config").arg(&missing);
    let out = run("jmpd-missing", cmd, &env.logs, READY);
    assert_eq!(exit_code(out.status), Some(2));
    assert_eq!(
        out.stderr.matches("No such file").count(),
        1,
        "reported once: {}",
        out.stderr
    );
    assert!(out.stderr.contains(&missing.display().to_string()));

    // Every problem of a config is reported at once, not only the first.
    let many = env.write_config(&env.exporter_yaml(
        "cfg-board",
        "nowhere",
        "console: {type: serial, path: /dev/ttyUSB0, baud: 115200}\n  \
             power: {type: power, command: {on: [true], off: [true]}, cycleDelay: soon}",
    ));
    let mut cmd = command(jmpd_bin());
    cmd.arg("--config").arg(&many).arg("--check-config");
    let out = run("jmpd-check-many", cmd, &env.logs, READY);
    assert_eq!(exit_code(out.status), Some(2), "stderr: {}", out.stderr);
    for want in [
        "3 problems",
        "unknown field `baud`",
        "export.power.cycleDelay",
        "listen \"nowhere\"",
    ] {
        assert!(out.stderr.contains(want), "{want} missing: {}", out.stderr);
    }

    // And the good version of the same config passes.
    let good = env.write_config(&yaml.replace("baud:", "baudrate:"));
    let mut cmd = command(jmpd_bin());
    cmd.arg("--config").arg(&good).arg("--check-config");
    let out = run("jmpd-check-good", cmd, &env.logs, READY);
    assert!(out.status.success(), "stderr: {}", out.stderr);
}

#[test]
fn missing_serial_port_is_unavailable_but_the_rest_works() {
    let env = TestEnv::new("nope");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "half-board",
        "127.0.0.1:0",
        "uart: {type: serial, path: /dev/ttyNOPE0, baudrate: 115200}\nconsole: {type: sim-console}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let uart = device(&v, "uart");
    // The state and its reason are shown, typed, in -o json (and so in jmp status).
    assert_eq!(uart["state"], "unavailable", "{uart}");
    assert!(
        uart["reason"]
            .as_str()
            .is_some_and(|r| r.contains("/dev/ttyNOPE0")),
        "{uart}"
    );
    let mut st = env.jmp();
    st.args(["status"]);
    let status = run("status", st, &env.logs, READY);
    assert!(
        status.stdout.contains("unavailable") && status.stdout.contains("/dev/ttyNOPE0"),
        "jmp status shows the device's state and why: {}",
        status.stdout
    );
    let mut c = Console::open(local_of(&v, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
    sim_login_and_echo(&mut c, "half-board-ok");
    // If jmp made a local endpoint for the missing port, using it must not take jmp down.
    if let Some(p) = uart["local"]
        .as_str()
        .filter(|p| std::path::Path::new(p).exists())
    {
        let mut u = Console::open(p);
        u.write(b"hello\r");
        u.read_some(std::time::Duration::from_millis(500));
    }
    assert!(attach.is_running(), "{}", attach.describe());
    let mut jmpd = jmpd;
    assert!(jmpd.proc.is_running(), "{}", jmpd.proc.describe());
}

/// A storage medium the exporter cannot open is listed with its reason and the rest of the
/// board is attached (it used to end the whole `jmp attach` with the bridge's error).
#[test]
fn missing_storage_image_is_unavailable_but_the_rest_works() {
    let env = TestEnv::new("nosd");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "no-card-board",
        "127.0.0.1:0",
        "sd: {type: storage, path: /nonexistent-jmp-test/card.img}\nconsole: {type: sim-console}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let sd = device(&v, "sd");
    assert_eq!(sd["state"], "unavailable", "{sd}");
    assert!(
        sd["reason"]
            .as_str()
            .is_some_and(|r| r.contains("/nonexistent-jmp-test/card.img")),
        "{sd}"
    );
    let mut c = Console::open(local_of(&v, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
    sim_login_and_echo(&mut c, "no-card-ok");
    assert!(attach.is_running(), "{}", attach.describe());
}

#[test]
fn garbage_udp_does_not_hurt_the_daemon() {
    let env = TestEnv::new("garbage");
    let mut jmpd = env.start_jmpd(&env.exporter_yaml(
        "tough-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let noise = pseudo_random(2 * 1024 * 1024, 99);
    let mut off = 0usize;
    for i in 0..1000usize {
        let len = 1 + (noise[i] as usize * 7 + i) % 1400;
        let _ = sock.send_to(&noise[off..off + len], jmpd.addr);
        off = (off + len) % (noise.len() - 2000);
    }
    // Long-header-looking Initials: 0xc0 | random, version 1, random connection ids.
    for i in 0..50usize {
        let mut p = noise[i * 1200..(i + 1) * 1200].to_vec();
        p[0] = 0xc0 | (p[0] & 0x0f);
        p[1..5].copy_from_slice(&[0, 0, 0, 1]);
        p[5] = (i % 21) as u8; // DCID length, sometimes past the limit of 20
        let _ = sock.send_to(&p, jmpd.addr);
    }
    // And a few with other versions (version negotiation must not be an amplifier or a crash).
    for i in 0..10usize {
        let mut p = noise[i * 1200..(i + 1) * 1200].to_vec();
        p[0] = 0xc0;
        p[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
        p[5] = 8;
        let _ = sock.send_to(&p, jmpd.addr);
    }
    assert!(jmpd.proc.is_running(), "{}", jmpd.proc.describe());
    let (_attach, v) = env.attach(&jmpd, &[]);
    let mut c = Console::open(local_of(&v, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
    assert!(jmpd.proc.is_running(), "{}", jmpd.proc.describe());
}

#[test]
fn second_client_is_told_who_holds_the_board() {
    let env = TestEnv::new("busy-alice");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "shared-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let (mut alice, _v) = env.attach(&jmpd, &["--name", "alice"]);

    // Bob is another user: his own runtime, config and device directories.
    let bob_env = TestEnv::new("busy-bob");
    let cmd = bob_env.attach_cmd(&jmpd, &["--name", "bob"]);
    let out = run("jmp-attach-bob", cmd, &bob_env.logs, READY);
    assert_eq!(
        exit_code(out.status),
        Some(4),
        "a second client must exit 4\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("alice"),
        "stderr must name the holder: {}",
        out.stderr
    );
    assert!(alice.is_running(), "{}", alice.describe());
}
