//! The controller side of `jmp`: client configs, leases, exporters, admin verbs.
//!
//! Client configs live in `~/.config/jmp/clients/<name>.yaml` (0600: they hold the credential);
//! `~/.config/jmp/config.yaml` names the current one. Every call is one QUIC stream to the
//! controller, whose certificate is pinned by the fingerprint in the client config.

use crate::{exit, paths};
use anyhow::{Context, Result};
use jmp_protocol::api::{
    Access, Call, ClientConfig, ClientInfo, Credential, CtlErrorCode, ExporterInfo, LeaseInfo,
    Reply, Request,
};
use jmp_protocol::exit as code;
use jmp_transport::controller::{CallError, Controllers, ReplyStream};
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

pub fn clients_dir() -> PathBuf {
    paths::config_dir().join("clients")
}

fn current_file() -> PathBuf {
    paths::config_dir().join("config.yaml")
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserConfig {
    #[serde(default)]
    current_client: Option<String>,
}

fn read_user_config() -> UserConfig {
    std::fs::read_to_string(current_file())
        .ok()
        .and_then(|t| serde_norway::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_user_config(c: &UserConfig) -> Result<()> {
    let p = current_file();
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&p, serde_norway::to_string(c)?)
        .with_context(|| format!("cannot write {}", p.display()))
}

/// The current client config's name (`jmp config client use NAME`), if one is chosen.
pub fn current_client() -> Option<String> {
    read_user_config().current_client
}

/// Makes `name` the current client config.
pub fn set_current(name: &str) -> Result<()> {
    let mut c = read_user_config();
    c.current_client = Some(name.to_string());
    write_user_config(&c)
}

pub fn read_client_file(path: &Path) -> Result<ClientConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        exit(
            2,
            format!("cannot read client config {}: {e}", path.display()),
        )
    })?;
    let c: ClientConfig = serde_norway::from_str(&text).map_err(|e| {
        exit(
            code::USAGE,
            format!("client config {}: {e}", path.display()),
        )
    })?;
    if c.kind != "ClientConfig" {
        return Err(exit(
            2,
            format!("{}: kind {:?} is not ClientConfig", path.display(), c.kind),
        ));
    }
    if let Some(b) = &c.renew_before {
        jmp_protocol::duration::parse_secs(b).map_err(|e| {
            exit(
                code::USAGE,
                format!("client config {}: renewBefore {b:?}: {e}", path.display()),
            )
        })?;
    }
    // A credential changed by hand or damaged is caught here, naming the file, rather than
    // as a decoder's error from the controller (or no error at all until it is used).
    jmp_transport::token::self_check(&c.token).map_err(|e| {
        let why = match e {
            jmp_transport::token::TokenError::Malformed(m) => m,
            other => other.to_string(),
        };
        exit(
            code::USAGE,
            format!(
                "client config {}: its credential (token:) is damaged: {why}; get a new client \
                 config from your jmp administrator (jmp admin create client ... --out FILE)",
                path.display()
            ),
        )
    })?;
    remember_source(&c.token, path);
    Ok(c)
}

/// The files this process read credentials from, by token: [`Ctl::connect`] renews a
/// credential due for renewal in the file it came from.
static SOURCES: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn remember_source(token: &str, path: &Path) {
    let mut s = SOURCES.lock().unwrap_or_else(|e| e.into_inner());
    s.retain(|(t, _)| t != token);
    s.push((token.to_string(), path.to_path_buf()));
}

fn source_of(token: &str) -> Option<PathBuf> {
    SOURCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(t, _)| t == token)
        .map(|(_, p)| p.clone())
}

/// When the credential `token` is to be renewed (Unix seconds), if it expires.
fn renewal_due(token: &str, renew_before: Option<&str>) -> Option<(u64, u64)> {
    let claims = jmp_transport::token::peek(token).ok()?;
    let before = renew_before.and_then(|b| jmp_protocol::duration::parse_secs(b).ok());
    Some((claims.renew_at(before)?, claims.exp?))
}

/// Writes a client config (0600: it holds the credential), replacing an existing file.
pub fn write_client_file(path: &Path, c: &ClientConfig) -> Result<()> {
    jmp_transport::write_secret_file(path, serde_norway::to_string(c)?.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn client_path(name: &str) -> PathBuf {
    clients_dir().join(format!("{name}.yaml"))
}

/// The client config to use: `--client NAME` (or `$JMP_CLIENT`), else the current one.
/// `$JMP_CLIENT_CONFIG` names a file directly (CI secrets mounted as files).
pub fn load_client(name: Option<&str>) -> Result<(ClientConfig, PathBuf)> {
    if name.is_none() {
        if let Some(p) = std::env::var_os("JMP_CLIENT_CONFIG") {
            let p = PathBuf::from(p);
            return Ok((read_client_file(&p)?, p));
        }
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => read_user_config().current_client.ok_or_else(|| {
            exit(
                2,
                format!(
                    "no client config selected: create one (jmp config client create) and choose it \
                     with jmp config client use NAME (looked in {})",
                    clients_dir().display()
                ),
            )
        })?,
    };
    let p = client_path(&name);
    if !p.exists() {
        return Err(exit(
            2,
            format!("no client config {name:?} (expected {})", p.display()),
        ));
    }
    Ok((read_client_file(&p)?, p))
}

/// The admin credential: `--admin-config`/`$JMP_ADMIN_CONFIG`, `~/.config/jmp/admin.yaml`, or
/// the controller's own `/var/lib/jmp-controller/admin.yaml` (root on the controller host).
pub fn load_admin(path: Option<&Path>) -> Result<ClientConfig> {
    let candidates: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_path_buf()],
        None => vec![
            paths::config_dir().join("admin.yaml"),
            PathBuf::from("/var/lib/jmp-controller/admin.yaml"),
        ],
    };
    for c in &candidates {
        if c.exists() {
            return read_client_file(c);
        }
    }
    Err(exit(
        2,
        format!(
            "no admin credential found (looked at {}); pass --admin-config FILE",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// A connection to the controller as one identity. With several controllers (a cluster: the
/// config's endpoint lists them, comma-separated), calls go to the leader wherever it is.
pub struct Ctl {
    ctls: Controllers,
    credential: String,
    pub endpoint_name: String,
}

pub fn call_error(e: CallError, endpoint: &str) -> anyhow::Error {
    match e {
        CallError::Refused(r) => exit(r.exit_code(), r.message),
        CallError::Connect(m) => exit(code::FAILURE, m),
        other => exit(code::FAILURE, format!("controller {endpoint}: {other}")),
    }
}

impl Ctl {
    pub async fn connect(cfg: &ClientConfig) -> Result<Ctl> {
        let pin = cfg
            .fingerprint
            .parse()
            .map_err(|e: String| exit(code::USAGE, format!("client config fingerprint: {e}")))?;
        let ctls = Controllers::new(&cfg.endpoint, pin)
            .map_err(|e| exit(code::USAGE, format!("client config endpoint: {e}")))?;
        ctls.connect()
            .await
            .map_err(|e| call_error(e, &cfg.endpoint))?;
        let mut ctl = Ctl {
            ctls,
            credential: cfg.token.clone(),
            endpoint_name: cfg.endpoint.clone(),
        };
        ctl.renew_if_due(cfg).await;
        Ok(ctl)
    }

    /// Renews the credential when it is due (see [`jmp_protocol::token::renew_at`]) and writes
    /// the new one to the file it was read from. One process renews a file at a time (a lock
    /// beside it); the others find it renewed. A failure only warns: the credential in hand is
    /// still valid until it expires.
    async fn renew_if_due(&mut self, cfg: &ClientConfig) {
        let now = unix_now();
        let Some((at, exp)) = renewal_due(&self.credential, cfg.renew_before.as_deref()) else {
            return;
        };
        if now < at {
            return;
        }
        let who = &cfg.metadata.name;
        let Some(path) = source_of(&self.credential) else {
            eprintln!(
                "jmp: warning: the credential of {who} expires at {}; it was not read from a file, so it is not renewed in place: ask for a new one",
                fmt_time(exp)
            );
            return;
        };
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        let locked = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ok()
            .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok());
        // Another process may have renewed it while this one waited for the lock.
        let mut current = read_client_file(&path).unwrap_or_else(|_| cfg.clone());
        if current.token != self.credential
            && renewal_due(&current.token, current.renew_before.as_deref())
                .is_some_and(|(at, _)| now < at)
        {
            self.credential = current.token;
            return;
        }
        match self.call(Request::Renew).await {
            Ok(Reply::Credential(c)) => {
                current.token = c.token.clone();
                self.credential = c.token;
                match write_client_file(&path, &current) {
                    Ok(()) => {
                        remember_source(&self.credential, &path);
                        let until = renewal_due(&self.credential, None).map_or(0, |(_, e)| e);
                        eprintln!(
                            "jmp: renewed the credential of {who} (valid until {}) in {}",
                            fmt_time(until),
                            path.display()
                        );
                    }
                    Err(e) => eprintln!(
                        "jmp: warning: renewed the credential of {who} but {e:#}: this run uses the new one; the file's still expires at {}",
                        fmt_time(exp)
                    ),
                }
            }
            Ok(other) => eprintln!(
                "jmp: warning: renewing the credential of {who}: unexpected answer {other:?}"
            ),
            Err(e) => eprintln!(
                "jmp: warning: the credential of {who} expires at {} and could not be renewed: {e:#}",
                fmt_time(exp)
            ),
        }
        drop(locked);
    }

    pub async fn stream(&self, request: Request) -> Result<ReplyStream, CallError> {
        let c = Call {
            credential: self.credential.clone(),
            request,
        };
        Ok(self.ctls.call(&c, false).await?.0)
    }

    /// One call's final answer, its refusal kept as such (for callers that act on its code).
    pub async fn try_call(&self, request: Request) -> Result<Reply, CallError> {
        self.stream(request).await?.last().await
    }

    pub async fn call(&self, request: Request) -> Result<Reply> {
        let s = self
            .stream(request)
            .await
            .map_err(|e| call_error(e, &self.ctls.current()))?;
        s.last()
            .await
            .map_err(|e| call_error(e, &self.ctls.current()))
    }

    pub fn close(&self) {
        self.ctls.close();
    }

    /// The address of the controller the last call went to (the leader, with several), as
    /// this connection reaches it: where its relay listens unless it names another host.
    pub fn remote(&self) -> Option<std::net::SocketAddr> {
        self.ctls.connection().map(|c| c.remote_address())
    }

    /// Closes the connection and waits (briefly) until the close has left: the controller
    /// takes a deliberate close after a lease reply as proof that the reply arrived.
    pub async fn finish(self) {
        self.ctls.finish().await;
    }
}

pub fn unexpected(r: Reply) -> anyhow::Error {
    exit(
        code::FAILURE,
        format!("unexpected answer from the controller: {r:?}"),
    )
}

// ---------- output ----------

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Out {
    Table,
    Json,
    Yaml,
    Name,
}

pub use jmp_transport::unix_now;

pub fn fmt_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

pub fn fmt_left(secs: i64) -> String {
    if secs <= 0 {
        return "0s".into();
    }
    let s = secs as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    crate::table::render(Some(header), &rows)
}

pub fn print_leases(leases: &[LeaseInfo], out: Out) -> Result<()> {
    let now = unix_now() as i64;
    let text = match out {
        Out::Json => serde_json::to_string_pretty(leases)? + "\n",
        Out::Yaml => serde_norway::to_string(leases)?,
        Out::Name => leases.iter().map(|l| format!("{}\n", l.name)).collect(),
        Out::Table => table(
            &[
                "NAME",
                "CLIENT",
                "EXPORTER",
                "STATUS",
                "SELECTOR",
                "BEGIN",
                "END",
                "REMAINING",
                "LAST USE",
                "IDLE UNTIL",
                "HARD LIMIT",
                "SHARED WITH",
            ],
            leases
                .iter()
                .map(|l| {
                    vec![
                        l.name.clone(),
                        l.client.clone(),
                        if l.exporter.is_empty() {
                            "-".into()
                        } else {
                            l.exporter.clone()
                        },
                        l.status.clone(),
                        if l.selector.is_empty() {
                            "-".into()
                        } else {
                            l.selector.clone()
                        },
                        fmt_time(l.begin),
                        fmt_time(l.end),
                        fmt_left(l.end as i64 - now),
                        last_use_text(l, now),
                        l.idle_deadline.map_or("-".into(), fmt_time),
                        l.hard_limit.map_or("-".into(), fmt_time),
                        shares_text(l),
                    ]
                })
                .collect(),
        ),
    };
    out!("{text}");
    Ok(())
}

/// "attached" while a session of it is attached, else how long ago it was last used.
fn last_use_text(l: &LeaseInfo, now: i64) -> String {
    if l.attached {
        return "attached".into();
    }
    match l.last_use {
        Some(t) => format!("{} ago", fmt_left((now - t as i64).max(1))),
        None => "-".into(),
    }
}

pub fn print_exporters(exps: &[ExporterInfo], with: &[String], out: Out) -> Result<()> {
    let text = match out {
        Out::Json => serde_json::to_string_pretty(exps)? + "\n",
        Out::Yaml => serde_norway::to_string(exps)?,
        Out::Name => exps.iter().map(|e| format!("{}\n", e.name)).collect(),
        Out::Table => {
            let online = with.iter().any(|w| w == "online");
            let leases = with.iter().any(|w| w == "leases");
            let mut header = vec!["NAME", "LABELS"];
            if online {
                header.push("ONLINE");
            }
            if leases {
                header.extend(["LEASED BY", "LEASE"]);
            }
            // A refused registration with another fingerprint is shown to everyone who can
            // see the exporter: a re-imaged host, or someone holding its leaked credential.
            let refused = exps.iter().any(|e| e.fingerprint_refused.is_some());
            // Shown while some exporter is cleaning up after a lease (granted to nobody).
            let states = exps.iter().any(|e| e.state.is_some());
            if states {
                header.push("STATE");
            }
            if refused {
                header.push("WARNING");
            }
            let rows = exps
                .iter()
                .map(|e| {
                    let mut r = vec![
                        e.name.clone(),
                        e.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ];
                    if online {
                        r.push(
                            match (e.online, e.enabled) {
                                (_, false) => "disabled",
                                (true, _) => "yes",
                                (false, _) => "no",
                            }
                            .into(),
                        );
                    }
                    if leases {
                        r.push(e.client.clone().unwrap_or_else(|| "-".into()));
                        r.push(e.lease.clone().unwrap_or_else(|| "-".into()));
                    }
                    if states {
                        r.push(e.state.clone().unwrap_or_else(|| "-".into()));
                    }
                    if refused {
                        r.push(match &e.fingerprint_refused {
                            Some(f) => format!(
                                "registration with another fingerprint ({f}) refused; bound: {}",
                                e.fingerprint
                            ),
                            None => String::new(),
                        });
                    }
                    r
                })
                .collect();
            table(&header, rows)
        }
    };
    out!("{text}");
    Ok(())
}

pub fn print_clients(clients: &[ClientInfo], out: Out) -> Result<()> {
    let text = match out {
        Out::Json => serde_json::to_string_pretty(clients)? + "\n",
        Out::Yaml => serde_norway::to_string(clients)?,
        Out::Name => clients.iter().map(|c| format!("{}\n", c.name)).collect(),
        Out::Table => table(
            &[
                "NAME",
                "LABELS",
                "ALLOW",
                "MAX DURATION",
                "MAX IDLE",
                "ADMIN",
                "CREDENTIAL EXPIRES",
            ],
            clients
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        if c.allow.is_empty() {
                            "(any)".into()
                        } else {
                            c.allow.clone()
                        },
                        if c.max_duration_secs == 0 {
                            "(default)".into()
                        } else {
                            fmt_left(c.max_duration_secs as i64)
                        },
                        if c.max_idle_timeout_secs == 0 {
                            "(any)".into()
                        } else {
                            fmt_left(c.max_idle_timeout_secs as i64)
                        },
                        if c.admin { "yes" } else { "no" }.into(),
                        c.credential_expires.map_or("never".into(), fmt_time),
                    ]
                })
                .collect(),
        ),
    };
    out!("{text}");
    Ok(())
}

// ---------- which lease a command means ----------

/// The CI job this process runs in, as the lease it creates is tagged: `JMP_JOB`, else the job
/// id the CI system sets (GitHub Actions, GitLab CI, Jenkins, Buildkite). Two jobs on one runner
/// with one client config then each find their own lease.
pub fn current_job() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(j) = var("JMP_JOB") {
        return Some(j);
    }
    if let (Some(run), Some(job)) = (var("GITHUB_RUN_ID"), var("GITHUB_JOB")) {
        let attempt = var("GITHUB_RUN_ATTEMPT").unwrap_or_else(|| "1".into());
        return Some(format!("github:{run}.{attempt}/{job}"));
    }
    if let Some(j) = var("CI_JOB_ID") {
        return Some(format!("gitlab:{j}"));
    }
    if let Some(j) = var("BUILDKITE_JOB_ID") {
        return Some(format!("buildkite:{j}"));
    }
    var("BUILD_TAG").map(|j| format!("jenkins:{j}"))
}

/// The lease a command means when the user named none: `JMP_LEASE` (handled by clap), else
/// the one lease of this job, else `None` (the controller then takes the client's only lease).
pub async fn job_lease(ctl: &Ctl) -> Result<Option<String>> {
    let Some(job) = current_job() else {
        return Ok(None);
    };
    let leases = match ctl.call(Request::GetLeases { all: false }).await? {
        Reply::Leases { leases } => leases,
        other => return Err(unexpected(other)),
    };
    let mine: Vec<&LeaseInfo> = leases
        .iter()
        .filter(|l| l.job.as_deref() == Some(job.as_str()))
        .collect();
    match mine.as_slice() {
        [l] => Ok(Some(l.name.clone())),
        [] => Err(exit(
            code::UNAVAILABLE,
            format!("job {job} holds no lease (create one with jmp create lease; or name one with --lease / JMP_LEASE)"),
        )),
        many => Err(exit(
            code::USAGE,
            format!(
                "job {job} holds {} leases ({}); name one with --lease / JMP_LEASE",
                many.len(),
                many.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

// ---------- lease creation with a live queue line ----------

/// Told the queue place and the lease waited behind.
pub type QueueTell = Box<dyn Fn(u32, Option<&str>) + Send + Sync>;

pub struct CreateLease {
    pub request: jmp_protocol::api::LeaseRequest,
    pub out: Out,
    /// Told the queue place (and the lease waited behind) at every change, besides the line on
    /// stderr (`jmp mcp` sends it to the agent).
    pub on_queue: Option<QueueTell>,
}

/// Shows the queue place: one live line on a terminal, a line per change otherwise.
struct Progress {
    tty: bool,
    shown: bool,
}

impl Progress {
    fn show(&mut self, position: u32, behind: &Option<String>, wait_until: u64) {
        let left = fmt_left(wait_until as i64 - unix_now() as i64);
        let behind = behind
            .as_ref()
            .map(|b| format!(", behind lease {b}"))
            .unwrap_or_default();
        let text =
            format!("waiting: position {position} in the queue{behind} (gives up in {left})");
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{text}");
        } else {
            let _ = writeln!(e, "{text}");
        }
        let _ = e.flush();
        self.shown = true;
    }

    fn done(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.shown = false;
        }
    }
}

/// Requests a lease and waits for it (across controller restarts and network blips, by
/// re-sending the same request id). Ctrl-C withdraws a waiting request.
pub async fn create_lease(cfg: &ClientConfig, c: CreateLease) -> Result<LeaseInfo> {
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        shown: false,
    };
    // Retrying is safe (the request id makes it idempotent), so transient failures are retried
    // for the whole wait plus a margin, and for a short while even without --wait (a grant whose
    // answer was lost is found again instead of being left to nobody).
    // Whether a request may have reached the controller (before that, without --wait, an
    // unreachable controller is an error at once).
    let mut sent = false;
    let mut give_up = unix_now() + c.request.wait_secs.max(15) + 30;
    let interrupted = jmp_transport::shutdown_signal("withdrawing the lease request");
    tokio::pin!(interrupted);
    let mut pending_lease: Option<String> = None;
    let mut backoff = Duration::from_millis(300);
    let mut last: Option<(u32, Option<String>, u64)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Waiting behind a lease of this very client (a leftover of a failed job) is said out loud
    // once per lease: otherwise the job just waits for its own leftover to expire.
    let mut told_behind: Option<String> = None;
    loop {
        let attempt: Result<LeaseInfo, CallError> = async {
            let ctl = Ctl::connect(cfg)
                .await
                .map_err(|e| CallError::Stream(e.to_string()))?;
            sent = true;
            let mut s = ctl
                .stream(Request::CreateLease(c.request.clone()))
                .await?;
            loop {
                tokio::select! {
                    r = s.next() => match r? {
                        Some(Reply::Queued { lease, position, behind, wait_until, .. }) => {
                            pending_lease = Some(lease);
                            give_up = give_up.max(wait_until + 30);
                            if let Some(b) = behind.as_ref().filter(|b| told_behind.as_ref() != Some(*b)) {
                                told_behind = Some(b.clone());
                                if let Ok(Reply::Leases { leases }) = ctl.call(Request::GetLeases { all: false }).await {
                                    if let Some(l) = leases.iter().find(|l| &l.name == b && l.status == "active") {
                                        progress.done();
                                        eprintln!(
                                            "jmp: waiting behind lease {b}, which is your own client's (job {}, since {}); if what holds it is gone: jmp delete lease {b}",
                                            l.job.as_deref().unwrap_or("none"),
                                            fmt_time(l.begin)
                                        );
                                    }
                                }
                            }
                            progress.show(position, &behind, wait_until);
                            if let Some(tell) = &c.on_queue {
                                tell(position, behind.as_deref());
                            }
                            last = Some((position, behind, wait_until));
                        }
                        Some(Reply::Lease(l)) => {
                            drop(s);
                            ctl.finish().await;
                            return Ok(l);
                        }
                        Some(other) => return Err(CallError::Stream(format!("unexpected answer {other:?}"))),
                        None => return Err(CallError::NoAnswer),
                    },
                    _ = tick.tick(), if progress.tty => {
                        if let Some((p, b, w)) = &last {
                            progress.show(*p, b, *w);
                        }
                    }
                    _ = &mut interrupted => {
                        progress.done();
                        if let Some(name) = &pending_lease {
                            let _ = ctl.call(Request::DeleteLease { names: vec![name.clone()], all: false }).await;
                            eprintln!("jmp: withdrew the waiting request {name}");
                        }
                        return Err(CallError::Refused(jmp_protocol::api::CtlError::new(CtlErrorCode::Timeout, "interrupted")));
                    }
                }
            }
        }
        .await;
        match attempt {
            Ok(l) => {
                progress.done();
                return Ok(l);
            }
            Err(CallError::Refused(e)) if e.message == "interrupted" => {
                return Err(exit(code::INTERRUPTED, "interrupted"));
            }
            Err(e)
                if e.is_transient()
                    && (sent || c.request.wait_secs > 0)
                    && unix_now() < give_up
                    // The store is down: a definite "nothing was done", worth waiting out
                    // only for a request that waits anyway.
                    && !(c.request.wait_secs == 0 && store_unavailable(&e)) =>
            {
                progress.done();
                eprintln!(
                    "jmp: controller {}: {e}; retrying in {:.1}s (the request keeps its place)",
                    cfg.endpoint,
                    backoff.as_secs_f64()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
            Err(e) => {
                progress.done();
                return Err(call_error(e, &cfg.endpoint));
            }
        }
    }
}

fn store_unavailable(e: &CallError) -> bool {
    matches!(e, CallError::Refused(r) if r.code == CtlErrorCode::Unavailable)
}

pub fn print_lease(l: &LeaseInfo, out: Out) -> Result<()> {
    match out {
        Out::Name => outln!("{}", l.name),
        Out::Json => outln!("{}", serde_json::to_string(l)?),
        Out::Yaml => out!("{}", serde_norway::to_string(l)?),
        Out::Table => print_leases(std::slice::from_ref(l), Out::Table)?,
    }
    Ok(())
}

pub fn credential_config(c: &Credential) -> ClientConfig {
    ClientConfig::new(c)
}

/// `--until`: an RFC 3339 time, or a duration from now; Unix seconds.
fn until_arg(s: &str) -> Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| exit(code::USAGE, format!("--until {s}: before 1970")))?
            .as_secs();
        return Ok(secs);
    }
    match jmp_protocol::duration::parse_secs(s) {
        Ok(d) if d > 0 => Ok(unix_now().saturating_add(d)),
        _ => Err(exit(
            code::USAGE,
            format!("--until {s}: neither a time (2026-12-08T17:00:00Z) nor a duration (30m)"),
        )),
    }
}

pub(crate) fn share_cmd(what: crate::cli::ShareCmd) -> Result<()> {
    let crate::cli::ShareCmd::Lease {
        name,
        with,
        until,
        control,
        output,
        client,
    } = what;
    let until = until.as_deref().map(until_arg).transpose()?;
    let (cfg, _) = load_client(client.client.as_deref())?;
    crate::runtime()?.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        match ctl
            .call(Request::ShareLease {
                name,
                with,
                until,
                control,
            })
            .await?
        {
            Reply::Lease(l) => print_lease(&l, output),
            other => Err(unexpected(other)),
        }
    })
}

pub(crate) fn unshare_cmd(what: crate::cli::UnshareCmd) -> Result<()> {
    let crate::cli::UnshareCmd::Lease {
        name,
        with,
        output,
        client,
    } = what;
    let (cfg, _) = load_client(client.client.as_deref())?;
    crate::runtime()?.block_on(async {
        let ctl = Ctl::connect(&cfg).await?;
        match ctl.call(Request::UnshareLease { name, with }).await? {
            Reply::Lease(l) => print_lease(&l, output),
            other => Err(unexpected(other)),
        }
    })
}

/// "c2 (control, until 17:00)": a lease's shares for the table.
fn shares_text(l: &LeaseInfo) -> String {
    if l.shares.is_empty() {
        return "-".into();
    }
    l.shares
        .iter()
        .map(|s| {
            let mut t = s.client.clone();
            let mut how = Vec::new();
            how.push(if s.control { "control" } else { "read-only" }.to_string());
            if let Some(u) = s.until {
                how.push(format!("until {}", fmt_time(u)));
            }
            t.push_str(&format!(" ({})", how.join(", ")));
            t
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The access to the caller's lease (`name`, or its only active one).
pub async fn access(ctl: &Ctl, name: Option<String>) -> Result<Access> {
    match ctl.call(Request::LeaseAccess { name }).await? {
        Reply::Access(a) => Ok(a),
        other => Err(unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jmp_protocol::token::{Claims, ControllerRef, TokenKind};

    /// A tampered credential is refused where it is read, naming the file and what is wrong,
    /// without the decoder's internals (issue 20 item 9).
    #[test]
    fn a_damaged_credential_names_its_file_and_the_damage() {
        let dir = std::env::temp_dir().join(format!("jmp-cred-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let signer = jmp_transport::token::Signer::load_or_create(&dir.join("k")).unwrap();
        let claims = Claims {
            iss: "jmp-controller".into(),
            sub: "alice".into(),
            kind: TokenKind::Client,
            jti: "j1".into(),
            iat: 1,
            exp: None,
            client: None,
            exporter: None,
            ctl: Some(ControllerRef {
                endpoint: "127.0.0.1:7780".into(),
                fingerprint: "sha256:00".into(),
                key: signer.public_key(),
            }),
            admin: false,
            share: None,
        };
        let token = signer.sign(&claims).unwrap();
        let file = |name: &str, token: &str| {
            let p = dir.join(name);
            let text = format!(
                "apiVersion: jmp.dev/v1alpha1\nkind: ClientConfig\nmetadata: {{name: alice}}\n\
                 endpoint: 127.0.0.1:7780\nfingerprint: sha256:00\ntoken: {token}\n"
            );
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = file("good.yaml", &token);
        assert_eq!(read_client_file(&good).unwrap().token, token);

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = token.split('.').collect();
        let mut body = b64.decode(parts[1]).unwrap();
        body[12] = b'\n';
        let tampered = format!("{}.{}.{}", parts[0], b64.encode(&body), parts[2]);
        let bad = file("tampered.yaml", &tampered);
        let e = read_client_file(&bad).unwrap_err().to_string();
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains("credential (token:) is damaged"), "{e}");
        assert!(!e.contains("JSON") && !e.contains("column"), "{e}");

        let forged = serde_json::to_vec(&Claims {
            admin: true,
            ..claims.clone()
        })
        .unwrap();
        let forged = format!("{}.{}.{}", parts[0], b64.encode(forged), parts[2]);
        let e = read_client_file(&file("forged.yaml", &forged))
            .unwrap_err()
            .to_string();
        assert!(e.contains("forged.yaml"), "{e}");
        assert!(e.contains("signature does not match its contents"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
