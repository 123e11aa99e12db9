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
