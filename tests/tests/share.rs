//! Sharing a leased board with a colleague (issue 21 item 2), with the real controller, jmpd
//! and jmp: a share to a client whose own policy forbids the exporter is refused; a colleague
//! sharing read-only is refused the board's controls (a power switch) with a clear message,
//! with `--control` it switches the power; it attaches beside the holder (its own pty
//! directory), and `jmp unshare` detaches it with the reason while the holder stays attached.

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
    let mut colleague = lab.spawn("colleague-attach", cmd);
    colleague.expect_line(READY, "the colleague's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
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
}
