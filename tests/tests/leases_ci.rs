//! Leases as CI uses them, and the controller's defences: two jobs of one client on one runner
//! each get and release their own board despite a leftover lease; a job queued behind its own
//! client's leftover is told so; a reservation returns at once and `jmp attach` waits for its
//! begin; waiting requests are bounded per client; an exporter whose TLS identity changed is
//! refused until an admin rebinds it; connections that never authenticate do not live on.

use jmp_e2e::lab::*;
use jmp_e2e::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn job(lab: &Lab, job: &str, args: &[&str]) -> Command {
    let mut c = lab.as_client("ci", args);
    c.env("JMP_JOB", job);
    c
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
    let out = lab.run("delete-ambiguous", c);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("name them or use --all"),
        "{}",
        out.stderr
    );
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
    let leftover = lab
        .ok(
            "leftover",
            job(&lab, "old-job", &["create", "lease", "-l", "board=ci"]),
        )
        .trim()
        .to_string();
    let out = lab.run(
        "create-behind-own",
        job(
            &lab,
            "new-job",
            &["create", "lease", "-l", "board=ci", "--wait", "3"],
        ),
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "the wait runs out: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!(
            "waiting behind lease {leftover}, which is your own client's (job old-job"
        )) && out.stderr.contains(&format!("jmp delete lease {leftover}")),
        "{}",
        out.stderr
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
                job(
                    &lab,
                    &format!("w{i}"),
                    &["create", "lease", "-l", "board=q", "--wait", "60"],
                ),
            );
            wait_stderr(&mut p, "waiting: position", LONG);
            p
        })
        .collect();
    let out = lab.run(
        "third",
        job(
            &lab,
            "w2",
            &["create", "lease", "-l", "board=q", "--wait", "60"],
        ),
    );
    assert_eq!(out.status.code(), Some(10), "{}", out.stderr);
    assert!(
        out.stderr.contains("at most 2 per client"),
        "{}",
        out.stderr
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
