//! The relay for exporters behind NAT: one UDP port per session that splices a client's and an
//! exporter's QUIC packets, which stay end-to-end encrypted between `jmp` and `jmpd` (the relay
//! has no key; it only moves datagrams). See [`jmp_protocol::relay`] for the punch and claim.
//!
//! Who may use it: a session is opened only for a client presenting a valid lease token of its
//! own active lease, for that lease's exporter, and only if the exporter registered with
//! `relay: true`. The exporter's side is bound to the address its punch came from, the client's
//! to the address of its claim; datagrams from anywhere else are dropped. Every session of a
//! lease ends when the lease ends (the port closes), and a session idle for a minute ends too.
//!
//! How many ports one holder may take: a lease has at most [`PER_LEASE`] live sessions (a new
//! one ends its oldest), and the ports of sessions that were ended but have not closed yet
//! count against the lease and its client until they have; a client holds at most
//! [`PER_CLIENT`] ports over all its leases, and with a port range (`--relay-ports`) at most a
//! quarter of it, so one client never takes the range from the others. Beyond that a session
//! is refused (busy, retry).
//!
//! Cost per datagram: none of its own. Datagrams are received in batches with GRO and sent on
//! with GSO at the same segment size, so a burst of QUIC packets costs one receive and one send
//! system call per batch.

use crate::metrics::Metrics;
use jmp_protocol::api::{CtlError, CtlErrorCode, RelayGrant, Reply};
use jmp_protocol::relay::{decode, encode, same_secret, secret_hex, Kind, Secret};
use jmp_transport::udp::QuietUdp;
use quinn::udp::{RecvMeta, Transmit};
use quinn::AsyncUdpSocket;
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// How long the exporter has to punch through after being told (it is online and registered,
/// so this is a round trip and a datagram).
const PUNCH_WAIT: Duration = Duration::from_secs(5);
/// How long the client has to claim the session after it was granted.
const CLAIM_WAIT: Duration = Duration::from_secs(30);
/// A session with no datagram for this long ends (QUIC's keep-alive sends one every 2 s).
const IDLE: Duration = Duration::from_secs(60);
/// Sessions one lease may have at once (an attachment, a `jmp power`, a reconnect in flight);
/// a new one beyond this ends the oldest.
pub const PER_LEASE: usize = 4;
/// Relay ports one client may hold at once, over all its leases, sessions still closing
/// included (at most a quarter of a `--relay-ports` range).
pub const PER_CLIENT: usize = 16;
/// Receive buffers per batch.
const BATCH: usize = 8;
/// How long a session outlives its lease: jmpd ends the session when it hears of the end (at
/// once, on its registration stream), and its `Bye` saying why must still reach the client.
pub const END_GRACE: Duration = Duration::from_secs(1);

/// Where relay sessions listen.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The address sessions bind (port from `ports`, or any).
    pub bind: IpAddr,
    /// An inclusive port range for sessions (for firewalls); `None`: any free port.
    pub ports: Option<(u16, u16)>,
    /// The host clients and exporters send to; `None`: the controller's host as each side
    /// reaches it.
    pub host: Option<String>,
}

/// Parses `--relay-ports A-B`.
pub fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("--relay-ports {s:?}: expected a range like 40000-40999"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|e| format!("--relay-ports {s:?}: {e}"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|e| format!("--relay-ports {s:?}: {e}"))?;
    if a == 0 || b < a {
        return Err(format!(
            "--relay-ports {s:?}: the range must be ascending and above 0"
        ));
    }
    Ok((a, b))
}

struct Handle {
    id: String,
    client: String,
    stop: watch::Sender<Option<&'static str>>,
    task: tokio::task::JoinHandle<()>,
}

/// A session told to stop whose port may still be bound (until its task has ended).
struct Closing {
    lease: String,
    client: String,
    task: tokio::task::AbortHandle,
}

/// Why a session was not opened.
#[derive(Debug, PartialEq)]
pub enum OpenError {
    /// The lease or its client holds as many relay ports as it may: retry later.
    Busy(String),
    /// No port could be bound, or the system failed.
    Failed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Busy(m) | OpenError::Failed(m) => f.write_str(m),
        }
    }
}

/// The core's view of the relay: opens sessions and ends them with their lease. Lives in the
/// core task; each session runs in its own task.
pub struct Relays {
    cfg: RelayConfig,
    metrics: Arc<Metrics>,
    by_lease: HashMap<String, Vec<Handle>>,
    closing: Vec<Closing>,
    next_port: u16,
}

fn random_secret() -> Result<Secret, String> {
    let mut s = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(s)
}

impl Relays {
    pub fn new(cfg: RelayConfig, metrics: Arc<Metrics>) -> Relays {
        let next_port = cfg.ports.map(|(a, _)| a).unwrap_or(0);
        Relays {
            cfg,
            metrics,
            by_lease: HashMap::new(),
            closing: Vec::new(),
            next_port,
        }
    }

    /// (live sessions per lease, ports per lease, ports per client): see the module's
    /// documentation. A lease may hold one more port than live sessions, so that a new
    /// session can replace one while the replaced one closes.
    fn limits(&self) -> (usize, usize, usize) {
        let per_client = match self.cfg.ports {
            Some((lo, hi)) => ((usize::from(hi - lo) + 1) / 4).clamp(2, PER_CLIENT),
            None => PER_CLIENT,
        };
        let lease_ports = (2 * PER_LEASE).min(per_client);
        (PER_LEASE.min(lease_ports - 1), lease_ports, per_client)
    }

    /// Forgets sessions whose tasks have ended (their ports are closed).
    fn reap(&mut self) {
        self.closing.retain(|c| !c.task.is_finished());
        self.by_lease.retain(|_, list| {
            list.retain(|h| !h.task.is_finished());
            !list.is_empty()
        });
    }

    /// Ports held (live or closing) by sessions matching `lease` and `client` (`None`: any).
    fn held(&self, lease: Option<&str>, client: Option<&str>) -> usize {
        let fits = |l: &str, c: &str| lease.is_none_or(|x| x == l) && client.is_none_or(|x| x == c);
        let live: usize = self
            .by_lease
            .iter()
            .map(|(l, list)| list.iter().filter(|h| fits(l, &h.client)).count())
            .sum();
        live + self
            .closing
            .iter()
            .filter(|c| fits(&c.lease, &c.client))
            .count()
    }

    /// Tells `h` to stop; its port counts until its task has ended.
    fn stop(&mut self, lease: &str, h: Handle, why: &'static str) {
        let _ = h.stop.send(Some(why));
        self.closing.push(Closing {
            lease: lease.to_string(),
            client: h.client,
            task: h.task.abort_handle(),
        });
    }

    fn bind(&mut self) -> Result<std::net::UdpSocket, String> {
        let Some((lo, hi)) = self.cfg.ports else {
            return std::net::UdpSocket::bind((self.cfg.bind, 0))
                .map_err(|e| format!("cannot bind a relay port on {}: {e}", self.cfg.bind));
        };
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= hi { lo } else { port + 1 };
            if let Ok(s) = std::net::UdpSocket::bind((self.cfg.bind, port)) {
                return Ok(s);
            }
        }
        Err(format!(
            "every relay port in {lo}-{hi} on {} is in use",
            self.cfg.bind
        ))
    }

    /// Opens a session for `lease` (held by `holder`) on `exporter`. The client's answer
    /// (`Relay`, or an error) goes to `client` once the exporter has punched through; the
    /// returned grant is what the exporter must be sent (on its registration stream) to punch.
    pub fn open(
        &mut self,
        lease: &str,
        holder: &str,
        exporter: &str,
        client: mpsc::UnboundedSender<Reply>,
    ) -> Result<RelayGrant, OpenError> {
        self.reap();
        let (live_max, lease_max, client_max) = self.limits();
        // A new session of a lease that has its share ends its oldest (a reconnect replaces
        // the connection it lost).
        loop {
            let list = self.by_lease.entry(lease.to_string()).or_default();
            if list.len() < live_max {
                break;
            }
            let old = list.remove(0);
            self.stop(lease, old, "replaced");
        }
        let n = self.held(Some(lease), None);
        if n >= lease_max {
            return Err(OpenError::Busy(format!(
                "lease {lease} holds {n} relay ports (at most {lease_max}, sessions still closing included); retry in a moment"
            )));
        }
        let n = self.held(None, Some(holder));
        if n >= client_max {
            return Err(OpenError::Busy(format!(
                "client {holder} holds {n} relay ports over its leases (at most {client_max}); detach an attachment through the relay, or retry in a moment"
            )));
        }
        let socket = self.bind().map_err(OpenError::Failed)?;
        let fail = |e: String| OpenError::Failed(e);
        let port = socket.local_addr().map_err(|e| fail(e.to_string()))?.port();
        let exporter_secret = random_secret().map_err(fail)?;
        let client_secret = random_secret().map_err(fail)?;
        let id = hex::encode(&random_secret().map_err(fail)?[..6]);
        let udp = QuietUdp::new(socket).map_err(|e| fail(format!("relay socket: {e}")))?;
        udp.set_buffer_sizes(4 << 20);
        let (stop, stop_rx) = watch::channel(None);
        let grant = |secret: &Secret| RelayGrant {
            session: id.clone(),
            port,
            host: self.cfg.host.clone(),
            secret: secret_hex(secret),
        };
        let session = RelaySession {
            id: id.clone(),
            lease: lease.to_string(),
            exporter: exporter.to_string(),
            udp,
            exporter_secret,
            client_secret,
            client_reply: Some((client, grant(&client_secret))),
            stop: stop_rx,
            metrics: self.metrics.clone(),
        };
        let task = tokio::spawn(session.run());
        info!(session = %id, lease, exporter, port, "relay session opened");
        self.by_lease
            .entry(lease.to_string())
            .or_default()
            .push(Handle {
                id: id.clone(),
                client: holder.to_string(),
                stop,
                task,
            });
        Ok(grant(&exporter_secret))
    }

    /// Ends every session of `lease` (it ended): their ports close after [`END_GRACE`], time
    /// for jmpd's `Bye` (why the session ended) to reach the client.
    pub fn end_lease(&mut self, lease: &str) {
        let handles = self.by_lease.remove(lease).unwrap_or_default();
        if handles.is_empty() {
            return;
        }
        debug!(
            lease,
            sessions = handles.len(),
            "ending relay sessions: the lease ended"
        );
        // Their ports count against the client until they have closed.
        for h in &handles {
            self.closing.push(Closing {
                lease: lease.to_string(),
                client: h.client.clone(),
                task: h.task.abort_handle(),
            });
        }
        tokio::spawn(async move {
            tokio::time::sleep(END_GRACE).await;
            for h in handles {
                debug!(session = %h.id, "relay session: its lease ended");
                let _ = h.stop.send(Some("lease_ended"));
            }
        });
    }
}

struct RelaySession {
    id: String,
    lease: String,
    exporter: String,
    udp: Arc<QuietUdp>,
    exporter_secret: Secret,
    client_secret: Secret,
    /// Answered once the exporter has punched through.
    client_reply: Option<(mpsc::UnboundedSender<Reply>, RelayGrant)>,
    stop: watch::Receiver<Option<&'static str>>,
    metrics: Arc<Metrics>,
}

impl RelaySession {
    async fn run(mut self) {
        self.metrics.relay_sessions.inc();
        let reason = self.splice().await;
        self.metrics.relay_sessions.dec();
        self.metrics.relay_ended.with_label_values(&[reason]).inc();
        if let Some((tx, _)) = self.client_reply.take() {
            let why = match reason {
                "no_punch" => format!(
                    "exporter {} did not reach the relay within {}s (is it connected to the controller?)",
                    self.exporter,
                    PUNCH_WAIT.as_secs()
                ),
                "lease_ended" => format!("lease {} ended", self.lease),
                other => format!("the relay session ended ({other})"),
            };
            let _ = tx.send(Reply::Error(CtlError::new(CtlErrorCode::AllOffline, why)));
        }
        info!(session = %self.id, lease = %self.lease, reason, "relay session ended");
    }

    /// Moves datagrams until the session ends; why it ended.
    async fn splice(&mut self) -> &'static str {
        let to_exporter = self.metrics.relay_bytes.with_label_values(&["to_exporter"]);
        let to_client = self.metrics.relay_bytes.with_label_values(&["to_client"]);
        let gro = self.udp.max_receive_segments().max(1);
        let gso = self.udp.max_transmit_segments().max(1);
        let size = (gro * 1500).max(65536);
        let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; size]).collect();
        let mut meta = [RecvMeta::default(); BATCH];
        // Each side's address, and the local address it sent to: on a host with several
        // addresses (a relay between two networks) the answers must come from the address the
        // side sent to, or its NAT or firewall takes them for a new, inbound flow.
        let mut exporter: Option<(SocketAddr, Option<IpAddr>)> = None;
        let mut client: Option<(SocketAddr, Option<IpAddr>)> = None;
        let punch_deadline = tokio::time::Instant::now() + PUNCH_WAIT;
        let claim_deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        let mut last = tokio::time::Instant::now();
        loop {
            let deadline = if exporter.is_none() {
                punch_deadline
            } else if client.is_none() {
                claim_deadline
            } else {
                last + IDLE
            };
            let n = {
                let mut slices: Vec<IoSliceMut> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let udp = self.udp.clone();
                let recv = std::future::poll_fn(|cx| udp.poll_recv(cx, &mut slices, &mut meta));
                tokio::select! {
                    r = recv => match r {
                        Ok(n) => n,
                        Err(e) => {
                            warn!(session = %self.id, "relay socket: {e}");
                            return "socket_error";
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        return if exporter.is_none() {
                            "no_punch"
                        } else if client.is_none() {
                            "unclaimed"
                        } else {
                            "idle"
                        };
                    }
                    _ = self.stop.changed() => {
                        return (*self.stop.borrow()).unwrap_or("stopped");
                    }
                }
            };
            last = tokio::time::Instant::now();
            for (m, buf) in meta.iter().zip(&bufs).take(n) {
                let data = &buf[..m.len];
                if m.len == m.stride {
                    if let Some((kind, secret)) = decode(data) {
                        match kind {
                            Kind::Punch if same_secret(&secret, &self.exporter_secret) => {
                                if exporter.map(|e| e.0) != Some(m.addr) {
                                    debug!(session = %self.id, from = %m.addr, "exporter punched through");
                                }
                                exporter = Some((m.addr, m.dst_ip));
                                if let Some((tx, grant)) = self.client_reply.take() {
                                    let _ = tx.send(Reply::Relay(grant));
                                }
                                continue;
                            }
                            Kind::Claim
                                if exporter.is_some()
                                    && same_secret(&secret, &self.client_secret) =>
                            {
                                if client.map(|c| c.0) != Some(m.addr) {
                                    debug!(session = %self.id, from = %m.addr, "client claimed the session");
                                }
                                client = Some((m.addr, m.dst_ip));
                                self.send((m.addr, m.dst_ip), &encode(Kind::Ack, &secret), None)
                                    .await;
                                continue;
                            }
                            // Not this session's secret: it may be a QUIC packet that happens
                            // to look like one; treated as payload below.
                            _ => {}
                        }
                    }
                }
                let (to, counter) = if Some(m.addr) == exporter.map(|e| e.0) {
                    (client, &to_client)
                } else if Some(m.addr) == client.map(|c| c.0) {
                    (exporter, &to_exporter)
                } else {
                    // Neither side: someone else probing the port.
                    continue;
                };
                let Some(to) = to else { continue };
                counter.inc_by(m.len as u64);
                // GRO gave several datagrams of `stride` bytes: send them on as one GSO
                // batch of the same segment size (at most `gso` segments at a time).
                let stride = m.stride.max(1);
                for chunk in data.chunks(stride * gso) {
                    let seg = (chunk.len() > stride).then_some(stride);
                    self.send(to, chunk, seg).await;
                }
            }
        }
    }

    /// Sends `data` (one datagram, or `segment`-sized ones) to `to`, waiting for room when the
    /// socket is full. Other errors drop it, as the network would.
    async fn send(
        &self,
        (to, from): (SocketAddr, Option<IpAddr>),
        data: &[u8],
        segment: Option<usize>,
    ) {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: segment,
            src_ip: from,
        };
        for _ in 0..16 {
            match self.udp.try_send(&t) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.udp.writable().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!(session = %self.id, "relay send to {to}: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(parse_ports("40000-40010"), Ok((40000, 40010)));
        assert!(parse_ports("40010-40000")
            .unwrap_err()
            .contains("ascending"));
        assert!(parse_ports("x").unwrap_err().contains("range"));
        assert!(parse_ports("1-99999").is_err());
    }

    /// One client opening relay sessions as fast as it can, on one lease and on many, holds at
    /// most its share of the port range (a quarter: 4 of 16 ports, sessions still closing
    /// included); beyond it it is told to retry, and another client still gets a port.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_client_cannot_take_the_relay_port_range() {
        let lo = 40000 + (std::process::id() % 1000) as u16 * 16;
        let mut relays = Relays::new(
            RelayConfig {
                bind: "127.0.0.1".parse().unwrap(),
                ports: Some((lo, lo + 15)),
                host: None,
            },
            Arc::new(Metrics::new()),
        );
        let held_outside = || {
            (lo..=lo + 15)
                .filter(|p| std::net::UdpSocket::bind(("127.0.0.1", *p)).is_err())
                .count()
        };
        let before = held_outside();
        let mut opened = 0;
        for lease in ["L1", "L2", "L3", "L4", "L5", "L6"] {
            for _ in 0..6 {
                let (tx, _rx) = mpsc::unbounded_channel();
                match relays.open(lease, "c1", "e1", tx) {
                    Ok(_) => opened += 1,
                    Err(OpenError::Busy(why)) => {
                        assert!(why.contains("retry"), "{why}")
                    }
                    Err(e) => panic!("not a refusal of the client's share: {e}"),
                }
                assert!(relays.held(None, Some("c1")) <= 4);
                assert!(relays.held(Some(lease), None) <= 4);
                assert!(
                    held_outside() <= before + 4,
                    "c1 holds more than its share of the range"
                );
            }
        }
        assert!(opened >= 4, "c1 got its share: {opened}");
        let (tx, _rx) = mpsc::unbounded_channel();
        relays
            .open("L9", "c2", "e2", tx)
            .expect("another client still gets a relay port");
        for l in ["L1", "L2", "L3", "L4", "L5", "L6", "L9"] {
            relays.end_lease(l);
        }
    }

    /// A session end to end on loopback: the exporter punches, the client claims, datagrams
    /// flow both ways unchanged, strangers are ignored, and ending the lease closes the port.
    // Two workers: the test's blocking sockets stand for other processes, and the session's
    // task must run meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_splices_only_its_two_sides_until_its_lease_ends() {
        let metrics = Arc::new(Metrics::new());
        let mut relays = Relays::new(
            RelayConfig {
                bind: "127.0.0.1".parse().unwrap(),
                ports: None,
                host: None,
            },
            metrics.clone(),
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let eg = relays.open("L1", "c1", "e1", tx).expect("opened");
        let relay: SocketAddr = format!("127.0.0.1:{}", eg.port).parse().unwrap();
        let exp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        exp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let secret = jmp_protocol::relay::parse_secret(&eg.secret).unwrap();
        jmp_transport::relay::punch(&exp, relay, &secret).unwrap();
        let cg = match rx.recv().await {
            Some(Reply::Relay(g)) => g,
            other => panic!("{other:?}"),
        };
        assert_eq!(cg.port, eg.port);
        assert_ne!(cg.secret, eg.secret, "each side has its own secret");
        let cli = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // The exporter's secret does not claim the client side.
        assert!(
            jmp_transport::relay::claim(&cli, relay, &secret, Duration::from_millis(600))
                .await
                .is_err()
        );
        let csecret = jmp_protocol::relay::parse_secret(&cg.secret).unwrap();
        jmp_transport::relay::claim(&cli, relay, &csecret, Duration::from_secs(5))
            .await
            .expect("claimed");
        cli.send_to(b"\x40to the exporter", relay).await.unwrap();
        let mut buf = [0u8; 128];
        let (n, from) = exp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\x40to the exporter");
        assert_eq!(from, relay);
        exp.send_to(b"\x41to the client", relay).unwrap();
        let (n, _) = cli.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"\x41to the client");
        // A stranger's datagram reaches nobody.
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"\x40let me in", relay).unwrap();
        exp.send_to(b"\x41after the stranger", relay).unwrap();
        let (n, _) = cli.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"\x41after the stranger");
        exp.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            exp.recv_from(&mut buf).is_err(),
            "the stranger's datagram was dropped"
        );
        // The lease ends: the session's port closes (a send to it is refused by ICMP).
        relays.end_lease("L1");
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.connect(relay).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut refused = false;
        for _ in 0..50 {
            let _ = probe.send(b"\x40anyone?");
            if let Err(e) = probe.recv(&mut buf) {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "the relay port is closed after the lease ended");
        let text = metrics.render();
        assert!(
            text.contains("jmp_relay_sessions_ended_total{reason=\"lease_ended\"} 1"),
            "{text}"
        );
    }
}
