//! A lab of several controllers on a real etcd cluster: etcd members (Debian's etcd-server) on
//! loopback ports, started, killed and restarted by the test, and `jmp-controller`s with
//! `--store etcd://...` sharing one identity (signing key, TLS identity, admin credential), as
//! the README tells operators to set them up.

use crate::lab::{start_controller_with, Controller, LONG};
use crate::*;
use std::path::{Path, PathBuf};

/// `Ok` if etcd can run here (`scripts/install-test-deps.sh` installs etcd-server and
/// etcd-client), for [`require!`](crate::require).
pub fn etcd_installed() -> Result<(), String> {
    crate::skips::tool("etcd")?;
    crate::skips::tool("etcdctl")?;
    Ok(())
}

pub struct EtcdMember {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    pub data: PathBuf,
    pub proc: Option<Proc>,
}

/// An etcd cluster of loopback members, each a child process killed by PID when dropped.
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    logs: PathBuf,
    initial: String,
    token: String,
}

impl Etcd {
    /// Starts `n` members under `root` and waits until the cluster answers.
    pub fn start(root: &Path, logs: &Path, n: usize) -> Etcd {
        Self::try_start(root, logs, n).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Etcd::start`], with an error instead of a panic.
    pub fn try_start(root: &Path, logs: &Path, n: usize) -> Result<Etcd, crate::proc::Error> {
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client: free_tcp_port(),
                peer: free_tcp_port(),
                data: root.join(format!("etcd-m{i}")),
                proc: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd {
            members,
            logs: logs.to_path_buf(),
            initial,
            token: unique("jmp-etcd"),
        };
        for i in 0..n {
            e.spawn(i, "new")?;
        }
        e.try_wait_healthy()?;
        Ok(e)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), crate::proc::Error> {
        let m = &self.members[i];
        let mut cmd = command("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.peer
            ))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--initial-cluster-state={state}"))
            .args(["--logger=zap", "--log-level=warn"]);
        let label = format!("etcd-{}", m.name);
        let p = Proc::start(&label, cmd, &self.logs, Options::default())?;
        self.members[i].proc = Some(p);
        Ok(())
    }

    /// `etcd://127.0.0.1:C1,...` for `--store`.
    pub fn url(&self) -> String {
        format!(
            "etcd://{}",
            self.members
                .iter()
                .map(|m| format!("127.0.0.1:{}", m.client))
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    fn live_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl ARGS` against the live members.
    pub fn ctl(&self, args: &[&str]) -> RunOutput {
        let mut c = command("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.live_endpoints()))
            .args(["--command-timeout=3s"])
            .args(args);
        run("etcdctl", c, &self.logs, READY)
    }

    pub fn wait_healthy(&self) {
        self.try_wait_healthy().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_wait_healthy(&self) -> Result<(), crate::proc::Error> {
        if poll_until(LONG, || self.ctl(&["endpoint", "health"]).status.success()) {
            return Ok(());
        }
        let o = self.ctl(&["endpoint", "health"]);
        Err(crate::proc::Error(format!(
            "etcd never became healthy: {}\n{}",
            o.stdout, o.stderr
        )))
    }

    /// The value of a key (`None` if absent or etcd does not answer).
    pub fn get(&self, key: &str) -> Option<String> {
        let o = self.ctl(&["get", "--print-value-only", key]);
        let v = o.stdout.trim().to_string();
        (o.status.success() && !v.is_empty()).then_some(v)
    }

    /// The member that is etcd's own raft leader.
    pub fn raft_leader(&self) -> Option<usize> {
        let o = self.ctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).ok()?;
        let arr = v.as_array()?;
        for s in arr {
            let st = &s["Status"];
            if st["header"]["member_id"] == st["leader"] {
                let ep = s["Endpoint"].as_str()?;
                return self
                    .members
                    .iter()
                    .position(|m| ep.ends_with(&format!(":{}", m.client)));
            }
        }
        None
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9();
        }
    }

    /// Starts a killed member again on its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].proc.is_none(), "member {i} is running");
        self.spawn(i, "existing").unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The controllers of one test, sharing an etcd prefix and one identity.
pub struct Controllers {
    pub store: String,
    pub prefix: String,
    pub root: PathBuf,
    pub logs: PathBuf,
    pub ctls: Vec<Option<Controller>>,
    /// The QUIC listen address of each (fixed, so a restarted controller is where clients and
    /// credentials expect it).
    pub listen: Vec<String>,
}

impl Controllers {
    /// Starts `n` controllers: the first alone (it creates the identity and, as the first
    /// leader, the admin credential), then the others with copies of its identity.
    pub fn start(etcd: &Etcd, root: &Path, logs: &Path, n: usize) -> Controllers {
        let mut c = Controllers {
            store: etcd.url(),
            prefix: format!("/{}", unique("jmp")),
            root: root.to_path_buf(),
            logs: logs.to_path_buf(),
            ctls: (0..n).map(|_| None).collect(),
            listen: (0..n)
                .map(|_| format!("127.0.0.1:{}", free_udp_port()))
                .collect(),
        };
        c.spawn(0);
        let admin = c.data(0).join("admin.yaml");
        assert!(
            poll_until(LONG, || admin.is_file()),
            "the first controller never became leader and wrote {}: {}",
            admin.display(),
            c.ctls[0]
                .as_mut()
                .map(|x| x.proc.describe())
                .unwrap_or_default()
        );
        for i in 1..n {
            let d = c.data(i);
            std::fs::create_dir_all(d.join("tls")).expect("mkdir");
            for f in ["signing.key", "admin.yaml"] {
                std::fs::copy(c.data(0).join(f), d.join(f)).expect("copy identity");
            }
            for e in std::fs::read_dir(c.data(0).join("tls")).expect("tls dir") {
                let e = e.expect("entry");
                std::fs::copy(e.path(), d.join("tls").join(e.file_name())).expect("copy tls");
            }
            c.spawn(i);
        }
        c
    }

    pub fn data(&self, i: usize) -> PathBuf {
        self.root.join(format!("controller-{i}"))
    }

    pub fn spawn(&mut self, i: usize) {
        let data = self.data(i);
        let ctl = start_controller_with(
            &self.logs,
            &data,
            &self.listen[i],
            &["--store", &self.store, "--etcd-prefix", &self.prefix],
        );
        self.ctls[i] = Some(ctl);
    }

    /// Every controller's address, as a client config lists them.
    pub fn endpoints(&self) -> String {
        self.listen.join(",")
    }

    pub fn admin_file(&self) -> PathBuf {
        self.data(0).join("admin.yaml")
    }

    /// The index of the controller etcd names as leader.
    pub fn leader(&self, etcd: &Etcd) -> Option<usize> {
        let v = etcd.get(&format!("{}/leader", self.prefix))?;
        let v: serde_json::Value = serde_json::from_str(&v).ok()?;
        let addr = v["addr"].as_str()?;
        self.listen.iter().position(|l| l == addr)
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.ctls[i].take() {
            c.proc.kill9();
        }
    }

    pub fn stderr(&self, i: usize) -> String {
        self.ctls[i]
            .as_ref()
            .map(|c| c.proc.stderr())
            .unwrap_or_default()
    }
}
