//! Controllers on etcd (`jmp-bench etcd`): the controller benchmark's lease round trip and
//! 1,000-request burst against 10,000 exporters, on a three-member etcd cluster and on the
//! embedded redb store in the same run (interleaved, each round on fresh controllers), then
//! failover: three controllers on etcd, one `jmpd`, the leader killed with -9 ten times; the
//! figure is the time from the kill to the next lease granted to a client that started asking
//! at the kill (any controller, following redirects, as `jmp` does).
//!
//! etcd runs with its defaults (fsync on every commit, 100 ms heartbeat, 1 s election timeout)
//! on loopback, sharing the machine's two cores with the controllers and the clients.

use crate::controller::{phase_round_trip, phase_scale, Figures};
use crate::jmp::Bins;
use crate::proc::{command, free_port, Options, Proc, TempDir};
use crate::stats::{cell, json, median, percentile, Target};
use anyhow::{anyhow, bail, Context, Result};
use jmp_e2e::cluster::{etcd_installed, Etcd};
use jmp_e2e::lab::Controller;
use jmp_protocol::api::{Call, ClientConfig, ExporterSpec, LeaseRequest, Reply, Request};
use jmp_transport::controller::{CallError, Controllers};
use jmp_transport::Fingerprint;
use std::path::Path;
use std::time::{Duration, Instant};

pub const KILLS: usize = 10;

fn etcd_args(etcd: &Etcd, prefix: &str) -> Vec<String> {
    vec![
        "--store".into(),
        etcd.url(),
        "--etcd-prefix".into(),
        prefix.into(),
    ]
}

fn spawn_ctl(
    bins: &Bins,
    data: &Path,
    listen: &str,
    extra: &[String],
    logs: &Path,
) -> Result<Controller> {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Ok(Controller::start(
        &bins.controller,
        logs,
        data,
        listen,
        &extra,
    )?)
}

fn copy_identity(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.join("tls"))?;
    for f in ["signing.key", "admin.yaml"] {
        std::fs::copy(from.join(f), to.join(f)).with_context(|| format!("copy {f}"))?;
    }
    for e in std::fs::read_dir(from.join("tls"))? {
        let e = e?;
        std::fs::copy(e.path(), to.join("tls").join(e.file_name()))?;
    }
    Ok(())
}

/// Which controller answers calls (the others say NotLeader).
async fn leader(listens: &[String], pin: Fingerprint, admin: &str) -> Option<usize> {
    for (i, l) in listens.iter().enumerate() {
        let Ok(one) = Controllers::new(l, pin) else {
            continue;
        };
        let call = Call {
            credential: admin.to_string(),
            request: Request::Whoami,
        };
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            one.connect().await?;
            let conn = one.connection().ok_or(CallError::NoAnswer)?;
            jmp_transport::controller::call_once(&conn, &call).await
        })
        .await;
        one.close();
        if matches!(r, Ok(Ok(Reply::Identity { .. }))) {
            return Some(i);
        }
    }
    None
}

/// Kill → next grant, `KILLS` times. Returns the samples in ms.
fn failover(bins: &Bins, etcd: &Etcd, rt: &tokio::runtime::Runtime) -> Result<Vec<f64>> {
    let dir = TempDir::new("failover");
    let extra = etcd_args(etcd, "/jmp-bench-failover");
    let listen: Vec<String> = (0..3)
        .map(|_| Ok(format!("127.0.0.1:{}", free_port()?)))
        .collect::<Result<_>>()?;
    let data = |i: usize| dir.join(format!("c{i}"));
    let mut ctls: Vec<Option<Controller>> = Vec::new();
    ctls.push(Some(spawn_ctl(
        bins,
        &data(0),
        &listen[0],
        &extra,
        dir.path(),
    )?));
    let admin_file = data(0).join("admin.yaml");
    let t0 = Instant::now();
    while !admin_file.exists() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the first controller never became leader");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, l) in listen.iter().enumerate().skip(1) {
        copy_identity(&data(0), &data(i))?;
        ctls.push(Some(spawn_ctl(bins, &data(i), l, &extra, dir.path())?));
    }
    let admin: ClientConfig = serde_norway::from_str(&std::fs::read_to_string(&admin_file)?)?;
    let pin: Fingerprint = admin
        .fingerprint
        .parse()
        .map_err(|e: String| anyhow!("admin fingerprint: {e}"))?;
    let all = listen.join(",");
    let api = Controllers::new(&all, pin).map_err(|e| anyhow!(e))?;
    let ask = |r: Request| {
        let c = Call {
            credential: admin.token.clone(),
            request: r,
        };
        let api = &api;
        async move { api.call_once(&c).await }
    };
    // One exporter (a real jmpd, which follows the leader), one client.
    std::thread::sleep(Duration::from_secs(2)); // every controller a member: credentials name all
    let cred = rt.block_on(ask(Request::CreateExporter(ExporterSpec {
        name: "fo".into(),
        labels: [("board".to_string(), "fo".to_string())].into(),
    })))?;
    let Reply::Credential(cred) = cred else {
        bail!("CreateExporter answered {cred:?}")
    };
    let token = dir.join("fo.token");
    std::fs::write(&token, &cred.token)?;
    let cfg = dir.join("fo.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: fo}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  console: {{type: sim-console}}\n",
            dir.join("fo-state").display(),
            token.display()
        ),
    )?;
    let _jmpd = Proc::start(
        "jmpd",
        command(&bins.jmpd).arg("--config").arg(&cfg),
        dir.path(),
        Options::LOG,
    )?;
    let mut samples = Vec::new();
    let mut n = 0u64;
    // A grant: a fresh client (like a `jmp create lease` process) asking any controller.
    let grant = |n: u64| {
        let c = Call {
            credential: admin.token.clone(),
            request: Request::CreateLease(LeaseRequest {
                request_id: format!("fo-{n}"),
                selector: "board=fo".into(),
                duration_secs: 60,
                ..Default::default()
            }),
        };
        let all = all.clone();
        async move {
            let fresh = Controllers::new(&all, pin).map_err(|e| anyhow!(e))?;
            let r = fresh.call_once(&c).await;
            fresh.close();
            match r {
                Ok(Reply::Lease(l)) => Ok(Some(l.name)),
                Ok(other) => bail!("CreateLease answered {other:?}"),
                Err(_) => Ok(None),
            }
        }
    };
    // Wait until the exporter is online and leasable.
    let t0 = Instant::now();
    loop {
        n += 1;
        if let Some(l) = rt.block_on(grant(n))? {
            rt.block_on(ask(Request::DeleteLease {
                names: vec![l],
                all: false,
            }))?;
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the exporter never became leasable");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every kill comes 2 s after the previous event (here: the exporter coming online), as
    // between kills below: a connection younger than about a second has no RTT samples yet,
    // and QUIC's idle timeout is then at least three of its long initial probe timeouts (about
    // 4 s instead of 3 s), which is not the steady state being measured.
    std::thread::sleep(Duration::from_secs(2));
    for k in 1..=KILLS {
        let Some(idx) = rt.block_on(leader(&listen, pin, &admin.token)) else {
            bail!("no controller answers as leader before kill {k}");
        };
        let victim = ctls[idx]
            .take()
            .ok_or_else(|| anyhow!("the leader {idx} is not running"))?;
        let pid = victim.proc.pid();
        let t_kill = Instant::now();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let granted = loop {
            n += 1;
            if let Some(l) = rt.block_on(grant(n))? {
                break (t_kill.elapsed(), l);
            }
            if t_kill.elapsed() > Duration::from_secs(60) {
                bail!("no grant within 60 s of kill {k}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        samples.push(ms(granted.0));
        eprintln!(
            "  failover {k}/{KILLS}: {:.0} ms (controller {idx} killed at unix {wall:.3})",
            ms(granted.0)
        );
        rt.block_on(ask(Request::DeleteLease {
            names: vec![granted.1],
            all: false,
        }))?;
        drop(victim);
        ctls[idx] = Some(spawn_ctl(
            bins,
            &data(idx),
            &listen[idx],
            &extra,
            dir.path(),
        )?);
        // Let the restarted one become a member again before the next kill.
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(samples)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `only_failover`: skip the store comparison (`jmp-bench etcd-failover`).
pub fn run(bins: &Bins, rounds: usize, only_failover: bool) -> Result<(String, serde_json::Value)> {
    etcd_installed().map_err(|e| anyhow!("SKIP: {e}"))?;
    let rounds = rounds.clamp(1, 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = TempDir::new("etcd");
    let etcd = Etcd::try_start(dir.path(), dir.path(), 3)?;
    let (mut redb, mut on_etcd) = (Figures::default(), Figures::default());
    for r in 0..if only_failover { 0 } else { rounds } {
        eprintln!("  etcd round {}/{rounds}", r + 1);
        let extra = etcd_args(&etcd, &format!("/jmp-bench-{r}"));
        phase_round_trip(&rt, bins, &mut redb, &[])?;
        phase_round_trip(&rt, bins, &mut on_etcd, &extra)?;
        let extra = etcd_args(&etcd, &format!("/jmp-bench-scale-{r}"));
        phase_scale(&rt, bins, &mut redb, &[])?;
        phase_scale(&rt, bins, &mut on_etcd, &extra)?;
    }
    let fo = failover(bins, &etcd, &rt)?;
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(report(&redb, &on_etcd, &fo, rounds))
}

fn report(
    redb: &Figures,
    etcd: &Figures,
    fo: &[f64],
    rounds: usize,
) -> (String, serde_json::Value) {
    let p = |v: &[f64], q: f64| percentile(v, q);
    let burst = |f: &Figures| median(&f.bursts.iter().map(|b| b.total_ms).collect::<Vec<_>>());
    let burst_lat = |f: &Figures, q: f64| {
        p(
            &f.bursts
                .iter()
                .flat_map(|b| b.latency.clone())
                .collect::<Vec<_>>(),
            q,
        )
    };
    let rows: Vec<(&str, f64, f64, usize)> = vec![
        (
            "API grant p50 (ms), 1 exporter",
            p(&redb.api.0, 50.0),
            p(&etcd.api.0, 50.0),
            2,
        ),
        (
            "API grant p99 (ms), 1 exporter",
            p(&redb.api.0, 99.0),
            p(&etcd.api.0, 99.0),
            2,
        ),
        (
            "API grant p50 (ms), 10,000 exporters",
            p(&redb.scale_api.0, 50.0),
            p(&etcd.scale_api.0, 50.0),
            2,
        ),
        (
            "API grant p99 (ms), 10,000 exporters",
            p(&redb.scale_api.0, 99.0),
            p(&etcd.scale_api.0, 99.0),
            2,
        ),
        (
            "burst of 1,000 answered (ms, median of rounds)",
            burst(redb),
            burst(etcd),
            0,
        ),
        (
            "burst per-request p50 (ms)",
            burst_lat(redb, 50.0),
            burst_lat(etcd, 50.0),
            1,
        ),
        (
            "burst per-request p99 (ms)",
            burst_lat(redb, 99.0),
            burst_lat(etcd, 99.0),
            1,
        ),
    ];
    let mut md = format!(
        "### Controllers on etcd\n\nRelease `jmp-controller` on a three-member etcd cluster \
         (Debian's etcd 3.4, defaults, loopback) and on the embedded redb store, interleaved, \
         {rounds} round(s) on fresh controllers; latency percentiles over all rounds' samples.\n\n\
         | figure | embedded (redb) | etcd | etcd / embedded |\n|---|---:|---:|---:|\n"
    );
    for (name, a, b, d) in &rows {
        md += &format!(
            "| {name} | {} | {} | {} |\n",
            cell(*a, *d),
            cell(*b, *d),
            cell(b / a, 2)
        );
    }
    let fo_p50 = median(fo);
    let fo_max = fo.iter().copied().fold(f64::NAN, f64::max);
    md += &format!(
        "\nFailover (3 controllers, leader killed with -9, {} kills): kill → next grant p50 {} ms, \
         worst {} ms; samples: {}.\n\n",
        fo.len(),
        cell(fo_p50, 0),
        cell(fo_max, 0),
        fo.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
    );
    let (t_grant, t_burst, t_fo) = (
        Target::AtMost(10.0),
        Target::AtMost(3000.0),
        Target::AtMost(5000.0),
    );
    let grant = p(&etcd.scale_api.0, 50.0).max(p(&etcd.api.0, 50.0));
    md += "| target | figure | target | verdict |\n|---|---:|---|---|\n";
    md += &format!(
        "| etcd grant p50 (ms, worse of 1 and 10,000 exporters) | {} | {} | **{}** |\n",
        cell(grant, 2),
        t_grant.describe(),
        t_grant.verdict(grant)
    );
    md += &format!(
        "| etcd burst of 1,000 (ms) | {} | {} | **{}** |\n",
        cell(burst(etcd), 0),
        t_burst.describe(),
        t_burst.verdict(burst(etcd))
    );
    md += &format!(
        "| failover, worst of {} kills (ms) | {} | {} | **{}** |\n",
        fo.len(),
        cell(fo_max, 0),
        t_fo.describe(),
        t_fo.verdict(fo_max)
    );
    let errors: Vec<String> = etcd.bursts.iter().flat_map(|b| b.errors.clone()).collect();
    if let Some(e) = errors.first() {
        md += &format!("\netcd burst errors ({}), first: {e}\n", errors.len());
    }
    let js = serde_json::json!({
        "rounds": rounds,
        "rows": rows.iter().map(|(n, a, b, _)| serde_json::json!({"what": n, "redb": json(*a), "etcd": json(*b)})).collect::<Vec<_>>(),
        "failover_ms": fo.iter().map(|v| json(*v)).collect::<Vec<_>>(),
        "failover_p50_ms": json(fo_p50),
        "failover_max_ms": json(fo_max),
        "etcd_burst_errors": errors,
    });
    (md, js)
}
