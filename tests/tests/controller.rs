//! The controller end to end: a real `jmp-controller` process per test (own data dir and ports),
//! identities made with the `jmp admin` CLI, exporters that are real `jmpd` processes or (where
//! only the lease book matters) registrations opened straight over the controller API, and
//! clients that are `jmp` processes or API calls from this test.
//!
//! Every timeout here is a hang guard, never a measurement.

use jmp_e2e::lab::*;
use jmp_e2e::*;
use jmp_protocol::api::{
    Call, ClientSpec, CtlErrorCode, ExporterSpec, LeaseInfo, LeaseRequest, Registration, Reply,
    Request,
};
use jmp_protocol::selector::{Labels, Selector};
use jmp_transport::controller::{call, call_once, CallError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Asserts what must hold of any listing: one active lease per exporter, unique lease names
/// and request ids.
fn check_listing(leases: &[LeaseInfo], context: &str) {
    let mut exporters = HashMap::new();
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for l in leases {
        assert!(
            names.insert(l.name.clone()),
            "{context}: lease name {} listed twice: {leases:#?}",
            l.name
        );
        assert!(
            ids.insert(l.request_id.clone()),
            "{context}: request id {} listed twice: {leases:#?}",
            l.request_id
        );
        if l.status == "active" {
            assert!(
                !l.exporter.is_empty(),
                "{context}: active lease without exporter: {l:?}"
            );
            assert!(
                l.begin <= l.end,
                "{context}: lease ends before it begins: {l:?}"
            );
            if let Some(other) = exporters.insert(l.exporter.clone(), l.name.clone()) {
                panic!(
                    "{context}: exporter {} is in two active leases, {other} and {}: {leases:#?}",
                    l.exporter, l.name
                );
            }
        } else {
            // A waiting request by name shows the exporter it asks for (protocol/src/ctl.rs
            // says `exporter` is empty while waiting; controller/src/core/leases.rs fills in the
            // requested name).
            assert_eq!(l.status, "waiting", "{context}: odd status in {l:?}");
        }
    }
}

fn check_listing_json(leases: &[Value], context: &str) {
    let v: Vec<LeaseInfo> = leases
        .iter()
        .map(|l| serde_json::from_value(l.clone()).expect("a LeaseInfo"))
        .collect();
    check_listing(&v, context);
}

// ---------------------------------------------------------------------------------------------
// The controller API from this test (QUIC, as jmp and jmpd speak it)

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

struct Api {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Api {
    async fn connect(addr: SocketAddr, fingerprint: &str) -> Result<Api, String> {
        let endpoint = jmp_transport::client_endpoint(addr).map_err(|e| e.to_string())?;
        let pin = fingerprint.parse()?;
        let fut = jmp_transport::connect(&endpoint, addr, jmp_protocol::ALPN_CONTROLLER, Some(pin));
        let (conn, _) = tokio::time::timeout(Duration::from_secs(3), fut)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(Api {
            _endpoint: endpoint,
            conn,
        })
    }

    async fn call(&self, credential: &str, request: Request) -> Result<Reply, CallError> {
        let c = Call {
            credential: credential.to_string(),
            request,
        };
        tokio::time::timeout(LONG, call_once(&self.conn, &c))
            .await
            .unwrap_or_else(|_| panic!("no answer to {c:?} within {LONG:?}"))
    }

    async fn leases(&self, admin: &str) -> Vec<LeaseInfo> {
        match self.call(admin, Request::GetLeases { all: true }).await {
            Ok(Reply::Leases { leases }) => leases,
            other => panic!("GetLeases: {other:?}"),
        }
    }

    async fn exporters(&self, cred: &str) -> Vec<jmp_protocol::api::ExporterInfo> {
        match self
            .call(cred, Request::GetExporters { selector: None })
            .await
        {
            Ok(Reply::Exporters { exporters }) => exporters,
            other => panic!("GetExporters: {other:?}"),
        }
    }
}

fn refusal(r: &Result<Reply, CallError>) -> Option<CtlErrorCode> {
    match r {
        Err(CallError::Refused(e)) => Some(e.code),
        _ => None,
    }
}

/// An exporter that registers over the API and stays registered, re-registering (like jmpd)
/// whenever the connection or the registration stream ends. Runs until aborted. Each
/// registration proves it holds its own TLS identity's key, on the connection it goes on.
async fn keep_registered(addr: SocketAddr, fingerprint: String, credential: String, port: u16) {
    let identity = jmp_transport::Identity::generate().expect("an identity");
    let name = jmp_transport::token::peek(&credential)
        .expect("an exporter credential")
        .sub;
    let reg = Registration {
        address: format!("127.0.0.1:{port}"),
        fingerprint: identity.fingerprint().to_string(),
        labels: Labels::new(),
        devices: Vec::new(),
        ..Default::default()
    };
    loop {
        if let Ok(api) = Api::connect(addr, &fingerprint).await {
            let mut reg = reg.clone();
            reg.proof = Some(
                jmp_transport::possession::registration_proof(&identity, &api.conn, &name)
                    .expect("a proof"),
            );
            let c = Call {
                credential: credential.clone(),
                request: Request::Register(reg),
            };
            if let Ok((mut replies, _keep_open)) = call(&api.conn, &c, true).await {
                while let Ok(Some(_)) = replies.next().await {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates exporters over the API (as admin) and keeps each registered from a task; waits
/// until all are online. Returns the tasks (abort them to take the exporters offline).
async fn api_exporters(
    addr: SocketAddr,
    fingerprint: &str,
    admin: &str,
    exporters: &[(String, Labels)],
) -> Vec<tokio::task::JoinHandle<()>> {
    let api = Api::connect(addr, fingerprint).await.expect("connect");
    let mut tasks = Vec::new();
    for (i, (name, labels)) in exporters.iter().enumerate() {
        let cred = match api
            .call(
                admin,
                Request::CreateExporter(ExporterSpec {
                    name: name.clone(),
                    labels: labels.clone(),
                }),
            )
            .await
        {
            Ok(Reply::Credential(c)) => c.token,
            other => panic!("CreateExporter {name}: {other:?}"),
        };
        tasks.push(tokio::spawn(keep_registered(
            addr,
            fingerprint.to_string(),
            cred,
            9000 + i as u16,
        )));
    }
    wait_online(&api, admin, exporters.len()).await;
    tasks
}

async fn wait_online(api: &Api, admin: &str, n: usize) {
    let deadline = Instant::now() + LONG;
    loop {
        let online = api
            .exporters(admin)
            .await
            .iter()
            .filter(|e| e.online)
            .count();
        if online >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {online} of {n} exporters came online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Fair queue

#[test]
fn waiters_are_served_in_arrival_order() {
    let lab = Lab::new("ctl-fair");
    let mut jmpds = Vec::new();
    for name in ["rpi4-a", "rpi4-b"] {
        let token = lab.create_exporter(name, &["board=rpi4"]);
        jmpds.push(lab.start_jmpd(&lab.exporter_config(name, &token, 0)));
    }
    for c in ["c1", "c2", "c3", "c4"] {
        lab.create_client(c, &[]);
    }
    let create = |c: &str| {
        lab.as_client(
            c,
            &[
                "create",
                "lease",
                "-l",
                "board=rpi4",
                "--duration",
                "10m",
                "-o",
                "json",
            ],
        )
    };
    let l1 = lease_json(&lab.ok("c1-create", create("c1")));
    let l2 = lease_json(&lab.ok("c2-create", create("c2")));
    assert_ne!(l1["exporter"], l2["exporter"], "{l1} {l2}");

    let waiting = |c: &str| {
        let mut cmd = create(c);
        cmd.args(["--wait", "60"]);
        cmd
    };
    let mut w3 = lab.spawn("c3-wait", waiting("c3"));
    wait_stderr(&mut w3, "waiting: position 1", LONG);
    let mut w4 = lab.spawn("c4-wait", waiting("c4"));
    wait_stderr(&mut w4, "waiting: position 2", LONG);

    let leases = lab.leases();
    check_listing_json(&leases, "two waiting");
    let waiting_clients: Vec<&Value> = leases
        .iter()
        .filter(|l| l["status"] == "waiting")
        .map(|l| &l["client"])
        .collect();
    assert_eq!(waiting_clients.len(), 2, "{leases:#?}");

    // c1's exporter goes to c3, who came first, not to c4.
    lab.ok(
        "c1-delete",
        lab.as_client("c1", &["delete", "lease", l1["name"].as_str().unwrap()]),
    );
    let g3 = lease_json(&w3.expect_line(LONG, "c3's lease", |l| l.starts_with('{')));
    assert!(w3.expect_exit(READY).success(), "{}", w3.describe());
    assert_eq!(g3["client"], "c3");
    assert_eq!(g3["exporter"], l1["exporter"], "c3 must get c1's exporter");
    assert!(w4.is_running(), "c4 must still wait: {}", w4.describe());
    wait_stderr(&mut w4, "waiting: position 1", LONG);

    let leases = lab.leases();
    check_listing_json(&leases, "after c1's delete");
    let l3 = find_lease(&leases, g3["name"].as_str().unwrap()).expect("c3's lease listed");
    assert_eq!(l3["status"], "active");
    assert_eq!(l3["exporter"], l1["exporter"]);
    let w4_entry = leases
        .iter()
        .find(|l| l["client"] == "c4")
        .expect("c4's request listed");
    assert_eq!(w4_entry["status"], "waiting", "{leases:#?}");
    assert!(find_lease(&leases, l1["name"].as_str().unwrap()).is_none());

    lab.ok(
        "c2-delete",
        lab.as_client("c2", &["delete", "lease", l2["name"].as_str().unwrap()]),
    );
    let g4 = lease_json(&w4.expect_line(LONG, "c4's lease", |l| l.starts_with('{')));
    assert!(w4.expect_exit(READY).success(), "{}", w4.describe());
    assert_eq!(g4["client"], "c4");
    assert_eq!(g4["exporter"], l2["exporter"], "c4 must get c2's exporter");
    assert_eq!(
        g4["name"], w4_entry["name"],
        "the lease keeps the name it had while waiting"
    );

    let leases = lab.leases();
    check_listing_json(&leases, "end");
    assert_eq!(leases.len(), 2, "{leases:#?}");
    for (g, exporter) in [(&g3, &l1["exporter"]), (&g4, &l2["exporter"])] {
        let l = find_lease(&leases, g["name"].as_str().unwrap()).expect("listed");
        assert_eq!(l["status"], "active");
        assert_eq!(&l["exporter"], exporter);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Randomized operations never lease an exporter twice

struct RandomCtx {
    addr: SocketAddr,
    fingerprint: String,
    admin: String,
    labels: BTreeMap<String, Labels>,
    ops: usize,
    checks: AtomicUsize,
    grants: AtomicUsize,
    /// Refused as busy, gave up waiting, updated, deleted, found already ended.
    busy: AtomicUsize,
    timeouts: AtomicUsize,
    updates: AtomicUsize,
    deletes: AtomicUsize,
    ended: AtomicUsize,
}

const SELECTORS: &[&str] = &[
    "board=rpi4",
    "board=imx8",
    "idx in (0,1)",
    "idx notin (0)",
    "board",
    "board=rpi4,idx=2",
    "idx!=3",
];

async fn random_worker(ctx: Arc<RandomCtx>, me: String, token: String, seed: u64) {
    let api = Api::connect(ctx.addr, &ctx.fingerprint)
        .await
        .expect("connect");
    let mut rng = Rng::new(seed);
    let mut mine: Vec<String> = Vec::new();
    let exporters: Vec<String> = ctx.labels.keys().cloned().collect();
    for op in 0..ctx.ops {
        let roll = rng.below(100);
        let what: String;
        if roll < 55 {
            // Create, at once (wait 0) or waiting 1-3 s; by selector or by name.
            let by_name = rng.below(5) == 0;
            let (selector, exporter) = if by_name {
                let e = &exporters[rng.below(exporters.len() as u64) as usize];
                (String::new(), Some(e.clone()))
            } else {
                let s = SELECTORS[rng.below(SELECTORS.len() as u64) as usize];
                (s.to_string(), None)
            };
            // Mostly short leases (1-2 s, which expire during the run), some longer.
            let duration_secs = match rng.below(10) {
                0..=5 => 1 + rng.below(2),
                6..=8 => 3 + rng.below(4),
                _ => 10 + rng.below(20),
            };
            let wait_secs = if roll < 35 { 0 } else { 1 + rng.below(3) };
            let request_id = format!("{me}-{op}");
            what = format!(
                "create {request_id} selector {selector:?} exporter {exporter:?} for {duration_secs}s wait {wait_secs}s"
            );
            let r = api
                .call(
                    &token,
                    Request::CreateLease(LeaseRequest {
                        request_id,
                        selector: selector.clone(),
                        exporter: exporter.clone(),
                        duration_secs,
                        begin_time: None,
                        wait_secs,
                        job: None,
                        ..Default::default()
                    }),
                )
                .await;
            match r {
                Ok(Reply::Lease(l)) => {
                    ctx.grants.fetch_add(1, Ordering::Relaxed);
                    let labels = ctx.labels.get(&l.exporter).unwrap_or_else(|| {
                        panic!("{what}: granted unknown exporter {}", l.exporter)
                    });
                    let sel = Selector::parse(&selector).expect("test selector");
                    assert!(
                        sel.matches(labels),
                        "{what}: granted {} whose labels {labels:?} do not match",
                        l.exporter
                    );
                    if let Some(e) = &exporter {
                        assert_eq!(&l.exporter, e, "{what}: granted another exporter");
                    }
                    assert_eq!(l.client, me);
                    // Still running leases must be in the book.
                    let listing = api.leases(&ctx.admin).await;
                    if l.end > unix_now() {
                        let found = listing.iter().find(|x| x.name == l.name);
                        assert!(
                            found.is_some_and(|x| x.exporter == l.exporter && x.status == "active"),
                            "{what}: granted {l:?} but the listing says {found:?}"
                        );
                    }
                    mine.push(l.name);
                }
                Ok(other) => panic!("{what}: unexpected reply {other:?}"),
                Err(CallError::Refused(e)) if wait_secs == 0 && e.code == CtlErrorCode::AllBusy => {
                    ctx.busy.fetch_add(1, Ordering::Relaxed);
                }
                Err(CallError::Refused(e)) if wait_secs > 0 && e.code == CtlErrorCode::Timeout => {
                    ctx.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("{what}: {e:?}"),
            }
        } else if roll < 72 && !mine.is_empty() {
            let i = rng.below(mine.len() as u64) as usize;
            let name = mine[i].clone();
            let (duration_secs, extend_secs) = if rng.below(2) == 0 {
                (None, Some(1 + rng.below(5)))
            } else {
                (Some(1 + rng.below(3)), None)
            };
            what = format!("update {name} duration {duration_secs:?} extend {extend_secs:?}");
            let r = api
                .call(
                    &token,
                    Request::UpdateLease {
                        name: name.clone(),
                        duration_secs,
                        extend_secs,
                    },
                )
                .await;
            match r {
                Ok(Reply::Lease(l)) => {
                    ctx.updates.fetch_add(1, Ordering::Relaxed);
                    assert_eq!(l.name, name, "{what}");
                    if let Some(d) = duration_secs {
                        // `end` is rounded down to seconds like `begin`.
                        assert!(l.end <= l.begin + d + 1, "{what}: {l:?}");
                    }
                }
                Ok(other) => panic!("{what}: unexpected reply {other:?}"),
                Err(CallError::Refused(e)) if e.code == CtlErrorCode::NotFound => {
                    ctx.ended.fetch_add(1, Ordering::Relaxed);
                    mine.swap_remove(i);
                }
                Err(e) => panic!("{what}: {e:?}"),
            }
        } else if roll < 90 && !mine.is_empty() {
            let i = rng.below(mine.len() as u64) as usize;
            let name = mine.swap_remove(i);
            what = format!("delete {name}");
            let r = api
                .call(
                    &token,
                    Request::DeleteLease {
                        names: vec![name.clone()],
                        all: false,
                    },
                )
                .await;
            match r {
                Ok(Reply::Deleted { names }) => {
                    ctx.deletes.fetch_add(1, Ordering::Relaxed);
                    assert_eq!(names, vec![name], "{what}");
                }
                Ok(other) => panic!("{what}: unexpected reply {other:?}"),
                // It expired (or was shortened into the past) first.
                Err(CallError::Refused(e)) if e.code == CtlErrorCode::NotFound => {
                    ctx.ended.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("{what}: {e:?}"),
            }
        } else {
            let ms = rng.below(400);
            what = format!("sleep {ms}ms");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let listing = api.leases(&ctx.admin).await;
        check_listing(&listing, &format!("{me} after op {op} ({what})"));
        ctx.checks.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn random_operations_never_lease_an_exporter_twice() {
    let seed: u64 = std::env::var("JMP_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_917);
    println!("seed {seed} (set JMP_E2E_SEED to change it)");
    raw_stderr(&format!(
        "random_operations_never_lease_an_exporter_twice: seed {seed}"
    ));
    let lab = Lab::new("ctl-random");
    let rt = runtime();
    let (addr, fp, admin) = (lab.ctl.addr, lab.ctl.fingerprint.clone(), lab.admin_token());
    const CLIENTS: usize = 5;
    const OPS: usize = 60;
    let labels: BTreeMap<String, Labels> = (0..4)
        .map(|i| {
            let board = if i % 2 == 0 { "rpi4" } else { "imx8" };
            (
                format!("rnd-{i}"),
                Labels::from([
                    ("board".to_string(), board.to_string()),
                    ("idx".to_string(), i.to_string()),
                ]),
            )
        })
        .collect();
    let fut = async {
        let exps: Vec<(String, Labels)> =
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let registrations = api_exporters(addr, &fp, &admin, &exps).await;
        let api = Api::connect(addr, &fp).await.expect("connect");
        let mut tokens = Vec::new();
        for k in 0..CLIENTS {
            let spec = ClientSpec {
                name: format!("rc{k}"),
                ..Default::default()
            };
            match api.call(&admin, Request::CreateClient(spec)).await {
                Ok(Reply::Credential(c)) => tokens.push(c.token),
                other => panic!("CreateClient: {other:?}"),
            }
        }
        let ctx = Arc::new(RandomCtx {
            addr,
            fingerprint: fp.clone(),
            admin: admin.clone(),
            labels: labels.clone(),
            ops: OPS,
            checks: AtomicUsize::new(0),
            grants: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            timeouts: AtomicUsize::new(0),
            updates: AtomicUsize::new(0),
            deletes: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
        });
        // A checker looking at the book continuously while the workers run.
        let stop = Arc::new(AtomicBool::new(false));
        let checker = {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            tokio::spawn(async move {
                let api = Api::connect(ctx.addr, &ctx.fingerprint)
                    .await
                    .expect("connect");
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let l = api.leases(&ctx.admin).await;
                    check_listing(&l, &format!("checker pass {n}"));
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                n
            })
        };
        let workers: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(k, t)| {
                tokio::spawn(random_worker(
                    ctx.clone(),
                    format!("rc{k}"),
                    t.clone(),
                    seed.wrapping_add(k as u64 * 7919),
                ))
            })
            .collect();
        for w in workers {
            if let Err(e) = w.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let passes = match checker.await {
            Ok(n) => n,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let summary = format!(
            "{} ops: {} grants, {} busy, {} wait timeouts, {} updates, {} deletes, {} found ended; \
             {} checks after ops, {passes} checker passes",
            CLIENTS * OPS,
            n(&ctx.grants),
            n(&ctx.busy),
            n(&ctx.timeouts),
            n(&ctx.updates),
            n(&ctx.deletes),
            n(&ctx.ended),
            n(&ctx.checks)
        );
        println!("{summary}");
        // The mix must have exercised every kind of operation (else the run proves little).
        for (what, c) in [
            ("grants", &ctx.grants),
            ("busy refusals", &ctx.busy),
            ("updates", &ctx.updates),
            ("deletes", &ctx.deletes),
            ("leases that ended on their own", &ctx.ended),
        ] {
            assert!(n(c) > 0, "no {what}: {summary}");
        }

        // Everything can be deleted, and then every exporter is free.
        for t in &tokens {
            match api
                .call(
                    t,
                    Request::DeleteLease {
                        names: vec![],
                        all: true,
                    },
                )
                .await
            {
                Ok(Reply::Deleted { .. }) => {}
                other => panic!("DeleteLease all: {other:?}"),
            }
        }
        let left = api.leases(&admin).await;
        assert!(left.is_empty(), "leases left after deleting all: {left:#?}");
        for e in api.exporters(&admin).await {
            assert!(e.online && e.enabled, "{e:?}");
            assert_eq!(e.lease, None, "{} still leased: {e:?}", e.name);
        }
        let mut got = HashSet::new();
        for i in 0..labels.len() {
            let r = api
                .call(
                    &tokens[0],
                    Request::CreateLease(LeaseRequest {
                        request_id: format!("final-{i}"),
                        selector: "board".into(),
                        duration_secs: 60,
                        ..Default::default()
                    }),
                )
                .await;
            match r {
                Ok(Reply::Lease(l)) => assert!(got.insert(l.exporter.clone()), "{l:?}"),
                other => panic!("final lease {i}: {other:?}"),
            }
        }
        let r = api
            .call(
                &tokens[1],
                Request::CreateLease(LeaseRequest {
                    request_id: "final-busy".into(),
                    selector: "board".into(),
                    duration_secs: 60,
                    ..Default::default()
                }),
            )
            .await;
        assert_eq!(refusal(&r), Some(CtlErrorCode::AllBusy), "{r:?}");
        check_listing(&api.leases(&admin).await, "final");
        for r in registrations {
            r.abort();
        }
    };
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(240), fut)
            .await
            .expect("the randomized run hung")
    });
}

// ---------------------------------------------------------------------------------------------
// 3. kill -9 of the controller in the middle of a burst

type Granted = Arc<Mutex<HashMap<String, (LeaseInfo, bool)>>>;

/// A lease request that waits and, like `jmp create lease`, retries with the same request id
/// when the connection is lost. Records the lease, and whether it was told before `killed`.
async fn persistent_request(
    addr: SocketAddr,
    fingerprint: String,
    credential: String,
    request_id: String,
    killed: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    granted: Granted,
) -> LeaseInfo {
    let mut first = true;
    loop {
        if let Ok(api) = Api::connect(addr, &fingerprint).await {
            let c = Call {
                credential: credential.clone(),
                request: Request::CreateLease(LeaseRequest {
                    request_id: request_id.clone(),
                    selector: "board=burst".into(),
                    duration_secs: 600,
                    wait_secs: 60,
                    ..Default::default()
                }),
            };
            if first {
                sent.fetch_add(1, Ordering::SeqCst);
                first = false;
            }
            if let Ok((mut s, _)) = call(&api.conn, &c, false).await {
                loop {
                    match s.next().await {
                        Ok(Some(Reply::Lease(l))) => {
                            let before = !killed.load(Ordering::SeqCst);
                            granted
                                .lock()
                                .unwrap()
                                .insert(request_id.clone(), (l.clone(), before));
                            return l;
                        }
                        Ok(Some(Reply::Queued { .. })) => {}
                        Ok(Some(other)) => panic!("{request_id}: unexpected {other:?}"),
                        Ok(None) => break,
                        Err(e) if e.is_transient() => break,
                        Err(e) => panic!("{request_id}: refused: {e}"),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[test]
fn controller_killed_mid_burst_keeps_what_it_promised() {
    let port = free_udp_port();
    let mut lab = Lab::listening("ctl-kill", &format!("127.0.0.1:{port}"));
    let rt = runtime();
    let (addr, fp, admin) = (lab.ctl.addr, lab.ctl.fingerprint.clone(), lab.admin_token());
    assert_eq!(addr.port(), port);

    // Exporters registered over the API, re-registering on their own after the restart.
    let mut registrations = Vec::new();
    for i in 0..4 {
        let name = format!("burst-{i}");
        let token = std::fs::read_to_string(lab.create_exporter(&name, &["board=burst"]))
            .unwrap()
            .trim()
            .to_string();
        registrations.push(rt.spawn(keep_registered(addr, fp.clone(), token, 9100 + i)));
    }
    rt.block_on(async {
        let api = Api::connect(addr, &fp).await.expect("connect");
        wait_online(&api, &admin, 4).await;
    });
    let api_tokens: Vec<String> = (0..4)
        .map(|i| config_token(&lab.create_client(&format!("api{i}"), &[])))
        .collect();
    for i in 0..3 {
        lab.create_client(&format!("cli{i}"), &[]);
    }

    let killed = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let granted: Granted = Arc::default();
    let request = |j: usize, delay: Duration| {
        let (fp, cred) = (fp.clone(), api_tokens[j % 4].clone());
        let (killed, sent, granted) = (killed.clone(), sent.clone(), granted.clone());
        rt.spawn(async move {
            tokio::time::sleep(delay).await;
            persistent_request(
                addr,
                fp,
                cred,
                format!("burst-req-{j}"),
                killed,
                sent,
                granted,
            )
            .await
        })
    };
    // Four requests take the four exporters.
    let mut tasks: Vec<_> = (0..4).map(|j| request(j, Duration::ZERO)).collect();
    assert!(
        poll_until(LONG, || granted.lock().unwrap().len() == 4),
        "the first four requests were not granted: {:?}",
        granted.lock().unwrap()
    );
    // Three CLI clients queue.
    let mut clis: Vec<Proc> = (0..3)
        .map(|i| {
            lab.spawn(
                &format!("cli{i}-wait"),
                lab.as_client(
                    &format!("cli{i}"),
                    &[
                        "create",
                        "lease",
                        "-l",
                        "board=burst",
                        "--wait",
                        "60",
                        "--duration",
                        "10m",
                        "-o",
                        "json",
                    ],
                ),
            )
        })
        .collect();
    for p in clis.iter_mut() {
        wait_stderr(p, "waiting: position", LONG);
    }
    // The burst: twelve more requests, 30 ms apart; one lease is released in the middle of it
    // (its exporter goes to the head of the queue), and the controller dies part way.
    tasks.extend((4..16).map(|j| request(j, Duration::from_millis(30 * (j as u64 - 4)))));
    assert!(poll_until(LONG, || sent.load(Ordering::SeqCst) >= 7));
    let first = granted.lock().unwrap()["burst-req-0"].0.clone();
    rt.block_on(async {
        let api = Api::connect(addr, &fp).await.expect("connect");
        let r = api
            .call(
                &admin,
                Request::DeleteLease {
                    names: vec![first.name.clone()],
                    all: false,
                },
            )
            .await;
        assert!(matches!(r, Ok(Reply::Deleted { .. })), "{r:?}");
    });
    assert!(poll_until(LONG, || sent.load(Ordering::SeqCst) >= 10));
    killed.store(true, Ordering::SeqCst);
    lab.ctl.proc.kill9();
    // Which CLI clients had their lease before the kill. One whose answer arrived just before
    // it needs a moment to print and exit; none can get one while the controller is down.
    std::thread::sleep(Duration::from_millis(500));
    let mut told: Vec<(usize, Value)> = Vec::new();
    for (i, p) in clis.iter_mut().enumerate() {
        if !p.is_running() {
            assert!(
                p.try_status().unwrap().success(),
                "cli{i}: {}",
                p.describe()
            );
            told.push((i, lease_json(&p.stdout_so_far())));
        }
    }
    let told_api: Vec<LeaseInfo> = granted
        .lock()
        .unwrap()
        .values()
        .filter(|(l, before)| *before && l.name != first.name)
        .map(|(l, _)| l.clone())
        .collect();
    println!(
        "at the kill: {} requests sent, {} API leases and {} CLI leases told",
        sent.load(Ordering::SeqCst),
        told_api.len(),
        told.len()
    );
    assert!(told_api.len() >= 3);

    // Down for a moment, then back on the same port with the same data.
    std::thread::sleep(Duration::from_millis(500));
    lab.ctl = start_controller(&lab.env.logs, &lab.data, &format!("127.0.0.1:{port}"));
    assert_eq!(lab.ctl.addr, addr);
    assert_eq!(
        lab.ctl.fingerprint, fp,
        "the restart must keep the identity"
    );

    let leases = lab.leases();
    check_listing_json(&leases, "right after the restart");
    for l in &told_api {
        let found = find_lease(&leases, &l.name)
            .unwrap_or_else(|| panic!("granted lease {l:?} lost in the crash: {leases:#?}"));
        assert_eq!(found["exporter"], l.exporter.as_str(), "{found}");
        assert_eq!(found["status"], "active");
        assert_eq!(found["request_id"], l.request_id.as_str());
    }
    for (i, l) in &told {
        let found = find_lease(&leases, l["name"].as_str().unwrap())
            .unwrap_or_else(|| panic!("cli{i}'s lease {l} lost in the crash: {leases:#?}"));
        assert_eq!(found["exporter"], l["exporter"], "{found}");
        assert_eq!(found["status"], "active");
    }

    // Release every lease of the API clients until every waiting request (CLI and API) has
    // its lease; the CLI clients resume on their own.
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let leases = lab.leases();
        check_listing_json(&leases, "while draining");
        let mut running = 0;
        for p in clis.iter_mut() {
            running += p.is_running() as usize;
        }
        let api_left = tasks.iter().filter(|t| !t.is_finished()).count();
        if running == 0 && api_left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running} CLI and {api_left} API requests never got a lease; leases: {leases:#?}\n{}",
            clis.iter_mut()
                .map(|p| p.describe())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let names: Vec<&str> = leases
            .iter()
            .filter(|l| l["status"] == "active" && l["client"].as_str().unwrap().starts_with("api"))
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        if !names.is_empty() {
            let mut c = lab.as_admin(&["delete", "lease"]);
            c.args(&names);
            lab.ok("admin-delete", c);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut cli_leases = Vec::new();
    for (i, p) in clis.iter_mut().enumerate() {
        let st = p.expect_exit(READY);
        assert!(st.success(), "cli{i}: {}", p.describe());
        cli_leases.push(lease_json(&p.stdout_so_far()));
        if told.iter().all(|(t, _)| *t != i) {
            // It was waiting when the controller died, and resumed.
            assert!(
                p.stderr().contains("retrying"),
                "cli{i} never noticed the controller died: {}",
                p.describe()
            );
        }
    }
    assert!(
        told.len() < clis.len(),
        "every CLI client had its lease before the kill; nothing resumed"
    );
    for t in tasks {
        if let Err(e) = rt.block_on(t) {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let leases = lab.leases();
    check_listing_json(&leases, "at the end");
    for (i, l) in cli_leases.iter().enumerate() {
        let found = find_lease(&leases, l["name"].as_str().unwrap())
            .unwrap_or_else(|| panic!("cli{i}'s lease {l} not listed: {leases:#?}"));
        assert_eq!(found["exporter"], l["exporter"]);
        assert_eq!(found["status"], "active");
    }
    assert_eq!(granted.lock().unwrap().len(), 16);
    for r in registrations {
        r.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// 4, 5. A lease's end ends the attached session

/// A lab with one jmpd exporter `name` (board=`board`) and one client `u`.
#[test]
fn lease_expiry_ends_a_live_attach() {
    let (lab, _jmpd) = lab_with_one_board("ctl-expiry", "short-01", "short");
    let name = lab.ok(
        "create",
        lab.as_client(
            "u",
            &["create", "lease", "-l", "board=short", "--duration", "4s"],
        ),
    );
    let name = name.trim().to_string();
    let (mut attach, v) = attach_lease(&lab, "u", &[]);
    let path = local_of(&v, "console");
    assert!(is_link(&path), "{path} is not a symlink");
    let st = attach.expect_exit(LONG);
    assert_eq!(st.code(), Some(6), "{}", attach.describe());
    let err = attach.stderr();
    assert!(
        err.contains("expired"),
        "attach should say the lease expired: {err}"
    );
    assert!(
        err.contains(&format!("lease {name} ends in")),
        "a short lease is warned about at once: {err}"
    );
    assert!(
        !is_link(&path),
        "{path} still exists after the lease expired"
    );
    assert!(poll_until(READY, || find_lease(&lab.leases(), &name).is_none()));
}

#[test]
fn deleting_the_lease_ends_the_session() {
    let (lab, _jmpd) = lab_with_one_board("ctl-release", "rel-01", "rel");
    let name = lab
        .ok(
            "create",
            lab.as_client(
                "u",
                &["create", "lease", "-l", "board=rel", "--duration", "10m"],
            ),
        )
        .trim()
        .to_string();
    let (mut attach, v) = attach_lease(&lab, "u", &[]);
    let path = local_of(&v, "console");
    assert!(is_link(&path));
    assert!(attach.is_running());
    lab.ok("delete", lab.as_client("u", &["delete", "lease", &name]));
    let st = attach.expect_exit(LONG);
    assert_eq!(st.code(), Some(6), "{}", attach.describe());
    let err = attach.stderr();
    assert!(
        err.contains("released"),
        "attach should say released: {err}"
    );
    assert!(!is_link(&path), "{path} still exists after the lease ended");
}

// ---------------------------------------------------------------------------------------------
// 6. Credentials and lease tokens

#[test]
fn revoked_foreign_and_tampered_tokens_are_refused() {
    let lab = Lab::new("ctl-tokens");
    let ta = lab.create_exporter("tok-a", &["board=tok"]);
    let tb = lab.create_exporter("tok-b", &["board=tok"]);
    let a = lab.start_jmpd(&lab.exporter_config("tok-a", &ta, 0));
    let b = lab.start_jmpd(&lab.exporter_config("tok-b", &tb, 0));

    // (a) A rotated credential: the old file is refused as revoked, the new one works.
    let file = lab.create_client("rot", &[]);
    let saved = lab.env.config.join("clients/rot.yaml");
    let old = lab.env.root.join("rot-old.yaml");
    std::fs::copy(&saved, &old).expect("copy the client config");
    let out = lab.ok("rotate", lab.as_client("rot", &["auth", "rotate"]));
    assert!(out.contains("rotated"), "{out}");
    let mut c = lab.jmp();
    c.env("JMP_CLIENT_CONFIG", &old).args(["get", "leases"]);
    let out = lab.run("old-credential", c);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(out.stderr.contains("revoked"), "{}", show(&out));
    let mut c = lab.jmp();
    c.env("JMP_CLIENT_CONFIG", &file).args(["get", "leases"]);
    let out = lab.run("admin-create-copy", c);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the file from admin create is the old credential too: {}",
        show(&out)
    );
    lab.ok("new-credential", lab.as_client("rot", &["get", "leases"]));

    // (b) A lease token for exporter A, presented to B.
    let lease = lab
        .ok(
            "lease-a",
            lab.as_client(
                "rot",
                &["create", "lease", "-n", "tok-a", "--duration", "10m"],
            ),
        )
        .trim()
        .to_string();
    let (a_addr, a_fp) = (a.addr, a.fingerprint.clone());
    let token = runtime().block_on(async {
        let api = Api::connect(lab.ctl.addr, &lab.ctl.fingerprint)
            .await
            .expect("connect");
        let cred = config_token(&saved);
        match api
            .call(
                &cred,
                Request::LeaseAccess {
                    name: Some(lease.clone()),
                },
            )
            .await
        {
            Ok(Reply::Access(a)) => {
                assert_eq!(a.lease.exporter, "tok-a");
                assert_eq!(a.address, a_addr.to_string());
                assert_eq!(a.fingerprint, a_fp);
                a.token
            }
            other => panic!("LeaseAccess: {other:?}"),
        }
    });
    let direct = |label: &str, j: &Jmpd, token: &str| {
        let f = lab.env.root.join(format!("{}.lease-token", unique(label)));
        write_private(&f, token);
        let mut c = lab.jmp();
        c.args(["attach", "--exporter", &j.addr.to_string(), "--token-file"])
            .arg(&f)
            .args(["--fingerprint", &j.fingerprint, "--dev-dir"])
            .arg(&lab.env.dev)
            .args(["-o", "json"]);
        c
    };
    let out = lab.run("token-a-on-b", direct("a-on-b", &b, &token));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        out.stderr.contains("tok-a") && out.stderr.contains("refused"),
        "the refusal names the exporter the token is for: {}",
        show(&out)
    );
    // The same token is good on A (the control).
    let mut p = lab.spawn("token-a-on-a", direct("a-on-a", &a, &token));
    p.expect_line(READY, "attach's JSON line", |l| l.starts_with('{'));
    p.stop();

    // (c) The same token with one character of its payload changed.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let mut payload: Vec<char> = parts[1].chars().collect();
    let i = payload.len() / 2;
    payload[i] = if payload[i] == 'A' { 'B' } else { 'A' };
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        payload.into_iter().collect::<String>(),
        parts[2]
    );
    let out = lab.run("tampered", direct("tampered", &a, &tampered));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(out.stderr.contains("refused"), "{}", show(&out));

    // (d) A deleted client's credential.
    lab.create_client("gone", &[]);
    lab.ok("gone-works", lab.as_client("gone", &["get", "leases"]));
    lab.ok("delete-client", lab.admin(&["delete", "client", "gone"]));
    let out = lab.run("gone-refused", lab.as_client("gone", &["get", "leases"]));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        out.stderr.contains("\"gone\"") && out.stderr.contains("deleted"),
        "{}",
        show(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Bad input

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let mut lab = Lab::new("ctl-bad");
    let token = lab.create_exporter("bad-rpi4", &["board=rpi4"]);
    let _jmpd = lab.start_jmpd(&lab.exporter_config("bad-rpi4", &token, 0));
    lab.create_exporter("bad-imx8", &["board=imx8"]);
    lab.create_client(
        "limited",
        &["--allow", "board=rpi4", "--max-duration", "2h"],
    );
    lab.create_client("other", &[]);
    let expect = |label: &str, args: &[&str], code: i32, needles: &[&str]| {
        let out = lab.run(label, lab.as_client("limited", args));
        assert_eq!(out.status.code(), Some(code), "{label}: {}", show(&out));
        for n in needles {
            assert!(
                out.stderr.contains(n),
                "{label}: stderr lacks {n:?}: {}",
                show(&out)
            );
        }
        out
    };
    expect(
        "bad-selector",
        &["create", "lease", "-l", "board in (a,"],
        2,
        &["position"],
    );
    expect(
        "bad-duration",
        &["create", "lease", "-l", "board=rpi4", "--duration", "30x"],
        2,
        &["--duration", "position"],
    );
    expect(
        "outside-policy",
        &["create", "lease", "-l", "board=imx8"],
        10,
        &["policy", "board=rpi4"],
    );
    expect(
        "too-long",
        &["create", "lease", "-l", "board=rpi4", "--duration", "3h"],
        10,
        &["at most 2h"],
    );
    expect(
        "no-match",
        &["create", "lease", "-l", "board=nope"],
        5,
        &["board=nope"],
    );
    lab.ok(
        "take-it",
        lab.as_client("other", &["create", "lease", "-l", "board=rpi4"]),
    );
    expect(
        "all-busy",
        &["create", "lease", "-l", "board=rpi4"],
        4,
        &["--wait"],
    );

    let mut c = lab.jmp();
    c.env("JMP_CLIENT", "nosuch").args(["get", "leases"]);
    let out = lab.run("unknown-client", c);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        out.stderr.contains("no client config \"nosuch\""),
        "{}",
        show(&out)
    );

    // Garbage on the controller's UDP port.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for (i, len) in [1usize, 7, 64, 1200, 1500].into_iter().enumerate() {
        let mut junk = pseudo_random(len, i as u64 + 1);
        sock.send_to(&junk, lab.ctl.addr).expect("send");
        // A long header with QUIC v1 and nonsense after it.
        junk[0] = 0xc3;
        if len >= 5 {
            junk[1..5].copy_from_slice(&[0, 0, 0, 1]);
        }
        sock.send_to(&junk, lab.ctl.addr).expect("send");
    }
    let out = lab.ok(
        "after-garbage",
        lab.as_client("other", &["get", "exporters", "--with", "online"]),
    );
    assert!(out.contains("bad-rpi4"), "{out}");
    assert!(lab.ctl.proc.is_running(), "{}", lab.ctl.proc.describe());
}

// ---------------------------------------------------------------------------------------------
// 8. Metrics

fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(READY)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read the answer");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_pass_promtool_and_carry_the_team() {
    require!(skips::tool("promtool"));
    let (lab, _jmpd) = lab_with_one_board("ctl-metrics", "met-01", "met");
    lab.create_client("blue1", &["-l", "team=blue"]);
    lab.create_client("blue2", &["-l", "team=blue"]);
    let create = |c: &str, extra: &[&str]| {
        let mut cmd = lab.as_client(
            c,
            &["create", "lease", "-l", "board=met", "--duration", "10m"],
        );
        cmd.args(extra);
        cmd
    };
    let l1 = lab
        .ok("blue1-create", create("blue1", &[]))
        .trim()
        .to_string();
    let mut w = lab.spawn("blue2-wait", create("blue2", &["--wait", "60"]));
    wait_stderr(&mut w, "waiting: position 1", LONG);
    let out = lab.run(
        "blue1-no-match",
        lab.as_client("blue1", &["create", "lease", "-l", "board=none"]),
    );
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    lab.ok(
        "blue1-delete",
        lab.as_client("blue1", &["delete", "lease", &l1]),
    );
    let l2 = w.expect_line(LONG, "blue2's lease", |l| !l.trim().is_empty());
    assert!(w.expect_exit(READY).success(), "{}", w.describe());
    lab.ok(
        "blue2-delete",
        lab.as_client("blue2", &["delete", "lease", l2.trim()]),
    );

    let (head, body) = http_get(lab.ctl.metrics, "/metrics");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    let mut p = command("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- body ---\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let has = |prefix: &str, needles: &[&str]| {
        body.lines()
            .any(|l| l.starts_with(prefix) && needles.iter().all(|n| l.contains(n)))
    };
    assert!(
        has(
            "jmp_lease_requests_total{",
            &["team=\"blue\"", "result=\"granted\""]
        ),
        "{body}"
    );
    assert!(
        has(
            "jmp_lease_requests_total{",
            &["team=\"blue\"", "result=\"no_match\""]
        ),
        "{body}"
    );
    assert!(
        has("jmp_lease_wait_seconds_count{", &["team=\"blue\"", "} 2"]),
        "two grants (one at once, one from the queue): {body}"
    );
    assert!(
        has(
            "jmp_lease_held_seconds_count{",
            &["team=\"blue\"", "reason=\"released\"", "} 2"]
        ),
        "{body}"
    );
    assert!(has("jmp_exporters{state=\"online\"} 1", &[]), "{body}");

    let (head, body) = http_get(lab.ctl.metrics, "/healthz");
    assert!(head.contains(" 200"), "{head}");
    assert_eq!(body.trim(), "ok");
}

// ---------------------------------------------------------------------------------------------
// 9. An exporter going offline does not end its lease

fn online_column(lab: &Lab, name: &str) -> String {
    let out = lab.ok(
        "get-exporters",
        lab.as_client("u", &["get", "exporters", "--with", "online"]),
    );
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{out}"));
    row.split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn exporter_offline_keeps_its_lease_and_comes_back() {
    let lab = Lab::new("ctl-offline");
    let token = lab.create_exporter("off-01", &["board=off"]);
    let config = lab.exporter_config("off-01", &token, free_udp_port());
    let mut jmpd = lab.start_jmpd(&config);
    lab.create_client("u", &[]);
    let name = lab
        .ok(
            "create",
            lab.as_client(
                "u",
                &["create", "lease", "-n", "off-01", "--duration", "10m"],
            ),
        )
        .trim()
        .to_string();
    assert_eq!(online_column(&lab, "off-01"), "yes");

    jmpd.proc.kill9();
    // Watched on the metrics port: a CLI run per poll would hit the controller's per-source
    // connection rate limit (20/s) on a fast machine.
    assert!(
        poll_until(LONG, || http_get(lab.ctl.metrics, "/metrics")
            .1
            .contains("jmp_exporter_up{exporter=\"off-01\"} 0")),
        "the controller never noticed off-01 went away"
    );
    assert_eq!(online_column(&lab, "off-01"), "no");
    let l = lab.leases();
    let found = find_lease(&l, &name).unwrap_or_else(|| panic!("lease gone: {l:#?}"));
    assert_eq!(found["status"], "active");
    assert_eq!(found["exporter"], "off-01");

    let jmpd2 = lab.start_jmpd(&config);
    assert_eq!(jmpd2.fingerprint, jmpd.fingerprint);
    assert!(poll_until(LONG, || http_get(lab.ctl.metrics, "/metrics")
        .1
        .contains("jmp_exporter_up{exporter=\"off-01\"} 1")));
    assert_eq!(online_column(&lab, "off-01"), "yes");
    let (attach, v) = attach_lease(&lab, "u", &["--lease", &name]);
    let mut c = Console::open(local_of(&v, "console"));
    let deadline = Instant::now() + LONG;
    loop {
        c.write(b"\r");
        let got = String::from_utf8_lossy(&c.read_some(Duration::from_millis(1000))).to_string();
        if got.contains("login: ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no login prompt on {}",
            c.path.display()
        );
    }
    c.drain();
    sim_login_and_echo(&mut c, "back-online");
    drop(attach);
    let l = lab.leases();
    assert!(find_lease(&l, &name).is_some(), "{l:#?}");
}

// ---------------------------------------------------------------------------------------------
// 10. Disabled exporters

#[test]
fn disabling_an_exporter_ends_its_lease_until_enabled() {
    let (lab, _jmpd) = lab_with_one_board("ctl-disable", "dis-01", "dis");
    let name = lab
        .ok(
            "create",
            lab.as_client(
                "u",
                &["create", "lease", "-n", "dis-01", "--duration", "10m"],
            ),
        )
        .trim()
        .to_string();
    let (mut attach, v) = attach_lease(&lab, "u", &[]);
    let path = local_of(&v, "console");
    lab.ok("disable", lab.admin(&["disable", "exporter", "dis-01"]));
    let st = attach.expect_exit(LONG);
    assert_eq!(st.code(), Some(6), "{}", attach.describe());
    assert!(
        attach.stderr().contains("disabled"),
        "{}",
        attach.describe()
    );
    assert!(!is_link(&path));
    assert!(find_lease(&lab.leases(), &name).is_none());
    assert_eq!(online_column(&lab, "dis-01"), "disabled");
    assert_eq!(lab.exporter("dis-01")["enabled"], false);

    for args in [
        &["create", "lease", "-n", "dis-01"][..],
        &["create", "lease", "-l", "board=dis"][..],
    ] {
        let out = lab.run("create-disabled", lab.as_client("u", args));
        assert_eq!(out.status.code(), Some(5), "{}", show(&out));
        assert!(
            out.stderr.contains("not online and enabled"),
            "{}",
            show(&out)
        );
    }

    lab.ok("enable", lab.admin(&["enable", "exporter", "dis-01"]));
    assert_eq!(online_column(&lab, "dis-01"), "yes");
    let again = lab.ok(
        "create-again",
        lab.as_client("u", &["create", "lease", "-n", "dis-01", "-o", "json"]),
    );
    let l = lease_json(&again);
    assert_eq!(l["exporter"], "dis-01");
    let (_attach, _v) = attach_lease(&lab, "u", &[]);
}

// ---------------------------------------------------------------------------------------------
// 11. The Jumpstarter workflow, as its documentation writes it

/// Kills a background attachment by PID if the test ends before it does.
struct PidGuard(i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if pid_alive(self.0) {
            kill_pid(self.0);
        }
    }
}

#[test]
fn the_jumpstarter_workflow_works_as_written() {
    let lab = Lab::new("ctl-workflow");
    let token = lab.create_exporter("rpi4-01", &["board=rpi4", "project=myproject"]);
    let _jmpd = lab.start_jmpd(&lab.exporter_config("rpi4-01", &token, 0));
    // The admin's side.
    let file = lab.env.root.join("ci-client.yaml");
    let mut c = lab.admin(&[
        "create",
        "client",
        "ci-client",
        "--allow",
        "project=myproject",
        "--max-duration",
        "2h",
        "--out",
    ]);
    c.arg(&file);
    lab.ok("admin-create-client", c);
    let mut c = lab.jmp();
    c.args(["config", "client", "create", "ci-client", "--from"])
        .arg(&file)
        .arg("--no-use");
    lab.ok("config-client-create", c);

    // The user's side: exactly the documented commands (plus --dev-dir and -o json, so the
    // test finds the device).
    let mut c = lab.jmp();
    c.args(["config", "client", "use", "ci-client"]);
    lab.ok("config-client-use", c);
    let mut c = lab.jmp();
    c.args([
        "create",
        "lease",
        "--selector",
        "project=myproject",
        "--wait",
        "300",
    ]);
    let name = lab.ok("create-lease", c).trim().to_string();
    assert!(
        !name.is_empty() && !name.contains(char::is_whitespace),
        "create lease should print the lease name, printed {name:?}"
    );
    let mut c = lab.jmp();
    c.args(["attach", "-d", "-o", "json", "--dev-dir"])
        .arg(&lab.env.dev);
    let v = lease_json(&lab.ok("attach-d", c));
    let pid = v["pid"].as_i64().expect("pid in attach's JSON") as i32;
    let _guard = PidGuard(pid);
    assert_eq!(v["exporter"], "rpi4-01");
    let path = local_of(&v, "console");
    // "pytest tests/hardware_tests/": use the console like a test would.
    let mut console = Console::open(&path);
    let deadline = Instant::now() + LONG;
    loop {
        console.write(b"\r");
        let got =
            String::from_utf8_lossy(&console.read_some(Duration::from_millis(1000))).to_string();
        if got.contains("login: ") {
            break;
        }
        assert!(Instant::now() < deadline, "no login prompt on {path}");
    }
    console.drain();
    sim_login_and_echo(&mut console, "workflow");
    drop(console);

    let mut c = lab.jmp();
    c.args(["delete", "lease"]);
    let out = lab.ok("delete-lease", c);
    assert!(
        out.contains(&name),
        "delete lease should name {name}: {out}"
    );
    // The background attachment ends on its own and takes its device with it.
    assert!(
        poll_until(LONG, || !pid_alive(pid) && !is_link(&path)),
        "the background attach (pid {pid}) or its device {path} outlived the lease"
    );
    assert!(find_lease(&lab.leases(), &name).is_none());
}

// ---------------------------------------------------------------------------------------------
// 12. Ctrl-C withdraws a waiting request; update lease moves the end

#[test]
fn interrupting_a_waiting_request_withdraws_it_and_extend_moves_the_end() {
    let (lab, _jmpd) = lab_with_one_board("ctl-withdraw", "wd-01", "wd");
    let held = lab.ok(
        "create",
        lab.as_client(
            "u",
            &[
                "create",
                "lease",
                "-l",
                "board=wd",
                "--duration",
                "10m",
                "-o",
                "json",
            ],
        ),
    );
    let held = lease_json(&held);
    let name = held["name"].as_str().expect("lease name").to_string();

    // `jmp update lease --extend` moves the end by exactly that much.
    let out = lab.ok(
        "update",
        lab.as_client(
            "u",
            &["update", "lease", &name, "--extend", "10m", "-o", "json"],
        ),
    );
    let updated = lease_json(&out);
    assert_eq!(
        updated["end"].as_u64().unwrap(),
        held["end"].as_u64().unwrap() + 600,
        "{held} -> {updated}"
    );
    // Beyond the client's limit is refused (the lab's client has the default 24h).
    let out = lab.run(
        "update-too-long",
        lab.as_client("u", &["update", "lease", &name, "--duration", "48h"]),
    );
    assert_eq!(out.status.code(), Some(10), "{}", show(&out));

    // A second request waits behind it; Ctrl-C withdraws it.
    let mut waiter = lab.spawn(
        "create-wait",
        lab.as_client("u", &["create", "lease", "-l", "board=wd", "--wait", "120"]),
    );
    wait_stderr(&mut waiter, "position 1", LONG);
    assert!(
        lab.leases().iter().any(|l| l["status"] == "waiting"),
        "{:#?}",
        lab.leases()
    );
    waiter.signal(nix::sys::signal::Signal::SIGINT);
    let st = waiter.expect_exit(LONG);
    assert_eq!(st.code(), Some(130), "{}", waiter.describe());
    assert!(
        waiter.stderr().contains("withdrew"),
        "{}",
        waiter.describe()
    );
    assert!(
        poll_until(LONG, || !lab
            .leases()
            .iter()
            .any(|l| l["status"] == "waiting")),
        "the withdrawn request is still queued: {:#?}",
        lab.leases()
    );
    // Releasing the lease now leaves the exporter free (nobody was waiting any more).
    lab.ok("delete", lab.as_client("u", &["delete", "lease", &name]));
    assert!(lab.leases().is_empty(), "{:#?}", lab.leases());
}

// ---------------------------------------------------------------------------------------------
// 13. jmpd --check-config checks the controller credential

#[test]
fn check_config_validates_the_controller_credential() {
    let lab = Lab::new("ctl-checkconfig");
    let token = lab.create_exporter("chk-01", &["board=chk"]);
    let check = |config: &Path| {
        let mut c = command(jmpd_bin());
        c.arg("--config").arg(config).arg("--check-config");
        lab.run("jmpd-check-config", c)
    };
    let out = check(&lab.exporter_config("chk-01", &token, 0));
    assert!(out.status.success(), "{}", show(&out));
    assert!(out.stdout.contains("credential ok"), "{}", show(&out));

    // Another exporter's credential.
    let other = lab.create_exporter("chk-02", &["board=chk"]);
    let out = check(&lab.exporter_config("chk-01", &other, 0));
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(out.stderr.contains("chk-02"), "{}", show(&out));

    // Garbage.
    let bad = lab.env.root.join("garbage.token");
    write_private(&bad, "not a token\n");
    let out = check(&lab.exporter_config("chk-01", &bad, 0));
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(out.stderr.contains("garbage.token"), "{}", show(&out));
}

// ---------------------------------------------------------------------------------------------
// Usage for chargeback: the history of ended leases, reported per team, client, exporter and
// lease in the three formats, kept across a restart; the leased-seconds counter.

#[test]
fn usage_reports_ended_and_live_leases_per_team_and_survives_a_restart() {
    let (mut lab, _jmpd) = lab_with_one_board("ctl-usage", "use-01", "use");
    let red_file = lab.create_client("red1", &["-l", "team=red"]);
    lab.create_client("green1", &["-l", "team=green"]);
    let lease = |c: &str| {
        lab.ok(
            &format!("{c}-create"),
            lab.as_client(
                c,
                &["create", "lease", "-l", "board=use", "--duration", "10m"],
            ),
        )
        .trim()
        .to_string()
    };
    let release = |c: &str, l: &str| {
        lab.ok(
            &format!("{c}-delete"),
            lab.as_client(c, &["delete", "lease", l]),
        );
    };
    let r1 = lease("red1");
    release("red1", &r1);
    let g1 = lease("green1");
    release("green1", &g1);
    let live = lease("red1");

    let usage = |lab: &Lab, args: &[&str]| {
        let mut a = vec!["usage", "--since", "1h"];
        a.extend_from_slice(args);
        lab.ok("usage", lab.admin(&a))
    };
    let check = |lab: &Lab, when: &str| {
        // CSV per team: both teams, red with its two leases (one live).
        let csv = usage(lab, &["--by", "team", "-o", "csv"]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "team,leases,seconds,hours", "{when}: {csv}");
        let row = |team: &str| {
            lines
                .iter()
                .find(|l| l.split(',').next() == Some(team))
                .unwrap_or_else(|| panic!("{when}: no {team} row in {csv}"))
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("red")[1], "2", "{when}: {csv}");
        assert_eq!(row("green")[1], "1", "{when}: {csv}");
        assert_eq!(lines.len(), 3, "{when}: only the two teams: {csv}");
        // JSON per lease: each lease with its team, exporter and why it ended.
        let j: Value = serde_json::from_str(&usage(lab, &["--by", "lease", "-o", "json"]))
            .unwrap_or_else(|e| panic!("{when}: usage JSON: {e}"));
        let rows = j["rows"].as_array().expect("rows");
        let by_name = |n: &str| {
            rows.iter()
                .find(|r| r["lease"] == n)
                .unwrap_or_else(|| panic!("{when}: lease {n} missing from {j}"))
        };
        assert_eq!(by_name(&r1)["reason"], "released", "{j}");
        assert_eq!(by_name(&r1)["team"], "red", "{j}");
        assert_eq!(by_name(&g1)["team"], "green", "{j}");
        assert_eq!(by_name(&g1)["exporter"], "use-01", "{j}");
        assert_eq!(by_name(&live)["reason"], "active", "{j}");
        assert_eq!(j["total"]["leases"], 3, "{j}");
        // The table per exporter ends with the total.
        let table = usage(lab, &["--by", "exporter"]);
        let last = table.lines().last().unwrap_or_default().to_string();
        assert!(
            table
                .lines()
                .next()
                .unwrap_or_default()
                .starts_with("EXPORTER"),
            "{table}"
        );
        assert!(table.contains("use-01"), "{table}");
        assert_eq!(
            last.split_whitespace().take(2).collect::<Vec<_>>(),
            ["TOTAL", "3"],
            "{when}: {table}"
        );
    };
    check(&lab, "before the restart");

    // The counter by team and exporter.
    let (_, body) = http_get(lab.ctl.metrics, "/metrics");
    let counted = |team: &str| {
        body.lines().any(|l| {
            l.starts_with("jmp_leased_seconds_total{")
                && l.contains(&format!("team=\"{team}\""))
                && l.contains("exporter=\"use-01\"")
        })
    };
    assert!(counted("red") && counted("green"), "{body}");

    // Only admins see usage; bad windows are named.
    let out = lab.run(
        "usage-as-client",
        lab.admin(&[
            "--admin-config",
            &red_file.display().to_string(),
            "usage",
            "--since",
            "1h",
        ]),
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(out.stderr.contains("not an admin"), "{}", show(&out));
    let out = lab.run(
        "usage-bad-since",
        lab.admin(&["usage", "--since", "yesterday-ish"]),
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(out.stderr.contains("--since"), "{}", show(&out));

    // The history is in the store: a restart keeps it.
    let port = lab.ctl.addr.port();
    lab.ctl.proc.stop();
    lab.ctl = start_controller(&lab.env.logs, &lab.data, &format!("127.0.0.1:{port}"));
    check(&lab, "after the restart");
}

// ---------------------------------------------------------------------------------------------
// Credentials expire; jmp and jmpd renew theirs before they do.

fn token_of_config(file: &Path) -> String {
    let c: jmp_protocol::api::ClientConfig =
        serde_norway::from_str(&std::fs::read_to_string(file).expect("read client config"))
            .expect("client config parses");
    c.token
}

/// Waits until the clock has passed the second `token` was issued in: a renewal within the
/// same second would sign the very same claims (same `iat`, `exp` and id) again.
fn after_issue_second(token: &str) {
    let iat = jmp_transport::token::peek(token.trim())
        .expect("a token")
        .iat;
    assert!(poll_until(LONG, || jmp_e2e::lab::unix_now() > iat));
}

fn exp_of(token: &str) -> u64 {
    jmp_transport::token::peek(token)
        .expect("a token")
        .exp
        .expect("the credential expires")
}

#[test]
fn credentials_are_renewed_in_place_by_jmp_and_jmpd_and_old_copies_keep_working() {
    let lab = Lab::with_args("ctl-renew", "127.0.0.1:0", &["--credential-ttl", "1h"]);
    // The exporter renews as soon as it registers (renewBefore as long as the life).
    let token_file = lab.create_exporter("ren-01", &["board=ren"]);
    let first_exporter_token = std::fs::read_to_string(&token_file).unwrap();
    let cfg = lab.exporter_config("ren-01", &token_file, 0);
    let yaml = std::fs::read_to_string(&cfg).unwrap().replace(
        "controller: {tokenFile: ",
        "controller: {renewBefore: 1h, tokenFile: ",
    );
    std::fs::write(&cfg, yaml).unwrap();
    after_issue_second(&first_exporter_token);
    let mut jmpd = lab.start_jmpd(&cfg);
    assert!(
        poll_until(LONG, || std::fs::read_to_string(&token_file)
            .is_ok_and(|t| t != first_exporter_token)),
        "jmpd did not write a renewed credential: {}",
        jmpd.proc.describe()
    );
    let renewed = std::fs::read_to_string(&token_file).unwrap();
    assert!(exp_of(renewed.trim()) >= exp_of(first_exporter_token.trim()));

    // A client whose config asks for renewal an hour before expiry: due at once.
    let file = lab.create_client("renewer", &[]);
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{text}renewBefore: 1h\n")).unwrap();
    let old_copy = lab.env.root.join("old-copy.yaml");
    std::fs::copy(&file, &old_copy).unwrap();
    let old = token_of_config(&file);
    after_issue_second(&old);
    let with_file = |f: &Path, label: &str| {
        let mut c = lab.jmp();
        c.env("JMP_CLIENT_CONFIG", f).args(["get", "exporters"]);
        lab.run(label, c)
    };
    let out = with_file(&file, "renew-once");
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        out.stderr.contains("renewed the credential of renewer"),
        "{}",
        show(&out)
    );
    assert!(out.stdout.contains("ren-01"), "{}", show(&out));
    let new = token_of_config(&file);
    assert_ne!(new, old, "the file holds the renewed credential");
    assert!(exp_of(&new) >= exp_of(&old));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600,
        "the renewed config stays private"
    );
    // The admin sees when the newest credential of the client expires.
    let listed: Value = serde_json::from_str(&lab.ok(
        "get-clients",
        lab.admin(&["get", "clients", "renewer", "-o", "json"]),
    ))
    .expect("clients JSON");
    assert_eq!(listed[0]["credential_expires"], exp_of(&new), "{listed}");
    // Renewal revokes nothing: a copy of the old credential (a CI secret) still works.
    let out = with_file(&old_copy, "old-copy");
    assert!(out.status.success(), "{}", show(&out));

    // Several processes renewing one file at once: all succeed, the file stays valid.
    let mut ps: Vec<Proc> = (0..4)
        .map(|i| {
            let mut c = lab.jmp();
            c.env("JMP_CLIENT_CONFIG", &file).args(["get", "leases"]);
            lab.spawn(&format!("renew-{i}"), c)
        })
        .collect();
    for p in &mut ps {
        assert!(p.expect_exit(LONG).success(), "{}", p.describe());
    }
    let out = with_file(&file, "after-the-crowd");
    assert!(out.status.success(), "{}", show(&out));
    // jmpd is still registered with its renewed credential.
    assert_eq!(lab.exporter("ren-01")["online"], true);
    jmpd.proc.stop();
}

#[test]
fn an_expired_credential_is_refused_naming_the_identity_and_what_to_do() {
    let lab = Lab::with_args(
        "ctl-expire",
        "127.0.0.1:0",
        &["--credential-ttl", "3s", "--credential-skew", "0s"],
    );
    let file = lab.create_client("brief", &[]);
    let exp = exp_of(&token_of_config(&file));
    // Waiting for the clock itself: the credential's expiry is the event.
    assert!(poll_until(LONG, || jmp_e2e::lab::unix_now() > exp + 1));
    let mut c = lab.jmp();
    c.env("JMP_CLIENT_CONFIG", &file).args(["get", "leases"]);
    let out = lab.run("expired", c);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        out.stderr
            .contains("the credential of client \"brief\" expired")
            && out.stderr.contains("ask an admin for a new one"),
        "{}",
        show(&out)
    );
}
