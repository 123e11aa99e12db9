//! Leases as CI uses them, and the controller's defences: two jobs of one client on one runner
//! each get and release their own board despite a leftover lease; a job queued behind its own
//! client's leftover is told so; a reservation returns at once and `jmp attach` waits for its
//! begin; waiting requests are bounded per client; an exporter whose TLS identity changed is
//! refused until an admin rebinds it; connections that never authenticate do not live on.
//! Policies: a narrowed policy reaches a live lease and a reservation at once; `create client`
//! does not silently reset an existing client; a request no exporter could serve is refused at
//! once with `--wait`. A leaked exporter credential cannot move its exporter, and a released
//! lease's token stays refused by a jmpd restarted while the controller is down.

use jmp_e2e::lab::*;
use jmp_e2e::*;
use jmp_protocol::api::{Call, Registration, Reply, Request};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn job(lab: &Lab, job: &str, args: &[&str]) -> Command {
    let mut c = lab.as_client("ci", args);
    c.env("JMP_JOB", job);
    c
}

/// `create lease -l SELECTOR --wait SECS` as job `job_name` of client ci.
fn wait_lease(lab: &Lab, job_name: &str, selector: &str, secs: &str) -> Command {
    job(
        lab,
        job_name,
        &["create", "lease", "-l", selector, "--wait", secs],
    )
}

/// Runs `cmd`, which must exit with `code` and say each of `says` on stderr.
fn fails(lab: &Lab, label: &str, cmd: Command, code: i32, says: &[&str]) {
    let out = lab.run(label, cmd);
    assert_eq!(out.status.code(), Some(code), "{label}: {}", show(&out));
    for what in says {
        assert!(
            out.stderr.contains(what),
            "{label} says {what:?}: {}",
            show(&out)
        );
    }
}

/// Makes a lease with `cmd` (which prints its name); the name.
fn create_lease(lab: &Lab, label: &str, cmd: Command) -> String {
    lab.ok(label, cmd).trim().to_string()
}

fn boards(lab: &Lab, n: usize, board: &str) -> Vec<Jmpd> {
    (1..=n)
        .map(|i| {
            let name = format!("{board}-{i:02}");
            let token = lab.create_exporter(&name, &[&format!("board={board}")]);
            lab.start_jmpd(&lab.exporter_config(&name, &token, 0))
        })
        .collect()
}

/// What a CI job's commands need of the lab (the lab itself is not shared across threads).
struct Runner {
    runtime: std::path::PathBuf,
    config: std::path::PathBuf,
    admin: std::path::PathBuf,
    logs: std::path::PathBuf,
}

impl Runner {
    fn of(lab: &Lab) -> Runner {
        Runner {
            runtime: lab.env.runtime.clone(),
            config: lab.env.config.clone(),
            admin: lab.ctl.admin_file.clone(),
            logs: lab.env.logs.clone(),
        }
    }

    fn cmd(&self, job: &str, args: &[&str]) -> Command {
        let mut c = command(jmp_bin());
        c.env("JMP_RUNTIME_DIR", &self.runtime)
            .env("JMP_CONFIG_DIR", &self.config)
            .env("JMP_ADMIN_CONFIG", &self.admin)
            .env("JMP_CLIENT", "ci")
            .env("JMP_JOB", job)
            .env_remove("JMP_LOG")
            .env_remove("JMP_CLIENT_CONFIG")
            .args(args);
        c
    }

    fn ok(&self, label: &str, c: Command) -> String {
        let out = run(label, c, &self.logs, LONG);
        assert!(out.status.success(), "{label}: {}", show(&out));
        out.stdout
    }
}

/// One CI job as the recipe spells it: create lease --wait, attach -d, use the console,
/// delete lease. Returns the lease name and the exporter it got.
fn ci_job(r: &Runner, name: &str, devdir: &std::path::Path) -> (String, String) {
    let lease = r
        .ok(
            "create-lease",
            r.cmd(
                name,
                &["create", "lease", "--selector", "board=ci", "--wait", "120"],
            ),
        )
        .trim()
        .to_string();
    let mut c = r.cmd(name, &["attach", "-d", "-o", "json", "--dev-dir"]);
    c.arg(devdir);
    let out = r.ok("attach-d", c);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let exporter = v["exporter"].as_str().expect("exporter").to_string();
    assert_eq!(
        v["lease"].as_str(),
        Some(lease.as_str()),
        "job {name} attached its own lease: {v}"
    );
    let mut console = Console::open(local_of(&v, "console"));
    console.write(b"\r");
    console.read_until("login: ", READY);
    drop(console);
    let deleted = r.ok("delete-lease", r.cmd(name, &["delete", "lease"]));
    assert!(
        deleted.contains(&lease),
        "job {name} deleted its own lease: {deleted}"
    );
    (lease, exporter)
}

#[test]
fn two_jobs_of_one_client_get_and_release_their_own_boards_despite_a_leftover() {
    let lab = Lab::new("ci-jobs");
    let _boards = boards(&lab, 3, "ci");
    lab.create_client("ci", &[]);
    // A lease leaked by an earlier job that failed before its cleanup.
    let leftover = lab
        .ok(
            "leftover",
            job(
                &lab,
                "old-job",
                &["create", "lease", "-l", "board=ci", "--duration", "30m"],
            ),
        )
        .trim()
        .to_string();
    let dirs: Vec<_> = ["a", "b"]
        .iter()
        .map(|j| {
            let d = lab.env.root.join(format!("dev-{j}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            d
        })
        .collect();
    let runner = Runner::of(&lab);
    let (ra, rb) = std::thread::scope(|s| {
        let a = s.spawn(|| ci_job(&runner, "job-a", &dirs[0]));
        let b = s.spawn(|| ci_job(&runner, "job-b", &dirs[1]));
        (a.join().expect("job a"), b.join().expect("job b"))
    });
    assert_ne!(ra.1, rb.1, "the two jobs got different boards");
    assert_ne!(ra.0, leftover);
    assert_ne!(rb.0, leftover);
    // Only the leftover is still there: each job released exactly its own.
    let names: Vec<String> = lab
        .leases()
        .iter()
        .filter_map(|l| l["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, vec![leftover.clone()]);
    // Without a job and with two leases around, the no-argument form names them.
    lab.ok(
        "second",
        job(&lab, "other", &["create", "lease", "-l", "board=ci"]),
    );
    let mut c = lab.as_client("ci", &["delete", "lease"]);
    c.env_remove("JMP_JOB");
    fails(&lab, "delete-ambiguous", c, 2, &["name them or use --all"]);
    // JMP_LEASE binds a command to a lease explicitly.
    let mut c = lab.as_client("ci", &["delete", "lease"]);
    c.env("JMP_LEASE", &leftover);
    lab.ok("delete-by-env", c);
}

#[test]
fn a_job_queued_behind_its_own_clients_leftover_is_told() {
    let lab = Lab::new("ci-own");
    let _boards = boards(&lab, 1, "ci");
    lab.create_client("ci", &[]);
    let leftover = create_lease(
        &lab,
        "leftover",
        job(&lab, "old-job", &["create", "lease", "-l", "board=ci"]),
    );
    // The wait runs out (exit 4), and the message says whose lease it waited behind.
    fails(
        &lab,
        "create-behind-own",
        wait_lease(&lab, "new-job", "board=ci", "3"),
        4,
        &[
            &format!("waiting behind lease {leftover}, which is your own client's (job old-job"),
            &format!("jmp delete lease {leftover}"),
        ],
    );
}

fn rfc3339_in(secs: u64) -> String {
    let t = std::time::SystemTime::now() + Duration::from_secs(secs);
    humantime_like(t)
}

/// RFC 3339 in UTC without a dependency: seconds since the epoch to a civil date.
fn humantime_like(t: std::time::SystemTime) -> String {
    let s = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn a_reservation_returns_at_once_and_attach_waits_for_its_begin() {
    let lab = Lab::new("ci-reserve");
    let _boards = boards(&lab, 1, "rsv");
    lab.create_client("u", &[]);
    let begin = unix_now() + 6;
    let out = lab.ok(
        "reserve",
        lab.as_client(
            "u",
            &[
                "create",
                "lease",
                "-l",
                "board=rsv",
                "--begin-time",
                &rfc3339_in(6),
                "-o",
                "json",
            ],
        ),
    );
    assert!(
        unix_now() < begin,
        "create lease returned before the begin time"
    );
    let l = lease_json(&out);
    assert_eq!(l["status"], "reserved", "{l}");
    let name = l["name"].as_str().expect("name").to_string();
    // A reservation keeps its place with nobody waiting on it (no caller went away to lose it).
    let listed = lab.leases();
    assert_eq!(
        find_lease(&listed, &name).map(|l| l["status"].clone()),
        Some("reserved".into())
    );
    let (mut attach, v) = attach_lease(&lab, "u", &["--lease", &name]);
    assert!(
        unix_now() >= begin,
        "attach did not wait for the begin time"
    );
    assert_eq!(v["lease"].as_str(), Some(name.as_str()));
    let mut c = Console::open(local_of(&v, "console"));
    c.write(b"\r");
    c.read_until("login: ", READY);
    attach.stop();
}

#[test]
fn waiting_requests_are_bounded_per_client() {
    let lab = Lab::with_args(
        "ci-quota",
        "127.0.0.1:0",
        &["--max-waiting-per-client", "2"],
    );
    let _boards = boards(&lab, 1, "q");
    lab.create_client("holder", &[]);
    lab.create_client("ci", &[]);
    lab.ok(
        "hold",
        lab.as_client("holder", &["create", "lease", "-l", "board=q"]),
    );
    let waiters: Vec<Proc> = (0..2)
        .map(|i| {
            let mut p = lab.spawn(
                "waiter",
                wait_lease(&lab, &format!("w{i}"), "board=q", "60"),
            );
            wait_stderr(&mut p, "waiting: position", LONG);
            p
        })
        .collect();
    fails(
        &lab,
        "third",
        wait_lease(&lab, "w2", "board=q", "60"),
        10,
        &["at most 2 per client"],
    );
    drop(waiters);
}

#[test]
fn an_exporter_presenting_another_identity_is_refused_until_rebound() {
    let lab = Lab::new("ci-rebind");
    let token = lab.create_exporter("fp-01", &["board=fp"]);
    let cfg = lab.exporter_config("fp-01", &token, 0);
    let first = lab.start_jmpd(&cfg);
    let bound = first.fingerprint.clone();
    drop(first);
    // Same credential, new TLS identity (a re-imaged host, or whoever holds a leaked
    // credential): its registration is refused, loudly, and clients keep the bound one.
    let text = std::fs::read_to_string(&cfg).expect("config");
    let moved = text.replace("state-fp-01", "state-fp-01-new");
    std::fs::write(&cfg, moved).expect("write config");
    let mut cmd = command(jmpd_bin());
    cmd.arg("--config").arg(&cfg).env("JMP_LOG", "info");
    let mut second = lab.spawn("jmpd-new-identity", cmd);
    wait_stderr(&mut second, "is bound to TLS fingerprint", LONG);
    let e = lab.exporter("fp-01");
    assert_eq!(e["fingerprint"].as_str(), Some(bound.as_str()), "{e}");
    assert!(e["fingerprint_refused"].as_str().is_some(), "{e}");
    let table = lab.ok("admin-get", lab.admin(&["get", "exporters"]));
    assert!(
        table.contains("WARNING") && table.contains("refused"),
        "{table}"
    );
    // The admin accepts the new identity; the retrying jmpd registers with it.
    lab.ok("rebind", lab.admin(&["rebind", "exporter", "fp-01"]));
    wait_stderr(&mut second, "registered with controller", LONG);
    let e = lab.exporter("fp-01");
    assert_ne!(e["fingerprint"].as_str(), Some(bound.as_str()), "{e}");
    assert!(
        e.get("fingerprint_refused").is_none_or(|v| v.is_null()),
        "{e}"
    );
}

#[test]
fn connections_that_never_authenticate_are_closed_and_bounded() {
    let lab = Lab::new("ci-preauth");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ep = jmp_transport::client_endpoint(lab.ctl.addr).expect("endpoint");
        let fp: jmp_transport::Fingerprint = lab.ctl.fingerprint.parse().expect("fingerprint");
        // More connections than one source may have unauthenticated at once: the excess is
        // refused before any handshake work, the rest closed for not authenticating (10 s).
        let mut conns = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            match jmp_transport::connect_without_retry(
                &ep,
                lab.ctl.addr,
                jmp_protocol::ALPN_CONTROLLER,
                Some(fp),
            )
            .await
            {
                Ok((c, _)) => conns.push(c),
                Err(_) => refused += 1,
            }
        }
        assert!(
            refused >= 8,
            "{refused} of 40 refused; at most 32 may wait from one source"
        );
        for c in &conns {
            let e = tokio::time::timeout(LONG, c.closed())
                .await
                .expect("closed in time");
            let reason = e.to_string();
            assert!(
                reason.contains("no valid credential") || reason.contains("displaced"),
                "{reason}"
            );
        }
    });
    // A real caller is served meanwhile and afterwards.
    lab.ok("whoami", lab.as_admin(&["get", "leases"]));
}

#[test]
fn a_stopped_controller_is_named_and_reported_quickly() {
    let mut lab = Lab::new("ci-ctl-down");
    lab.create_client("u", &[]);
    lab.ctl.proc.kill9();
    let out = lab.run("get-leases-down", lab.as_client("u", &["get", "leases"]));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("controller") && !out.stderr.contains("exporter"),
        "the message names the controller: {}",
        out.stderr
    );
    assert!(out.stderr.contains("no answer"), "{}", out.stderr);
}

#[test]
fn an_exporter_credential_is_written_private() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new("ci-out");
    let file = lab.env.root.join("e.token");
    let mut c = lab.admin(&["create", "exporter", "priv-01", "--out"]);
    c.arg(&file);
    let out = lab.run("create-exporter-out", c);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.trim().is_empty(),
        "the secret is not printed: {}",
        out.stdout
    );
    let mode = std::fs::metadata(&file)
        .expect("written")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let token = std::fs::read_to_string(&file).expect("read");
    assert_eq!(token.trim().split('.').count(), 3, "a credential: {token}");
}

/// A controller-mode exporter config whose `power` device appends each command to `calls`.
fn powered_config(lab: &Lab, name: &str, token: &Path, calls: &Path) -> PathBuf {
    let state = lab.env.root.join(format!("state-{name}"));
    let append = |what: &str| {
        format!(
            "[sh, -c, {}]",
            serde_json::to_string(&format!("echo {what} >> {}", calls.display())).unwrap()
        )
    };
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}}}\n\
         listen: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  \
         console: {{type: sim-console}}\n  \
         power: {{type: power, command: {{on: {}, off: {}}}}}\n",
        state.display(),
        token.display(),
        append("on"),
        append("off"),
    );
    let p = lab.env.root.join(format!("{name}.exporter.yaml"));
    std::fs::write(&p, yaml).expect("write exporter config");
    p
}

/// One call on the controller API, as `jmp` and `jmpd` make it.
fn api_call(lab: &Lab, make: impl FnOnce(&quinn::Connection) -> Call) -> Result<Reply, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ep = jmp_transport::client_endpoint(lab.ctl.addr).expect("endpoint");
        let fp: jmp_transport::Fingerprint = lab.ctl.fingerprint.parse().expect("fingerprint");
        let (conn, _) =
            jmp_transport::connect(&ep, lab.ctl.addr, jmp_protocol::ALPN_CONTROLLER, Some(fp))
                .await
                .expect("connect to the controller");
        let c = make(&conn);
        // A registration's request side stays open while it lasts (closing it takes the
        // exporter offline, and ends the call).
        let keep_open = matches!(c.request, Request::Register(_));
        let r = tokio::time::timeout(LONG, async {
            let (replies, _send) = jmp_transport::controller::call(&conn, &c, keep_open).await?;
            let mut replies = replies;
            replies
                .next()
                .await?
                .ok_or(jmp_transport::controller::CallError::NoAnswer)
        })
        .await
        .expect("an answer in time");
        conn.close(0u32.into(), b"done");
        r.map_err(|e| e.to_string())
    })
}

#[test]
fn a_narrowed_policy_ends_the_lease_and_the_reservation_and_powers_nothing() {
    let lab = Lab::new("ci-narrow");
    let calls = lab.env.root.join("power-calls");
    let ta = lab.create_exporter("pa-01", &["board=pa"]);
    let _a = lab.start_jmpd(&powered_config(&lab, "pa-01", &ta, &calls));
    let tb = lab.create_exporter("pb-01", &["board=pb"]);
    let _b = lab.start_jmpd(&lab.exporter_config("pb-01", &tb, 0));
    lab.create_client("u", &[]);
    // While u may use any exporter: a lease on pa-01 (attached), and a reservation of it.
    let lease = create_lease(
        &lab,
        "lease",
        lab.as_client(
            "u",
            &["create", "lease", "-l", "board=pa", "--duration", "30m"],
        ),
    );
    let (mut attach, _) = attach_lease(&lab, "u", &["--lease", &lease]);
    let out = lab.ok(
        "reserve",
        lab.as_client(
            "u",
            &[
                "create",
                "lease",
                "-l",
                "board=pa",
                "--begin-time",
                &rfc3339_in(3600),
                "-o",
                "json",
            ],
        ),
    );
    let reserved = lease_json(&out)["name"].as_str().expect("name").to_string();
    // The admin narrows u to pb boards.
    let out = lab.ok(
        "narrow",
        lab.admin(&["update", "client", "u", "--allow", "board=pb", "-o", "json"]),
    );
    let v: Value = serde_json::from_str(&out).expect("the client as JSON");
    assert_eq!(v[0]["allow"], "board=pb", "{out}");
    // The attached session ends at once, saying why.
    let st = attach.expect_exit(LONG);
    assert_eq!(
        st.code(),
        Some(jmp_protocol::exit::LEASE_ENDED),
        "{}",
        attach.describe()
    );
    assert!(
        attach
            .stderr()
            .contains("the policy of client u no longer allows exporter pa-01"),
        "{}",
        attach.describe()
    );
    let listed = lab.leases();
    assert!(find_lease(&listed, &lease).is_none(), "{listed:?}");
    assert!(find_lease(&listed, &reserved).is_none(), "{listed:?}");
    // A new credential (the finding re-issued one) keeps the narrowed policy: it powers nothing.
    let file = lab.env.root.join("u-new.yaml");
    let mut c = lab.admin(&["create", "client", "u", "--replace", "--out"]);
    c.arg(&file);
    lab.ok("replace", c);
    let mut c = lab.jmp();
    c.args(["config", "client", "create", "u", "--from"])
        .arg(&file)
        .arg("--no-use");
    lab.ok("import", c);
    for (label, args) in [
        ("power-on", vec!["power", "on"]),
        ("power-on-lease", vec!["power", "on", "--lease", &lease]),
    ] {
        let out = lab.run(label, lab.as_client("u", &args));
        assert!(!out.status.success(), "{label}: {}", show(&out));
    }
    let powered = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(
        !powered.contains("on"),
        "the board was powered: {powered:?}"
    );
    // Asking for it again, even with --wait, is refused at once, naming the policy.
    fails(
        &lab,
        "again",
        lab.as_client("u", &["create", "lease", "-l", "board=pa", "--wait", "300"]),
        jmp_protocol::exit::FORBIDDEN,
        &["policy 'board=pb'"],
    );
}

#[test]
fn creating_an_existing_client_is_refused_and_replace_keeps_its_policy() {
    let lab = Lab::new("ci-recreate");
    lab.create_client("ci", &["--allow", "board=x", "--max-duration", "2h"]);
    let other = lab.env.root.join("ci-again.yaml");
    let mut c = lab.admin(&["create", "client", "ci", "--out"]);
    c.arg(&other);
    fails(
        &lab,
        "create-again",
        c,
        jmp_protocol::exit::USAGE,
        &[
            "client ci already exists",
            "--replace",
            "jmp admin update client ci",
        ],
    );
    assert!(!other.exists(), "no credential was written");
    // Nothing changed: the credential in use works.
    lab.ok("still-works", lab.as_client("ci", &["get", "leases"]));
    let policy = |label: &str| -> Value {
        let out = lab.ok(label, lab.admin(&["get", "clients", "ci", "-o", "json"]));
        serde_json::from_str::<Value>(&out).expect("json")[0].clone()
    };
    let p = policy("policy-kept");
    assert_eq!(
        (p["allow"].clone(), p["max_duration_secs"].clone()),
        ("board=x".into(), 7200.into())
    );
    // --replace: a new credential, the old one revoked, the policy kept.
    let file = lab.env.root.join("ci-new.yaml");
    let mut c = lab.admin(&["create", "client", "ci", "--replace", "--out"]);
    c.arg(&file);
    let out = lab.run("replace", c);
    assert!(out.status.success(), "{}", show(&out));
    assert!(out.stderr.contains("new credential"), "{}", show(&out));
    fails(
        &lab,
        "old-revoked",
        lab.as_client("ci", &["get", "leases"]),
        jmp_protocol::exit::UNAUTHORIZED,
        &[],
    );
    let p = policy("policy-after-replace");
    assert_eq!(
        (p["allow"].clone(), p["max_duration_secs"].clone()),
        ("board=x".into(), 7200.into())
    );
    // An explicit change of one limit keeps the rest.
    let out = lab.ok(
        "update",
        lab.admin(&["update", "client", "ci", "--max-duration", "4h"]),
    );
    assert!(out.contains("board=x") && out.contains("4h"), "{out}");
    let p = policy("policy-after-update");
    assert_eq!(
        (p["allow"].clone(), p["max_duration_secs"].clone()),
        ("board=x".into(), 14400.into())
    );
}

#[test]
fn a_request_no_exporter_could_serve_is_refused_at_once_even_with_wait() {
    let lab = Lab::new("ci-never");
    let _boards = boards(&lab, 1, "nv");
    let _others = boards(&lab, 1, "other");
    lab.create_client("ci", &["--allow", "board=nv"]);
    // (Each would wait 300 s if it were queued: the run's guard is far shorter.)
    fails(
        &lab,
        "typo",
        wait_lease(&lab, "j1", "board=nv-typo", "300"),
        jmp_protocol::exit::UNAVAILABLE,
        &["no exporter matches selector 'board=nv-typo'"],
    );
    fails(
        &lab,
        "outside-policy",
        wait_lease(&lab, "j2", "board=other", "300"),
        jmp_protocol::exit::FORBIDDEN,
        &["none is allowed by this client's policy 'board=nv'"],
    );
    fails(
        &lab,
        "reservation",
        job(
            &lab,
            "j3",
            &[
                "create",
                "lease",
                "-l",
                "board=nv-typo",
                "--begin-time",
                &rfc3339_in(600),
            ],
        ),
        jmp_protocol::exit::UNAVAILABLE,
        &[],
    );
    assert!(
        lab.leases().is_empty(),
        "nothing queued: {:?}",
        lab.leases()
    );
}

#[test]
fn a_leaked_exporter_credential_cannot_register_the_exporter_elsewhere() {
    let lab = Lab::new("ci-leak");
    let token = lab.create_exporter("lk-01", &["board=lk"]);
    let jmpd = lab.start_jmpd(&lab.exporter_config("lk-01", &token, 0));
    // What an attacker has: the credential (leaked) and the fingerprint (public).
    let cred = std::fs::read_to_string(&token)
        .expect("credential")
        .trim()
        .to_string();
    let fp = jmpd.fingerprint.clone();
    let own = jmp_transport::Identity::generate().expect("an identity");
    let register = |proof: Option<&jmp_transport::Identity>, fingerprint: &str| {
        let (cred, fingerprint) = (cred.clone(), fingerprint.to_string());
        api_call(&lab, move |conn| Call {
            credential: cred,
            request: Request::Register(Registration {
                address: "192.0.2.66:7000".into(),
                fingerprint,
                proof: proof.map(|id| {
                    jmp_transport::possession::registration_proof(id, conn, "lk-01").expect("proof")
                }),
                ..Default::default()
            }),
        })
    };
    let r = register(None, &fp);
    assert!(
        matches!(&r, Err(e) if e.contains("carries no proof of its TLS identity")),
        "{r:?}"
    );
    let r = register(Some(&own), &fp);
    assert!(
        matches!(&r, Err(e) if e.contains("proves the key of")),
        "{r:?}"
    );
    // Its own identity is proven, but the exporter is bound to the real one's.
    let r = register(Some(&own), &own.fingerprint().to_string());
    assert!(
        matches!(&r, Err(e) if e.contains("is bound to TLS fingerprint")),
        "{r:?}"
    );
    let e = lab.exporter("lk-01");
    assert_eq!(e["address"], jmpd.addr.to_string(), "{e}");
    assert_eq!(e["fingerprint"], fp, "{e}");
    assert_eq!(e["online"], true, "{e}");
}

#[test]
fn a_released_leases_token_stays_refused_after_jmpd_restarts_without_its_controller() {
    let mut lab = Lab::new("ci-ended");
    let token = lab.create_exporter("end-01", &["board=end"]);
    let cfg = lab.exporter_config("end-01", &token, 0);
    let jmpd = lab.start_jmpd(&cfg);
    let client = lab.create_client("u", &[]);
    let lease = create_lease(
        &lab,
        "lease",
        lab.as_client(
            "u",
            &["create", "lease", "-l", "board=end", "--duration", "30m"],
        ),
    );
    // Its lease token, as `jmp attach` fetches it.
    let cred = config_token(&client);
    let name = lease.clone();
    let lease_token = match api_call(&lab, move |_| Call {
        credential: cred,
        request: Request::LeaseAccess { name: Some(name) },
    }) {
        Ok(Reply::Access(a)) => a.token,
        other => panic!("lease-access: {other:?}"),
    };
    lab.ok("release", lab.as_client("u", &["delete", "lease", &lease]));
    // jmpd heard of the end (it records it in its state dir).
    let ended = lab.env.root.join("state-end-01").join("ended-leases.json");
    assert!(
        poll_until(LONG, || std::fs::read_to_string(&ended)
            .is_ok_and(|t| t.contains(&lease))),
        "jmpd never recorded the end of {lease}"
    );
    // The controller goes down; jmpd restarts without it.
    lab.ctl.proc.kill9();
    drop(jmpd);
    let mut cmd = Command::new(jmpd_bin());
    cmd.arg("--config").arg(&cfg).env("JMP_LOG", "info");
    let mut restarted = lab.spawn("jmpd-restarted", cmd);
    let line = restarted.expect_line(READY, "jmpd's ready line", |l| {
        l.starts_with("jmpd: exporter ")
    });
    let (_, addr, fp) = parse_jmpd_ready(&line).expect("ready line");
    let f = lab.env.root.join("released.lease-token");
    write_private(&f, &lease_token);
    let mut c = lab.jmp();
    c.args(["attach", "--exporter", &addr.to_string(), "--token-file"])
        .arg(&f)
        .args(["--fingerprint", &fp, "--dev-dir"])
        .arg(&lab.env.dev)
        .args(["-o", "json"]);
    fails(
        &lab,
        "released-token",
        c,
        jmp_protocol::exit::UNAUTHORIZED,
        &[&format!("lease {lease} was released")],
    );
}
