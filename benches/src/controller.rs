//! The controller (`jmp-controller`, release build, embedded redb store with an fsync per
//! commit): lease round trips through the API and through the real `jmp` CLI, then scale —
//! 10,000 registered exporters, a burst of 1,000 concurrent lease requests, resident memory.
//!
//! There is no external peer for the controller, so the figures are absolute; the table shows
//! each against its target (figure / target). Each round runs both phases, each on a fresh
//! controller and data dir; latency percentiles are over every round's samples pooled, the other
//! figures are medians over rounds. The phases:
//!
//! 1. **Round trip**: one exporter registered; connection setup (handshake, then the first
//!    call) measured on fresh connections; then `CreateLease` → `Lease` and `DeleteLease` →
//!    `Deleted` on one kept-open connection, and the same through `jmp create lease` +
//!    `jmp delete lease` processes.
//! 2. **Scale**: `CreateExporter` ×10,000 over a few admin connections, `Register` ×10,000 kept
//!    open over [`REGISTER_CONNS`] connections, RSS; then 10 clients × 100 concurrent
//!    `CreateLease` (varied selectors, no waiting), RSS; then the API round trip again at this
//!    scale.

use crate::jmp::Bins;
use crate::proc::{rss_kib, Proc, TempDir};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::command;
use jmp_protocol::api::{
    Call, ClientConfig, ClientSpec, CtlErrorCode, DeviceSummary, ExporterSpec, LeaseRequest,
    Registration, Reply, Request,
};
use jmp_protocol::selector::Labels;
use jmp_transport::controller::{call, call_once, CallError};
use jmp_transport::{client_endpoint, connect, Fingerprint};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

pub const EXPORTERS: usize = 10_000;
pub const CLIENTS: usize = 10;
pub const PER_CLIENT: usize = 100;
/// The controller allows 1,024 concurrent streams per connection; a Register stream stays open.
pub const REGISTER_CONNS: usize = 20;
pub const ADMIN_CONNS: usize = 4;
/// CreateExporter calls in flight per admin connection.
pub const ADMIN_IN_FLIGHT: usize = 128;
pub const API_ROUNDS: usize = 200;
pub const SCALE_ROUNDS: usize = 100;
pub const CLI_ROUNDS: usize = 30;
pub const CONNECT_ROUNDS: usize = 20;
pub const WARMUP: usize = 10;
const LEASE_SECS: u64 = 600;

/// A running controller.
struct Controller {
    proc: Proc,
    addr: SocketAddr,
    fingerprint: Fingerprint,
    metrics: String,
    admin: ClientConfig,
    admin_file: std::path::PathBuf,
}

fn start_controller(bins: &Bins, dir: &TempDir, extra: &[String]) -> Result<Controller> {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let ctl = jmp_e2e::lab::Controller::start(
        &bins.controller,
        dir.path(),
        &dir.join("data"),
        "127.0.0.1:0",
        &extra,
    )?;
    let fingerprint: Fingerprint = ctl
        .fingerprint
        .parse()
        .map_err(|e: String| anyhow!("controller fingerprint: {e}"))?;
    let admin_file = ctl.admin_file;
    // On etcd the admin credential is written once this controller has won the election.
    let t0 = Instant::now();
    while !admin_file.exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin: ClientConfig = serde_norway::from_str(
        &std::fs::read_to_string(&admin_file)
            .with_context(|| format!("read {}", admin_file.display()))?,
    )
    .with_context(|| format!("parse {}", admin_file.display()))?;
    Ok(Controller {
        proc: ctl.proc,
        addr: ctl.addr,
        fingerprint,
        metrics: ctl.metrics.to_string(),
        admin,
        admin_file,
    })
}

/// GET /metrics; `(name with labels) → value`.
fn scrape(addr: &str) -> Result<Vec<(String, f64)>> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

fn metric(m: &[(String, f64)], name: &str) -> f64 {
    m.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN)
}

/// (commits, seconds spent committing) of the store (redb or etcd) so far.
fn commits(addr: &str) -> (f64, f64) {
    match scrape(addr) {
        Ok(m) => {
            let sum = |name: &str| {
                ["redb", "etcd"]
                    .iter()
                    .map(|b| metric(&m, &format!("{name}{{backend=\"{b}\"}}")))
                    .filter(|v| !v.is_nan())
                    .sum::<f64>()
            };
            (
                sum("jmp_store_commit_seconds_count"),
                sum("jmp_store_commit_seconds_sum"),
            )
        }
        Err(_) => (f64::NAN, f64::NAN),
    }
}

/// One QUIC connection to the controller (with its own UDP socket).
struct Conn {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
}

async fn open(addr: SocketAddr, fp: Fingerprint) -> Result<Conn> {
    let ep = client_endpoint(addr)?;
    let (conn, _) = connect(&ep, addr, jmp_protocol::ALPN_CONTROLLER, Some(fp)).await?;
    Ok(Conn { _ep: ep, conn })
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"bench done");
    }
}

async fn ask(conn: &quinn::Connection, cred: &str, request: Request) -> Result<Reply, CallError> {
    call_once(
        conn,
        &Call {
            credential: cred.to_string(),
            request,
        },
    )
    .await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// p50 and p99 of a series.
#[derive(Clone, Copy)]
struct Pct {
    p50: f64,
    p99: f64,
}

impl Pct {
    fn of(v: &[f64]) -> Pct {
        Pct {
            p50: percentile(v, 50.0),
            p99: percentile(v, 99.0),
        }
    }

    fn json(self) -> serde_json::Value {
        serde_json::json!({"p50_ms": json(self.p50), "p99_ms": json(self.p99)})
    }
}

/// Create → Lease → Delete → Deleted, `rounds` times after [`WARMUP`] on one connection:
/// (grant ms, delete ms, whole round trip ms).
async fn lease_rounds(
    conn: &quinn::Connection,
    cred: &str,
    selector: &str,
    tag: &str,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (mut grant, mut del, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..WARMUP + rounds {
        let t0 = Instant::now();
        let req = LeaseRequest {
            request_id: format!("{tag}-{r}"),
            selector: selector.to_string(),
            duration_secs: LEASE_SECS,
            ..Default::default()
        };
        let lease = match ask(conn, cred, Request::CreateLease(req)).await? {
            Reply::Lease(l) => l,
            other => bail!("CreateLease answered {other:?}"),
        };
        let t1 = Instant::now();
        match ask(
            conn,
            cred,
            Request::DeleteLease {
                names: vec![lease.name.clone()],
                all: false,
            },
        )
        .await?
        {
            Reply::Deleted { names } if names == [lease.name.clone()] => {}
            other => bail!("DeleteLease {} answered {other:?}", lease.name),
        }
        let t2 = Instant::now();
        if r >= WARMUP {
            grant.push(ms(t1 - t0));
            del.push(ms(t2 - t1));
            total.push(ms(t2 - t0));
        }
    }
    Ok((grant, del, total))
}

async fn create_exporter(
    conn: &quinn::Connection,
    admin: &str,
    name: &str,
    labels: Labels,
) -> Result<String> {
    let spec = ExporterSpec {
        name: name.to_string(),
        labels,
    };
    match ask(conn, admin, Request::CreateExporter(spec)).await? {
        Reply::Credential(c) => Ok(c.token),
        other => bail!("CreateExporter {name} answered {other:?}"),
    }
}

async fn create_client(conn: &quinn::Connection, admin: &str, name: &str) -> Result<String> {
    let spec = ClientSpec {
        name: name.to_string(),
        ..Default::default()
    };
    match ask(conn, admin, Request::CreateClient(spec)).await? {
        Reply::Credential(c) => Ok(c.token),
        other => bail!("CreateClient {name} answered {other:?}"),
    }
}

/// Exporter `e{i}`'s registration on `conn`, proving it holds `identity`'s key (one identity
/// stands for every bench exporter: the controller checks the proof per registration).
fn registration(
    i: usize,
    conn: &quinn::Connection,
    identity: &jmp_transport::Identity,
) -> Result<Registration> {
    let proof = jmp_transport::possession::registration_proof(identity, conn, &format!("e{i}"))?;
    Ok(Registration {
        address: format!("127.0.0.1:{}", 20000 + i % 40000),
        fingerprint: identity.fingerprint().to_string(),
        proof: Some(proof),
        labels: Labels::new(),
        devices: vec![DeviceSummary {
            name: "console".into(),
            kind: "sim-console".into(),
        }],
        ..Default::default()
    })
}

/// Registers exporter `i` with `cred` on `conn`, keeps the request side open, reports the first
/// `ExporterState` on `online`, then drains pushes until the stream or connection ends.
async fn hold_registration(
    conn: quinn::Connection,
    cred: String,
    i: usize,
    identity: jmp_transport::Identity,
    online: tokio::sync::mpsc::UnboundedSender<Result<()>>,
) {
    let reg = match registration(i, &conn, &identity) {
        Ok(r) => r,
        Err(e) => {
            let _ = online.send(Err(e));
            return;
        }
    };
    let c = Call {
        credential: cred,
        request: Request::Register(reg),
    };
    let (mut replies, send) = match call(&conn, &c, true).await {
        Ok(x) => x,
        Err(e) => {
            let _ = online.send(Err(anyhow!("Register e{i}: {e}")));
            return;
        }
    };
    let first = match replies.next().await {
        Ok(Some(Reply::ExporterState { .. })) => Ok(()),
        other => Err(anyhow!("Register e{i}: first answer {other:?}")),
    };
    let _ = online.send(first);
    while let Ok(Some(_)) = replies.next().await {}
    drop(send);
}

fn labels_of(i: usize) -> Labels {
    [
        ("board", format!("b{}", i % 50)),
        ("rack", format!("r{}", i % 200)),
        ("id", format!("e{i}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Selector of burst request `j`: boards, racks, both, one exporter by id, a set expression;
/// every 50th asks for the same exporter by id as the request before it, so 2% compete for
/// one exporter (one of each pair is granted, the other refused as all busy).
pub fn burst_selector(j: usize) -> String {
    if j % 50 == 49 {
        return burst_selector(j - 1);
    }
    match j % 5 {
        0 => format!("board=b{}", j % 50),
        1 => format!("rack=r{}", j % 200),
        2 => {
            let x = (j * 7) % 200;
            format!("board=b{},rack=r{x}", x % 50)
        }
        3 => format!("id=e{}", (j * 7919) % EXPORTERS),
        _ => format!(
            "board in (b{},b{}),rack!=r{}",
            j % 50,
            (j + 25) % 50,
            j % 200
        ),
    }
}

pub(crate) struct Burst {
    pub(crate) total_ms: f64,
    pub(crate) latency: Vec<f64>,
    granted: usize,
    busy: usize,
    pub(crate) errors: Vec<String>,
    commits: f64,
}

/// 1,000 CreateLease calls at once: CLIENTS clients on their own connections, PER_CLIENT each.
async fn burst(clients: &[(Conn, String)], metrics: &str) -> Result<Burst> {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut set = JoinSet::new();
    for (c, (conn, cred)) in clients.iter().enumerate() {
        for k in 0..PER_CLIENT {
            let j = c * PER_CLIENT + k;
            let conn = conn.conn.clone();
            let cred = cred.clone();
            let mut go = go_rx.clone();
            set.spawn(async move {
                let _ = go.wait_for(|g| *g).await;
                let t = Instant::now();
                let req = LeaseRequest {
                    request_id: format!("burst-{j}"),
                    selector: burst_selector(j),
                    duration_secs: LEASE_SECS,
                    ..Default::default()
                };
                let r = ask(&conn, &cred, Request::CreateLease(req)).await;
                (j, t, Instant::now(), r)
            });
        }
    }
    // Let every task reach its wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c0, _) = commits(metrics);
    let t0 = Instant::now();
    go_tx.send(true)?;
    let mut b = Burst {
        total_ms: 0.0,
        latency: Vec::new(),
        granted: 0,
        busy: 0,
        errors: Vec::new(),
        commits: 0.0,
    };
    let mut last = t0;
    while let Some(r) = set.join_next().await {
        let (j, t, done, r) = r?;
        last = last.max(done);
        b.latency.push(ms(done - t));
        match r {
            Ok(Reply::Lease(_)) => b.granted += 1,
            Err(CallError::Refused(e)) if e.code == CtlErrorCode::AllBusy => b.busy += 1,
            Ok(other) => b.errors.push(format!("request {j}: {other:?}")),
            Err(e) => b
                .errors
                .push(format!("request {j} ({}): {e}", burst_selector(j))),
        }
    }
    b.total_ms = ms(last - t0);
    b.commits = commits(metrics).0 - c0;
    Ok(b)
}

/// One `jmp` command; its trimmed stdout.
fn jmp_cmd(jmp: &Path, dir: &TempDir, client: &Path, args: &[&str]) -> Result<String> {
    let o = command(jmp)
        .args(args)
        .env("JMP_CLIENT_CONFIG", client)
        .env("JMP_CONFIG_DIR", dir.join("config"))
        .env("JMP_RUNTIME_DIR", dir.join("runtime"))
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("run jmp {args:?}"))?;
    if !o.status.success() {
        bail!(
            "jmp {args:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `jmp create lease` + `jmp delete lease` processes: (create ms, delete ms, round trip ms).
fn cli_rounds(
    bins: &Bins,
    dir: &TempDir,
    ctl: &Controller,
    selector: &str,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let client = dir.join("cli-client.yaml");
    let o = command(&bins.jmp)
        .args(["admin", "create", "client", "bench-cli", "--out"])
        .arg(&client)
        .env("JMP_ADMIN_CONFIG", &ctl.admin_file)
        .env("JMP_CONFIG_DIR", dir.join("config"))
        .output()
        .context("run jmp admin create client")?;
    if !o.status.success() {
        bail!(
            "jmp admin create client failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let (mut create, mut del, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..3 + CLI_ROUNDS {
        let t0 = Instant::now();
        let name = jmp_cmd(
            &bins.jmp,
            dir,
            &client,
            &["create", "lease", "-l", selector, "--duration", "10m"],
        )?;
        let t1 = Instant::now();
        jmp_cmd(&bins.jmp, dir, &client, &["delete", "lease", &name])?;
        let t2 = Instant::now();
        if r >= 3 {
            create.push(ms(t1 - t0));
            del.push(ms(t2 - t1));
            total.push(ms(t2 - t0));
        }
    }
    Ok((create, del, total))
}

/// (grant or create ms, delete ms, round trip ms) samples.
pub(crate) type Trips = (Vec<f64>, Vec<f64>, Vec<f64>);

fn extend(into: &mut Trips, from: Trips) {
    into.0.extend(from.0);
    into.1.extend(from.1);
    into.2.extend(from.2);
}

/// Latency samples pooled over rounds; one value per round for the rest.
#[derive(Default)]
pub(crate) struct Figures {
    connect: Vec<f64>,
    first_call: Vec<f64>,
    pub(crate) api: Trips,
    commit_mean_ms: Vec<f64>,
    commits_per_round: Vec<f64>,
    cli: Trips,
    cli_error: Option<String>,
    create_exporters_s: Vec<f64>,
    register_s: Vec<f64>,
    online: Vec<f64>,
    rss_registered: Vec<f64>,
    hwm_registered: Vec<f64>,
    pub(crate) bursts: Vec<Burst>,
    rss_burst: Vec<f64>,
    hwm_burst: Vec<f64>,
    pub(crate) scale_api: Trips,
}

/// Phase 1: connection setup, API and CLI round trips on a small controller (`extra`: its
/// store arguments).
pub(crate) fn phase_round_trip(
    rt: &tokio::runtime::Runtime,
    bins: &Bins,
    f: &mut Figures,
    extra: &[String],
) -> Result<()> {
    let dir = TempDir::new("controller-rt");
    let ctl = start_controller(bins, &dir, extra)?;
    let (addr, fp, admin) = (ctl.addr, ctl.fingerprint, ctl.admin.token.clone());
    let held = rt.block_on(async {
        // Connection setup: the QUIC + TLS 1.3 handshake, then a first call (Whoami).
        for _ in 0..CONNECT_ROUNDS {
            let t0 = Instant::now();
            let c = open(addr, fp).await?;
            let t1 = Instant::now();
            ask(&c.conn, &admin, Request::Whoami).await?;
            f.connect.push(ms(t1 - t0));
            f.first_call.push(ms(Instant::now() - t1));
        }
        let a = open(addr, fp).await?;
        let cred = create_exporter(&a.conn, &admin, "e0", labels_of(0)).await?;
        let e = open(addr, fp).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let identity = jmp_transport::Identity::generate()?;
        let task = tokio::spawn(hold_registration(e.conn.clone(), cred, 0, identity, tx));
        rx.recv()
            .await
            .ok_or_else(|| anyhow!("registration task ended"))??;
        let client = create_client(&a.conn, &admin, "bench-api").await?;
        let c = open(addr, fp).await?;
        let (n0, s0) = commits(&ctl.metrics);
        let trips = lease_rounds(&c.conn, &client, "board=b0", "rt", API_ROUNDS).await?;
        extend(&mut f.api, trips);
        let (n1, s1) = commits(&ctl.metrics);
        let rounds = (WARMUP + API_ROUNDS) as f64;
        f.commit_mean_ms.push((s1 - s0) / (n1 - n0) * 1000.0);
        f.commits_per_round.push((n1 - n0) / rounds);
        anyhow::Ok((a, e, task))
    })?;
    match cli_rounds(bins, &dir, &ctl, "board=b0") {
        Ok(v) => extend(&mut f.cli, v),
        Err(e) => {
            eprintln!("  controller: CLI rounds failed: {e:#}");
            f.cli_error = Some(format!("{e:#}"));
        }
    }
    drop(held);
    drop(ctl);
    Ok(())
}

/// Phase 2: 10,000 exporters, the burst, RSS, round trips at scale.
pub(crate) fn phase_scale(
    rt: &tokio::runtime::Runtime,
    bins: &Bins,
    f: &mut Figures,
    extra: &[String],
) -> Result<()> {
    let dir = TempDir::new("controller-scale");
    let mut ctl = start_controller(bins, &dir, extra)?;
    let (addr, fp, admin) = (ctl.addr, ctl.fingerprint, ctl.admin.token.clone());
    let pid = ctl.proc.pid();
    let metrics = ctl.metrics.clone();
    let held = rt.block_on(async {
        let mut admins = Vec::new();
        for _ in 0..ADMIN_CONNS {
            admins.push(Arc::new(open(addr, fp).await?));
        }
        // CreateExporter ×10,000, ADMIN_IN_FLIGHT per connection.
        let t0 = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNS * ADMIN_IN_FLIGHT));
        let mut set = JoinSet::new();
        for i in 0..EXPORTERS {
            let conn = admins[i % ADMIN_CONNS].clone();
            let admin = admin.clone();
            let permit = sem.clone().acquire_owned().await?;
            set.spawn(async move {
                let r = create_exporter(&conn.conn, &admin, &format!("e{i}"), labels_of(i)).await;
                drop(permit);
                (i, r)
            });
        }
        let mut creds = vec![String::new(); EXPORTERS];
        while let Some(r) = set.join_next().await {
            let (i, r) = r?;
            creds[i] = r?;
        }
        let created = t0.elapsed().as_secs_f64();
        f.create_exporters_s.push(created);
        eprintln!("  controller: {EXPORTERS} exporters created in {created:.2} s");

        // Register ×10,000, kept open, over REGISTER_CONNS connections.
        let mut conns = Vec::new();
        for _ in 0..REGISTER_CONNS {
            conns.push(open(addr, fp).await?);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut regs = JoinSet::new();
        let t0 = Instant::now();
        let identity = jmp_transport::Identity::generate()?;
        for (i, cred) in creds.into_iter().enumerate() {
            let conn = conns[i % REGISTER_CONNS].conn.clone();
            regs.spawn(hold_registration(
                conn,
                cred,
                i,
                identity.clone(),
                tx.clone(),
            ));
        }
        for _ in 0..EXPORTERS {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(r)) => r?,
                Ok(None) => bail!("registration tasks ended"),
                Err(_) => bail!("registrations not online within 60 s"),
            }
        }
        let registered = t0.elapsed().as_secs_f64();
        f.register_s.push(registered);
        eprintln!("  controller: {EXPORTERS} exporters online in {registered:.2} s");
        let admin_conns = admins;
        anyhow::Ok((conns, regs, admin_conns))
    })?;
    std::thread::sleep(Duration::from_secs(1));
    f.online.push(
        scrape(&metrics)
            .map(|m| metric(&m, "jmp_exporters{state=\"online\"}"))
            .unwrap_or(f64::NAN),
    );
    let (rss, hwm) = rss_kib(pid)?;
    f.rss_registered.push(mib(rss));
    f.hwm_registered.push(mib(hwm));

    let clients = rt.block_on(async {
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let cred = create_client(&held.2[0].conn, &admin, &format!("burst-{c}")).await?;
            let conn = open(addr, fp).await?;
            // One call first, as any client makes: until a connection has presented a valid
            // credential the controller reads only a few of its calls at once (a burst on a
            // fresh connection would be refused in part, by design).
            ask(&conn.conn, &cred, Request::Whoami).await?;
            clients.push((conn, cred));
        }
        let b = burst(&clients, &metrics).await?;
        eprintln!(
            "  controller: burst of {} answered in {:.0} ms ({} granted, {} all busy, {} errors)",
            CLIENTS * PER_CLIENT,
            b.total_ms,
            b.granted,
            b.busy,
            b.errors.len()
        );
        f.bursts.push(b);
        anyhow::Ok(clients)
    })?;
    let (rss, hwm) = rss_kib(pid)?;
    f.rss_burst.push(mib(rss));
    f.hwm_burst.push(mib(hwm));

    rt.block_on(async {
        for (conn, cred) in &clients {
            ask(
                &conn.conn,
                cred,
                Request::DeleteLease {
                    names: Vec::new(),
                    all: true,
                },
            )
            .await?;
        }
        let trips = lease_rounds(
            &clients[0].0.conn,
            &clients[0].1,
            "board=b7",
            "scale",
            SCALE_ROUNDS,
        )
        .await?;
        extend(&mut f.scale_api, trips);
        anyhow::Ok(())
    })?;
    if !ctl.proc.is_running() {
        bail!("controller exited; its log:\n{}", ctl.proc.log_tail(20));
    }
    drop(clients);
    drop(held);
    drop(ctl);
    Ok(())
}

/// Runs the controller benchmark (`rounds` fresh controllers per phase, at most 5); returns
/// (markdown, json).
pub fn run(bins: &Bins, rounds: usize) -> Result<(String, serde_json::Value)> {
    let rounds = rounds.clamp(1, 5);
    if !bins.controller.exists() {
        bail!(
            "{} is missing: run `cargo build --release --workspace --bins`",
            bins.controller.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut f = Figures::default();
    for r in 0..rounds {
        eprintln!("  controller round {}/{rounds}", r + 1);
        phase_round_trip(&rt, bins, &mut f, &[])?;
        phase_scale(&rt, bins, &mut f, &[])?;
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(report(&f, rounds))
}

fn report(f: &Figures, rounds: usize) -> (String, serde_json::Value) {
    let (conn, first) = (Pct::of(&f.connect), Pct::of(&f.first_call));
    let (grant, del, round) = (Pct::of(&f.api.0), Pct::of(&f.api.1), Pct::of(&f.api.2));
    let (sgrant, sdel, sround) = (
        Pct::of(&f.scale_api.0),
        Pct::of(&f.scale_api.1),
        Pct::of(&f.scale_api.2),
    );
    let (ccreate, cdel, cround) = (Pct::of(&f.cli.0), Pct::of(&f.cli.1), Pct::of(&f.cli.2));
    let burst_each: Vec<f64> = f.bursts.iter().map(|b| b.total_ms).collect();
    let burst_ms = median(&burst_each);
    let burst_worst = burst_each.iter().copied().fold(f64::NAN, f64::max);
    let burst_lat: Vec<f64> = f.bursts.iter().flat_map(|b| b.latency.clone()).collect();
    let burst_lat = Pct::of(&burst_lat);
    let granted: usize = f.bursts.iter().map(|b| b.granted).sum();
    let busy: usize = f.bursts.iter().map(|b| b.busy).sum();
    let errors: Vec<String> = f.bursts.iter().flat_map(|b| b.errors.clone()).collect();
    let burst_commits = median(&f.bursts.iter().map(|b| b.commits).collect::<Vec<_>>());
    let rss_reg = median(&f.rss_registered);
    let rss_burst = median(&f.rss_burst);
    let rss_max = rss_reg.max(rss_burst);
    let t_grant = Target::AtMost(5.0);
    let t_burst = Target::AtMost(2000.0);
    let t_rss = Target::AtMost(200.0);
    let limit = |t: Target| match t {
        Target::AtMost(x) | Target::AtLeast(x) => x,
    };
    let target = |v: f64, t: Target, what: &str| {
        serde_json::json!({"what": what, "value": json(v), "target": t.describe(),
            "ratio": json(v / limit(t)), "verdict": t.verdict(v)})
    };
    let row =
        |name: &str, p: Pct| format!("| {name} | {} | {} |\n", cell(p.p50, 2), cell(p.p99, 2));
    let n = |per_round: usize| per_round * rounds;
    let mut md = format!(
        "### Controller\n\nRelease `jmp-controller` (embedded redb store, fsync per commit), \
         in-process QUIC clients on loopback (sharing the machine's cores with the controller). \
         No peer: absolute figures, and each against its target (figure / target). {rounds} \
         round(s), each on fresh controllers; latency percentiles over all rounds' samples, \
         other figures medians over rounds.\n\n\
         #### Lease round trip (1 exporter registered; API: {} samples on one kept-open \
         connection, after {WARMUP} warm-up per round; CLI: {} samples)\n\n\
         | step | p50 ms | p99 ms |\n|---|---:|---:|\n",
        n(API_ROUNDS),
        n(CLI_ROUNDS),
    );
    md += &row("connection setup (QUIC + TLS handshake)", conn);
    md += &row("first call on a new connection (Whoami)", first);
    md += &row("API CreateLease → Lease (grant)", grant);
    md += &row("API DeleteLease → Deleted", del);
    md += &row("API create + delete round trip", round);
    md += &row("CLI `jmp create lease` process", ccreate);
    md += &row("CLI `jmp delete lease` process", cdel);
    md += &row("CLI create + delete round trip", cround);
    md += &format!(
        "\nStore commits per API call pair: {} (mean commit incl. fsync {} ms).{}\n\n",
        cell(median(&f.commits_per_round), 2),
        cell(median(&f.commit_mean_ms), 2),
        f.cli_error
            .as_ref()
            .map(|e| format!(" CLI rounds FAILED: {e}"))
            .unwrap_or_default()
    );
    md += &format!(
        "#### Scale ({EXPORTERS} exporters, labels board=b{{i%50}}, rack=r{{i%200}}, \
         id=e{{i}})\n\n\
         | figure | value |\n|---|---:|\n\
         | CreateExporter ×{EXPORTERS} ({ADMIN_CONNS} conns × {ADMIN_IN_FLIGHT} in flight) | {} s |\n\
         | Register ×{EXPORTERS} until all online ({REGISTER_CONNS} conns, kept open) | {} s |\n\
         | exporters online (metric) | {} |\n\
         | VmRSS after registration (VmHWM) | {} MiB ({}) |\n\
         | burst: {CLIENTS} clients × {PER_CLIENT} CreateLease at once, until all answered (worst round) | {} ms ({}) |\n\
         | burst: per-request latency p50 / p99 | {} / {} ms |\n\
         | burst: granted / all busy / other, all rounds | {granted} / {busy} / {} |\n\
         | burst: store commits | {} |\n\
         | VmRSS after the burst (VmHWM) | {} MiB ({}) |\n\
         | API grant at scale p50 / p99 ({} samples, `board=b7`) | {} / {} ms |\n\
         | API round trip at scale p50 / p99 | {} / {} ms |\n\n",
        cell(median(&f.create_exporters_s), 2),
        cell(median(&f.register_s), 2),
        cell(median(&f.online), 0),
        cell(rss_reg, 1),
        cell(median(&f.hwm_registered), 1),
        cell(burst_ms, 0),
        cell(burst_worst, 0),
        cell(burst_lat.p50, 1),
        cell(burst_lat.p99, 1),
        errors.len(),
        cell(burst_commits, 0),
        cell(rss_burst, 1),
        cell(median(&f.hwm_burst), 1),
        n(SCALE_ROUNDS),
        cell(sgrant.p50, 2),
        cell(sgrant.p99, 2),
        cell(sround.p50, 2),
        cell(sround.p99, 2),
    );
    let verdict = |name: &str, v: f64, t: Target, d: usize| {
        format!(
            "| {name} | {} | {} | {} | **{}** |\n",
            cell(v, d),
            t.describe(),
            cell(v / limit(t), 2),
            t.verdict(v)
        )
    };
    md += "| target | figure | target | figure / target | verdict |\n|---|---:|---|---:|---|\n";
    md += &verdict("API grant p50 (ms)", grant.p50, t_grant, 2);
    md += &verdict("1,000 requests answered (ms)", burst_ms, t_burst, 0);
    md += &verdict(
        "VmRSS at 10,000 exporters (MiB, after the burst or before, larger)",
        rss_max,
        t_rss,
        1,
    );
    if let Some(e) = errors.first() {
        md += &format!("\nBurst errors ({}), first: {e}\n", errors.len());
    }
    let js = serde_json::json!({
        "rounds": rounds,
        "api_samples": f.api.0.len(),
        "cli_samples": f.cli.0.len(),
        "connect": conn.json(),
        "first_call": first.json(),
        "api_grant": grant.json(),
        "api_delete": del.json(),
        "api_round_trip": round.json(),
        "store_commits_per_round": json(median(&f.commits_per_round)),
        "store_commit_mean_ms": json(median(&f.commit_mean_ms)),
        "cli_create": ccreate.json(),
        "cli_delete": cdel.json(),
        "cli_round_trip": cround.json(),
        "cli_error": f.cli_error,
        "exporters": EXPORTERS,
        "create_exporters_s": json(median(&f.create_exporters_s)),
        "register_s": json(median(&f.register_s)),
        "online": json(median(&f.online)),
        "rss_registered_mib": json(rss_reg),
        "hwm_registered_mib": json(median(&f.hwm_registered)),
        "burst": {
            "requests": CLIENTS * PER_CLIENT,
            "total_ms": json(burst_ms),
            "rounds_total_ms": burst_each.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "latency": burst_lat.json(),
            "granted": granted,
            "all_busy": busy,
            "errors": errors,
            "store_commits": json(burst_commits),
        },
        "rss_burst_mib": json(rss_burst),
        "hwm_burst_mib": json(median(&f.hwm_burst)),
        "scale_api_grant": sgrant.json(),
        "scale_api_delete": sdel.json(),
        "scale_api_round_trip": sround.json(),
        "rounds_values": {
            "create_exporters_s": f.create_exporters_s.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "register_s": f.register_s.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "rss_registered_mib": f.rss_registered.iter().map(|v| json(*v)).collect::<Vec<_>>(),
            "rss_burst_mib": f.rss_burst.iter().map(|v| json(*v)).collect::<Vec<_>>(),
        },
        "targets": [
            target(grant.p50, t_grant, "API grant p50 ms"),
            target(burst_ms, t_burst, "1000 concurrent lease requests answered, ms"),
            target(rss_max, t_rss, "controller VmRSS MiB at 10000 exporters"),
        ],
    });
    (md, js)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jmp_protocol::selector::Selector;

    #[test]
    fn burst_selectors_parse_and_each_matches_some_exporter() {
        let all: Vec<Labels> = (0..EXPORTERS).map(labels_of).collect();
        for j in 0..CLIENTS * PER_CLIENT {
            let s = burst_selector(j);
            let sel = Selector::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!(all.iter().any(|l| sel.matches(l)), "{s} matches nothing");
        }
        assert_eq!(burst_selector(49), burst_selector(48));
        assert!(burst_selector(48).starts_with("id="));
    }
}
