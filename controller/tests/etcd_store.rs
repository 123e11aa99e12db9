//! The etcd store against a real etcd (one member on a loopback port, started and stopped by
//! this test with the e2e harness): compare-and-swap on the store revision, fencing of a
//! controller that lost the leader key, commits larger than one etcd transaction, and the load
//! that finishes a large commit its controller did not finish applying.

use jmp_controller::etcd::{prefix_end, Etcd, EtcdStore, Fence};
use jmp_controller::store::{LeaseStore, Op, StoreError, Table};
use std::time::{Duration, Instant};

fn put(t: Table, k: &str, v: &str) -> Op {
    Op::Put {
        table: t,
        key: k.into(),
        value: v.as_bytes().to_vec(),
    }
}

/// The leader key (re)created: its creation revision, which fences every write.
async fn try_make_leader(etcd: &Etcd, key: &[u8]) -> Result<i64, String> {
    let key = key.to_vec();
    etcd.run(|mut c| {
        let k = key.clone();
        async move { c.delete(k, None).await }
    })
    .await?;
    let r = etcd
        .run(|mut c| {
            let k = key.clone();
            async move { c.put(k, "x", None).await }
        })
        .await?;
    Ok(r.header().map(|h| h.revision()).unwrap_or(0))
}

async fn make_leader(etcd: &Etcd, key: &[u8]) -> i64 {
    try_make_leader(etcd, key).await.expect("leader key")
}

#[test]
fn the_etcd_store_is_atomic_fenced_and_finishes_what_a_dead_leader_left() {
    jmp_e2e::require!(jmp_e2e::cluster::etcd_installed());
    // One member on loopback ports, killed by PID and its data removed when the test ends.
    let dir = jmp_e2e::TempDir::new("etcd-store");
    let member = jmp_e2e::cluster::Etcd::start(dir.path(), dir.path(), 1);
    let members = vec![format!("http://127.0.0.1:{}", member.members[0].client)];
    let prefix = "/store-test";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(Etcd::connect(&members, prefix)).unwrap();
    let leader_key = etcd.key("leader");
    // etcd answers once it has elected itself.
    let t0 = Instant::now();
    let rev_a = loop {
        match rt.block_on(try_make_leader(&etcd, &leader_key)) {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "etcd never answered: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };

    let mut a = EtcdStore::open(
        &members,
        prefix,
        Fence {
            key: leader_key.clone(),
            create_revision: rev_a,
        },
    )
    .unwrap();
    let s = a.load().unwrap();
    assert_eq!(s.revision, 0);
    assert!(s.records.is_empty());
    let r1 = a
        .commit(
            0,
            &[
                put(Table::Leases, "l1", "{}"),
                put(Table::Clients, "c", "{}"),
            ],
        )
        .unwrap();
    assert!(r1 > 0);
    // A stale revision changes nothing.
    match a.commit(0, &[put(Table::Leases, "l2", "{}")]) {
        Err(StoreError::Conflict { expected: 0, found }) => assert_eq!(found, r1),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Larger than one etcd transaction (128 operations): staged, still atomic.
    let big: Vec<Op> = (0..300)
        .map(|i| {
            put(
                Table::Exporters,
                &format!("e{i:03}"),
                &format!("{{\"i\":{i}}}"),
            )
        })
        .chain([Op::Delete {
            table: Table::Leases,
            key: "l1".into(),
        }])
        .collect();
    let r2 = a.commit(r1, &big).unwrap();
    assert!(r2 > r1);
    let s = a.load().unwrap();
    assert_eq!(s.revision, r2);
    assert_eq!(s.records.len(), 301, "300 exporters and the client");
    assert!(!s
        .records
        .iter()
        .any(|(t, k, _)| *t == Table::Leases && k == "l1"));
    let stage = etcd.key("stage/");
    let left = rt
        .block_on(
            etcd.get(
                stage.clone(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_range(prefix_end(&stage))
                        .with_count_only(),
                ),
            ),
        )
        .unwrap();
    assert_eq!(
        left.count(),
        0,
        "a finished large commit leaves no staged parts"
    );

    // Another controller takes the leader key: everything `a` writes from now on is refused,
    // even though nobody else has written yet.
    let rev_b = rt.block_on(make_leader(&etcd, &leader_key));
    match a.commit(r2, &[put(Table::Leases, "late", "{}")]) {
        Err(StoreError::Fenced(why)) => assert!(why.contains("leader"), "{why}"),
        other => panic!("a deposed leader's commit went through: {other:?}"),
    }
    let mut b = EtcdStore::open(
        &members,
        prefix,
        Fence {
            key: leader_key.clone(),
            create_revision: rev_b,
        },
    )
    .unwrap();
    let s = b.load().unwrap();
    assert_eq!(s.revision, r2, "the deposed leader wrote nothing");
    assert!(!s.records.iter().any(|(_, k, _)| k == "late"));

    // A large commit whose controller died after its commit point, before applying it; and
    // parts of one that never reached its commit point.
    let part = serde_json::json!([
        {"key": format!("{prefix}/t/leases/s1"), "value": "{\"staged\":true}"},
        {"key": format!("{prefix}/t/exporters/e000")}
    ]);
    let meta = serde_json::json!({"commit": "dead", "staged": {"id": "dead", "parts": 1}});
    let (pk, mk, gk) = (
        etcd.key("stage/dead/000000"),
        etcd.key("meta"),
        etcd.key("stage/never/000000"),
    );
    rt.block_on(etcd.run(|mut c| {
        let (pk, mk, gk) = (pk.clone(), mk.clone(), gk.clone());
        let (part, meta) = (part.to_string(), meta.to_string());
        async move {
            c.put(pk, part, None).await?;
            c.put(gk, "[]", None).await?;
            c.put(mk, meta, None).await
        }
    }))
    .unwrap();
    let s = b.load().unwrap();
    assert!(
        s.records
            .iter()
            .any(|(t, k, v)| *t == Table::Leases && k == "s1" && v == b"{\"staged\":true}"),
        "the committed large change was finished"
    );
    assert!(!s
        .records
        .iter()
        .any(|(t, k, _)| *t == Table::Exporters && k == "e000"));
    assert_eq!(s.records.len(), 301);
    let left = rt
        .block_on(
            etcd.get(
                stage.clone(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_range(prefix_end(&stage))
                        .with_count_only(),
                ),
            ),
        )
        .unwrap();
    assert_eq!(left.count(), 0, "staged parts are gone after the load");
    // And commits go on from the revision that load returned.
    b.commit(s.revision, &[put(Table::Waiting, "w", "{}")])
        .unwrap();
}
