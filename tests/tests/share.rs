//! Sharing a leased board with a colleague (issue 21 item 2), with the real controller, jmpd
//! and jmp: a share to a client whose own policy forbids the exporter is refused; a colleague
//! sharing read-only is refused the board's controls (a power switch) with a clear message,
//! with `--control` it switches the power; it attaches beside the holder (its own pty
//! directory), the holder's `jmp status` shows it there (text and JSON), and `jmp unshare`
//! detaches it with the reason while the holder stays attached and stops showing it.

use jmp_e2e::lab::*;
use jmp_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A controller-mode jmpd config with a simulated console and power switch.
fn board_config(lab: &Lab, name: &str, token: &Path) -> PathBuf {
    let state = lab.env.root.join(format!("state-{name}"));
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  console: {{type: sim-console}}\n  power: {{type: power-sim}}\n",
        state.display(),
        token.display()
    );
    let p = lab.env.root.join(format!("{name}.exporter.yaml"));
    std::fs::write(&p, yaml).expect("write exporter config");
    p
}

/// Waits for one more `needle` on `p`'s stderr than `before` (a colleague's `jmp power` is a
/// short guest session too, so the holder may have said it before).
fn wait_another(p: &mut Proc, needle: &str, before: usize) {
    let ok = poll_until(LONG, || {
        p.stderr().matches(needle).count() > before || !p.is_running()
    });
    assert!(
        ok && p.stderr().matches(needle).count() > before,
        "no new {needle:?} on stderr of {}",
        p.describe()
    );
}

/// The holder's `jmp status -o json`: its one attachment's colleagues attached beside it.
fn guests_in_status(lab: &Lab) -> Vec<Value> {
    let out = lab.ok(
        "status-json",
        lab.as_client("holder", &["status", "-o", "json"]),
    );
    let all: Vec<Value> = serde_json::from_str(&out).expect("a JSON list");
    assert_eq!(all.len(), 1, "one attachment: {out}");
    all[0]["guests"].as_array().cloned().unwrap_or_default()
}

fn shares_seen_by(lab: &Lab, client: &str, lease: &str) -> Vec<Value> {
    let out = lab.ok(
        "get-leases",
        lab.as_client(client, &["get", "leases", "-o", "json"]),
    );
    let leases: Vec<Value> = serde_json::from_str(&out).expect("a JSON list");
    let l = find_lease(&leases, lease).unwrap_or_else(|| panic!("{client} sees no {lease}: {out}"));
    l["shares"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_colleague_watches_read_only_controls_with_control_and_is_detached_by_unshare() {
    let lab = Lab::new("share");
    let token = lab.create_exporter("board-01", &["board=a"]);
    let _jmpd = lab.start_jmpd(&board_config(&lab, "board-01", &token));
    lab.create_client("holder", &[]);
    lab.create_client("colleague", &[]);
    lab.create_client("only-b", &["--allow", "board=b"]);
    let out = lab.ok(
        "create-lease",
        lab.as_client(
            "holder",
            &[
                "create",
                "lease",
                "-l",
                "board=a",
                "--duration",
                "10m",
                "-o",
                "json",
            ],
        ),
    );
    let lease = lease_json(&out)["name"]
        .as_str()
        .expect("a lease name")
        .to_string();

    // A client whose policy forbids the exporter: no share, and no way around it.
    let out = lab.run(
        "share-forbidden",
        lab.as_client("holder", &["share", "lease", &lease, "--with", "only-b"]),
    );
    assert!(
        !out.status.success() && out.stderr.contains("policy of client only-b"),
        "{}",
        show(&out)
    );
    let out = lab.run(
        "only-b-power",
        lab.as_client("only-b", &["power", "on", "--lease", &lease]),
    );
    assert!(!out.status.success(), "{}", show(&out));

    // The holder attaches.
    let (mut holder, _) = attach_lease(&lab, "holder", &["--lease", &lease]);

    // Read-only: the colleague sees the share, and its power switch is refused, saying why.
    lab.ok(
        "share",
        lab.as_client("holder", &["share", "lease", &lease, "--with", "colleague"]),
    );
    let shares = shares_seen_by(&lab, "colleague", &lease);
    assert_eq!(shares.len(), 1, "{shares:?}");
    assert_eq!(shares[0]["client"], "colleague");
    assert_ne!(shares[0]["control"], true, "{shares:?}");
    let out = lab.run(
        "power-read-only",
        lab.as_client("colleague", &["power", "on", "--lease", &lease]),
    );
    assert!(
        !out.status.success() && out.stderr.contains("read-only"),
        "{}",
        show(&out)
    );

    // With control it switches the power.
    lab.ok(
        "share-control",
        lab.as_client(
            "holder",
            &["share", "lease", &lease, "--with", "colleague", "--control"],
        ),
    );
    assert_eq!(shares_seen_by(&lab, "holder", &lease)[0]["control"], true);
    lab.ok(
        "power-control",
        lab.as_client("colleague", &["power", "on", "--lease", &lease]),
    );

    // The colleague attaches beside the holder; unsharing detaches it with the reason.
    let dev = lab.env.root.join("colleague-dev");
    std::fs::create_dir_all(&dev).expect("dev dir");
    let mut cmd = lab.as_client(
        "colleague",
        &["attach", "-o", "json", "--lease", &lease, "--dev-dir"],
    );
    // The colleague's machine: its own runtime directory (attachments are one per exporter
    // per machine) and its own pty directory.
    let runtime = lab.env.root.join("colleague-run");
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    cmd.arg(&dev).env("JMP_RUNTIME_DIR", &runtime);
    const BESIDE: &str = "attached beside you: colleague (control)";
    const GONE: &str = "detached from beside you: colleague";
    // Each of the colleague's two `jmp power` was a short session beside the holder, and the
    // holder was told of it coming and going: wait for both to be told, so what follows is
    // about the attachment only.
    let settled = poll_until(LONG, || {
        let e = holder.stderr();
        e.matches("attached beside you: colleague (").count() == 2 && e.matches(GONE).count() == 2
    });
    assert!(settled, "two short sessions told: {}", holder.describe());
    let beside = holder.stderr().matches(BESIDE).count();
    let mut colleague = lab.spawn("colleague-attach", cmd);
    colleague.expect_line(READY, "the colleague's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
    // The holder is told who is attached beside it, and `jmp status` shows it.
    wait_another(&mut holder, BESIDE, beside);
    let gone = holder.stderr().matches(GONE).count();
    let guests = guests_in_status(&lab);
    assert_eq!(guests.len(), 1, "{guests:?}");
    assert_eq!(guests[0]["client"], "colleague");
    assert_eq!(guests[0]["control"], true);
    let since = guests[0]["since"].as_u64().expect("since, Unix seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        since <= now && since + 600 > now,
        "attached lately: {since} vs {now}"
    );
    let text = lab.ok("status", lab.as_client("holder", &["status"]));
    assert!(
        text.contains("attached beside you: colleague (control) since "),
        "{text}"
    );
    lab.ok(
        "unshare",
        lab.as_client(
            "holder",
            &["unshare", "lease", &lease, "--with", "colleague"],
        ),
    );
    let status = colleague.expect_exit(LONG);
    assert!(!status.success(), "{}", colleague.describe());
    assert!(
        colleague
            .stderr()
            .contains("ended its share with colleague"),
        "{}",
        colleague.describe()
    );
    assert!(
        holder.is_running(),
        "the holder stays: {}",
        holder.describe()
    );
    assert!(shares_seen_by(&lab, "holder", &lease).is_empty());
    wait_another(&mut holder, GONE, gone);
    assert_eq!(guests_in_status(&lab), Vec::<Value>::new());
    assert!(!lab
        .ok("status", lab.as_client("holder", &["status"]))
        .contains("beside you"));
}

/// A colleague alone keeps the lease from idling: the lease has a 2 s idle timeout and is
/// shared; the holder's attachment is SIGKILLed (a cancelled job) while the colleague stays
/// attached. Once jmpd has seen the holder go, a probe lease on a second board, made then
/// with twice that idle timeout and never used, ends as idle: the controller's clock is past
/// the shared lease's idle timeout with room to spare. The shared lease is still there,
/// attached, and the colleague's console works. When the colleague detaches, the lease ends
/// as idle.
#[test]
fn a_colleague_alone_keeps_the_lease_from_idling() {
    let lab = Lab::new("share-idle");
    let token = lab.create_exporter("board-01", &["board=a"]);
    let mut jmpd = lab.start_jmpd(&board_config(&lab, "board-01", &token));
    let probe_token = lab.create_exporter("board-02", &["board=b"]);
    let _probe_jmpd = lab.start_jmpd(&board_config(&lab, "board-02", &probe_token));
    lab.create_client("holder", &[]);
    lab.create_client("colleague", &[]);
    let create = |selector: &str, idle: &str| {
        let out = lab.ok(
            "create-lease",
            lab.as_client(
                "holder",
                &[
                    "create",
                    "lease",
                    "-l",
                    selector,
                    "--duration",
                    "10m",
                    "--idle-timeout",
                    idle,
                    "-o",
                    "json",
                ],
            ),
        );
        lease_json(&out)["name"]
            .as_str()
            .expect("a lease name")
            .to_string()
    };
    let lease = create("board=a", "2s");
    let (mut holder, _) = attach_lease(&lab, "holder", &["--lease", &lease]);
    lab.ok(
        "share-control",
        lab.as_client(
            "holder",
            &["share", "lease", &lease, "--with", "colleague", "--control"],
        ),
    );
    let dev = lab.env.root.join("colleague-dev");
    let runtime = lab.env.root.join("colleague-run");
    for d in [&dev, &runtime] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let mut cmd = lab.as_client(
        "colleague",
        &["attach", "-o", "json", "--lease", &lease, "--dev-dir"],
    );
    cmd.arg(&dev).env("JMP_RUNTIME_DIR", &runtime);
    let mut colleague = lab.spawn("colleague-attach", cmd);
    let line = colleague.expect_line(READY, "the colleague's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
    let ready: Value = serde_json::from_str(&line).expect("the colleague's JSON");
    wait_another(&mut holder, "attached beside you: colleague (control)", 0);

    // The holder's job is cancelled: its attachment SIGKILLed, so jmpd sees it go only when
    // the link times out. jmpd logs each connection's lines under its peer address: the
    // holder's is the one it attached from.
    let log = jmpd.proc.stderr();
    let conn = log
        .lines()
        .find(|l| l.contains("attached from") && l.contains("identity=\"holder\""))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("conn{peer=")))
        .unwrap_or_else(|| panic!("no attach of the holder in jmpd's log:\n{log}"))
        .to_string();
    let detached = |j: &mut Jmpd| {
        j.proc
            .stderr()
            .lines()
            .any(|l| l.contains(&conn) && l.contains(" detached: "))
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the holder's attachment");
    holder.expect_exit(READY);
    assert!(
        poll_until(LONG, || detached(&mut jmpd)),
        "jmpd never saw the holder go: {}",
        jmpd.proc.describe()
    );

    // A probe: made now, idle for twice the shared lease's timeout, it ends as idle.
    let probe = create("board=b", "4s");
    assert!(
        poll_until(LONG, || find_lease(&lab.leases(), &probe).is_none()),
        "the probe lease never ended as idle"
    );
    told_ended_idle(&lab, &probe, "4s");
    // The shared lease outlived it: the colleague's attachment is use.
    let leases = lab.leases();
    let l = find_lease(&leases, &lease)
        .unwrap_or_else(|| panic!("the lease ended with only the colleague attached: {leases:?}"));
    assert_eq!(l["attached"], true, "{l}");
    assert!(l.get("idle_deadline").is_none(), "{l}");
    assert!(colleague.is_running(), "{}", colleague.describe());
    let mut console = Console::open(local_of(&ready, "console"));
    sim_login_and_echo(&mut console, "colleague-alone-4242");
    drop(console);

    // The colleague detaches: nothing uses the lease any more, and it ends as idle.
    colleague.signal(nix::sys::signal::Signal::SIGTERM);
    colleague.expect_exit(LONG);
    assert!(
        poll_until(LONG, || find_lease(&lab.leases(), &lease).is_none()),
        "the lease never ended after the colleague left"
    );
    told_ended_idle(&lab, &lease, "2s");
}

/// `jmp delete lease NAME` of a lease that ended as idle: refused, saying so.
fn told_ended_idle(lab: &Lab, lease: &str, idle: &str) {
    let out = lab.run(
        "delete-ended",
        lab.as_client("holder", &["delete", "lease", lease]),
    );
    assert!(
        !out.status.success()
            && out
                .stderr
                .contains(&format!("nothing used it for {idle} (its idle timeout)")),
        "{}",
        show(&out)
    );
}
