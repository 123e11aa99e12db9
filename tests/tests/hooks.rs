//! Lease hooks end to end (a real controller and jmpd on loopback): the board is not granted
//! while its afterLease hook runs (`jmp get exporters` says "cleaning"); a client attaching
//! during beforeLease sees "preparing board" and waits; a failing or hanging beforeLease ends
//! the lease with the hook's output. The hooks wait for files the test creates, so every step
//! is ordered by an event, never by a sleep.

use jmp_e2e::lab::{lease_json, wait_stderr, Lab, LONG};
use jmp_e2e::*;
use serde_json::Value;
use std::path::Path;

fn hook_config(lab: &Lab, name: &str, token: &Path, hooks: &str) -> std::path::PathBuf {
    let state = lab.env.root.join(format!("state-{name}"));
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}, labels: {{board: {name}}}}}\n\
         listen: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nhooks:\n{hooks}\n\
         export:\n  console: {{type: sim-console}}\n",
        state.display(),
        token.display()
    );
    let p = lab.env.root.join(format!("{name}.exporter.yaml"));
    std::fs::write(&p, yaml).expect("write exporter config");
    p
}

/// The YAML flow list of `sh -c SCRIPT`.
fn sh(script: &str) -> String {
    format!(
        "[sh, -c, {}]",
        serde_json::to_string(script).expect("json string")
    )
}

fn lease_of(lab: &Lab, client: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "lease", "-l"];
    let sel = format!("board={}", extra[0]);
    args.push(&sel);
    args.extend(["--duration", "10m", "-o", "json"]);
    args.extend(&extra[1..]);
    let out = lab.ok("create-lease", lab.as_client(client, &args));
    lease_json(&out)["name"]
        .as_str()
        .expect("lease name")
        .to_string()
}

#[test]
fn the_board_is_granted_again_only_after_its_after_lease_hook() {
    let lab = Lab::new("hooks-after");
    let dir = lab.env.root.join("hookfiles");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let started = dir.join("started");
    let release = dir.join("release");
    let client = dir.join("client");
    let script = format!(
        "echo \"cleaning after $JMP_LEASE\"; printf %s \"$JMP_CLIENT\" > {c}; : > {s}; while [ ! -e {r} ]; do sleep 0.05; done; echo cleaned-up",
        c = client.display(),
        s = started.display(),
        r = release.display()
    );
    let token = lab.create_exporter("hk-01", &[]);
    let cfg = hook_config(
        &lab,
        "hk-01",
        &token,
        &format!("  afterLease: {{run: {}, timeout: 60s}}", sh(&script)),
    );
    let mut jmpd = lab.start_jmpd(&cfg);
    lab.create_client("c1", &[]);
    lab.create_client("c2", &[]);

    let l1 = lease_of(&lab, "c1", &["hk-01"]);
    lab.ok(
        "delete-lease",
        lab.as_client("c1", &["delete", "lease", &l1]),
    );
    assert!(
        poll_until(LONG, || started.exists()),
        "the afterLease hook never started: {}",
        jmpd.proc.describe()
    );
    // The hook knows whose lease it cleans up after.
    assert_eq!(
        std::fs::read_to_string(&client).expect("the hook wrote JMP_CLIENT"),
        "c1"
    );
    // While it runs: the controller shows the board cleaning and grants it to nobody.
    let e = lab.exporter("hk-01");
    assert_eq!(e["state"], "cleaning", "{e}");
    let table = lab.ok(
        "get-exporters",
        lab.as_admin(&["get", "exporters", "--with", "online,leases"]),
    );
    assert!(table.contains("cleaning"), "{table}");
    let mut waiter = lab.spawn(
        "create-lease-wait",
        lab.as_client(
            "c2",
            &[
                "create",
                "lease",
                "-l",
                "board=hk-01",
                "--duration",
                "5m",
                "--wait",
                "60",
                "-o",
                "json",
            ],
        ),
    );
    assert!(
        poll_until(LONG, || lab
            .leases()
            .iter()
            .any(|l| l["client"] == "c2" && l["status"] == "waiting")),
        "c2's request is not waiting: {:?}",
        lab.leases()
    );
    // The hook is still blocked on a file only this test creates: nobody may hold the board.
    assert!(!release.exists());
    assert!(
        !lab.leases()
            .iter()
            .any(|l| l["exporter"] == "hk-01" && l["status"] == "active"),
        "granted while the afterLease hook runs: {:?}",
        lab.leases()
    );
    std::fs::write(&release, "").expect("release the hook");
    let line = waiter.expect_line(LONG, "the granted lease", |l| l.starts_with('{'));
    let l2: Value = serde_json::from_str(&line).expect("lease JSON");
    assert_eq!(l2["exporter"], "hk-01");
    assert_eq!(waiter.expect_exit(LONG).code(), Some(0));
    // The hook's output went to jmpd's log, and its end came before the grant.
    let log = jmpd.proc.stderr();
    assert!(log.contains(&format!("cleaning after {l1}")), "{log}");
    let done = log
        .find("afterLease hook done")
        .expect("hook done in the log");
    assert!(log.find("cleaned-up").is_some_and(|i| i < done), "{log}");
    assert!(lab.exporter("hk-01").get("state").is_none());
}

#[test]
fn before_lease_preparing_then_failure_and_timeout_end_the_lease_with_the_hook_output() {
    let lab = Lab::new("hooks-before");
    let dir = lab.env.root.join("hookfiles");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (go, fail, hang) = (dir.join("go"), dir.join("fail"), dir.join("hang"));
    let armed = dir.join("armed");
    // It fails only once the test has seen the client wait (`armed`): else the lease may end
    // before the client even asked for it.
    let script = format!(
        "echo \"flashing $JMP_LEASE for $JMP_CLIENT\"; \
         if [ -e {f} ]; then while [ ! -e {a} ]; do sleep 0.05; done; \
         echo 'flash failed: no image' >&2; exit 3; fi; \
         if [ -e {h} ]; then sleep 600; fi; \
         while [ ! -e {g} ]; do sleep 0.05; done; echo flashed",
        f = fail.display(),
        a = armed.display(),
        h = hang.display(),
        g = go.display()
    );
    let token = lab.create_exporter("hk-02", &[]);
    let cfg = hook_config(
        &lab,
        "hk-02",
        &token,
        &format!("  beforeLease: {{run: {}, timeout: 8s}}", sh(&script)),
    );
    let jmpd = lab.start_jmpd(&cfg);
    lab.create_client("u", &[]);
    let attach = |lab: &Lab| {
        let mut c = lab.as_client("u", &["attach", "-o", "json", "--dev-dir"]);
        c.arg(&lab.env.dev).env("JMP_LOG", "info");
        lab.spawn("jmp-attach", c)
    };

    // 1. The hook runs: the client waits, told so, with the hook's output; then attaches.
    let l1 = lease_of(&lab, "u", &["hk-02"]);
    let mut a = attach(&lab);
    wait_stderr(&mut a, "preparing board", LONG);
    wait_stderr(&mut a, &format!("flashing {l1} for u"), LONG);
    assert!(a.is_running(), "gave up while preparing: {}", a.describe());
    std::fs::write(&go, "").expect("let the hook finish");
    a.expect_line(LONG, "jmp attach's JSON line", |l| l.starts_with('{'));
    lab.ok(
        "delete-lease",
        lab.as_client("u", &["delete", "lease", &l1]),
    );
    assert_eq!(a.expect_exit(LONG).code(), Some(6), "{}", a.describe());

    // 2. The hook fails: the lease ends with its output, and the waiting client is told.
    std::fs::write(&fail, "").expect("make the hook fail");
    let l2 = lease_of(&lab, "u", &["hk-02"]);
    let mut a = attach(&lab);
    wait_stderr(&mut a, "preparing board", LONG);
    std::fs::write(&armed, "").expect("let the hook fail");
    let st = a.expect_exit(LONG);
    let err = a.stderr();
    assert_eq!(st.code(), Some(6), "{}", a.describe());
    assert!(err.contains("beforeLease hook failed"), "{err}");
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(err.contains("flash failed: no image"), "{err}");
    assert!(
        poll_until(LONG, || !lab
            .leases()
            .iter()
            .any(|l| l["name"] == l2.as_str())),
        "the lease outlived its failed beforeLease hook: {:?}",
        lab.leases()
    );

    // 3. The hook hangs: killed at its timeout, and the lease ends saying so.
    std::fs::remove_file(&fail).expect("rm");
    std::fs::write(&hang, "").expect("make the hook hang");
    let l3 = lease_of(&lab, "u", &["hk-02"]);
    let mut a = attach(&lab);
    wait_stderr(&mut a, "preparing board", LONG);
    let st = a.expect_exit(LONG);
    let err = a.stderr();
    assert_eq!(st.code(), Some(6), "{}", a.describe());
    assert!(
        err.contains("did not finish within 8s and was killed"),
        "{err}"
    );
    assert!(
        poll_until(LONG, || !lab
            .leases()
            .iter()
            .any(|l| l["name"] == l3.as_str())),
        "the lease outlived its hung beforeLease hook: {:?}",
        lab.leases()
    );
    let log = jmpd.proc.stderr();
    assert!(log.contains(&format!("flashing {l3} for u")), "{log}");
}
