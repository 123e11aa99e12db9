//! Attachments running in the background: how they are started (`-d`, `jmp local start`),
//! found (`jmp serial`, `jmp detach`, `jmp status`) and stopped.
//!
//! Every running attachment writes `<runtime dir>/attach-<exporter>.json` (its Ready line, pid,
//! control socket) and listens on `attach-<exporter>.sock` ([`crate::ctlsock`]); both are
//! removed when it ends. A file whose pid is gone is stale and ignored (and removed).

use crate::attach::{Live, Ready, Shared};
use anyhow::{anyhow, bail, Context, Result};
use jmp_protocol::exit as code;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Set in the environment of a background child: run in the foreground, report Ready as one
/// JSON line on stdout (the pipe to the parent), then let go of stdout.
pub const CHILD_ENV: &str = "JMP_BACKGROUND_CHILD";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub ready: Ready,
    pub socket: PathBuf,
    pub log: Option<PathBuf>,
    /// Local mode: the config it runs (none: the built-in simulated board).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// The process's start time (clock ticks since boot, /proc/PID/stat field 22): a pid the
    /// kernel has since given to another process does not match, so it is never signalled.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// Who made it (none: a file of an older jmp, anyone's). Root's attachments share one
    /// runtime directory; `--all` and "the only one" mean the caller's own.
    #[serde(default)]
    pub owner: Option<Owner>,
}

/// Whose attachment this is: the invoking user (`sudo`'s), their `HOME`, the client config
/// (named by `JMP_CLIENT`/`JMP_CLIENT_CONFIG`, else the current one of `jmp config client
/// use`), and the CI job (`JMP_JOB` or the CI system's). Two jobs on one runner differ in the
/// job; two people on one host in the user or `HOME`; two client configs of one person in
/// the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    #[serde(default)]
    pub home: Option<PathBuf>,
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub job: Option<String>,
}

impl Owner {
    /// The caller of this process.
    pub fn caller() -> Owner {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Owner {
            uid: crate::paths::invoking_user().0,
            home: std::env::var_os("HOME").map(PathBuf::from),
            client: var("JMP_CLIENT")
                .or_else(|| var("JMP_CLIENT_CONFIG"))
                .or_else(crate::controller::current_client),
            job: crate::controller::current_job(),
        }
    }
}

impl StateFile {
    /// Made by the caller (a file without an owner counts as anyone's).
    pub fn is_callers(&self, caller: &Owner) -> bool {
        self.owner.as_ref().is_none_or(|o| o == caller)
    }
}

/// Local mode's own state file and the config it runs.
#[derive(Debug, Clone)]
pub struct LocalState {
    pub file: PathBuf,
    pub config: Option<PathBuf>,
}

fn dir() -> PathBuf {
    crate::paths::runtime_dir()
}

pub fn local_file() -> PathBuf {
    dir().join("local.json")
}

/// State letter and start time of `pid` from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'. Field 3 is the state, field 22 the start time.
    let (_, rest) = s.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.get(19)?.parse().ok()?))
}

pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// Whether the attachment recorded in `st` still runs: its pid is alive (a zombie is dead for
/// our purposes: its devices are gone) and, when recorded, started at the recorded time.
fn alive(st: &StateFile) -> bool {
    match proc_stat(st.ready.pid) {
        Some((state, started)) => {
            state != "Z" && state != "X" && st.start_time.is_none_or(|t| t == started)
        }
        None => false,
    }
}

/// What a dead attachment left: its state file, its control socket, its device links (only
/// symlinks: a link is all jmp ever puts there), its dead FUSE mounts (a `kill -9` leaves them
/// answering "transport endpoint is not connected"), its folders once empty, and a
/// `<dev dir>/current` left pointing at a folder that is gone. A dangling console link would
/// otherwise follow a reused pty number into some other program's terminal.
fn clean_dead(path: &Path, st: &StateFile) {
    use jmp_devices::places;
    let mut dirs = Vec::new();
    for d in &st.ready.devices {
        for e in &d.endpoints {
            match &e.local {
                jmp_devices::Local::Path(p) => {
                    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
                        let _ = std::fs::remove_file(p);
                        dirs.extend(p.parent().map(Path::to_path_buf));
                    }
                }
                // Only a dead one: a live mount there is another attachment's.
                jmp_devices::Local::Mount(p) => {
                    if places::is_dead_mount(p) {
                        match places::detach(p) {
                            Ok(()) => warn!("{}: removed the dead mount of an attachment that was killed (pid {})", p.display(), st.ready.pid),
                            Err(e) => warn!("{}: cannot remove the dead mount of a killed attachment: {e}", p.display()),
                        }
                    }
                    if !places::is_mount_point(p) {
                        // Only when empty.
                        let _ = std::fs::remove_dir(p);
                    }
                    dirs.extend(p.parent().map(Path::to_path_buf));
                }
                jmp_devices::Local::Address(_) | jmp_devices::Local::Interface(_) => {}
            }
        }
    }
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        // Only when empty.
        let _ = std::fs::remove_dir(dir);
        let (Some(base), Some(name)) = (dir.parent(), dir.file_name()) else {
            continue;
        };
        let current = base.join("current");
        if std::fs::read_link(&current).is_ok_and(|t| t.as_os_str() == name)
            && std::fs::metadata(&current).is_err()
        {
            let _ = std::fs::remove_file(&current);
        }
    }
    let _ = std::fs::remove_file(&st.socket);
    let _ = std::fs::remove_file(path);
}

fn read_state(path: &Path) -> Option<StateFile> {
    let text = std::fs::read_to_string(path).ok()?;
    let st: StateFile = serde_json::from_str(&text).ok()?;
    if alive(&st) {
        Some(st)
    } else {
        clean_dead(path, &st);
        None
    }
}

/// Every running attachment, by exporter name.
pub fn all() -> Vec<StateFile> {
    all_states()
}

fn all_states() -> Vec<StateFile> {
    let Ok(rd) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut out: Vec<StateFile> = rd
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("attach-") && n.ends_with(".json")
        })
        .filter_map(|e| read_state(&e.path()))
        .collect();
    out.sort_by(|a, b| a.ready.exporter.cmp(&b.ready.exporter));
    out
}

/// The attachment of `exporter`, or the only one. The rule of every verb that acts on one
/// object: naming one (or implying "the only one") that does not exist exits 5; verbs that
/// stop or clean up everything (`--all`, `jmp local stop`) succeed when there is nothing to do.
pub fn find(exporter: Option<&str>) -> Result<StateFile> {
    let mut all = all_states();
    if exporter.is_none() {
        // "The only one" is the caller's only one: another user's, client config's or job's
        // does not count, even when it is the only one running.
        let caller = Owner::caller();
        let others = others_of(&all, &caller);
        all.retain(|s| s.is_callers(&caller));
        if all.is_empty() && !others.is_empty() {
            return Err(crate::exit(
                code::UNAVAILABLE,
                format!(
                    "no attachment of yours is running (this user, HOME, client config and CI job); \
                     others are ({others}): name one to act on it"
                ),
            ));
        }
    }
    match exporter {
        Some(name) => all
            .into_iter()
            .find(|s| s.ready.exporter == name)
            .ok_or_else(|| {
                crate::exit(
                    code::UNAVAILABLE,
                    format!("no attachment of exporter {name:?} is running"),
                )
            }),
        None => match all.len() {
            0 => Err(crate::exit(code::UNAVAILABLE, "no attachment is running")),
            1 => Ok(all.into_iter().next().expect("one element")),
            _ => Err(crate::exit(
                code::USAGE,
                format!(
                    "several attachments are running ({}); name one",
                    all.iter()
                        .map(|s| s.ready.exporter.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        },
    }
}

/// The exporters of the attachments in `all` that are not `caller`'s, for a message.
pub fn others_of(all: &[StateFile], caller: &Owner) -> String {
    all.iter()
        .filter(|s| !s.is_callers(caller))
        .map(|s| s.ready.exporter.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Owns an attachment's state file and control socket; removes both on drop.
pub struct StateGuard {
    files: Vec<PathBuf>,
    server: tokio::task::JoinHandle<()>,
}

impl StateGuard {
    pub fn create(
        r: &Ready,
        shared: Arc<Shared>,
        local: Option<LocalState>,
    ) -> Result<StateGuard, String> {
        let d = dir();
        crate::paths::check_fallback(&d)?;
        crate::paths::private_dir(&d)?;
        let json_path = d.join(format!("attach-{}.json", r.exporter));
        let sock_path = d.join(format!("attach-{}.sock", r.exporter));
        if let Some(other) = read_state(&json_path) {
            if other.ready.pid != std::process::id() {
                return Err(format!(
                    "exporter {} is already attached on this machine (pid {}); `jmp detach {}` first",
                    r.exporter, other.ready.pid, r.exporter
                ));
            }
        }
        let _ = std::fs::remove_file(&sock_path);
        let listener = tokio::net::UnixListener::bind(&sock_path)
            .map_err(|e| format!("cannot create control socket {}: {e}", sock_path.display()))?;
        let state = StateFile {
            ready: r.clone(),
            socket: sock_path.clone(),
            log: std::env::var_os("JMP_LOG_FILE").map(PathBuf::from),
            config: local.as_ref().and_then(|l| l.config.clone()),
            start_time: start_time(std::process::id()),
            owner: Some(Owner::caller()),
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
        let mut files = vec![sock_path];
        for p in std::iter::once(json_path).chain(local.map(|l| l.file)) {
            std::fs::write(&p, &text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
            files.push(p);
        }
        let server = tokio::spawn(crate::ctlsock::serve(listener, shared));
        Ok(StateGuard { files, server })
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        self.server.abort();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// In a background child: stdout was the pipe to the parent, who has read the Ready line and
/// left; anything printed later must not die with SIGPIPE.
pub fn after_ready() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stdout of descriptors we own.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// Logs of background attachments that have ended are kept for a day (the post-mortem of a
/// failed CI job), and at most [`KEEP_LOGS`] of them; the logs of running ones are never touched.
const KEEP_LOGS: usize = 20;

fn clean_logs(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut dead: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = name
                .strip_prefix("jmp-")?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            if proc_stat(pid).is_some_and(|(st, _)| st != "Z" && st != "X") {
                return None;
            }
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, e.path()))
        })
        .collect();
    dead.sort();
    let day = Duration::from_secs(24 * 3600);
    let excess = dead.len().saturating_sub(KEEP_LOGS);
    for (i, (modified, path)) in dead.iter().enumerate() {
        let old = modified.elapsed().is_ok_and(|a| a > day);
        if i < excess || old {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Re-runs this command as a background child (`attach -d` → `attach`, `local start` →
/// `local run`), waits for its Ready line, prints it, returns. The child logs to a file in the
/// runtime dir.
pub fn spawn_background(json: bool) -> Result<()> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == "start") {
        if args.first().is_some_and(|a| a == "local") {
            args[pos] = "run".into();
        }
    }
    let (line, ready) = start_background(&args)?;
    if json {
        out!("{}", line);
    } else {
        out!("{}", ready.table());
    }
    Ok(())
}

/// Runs `jmp ARGS` as a background child (its own session, logging to the runtime dir) and
/// waits for its Ready line; the line as printed and parsed.
pub fn start_background(args: &[std::ffi::OsString]) -> Result<(String, Ready)> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the jmp executable")?;
    let d = dir();
    crate::paths::check_fallback(&d).map_err(|e| anyhow!(e))?;
    crate::paths::private_dir(&d).map_err(|e| anyhow!(e))?;
    clean_logs(&d);
    let log_path = d.join(format!("jmp-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(CHILD_ENV, "1")
        .env("JMP_LOG_FILE", &log_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log.try_clone()?);
    // Its own session: a Ctrl-C in the shell that started it must not reach it.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot start the background attachment")?;
    let stdout = child.stdout.take().context("no pipe to the child")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim().is_empty() {
        let status = child.wait()?;
        let mut tail = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(4000)));
            let _ = f.read_to_string(&mut tail);
        }
        eprint!("{tail}");
        let code = status.code().unwrap_or(1);
        return Err(crate::Exit {
            code,
            message: format!(
                "the background attachment failed (log: {})",
                log_path.display()
            ),
        }
        .into());
    }
    let ready: Ready = serde_json::from_str(line.trim())
        .context("bad ready line from the background attachment")?;
    Ok((line, ready))
}

/// A process handle that cannot be confused with a later process of the same pid.
struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    fn open(pid: u32) -> std::io::Result<PidFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        Ok(PidFd(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        }))
    }

    fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the process has exited (the pidfd becomes readable), at most `timeout`.
    fn exited(&self, timeout: Duration) -> bool {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            self.0.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)), Ok(n) if n > 0)
    }
}

/// Waits until process `pid` has ended, however it ended (its pidfd becomes readable: a pid
/// reused after it is never mistaken for it). Fails at once when there is no such process.
/// Needs the runtime.
pub(crate) fn owner_exit(pid: u32) -> Result<impl std::future::Future<Output = ()>> {
    let fd = PidFd::open(pid).map_err(|e| {
        crate::exit(
            code::USAGE,
            format!("--owner-pid {pid}: no such process ({e})"),
        )
    })?;
    // SAFETY: an OwnedFd stays open and names the same pidfd until it is dropped, which
    // happens only together with the AsyncFd that owns it.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd.0, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow!("--owner-pid {pid}: cannot watch the process: {e}"))?;
    Ok(async move {
        // Readable once the process has exited; it stays so (no read clears it).
        let _ = fd.readable().await;
    })
}

/// Stops the attachment of `st`: SIGTERM, up to 10 s for it to remove its devices, then
/// SIGKILL. Through a pidfd opened before checking the start time, so a recycled pid is never
/// signalled.
fn stop(st: &StateFile, what: &str) -> Result<()> {
    let pid = st.ready.pid;
    let fd = PidFd::open(pid).with_context(|| format!("{what} (pid {pid}) is gone"))?;
    if !alive(st) {
        bail!("{what}: pid {pid} now belongs to another process; not signalling it (the state file was stale and is removed)");
    }
    fd.signal(libc::SIGTERM)
        .with_context(|| format!("cannot signal {what} (pid {pid})"))?;
    if fd.exited(Duration::from_secs(10)) {
        return Ok(());
    }
    warn!("{what} (pid {pid}) did not stop within 10 s; killing it");
    let _ = fd.signal(libc::SIGKILL);
    fd.exited(Duration::from_secs(5));
    Ok(())
}

/// Stops one attachment found by its state (as `jmp detach` does).
pub fn stop_attachment(st: &StateFile) -> Result<()> {
    stop(st, &format!("the attachment of {}", st.ready.exporter))
}

pub fn detach(exporter: Option<&str>, all: bool) -> Result<()> {
    let targets = if all {
        // The caller's own: never another user's, another HOME's, client config's or job's.
        let caller = Owner::caller();
        all_states()
            .into_iter()
            .filter(|s| s.is_callers(&caller))
            .collect()
    } else {
        vec![find(exporter)?]
    };
    if targets.is_empty() {
        outln!("no attachment is running");
    }
    for st in targets {
        stop(&st, &format!("the attachment of {}", st.ready.exporter))?;
        outln!("detached {}", st.ready.exporter);
    }
    Ok(())
}

pub fn local_running() -> Option<StateFile> {
    read_state(&local_file())
}

/// Stops the local exporter, if one runs (nothing to stop is success); its name.
pub fn stop_local() -> Result<Option<String>> {
    match read_state(&local_file()) {
        None => Ok(None),
        Some(st) => {
            stop(&st, "the local exporter")?;
            let _ = std::fs::remove_file(local_file());
            Ok(Some(st.ready.exporter))
        }
    }
}

pub fn local_stop() -> Result<()> {
    match stop_local()? {
        None => outln!("no local exporter is running"),
        Some(name) => outln!("stopped local exporter {name}"),
    }
    Ok(())
}

/// The attachment's live state from its control socket, or, if it does not answer, what its
/// state file says (link unknown).
pub fn live(st: &StateFile) -> Live {
    let req = crate::ctlsock::Request {
        v: crate::ctlsock::VERSION,
        op: crate::ctlsock::Op::Status,
    };
    match crate::ctlsock::call(&st.socket, &req, Duration::from_secs(2)) {
        Ok(crate::ctlsock::Reply {
            body: crate::ctlsock::ReplyBody::Status(l),
            ..
        }) => l,
        _ => Live {
            ready: st.ready.clone(),
            link: "unknown".into(),
            since: 0,
            log: st.log.clone(),
            local: false,
            guests: Vec::new(),
        },
    }
}

pub fn status(json: bool) -> Result<()> {
    let local_pid = local_running().map(|l| l.ready.pid);
    let all: Vec<Live> = all_states()
        .iter()
        .map(|st| Live {
            local: Some(st.ready.pid) == local_pid,
            ..live(st)
        })
        .collect();
    let mut out = String::new();
    if json {
        out = serde_json::to_string(&all)? + "\n";
    } else if all.is_empty() {
        out.push_str("no attachment is running\n");
    } else {
        for l in &all {
            out.push_str(&live_text(l));
        }
    }
    crate::print_out(&out)
}

/// One attachment as `jmp status` shows it (and the console's devices key): the board, its
/// devices with their local endpoints, the colleagues attached beside it, its log.
pub fn live_text(l: &Live) -> String {
    let r = &l.ready;
    let mut out = format!(
        "{}{} (pid {}, link {}{}, {})\n",
        jmp_protocol::name::escape(&r.exporter),
        if l.local { " [local]" } else { "" },
        r.pid,
        l.link,
        r.lease
            .as_deref()
            .map(|x| format!(", lease {x}"))
            .unwrap_or_default(),
        r.fingerprint
    );
    for line in r.table().lines() {
        out.push_str(&format!("  {line}\n"));
    }
    for g in &l.guests {
        out.push_str(&format!("  attached beside you: {}\n", g.text()));
    }
    if let Some(log) = &l.log {
        out.push_str(&format!("  log: {}\n", log.display()));
    }
    out
}
