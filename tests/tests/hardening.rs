//! What a hostile peer or a careless environment must not be able to do: an exporter sending
//! names that would climb out of the device directory, terminal escapes or thousands of
//! devices; a closed pipe under `jmp status`; a squatted runtime directory; a recycled pid in a
//! stale state file; a crashed attach locking its own client out; a second `local start`
//! with another config.

use bytes::Bytes;
use jmp_e2e::*;
use jmp_protocol::*;
use jmp_transport::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Every path under `root`, for "nothing else changed" checks.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(p: &Path, out: &mut BTreeSet<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let path = e.path();
                out.insert(path.clone());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, &mut out);
    out
}

/// A test double of an exporter speaking the real protocol: it welcomes anyone with
/// `welcome` (whatever names it holds), on its own thread and runtime.
fn hostile_exporter(welcome: Welcome) -> (std::net::SocketAddr, String) {
    let id = Identity::generate().expect("identity");
    let fp = id.fingerprint().to_string();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let ep = server_endpoint(sock, &id, ALPN_EXPORTER).expect("endpoint");
            let _ = ready_tx.send(());
            while let Some(inc) = ep.accept().await {
                let w = welcome.clone();
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    let Ok(mut link) = Link::exporter(conn).await else {
                        return;
                    };
                    while let Some(ev) = link.events.recv().await {
                        match ev {
                            LinkEvent::Hello(_) => link.handle.welcome(w.clone()),
                            LinkEvent::Ended { .. } => break,
                            _ => {}
                        }
                    }
                });
            }
        });
    });
    ready_rx.recv_timeout(T).expect("the double is listening");
    (addr, fp)
}

fn dev(name: &str) -> DeviceInfo {
    DeviceInfo {
        name: name.into(),
        kind: Kind::Serial,
        state: DeviceState::Available,
        params: Bytes::new(),
        detail: String::new(),
    }
}

#[test]
fn a_hostile_exporter_cannot_make_paths_outside_the_device_directory() {
    let env = TestEnv::new("hostile");
    // The device directory lives in its own folder, so anything created beside it shows.
    let arena = env.root.join("arena");
    let devdir = arena.join("dev");
    std::fs::create_dir_all(&devdir).expect("mkdir");
    let victim = arena.join("victim");
    std::fs::create_dir_all(&victim).expect("mkdir");
    std::os::unix::fs::symlink("/etc/hostname", victim.join("config")).expect("a root-owned link");
    let before = tree(&arena);
    let many: Vec<DeviceInfo> = (0..4090).map(|i| dev(&format!("d{i}"))).collect();
    let cases: Vec<(&str, Welcome, &str)> = vec![
        (
            "exporter name climbing out",
            Welcome {
                exporter: "x/../../victim/config".into(),
                features: 0,
                instance: 1,
                devices: vec![dev("console")],
            },
            "exporter name",
        ),
        (
            "device name climbing out",
            Welcome {
                exporter: "board".into(),
                features: 0,
                instance: 1,
                devices: vec![dev("../victim/config")],
            },
            "device name",
        ),
        (
            "terminal escapes in a name",
            Welcome {
                exporter: "evil\u{1b}[2J\u{1b}]0;pwned\u{7}".into(),
                features: 0,
                instance: 1,
                devices: vec![dev("console")],
            },
            "exporter name",
        ),
        (
            "4090 devices",
            Welcome {
                exporter: "board".into(),
                features: 0,
                instance: 1,
                devices: many,
            },
            "device count",
        ),
    ];
    for (what, welcome, want) in cases {
        let (addr, fp) = hostile_exporter(welcome);
        let mut c = env.jmp();
        c.arg("attach")
            .arg("--exporter")
            .arg(addr.to_string())
            .arg("--token-file")
            .arg(&env.token_file)
            .arg("--fingerprint")
            .arg(&fp)
            .arg("--dev-dir")
            .arg(&devdir);
        let out = run("jmp-attach-hostile", c, &env.logs, T);
        assert!(
            !out.status.success(),
            "{what}: attach must fail: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(want),
            "{what}: the refusal names {want}: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains('\u{1b}') && !out.stdout.contains('\u{1b}'),
            "{what}: a terminal escape reached the terminal: {:?}",
            out.stderr
        );
        assert_eq!(
            tree(&arena),
            before,
            "{what}: something changed beside the device directory"
        );
        assert_eq!(
            std::fs::read_link(victim.join("config")).ok(),
            Some(PathBuf::from("/etc/hostname")),
            "{what}: the link outside was replaced"
        );
    }
}

#[test]
fn output_into_a_closed_pipe_is_a_quiet_success() {
    let env = TestEnv::new("epipe");
    // A pipe whose reader is already gone: every write fails with EPIPE, deterministically.
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    for args in [&["status"][..], &["trust", "list"][..], &["--help"][..]] {
        let mut c = env.jmp();
        c.args(args)
            .stdout(Stdio::from(w.try_clone().expect("dup")))
            .stderr(Stdio::piped());
        let out = c.output().expect("run jmp");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "jmp {args:?} panicked: {err}");
        assert!(
            out.status.success() || out.status.code().is_none(),
            "jmp {args:?} into a closed pipe: {:?}: {err}",
            out.status
        );
    }
}

#[test]
fn a_runtime_directory_someone_else_made_is_refused() {
    require!(skips::root());
    let env = TestEnv::new("squat");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "squat-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let squatted = env.root.join("squatted");
    std::fs::create_dir_all(&squatted).expect("mkdir");
    nix::unistd::chown(&squatted, Some(nix::unistd::Uid::from_raw(4242)), None).expect("chown");
    let mut c = env.attach_cmd(&jmpd, &[]);
    c.env("JMP_RUNTIME_DIR", &squatted);
    let out = run("attach-squatted", c, &env.logs, T);
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(out.stderr.contains("belongs to uid 4242"), "{}", out.stderr);
    let open = env.root.join("open");
    std::fs::create_dir_all(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let mut c = env.attach_cmd(&jmpd, &[]);
    c.env("JMP_RUNTIME_DIR", &open);
    let out = run("attach-open", c, &env.logs, T);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("writable by other users"),
        "{}",
        out.stderr
    );
    assert!(
        std::fs::read_dir(&open).expect("list").next().is_none(),
        "nothing was written into it"
    );
}

#[test]
fn a_crashed_attach_is_replaced_at_once_and_its_leftovers_cleaned() {
    let env = TestEnv::new("crash");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "crash-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let (mut first, v) = env.attach(&jmpd, &[]);
    let link = local_of(&v, "console");
    first.kill9();
    assert!(
        std::fs::symlink_metadata(&link).is_ok(),
        "kill -9 leaves the link (nothing could remove it)"
    );
    // `jmp status` notices the dead attachment and removes what it left.
    let mut c = env.jmp();
    c.args(["status", "-o", "json"]);
    let out = run("status", c, &env.logs, T);
    assert_eq!(out.stdout.trim(), "[]", "{}", out.stderr);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the dead attachment's console link is gone, so it cannot lead into a reused pty"
    );
    // The same client attaching again right away replaces its dead session instead of being
    // told the board is busy until the old connection times out.
    let (mut second, v2) = env.attach(&jmpd, &[]);
    let mut c = Console::open(local_of(&v2, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
    second.stop();
}

#[test]
fn detach_never_signals_a_process_that_reused_a_recorded_pid() {
    let env = TestEnv::new("pidreuse");
    // An unrelated process, and a state file claiming its pid with another start time (as if
    // the attachment had died and the pid had been given to this one).
    let mut bystander = Proc::spawn(
        "bystander",
        {
            let mut c = command("sleep");
            c.arg("60");
            c
        },
        &env.logs,
    );
    let state = serde_json::json!({
        "ready": {"exporter": "ghost", "fingerprint": "sha256:00", "pid": bystander.pid(), "devices": []},
        "socket": env.runtime.join("attach-ghost.sock"),
        "log": null,
        "start_time": 1,
    });
    std::fs::write(env.runtime.join("attach-ghost.json"), state.to_string()).expect("write");
    let mut c = env.jmp();
    c.args(["detach", "ghost"]);
    let out = run("detach-ghost", c, &env.logs, T);
    assert_eq!(
        out.status.code(),
        Some(5),
        "a stale attachment is not there: {}",
        out.stderr
    );
    assert!(
        bystander.is_running(),
        "detach signalled an unrelated process"
    );
    assert!(
        !env.runtime.join("attach-ghost.json").exists(),
        "the stale file is removed"
    );
    // The rule of one-object verbs: nothing there is exit 5; --all with nothing is success.
    let mut c = env.jmp();
    c.args(["detach"]);
    assert_eq!(run("detach-none", c, &env.logs, T).status.code(), Some(5));
    let mut c = env.jmp();
    c.args(["detach", "--all"]);
    assert!(run("detach-all-none", c, &env.logs, T).status.success());
    bystander.stop();
}

#[test]
fn local_start_with_another_config_fails_unless_restarted() {
    let env = TestEnv::new("local-conflict");
    let start = |extra: &[&str]| {
        let mut c = env.jmp();
        c.args(["local", "start", "-o", "json", "--dev-dir"])
            .arg(&env.dev)
            .args(extra);
        c
    };
    let out = run("local-start", start(&[]), &env.logs, T);
    assert!(out.status.success(), "{}", out.stderr);
    let first: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let pid = first["pid"].as_i64().expect("pid") as i32;
    let mut guard = DaemonGuard {
        env: &env,
        pid,
        stop_args: vec!["local".into(), "stop".into()],
        stopped: false,
    };
    // The same again: idempotent, the same attachment.
    let again = run("local-start-again", start(&[]), &env.logs, T);
    assert!(again.status.success());
    let v: serde_json::Value = serde_json::from_str(again.stdout.trim()).expect("json");
    assert_eq!(v["pid"], first["pid"]);
    // Another config: refused, naming both, until --restart.
    let cfg = env.write_config(&env.exporter_yaml(
        "other-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    let mut c = start(&["--config"]);
    c.arg(&cfg);
    let conflict = run("local-start-other", c, &env.logs, T);
    assert_eq!(conflict.status.code(), Some(2), "{}", conflict.stderr);
    assert!(
        conflict.stderr.contains("already running"),
        "{}",
        conflict.stderr
    );
    let mut c = start(&["--restart", "--config"]);
    c.arg(&cfg);
    let restarted = run("local-start-restart", c, &env.logs, T);
    assert!(restarted.status.success(), "{}", restarted.stderr);
    let v: serde_json::Value = serde_json::from_str(restarted.stdout.trim()).expect("json");
    assert_eq!(v["exporter"], "other-board");
    assert!(
        poll_until(T, || !pid_alive(pid)),
        "the first local exporter was stopped"
    );
    guard.pid = v["pid"].as_i64().expect("pid") as i32;
    let out = guard.stop();
    assert!(out.status.success());
}

#[test]
fn a_flood_of_unauthenticated_connections_is_bounded_and_the_holder_is_served() {
    let env = TestEnv::new("flood");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "flood-board",
        "127.0.0.1:0",
        "console: {type: sim-console}",
    ));
    // The holder attaches first; the flood comes from the same address.
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let mut console = Console::open(local_of(&v, "console"));
    console.write(b"\r");
    console.read_until("login: ", READY);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fp: Fingerprint = jmpd.fingerprint.parse().expect("fingerprint");
    let limits = jmp_transport::gate::Limits::default();
    let (_ep, conns, refused, took) = rt.block_on(async {
        let ep = client_endpoint(jmpd.addr).expect("endpoint");
        let mut conns = Vec::new();
        let mut refused = 0;
        let start = std::time::Instant::now();
        // Handshakes that never say Hello, faster and more than one address may start.
        for _ in 0..48 {
            match connect_without_retry(&ep, jmpd.addr, ALPN_EXPORTER, Some(fp)).await {
                Ok((c, _)) => conns.push(c),
                Err(_) => refused += 1,
            }
        }
        (ep, conns, refused, start.elapsed())
    });
    // The gate's promise, whatever the machine's load: one address gets its burst and then
    // `rate` a second. (On a quiet machine the 48 take well under a second, so about 16 are
    // refused; on a loaded one the bucket refills while they are made, and the bound says how
    // many may pass in the time they took.)
    let may_pass = limits.per_source + (limits.rate * took.as_secs_f64()).ceil() as usize;
    assert!(
        conns.len() <= may_pass,
        "{} of 48 accepted ({refused} refused) in {took:?}; one address may start {} at once and {} a second",
        conns.len(),
        limits.per_source,
        limits.rate
    );
    // The holder's session goes on during the flood.
    sim_login_and_echo(&mut console, "during-the-flood");
    // Every connection that never said Hello is closed by the exporter (at the handshake
    // deadline), not kept forever.
    rt.block_on(async {
        for c in &conns {
            tokio::time::timeout(T, c.closed())
                .await
                .expect("closed by jmpd");
        }
    });
    assert!(attach.is_running(), "the holder survived the flood");
    drop(console);
    attach.stop();
    // After the flood, the address attaches again.
    let (mut again, _) = env.attach(&jmpd, &[]);
    again.stop();
}
