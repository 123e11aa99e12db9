//! State that must not leak from one run to the next: `jmp local start` gives a fresh
//! simulated card unless told to keep it, and what a killed attachment left (its dead FUSE
//! mount, `<dev dir>/current` pointing at a folder that is gone, its state file) is removed by
//! the next `jmp` that looks (`jmp status`).

use jmp_e2e::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where on the card the test writes: inside the second partition's data, far from the
/// partition table and the file systems' headers that a new card also has.
const AT: u64 = 200 << 20;
const MARK: &[u8] = b"one run's write that the next fresh board must not show";

fn needs_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is needed");
}

/// A local board started with `extra` options, its simulated card's image kept under the
/// test's own temporary directory (so concurrent tests do not share one card).
fn start(env: &TestEnv, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = env.jmp();
    cmd.env("TMPDIR", tmp(env))
        .args(["local", "start", "-o", "json", "--dev-dir"])
        .arg(&env.dev)
        .args(extra);
    let mut p = Proc::spawn("jmp-local-start", cmd, &env.logs);
    let line = p.expect_line(READY, "the JSON line", |l| l.trim_start().starts_with('{'));
    assert!(p.expect_exit(READY).success(), "{}", p.describe());
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    (v["pid"].as_i64().expect("pid") as i32, v)
}

fn tmp(env: &TestEnv) -> PathBuf {
    let t = env.root.join("tmp");
    std::fs::create_dir_all(&t).expect("mkdir");
    t
}

fn stop(env: &TestEnv, pid: i32) {
    let mut c = env.jmp();
    c.args(["local", "stop"]);
    let out = run("jmp-local-stop", c, &env.logs, READY);
    assert!(out.status.success(), "jmp local stop: {}", show_run(&out));
    assert!(
        poll_until(READY, || !pid_alive(pid)),
        "the local board {pid} still runs"
    );
}

fn show_run(out: &RunOutput) -> String {
    format!("{}\n{}\n{}", out.status, out.stdout, out.stderr)
}

fn disk(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(local_of(v, "sd")).join("disk")
}

fn write_mark(v: &serde_json::Value) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk(v))
        .expect("open the card");
    f.seek(SeekFrom::Start(AT)).expect("seek");
    f.write_all(MARK).expect("write");
    f.sync_all().expect("sync");
}

fn has_mark(v: &serde_json::Value) -> bool {
    let mut f = std::fs::File::open(disk(v)).expect("open the card");
    f.seek(SeekFrom::Start(AT)).expect("seek");
    let mut b = vec![0u8; MARK.len()];
    f.read_exact(&mut b).expect("read");
    b == MARK
}

#[test]
fn local_start_gives_a_fresh_card_unless_told_to_keep_it() {
    needs_fuse();
    let env = TestEnv::new("local-fresh");
    let (pid, v) = start(&env, &[]);
    let guard = KillGuard(pid);
    assert!(!has_mark(&v), "a new card does not have the mark");
    write_mark(&v);
    assert!(has_mark(&v), "the card took the write");
    stop(&env, pid);
    drop(guard);

    let (pid, v) = start(&env, &[]);
    let guard = KillGuard(pid);
    assert!(
        !has_mark(&v),
        "the next `jmp local start` shows the last run's write"
    );
    write_mark(&v);
    stop(&env, pid);
    drop(guard);

    let (pid, v) = start(&env, &["--keep-card"]);
    let _guard = KillGuard(pid);
    assert!(has_mark(&v), "--keep-card kept the last run's card");
    stop(&env, pid);
}

#[test]
fn a_card_at_a_configured_path_is_kept() {
    needs_fuse();
    let env = TestEnv::new("local-keep-path");
    let img = env.root.join("my-card.img");
    let config = env.root.join("board.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: mine}}\nlisten: 127.0.0.1:0\nexport:\n  sd: {{type: storage-sim, size: 256MiB, path: {}}}\n",
            img.display()
        ),
    )
    .expect("write config");
    let cfg = config.to_string_lossy().into_owned();
    let (pid, v) = start(&env, &["--config", &cfg]);
    let guard = KillGuard(pid);
    write_mark(&v);
    stop(&env, pid);
    drop(guard);
    let (pid, v) = start(&env, &["--config", &cfg]);
    let _guard = KillGuard(pid);
    assert!(has_mark(&v), "the card at the config's path: was kept");
    stop(&env, pid);
}

#[test]
fn what_a_killed_attachment_left_is_removed_by_the_next_jmp_status() {
    needs_fuse();
    let env = TestEnv::new("local-killed");
    let (pid, v) = start(&env, &[]);
    let guard = KillGuard(pid);
    let sd = PathBuf::from(local_of(&v, "sd"));
    let _u = Unmount(sd.clone());
    let current = env.dev.join("current");
    assert!(
        std::fs::metadata(&current).is_ok(),
        "{} points at the board's folder",
        current.display()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    assert!(
        poll_until(READY, || !pid_alive(pid)),
        "the killed attachment is gone"
    );
    drop(guard);
    // The group leader shows as a zombie while its other threads are still exiting, and the
    // FUSE connection dies only when the last of them has closed /dev/fuse.
    assert!(
        poll_until(READY, || is_dead_mount(&sd)),
        "the kill left a dead mount at {}",
        sd.display()
    );

    let mut c = env.jmp();
    c.args(["status", "-o", "json"]);
    let out = run("jmp-status", c, &env.logs, READY);
    assert!(out.status.success(), "jmp status: {}", show_run(&out));
    assert_eq!(out.stdout.trim(), "[]", "a dead attachment is not listed");
    assert!(
        !mounted_here(&sd),
        "the dead mount at {} is still there",
        sd.display()
    );
    assert!(
        std::fs::symlink_metadata(&current).is_err(),
        "{} was left dangling",
        current.display()
    );
    assert!(
        std::fs::read_dir(&env.runtime)
            .expect("runtime dir")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".json")),
        "the dead attachment's state files were removed"
    );

    // And the next start works as from clean.
    let (pid, _v) = start(&env, &[]);
    let _guard = KillGuard(pid);
    stop(&env, pid);
}

/// Listing the mount fails with ENOTCONN: a FUSE mount whose server is gone.
fn is_dead_mount(path: &Path) -> bool {
    std::fs::read_dir(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

fn mounted_here(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = path.to_string_lossy();
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

/// Kills the local board by PID if a failing test left it running (it unmounts its card).
struct KillGuard(i32);

/// Lazily unmounts whatever a failing test left at a path.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted_here(&self.0) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        kill_pid(self.0);
    }
}
