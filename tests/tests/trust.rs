//! Trust on first use: the first attach records the exporter's fingerprint; an exporter that
//! later presents another certificate at the same address is refused loudly, before any token
//! is sent and without creating devices.

use jmp_e2e::*;
use std::time::Duration;

#[test]
fn changed_fingerprint_is_refused_loudly() {
    let env = TestEnv::new("tofu");
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let yaml = env.exporter_yaml("tofu-board", &listen, "console: {type: sim-console}");
    let first = env.start_jmpd(&yaml);
    let addr = first.addr.to_string();

    // First use: no --fingerprint; the fingerprint gets recorded.
    let attach_tofu = || {
        let mut c = env.jmp();
        c.arg("attach")
            .arg("--exporter")
            .arg(&addr)
            .arg("--token-file")
            .arg(&env.token_file)
            .arg("--dev-dir")
            .arg(&env.dev)
            .args(["-o", "json"]);
        c
    };
    let mut a = Proc::spawn("jmp-attach-tofu", attach_tofu(), &env.logs);
    a.expect_line(READY, "ready line on first use", |l| l.starts_with('{'));
    let known = std::fs::read_to_string(env.config.join("known_exporters")).expect("recorded");
    assert!(
        known.contains(&addr) && known.contains(&first.fingerprint),
        "known_exporters: {known}"
    );
    a.stop();
    drop(first);

    // Same address, new identity (another state dir): refused, naming both fingerprints.
    let other_state = env.root.join("other-state");
    let yaml2 = yaml.replace(
        &format!("stateDir: {}", env.state.display()),
        &format!("stateDir: {}", other_state.display()),
    );
    assert_ne!(yaml, yaml2);
    let second = env.start_jmpd(&yaml2);
    assert_ne!(
        second.fingerprint,
        known.split_whitespace().nth(1).unwrap_or("")
    );
    let out = run(
        "jmp-attach-mismatch",
        attach_tofu(),
        &env.logs,
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "attach must fail: {}", out.stderr);
    assert!(
        out.stderr.contains("impostor") && out.stderr.contains(&second.fingerprint),
        "the refusal must be loud and name the new fingerprint: {}",
        out.stderr
    );
    assert!(
        !env.dev.join("tofu-board").join("console").exists(),
        "no device for an untrusted exporter"
    );
    // The token was never presented to the impostor.
    assert!(
        !second.proc.stderr().contains("attached from"),
        "jmpd log: {}",
        second.proc.stderr()
    );
    // The message says how to re-trust a re-imaged exporter, and doing so works.
    assert!(out.stderr.contains("jmp trust pin"), "{}", out.stderr);
    let mut c = env.jmp();
    c.args(["trust", "pin", &addr, &second.fingerprint]);
    let pinned = run("jmp-trust-pin", c, &env.logs, Duration::from_secs(30));
    assert!(pinned.status.success(), "{}", pinned.stderr);
    let mut a = Proc::spawn("jmp-attach-repinned", attach_tofu(), &env.logs);
    a.expect_line(READY, "ready line after re-pinning", |l| l.starts_with('{'));
    a.stop();
    let mut c = env.jmp();
    c.args(["trust", "list"]);
    let listed = run("jmp-trust-list", c, &env.logs, Duration::from_secs(30));
    assert!(
        listed.stdout.contains(&second.fingerprint),
        "{}",
        listed.stdout
    );
    let mut c = env.jmp();
    c.args(["trust", "forget", &addr]);
    assert!(
        run("jmp-trust-forget", c, &env.logs, Duration::from_secs(30))
            .status
            .success()
    );
    let mut c = env.jmp();
    c.args(["trust", "forget", &addr]);
    let again = run(
        "jmp-trust-forget-again",
        c,
        &env.logs,
        Duration::from_secs(30),
    );
    assert_eq!(
        again.status.code(),
        Some(5),
        "forgetting what is not trusted: {}",
        again.stderr
    );
}
