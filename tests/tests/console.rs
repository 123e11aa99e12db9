//! `jmp console` on the simulated board, driven in a real terminal (tmux): escape commands
//! (power cycle, break, help, devices, quit), the terminal restored however the console ends, the
//! asciicast recording, and paced typing into a board that reads slowly.

use jmp_e2e::*;
use std::path::Path;
use std::time::Duration;

/// How the console is made to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// `~.` typed.
    Quit,
    /// SIGTERM to `jmp console`.
    Term,
    /// The exporter killed (SIGKILL): the link is lost.
    LostLink,
}

/// A tmux pane running `jmp console` in direct mode against `jmpd`, between two `stty -a`
/// snapshots of the pane's terminal; `jmp console`'s PID goes to `pid`.
fn console_in_tmux(env: &TestEnv, jmpd: &Jmpd, extra: &str) -> Tmux {
    let root = env.root.path();
    let script = root.join("console.sh");
    let body = format!(
        "stty -a > {root}/before\n\
         sh -c 'echo $$ > {root}/pid; exec \"$0\" \"$@\"' env JMP_RUNTIME_DIR={rt} JMP_CONFIG_DIR={cfg} \
         {jmp} console --exporter {addr} --token-file {token} --fingerprint {fp} {extra}\n\
         echo \"CONSOLE EXITED $?\"\n\
         stty -a > {root}/after\n\
         sleep 600\n",
        root = root.display(),
        rt = env.runtime.display(),
        cfg = env.config.display(),
        jmp = jmp_bin().display(),
        addr = jmpd.addr,
        token = env.token_file.display(),
        fp = jmpd.fingerprint,
    );
    std::fs::write(&script, body).expect("write the script");
    Tmux::start(&format!("sh {}", script.display()))
}

fn boots(screen: &str) -> usize {
    screen.matches("U-Boot SPL").count()
}

/// The terminal settings before and after the console are the same.
fn assert_restored(root: &Path, screen: &str) {
    let read = |n: &str| {
        std::fs::read_to_string(root.join(n))
            .unwrap_or_else(|e| panic!("stty snapshot {n}: {e}; pane:\n{screen}"))
    };
    let (before, after) = (read("before"), read("after"));
    assert!(
        before.contains("icanon") && before.contains("echo"),
        "{before}"
    );
    assert_eq!(
        before, after,
        "the terminal was not restored; pane:\n{screen}"
    );
}

fn console_ends(end: End) {
    require!(skips::tool("tmux"));
    let env = TestEnv::new(&format!("console-{end:?}").to_lowercase());
    let mut jmpd = env.start_jmpd(&env.exporter_yaml(
        "cboard",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: cbox}\npower: {type: power-sim}",
    ));
    let rec = env.root.join("session.cast");
    // Typing is recorded only when asked: asked here, to check what the escape keys leave out.
    let tmux = console_in_tmux(
        &env,
        &jmpd,
        &format!("--record {} --record-input", rec.display()),
    );
    // The history is replayed: the boot log and the login prompt.
    tmux.wait_for("the replayed login prompt", READY, |s| {
        s.contains("cbox login:")
    });

    match end {
        End::Quit => {
            tmux.send("~?", false);
            tmux.wait_for("the escape help", READY, |s| {
                s.contains("~p  power cycle the board")
            });
            // Without an attachment the devices key says why there is no list.
            tmux.send("~d", false);
            tmux.wait_for("the devices key's answer", READY, |s| {
                s.contains("no attachment of this board runs here")
            });
            tmux.send("root", true);
            tmux.wait_for("Password:", READY, |s| s.contains("Password:"));
            tmux.send("x", true);
            tmux.wait_for("a shell prompt", READY, |s| s.contains("root@cbox:~#"));
            // `~` inside a line is typed, not an escape.
            tmux.send("echo a~.b", true);
            tmux.wait_for("the echo of a~.b", READY, |s| {
                s.lines().any(|l| l.trim() == "a~.b")
            });
            let before = boots(&tmux.capture());
            tmux.send("~p", false);
            let screen = tmux.wait_for("a second boot and its login prompt", READY, |s| {
                boots(s) > before && s.contains("power: cycled")
            });
            assert!(screen.contains("[jmp console: power cycle]"), "{screen}");
            assert!(screen.contains("cbox login:"), "{screen}");
            tmux.send("~b", false);
            tmux.wait_for("the break's answer", READY, |s| {
                s.contains("break of 250 ms sent")
            });
            tmux.send("~f", false);
            tmux.wait_for("the power-off answer", READY, |s| {
                s.contains("power: switched off; power is off")
            });
            let before = boots(&tmux.capture());
            tmux.send("~o", false);
            // The answer to the key and the boot log race: both must be there, and the new
            // boot must have reached its login prompt.
            tmux.wait_for("a boot after power on, to its login prompt", READY, |s| {
                boots(s) > before
                    && s.contains("power: switched on; power is on")
                    && s.rsplit("U-Boot SPL")
                        .next()
                        .is_some_and(|b| b.contains("cbox login:"))
            });
            // The record key: stops the --record recording, starts a second one beside it,
            // which holds only what happens while it runs, then stops that one.
            tmux.send("~r", false);
            tmux.wait_for("the first recording stopped", READY, |s| {
                s.contains("[jmp console: recording stopped: ")
            });
            tmux.send("~r", false);
            tmux.wait_for("a second recording started", READY, |s| {
                s.contains("session-2.cast]")
            });
            // A login name; the notices above stand between the prompt and its echo, which
            // is a line of its own.
            tmux.send("rec2", true);
            tmux.wait_for(
                "the login name typed into the second recording",
                READY,
                |s| s.lines().any(|l| l.trim() == "rec2"),
            );
            tmux.send("~r", false);
            tmux.wait_for("the second recording stopped", READY, |s| {
                s.contains("recording stopped: ")
                    && s.contains("session-2.cast]")
                    && s.matches("recording stopped").count() >= 2
            });
            tmux.send("~.", false);
        }
        End::Term => {
            let pid: i32 = std::fs::read_to_string(env.root.join("pid"))
                .expect("pid file")
                .trim()
                .parse()
                .expect("a pid");
            // SAFETY: kill(2) on the console's own process, started by this test.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        }
        End::LostLink => {
            jmpd.proc.kill9();
        }
    }
    let screen = tmux.wait_for("the console's exit", READY, |s| {
        s.contains("CONSOLE EXITED")
    });
    let ok = screen.contains("CONSOLE EXITED 0");
    assert_eq!(ok, end == End::Quit, "{screen}");
    tmux.wait_for("the second snapshot", READY, |_| {
        env.root.join("after").exists()
    });
    assert_restored(env.root.path(), &screen);

    // The recording: private to its owner, asciicast v2, events in time order, both
    // directions.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&rec)
            .expect("the recording")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "the recording's mode is {mode:o}");
    }
    let text = std::fs::read_to_string(&rec).expect("the recording");
    let mut lines = text.lines();
    let header: serde_json::Value =
        serde_json::from_str(lines.next().expect("a header")).expect("header JSON");
    assert_eq!(header["version"], 2, "{header}");
    assert!(header["width"].as_u64().is_some_and(|w| w > 0), "{header}");
    let mut last = 0.0;
    let (mut out, mut inp, mut marks) = (String::new(), String::new(), Vec::new());
    for l in lines {
        let ev: serde_json::Value = serde_json::from_str(l).expect("event JSON");
        let t = ev[0].as_f64().expect("a time");
        assert!(t >= last, "time goes back: {l}");
        last = t;
        let data = ev[2].as_str().expect("data");
        match ev[1].as_str().expect("a code") {
            "o" => out.push_str(data),
            "i" => inp.push_str(data),
            "m" => marks.push(data.to_string()),
            c => panic!("unknown event code {c}: {l}"),
        }
    }
    assert!(boots(&out) >= 1, "no boot log recorded: {out:?}");
    if end == End::Quit {
        assert!(boots(&out) >= 2, "the second boot is not recorded: {out:?}");
        // Exactly what was typed, less the escape commands (`~?`, `~p`, `~b`, `~.`), which
        // are markers or nothing.
        assert_eq!(inp, "root\rx\recho a~.b\r");
        assert_eq!(marks, ["power cycle", "break", "power off", "power on"]);
        // The second recording: its own header, and only what was typed while it ran.
        let second =
            std::fs::read_to_string(env.root.join("session-2.cast")).expect("the second recording");
        let mut lines = second.lines();
        let header: serde_json::Value =
            serde_json::from_str(lines.next().expect("a header")).expect("header JSON");
        assert_eq!(header["version"], 2, "{header}");
        let typed: String = lines
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("event JSON"))
            .filter(|ev| ev[1] == "i")
            .map(|ev| ev[2].as_str().expect("data").to_string())
            .collect();
        assert_eq!(typed, "rec2\r");
    }
}

#[test]
fn escape_keys_power_cycle_break_and_quit_restoring_the_terminal() {
    console_ends(End::Quit);
}

#[test]
fn sigterm_restores_the_terminal() {
    console_ends(End::Term);
}

#[test]
fn a_lost_link_restores_the_terminal() {
    console_ends(End::LostLink);
}

/// Lines of a 4 KiB script for the simulated board, and the output each produces.
fn script() -> (String, Vec<String>) {
    let mut text = String::new();
    let mut outs = Vec::new();
    let mut i = 0;
    while text.len() < 4096 {
        let out = format!("L{i:03}-abcdefghijklmnopqrstuvwxyz0123456789");
        text.push_str(&format!("echo {out}\n"));
        outs.push(out);
        i += 1;
    }
    (text, outs)
}

/// What of `outs` the board printed as a line of its own.
fn printed(seen: &str, outs: &[String]) -> usize {
    outs.iter()
        .filter(|o| seen.contains(&format!("\r\n{o}\r\n")))
        .count()
}

#[test]
fn a_pasted_script_reaches_a_slow_reader_whole_only_when_paced() {
    let env = TestEnv::new("console-pace");
    // The board takes one byte per 500 us from a 16-byte FIFO, as a polling bootloader would.
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "pboard",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: slow, slowInput: {charTime: 500us, fifo: 16}}",
    ));
    let (_attach, v) = env.attach(&jmpd, &[]);
    let mut pty = Console::open(local_of(&v, "console"));
    pty.read_until("slow login:", READY);
    let (text, outs) = script();
    assert!(text.len() >= 4096);
    let file = env.root.join("script.txt");
    std::fs::write(&file, format!("root\nx\n{text}")).expect("write the script");
    // `jmp console --send` through the running attachment; it returns once the exporter has
    // written the whole script to the board.
    let send = |args: &[&str]| {
        let mut c = env.jmp();
        c.arg("console").arg("--send").arg(&file).args(args);
        let out = run("jmp-console-send", c, &env.logs, Duration::from_secs(120));
        assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    };

    send(&["--char-delay", "1ms"]);
    let last = outs.last().expect("lines");
    let seen = pty.read_until(&format!("\r\n{last}\r\n"), READY);
    assert_eq!(printed(&seen, &outs), outs.len(), "paced: {seen:?}");

    // The same paste unpaced: the FIFO overflows and lines come out garbled.
    send(&[]);
    // A paced Ctrl-C and marker line: everything before it has been handled.
    std::fs::write(&file, "\x03echo FLUSHED\n").expect("write the marker");
    send(&["--char-delay", "1ms"]);
    let seen = pty.read_until("\r\nFLUSHED\r\n", READY);
    let whole = printed(&seen, &outs);
    assert!(
        whole < outs.len(),
        "unpaced, all {whole} lines arrived whole: {seen:?}"
    );
}

/// `jmp attach --char-delay` paces what any program types on the attachment's pty (a paste
/// in picocom, pyserial's write), overriding the device's own pacing for that attachment.
#[test]
fn an_attachment_paced_by_its_option_delivers_a_paste_whole() {
    let env = TestEnv::new("attach-pace");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "pboard",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: slow, slowInput: {charTime: 500us, fifo: 16}}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &["--char-delay", "1ms"]);
    let mut pty = Console::open(local_of(&v, "console"));
    pty.read_until("slow login:", READY);
    // Logging in is typed as a person would; the paste is one write of the whole script.
    pty.write(b"root\r");
    pty.read_until("Password:", READY);
    pty.write(b"x\r");
    pty.read_until("root@slow:~# ", READY);
    let (text, outs) = script();
    pty.write(text.replace('\n', "\r").as_bytes());
    let last = outs.last().expect("lines");
    let seen = pty.read_until(&format!("\r\n{last}\r\n"), READY);
    assert_eq!(
        printed(&seen, &outs),
        outs.len(),
        "paced by --char-delay: {seen:?}"
    );
    attach.stop();
}

/// The devices key (`~d`, listed in `~?`) shows the board's devices and their local endpoints
/// as `jmp status` does, without leaving the console: here through the running attachment,
/// whose console pty and power switch it lists; the console goes on after it.
#[test]
fn the_devices_key_lists_the_local_devices_without_leaving_the_console() {
    require!(skips::tool("tmux"));
    let env = TestEnv::new("console-devices");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "dboard",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: dbox}\npower: {type: power-sim}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let pty = local_of(&v, "console");
    let root = env.root.path();
    let script = root.join("console.sh");
    std::fs::write(
        &script,
        format!(
            "env JMP_RUNTIME_DIR={rt} JMP_CONFIG_DIR={cfg} {jmp} console\necho \"CONSOLE EXITED $?\"\nsleep 600\n",
            rt = env.runtime.display(),
            cfg = env.config.display(),
            jmp = jmp_bin().display(),
        ),
    )
    .expect("write the script");
    let tmux = Tmux::start(&format!("sh {}", script.display()));
    tmux.wait_for("the replayed login prompt", READY, |s| {
        s.contains("dbox login:")
    });
    tmux.send("~?", false);
    tmux.wait_for("the devices key in the help", READY, |s| {
        s.contains("~d  show the board's devices")
    });
    tmux.send("~d", false);
    let screen = tmux.wait_for("the device list", READY, |s| {
        s.contains("[jmp console: end of devices]")
    });
    let list = screen
        .split("[jmp console: devices]")
        .last()
        .expect("the list");
    assert!(list.contains("dboard"), "names the board: {list}");
    let console_row = list
        .lines()
        .find(|l| l.trim_start().starts_with("console "))
        .unwrap_or_else(|| panic!("a console row: {list}"));
    assert!(console_row.contains(&pty), "its local pty: {console_row}");
    assert!(
        list.lines().any(|l| l.trim_start().starts_with("power ")),
        "a power row: {list}"
    );
    // Still the console: typing reaches the board.
    tmux.send("root", true);
    tmux.wait_for("Password:", READY, |s| s.contains("Password:"));
    tmux.send("~.", false);
    let screen = tmux.wait_for("the console's exit", READY, |s| {
        s.contains("CONSOLE EXITED")
    });
    assert!(screen.contains("CONSOLE EXITED 0"), "{screen}");
    attach.stop();
}

/// The recording's times are the exporter's, not the times output reached the client. The
/// board boots when jmpd starts, then is power cycled with 1.5 s off (jmpd's own timer), so
/// its second boot log was read at least 1.5 s after the first on jmpd's clock. `jmp console
/// --record` then opens the console: both boot logs come as the replayed history, within
/// moments of each other; a recording timed by their arrival would put them together.
#[test]
fn a_recording_is_timed_by_the_exporter() {
    const OFF: f64 = 1.5;
    let env = TestEnv::new("console-timed");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "tboard",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: tbox}\npower: {type: power-sim}",
    ));
    let direct = |c: &mut std::process::Command| {
        c.arg("--exporter")
            .arg(jmpd.addr.to_string())
            .arg("--token-file")
            .arg(&env.token_file)
            .arg("--fingerprint")
            .arg(&jmpd.fingerprint);
    };
    let mut cycle = env.jmp();
    cycle.args(["power", "cycle", "--delay", &format!("{}ms", OFF * 1000.0)]);
    direct(&mut cycle);
    let out = run("power-cycle", cycle, &env.logs, READY);
    assert!(out.status.success(), "power cycle: {}", out.stderr);

    let rec = env.root.join("timed.cast");
    let mut console = env.jmp();
    console.arg("console").arg("--record").arg(&rec);
    direct(&mut console);
    let mut p = Proc::spawn_with_stdin("console", console, &env.logs);
    let both = poll_until(READY, || {
        std::fs::read_to_string(&rec).is_ok_and(|t| boots(&t) >= 2)
    });
    assert!(
        both,
        "the recording never held both boots: {:?}",
        std::fs::read_to_string(&rec)
    );
    p.send_line("~.");
    assert!(p.expect_exit(READY).success(), "{}", p.stderr());

    let text = std::fs::read_to_string(&rec).expect("the recording");
    let mut out = String::new();
    let mut at = Vec::new();
    for l in text.lines().skip(1) {
        let ev: serde_json::Value = serde_json::from_str(l).expect("event JSON");
        if ev[1] != "o" {
            continue;
        }
        let before = boots(&out);
        out.push_str(ev[2].as_str().expect("data"));
        for _ in before..boots(&out) {
            at.push(ev[0].as_f64().expect("a time"));
        }
    }
    assert!(at.len() >= 2, "{text}");
    assert_eq!(
        at[0], 0.0,
        "times count from the first exporter time: {text}"
    );
    assert!(
        at[1] - at[0] >= OFF - 1e-3,
        "the second boot is recorded {:.3} s after the first, though jmpd kept the board off \
         for {OFF} s between them: the times are not the exporter's\n{text}",
        at[1] - at[0]
    );
}
