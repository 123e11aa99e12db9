//! Several controllers on a real etcd cluster (three etcd members on loopback ports, started
//! and stopped by the test), real `jmpd`s registering with whichever controller leads, and
//! clients calling through the controller API the way `jmp` does (any controller; a non-leader
//! says where the leader is).
//!
//! What must hold while the leader controller is killed with -9 again and again: no lease is
//! lost, none is granted twice, no exporter is held twice, and waiting requests are served in
//! the order they arrived. With one etcd member dead nothing changes; with all of etcd down
//! callers get a clear error, and the controllers recover by themselves when it returns.
//!
//! Every timeout here is a hang guard, never a measurement.

use jmp_e2e::cluster::{etcd_installed, Controllers, Etcd};
use jmp_e2e::lab::LONG;
use jmp_e2e::*;
use jmp_protocol::api::{
    Call, ClientSpec, CtlError, CtlErrorCode, ExporterSpec, LeaseInfo, LeaseRequest, Reply, Request,
};
use jmp_transport::controller::{CallError, Controllers as CtlConn};
use jmp_transport::Fingerprint;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One identity calling the controllers.
struct Api {
    ctls: CtlConn,
    cred: String,
}

impl Api {
    fn new(endpoints: &str, fp: &str, cred: &str) -> Api {
        let pin: Fingerprint = fp.parse().expect("fingerprint");
        Api {
            ctls: CtlConn::new(endpoints, pin).expect("endpoints"),
            cred: cred.to_string(),
        }
    }

    fn call_of(&self, request: Request) -> Call {
        Call {
            credential: self.cred.clone(),
            request,
        }
    }

    /// A call retried through failovers until it has a definite answer.
    async fn definite(&self, request: Request) -> Result<Reply, CtlError> {
        let t0 = Instant::now();
        loop {
            match self.ctls.call_once(&self.call_of(request.clone())).await {
                Ok(r) => return Ok(r),
                Err(CallError::Refused(e)) if !e.is_transient() => return Err(e),
                Err(e) => {
                    assert!(
                        t0.elapsed() < LONG,
                        "no definite answer to {request:?} within {LONG:?}: {e}"
                    );
                    self.ctls.close();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// A lease request that may wait, retried by its request id through failovers (as `jmp
    /// create lease --wait` does) until granted or refused.
    async fn lease(&self, req: LeaseRequest) -> Result<LeaseInfo, CtlError> {
        let t0 = Instant::now();
        loop {
            let attempt = async {
                let (mut s, _) = self
                    .ctls
                    .call(&self.call_of(Request::CreateLease(req.clone())), false)
                    .await?;
                loop {
                    match s.next().await? {
                        Some(Reply::Lease(l)) => return Ok(l),
                        Some(Reply::Queued { .. }) => continue,
                        Some(other) => panic!("unexpected reply {other:?}"),
                        None => return Err(CallError::NoAnswer),
                    }
                }
            }
            .await;
            match attempt {
                Ok(l) => {
                    // Confirms receipt, as jmp does: a deliberate close after the reply.
                    self.ctls.finish().await;
                    return Ok(l);
                }
                Err(CallError::Refused(e)) if !e.is_transient() => return Err(e),
                Err(e) => {
                    assert!(
                        t0.elapsed() < LONG * 2,
                        "lease request {} never answered: {e}",
                        req.request_id
                    );
                    self.ctls.close();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

fn lease_req(id: &str, sel: &str, wait: u64) -> LeaseRequest {
    LeaseRequest {
        request_id: id.into(),
        selector: sel.into(),
        duration_secs: 3600,
        wait_secs: wait,
        ..Default::default()
    }
}

/// The admin credential with every controller in its endpoint (the first leader issued it when
/// it was alone): what an operator writes into the admin config of a cluster.
fn admin_config(ctls: &Controllers, root: &Path) -> (PathBuf, String) {
    let text = std::fs::read_to_string(ctls.admin_file()).expect("admin.yaml");
    let mut c: jmp_protocol::api::ClientConfig = serde_norway::from_str(&text).expect("parse");
    c.endpoint = ctls.endpoints();
    let p = root.join("admin-all.yaml");
    write_private(&p, &serde_norway::to_string(&c).expect("yaml"));
    (p, c.token)
}

fn jmpd_config(root: &Path, name: &str, token: &Path) -> PathBuf {
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  console: {{type: sim-console}}\n",
        root.join(format!("state-{name}")).display(),
        token.display()
    );
    let p = root.join(format!("{name}.exporter.yaml"));
    std::fs::write(&p, yaml).expect("write exporter config");
    p
}

/// Identities, then one `jmpd` per exporter. Credentials are issued once every controller is
/// a live member, so they name all of them (checked).
fn exporters(
    rt: &tokio::runtime::Runtime,
    admin: &Api,
    env: &TestEnv,
    specs: &[(&str, &str)],
) -> Vec<Proc> {
    let mut procs = Vec::new();
    for (name, board) in specs {
        let t0 = Instant::now();
        let cred = loop {
            let r = rt.block_on(admin.definite(Request::CreateExporter(ExporterSpec {
                name: name.to_string(),
                labels: [("board".to_string(), board.to_string())].into(),
            })));
            match r {
                Ok(Reply::Credential(c)) if c.endpoint.split(',').count() == 3 => break c,
                Ok(Reply::Credential(_)) => {
                    assert!(
                        t0.elapsed() < LONG,
                        "credentials never named all 3 controllers"
                    );
                    std::thread::sleep(Duration::from_millis(300));
                }
                other => panic!("create exporter {name}: {other:?}"),
            }
        };
        let f = env.root.join(format!("{name}.token"));
        write_private(&f, &format!("{}\n", cred.token));
        let mut cmd = command(jmpd_bin());
        cmd.arg("--config")
            .arg(jmpd_config(env.root.path(), name, &f))
            .env("JMP_LOG", "info");
        let mut p = Proc::spawn(&format!("jmpd-{name}"), cmd, &env.logs);
        assert!(
            poll_until(LONG, || p.stderr().contains("registered with controller")),
            "jmpd {name} never registered: {}",
            p.describe()
        );
        procs.push(p);
    }
    procs
}

fn client(rt: &tokio::runtime::Runtime, admin: &Api, endpoints: &str, fp: &str, name: &str) -> Api {
    match rt.block_on(admin.definite(Request::CreateClient(ClientSpec {
        name: name.into(),
        ..Default::default()
    }))) {
        Ok(Reply::Credential(c)) => Api::new(endpoints, fp, &c.token),
        other => panic!("create client {name}: {other:?}"),
    }
}

fn all_leases(rt: &tokio::runtime::Runtime, admin: &Api) -> Vec<LeaseInfo> {
    match rt.block_on(admin.definite(Request::GetLeases { all: true })) {
        Ok(Reply::Leases { leases }) => leases,
        other => panic!("get leases: {other:?}"),
    }
}

/// One active lease per exporter; names and request ids unique.
fn check_listing(leases: &[LeaseInfo], context: &str) {
    let mut exporters = HashMap::new();
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for l in leases {
        assert!(
            names.insert(&l.name),
            "{context}: lease {} listed twice",
            l.name
        );
        assert!(
            ids.insert(&l.request_id),
            "{context}: request {} listed twice: {leases:#?}",
            l.request_id
        );
        if l.status == "active" {
            if let Some(other) = exporters.insert(&l.exporter, &l.name) {
                panic!(
                    "{context}: exporter {} held by {other} and {}: {leases:#?}",
                    l.exporter, l.name
                );
            }
        }
    }
}

/// A tiny deterministic generator (the run must be reproducible from its seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Kills the controller etcd names leader and waits until another one is named and answers.
fn kill_leader(
    rt: &tokio::runtime::Runtime,
    etcd: &Etcd,
    ctls: &mut Controllers,
    admin: &Api,
) -> usize {
    let t0 = Instant::now();
    let old = loop {
        if let Some(l) = ctls.leader(etcd) {
            break l;
        }
        assert!(t0.elapsed() < LONG, "no leader named in etcd");
        std::thread::sleep(Duration::from_millis(100));
    };
    ctls.kill9(old);
    let t0 = Instant::now();
    loop {
        let now = ctls.leader(etcd);
        if now.is_some() && now != Some(old) {
            break;
        }
        assert!(
            t0.elapsed() < LONG,
            "no new leader after killing controller {old}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new leader serves.
    rt.block_on(admin.definite(Request::Whoami))
        .expect("whoami");
    old
}

#[test]
fn leases_survive_the_leader_controller_being_killed_again_and_again() {
    require!(etcd_installed());
    let env = TestEnv::new("cluster-kill");
    let etcd = Etcd::start(env.root.path(), &env.logs, 3);
    let mut ctls = Controllers::start(&etcd, env.root.path(), &env.logs, 3);
    let rt = runtime();
    let fp = ctls.ctls[0].as_ref().expect("c0").fingerprint.clone();
    let (_admin_file, admin_token) = admin_config(&ctls, env.root.path());
    let eps = ctls.endpoints();
    let admin = Api::new(&eps, &fp, &admin_token);
    let _jmpds = exporters(
        &rt,
        &admin,
        &env,
        &[
            ("e0", "rpi4"),
            ("e1", "rpi4"),
            ("e2", "rpi4"),
            ("solo", "solo"),
        ],
    );
    let clients: Vec<Arc<Api>> = (0..4)
        .map(|i| Arc::new(client(&rt, &admin, &eps, &fp, &format!("c{i}"))))
        .collect();

    // The queue: c0 holds `solo`; c1, c2, c3 wait for it, in that order.
    let held0 = rt
        .block_on(clients[0].lease(lease_req("solo-0", "board=solo", 0)))
        .expect("c0 leases solo");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for (i, client) in clients.iter().enumerate().skip(1) {
        // Its own connection: the random traffic below closes its client's after each grant.
        let c = Api::new(&eps, &fp, &client.cred);
        let order = order.clone();
        waiters.push(rt.spawn(async move {
            let l = c
                .lease(lease_req(&format!("solo-{i}"), "board=solo", 600))
                .await
                .expect("a waiter is served");
            order.lock().unwrap().push(i);
            l
        }));
        // The next one arrives only once this one is queued.
        let t0 = Instant::now();
        while all_leases(&rt, &admin)
            .iter()
            .filter(|l| l.status == "waiting")
            .count()
            < i
        {
            assert!(t0.elapsed() < LONG, "waiter {i} never queued");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Random lease traffic on the rpi4 boards from all four clients while the leader dies.
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, stop, seq) = (c.clone(), stop.clone(), seq.clone());
        workers.push(rt.spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            // Leases this client was granted and still holds, by name → exporter; request ids
            // refused (never granted).
            let mut held: BTreeMap<String, (String, String)> = BTreeMap::new();
            let mut refused: Vec<String> = Vec::new();
            let mut ops = 0u32;
            let mut grants = 0u32;
            while !stop.load(Ordering::Relaxed) {
                ops += 1;
                match rng.next() % 3 {
                    0 | 1 if held.is_empty() => {
                        let id = format!("r{i}-{}", seq.fetch_add(1, Ordering::Relaxed));
                        let wait = rng.next() % 2;
                        match c.lease(lease_req(&id, "board=rpi4", wait)).await {
                            Ok(l) => {
                                assert_eq!(l.request_id, id);
                                grants += 1;
                                held.insert(l.name, (l.exporter, id));
                            }
                            Err(e) => {
                                assert!(
                                    matches!(
                                        e.code,
                                        CtlErrorCode::AllBusy
                                            | CtlErrorCode::Timeout
                                            | CtlErrorCode::AllOffline
                                    ),
                                    "unexpected refusal of {id}: {e:?}"
                                );
                                refused.push(id);
                            }
                        }
                    }
                    _ => {
                        let Some(name) = held.keys().next().cloned() else {
                            continue;
                        };
                        match c
                            .definite(Request::DeleteLease {
                                names: vec![name.clone()],
                                all: false,
                            })
                            .await
                        {
                            Ok(Reply::Deleted { .. }) => {}
                            // A delete whose answer was lost in a failover, retried.
                            Err(e) if e.code == CtlErrorCode::NotFound => {}
                            other => panic!("delete {name}: {other:?}"),
                        }
                        held.remove(&name);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20 + rng.next() % 80)).await;
            }
            (held, refused, ops, grants)
        }));
    }

    // Four kills of whichever controller leads; each killed one is started again.
    let mut killed = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(3));
        let k = kill_leader(&rt, &etcd, &mut ctls, &admin);
        killed.push(k);
        ctls.spawn(k);
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let mut believed: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut refused = Vec::new();
    let (mut total_ops, mut total_grants) = (0, 0);
    for w in workers {
        let (h, r, ops, g) = rt.block_on(w).expect("worker");
        believed.extend(h);
        refused.extend(r);
        total_ops += ops;
        total_grants += g;
    }
    assert!(
        total_ops > 40 && total_grants > 10,
        "too little traffic to mean anything: {total_ops} operations, {total_grants} grants"
    );

    // What the controllers hold is exactly what the clients were told.
    let leases = all_leases(&rt, &admin);
    check_listing(&leases, "after the kills");
    let active: BTreeMap<&str, &LeaseInfo> = leases
        .iter()
        .filter(|l| l.status == "active" && l.exporter != "solo")
        .map(|l| (l.name.as_str(), l))
        .collect();
    for (name, (exporter, id)) in &believed {
        let l = active.get(name.as_str()).unwrap_or_else(|| {
            panic!("lease {name} ({id}) was granted and never released, but is gone: {leases:#?}")
        });
        assert_eq!(&l.exporter, exporter, "lease {name} moved exporters");
    }
    assert_eq!(
        active.len(),
        believed.len(),
        "leases nobody was told about: {active:#?} vs {believed:#?}"
    );
    for id in &refused {
        assert!(
            !leases.iter().any(|l| &l.request_id == id),
            "request {id} was refused but holds something: {leases:#?}"
        );
    }

    // The waiters, in order: releasing solo serves c1, then c2, then c3.
    let mut holder = (clients[0].clone(), held0.name.clone());
    for (k, w) in waiters.into_iter().enumerate() {
        match rt.block_on(holder.0.definite(Request::DeleteLease {
            names: vec![holder.1.clone()],
            all: false,
        })) {
            Ok(Reply::Deleted { .. }) => {}
            other => panic!("release {}: {other:?}", holder.1),
        }
        let l = rt.block_on(w).expect("waiter");
        assert_eq!(l.exporter, "solo");
        assert_eq!(
            *order.lock().unwrap(),
            (1..=k + 1).collect::<Vec<usize>>(),
            "waiters served out of order"
        );
        holder = (clients[k + 1].clone(), l.name);
    }
    check_listing(&all_leases(&rt, &admin), "at the end");
    raw_stderr(&format!(
        "cluster: {total_ops} operations, {total_grants} grants, {} refused, {} leases held at the end, controllers killed: {killed:?}",
        refused.len(),
        believed.len()
    ));
}

#[test]
fn an_etcd_member_down_changes_nothing_and_all_of_etcd_down_is_a_clear_error_then_recovers() {
    require!(etcd_installed());
    let env = TestEnv::new("cluster-etcd-down");
    let mut etcd = Etcd::start(env.root.path(), &env.logs, 3);
    let ctls = Controllers::start(&etcd, env.root.path(), &env.logs, 3);
    let rt = runtime();
    let fp = ctls.ctls[0].as_ref().expect("c0").fingerprint.clone();
    let (admin_file, admin_token) = admin_config(&ctls, env.root.path());
    let eps = ctls.endpoints();
    let admin = Api::new(&eps, &fp, &admin_token);
    let _jmpds = exporters(&rt, &admin, &env, &[("e0", "rpi4"), ("e1", "rpi4")]);
    let c = client(&rt, &admin, &eps, &fp, "u");
    let l1 = rt
        .block_on(c.lease(lease_req("a1", "board=rpi4", 0)))
        .expect("first lease");
    let jmp = |args: &[&str]| {
        let mut cmd = env.jmp();
        cmd.env("JMP_CLIENT_CONFIG", &admin_file).args(args);
        run("jmp", cmd, &env.logs, LONG)
    };

    // etcd's own leader, the worst member to lose: the cluster elects another.
    let dead = etcd.raft_leader().unwrap_or(0);
    let leader_before = ctls.leader(&etcd);
    etcd.kill(dead);
    let l2 = rt
        .block_on(c.lease(lease_req("a2", "board=rpi4", 10)))
        .expect("a lease with one etcd member dead");
    let out = jmp(&["get", "leases", "-a", "-o", "json"]);
    assert!(out.status.success(), "jmp get leases: {}", out.stderr);
    for l in [&l1, &l2] {
        assert!(
            out.stdout.contains(&l.name),
            "lease {} missing: {}",
            l.name,
            out.stdout
        );
    }
    etcd.restart(dead);
    etcd.wait_healthy();
    raw_stderr(&format!(
        "cluster: controller leader before/after losing etcd member {dead}: {leader_before:?}/{:?}",
        ctls.leader(&etcd)
    ));

    // All of etcd down: callers hear why, promptly.
    for i in 0..3 {
        etcd.kill(i);
    }
    let t0 = Instant::now();
    let out = loop {
        let out = jmp(&["get", "leases", "-a"]);
        if !out.status.success() {
            break out;
        }
        // The leader serves from memory until it misses its lease renewal (under a TTL).
        assert!(t0.elapsed() < LONG, "calls kept succeeding with etcd down");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        out.status.code(),
        Some(jmp_protocol::exit::UNAVAILABLE),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("etcd") && out.stderr.contains("unreachable"),
        "the error names the store and why: {}",
        out.stderr
    );
    let out = jmp(&["create", "lease", "-l", "board=rpi4", "--duration", "1m"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("etcd"), "{}", out.stderr);

    // etcd back: the controllers recover by themselves, with everything acknowledged before.
    for i in 0..3 {
        etcd.restart(i);
    }
    etcd.wait_healthy();
    let t0 = Instant::now();
    let leases = loop {
        let out = jmp(&["get", "leases", "-a", "-o", "json"]);
        if out.status.success() {
            break out.stdout;
        }
        assert!(
            t0.elapsed() < LONG,
            "no recovery after etcd returned: {}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for l in [&l1, &l2] {
        assert!(leases.contains(&l.name), "lease {} lost: {leases}", l.name);
    }
    // And it grants again: release one of the two boards, lease it anew.
    match rt.block_on(c.definite(Request::DeleteLease {
        names: vec![l1.name.clone()],
        all: false,
    })) {
        Ok(Reply::Deleted { .. }) => {}
        other => panic!("release {}: {other:?}", l1.name),
    }
    let l3 = rt
        .block_on(c.lease(lease_req("a3", "board=rpi4", 30)))
        .expect("a lease after etcd came back");
    assert_eq!(l3.exporter, l1.exporter);
    drop(ctls);
}
