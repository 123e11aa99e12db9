//! Another mount namespace holding a copy of an attachment's FUSE mount (`unshare -m`, `ip
//! netns exec`, a container or CI runner started while the attachment ran) must not keep the
//! attachment alive: at lease end and at `jmp local stop` it removes its devices and exits on
//! its own, leaving no mount here, and the copy over there is dead.

use jmp_e2e::lab::*;
use jmp_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A process in a private mount namespace made while the mount existed (so it holds a copy);
/// killed by PID on drop (through `Proc`).
struct Holder(Proc);

impl Holder {
    fn start(logs: &Path) -> Holder {
        assert!(which("unshare").is_some(), "unshare (util-linux) is needed");
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("echo ready; exec sleep 600");
        let mut p = Proc::spawn("mount-ns-holder", c, logs);
        p.expect_line(READY, "the holder's ready line", |l| l == "ready");
        Holder(p)
    }

    fn has_mount(&self, path: &Path) -> bool {
        listed(&format!("/proc/{}/mountinfo", self.0.pid()), path)
    }

    /// Listed there, and not dead: the connection is still served.
    fn holds_live(&self, path: &Path) -> bool {
        let rel = path.strip_prefix("/").expect("absolute");
        let there = PathBuf::from(format!("/proc/{}/root", self.0.pid())).join(rel);
        self.has_mount(path)
            && !std::fs::read_dir(&there).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
    }
}

fn listed(mountinfo: &str, path: &Path) -> bool {
    let table = std::fs::read_to_string(mountinfo).expect("mountinfo");
    let want = path.to_string_lossy();
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

fn mounted_here(path: &Path) -> bool {
    listed("/proc/self/mountinfo", path)
}

/// Lazily unmounts whatever a failing test left at `path`.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted_here(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn needs_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is needed");
}

#[test]
fn local_stop_is_not_held_up_by_another_mount_namespace() {
    needs_fuse();
    let env = TestEnv::new("mntns-local");
    let mut cmd = env.jmp();
    cmd.args(["local", "start", "-o", "json", "--dev-dir"])
        .arg(&env.dev);
    let mut start = Proc::spawn("jmp-local-start", cmd, &env.logs);
    let line = start.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert!(start.expect_exit(READY).success(), "{}", start.describe());
    let pid = v["pid"].as_i64().expect("pid") as i32;
    let mut guard = DaemonGuard {
        env: &env,
        pid,
        stop_args: vec!["local".into(), "stop".into()],
        stopped: false,
    };
    let sd = PathBuf::from(local_of(&v, "sd"));
    let _u = Unmount(sd.clone());
    assert!(mounted_here(&sd), "{} is mounted", sd.display());
    let status = run(
        "jmp-status",
        {
            let mut c = env.jmp();
            c.args(["status", "-o", "json"]);
            c
        },
        &env.logs,
        READY,
    );
    let st: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    let log = PathBuf::from(st[0]["log"].as_str().expect("a log file"));

    let holder = Holder::start(&env.logs);
    assert!(
        holder.holds_live(&sd),
        "the other namespace holds a live copy"
    );

    let out = guard.stop();
    assert!(out.status.success(), "jmp local stop: {}", show(&out));
    assert!(
        !out.stderr.contains("killing it"),
        "the attachment had to be killed: {}",
        out.stderr
    );
    assert!(!pid_alive(pid), "the attachment has exited");
    let log = std::fs::read_to_string(&log).expect("the attachment's log");
    assert!(
        log.contains("local devices removed"),
        "the attachment removed its devices itself: {log}"
    );
    assert!(!mounted_here(&sd), "{} is still mounted here", sd.display());
    assert!(
        !holder.holds_live(&sd),
        "the copy in the other namespace is still served"
    );
}

#[test]
fn a_lease_ends_although_another_mount_namespace_holds_the_mount() {
    needs_fuse();
    let lab = Lab::new("mntns-lease");
    let token = lab.create_exporter("ns-01", &["board=ns"]);
    let state = lab.env.root.join("state-ns-01");
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: ns-01, labels: {{site: e2e}}}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  console: {{type: sim-console}}\n  sd: {{type: storage-sim, size: 64MiB, path: {}}}\n",
        state.display(),
        token.display(),
        lab.env.root.join("sd.img").display()
    );
    let config = lab.env.root.join("ns-01.exporter.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let _jmpd = lab.start_jmpd(&config);
    lab.create_client("u", &[]);
    let name = lab
        .ok(
            "create",
            lab.as_client(
                "u",
                &["create", "lease", "-l", "board=ns", "--duration", "10m"],
            ),
        )
        .trim()
        .to_string();
    let (mut attach, v) = attach_lease(&lab, "u", &[]);
    let sd = PathBuf::from(local_of(&v, "sd"));
    let _u = Unmount(sd.clone());
    assert!(mounted_here(&sd), "{} is mounted", sd.display());

    let holder = Holder::start(&lab.env.logs);
    assert!(
        holder.holds_live(&sd),
        "the other namespace holds a live copy"
    );

    lab.ok("delete", lab.as_client("u", &["delete", "lease", &name]));
    let st = attach.expect_exit(LONG);
    assert_eq!(st.code(), Some(6), "{}", attach.describe());
    assert!(
        attach.stderr().contains("local devices removed"),
        "{}",
        attach.describe()
    );
    assert!(!mounted_here(&sd), "{} is still mounted here", sd.display());
    assert!(
        !holder.holds_live(&sd),
        "the copy in the other namespace is still served"
    );
    let status = lab.ok("status", lab.as_client("u", &["status", "-o", "json"]));
    assert_eq!(status.trim(), "[]", "no attachment is left: {status}");
}
