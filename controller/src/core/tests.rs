//! The core driven through its command channel, as the API task drives it.

use super::*;
use crate::store::{MemStore, RedbStore};
use jmp_protocol::api::{
    ClientSpec, Credential, ExporterSpec, LeaseInfo, LeaseRequest, Registration,
};
use jmp_protocol::token::{ControllerRef, ShareClaim};
use jmp_transport::token::{peek, Signer};

struct Harness {
    tx: mpsc::Sender<Cmd>,
    admin: Caller,
    next: u64,
}

fn caller_of(c: &Credential) -> Caller {
    let claims = peek(&c.token).expect("credential parses");
    Caller {
        kind: claims.kind,
        name: claims.sub,
        jti: claims.jti,
    }
}

fn authority() -> Arc<Authority> {
    let der =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let signer = Signer::from_pkcs8(der.as_ref()).unwrap();
    let ctl = ControllerRef {
        endpoint: "127.0.0.1:1".into(),
        fingerprint: "sha256:00".into(),
        key: signer.public_key(),
    };
    Arc::new(Authority::new(signer, ctl))
}

fn start<S: LeaseStore>(store: S, auth: Arc<Authority>, grace: Duration) -> Harness {
    run(
        Core::open(store, "test", auth, Arc::new(Metrics::new()), 3600).unwrap(),
        grace,
    )
}

/// Runs `core` (set up as a test needs) with an admin and `grace` for orphans.
fn run<S: LeaseStore>(mut core: Core<S>, grace: Duration) -> Harness {
    core.set_orphan_grace(grace);
    let admin = caller_of(&core.issue_admin("admin").unwrap());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(core.run(rx));
    Harness { tx, admin, next: 1 }
}

impl Harness {
    /// Starts a call; returns its stream id and reply channel.
    async fn start_call(
        &mut self,
        caller: &Caller,
        request: Request,
    ) -> (u64, mpsc::UnboundedReceiver<Reply>) {
        let (rtx, rrx) = mpsc::unbounded_channel();
        self.next += 1;
        self.tx
            .send(Cmd::Call {
                caller: caller.clone(),
                request,
                reply: rtx,
                stream: self.next,
            })
            .await
            .unwrap();
        (self.next, rrx)
    }

    async fn call(&mut self, caller: &Caller, request: Request) -> Reply {
        let (_, mut rx) = self.start_call(caller, request).await;
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an answer")
                .expect("an answer");
            if r.is_final() {
                return r;
            }
        }
    }

    /// `caller` deletes the leases `names`; the answer.
    async fn delete(&mut self, caller: &Caller, names: Vec<String>) -> Reply {
        self.call(caller, Request::DeleteLease { names, all: false })
            .await
    }

    /// Every lease, as the admin lists them.
    async fn all_leases(&mut self) -> Vec<LeaseInfo> {
        let admin = self.admin.clone();
        match self.call(&admin, Request::GetLeases { all: true }).await {
            Reply::Leases { leases } => leases,
            other => panic!("{other:?}"),
        }
    }

    async fn client(&mut self, name: &str, allow: &str, max: u64) -> Caller {
        let admin = self.admin.clone();
        match self
            .call(
                &admin,
                Request::CreateClient(ClientSpec {
                    name: name.into(),
                    allow: allow.into(),
                    max_duration_secs: max,
                    ..Default::default()
                }),
            )
            .await
        {
            Reply::Credential(c) => caller_of(&c),
            other => panic!("{other:?}"),
        }
    }

    /// Creates an exporter and brings it online; the receiver keeps it registered.
    async fn exporter(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> mpsc::UnboundedReceiver<Reply> {
        self.exporter_as(name, labels).await.2
    }

    /// [`Harness::exporter`], with the exporter's own identity and its registration's stream.
    async fn exporter_as(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> (Caller, u64, mpsc::UnboundedReceiver<Reply>) {
        let reg = Registration {
            admits_shares: true,
            ..Default::default()
        };
        self.exporter_registering(name, labels, reg).await
    }

    /// An exporter that reports its sessions (as jmpd does), with its identity and stream.
    async fn reporting_exporter(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> (Caller, u64, mpsc::UnboundedReceiver<Reply>) {
        let reg = Registration {
            reports_in_use: true,
            ..Default::default()
        };
        self.exporter_registering(name, labels, reg).await
    }

    /// Creates exporter `name` and registers it with `reg` (address and fingerprint filled in).
    async fn exporter_registering(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        reg: Registration,
    ) -> (Caller, u64, mpsc::UnboundedReceiver<Reply>) {
        let admin = self.admin.clone();
        let cred = match self
            .call(
                &admin,
                Request::CreateExporter(ExporterSpec {
                    name: name.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                }),
            )
            .await
        {
            Reply::Credential(c) => c,
            other => panic!("{other:?}"),
        };
        let (stream, mut rx) = self
            .start_call(
                &caller_of(&cred),
                Request::Register(Registration {
                    address: "127.0.0.1:9".into(),
                    fingerprint: "sha256:11".into(),
                    ..reg
                }),
            )
            .await;
        assert!(matches!(rx.recv().await, Some(Reply::ExporterState { .. })));
        (caller_of(&cred), stream, rx)
    }
}

/// A core on a fresh in-memory store, not yet running.
fn mem_core() -> Core<MemStore> {
    Core::open(
        MemStore::default(),
        "test",
        authority(),
        Arc::new(Metrics::new()),
        3600,
    )
    .unwrap()
}

/// A request for the token of lease `name` (as `jmp attach` asks for it).
fn access(name: &str) -> Request {
    Request::LeaseAccess {
        name: Some(name.to_string()),
    }
}

fn lease_req(id: &str, sel: &str, secs: u64, wait: u64) -> Request {
    Request::CreateLease(LeaseRequest {
        request_id: id.into(),
        selector: sel.into(),
        duration_secs: secs,
        wait_secs: wait,
        ..Default::default()
    })
}

fn lease_of(r: Reply) -> LeaseInfo {
    match r {
        Reply::Lease(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

async fn leases_of(h: &mut Harness, c: &Caller) -> Vec<LeaseInfo> {
    match h.call(c, Request::GetLeases { all: false }).await {
        Reply::Leases { leases } => leases,
        other => panic!("{other:?}"),
    }
}

fn code(r: &Reply) -> Option<CtlErrorCode> {
    match r {
        Reply::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn revoked_credentials_policy_and_duration_limits_are_refused_with_reasons() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let _b = h.exporter("imx8-01", &[("board", "imx8")]).await;
    let old = h.client("ci", "board=rpi4", 7200).await;
    let r = h.call(&old, lease_req("r1", "board=imx8", 60, 0)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(
        format!("{r:?}").contains("board=rpi4"),
        "names the policy: {r:?}"
    );
    let r = h
        .call(&old, lease_req("r2", "board=rpi4", 3 * 3600, 0))
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(format!("{r:?}").contains("at most 2h"), "{r:?}");
    // Rotating revokes the credential used for the call.
    let new = match h.call(&old, Request::Rotate).await {
        Reply::Credential(c) => caller_of(&c),
        other => panic!("{other:?}"),
    };
    let r = h.call(&old, Request::Whoami).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Unauthorized), "{r:?}");
    assert!(format!("{r:?}").contains("revoked"), "{r:?}");
    assert!(matches!(
        h.call(&new, Request::Whoami).await,
        Reply::Identity { .. }
    ));
    // Renewing does not: the same identity and id, a credential that expires, and the one
    // used for the call still works (copies of it elsewhere keep working).
    let renewed = match h.call(&new, Request::Renew).await {
        Reply::Credential(c) => c,
        other => panic!("{other:?}"),
    };
    let claims = jmp_transport::token::peek(&renewed.token).unwrap();
    assert_eq!(claims.jti, new.jti);
    assert_eq!(claims.sub, "ci");
    assert_eq!(
        claims.exp,
        Some(claims.iat + DEFAULT_CREDENTIAL_TTL_SECS),
        "credentials expire"
    );
    for c in [&new, &caller_of(&renewed)] {
        assert!(matches!(
            h.call(c, Request::Whoami).await,
            Reply::Identity { .. }
        ));
    }
    // Non-admins cannot create identities.
    let r = h
        .call(
            &new,
            Request::CreateClient(ClientSpec {
                name: "x".into(),
                ..Default::default()
            }),
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
}

#[tokio::test]
async fn a_waiting_request_whose_requester_vanished_is_withdrawn_and_its_grant_released() {
    let mut h = start(MemStore::default(), authority(), Duration::from_millis(300));
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c1 = h.client("c1", "", 0).await;
    let c2 = h.client("c2", "", 0).await;
    let l1 = lease_of(h.call(&c1, lease_req("r1", "board=rpi4", 600, 0)).await);
    // c2 waits, then goes away without a word.
    let (stream, mut rx) = h
        .start_call(&c2, lease_req("r2", "board=rpi4", 600, 60))
        .await;
    assert!(matches!(
        rx.recv().await,
        Some(Reply::Queued { position: 1, .. })
    ));
    h.tx.send(Cmd::Gone { stream }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Its place is gone: freeing the exporter does not lease it to nobody.
    assert!(matches!(
        h.delete(&c1, vec![l1.name]).await,
        Reply::Deleted { .. }
    ));
    let leases = h.all_leases().await;
    assert!(leases.is_empty(), "{leases:?}");
}

#[tokio::test]
async fn a_requester_that_comes_back_in_time_keeps_its_place_and_gets_its_lease() {
    let mut h = start(MemStore::default(), authority(), Duration::from_secs(30));
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c1 = h.client("c1", "", 0).await;
    let c2 = h.client("c2", "", 0).await;
    let l1 = lease_of(h.call(&c1, lease_req("r1", "board=rpi4", 600, 0)).await);
    let (stream, mut rx) = h
        .start_call(&c2, lease_req("r2", "board=rpi4", 600, 60))
        .await;
    assert!(matches!(rx.recv().await, Some(Reply::Queued { .. })));
    h.tx.send(Cmd::Gone { stream }).await.unwrap();
    h.delete(&c1, vec![l1.name]).await;
    // The retry (same request id) finds the lease granted while it was away, not a new one.
    match h.call(&c2, lease_req("r2", "board=rpi4", 600, 60)).await {
        Reply::Lease(l) => {
            assert_eq!(l.request_id, "r2");
            assert_eq!(l.exporter, "rpi4-01");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn granted_leases_survive_a_restart_from_the_store() {
    let scratch = Scratch::new("jmp-core");
    let dir = scratch.0.clone();
    let db = dir.join("leases.redb");
    let auth = authority();
    let (lease, client) = {
        let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), ORPHAN_GRACE);
        let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
        let c = h.client("c1", "", 0).await;
        let l = lease_of(h.call(&c, lease_req("r1", "board=rpi4", 600, 0)).await);
        // Stop the core: every sender gone ends its task, which drops the store.
        drop(h);
        tokio::time::sleep(Duration::from_millis(200)).await;
        (l, c)
    };
    let mut h = start(RedbStore::open(&db).unwrap(), auth, ORPHAN_GRACE);
    match h.call(&client, Request::GetLeases { all: false }).await {
        Reply::Leases { leases } => {
            assert_eq!(leases.len(), 1, "{leases:?}");
            assert_eq!(leases[0].name, lease.name);
            assert_eq!(leases[0].exporter, "rpi4-01");
        }
        other => panic!("{other:?}"),
    }
    // The same request id after the restart is the same lease, not a second one.
    match h.call(&client, lease_req("r1", "board=rpi4", 600, 0)).await {
        Reply::Lease(l) => assert_eq!(l.name, lease.name),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unclaimed_grant_is_released_after_a_restart_too() {
    let scratch = Scratch::new("jmp-core-unclaimed");
    let dir = scratch.0.clone();
    let db = dir.join("leases.redb");
    let auth = authority();
    let grace = Duration::from_millis(400);
    // Two exporters; on each, a lease is granted from the queue to a waiter. The waiter on
    // rpi4-01 confirms receipt; the one on rpi4-02 is still unconfirmed when the
    // controller stops (it crashed, or the requester died with it).
    {
        let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), grace);
        let a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
        let b = h.exporter("rpi4-02", &[("board", "rpi4")]).await;
        let c1 = h.client("c1", "", 0).await;
        let c2 = h.client("c2", "", 0).await;
        let mut first = Vec::new();
        for id in ["h1", "h2"] {
            match h.call(&c1, lease_req(id, "board=rpi4", 600, 0)).await {
                Reply::Lease(l) => first.push(l.name),
                other => panic!("{other:?}"),
            }
        }
        let mut waiters = Vec::new();
        for id in ["w1", "w2"] {
            let (s, mut rx) = h
                .start_call(&c2, lease_req(id, "board=rpi4", 600, 60))
                .await;
            assert!(matches!(rx.recv().await, Some(Reply::Queued { .. })));
            waiters.push((s, rx));
        }
        h.delete(&c1, first).await;
        for (_, rx) in waiters.iter_mut() {
            assert!(matches!(rx.recv().await, Some(Reply::Lease(_))));
        }
        h.tx.send(Cmd::Delivered {
            stream: waiters[0].0,
        })
        .await
        .unwrap();
        // Let the core commit the confirmation, then stop it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop((waiters, a, b, h));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut h = start(RedbStore::open(&db).unwrap(), auth, grace);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let leases = h.all_leases().await;
    let mut ids: Vec<&str> = leases.iter().map(|l| l.request_id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["w1"],
        "the unclaimed grant is held for nobody: {leases:?}"
    );
    drop(h);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_queued_grant_that_never_reaches_its_requester_is_released() {
    let mut h = start(MemStore::default(), authority(), Duration::from_millis(400));
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c1 = h.client("c1", "", 0).await;
    let c2 = h.client("c2", "", 0).await;
    let c3 = h.client("c3", "", 0).await;
    let l1 = lease_of(h.call(&c1, lease_req("r1", "board=rpi4", 600, 0)).await);
    // c2 waits; the grant is sent to it, but its stream dies before confirming.
    let (s2, mut rx2) = h
        .start_call(&c2, lease_req("r2", "board=rpi4", 600, 60))
        .await;
    assert!(matches!(rx2.recv().await, Some(Reply::Queued { .. })));
    h.delete(&c1, vec![l1.name]).await;
    assert!(matches!(rx2.recv().await, Some(Reply::Lease(_))));
    h.tx.send(Cmd::Gone { stream: s2 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let leases = h.all_leases().await;
    assert!(leases.is_empty(), "held for nobody: {leases:?}");

    // The same again, but delivered: the lease stays.
    let l3 = lease_of(h.call(&c3, lease_req("r3", "board=rpi4", 600, 0)).await);
    let (s4, mut rx4) = h
        .start_call(&c2, lease_req("r4", "board=rpi4", 600, 60))
        .await;
    assert!(matches!(rx4.recv().await, Some(Reply::Queued { .. })));
    h.delete(&c3, vec![l3.name]).await;
    assert!(matches!(rx4.recv().await, Some(Reply::Lease(_))));
    h.tx.send(Cmd::Delivered { stream: s4 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let leases = h.all_leases().await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].request_id, "r4");
    // Another client cannot take over a request id.
    let r = h.call(&c1, lease_req("r4", "board=rpi4", 600, 0)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
    // Values from the wire that would overflow are refused, not wrapped.
    let r = h
        .call(
            &c1,
            Request::CreateLease(LeaseRequest {
                request_id: "r5".into(),
                selector: "board=rpi4".into(),
                duration_secs: 60,
                wait_secs: u64::MAX,
                ..Default::default()
            }),
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
}

/// The relay's admission in the core: only the lease's own client, with a valid token of
/// an active lease, for an exporter that takes relayed sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_only_the_lease_holder_of_a_relay_exporter_while_the_lease_lasts() {
    let mut core = mem_core();
    core.set_relay(crate::relay::RelayConfig {
        bind: "127.0.0.1".parse().unwrap(),
        ports: None,
        host: None,
    });
    let mut h = run(core, ORPHAN_GRACE);
    let admin = h.admin.clone();
    let mut links = Vec::new();
    for (name, relay) in [("nat-01", true), ("lan-01", false)] {
        let cred = match h
            .call(
                &admin,
                Request::CreateExporter(jmp_protocol::api::ExporterSpec {
                    name: name.into(),
                    labels: [("site".to_string(), name.to_string())].into(),
                }),
            )
            .await
        {
            Reply::Credential(c) => caller_of(&c),
            other => panic!("{other:?}"),
        };
        let (_, mut link) = h
            .start_call(
                &cred,
                Request::Register(Registration {
                    address: "127.0.0.1:9".into(),
                    fingerprint: "sha256:11".into(),
                    relay,
                    ..Default::default()
                }),
            )
            .await;
        assert!(matches!(
            link.recv().await,
            Some(Reply::ExporterState { .. })
        ));
        links.push(link);
    }
    let mut clients = Vec::new();
    for name in ["c1", "c2"] {
        match h
            .call(
                &admin,
                Request::CreateClient(ClientSpec {
                    name: name.into(),
                    ..Default::default()
                }),
            )
            .await
        {
            Reply::Credential(c) => clients.push(caller_of(&c)),
            other => panic!("{other:?}"),
        }
    }
    let (c1, c2) = (clients[0].clone(), clients[1].clone());
    let mut tokens = Vec::new();
    for (site, id) in [("nat-01", "r1"), ("lan-01", "r2")] {
        let lease = lease_of(
            h.call(
                &c1,
                Request::CreateLease(LeaseRequest {
                    request_id: id.into(),
                    selector: format!("site={site}"),
                    duration_secs: 600,
                    ..Default::default()
                }),
            )
            .await,
        );
        match h.call(&c1, access(&lease.name)).await {
            Reply::Access(a) => {
                assert_eq!(a.relay, site == "nat-01", "{a:?}");
                tokens.push((lease.name, a.token));
            }
            other => panic!("{other:?}"),
        }
    }
    // Someone else's token, garbage, an exporter without the relay: refused.
    let r = h
        .call(
            &c2,
            Request::Relay {
                token: tokens[0].1.clone(),
            },
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    let r = h
        .call(
            &c1,
            Request::Relay {
                token: "x.y.z".into(),
            },
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Unauthorized), "{r:?}");
    let r = h
        .call(
            &c1,
            Request::Relay {
                token: tokens[1].1.clone(),
            },
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(
        format!("{r:?}").contains("takes no relayed sessions"),
        "{r:?}"
    );
    // The holder: the exporter is told to punch; once it has, the client gets the session.
    let (_, mut answer) = h
        .start_call(
            &c1,
            Request::Relay {
                token: tokens[0].1.clone(),
            },
        )
        .await;
    let grant = loop {
        match links[0].recv().await {
            Some(Reply::RelayOpen(g)) => break g,
            Some(Reply::ExporterState { .. }) => continue,
            other => panic!("{other:?}"),
        }
    };
    let exp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let secret = jmp_protocol::relay::parse_secret(&grant.secret).unwrap();
    jmp_transport::relay::punch(
        &exp,
        format!("127.0.0.1:{}", grant.port).parse().unwrap(),
        &secret,
    )
    .unwrap();
    match answer.recv().await {
        Some(Reply::Relay(g)) => assert_eq!(g.port, grant.port),
        other => panic!("{other:?}"),
    }
    // The lease ends: its token opens nothing any more.
    let r = h
        .call(
            &c1,
            Request::DeleteLease {
                names: vec![tokens[0].0.clone()],
                all: false,
            },
        )
        .await;
    assert!(matches!(r, Reply::Deleted { .. }), "{r:?}");
    let r = h
        .call(
            &c1,
            Request::Relay {
                token: tokens[0].1.clone(),
            },
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::NotFound), "{r:?}");
}

/// A client record whose stored policy does not parse (another version wrote it, or a hand
/// edit) loads, but its client is refused whatever needs the policy, naming the client; other
/// clients are served as before.
#[tokio::test]
async fn a_client_whose_stored_policy_does_not_parse_is_refused_naming_it() {
    let mut store = MemStore::default();
    let rec = serde_json::json!({
        "name": "broken", "allow": "board in (rpi4", "jti": "j-broken", "created": 0
    });
    store
        .commit(
            0,
            &[crate::store::Op::Put {
                table: Table::Clients,
                key: "broken".into(),
                value: serde_json::to_vec(&rec).unwrap(),
            }],
        )
        .unwrap();
    let mut h = start(store, authority(), ORPHAN_GRACE);
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let broken = Caller {
        kind: TokenKind::Client,
        name: "broken".into(),
        jti: "j-broken".into(),
    };
    for req in [
        lease_req("r1", "board=rpi4", 60, 0),
        lease_req("r2", "board=rpi4", 60, 300),
        Request::GetExporters { selector: None },
    ] {
        let r = h.call(&broken, req).await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
        let text = format!("{r:?}");
        assert!(
            text.contains("policy of client broken") && text.contains("board in (rpi4"),
            "names the client and its policy: {r:?}"
        );
    }
    let admin = h.admin.clone();
    let leases = h.all_leases().await;
    assert!(leases.is_empty(), "nothing granted: {leases:?}");
    // The admin still sees the record as stored.
    match h
        .call(
            &admin,
            Request::GetClients {
                name: Some("broken".into()),
            },
        )
        .await
    {
        Reply::Clients { clients } => assert_eq!(clients[0].allow, "board in (rpi4"),
        other => panic!("{other:?}"),
    }
    // A client with a readable policy is served as ever.
    let good = h.client("good", "board=rpi4", 0).await;
    assert!(matches!(
        h.call(&good, lease_req("g1", "board=rpi4", 60, 0)).await,
        Reply::Lease(_)
    ));
}

/// A caller without a client record (an exporter's credential) gets no listing: neither the
/// lab's exporters with their addresses and fingerprints nor its leases.
#[tokio::test]
async fn an_exporter_credential_lists_no_exporters_and_no_leases() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let (me, _, _link) = h.exporter_as("rpi4-01", &[("board", "rpi4")]).await;
    let _b = h.exporter("imx8-01", &[("board", "imx8")]).await;
    let c = h.client("c1", "", 0).await;
    assert!(matches!(
        h.call(&c, lease_req("r1", "board=imx8", 60, 0)).await,
        Reply::Lease(_)
    ));
    for req in [
        Request::GetExporters { selector: None },
        Request::GetLeases { all: true },
        Request::GetLeases { all: false },
    ] {
        let r = h.call(&me, req).await;
        assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
        assert!(format!("{r:?}").contains("exporter rpi4-01"), "{r:?}");
    }
}

fn update(name: &str) -> jmp_protocol::api::ClientUpdate {
    jmp_protocol::api::ClientUpdate {
        name: name.into(),
        ..Default::default()
    }
}

/// Drains pushes on an exporter's registration stream until one reports `lease` ended;
/// returns the reason it gives.
async fn ended_reason(link: &mut mpsc::UnboundedReceiver<Reply>, lease: &str) -> String {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), link.recv())
            .await
            .expect("a push")
            .expect("the registration is open");
        if let Reply::ExporterState { ended, .. } = r {
            if let Some(e) = ended.iter().find(|e| e.name == lease) {
                return e.reason.clone();
            }
        }
    }
}

/// An admin narrows a client's policy: its lease on an exporter it may no longer use ends
/// (the exporter is told why), its reservation and waiting request that only such exporters
/// could serve are withdrawn (the waiting caller is told why), and a request the new policy
/// still allows keeps waiting, for the allowed exporters only.
#[tokio::test]
async fn a_narrowed_policy_ends_leases_and_withdraws_requests_it_forbids() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let mut a = h.exporter("a-01", &[("board", "a")]).await;
    let _b = h.exporter("b-01", &[("board", "b")]).await;
    let c = h.client("c", "", 0).await;
    let other = h.client("other", "", 0).await;
    let lease = match h.call(&c, lease_req("l1", "board=a", 600, 0)).await {
        Reply::Lease(l) => l,
        r => panic!("{r:?}"),
    };
    assert!(matches!(
        h.call(&other, lease_req("o1", "board=b", 600, 0)).await,
        Reply::Lease(_)
    ));
    // A reservation for later, a request waiting for "a", one waiting for any board.
    let begin = now_ms() / 1000 + 3600;
    let r = h
        .call(
            &c,
            Request::CreateLease(LeaseRequest {
                request_id: "rsv".into(),
                selector: "board=a".into(),
                duration_secs: 600,
                begin_time: Some(begin),
                ..Default::default()
            }),
        )
        .await;
    assert!(
        matches!(&r, Reply::Lease(l) if l.status == "reserved"),
        "{r:?}"
    );
    let (_, mut waiting_a) = h.start_call(&c, lease_req("wa", "board=a", 600, 300)).await;
    assert!(matches!(waiting_a.recv().await, Some(Reply::Queued { .. })));
    let (_, mut waiting_any) = h.start_call(&c, lease_req("wany", "", 600, 300)).await;
    assert!(matches!(
        waiting_any.recv().await,
        Some(Reply::Queued { .. })
    ));

    let admin = h.admin.clone();
    let r = h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                allow: Some("board=b".into()),
                ..update("c")
            }),
        )
        .await;
    match &r {
        Reply::Clients { clients } => assert_eq!(clients[0].allow, "board=b"),
        r => panic!("{r:?}"),
    }
    let why = ended_reason(&mut a, &lease.name).await;
    assert!(
        why.contains("policy of client c no longer allows exporter a-01"),
        "{why}"
    );
    let last = |rx: &mut mpsc::UnboundedReceiver<Reply>| {
        let mut last = None;
        while let Ok(r) = rx.try_recv() {
            last = Some(r);
        }
        last
    };
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match waiting_a.recv().await {
                Some(Reply::Queued { .. }) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("an answer");
    let r = r.expect("an answer");
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(
        format!("{r:?}").contains("policy of client c changed"),
        "{r:?}"
    );
    // The request for any board keeps waiting (for "b-01" now).
    assert!(
        !matches!(last(&mut waiting_any), Some(Reply::Error(_))),
        "still waiting"
    );
    match h.call(&c, Request::GetLeases { all: false }).await {
        Reply::Leases { leases } => {
            let ids: Vec<&str> = leases.iter().map(|l| l.request_id.as_str()).collect();
            assert_eq!(ids, ["wany"], "{leases:?}");
        }
        r => panic!("{r:?}"),
    }
    // Asking again for what the policy forbids is refused at once, with --wait too.
    let r = h.call(&c, lease_req("again", "board=a", 600, 300)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
}

/// `create client` refuses an existing name (it would reset the policy and revoke the
/// credential in use); `update client` changes the policy or limits only, and `reissue` gives
/// a new credential, keeping what is not given.
#[tokio::test]
async fn creating_an_existing_client_is_refused_and_update_changes_only_what_is_given() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c = h.client("ci", "board=rpi4", 7200).await;
    let admin = h.admin.clone();
    let r = h
        .call(
            &admin,
            Request::CreateClient(ClientSpec {
                name: "ci".into(),
                ..Default::default()
            }),
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
    assert!(
        format!("{r:?}").contains("already exists") && format!("{r:?}").contains("--replace"),
        "{r:?}"
    );
    // Nothing changed: the credential in use still works, the policy is the same.
    assert!(matches!(
        h.call(&c, Request::Whoami).await,
        Reply::Identity { .. }
    ));
    let info = |r: Reply| match r {
        Reply::Clients { clients } => clients.into_iter().next().expect("one"),
        r => panic!("{r:?}"),
    };
    let i = info(
        h.call(
            &admin,
            Request::GetClients {
                name: Some("ci".into()),
            },
        )
        .await,
    );
    assert_eq!(
        (i.allow.as_str(), i.max_duration_secs),
        ("board=rpi4", 7200)
    );
    // Re-issue: a new credential, the old one revoked, the policy kept.
    let new = match h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                reissue: true,
                ..update("ci")
            }),
        )
        .await
    {
        Reply::Credential(cr) => caller_of(&cr),
        r => panic!("{r:?}"),
    };
    assert_eq!(
        code(&h.call(&c, Request::Whoami).await),
        Some(CtlErrorCode::Unauthorized)
    );
    let r = h
        .call(&new, lease_req("r1", "board=rpi4", 3 * 3600, 0))
        .await;
    assert!(
        format!("{r:?}").contains("at most 2h"),
        "limits kept: {r:?}"
    );
    // Only the duration changes; the selector stays.
    let i = info(
        h.call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                max_duration_secs: Some(4 * 3600),
                ..update("ci")
            }),
        )
        .await,
    );
    assert_eq!(
        (i.allow.as_str(), i.max_duration_secs),
        ("board=rpi4", 4 * 3600)
    );
    assert!(matches!(
        h.call(&new, lease_req("r2", "board=rpi4", 3 * 3600, 0))
            .await,
        Reply::Lease(_)
    ));
    // A bad selector or an unknown client changes nothing.
    let r = h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                allow: Some("board in (".into()),
                ..update("ci")
            }),
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
    let r = h
        .call(&admin, Request::UpdateClient(update("nobody")))
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::NotFound), "{r:?}");
}

/// A request no registered exporter could ever serve is refused at once with why, even with
/// a wait or a begin time, and takes no place in the queue (the quota does not hide the
/// reason); one whose exporters are only offline or busy waits.
#[tokio::test]
async fn an_unservable_request_is_refused_at_once_even_with_a_wait() {
    let mut core = mem_core();
    core.set_max_waiting(1);
    let mut h = run(core, ORPHAN_GRACE);
    let _a = h.exporter("rpi4-01", &[("board", "rpi4")]).await;
    let _imx = h.exporter("imx8-01", &[("board", "imx8")]).await;
    let c = h.client("c", "board=rpi4", 0).await;
    let holder = h.client("holder", "", 0).await;
    assert!(matches!(
        h.call(&holder, lease_req("h", "board=rpi4", 600, 0)).await,
        Reply::Lease(_)
    ));
    // One waiting request fills c's quota of one.
    let (_, mut w) = h
        .start_call(&c, lease_req("w", "board=rpi4", 600, 300))
        .await;
    assert!(matches!(w.recv().await, Some(Reply::Queued { .. })));
    let later = now_ms() / 1000 + 600;
    let cases = [
        (
            lease_req("typo", "board=rpi5", 60, 300),
            CtlErrorCode::NoMatch,
            "no exporter matches selector 'board=rpi5'",
        ),
        (
            Request::CreateLease(LeaseRequest {
                request_id: "named".into(),
                exporter: Some("rpi4-99".into()),
                duration_secs: 60,
                wait_secs: 300,
                ..Default::default()
            }),
            CtlErrorCode::NoMatch,
            "no exporter named 'rpi4-99'",
        ),
        (
            Request::CreateLease(LeaseRequest {
                request_id: "later".into(),
                selector: "board=rpi5".into(),
                duration_secs: 60,
                begin_time: Some(later),
                ..Default::default()
            }),
            CtlErrorCode::NoMatch,
            "no exporter matches selector 'board=rpi5'",
        ),
        (
            lease_req("imx", "board=imx8", 60, 300),
            CtlErrorCode::Forbidden,
            "1 exporter matches 'board=imx8' but none is allowed by this client's policy 'board=rpi4'",
        ),
    ];
    for (req, want, text) in cases {
        let r = h.call(&c, req).await;
        assert_eq!(code(&r), Some(want), "{r:?}");
        assert!(format!("{r:?}").contains(text), "names why: {r:?}");
    }
    // A servable request beyond the quota gets the quota's refusal.
    let r = h.call(&c, lease_req("w2", "board=rpi4", 600, 300)).await;
    assert!(format!("{r:?}").contains("at most 1 per client"), "{r:?}");
    // An exporter that matches but is offline: the request waits for it.
    let (_, stream, _pi0) = h.exporter_as("pi0-01", &[("board", "pi0")]).await;
    h.tx.send(Cmd::Gone { stream }).await.unwrap();
    let admin = h.admin.clone();
    match h
        .call(
            &admin,
            Request::GetExporters {
                selector: Some("board=pi0".into()),
            },
        )
        .await
    {
        Reply::Exporters { exporters } => assert!(!exporters[0].online, "{exporters:?}"),
        r => panic!("{r:?}"),
    }
    let (_, mut q) = h
        .start_call(&holder, lease_req("off", "board=pi0", 60, 300))
        .await;
    assert!(matches!(q.recv().await, Some(Reply::Queued { .. })));
}

/// `get leases -a` by a client restricted to some exporters lists the leases on those, and the
/// requests competing for them, but nothing about the rest of the lab; an admin sees all.
#[tokio::test]
async fn a_restricted_client_lists_only_leases_on_exporters_it_may_lease() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let _a = h.exporter("team-a-01", &[("team", "a")]).await;
    let _b = h.exporter("team-b-01", &[("team", "b")]).await;
    let ra = h.client("ra", "team=a", 0).await;
    let any = h.client("any", "", 0).await;
    for (id, sel) in [("on-a", "team=a"), ("on-b", "team=b")] {
        assert!(matches!(
            h.call(&any, lease_req(id, sel, 600, 0)).await,
            Reply::Lease(_)
        ));
    }
    let (_, mut wb) = h
        .start_call(&any, lease_req("wait-b", "team=b", 600, 300))
        .await;
    assert!(matches!(wb.recv().await, Some(Reply::Queued { .. })));
    let (_, mut wa) = h
        .start_call(&any, lease_req("wait-a", "team=a", 600, 300))
        .await;
    assert!(matches!(wa.recv().await, Some(Reply::Queued { .. })));
    let ids = |r: Reply| -> Vec<String> {
        match r {
            Reply::Leases { leases } => {
                let mut v: Vec<String> = leases.into_iter().map(|l| l.request_id).collect();
                v.sort();
                v
            }
            r => panic!("{r:?}"),
        }
    };
    assert_eq!(
        ids(h.call(&ra, Request::GetLeases { all: true }).await),
        ["on-a", "wait-a"]
    );
    assert!(ids(h.call(&ra, Request::GetLeases { all: false }).await).is_empty());
    assert_eq!(
        ids(h.call(&any, Request::GetLeases { all: true }).await),
        ["on-a", "on-b", "wait-a", "wait-b"]
    );
    let admin = h.admin.clone();
    assert_eq!(
        ids(h.call(&admin, Request::GetLeases { all: true }).await).len(),
        4
    );
}

/// A deleted client's reservation and waiting requests go with it (its waiting caller told
/// why) and its leases end, their exporters told why.
#[tokio::test]
async fn a_deleted_clients_reservations_waiters_and_leases_go_with_it() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let mut a = h.exporter("a-01", &[("board", "a")]).await;
    let c = h.client("c", "", 0).await;
    let lease = match h.call(&c, lease_req("l1", "board=a", 600, 0)).await {
        Reply::Lease(l) => l,
        r => panic!("{r:?}"),
    };
    let r = h
        .call(
            &c,
            Request::CreateLease(LeaseRequest {
                request_id: "rsv".into(),
                selector: "board=a".into(),
                duration_secs: 600,
                begin_time: Some(now_ms() / 1000 + 3600),
                ..Default::default()
            }),
        )
        .await;
    assert!(
        matches!(&r, Reply::Lease(l) if l.status == "reserved"),
        "{r:?}"
    );
    let (_, mut waiting) = h.start_call(&c, lease_req("w", "board=a", 600, 300)).await;
    assert!(matches!(waiting.recv().await, Some(Reply::Queued { .. })));
    let admin = h.admin.clone();
    assert!(matches!(
        h.call(&admin, Request::DeleteClient { name: "c".into() })
            .await,
        Reply::Deleted { .. }
    ));
    let why = ended_reason(&mut a, &lease.name).await;
    assert!(why.contains("client removed"), "{why}");
    let r = loop {
        match waiting.recv().await {
            Some(Reply::Queued { .. }) => continue,
            other => break other.expect("an answer"),
        }
    };
    assert!(format!("{r:?}").contains("client c was deleted"), "{r:?}");
    let leases = h.all_leases().await;
    assert!(leases.is_empty(), "{leases:?}");
}

/// A lease request with an idle timeout (seconds; 0: none) and, with `max`, auto-extension up
/// to that hard limit.
fn idle_req(id: &str, sel: &str, secs: u64, idle: Option<u64>, max: Option<u64>) -> Request {
    Request::CreateLease(LeaseRequest {
        request_id: id.into(),
        selector: sel.into(),
        duration_secs: secs,
        idle_timeout_secs: idle,
        auto_extend: max.is_some(),
        max_duration_secs: max,
        ..Default::default()
    })
}

/// A lease nothing uses ends as idle: the exporter hears why, a waiter gets the board, and the
/// holder coming back is told how it ended. While a session of it is attached (as its exporter
/// says) it is in use and has no idle deadline; once the session leaves, it has one again.
#[tokio::test]
async fn a_lease_nothing_uses_ends_as_idle_and_its_holder_is_told() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let (exp, _, mut link) = h.reporting_exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c = h.client("c1", "", 0).await;
    let other = h.client("c2", "", 0).await;
    let l = lease_of(
        h.call(&c, idle_req("r1", "board=rpi4", 600, Some(1), None))
            .await,
    );
    assert_eq!((l.idle_timeout, l.attached), (Some(1), false));
    assert!(l.idle_deadline.is_some() && l.last_use.is_some());
    // Attached: in use, no idle deadline (shown so in the listing).
    assert!(matches!(
        h.call(
            &exp,
            Request::InUse {
                lease: Some(l.name.clone())
            }
        )
        .await,
        Reply::Done
    ));
    let shown = leases_of(&mut h, &c).await;
    assert!(
        shown[0].attached && shown[0].idle_deadline.is_none(),
        "{shown:?}"
    );
    // Someone waits; the session leaves; a second later the lease ends as idle and the waiter
    // gets the board.
    let (_, mut waiter) = h
        .start_call(&other, lease_req("w1", "board=rpi4", 600, 60))
        .await;
    assert!(matches!(waiter.recv().await, Some(Reply::Queued { .. })));
    assert!(matches!(
        h.call(&exp, Request::InUse { lease: None }).await,
        Reply::Done
    ));
    let why = ended_reason(&mut link, &l.name).await;
    assert!(why.contains("nothing used it for 1s"), "{why}");
    let granted = loop {
        match tokio::time::timeout(Duration::from_secs(10), waiter.recv()).await {
            Ok(Some(Reply::Lease(g))) => break g,
            Ok(Some(Reply::Queued { .. })) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(granted.exporter, "rpi4-01");
    // The holder comes back for it.
    for r in [
        access(&l.name),
        Request::TouchLease {
            name: Some(l.name.clone()),
        },
        Request::DeleteLease {
            names: vec![l.name.clone()],
            all: false,
        },
    ] {
        let e = h.call(&c, r).await;
        let Reply::Error(e) = e else { panic!("{e:?}") };
        assert_eq!(e.code, CtlErrorCode::NotFound);
        assert!(
            e.message.contains(&format!("lease {} ended at ", l.name))
                && e.message
                    .contains("nothing used it for 1s (its idle timeout)"),
            "{e}"
        );
    }
    // Someone else is told nothing about it.
    let Reply::Error(e) = h.call(&other, access(&l.name)).await else {
        panic!()
    };
    assert!(!e.message.contains("idle"), "{e}");
}

/// Calls that name a lease for use move its last use; listing does not.
#[tokio::test]
async fn calls_naming_a_lease_use_it_and_listing_does_not() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let (_e, _, _link) = h.reporting_exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c = h.client("c1", "", 0).await;
    let l = lease_of(
        h.call(&c, idle_req("r1", "board=rpi4", 600, Some(600), None))
            .await,
    );
    // last_use is in whole seconds: wait until the controller's clock has moved past it, so
    // a use shows.
    let moved = |t: u64| async move {
        while jmp_transport::unix_now() <= t {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut last = l.last_use.unwrap();
    moved(last).await;
    let listed = leases_of(&mut h, &c).await;
    assert_eq!(listed[0].last_use, Some(last), "listing is no use");
    for r in [
        Request::TouchLease { name: None },
        Request::LeaseAccess { name: None },
        Request::UpdateLease {
            name: l.name.clone(),
            duration_secs: None,
            extend_secs: Some(60),
        },
        // A retry of the request that made it: its requester is back for it.
        idle_req("r1", "board=rpi4", 600, Some(600), None),
    ] {
        let what = format!("{r:?}");
        h.call(&c, r).await;
        let now = leases_of(&mut h, &c).await[0].last_use.unwrap();
        assert!(now > last, "{what} did not use the lease ({now} <= {last})");
        last = now;
        moved(last).await;
    }
}

/// The client's policy caps idle timeouts: more than its maximum, or none, is refused; the
/// controller's default is capped to it. A hard limit or an extension beyond the longest
/// lease it may hold is refused.
#[tokio::test]
async fn idle_timeouts_hard_limits_and_extensions_beyond_policy_are_refused() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let _e = h.reporting_exporter("rpi4-01", &[("board", "rpi4")]).await;
    let admin = h.admin.clone();
    let c = match h
        .call(
            &admin,
            Request::CreateClient(ClientSpec {
                name: "c1".into(),
                max_duration_secs: 3600,
                max_idle_timeout_secs: 300,
                ..Default::default()
            }),
        )
        .await
    {
        Reply::Credential(cr) => caller_of(&cr),
        other => panic!("{other:?}"),
    };
    let refused = |r: Reply| match r {
        Reply::Error(e) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let e = refused(
        h.call(&c, idle_req("a", "board=rpi4", 600, Some(0), None))
            .await,
    );
    assert_eq!(e.code, CtlErrorCode::Forbidden);
    assert!(
        e.message.contains("without an idle timeout (at most 5m)"),
        "{e}"
    );
    let e = refused(
        h.call(&c, idle_req("b", "board=rpi4", 600, Some(600), None))
            .await,
    );
    assert!(
        e.message
            .contains("an idle timeout of 10m is longer than client c1 may ask for (at most 5m)"),
        "{e}"
    );
    let e = refused(
        h.call(&c, idle_req("c", "board=rpi4", 600, None, Some(7200)))
            .await,
    );
    assert_eq!(e.code, CtlErrorCode::Forbidden);
    assert!(
        e.message
            .contains("a hard limit of 2h is longer than client c1 may hold a lease (at most 1h)"),
        "{e}"
    );
    let e = refused(
        h.call(&c, idle_req("d", "board=rpi4", 600, None, Some(60)))
            .await,
    );
    assert_eq!(e.code, CtlErrorCode::Invalid, "{e}");
    // The controller's default (10m) is capped to the client's 5m; the hard limit defaults
    // to the longest lease it may hold.
    let l = lease_of(
        h.call(&c, idle_req("e", "board=rpi4", 600, None, Some(3600)))
            .await,
    );
    assert_eq!(l.idle_timeout, Some(300));
    assert_eq!(l.hard_limit, Some(l.begin + 3600));
    // An extension beyond the policy is refused; one within it is taken.
    let e = refused(
        h.call(
            &c,
            Request::UpdateLease {
                name: l.name.clone(),
                duration_secs: Some(7200),
                extend_secs: None,
            },
        )
        .await,
    );
    assert_eq!(e.code, CtlErrorCode::Forbidden);
    assert!(
        e.message
            .contains("client c1 may hold a lease for at most 1h"),
        "{e}"
    );
    let l2 = lease_of(
        h.call(
            &c,
            Request::UpdateLease {
                name: l.name.clone(),
                duration_secs: Some(1800),
                extend_secs: None,
            },
        )
        .await,
    );
    assert_eq!(l2.end, l.begin + 1800);
    // An admin lowers the client's limits: its lease's idle timeout and hard limit follow.
    match h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                max_idle_timeout_secs: Some(120),
                max_duration_secs: Some(2400),
                ..update("c1")
            }),
        )
        .await
    {
        Reply::Clients { clients } => assert_eq!(clients[0].max_idle_timeout_secs, 120),
        other => panic!("{other:?}"),
    }
    let now = leases_of(&mut h, &c).await;
    assert_eq!(now[0].idle_timeout, Some(120));
    assert_eq!(now[0].hard_limit, Some(l.begin + 2400));
}

/// An auto-extending lease in use outlives its first duration, in steps, and ends at its hard
/// limit; the exporter is told each new end.
#[tokio::test]
async fn an_auto_extended_lease_in_use_grows_to_its_hard_limit() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let (exp, _, mut link) = h.reporting_exporter("rpi4-01", &[("board", "rpi4")]).await;
    let c = h.client("c1", "", 0).await;
    // Steps of 2 s up to 5 s in all.
    let l = lease_of(
        h.call(&c, idle_req("r1", "board=rpi4", 2, Some(600), Some(5)))
            .await,
    );
    assert_eq!(l.hard_limit, Some(l.begin + 5));
    h.call(
        &exp,
        Request::InUse {
            lease: Some(l.name.clone()),
        },
    )
    .await;
    let mut ends = Vec::new();
    let why = loop {
        let r = tokio::time::timeout(Duration::from_secs(20), link.recv())
            .await
            .expect("a push")
            .expect("registered");
        if let Reply::ExporterState { lease, ended, .. } = r {
            if let Some(e) = ended.iter().find(|e| e.name == l.name) {
                break e.reason.clone();
            }
            if let Some(cur) = lease.filter(|x| x.name == l.name) {
                if ends.last() != Some(&cur.end) {
                    ends.push(cur.end);
                }
            }
        }
    };
    assert!(why.contains("reached its hard limit"), "{why}");
    assert!(
        ends.iter().any(|e| *e > l.end),
        "pushed ends {ends:?} never passed the first end {}",
        l.end
    );
    // The push rounds its end up to the second, the listing down.
    let last = *ends.last().expect("pushed ends");
    assert!(
        last.abs_diff(l.hard_limit.unwrap()) <= 1,
        "last pushed end {last}, hard limit {:?}",
        l.hard_limit
    );
}

/// Liveness survives a restart of the controller: an attached lease stays in use across it;
/// its exporter, registering again, says its session left meanwhile, and it ends as idle.
/// An exporter that does not report its sessions counts its lease as attached.
#[tokio::test]
async fn liveness_survives_a_restart_and_silent_exporters_count_as_attached() {
    let scratch = Scratch::new("jmp-core-idle");
    let dir = scratch.0.clone();
    let db = dir.join("leases.redb");
    let auth = authority();
    let (exp, c, lease) = {
        let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), ORPHAN_GRACE);
        let (exp, _, _link) = h.reporting_exporter("rpi4-01", &[("board", "rpi4")]).await;
        let c = h.client("c1", "", 0).await;
        let l = lease_of(
            h.call(&c, idle_req("r1", "board=rpi4", 600, Some(1), None))
                .await,
        );
        h.call(
            &exp,
            Request::InUse {
                lease: Some(l.name.clone()),
            },
        )
        .await;
        drop(h);
        tokio::time::sleep(Duration::from_millis(200)).await;
        (exp, c, l)
    };
    // A short grace after the load: idle ends wait that long for the exporters to register.
    let mut h = start(
        RedbStore::open(&db).unwrap(),
        auth,
        Duration::from_millis(300),
    );
    let shown = leases_of(&mut h, &c).await;
    assert!(shown[0].attached, "attached across the restart: {shown:?}");
    // The exporter registers again: its session left while the controller was down.
    let (_, mut link) = h
        .start_call(
            &exp,
            Request::Register(Registration {
                address: "127.0.0.1:9".into(),
                fingerprint: "sha256:11".into(),
                reports_in_use: true,
                attached: None,
                ..Default::default()
            }),
        )
        .await;
    let why = ended_reason(&mut link, &lease.name).await;
    assert!(why.contains("nothing used it"), "{why}");

    // An exporter that does not say: its lease counts as attached from the grant.
    let _silent = h.exporter("old-01", &[("board", "old")]).await;
    let l = lease_of(
        h.call(&c, idle_req("r2", "board=old", 600, Some(1), None))
            .await,
    );
    assert!(l.attached && l.idle_deadline.is_none(), "{l:?}");
}

fn access_claims(r: &Reply) -> jmp_protocol::token::Claims {
    match r {
        Reply::Access(a) => peek(&a.token).expect("a lease token"),
        other => panic!("{other:?}"),
    }
}

/// The latest push's shares of the exporter's current lease (waits for a push that has a
/// lease).
async fn pushed_shares(
    link: &mut mpsc::UnboundedReceiver<Reply>,
) -> Vec<jmp_protocol::api::ShareInfo> {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), link.recv())
            .await
            .expect("a push")
            .expect("the registration is open");
        if let Reply::ExporterState { lease: Some(l), .. } = r {
            // Drain to the newest: the pushes come in order.
            let mut shares = l.shares;
            while let Ok(r) = link.try_recv() {
                if let Reply::ExporterState { lease: Some(l), .. } = r {
                    shares = l.shares;
                }
            }
            return shares;
        }
    }
}

fn share(name: &str, with: &str, until: Option<u64>, control: bool) -> Request {
    Request::ShareLease {
        name: name.into(),
        with: with.into(),
        until,
        control,
    }
}

/// Issue 21 item 2: a lease shared with a colleague. The colleague gets a share's token for
/// that lease only while the share lasts and only while its own policy allows the exporter (a
/// share never grants what the colleague's policy forbids, checked when sharing and at each
/// use); the exporter is told who may attach beside the holder; only the holder shares and
/// unshares; `get leases` shows the shares, to the colleague too.
#[tokio::test]
async fn a_lease_is_shared_only_within_the_colleagues_policy_and_unshared() {
    use jmp_protocol::api::ShareInfo;
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let mut a = h.exporter("a-01", &[("board", "a")]).await;
    let _b = h.exporter("b-01", &[("board", "b")]).await;
    let holder = h.client("holder", "", 0).await;
    let colleague = h.client("colleague", "", 0).await;
    let only_b = h.client("only-b", "board=b", 0).await;
    let lease = lease_of(h.call(&holder, lease_req("l1", "board=a", 600, 0)).await);
    let name = lease.name.clone();

    // Not shared yet: the colleague gets nothing for it.
    let r = h.call(&colleague, access(&name)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");

    // A client whose policy forbids the exporter: refused, naming why.
    let r = h.call(&holder, share(&name, "only-b", None, false)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(
        format!("{r:?}").contains("policy of client only-b"),
        "{r:?}"
    );
    let r = h.call(&only_b, access(&name)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    // Nor with oneself, an unknown client, or an end already past.
    let r = h.call(&holder, share(&name, "holder", None, false)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
    let r = h.call(&holder, share(&name, "nobody", None, false)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    let r = h
        .call(&holder, share(&name, "colleague", Some(1_000), false))
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Invalid), "{r:?}");
    // Only the holder shares.
    let r = h
        .call(&colleague, share(&name, "colleague", None, true))
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");

    // Read-only: the exporter hears of it; the colleague's token says it is a share.
    let t0 = now_ms() / 1000;
    let l = lease_of(
        h.call(&holder, share(&name, "colleague", None, false))
            .await,
    );
    // Asked for no end, a share still ends at the colleague's longest lease (the default,
    // 1 h), even though this lease ends sooner: the lease may be extended past it later.
    let t1 = now_ms() / 1000;
    let until = l.shares[0].until.expect("a share always has an end");
    assert!(
        (t0 + 3600..=t1 + 3600).contains(&until),
        "{until} within {t0}+3600..{t1}+3600"
    );
    let ro = ShareInfo {
        client: "colleague".into(),
        until: Some(until),
        control: false,
    };
    assert_eq!(l.shares, vec![ro.clone()]);
    assert_eq!(pushed_shares(&mut a).await, vec![ro.clone()]);
    let c = access_claims(&h.call(&colleague, access(&name)).await);
    assert_eq!(c.sub, name);
    assert_eq!(c.client.as_deref(), Some("colleague"));
    assert_eq!(c.exporter.as_deref(), Some("a-01"));
    assert_eq!(c.share, Some(ShareClaim { control: false }));
    // With the lease (listed in whole seconds, the token's expiry rounded up).
    let exp = c.exp.expect("an expiry");
    assert!(
        exp == lease.end || exp == lease.end + 1,
        "{exp} vs {}",
        lease.end
    );
    // The holder's own token is no share's.
    let c = access_claims(&h.call(&holder, access(&name)).await);
    assert_eq!((c.client.as_deref(), c.share), (Some("holder"), None));
    // The colleague sees the lease it may attach to.
    let mine = leases_of(&mut h, &colleague).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].shares, vec![ro]);

    // Sharing again replaces the share: control, until a time; the token ends with it.
    let until = now_ms() / 1000 + 120;
    let l = lease_of(
        h.call(&holder, share(&name, "colleague", Some(until), true))
            .await,
    );
    let ctl = ShareInfo {
        client: "colleague".into(),
        until: Some(until),
        control: true,
    };
    assert_eq!(l.shares, vec![ctl.clone()]);
    assert_eq!(pushed_shares(&mut a).await, vec![ctl]);
    let c = access_claims(&h.call(&colleague, access(&name)).await);
    assert_eq!(c.share, Some(ShareClaim { control: true }));
    assert_eq!(c.exp, Some(until));

    // The colleague's policy narrowed after the share: its tokens are refused from then on.
    let admin = h.admin.clone();
    let r = h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                allow: Some("board=b".into()),
                ..update("colleague")
            }),
        )
        .await;
    assert!(matches!(r, Reply::Clients { .. }), "{r:?}");
    let r = h.call(&colleague, access(&name)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    // ... and the share itself ended: the exporter hears it is gone.
    assert_eq!(pushed_shares(&mut a).await, vec![]);
    assert!(leases_of(&mut h, &colleague).await.is_empty());
    let r = h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                allow: Some(String::new()),
                ..update("colleague")
            }),
        )
        .await;
    assert!(matches!(r, Reply::Clients { .. }), "{r:?}");
    // Allowed again, it is shared again (the narrowing ended the share for good).
    let r = h.call(&colleague, access(&name)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    lease_of(
        h.call(&holder, share(&name, "colleague", None, false))
            .await,
    );

    // Unshared: the exporter hears the share is gone; no more tokens.
    let r = h
        .call(
            &colleague,
            Request::UnshareLease {
                name: name.clone(),
                with: "colleague".into(),
            },
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    let l = lease_of(
        h.call(
            &holder,
            Request::UnshareLease {
                name: name.clone(),
                with: "colleague".into(),
            },
        )
        .await,
    );
    assert!(l.shares.is_empty(), "{l:?}");
    assert_eq!(pushed_shares(&mut a).await, vec![]);
    let r = h.call(&colleague, access(&name)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(leases_of(&mut h, &colleague).await.is_empty());
    let r = h
        .call(
            &holder,
            Request::UnshareLease {
                name,
                with: "colleague".into(),
            },
        )
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::NotFound), "{r:?}");
}

/// An exporter whose jmpd does not know shares would drop a share token's `share` claim and
/// admit the colleague as the holder: its leases are never shared, and a share made before an
/// older jmpd took its place gives no more tokens. A deleted client's shares end with it.
#[tokio::test]
async fn no_share_on_an_exporter_that_does_not_know_shares_nor_for_a_deleted_client() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let _old = h
        .exporter_registering("old-01", &[("board", "old")], Registration::default())
        .await;
    let mut new = h.exporter("new-01", &[("board", "new")]).await;
    let holder = h.client("holder", "", 0).await;
    let colleague = h.client("colleague", "", 0).await;
    let old = lease_of(h.call(&holder, lease_req("l1", "board=old", 600, 0)).await);
    let r = h
        .call(&holder, share(&old.name, "colleague", None, false))
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    assert!(format!("{r:?}").contains("does not know shares"), "{r:?}");

    // Shared on an exporter that knows shares; then its client is deleted.
    let l = lease_of(h.call(&holder, lease_req("l2", "board=new", 600, 0)).await);
    lease_of(
        h.call(&holder, share(&l.name, "colleague", None, false))
            .await,
    );
    assert_eq!(pushed_shares(&mut new).await.len(), 1);
    let admin = h.admin.clone();
    let r = h
        .call(
            &admin,
            Request::DeleteClient {
                name: "colleague".into(),
            },
        )
        .await;
    assert!(matches!(r, Reply::Deleted { .. }), "{r:?}");
    assert_eq!(pushed_shares(&mut new).await, vec![], "the exporter hears");
    // A client made later under the same name inherits nothing.
    let again = h.client("colleague", "", 0).await;
    let r = h.call(&again, access(&l.name)).await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    let _ = colleague;
}

/// A share is part of the lease's record: after a restart of the controller it is still
/// there, and still admits the colleague.
#[tokio::test]
async fn a_share_survives_a_controller_restart() {
    let scratch = Scratch::new("jmp-core-share");
    let dir = scratch.0.clone();
    let db = dir.join("leases.redb");
    let auth = authority();
    let (name, colleague, exporter, shared_until) = {
        let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), ORPHAN_GRACE);
        let (exporter, _, _a) = h.exporter_as("rpi4-01", &[("board", "rpi4")]).await;
        let holder = h.client("holder", "", 0).await;
        let colleague = h.client("colleague", "", 0).await;
        let l = lease_of(h.call(&holder, lease_req("r1", "board=rpi4", 600, 0)).await);
        let s = lease_of(
            h.call(&holder, share(&l.name, "colleague", None, true))
                .await,
        );
        let until = s.shares[0].until.expect("a share always has an end");
        (l.name, colleague, exporter, until)
    };
    // The old core drops the store once its command channel is gone: the file opens again
    // only then.
    let store = loop {
        match RedbStore::open(&db) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut h = start(store, auth, ORPHAN_GRACE);
    let mine = leases_of(&mut h, &colleague).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].name, name);
    // Tokens again once the exporter has registered with this controller and said it knows
    // shares (a new controller cannot know an exporter's jmpd before that).
    let (_, mut rx) = h
        .start_call(
            &exporter,
            Request::Register(Registration {
                address: "127.0.0.1:9".into(),
                fingerprint: "sha256:11".into(),
                admits_shares: true,
                ..Default::default()
            }),
        )
        .await;
    assert!(matches!(rx.recv().await, Some(Reply::ExporterState { .. })));
    assert_eq!(
        mine[0].shares,
        vec![jmp_protocol::api::ShareInfo {
            client: "colleague".into(),
            until: Some(shared_until),
            control: true,
        }]
    );
    let c = access_claims(
        &h.call(&colleague, Request::LeaseAccess { name: Some(name) })
            .await,
    );
    assert_eq!(c.share, Some(ShareClaim { control: true }));
}

/// `get-leases` gives each waiting request its place in the queue (what the lab dashboard
/// shows): 1 + the earlier requests competing for the same exporters; a lease has none.
#[tokio::test]
async fn listed_waiting_requests_carry_their_queue_position() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let _a = h.exporter("team-a-01", &[("team", "a")]).await;
    let _b = h.exporter("team-b-01", &[("team", "b")]).await;
    let any = h.client("any", "", 0).await;
    for (id, sel) in [("on-a", "team=a"), ("on-b", "team=b")] {
        assert!(matches!(
            h.call(&any, lease_req(id, sel, 600, 0)).await,
            Reply::Lease(_)
        ));
    }
    let mut waiting = Vec::new();
    for (id, sel) in [("a1", "team=a"), ("b1", "team=b"), ("a2", "team=a")] {
        let (_, mut r) = h.start_call(&any, lease_req(id, sel, 600, 300)).await;
        assert!(matches!(r.recv().await, Some(Reply::Queued { .. })));
        waiting.push(r);
    }
    let positions = match h.call(&any, Request::GetLeases { all: true }).await {
        Reply::Leases { leases } => {
            let mut v: Vec<(String, Option<u32>)> = leases
                .into_iter()
                .map(|l| (l.request_id, l.position))
                .collect();
            v.sort();
            v
        }
        r => panic!("{r:?}"),
    };
    let s = |x: &str| x.to_string();
    assert_eq!(
        positions,
        vec![
            (s("a1"), Some(1)),
            (s("a2"), Some(2)),
            (s("b1"), Some(1)),
            (s("on-a"), None),
            (s("on-b"), None),
        ]
    );
}

/// Issue 21: a share past its `--until` drops out on its own: the controller removes it at
/// that time (no share, unshare or lease end needed), the exporter hears, `get leases` no
/// longer lists it (the colleague no longer sees the lease), and the store keeps it removed
/// across a restart. (The core's clock is the wall clock, so this waits the share's 1-2 s;
/// every step awaits the event it checks.)
#[tokio::test]
async fn a_share_past_its_until_is_removed_pushed_and_stays_removed() {
    let scratch = Scratch::new("jmp-core-share-end");
    let dir = scratch.0.clone();
    let db = dir.join("leases.redb");
    let auth = authority();
    let (name, holder, colleague) = {
        let mut h = start(RedbStore::open(&db).unwrap(), auth.clone(), ORPHAN_GRACE);
        let mut a = h.exporter("a-01", &[("board", "a")]).await;
        let holder = h.client("holder", "", 0).await;
        let colleague = h.client("colleague", "", 0).await;
        let other = h.client("other", "", 0).await;
        let l = lease_of(h.call(&holder, lease_req("l1", "board=a", 600, 0)).await);
        let until = now_ms() / 1000 + 2;
        lease_of(
            h.call(&holder, share(&l.name, "colleague", Some(until), false))
                .await,
        );
        // A share asked for without an end (so ending at the colleague's limit) stays: only
        // the one past its end goes.
        let shared = lease_of(h.call(&holder, share(&l.name, "other", None, true)).await);
        let other_until = shared
            .shares
            .iter()
            .find(|x| x.client == "other")
            .and_then(|x| x.until);
        assert!(other_until.is_some(), "{shared:?}");
        let mut shares = pushed_shares(&mut a).await;
        assert_eq!(shares.len(), 2, "{shares:?}");
        while shares.len() == 2 {
            shares = pushed_shares(&mut a).await;
        }
        assert!(now_ms() / 1000 >= until, "not before its end");
        assert_eq!(
            shares,
            vec![jmp_protocol::api::ShareInfo {
                client: "other".into(),
                until: other_until,
                control: true,
            }]
        );
        let mine = leases_of(&mut h, &holder).await;
        assert_eq!(mine[0].shares, shares, "get leases lists what is left");
        assert!(
            leases_of(&mut h, &colleague).await.is_empty(),
            "the colleague no longer sees the lease"
        );
        let _ = other;
        (l.name, holder, colleague)
    };
    let store = loop {
        match RedbStore::open(&db) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut h = start(store, auth, ORPHAN_GRACE);
    let mine = leases_of(&mut h, &holder).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].name, name);
    assert_eq!(mine[0].shares.len(), 1, "{mine:?}");
    assert_eq!(mine[0].shares[0].client, "other");
    assert!(leases_of(&mut h, &colleague).await.is_empty());
}

/// Issue 21: a share never lasts longer than the colleague may hold a lease of its own (its
/// policy's `max_duration`): an `--until` beyond is refused naming the limit; a share with no
/// end on a lease that outlasts the limit ends at the limit; and when an admin shortens the
/// colleague's limit later, its shares are shortened with it and the exporter hears.
#[tokio::test]
async fn a_share_is_bounded_by_the_colleagues_longest_lease() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let mut a = h.exporter("a-01", &[("board", "a")]).await;
    let holder = h.client("holder", "", 0).await;
    let _short = h.client("short", "", 300).await;
    let _long = h.client("long", "", 0).await;
    let l = lease_of(h.call(&holder, lease_req("l1", "board=a", 3000, 0)).await);
    let t0 = now_ms() / 1000;
    let r = h
        .call(&holder, share(&l.name, "short", Some(t0 + 400), false))
        .await;
    assert_eq!(code(&r), Some(CtlErrorCode::Forbidden), "{r:?}");
    let msg = format!("{r:?}");
    assert!(
        msg.contains("client short") && msg.contains("longest lease is 5m"),
        "{msg}"
    );
    // Within the limit: as asked.
    let s = lease_of(
        h.call(&holder, share(&l.name, "short", Some(t0 + 200), false))
            .await,
    );
    assert_eq!(s.shares[0].until, Some(t0 + 200));
    // No end asked: the limit, since the lease outlasts it.
    let s = lease_of(h.call(&holder, share(&l.name, "short", None, false)).await);
    let t1 = now_ms() / 1000;
    let until = s.shares[0].until.expect("an end");
    assert!(
        (t0 + 300..=t1 + 300).contains(&until),
        "{until} within {t0}+300..{t1}+300"
    );
    // A colleague whose limit (the default, 1 h) is beyond the lease: still its limit, not
    // open-ended, so a later extension of the lease does not stretch the share with it.
    let s = lease_of(h.call(&holder, share(&l.name, "long", None, false)).await);
    let t1b = now_ms() / 1000;
    let long = s.shares.iter().find(|x| x.client == "long").unwrap();
    let long_until = long.until.expect("a share always has an end");
    assert!(
        (t1 + 3600..=t1b + 3600).contains(&long_until),
        "{long_until} within {t1}+3600..{t1b}+3600"
    );
    assert_eq!(pushed_shares(&mut a).await.len(), 2);
    // The admin shortens its limit: its share is shortened too, and the exporter hears.
    let admin = h.admin.clone();
    let r = h
        .call(
            &admin,
            Request::UpdateClient(jmp_protocol::api::ClientUpdate {
                max_duration_secs: Some(120),
                ..update("long")
            }),
        )
        .await;
    assert!(matches!(r, Reply::Clients { .. }), "{r:?}");
    let t2 = now_ms() / 1000;
    let pushed = pushed_shares(&mut a).await;
    let long = pushed.iter().find(|x| x.client == "long").unwrap();
    let until = long.until.expect("an end now");
    assert!(
        (t1 + 120..=t2 + 120).contains(&until),
        "{until} within {t1}+120..{t2}+120"
    );
    let short = pushed.iter().find(|x| x.client == "short").unwrap();
    assert_eq!(
        short.until, s.shares[0].until,
        "the other share is as it was"
    );
}

/// The bypass a review found: a share asked for without an end, on a lease that then ended
/// before the colleague's limit, was stored open-ended, so extending the lease afterwards
/// let the colleague use the board past its own policy's longest lease. The share keeps the
/// colleague's limit through an extension, and the exporter is told that end.
#[tokio::test]
async fn a_share_stays_within_the_colleagues_limit_when_the_lease_is_extended() {
    let mut h = start(MemStore::default(), authority(), ORPHAN_GRACE);
    let mut a = h.exporter("a-01", &[("board", "a")]).await;
    let holder = h.client("holder", "", 0).await;
    let _short = h.client("short", "", 300).await;
    let l = lease_of(h.call(&holder, lease_req("l1", "board=a", 200, 0)).await);
    let t0 = now_ms() / 1000;
    let s = lease_of(h.call(&holder, share(&l.name, "short", None, false)).await);
    let t1 = now_ms() / 1000;
    let until = s.shares[0].until.expect("a share always has an end");
    assert!(
        (t0 + 300..=t1 + 300).contains(&until),
        "{until} within {t0}+300..{t1}+300"
    );
    assert_eq!(pushed_shares(&mut a).await[0].until, Some(until));
    // The holder (policy: 1 h) extends the lease well past the colleague's 5 minutes.
    let r = h
        .call(
            &holder,
            Request::UpdateLease {
                name: l.name.clone(),
                duration_secs: None,
                extend_secs: Some(3000),
            },
        )
        .await;
    let extended = lease_of(r);
    assert!(extended.end > until + 2000, "{extended:?}");
    assert_eq!(extended.shares[0].until, Some(until), "{extended:?}");
    let mine = leases_of(&mut h, &holder).await;
    assert_eq!(mine[0].shares[0].until, Some(until), "{mine:?}");
}

/// A scratch directory for a store file, removed when the test ends, failed or not.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
