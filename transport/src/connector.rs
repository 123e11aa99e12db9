//! How a client reaches an exporter: a QUIC connection pinned to the exporter's certificate
//! (a given fingerprint, or trust on first use recorded in `known_exporters`), straight or
//! through the controller's relay, and the `Hello` with the token. Every client program
//! (`jmp attach`, the kinds' verbs, `jmp-mount`) connects through a [`Connector`].

use crate::link::LinkError;
use crate::{client_endpoint, connect, ConnectError, Fingerprint, Link};
use jmp_protocol::{ErrorCode, Hello, Welcome};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{info, warn};

/// Which certificate the exporter must present.
#[derive(Debug, Clone)]
pub enum Pin {
    /// `--fingerprint`: exactly this certificate.
    Fingerprint(Fingerprint),
    /// Trust on first use, recorded in the known-exporters file under this name.
    Tofu { file: PathBuf, name: String },
    /// Whatever the exporter presents; the caller pins what it saw for the connections that
    /// follow (`jmp-mount` without `--fingerprint`: trust for the life of the process).
    Any,
}

/// Opens a relay session at the controller for the lease token given: the relay's address and
/// the claim's secret, or why not (`LeaseEnded` and `Unauthorized` are final).
pub type RelayOpen = Box<
    dyn Fn(
            String,
        ) -> crate::BoxFuture<
            'static,
            Result<(SocketAddr, jmp_protocol::relay::Secret), (ErrorCode, String)>,
        > + Send
        + Sync,
>;

/// How `jmp attach` reaches an exporter of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Straight to the exporter and through the controller's relay (if it takes relayed
    /// sessions) at once: the first connection that proves the pinned fingerprint is used. An
    /// impostor at the direct address (another fingerprint) is never used: a warning, and
    /// the relay.
    Auto,
    /// Only straight to the exporter.
    Direct,
    /// Only through the controller's relay.
    Relay,
}

/// The relay as a second way to the exporter.
pub struct RelayRoute {
    pub open: RelayOpen,
    pub via: Via,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("the exporter refused: {reason}")]
    Refused { code: ErrorCode, reason: String },
    /// A leased exporter's address answered with another certificate (final, as a mismatch).
    #[error("{0}")]
    Impostor(String),
    #[error("{0}")]
    Other(String),
}

impl ConnectorError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ConnectorError::Refused { code, .. } => code.exit_code(),
            _ => jmp_protocol::exit::FAILURE,
        }
    }
}

/// A connection to an exporter, as every `jmp` command that talks to one makes it: pinning,
/// trust on first use, Hello.
pub struct Connector {
    pub addr: SocketAddr,
    pub pin: Pin,
    pub client: String,
    pub session: u64,
    pub features: u64,
    endpoint: quinn::Endpoint,
    pub token: Mutex<String>,
    pub relay: Option<RelayRoute>,
    /// The last connection went through the relay: the next one tries it first.
    relayed: std::sync::atomic::AtomicBool,
    /// The endpoint of the relayed connection (its own socket, the one that claimed the
    /// session).
    relay_endpoint: Mutex<Option<quinn::Endpoint>>,
}

impl Connector {
    pub fn new(
        addr: SocketAddr,
        pin: Pin,
        client: String,
        token: String,
        features: u64,
    ) -> Result<Self, ConnectorError> {
        let endpoint = client_endpoint(addr)
            .map_err(|e| ConnectorError::Other(format!("cannot open a UDP socket: {e}")))?;
        let mut id = [0u8; 8];
        ring_fill(&mut id)?;
        Ok(Connector {
            addr,
            pin,
            client,
            session: u64::from_le_bytes(id),
            features,
            endpoint,
            token: Mutex::new(token),
            relay: None,
            relayed: std::sync::atomic::AtomicBool::new(false),
            relay_endpoint: Mutex::new(None),
        })
    }

    /// Whether the current connection goes through the controller's relay.
    pub fn is_relayed(&self) -> bool {
        self.relayed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The QUIC connection, straight or through the relay (see [`Via`]).
    async fn dial(
        &self,
        pin: Option<Fingerprint>,
    ) -> Result<(quinn::Connection, Fingerprint), ConnectorError> {
        use std::sync::atomic::Ordering::Relaxed;
        let direct = || connect(&self.endpoint, self.addr, jmp_protocol::ALPN_EXPORTER, pin);
        let Some(route) = &self.relay else {
            return Ok(direct().await?);
        };
        let relayed = |why: String| async move {
            info!("{why}; trying through the controller's relay");
            let r = self.relayed(route, pin).await;
            if r.is_ok() {
                self.relayed.store(true, Relaxed);
            }
            r
        };
        match route.via {
            Via::Direct => direct().await.map_err(leased_mismatch),
            Via::Relay => relayed("--via relay".into()).await,
            Via::Auto if self.relayed.load(Relaxed) => match self.relayed(route, pin).await {
                Ok(c) => Ok(c),
                Err(e @ ConnectorError::Refused { .. }) => Err(e),
                Err(e) => {
                    info!("the relay failed ({e}); trying {} directly", self.addr);
                    let c = direct().await.map_err(leased_mismatch)?;
                    self.relayed.store(false, Relaxed);
                    Ok(c)
                }
            },
            Via::Auto => self.race(route, pin).await,
        }
    }

    /// `--via auto` on a first connection: direct and relayed at once, the first that proves
    /// the pin wins (the other attempt is dropped, which abandons it). The direct path failing
    /// only waits for the relay; an impostor there (another fingerprint) is warned about and
    /// never used. With both failed: a final refusal of the relay if any, else the direct
    /// path's error (an impostor's mismatch above all, which names what was seen).
    async fn race(
        &self,
        route: &RelayRoute,
        pin: Option<Fingerprint>,
    ) -> Result<(quinn::Connection, Fingerprint), ConnectorError> {
        use std::sync::atomic::Ordering::Relaxed;
        let direct = connect(&self.endpoint, self.addr, jmp_protocol::ALPN_EXPORTER, pin);
        let relayed = self.relayed(route, pin);
        tokio::pin!(direct, relayed);
        let mut direct_err: Option<ConnectError> = None;
        let mut relay_err: Option<ConnectorError> = None;
        loop {
            tokio::select! {
                r = &mut direct, if direct_err.is_none() => match r {
                    Ok(c) => return Ok(c),
                    Err(ConnectError::FingerprintMismatch { peer, addr, expected, got }) => {
                        warn!("the {peer} at {addr} presented certificate {got}, but the controller registered {expected} for the leased exporter: not using {addr} (an impostor, or an address the exporter has left); trying the controller's relay");
                        direct_err = Some(ConnectError::FingerprintMismatch { peer, addr, expected, got });
                    }
                    Err(e) => {
                        info!("{} is not reachable directly ({e}); waiting for the controller's relay", self.addr);
                        direct_err = Some(e);
                    }
                },
                r = &mut relayed, if relay_err.is_none() => match r {
                    Ok(c) => {
                        self.relayed.store(true, Relaxed);
                        return Ok(c);
                    }
                    Err(e) => {
                        info!("the controller's relay failed ({e}); waiting for {} directly", self.addr);
                        relay_err = Some(e);
                    }
                },
            }
            // (Each error is kept until both are in: its branch's guard must stay off, a
            // finished future is never polled again.)
            if direct_err.is_some() && relay_err.is_some() {
                let (Some(d), Some(r)) = (direct_err.take(), relay_err.take()) else {
                    unreachable!("both checked above");
                };
                return Err(match (d, r) {
                    (_, r @ ConnectorError::Refused { .. }) => r,
                    (d, _) => leased_mismatch(d),
                });
            }
        }
    }

    /// A relay session from the controller, claimed from a socket of our own, and QUIC to the
    /// exporter through it: end to end, pinned to the exporter's fingerprint as always.
    async fn relayed(
        &self,
        route: &RelayRoute,
        pin: Option<Fingerprint>,
    ) -> Result<(quinn::Connection, Fingerprint), ConnectorError> {
        let token = self.token.lock().map(|t| t.clone()).unwrap_or_default();
        let (relay, secret) = (route.open)(token).await.map_err(|(code, why)| {
            if is_final(code) {
                ConnectorError::Refused { code, reason: why }
            } else {
                ConnectorError::Other(format!("relay: {why}"))
            }
        })?;
        let bind: SocketAddr = if relay.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let other = |e: std::io::Error| ConnectorError::Other(format!("relay at {relay}: {e}"));
        let sock = tokio::net::UdpSocket::bind(bind).await.map_err(other)?;
        crate::relay::claim(&sock, relay, &secret, Duration::from_secs(5))
            .await
            .map_err(other)?;
        let ep = crate::client_endpoint_on(sock.into_std().map_err(other)?).map_err(other)?;
        let (conn, fp) = connect(&ep, relay, jmp_protocol::ALPN_EXPORTER, pin).await?;
        info!("connected to the exporter through the controller's relay at {relay}");
        if let Ok(mut e) = self.relay_endpoint.lock() {
            *e = Some(ep);
        }
        Ok((conn, fp))
    }

    pub async fn connect(&self) -> Result<(Link, Welcome, Fingerprint), ConnectorError> {
        let pin = match &self.pin {
            Pin::Fingerprint(f) => Some(*f),
            Pin::Tofu { file, name } => {
                crate::known::lookup(file, name).map_err(ConnectorError::Other)?
            }
            Pin::Any => None,
        };
        let (conn, fp) = self.dial(pin).await?;
        let hello = Hello {
            features: self.features,
            client: self.client.clone(),
            session: self.session,
            token: self.token.lock().map(|t| t.clone()).unwrap_or_default(),
        };
        match Link::client(conn, hello).await {
            Ok((link, welcome)) => {
                // Trust on first use is recorded only once the exporter took our token: an
                // exporter that refuses it (the wrong address, or the wrong token) is not the
                // one we were given the token for, and must not become trusted.
                if let (Pin::Tofu { file, name }, None) = (&self.pin, pin) {
                    match crate::known::record(file, name, fp) {
                        Ok(()) => info!(
                            "trusting exporter {name} ({fp}) from now on; recorded in {}",
                            file.display()
                        ),
                        Err(e) => warn!(
                            "cannot record {name}'s fingerprint in {}: {e}",
                            file.display()
                        ),
                    }
                }
                Ok((link, welcome, fp))
            }
            Err(LinkError::Refused { code, reason }) => {
                Err(ConnectorError::Refused { code, reason })
            }
            Err(e) => Err(ConnectorError::Other(e.to_string())),
        }
    }

    /// Lets a last message (a Bye) leave before the endpoint goes.
    pub async fn linger(&self, link: &Link) {
        let _ =
            tokio::time::timeout(Duration::from_millis(300), link.handle.connection_closed()).await;
    }
}

/// A connection to a leased exporter (its pin is the fingerprint the controller registered)
/// that met another certificate: `jmp trust pin` would change nothing here (and would pin
/// whoever answered), so the error says what it is and what reaches the real exporter.
fn leased_mismatch(e: ConnectError) -> ConnectorError {
    match e {
        ConnectError::FingerprintMismatch {
            addr,
            expected,
            got,
            ..
        } => ConnectorError::Impostor(format!(
            "the exporter at {addr} presented certificate {got}, but the controller registered \
             {expected} for the leased exporter: this is not it (an impostor, or an address the \
             exporter has left). Not connecting; `--via relay` reaches it through the \
             controller if it takes relayed sessions, and the lab's administrator can check \
             the address it registers"
        )),
        other => other.into(),
    }
}

fn ring_fill(b: &mut [u8]) -> Result<(), ConnectorError> {
    use rand::RngCore;
    rand::rngs::OsRng
        .try_fill_bytes(b)
        .map_err(|e| ConnectorError::Other(format!("the system's random source failed: {e}")))
}

/// Refusals a retry cannot fix.
pub fn is_final(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unauthorized | ErrorCode::Busy | ErrorCode::Replaced | ErrorCode::LeaseEnded
    )
}
