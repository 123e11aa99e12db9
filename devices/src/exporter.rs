//! Serving a board: accept connections on a QUIC endpoint, check each client's token, allow one
//! lease holder at a time, and hand each channel request to its device's driver.
//!
//! Used by `jmpd` and, in-process, by `jmp local`. A misbehaving client (garbage, a wrong token,
//! a protocol violation) only ever ends its own connection; the exporter keeps serving.

use crate::config::{DeviceSpec, ExporterConfig};
use crate::serial::driver::{SerialDriver, Source};
use crate::tcp::TcpDriver;
use crate::Driver;
use jmp_protocol::{features, ChannelMode, ErrorCode, Hello, Welcome};
use jmp_transport::{Link, LinkEvent, LinkHandle};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, info_span, warn, Instrument};

/// Decides whether a Hello may attach. Direct mode checks a shared token; jmpd's lease-token
/// check (controller mode) implements it too.
pub trait Authorizer: Send + Sync + 'static {
    /// `Err(reason)`: refused, and the reason is shown to the client.
    fn check(&self, hello: &Hello) -> Result<Admission, String>;
}

/// What an accepted Hello is entitled to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The lease it attaches under (controller mode); `None` in direct mode.
    pub lease: Option<String>,
    /// When the session must end (Unix seconds); `None`: no limit.
    pub until: Option<u64>,
}

/// How long before a lease's end the attached user is warned.
pub const LEASE_WARNING: Duration = Duration::from_secs(300);

/// Direct mode: the client must present the token from the exporter's token file.
pub struct TokenAuth {
    digest: [u8; 32],
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenAuth {
    pub fn new(token: &str) -> Self {
        TokenAuth {
            digest: sha256(token.trim().as_bytes()),
        }
    }

    /// Reads the token file; creates it (0600, 32 random bytes as hex) if it does not exist.
    /// Returns whether it was created.
    pub fn from_file(path: &Path) -> Result<(TokenAuth, bool), String> {
        match std::fs::read_to_string(path) {
            Ok(t) if t.trim().is_empty() => Err(format!("token file {} is empty", path.display())),
            Ok(t) => Ok((TokenAuth::new(&t), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = random_token()?;
                write_secret(path, &token)
                    .map_err(|e| format!("cannot create token file {}: {e}", path.display()))?;
                Ok((TokenAuth::new(&token), true))
            }
            Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
        }
    }
}

pub fn random_token() -> Result<String, String> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| "no randomness available".to_string())?;
    Ok(hex::encode(b))
}

/// Writes a secret file readable only by its owner.
pub fn write_secret(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")
}

impl Authorizer for TokenAuth {
    fn check(&self, hello: &Hello) -> Result<Admission, String> {
        // Comparing digests keeps the comparison's timing independent of the secret.
        if sha256(hello.token.trim().as_bytes()) == self.digest {
            Ok(Admission::default())
        } else if hello.token.is_empty() {
            Err("no token presented".into())
        } else {
            Err("invalid token".into())
        }
    }
}

struct Holder {
    client: String,
    session: u64,
    since: Instant,
    conn: u64,
    link: LinkHandle,
    lease: Option<String>,
    until: Option<u64>,
    warned: bool,
}

pub struct Exporter {
    name: String,
    drivers: Vec<(String, Arc<dyn Driver>)>,
    auth: Arc<dyn Authorizer>,
    instance: u64,
    holder: Mutex<Option<Holder>>,
    next_conn: AtomicU64,
}

impl Exporter {
    /// Starts every device of the config (serial ports are opened, and retried, in the
    /// background). Needs a tokio runtime.
    pub fn from_config(cfg: &ExporterConfig, auth: Arc<dyn Authorizer>) -> Exporter {
        let mut drivers: Vec<(String, Arc<dyn Driver>)> = Vec::new();
        for (name, spec) in &cfg.export.0 {
            let history = spec.history_bytes();
            let d: Arc<dyn Driver> = match spec {
                DeviceSpec::Serial { path, .. } => Arc::new(SerialDriver::start(
                    name.clone(),
                    Source::Tty {
                        path: path.clone(),
                        settings: spec.line_settings().unwrap_or_default(),
                    },
                    history,
                )),
                DeviceSpec::SimConsole { hostname, .. } => Arc::new(SerialDriver::start(
                    name.clone(),
                    Source::Sim {
                        hostname: hostname
                            .clone()
                            .unwrap_or_else(|| cfg.metadata.name.clone()),
                    },
                    history,
                )),
                DeviceSpec::Tcp { host, port } => {
                    Arc::new(TcpDriver::new(name.clone(), host.clone(), *port))
                }
            };
            drivers.push((name.clone(), d));
        }
        let mut inst = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut inst);
        Exporter {
            name: cfg.metadata.name.clone(),
            drivers,
            auth,
            instance: u64::from_le_bytes(inst),
            holder: Mutex::new(None),
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock_holder(&self) -> std::sync::MutexGuard<'_, Option<Holder>> {
        self.holder.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who holds the board now, if anyone.
    pub fn holder(&self) -> Option<String> {
        self.lock_holder().as_ref().map(|h| h.client.clone())
    }

    /// Ends the session of `lease`, if it is attached, telling the client why.
    pub fn end_lease(&self, lease: &str, reason: &str) {
        let mut holder = self.lock_holder();
        if holder
            .as_ref()
            .is_some_and(|h| h.lease.as_deref() == Some(lease))
        {
            if let Some(h) = holder.take() {
                info!(client = %h.client, lease, "ending session: {reason}");
                h.link.bye(ErrorCode::LeaseEnded, reason.to_string());
            }
        }
    }

    /// The controller says `current` is this exporter's lease now: a session attached under any
    /// other lease is over (its end was missed while the controller was unreachable).
    pub fn keep_only_lease(&self, current: Option<&str>) {
        let mut holder = self.lock_holder();
        let stale = holder
            .as_ref()
            .and_then(|h| h.lease.as_deref())
            .is_some_and(|l| Some(l) != current);
        if stale {
            if let Some(h) = holder.take() {
                let lease = h.lease.unwrap_or_default();
                info!(client = %h.client, %lease, "ending session: its lease is no longer current");
                h.link
                    .bye(ErrorCode::LeaseEnded, format!("lease {lease} ended"));
            }
        }
    }

    /// A lease's end moved (extended or shortened); `until` in Unix seconds.
    pub fn set_lease_end(&self, lease: &str, until: u64) {
        let mut holder = self.lock_holder();
        if let Some(h) = holder.as_mut() {
            if h.lease.as_deref() == Some(lease) && h.until != Some(until) {
                h.until = Some(until);
                h.warned = false;
            }
        }
    }

    /// Ends a session whose lease ran out and warns one whose lease ends soon. Runs on a short
    /// period, so a session ends within a second of its lease even with no controller around.
    fn lease_watchdog(&self) {
        let now = jmp_transport::unix_now();
        let mut holder = self.lock_holder();
        let Some(h) = holder.as_mut() else { return };
        let Some(until) = h.until else { return };
        let lease = h.lease.clone().unwrap_or_default();
        if now >= until {
            info!(client = %h.client, %lease, "lease expired; ending the session");
            h.link
                .bye(ErrorCode::LeaseEnded, format!("lease {lease} expired"));
            *holder = None;
        } else if !h.warned && until - now <= LEASE_WARNING.as_secs() {
            h.warned = true;
            let left = until - now;
            h.link.control(
                0,
                jmp_protocol::ControlBody::Notice(format!(
                    "lease {lease} ends in {}m{:02}s; extend it with: jmp update lease {lease} --extend 30m",
                    left / 60,
                    left % 60
                )),
            );
        }
    }

    /// Accepts connections until `shutdown` completes, then tells the holder why and closes.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut watchdog = tokio::time::interval(Duration::from_millis(250));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = watchdog.tick() => self.lease_watchdog(),
                incoming = endpoint.accept() => match incoming {
                    Some(i) => {
                        let me = self.clone();
                        let peer = i.remote_address();
                        tokio::spawn(me.connection(i).instrument(info_span!("conn", %peer)));
                    }
                    None => break,
                },
            }
        }
        if let Some(h) = self.lock_holder().take() {
            h.link.bye(
                ErrorCode::Shutdown,
                format!("exporter {} is shutting down", self.name),
            );
        }
        // Give the Bye a moment to leave, then close whatever is left.
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        endpoint.close(
            ErrorCode::Shutdown
                .to_wire()
                .try_into()
                .unwrap_or(quinn::VarInt::from_u32(9)),
            b"exporter shutting down",
        );
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let peer = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                // Garbage and port scans end here; nothing else is affected.
                info!("handshake from {peer} failed: {e}");
                return;
            }
        };
        let mut link = match Link::exporter(conn).await {
            Ok(l) => l,
            Err(e) => {
                info!("connection from {peer} ended before Hello: {e}");
                return;
            }
        };
        let hello = match link.events.recv().await {
            Some(LinkEvent::Hello(h)) => h,
            Some(LinkEvent::Ended { reason, .. }) => {
                info!("connection from {peer} ended before Hello: {reason}");
                return;
            }
            _ => return,
        };
        // A lease granted a moment ago may not have reached this exporter from the controller
        // yet (the client can be faster than the push): a refusal is checked once more after a
        // short wait. It also slows down token guessing.
        let mut checked = self.auth.check(&hello);
        if checked.is_err() {
            tokio::time::sleep(Duration::from_millis(400)).await;
            checked = self.auth.check(&hello);
        }
        let admission = match checked {
            Ok(a) => a,
            Err(why) => {
                warn!(client = %hello.client, "refused {peer}: {why}");
                link.handle
                    .bye(ErrorCode::Unauthorized, format!("{}: {why}", self.name));
                drain(&mut link).await;
                return;
            }
        };
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // Decided under the lock, acted on outside it (a guard must not live across an await).
        let busy = {
            let mut holder = self.lock_holder();
            if let Some(h) = holder.as_ref() {
                if admission.lease.is_some() && h.lease != admission.lease {
                    // A valid token for another lease means the holder's lease is over (the
                    // controller granted the board again), even if its end has not reached us.
                    h.link.bye(
                        ErrorCode::LeaseEnded,
                        format!(
                            "lease {} ended; {} is now leased to {}",
                            h.lease.as_deref().unwrap_or("(direct)"),
                            self.name,
                            hello.client
                        ),
                    );
                    *holder = None;
                }
            }
            match holder.as_ref() {
                Some(h) if h.session != hello.session => Some(format!(
                    "{} is held by {} (attached {}s ago)",
                    self.name,
                    h.client,
                    h.since.elapsed().as_secs()
                )),
                other => {
                    if let Some(h) = other {
                        // The same attachment coming back (new network, or the old connection
                        // not yet timed out): the new connection wins.
                        h.link.bye(
                            ErrorCode::Replaced,
                            "replaced by a new connection of the same session",
                        );
                    }
                    *holder = Some(Holder {
                        client: hello.client.clone(),
                        session: hello.session,
                        since: Instant::now(),
                        conn: conn_id,
                        link: link.handle.clone(),
                        lease: admission.lease.clone(),
                        until: admission.until,
                        warned: false,
                    });
                    None
                }
            }
        };
        if let Some(why) = busy {
            warn!(client = %hello.client, "refused {peer}: {why}");
            link.handle.bye(ErrorCode::Busy, why);
            drain(&mut link).await;
            return;
        }
        link.handle.welcome(Welcome {
            exporter: self.name.clone(),
            features: features::ALL,
            instance: self.instance,
            devices: self.drivers.iter().map(|(_, d)| d.info()).collect(),
        });
        info!(client = %hello.client, "attached from {peer}");
        while let Some(ev) = link.events.recv().await {
            match ev {
                LinkEvent::Incoming(inc) => {
                    let device = inc.open.device.clone();
                    let Some(driver) = self
                        .drivers
                        .iter()
                        .find(|(n, _)| *n == device)
                        .map(|(_, d)| d.clone())
                    else {
                        let have: Vec<&str> =
                            self.drivers.iter().map(|(n, _)| n.as_str()).collect();
                        inc.reject(
                            ErrorCode::NoSuchDevice,
                            format!(
                                "{} has no device {device:?} (it has: {})",
                                self.name,
                                have.join(", ")
                            ),
                        );
                        continue;
                    };
                    let span = info_span!("channel", id = inc.open.channel, %device);
                    tokio::spawn(
                        async move {
                            match driver.open(&inc.open).await {
                                Ok(ch) => {
                                    if inc.open.mode == ChannelMode::Stream {
                                        if let Some(pipe) = inc.accept_stream(ch.offset()) {
                                            ch.serve(pipe).await;
                                        }
                                    } else {
                                        inc.reject(
                                            ErrorCode::Unsupported,
                                            "datagram channels are not served by this device",
                                        );
                                    }
                                }
                                Err(r) => {
                                    info!("refused: {}", r.reason);
                                    inc.reject(r.code, r.reason);
                                }
                            }
                        }
                        .instrument(span),
                    );
                }
                LinkEvent::Ended {
                    code,
                    reason,
                    by_peer,
                } => {
                    info!(client = %hello.client, %code, by_peer, "detached: {reason}");
                    break;
                }
                other => debug!(?other, "event"),
            }
        }
        let mut holder = self.lock_holder();
        if holder.as_ref().is_some_and(|h| h.conn == conn_id) {
            *holder = None;
        }
    }

    /// For tests and `jmp local`: the device drivers by name.
    pub fn driver(&self, name: &str) -> Option<Arc<dyn Driver>> {
        self.drivers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
    }
}

async fn drain(link: &mut Link) {
    while let Some(ev) = link.events.recv().await {
        if matches!(ev, LinkEvent::Ended { .. }) {
            break;
        }
    }
}
