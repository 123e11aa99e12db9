//! A lab shared by teams (issue 18, findings 1-3), against the real jmpd: a lease holder that
//! floods storage reads it never reads back holds jmpd to the session budget stated in
//! docs/architecture.md while its console keeps answering; work it started (hashes over a
//! whole card) stops when it detaches; and the console history a client sees starts at its
//! own lease.
//!
//! The hostile client is this test process itself, speaking the protocol through
//! jmp-transport: `jmp` would never send what it sends. Its QUIC receive window is far larger
//! than jmp's, so that the storage streams it never reads do not stall its console on the
//! same connection (the exporter holds one attachment at a time, so the console that must
//! keep answering is on the hostile session itself). jmpd is watched through its own metrics:
//! what the budgets hold, the blocking jobs running and their progress; nothing here is timed.

use bytes::Bytes;
use jmp_e2e::*;
use jmp_protocol::codec::to_bytes;
use jmp_protocol::kinds::serial::OpenParams;
use jmp_protocol::kinds::storage::{frame, Op, Request};
use jmp_protocol::{features, Hello, ALPN_EXPORTER};
use jmp_transport::{Channels, Fingerprint, Link, LinkEvent, LinkHandle, Pipe};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What docs/architecture.md ("Budgets") states one session can make jmpd hold beyond its
/// idle size.
const SESSION_BOUND_MIB: u64 = 160;
/// The storage share of it (`jmp_devices::budget::LIMITS.session_bytes`).
const STORAGE_BUDGET: u64 = 64 << 20;
const READ: u64 = 8 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A sparse image file of `size` bytes.
fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("sparse image");
    p
}

fn vm_rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One value of jmpd's `/metrics` (a metric without labels).
fn metric(port: u16, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    s.set_read_timeout(Some(READY)).expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("ask");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {name} in jmpd's metrics:\n{body}"))
}

/// Polls jmpd's metrics until `f` holds (jmpd signals nothing a test could await).
fn until_metrics(what: &str, mut f: impl FnMut() -> bool) {
    assert!(
        poll_until(Duration::from_secs(60), &mut f),
        "never happened: {what}"
    );
}

/// A client connection made by this test, not by jmp.
struct Hostile {
    link: LinkHandle,
}

impl Hostile {
    async fn connect(jmpd: &Jmpd, client: &str) -> Hostile {
        let fp: Fingerprint = jmpd.fingerprint.parse().expect("fingerprint");
        let ep = jmp_transport::client_endpoint(jmpd.addr).expect("endpoint");
        let (conn, _) =
            jmp_transport::connect_tuned(&ep, jmpd.addr, ALPN_EXPORTER, Some(fp), |t| {
                t.receive_window((1u32 << 30).into());
            })
            .await
            .expect("connect");
        let hello = Hello {
            features: features::CLIENT,
            client: client.to_string(),
            session: u64::from(std::process::id()) << 16 | u64::from(rand_u16()),
            token: TOKEN.to_string(),
        };
        let (link, _welcome) = Link::client(conn, hello).await.expect("welcome");
        let Link { handle, mut events } = link;
        // Events are read, or the link would end the session for not reading them.
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if matches!(ev, LinkEvent::Ended { .. }) {
                    break;
                }
            }
        });
        Hostile { link: handle }
    }

    async fn console(&self) -> ConsolePipe {
        let params = to_bytes(&OpenParams {
            resume_from: None,
            pacing: None,
            timed: false,
        });
        let (pipe, _) = self
            .link
            .open_stream("console", params)
            .await
            .expect("console");
        ConsolePipe {
            pipe,
            seen: Vec::new(),
        }
    }

    /// A storage channel with `n` reads of `len` bytes sent and never read back.
    async fn unread_reads(&self, n: u64, len: u64, size: u64) -> Pipe {
        let (mut pipe, _) = self
            .link
            .open_stream("sd", Bytes::new())
            .await
            .expect("storage");
        for i in 0..n {
            let r = Request {
                id: i + 1,
                op: Op::Read {
                    offset: (i * len) % (size - len),
                    len,
                    compress: false,
                },
            };
            pipe.tx.send(frame(&r)).await.expect("send");
        }
        pipe
    }

    fn close(&self) {
        self.link
            .bye(jmp_protocol::ErrorCode::Ok, "the test is done");
    }
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(7)
}

/// The sim console over a channel of the hostile session.
struct ConsolePipe {
    pipe: Pipe,
    seen: Vec<u8>,
}

impl ConsolePipe {
    async fn until(&mut self, needle: &str) -> String {
        let t0 = std::time::Instant::now();
        loop {
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if let Some(at) = text.find(needle) {
                let out = text[..at + needle.len()].to_string();
                self.seen.drain(..at + needle.len());
                return out;
            }
            let left = READY.saturating_sub(t0.elapsed());
            match tokio::time::timeout(left, self.pipe.rx.recv()).await {
                Ok(Ok(Some(c))) => self.seen.extend_from_slice(&c),
                other => {
                    panic!("the console never printed {needle:?} ({other:?}); it printed {text:?}")
                }
            }
        }
    }

    async fn type_in(&mut self, s: &str) {
        self.pipe
            .tx
            .send(Bytes::copy_from_slice(s.as_bytes()))
            .await
            .expect("type");
    }

    /// Logs in and has a command's output echoed: the console answers.
    async fn login_and_echo(&mut self, marker: &str) {
        self.type_in("root\r").await;
        self.until("Password:").await;
        self.type_in("x\r").await;
        self.until("# ").await;
        self.echo(marker).await;
    }

    /// Has a command's output echoed by the logged-in shell.
    async fn echo(&mut self, marker: &str) {
        self.type_in(&format!("echo {marker}\r")).await;
        self.until(&format!("\r\n{marker}\r\n")).await;
    }
}

/// Three channels of 200 unread 8 MiB reads each on `h` (4800 MiB asked for), returned once
/// jmpd has taken all it will: no job runs and the budget has no room for one more read.
async fn flood(h: &Hostile, metrics: u16, size: u64) -> Vec<Pipe> {
    let mut pipes = Vec::new();
    for _ in 0..3 {
        pipes.push(h.unread_reads(200, READ, size).await);
    }
    tokio::task::spawn_blocking(move || {
        until_metrics("the storage budget fills and jmpd stops reading", || {
            metric(metrics, "jmpd_blocking_jobs") == 0
                && metric(metrics, "jmpd_budget_bytes") + READ > STORAGE_BUDGET
        })
    })
    .await
    .expect("poll");
    pipes
}

/// Waits until a session's budget and channels are given back (after it ended).
async fn given_back(metrics: u16) {
    tokio::task::spawn_blocking(move || {
        until_metrics("the budget is given back when the session ends", || {
            metric(metrics, "jmpd_budget_bytes") == 0 && metric(metrics, "jmpd_channels") == 0
        })
    })
    .await
    .expect("poll");
}

#[test]
fn a_storage_flood_holds_jmpd_to_its_budget_while_its_console_answers() {
    let env = TestEnv::new("budget-flood");
    const SIZE: u64 = 2 << 30;
    let img = sparse(env.root.path(), "sd.img", SIZE);
    let metrics = free_tcp_port();
    let mut yaml = env.exporter_yaml(
        "flood",
        "127.0.0.1:0",
        &format!(
            "console: {{type: sim-console}}\nsd: {{type: storage, path: {}}}",
            img.display()
        ),
    );
    yaml.push_str(&format!("metrics: 127.0.0.1:{metrics}\n"));
    let jmpd = env.start_jmpd(&yaml);
    let pid = jmpd.proc.pid();
    let rt = rt();
    rt.block_on(async {
        let h = Hostile::connect(&jmpd, "mallory@flood").await;
        let mut console = h.console().await;
        console.login_and_echo("before-the-flood").await;
        let idle = vm_rss_kib(pid);
        let pipes = flood(&h, metrics, SIZE).await;
        assert!(metric(metrics, "jmpd_budget_bytes") <= STORAGE_BUDGET);
        let read = metric(metrics, "jmpd_blocking_job_bytes_total");
        // What jmpd read is what it holds plus what went into the three streams' windows.
        assert!(
            read <= STORAGE_BUDGET + 3 * 8 * READ,
            "jmpd read {read} bytes for a client that reads nothing back"
        );
        // The console on the same session answers meanwhile.
        console.echo("during-the-flood").await;
        let flooded = vm_rss_kib(pid);
        let grew = flooded.saturating_sub(idle) / 1024;
        raw_stderr(&format!(
            "jmpd VmRSS {} MiB idle, {} MiB with 4800 MiB of unread reads asked for (+{grew} MiB; stated bound {SESSION_BOUND_MIB} MiB)",
            idle / 1024,
            flooded / 1024
        ));
        assert!(
            grew <= SESSION_BOUND_MIB,
            "jmpd grew by {grew} MiB; docs/architecture.md says a session makes it hold at most {SESSION_BOUND_MIB} MiB"
        );
        // The flood ends with the session: everything it held is given back.
        drop(pipes);
        h.close();
        given_back(metrics).await;
        // Two more flooding sessions, one after the other: what each held goes back to the
        // system, so floods do not add up across sessions (glibc kept freed read buffers in
        // its per-thread arenas until jmpd fixed its mmap threshold: +16 MiB a session).
        for round in 2..=3 {
            let h = Hostile::connect(&jmpd, "mallory@flood").await;
            let pipes = flood(&h, metrics, SIZE).await;
            drop(pipes);
            h.close();
            given_back(metrics).await;
            let slack = 24 << 10;
            let back = tokio::task::spawn_blocking(move || {
                poll_until(Duration::from_secs(60), || vm_rss_kib(pid) <= idle + slack)
            })
            .await
            .expect("poll");
            assert!(
                back,
                "after flooding session {round} ended jmpd stayed at {} MiB (idle {} MiB)",
                vm_rss_kib(pid) / 1024,
                idle / 1024
            );
        }
    });
    // A good session attaches next and its console answers.
    let (_att, v) = env.attach(&jmpd, &[]);
    let mut c = Console::open(local_of(&v, "console"));
    // The board's shell is still logged in from the flooding session.
    c.write(b"echo after-the-flood\r");
    c.read_until("\r\nafter-the-flood\r\n", READY);
}

#[test]
fn hashes_stop_when_the_client_detaches() {
    let env = TestEnv::new("budget-hash");
    const BIG: u64 = 64 << 30;
    let img = sparse(env.root.path(), "sd.img", BIG);
    let metrics = free_tcp_port();
    let mut yaml = env.exporter_yaml(
        "hashes",
        "127.0.0.1:0",
        &format!("sd: {{type: storage, path: {}}}", img.display()),
    );
    yaml.push_str(&format!("metrics: 127.0.0.1:{metrics}\n"));
    let jmpd = env.start_jmpd(&yaml);
    let mut p = Proc::spawn("jmp-attach-d", env.attach_cmd(&jmpd, &["-d"]), &env.logs);
    let line = p.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON ({e}): {line:?}"));
    assert!(
        p.expect_exit(READY).success(),
        "jmp attach -d: {}",
        p.stderr()
    );
    let mut guard = DaemonGuard {
        env: &env,
        pid: v["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}")) as i32,
        stop_args: vec!["detach".into(), jmpd.name.clone()],
        stopped: false,
    };
    // Two hashes over the whole 64 GiB through the attachment: one as a device request, one
    // on a storage channel (as `jmp storage flash --verify` asks).
    let sock = env.runtime.join(format!("attach-{}.sock", jmpd.name));
    let mut device = std::os::unix::net::UnixStream::connect(&sock).expect("control socket");
    use std::io::{BufRead, Write};
    writeln!(
        device,
        r#"{{"v":1,"op":"device","device":"sd","request":{{"kind":"storage","request":{{"hash":{{"offset":0,"len":{BIG}}}}}}}}}"#
    )
    .expect("ask");
    let mut channel = std::os::unix::net::UnixStream::connect(&sock).expect("control socket");
    writeln!(
        channel,
        r#"{{"v":1,"op":"channel","device":"sd","kind":"storage"}}"#
    )
    .expect("ask");
    let mut reply = String::new();
    std::io::BufReader::new(&channel)
        .read_line(&mut reply)
        .expect("reply");
    assert!(reply.contains(r#""reply":"channel""#), "{reply}");
    channel
        .write_all(&frame(&Request {
            id: 1,
            op: Op::Hash {
                offset: 0,
                len: BIG,
            },
        }))
        .expect("hash request");
    until_metrics("both hashes run", || {
        metric(metrics, "jmpd_blocking_jobs") == 2
            && metric(metrics, "jmpd_blocking_job_bytes_total") > 0
    });
    let out = guard.stop();
    assert!(out.status.success(), "jmp detach: {}", out.stderr);
    until_metrics("the hashes stop", || {
        metric(metrics, "jmpd_blocking_jobs") == 0
    });
    let done = metric(metrics, "jmpd_blocking_job_bytes_total");
    raw_stderr(&format!(
        "hashes stopped after {} MiB of the {} MiB asked for",
        done >> 20,
        (2 * BIG) >> 20
    ));
    assert!(
        done < BIG,
        "a hash ran to its end ({done} bytes in all) although its client detached"
    );
    assert_eq!(metric(metrics, "jmpd_budget_bytes"), 0);
}

// ---------------------------------------------------------------------------------------------
// The console history a client sees starts at its own lease.

/// A controller-mode jmpd config for a board with a sim console, with `extra` top-level lines.
fn board_config(lab: &jmp_e2e::lab::Lab, name: &str, token: &Path, extra: &str) -> PathBuf {
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}, labels: {{site: e2e}}}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\n{extra}export:\n  console: {{type: sim-console}}\n  power: {{type: power-sim}}\n",
        lab.env.root.join(format!("state-{name}")).display(),
        token.display()
    );
    let p = lab.env.root.join(format!("{name}.exporter.yaml"));
    std::fs::write(&p, yaml).expect("write exporter config");
    p
}

/// `client` leases `board` and returns the lease's name.
fn take_lease(lab: &jmp_e2e::lab::Lab, client: &str, board: &str) -> String {
    lab.ok(
        "create-lease",
        lab.as_client(
            client,
            &["create", "lease", "-n", board, "--duration", "10m"],
        ),
    )
    .trim()
    .to_string()
}

/// `client` attaches under its lease; the attachment and its console.
fn attach(lab: &jmp_e2e::lab::Lab, client: &str) -> (Proc, Console) {
    let (att, v) = jmp_e2e::lab::attach_lease(lab, client, &[]);
    (att, Console::open(local_of(&v, "console")))
}

/// `client` leases `board`, attaches, and returns the attachment, its console and the lease.
fn lease_and_attach(lab: &jmp_e2e::lab::Lab, client: &str, board: &str) -> (Proc, Console, String) {
    let lease = take_lease(lab, client, board);
    let (att, console) = attach(lab, client);
    (att, console, lease)
}

/// Types `marker` and waits for its echo: what the channel showed before it is what it
/// replayed (what the board prints after it is the board's answer, from its live state).
fn replayed_before(c: &mut Console, marker: &str) -> String {
    c.write(format!("{marker}\r").as_bytes());
    c.read_until(marker, READY);
    let seen = String::from_utf8_lossy(&c.seen).into_owned();
    match seen.find(marker) {
        Some(at) => seen[..at].to_string(),
        None => seen,
    }
}

/// Ends `client`'s attachment and lease.
fn release(lab: &jmp_e2e::lab::Lab, client: &str, mut att: Proc, c: Console, lease: &str) {
    drop(c);
    lab.ok(
        "delete-lease",
        lab.as_client(client, &["delete", "lease", lease]),
    );
    att.expect_exit(READY);
}

#[test]
fn another_client_s_lease_does_not_see_the_previous_console() {
    let lab = jmp_e2e::lab::Lab::new("history-lease");
    let token = lab.create_exporter("hist", &["board=hist"]);
    let _jmpd = lab.start_jmpd(&board_config(&lab, "hist", &token, ""));
    lab.create_client("team-a", &[]);
    lab.create_client("team-b", &[]);

    let (att, mut c, lease) = lease_and_attach(&lab, "team-a", "hist");
    sim_login_and_echo(&mut c, "TEAM-A-SECRET");
    release(&lab, "team-a", att, c, &lease);

    // Team B power-cycles the board under its lease before attaching: that boot log is its
    // own lease's and is replayed to it; nothing of team A's is.
    let lease = take_lease(&lab, "team-b", "hist");
    lab.ok(
        "power-cycle",
        lab.as_client("team-b", &["power", "cycle", "--lease", &lease]),
    );
    let (att, mut c) = attach(&lab, "team-b");
    let seen = replayed_before(&mut c, "TEAM-B-HERE");
    assert!(
        !seen.contains("TEAM-A-SECRET"),
        "team B was shown team A's console: {seen:?}"
    );
    assert!(
        seen.contains("Booting Linux"),
        "the boot log of team B's own power cycle was not replayed: {seen:?}"
    );
    // The marker was typed at the login prompt: log in, so that the next marker is echoed.
    c.write(b"x\r");
    c.read_until("TEAM-B-HERE@hist:~$ ", READY);
    release(&lab, "team-b", att, c, &lease);

    // The same client's next lease starts afresh too (history per lease, the default).
    let (att, mut c, lease) = lease_and_attach(&lab, "team-a", "hist");
    let seen = replayed_before(&mut c, "TEAM-A-AGAIN");
    assert!(!seen.contains("TEAM-B-HERE"), "{seen:?}");
    release(&lab, "team-a", att, c, &lease);
}

#[test]
fn history_client_keeps_a_client_s_own_console_across_its_leases() {
    let lab = jmp_e2e::lab::Lab::new("history-client");
    let token = lab.create_exporter("keep", &["board=keep"]);
    let _jmpd = lab.start_jmpd(&board_config(&lab, "keep", &token, "history: client\n"));
    lab.create_client("ci", &[]);
    lab.create_client("other", &[]);

    let (att, mut c, lease) = lease_and_attach(&lab, "ci", "keep");
    sim_login_and_echo(&mut c, "CI-FIRST-LEASE");
    release(&lab, "ci", att, c, &lease);

    // Its next lease replays what it was shown before.
    let (att, mut c, lease) = lease_and_attach(&lab, "ci", "keep");
    let seen = replayed_before(&mut c, "CI-SECOND-LEASE");
    assert!(
        seen.contains("CI-FIRST-LEASE"),
        "the same client's earlier lease was not replayed: {seen:?}"
    );
    release(&lab, "ci", att, c, &lease);

    // Another client in between: nothing of the first's.
    let (att, mut c, lease) = lease_and_attach(&lab, "other", "keep");
    let seen = replayed_before(&mut c, "OTHER-HERE");
    assert!(
        !seen.contains("CI-FIRST-LEASE") && !seen.contains("CI-SECOND-LEASE"),
        "another client was shown the first's console: {seen:?}"
    );
    release(&lab, "other", att, c, &lease);
}

#[test]
fn direct_mode_keeps_one_client_name_s_console_from_the_next() {
    let env = TestEnv::new("history-direct");
    let jmpd =
        env.start_jmpd(&env.exporter_yaml("direct", "127.0.0.1:0", "console: {type: sim-console}"));
    let attach = |name: &str| {
        let (p, v) = env.attach(&jmpd, &["--name", name]);
        (p, Console::open(local_of(&v, "console")))
    };
    let (mut a, mut c) = attach("alice@a");
    // The first holder since jmpd started sees what the board printed since (its boot log).
    c.read_until("login: ", READY);
    sim_login_and_echo(&mut c, "ALICE-SECRET");
    drop(c);
    a.stop();
    // Alice again: the same holder, her console is still there.
    let (mut a, mut c) = attach("alice@a");
    let seen = replayed_before(&mut c, "ALICE-BACK");
    assert!(seen.contains("ALICE-SECRET"), "{seen:?}");
    drop(c);
    a.stop();
    // Bob: none of it.
    let (_b, mut c) = attach("bob@b");
    let seen = replayed_before(&mut c, "BOB-HERE");
    assert!(
        !seen.contains("ALICE-SECRET") && !seen.contains("ALICE-BACK"),
        "bob was shown alice's console: {seen:?}"
    );
}
