//! quinn endpoints for jmp: server (exporter) and client, TLS 1.3 with the ring provider, and
//! the client's certificate pinning.

use crate::identity::{Fingerprint, Identity};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A peer that stays silent this long is gone. Long enough to ride out a short network blip,
/// short enough that `jmp attach` starts reconnecting soon after a real loss.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// The same for connections to the controller, from jmp and jmpd. Shorter because noticing a
/// dead controller is what a failover to another one waits for, and because nothing is lost
/// by giving up early: a waiting lease request keeps its place for a grace period and is
/// retried by its request id; an exporter re-registers within a second.
pub const CONTROLLER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
pub const CONTROLLER_KEEP_ALIVE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("cannot reach the {peer} at {addr}: {source}")]
    Connection {
        peer: &'static str,
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("no answer from the {peer} at {addr} within {}s (is it running, and is UDP to it allowed?)", timeout.as_secs())]
    NoAnswer {
        peer: &'static str,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error(
        "the {peer} at {addr} presented certificate {got}, but {expected} is pinned for it. \
         This is what an impostor would look like. {}",
        mismatch_advice(peer, addr, got)
    )]
    FingerprintMismatch {
        peer: &'static str,
        addr: SocketAddr,
        expected: Fingerprint,
        got: Fingerprint,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// What to do about a fingerprint mismatch, for the peer's kind: an exporter's pin is this
/// machine's (`jmp trust pin`); the controller's is the client config's `fingerprint:`, which
/// `jmp trust` does not change.
fn mismatch_advice(peer: &str, addr: &SocketAddr, got: &Fingerprint) -> String {
    if peer == "controller" {
        format!(
            "The controller's fingerprint is pinned by the client config's `fingerprint:` (`jmp \
             trust pin` does not change it). If the controller's identity was regenerated on \
             purpose, check {got} with the lab's administrator (jmp-controller prints its \
             fingerprint at start) and get a new client config from them (`jmp config client \
             create NAME --from FILE`), or set `fingerprint: {got}` in the client config"
        )
    } else {
        format!(
            "If its identity was regenerated on purpose (a re-imaged lab host), trust the new \
             one with `jmp trust pin {addr} {got}` after checking it (jmpd prints its \
             fingerprint at start)"
        )
    }
}

/// ring's provider with AES-128-GCM first: as safe for this use and about a third less work
/// per byte than AES-256, which rustls would otherwise pick. Both ends prefer it.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 1,
    });
    Arc::new(p)
}

/// Endpoint settings shared by both sides: the largest UDP payload we accept, which the peer's
/// MTU discovery may grow into (on loopback and jumbo-frame links).
fn endpoint_config(
    reset_key: Option<Arc<dyn quinn_proto::crypto::HmacKey>>,
) -> quinn::EndpointConfig {
    let mut c = match reset_key {
        Some(k) => quinn::EndpointConfig::new(k),
        None => quinn::EndpointConfig::default(),
    };
    let _ = c.max_udp_payload_size(max_mtu());
    c
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s fits a QUIC varint"),
    ));
    // Every TCP connection through a forward is a stream: allow many at once.
    t.max_concurrent_bidi_streams(1024u32.into());
    // Windows sized for a busy host: when a peer is descheduled for a few milliseconds the
    // effective round trip grows, and the default 1.25 MB stream window would cap a forward
    // well below what the CPU can move.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    // MTU discovery may go beyond Ethernet's 1500 where the path allows (loopback, jumbo
    // frames): fewer, larger packets cost less CPU per byte. On a 1500 path the larger probes
    // are simply lost and the MTU stays near 1452.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_mtu());
    t.mtu_discovery_config(Some(mtu));
    // For experiments (docs/benchmarks.md), the QUIC ACK frequency extension: ask the peer to
    // acknowledge only every `JMP_ACK_THRESHOLD`+1 ack-eliciting packets (quinn's default is
    // every second: fewer ACKs are fewer packets to build, send and process per byte of a
    // bulk transfer), and within `JMP_ACK_DELAY_US` µs rather than the default 25 ms (the
    // delay a lost last packet, such as a keystroke's, waits out before it is sent again).
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    let (threshold, delay) = (env_num("JMP_ACK_THRESHOLD"), env_num("JMP_ACK_DELAY_US"));
    if threshold.is_some() || delay.is_some() {
        let mut ack = quinn::AckFrequencyConfig::default();
        if let Some(n) = threshold {
            ack.ack_eliciting_threshold(n.into());
        }
        if let Some(us) = delay {
            ack.max_ack_delay(Some(Duration::from_micros(us.into())));
        }
        t.ack_frequency_config(Some(ack));
    }
    // For experiments (docs/benchmarks.md): the congestion controller, `cubic` (quinn's
    // default) unless `JMP_CONGESTION` says `bbr` or `newreno`.
    match std::env::var("JMP_CONGESTION").as_deref() {
        Ok("bbr") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Ok("newreno") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        _ => {}
    }
    t
}

/// Largest UDP payload MTU discovery may try (`JMP_MTU_MAX` overrides, for experiments).
fn max_mtu() -> u16 {
    std::env::var("JMP_MTU_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MAX_MTU)
}

pub const DEFAULT_MAX_MTU: u16 = 1452;

/// The exporter's endpoint on an already bound socket (so tests and `jmp local` bind port 0).
pub fn server_endpoint(
    socket: std::net::UdpSocket,
    identity: &Identity,
    alpn: &[u8],
) -> Result<quinn::Endpoint, ConnectError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| ConnectError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config()));
    let mut endpoint_config = endpoint_config(Some(Arc::new(identity.reset_key())));
    let cid_key = identity.cid_key();
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    make_endpoint(endpoint_config, Some(server), socket)
        .map_err(|e| ConnectError::Tls(format!("cannot create endpoint: {e}")))
}

/// A client endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(peer: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if peer.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    make_endpoint(endpoint_config(None), None, socket)
}

/// A client endpoint on a socket the caller has already bound (and, for a relayed session,
/// claimed at the relay: the relay forwards only what comes from the claiming address).
pub fn client_endpoint_on(socket: std::net::UdpSocket) -> std::io::Result<quinn::Endpoint> {
    make_endpoint(endpoint_config(None), None, socket)
}

/// An endpoint over [`crate::udp::QuietUdp`] (fewer wake-ups per round trip), or over quinn's
/// own tokio socket with `JMP_UDP_SOCKET=quinn` (for comparing the two in benchmarks).
fn make_endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = Arc::new(quinn::TokioRuntime);
    if std::env::var("JMP_UDP_SOCKET").is_ok_and(|v| v == "quinn") {
        return quinn::Endpoint::new(config, server, socket, runtime);
    }
    let udp = crate::udp::QuietUdp::new(socket)?;
    // For experiments (docs/benchmarks.md): socket buffers of `JMP_UDP_BUFFER` bytes (the
    // kernel caps them at net.core.rmem_max / wmem_max).
    if let Some(n) = std::env::var("JMP_UDP_BUFFER")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        udp.set_buffer_sizes(n);
    }
    quinn::Endpoint::new_with_abstract_socket(config, server, udp, runtime)
}

/// Accepts any certificate at the TLS layer but still verifies the handshake signature with the
/// certificate's key, so the peer provably holds the key of the certificate whose fingerprint
/// [`connect`] then compares with the pin before a single byte (the token) is sent.
#[derive(Debug)]
struct PinVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never negotiated (QUIC requires 1.3).
        Err(rustls::Error::General("TLS 1.2 is not used by jmp".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(alpn: &[u8]) -> Result<quinn::ClientConfig, ConnectError> {
    client_config_tuned(alpn, |_| {})
}

fn client_config_tuned(
    alpn: &[u8],
    tune: impl FnOnce(&mut quinn::TransportConfig),
) -> Result<quinn::ClientConfig, ConnectError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ConnectError::Tls(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = transport_config();
    if alpn == jmp_protocol::ALPN_EXPORTER {
        // Keep-alives often enough that a silent exporter is noticed within
        // `liveness::STALL_AFTER` (the exporter acknowledges each at once); the idle timeout
        // that gives the session up stays IDLE_TIMEOUT.
        t.keep_alive_interval(Some(crate::liveness::CLIENT_KEEP_ALIVE));
    }
    if alpn == jmp_protocol::ALPN_CONTROLLER {
        // The peers agree on the smaller idle timeout, so this side alone decides.
        t.keep_alive_interval(Some(CONTROLLER_KEEP_ALIVE));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(CONTROLLER_IDLE_TIMEOUT).expect("3 s fits a QUIC varint"),
        ));
    }
    tune(&mut t);
    c.transport_config(Arc::new(t));
    Ok(c)
}

/// How long a handshake may take before the peer counts as not answering. A QUIC client gets no
/// error for a port nothing listens on (ICMP is not reported), so without this a stopped
/// controller would cost the idle timeout on every command.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects and checks the peer's certificate against `pin`. Returns the connection and the
/// fingerprint seen (for trust-on-first-use, when `pin` is `None`). The ALPN says what the peer
/// is (exporter or controller), for the error messages.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    alpn: &[u8],
    pin: Option<Fingerprint>,
) -> Result<(quinn::Connection, Fingerprint), ConnectError> {
    connect_inner(
        endpoint,
        addr,
        alpn,
        pin,
        &REFUSED_BACKOFF,
        client_config(alpn)?,
    )
    .await
}

/// [`connect`] without retrying a refusal: one attempt, whose refusal is the answer (tests of
/// the peer's connection limits).
pub async fn connect_without_retry(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    alpn: &[u8],
    pin: Option<Fingerprint>,
) -> Result<(quinn::Connection, Fingerprint), ConnectError> {
    connect_inner(endpoint, addr, alpn, pin, &[], client_config(alpn)?).await
}

/// [`connect`] with this side's QUIC transport settings changed by `tune`: for tests and
/// benchmarks that play a client other than jmp's own (one with far larger receive windows,
/// so that channels it never reads do not stall its others).
pub async fn connect_tuned(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    alpn: &[u8],
    pin: Option<Fingerprint>,
    tune: impl FnOnce(&mut quinn::TransportConfig),
) -> Result<(quinn::Connection, Fingerprint), ConnectError> {
    let config = client_config_tuned(alpn, tune)?;
    connect_inner(endpoint, addr, alpn, pin, &REFUSED_BACKOFF, config).await
}

async fn connect_inner(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    alpn: &[u8],
    pin: Option<Fingerprint>,
    retries: &[Duration],
    config: quinn::ClientConfig,
) -> Result<(quinn::Connection, Fingerprint), ConnectError> {
    let peer = if alpn == jmp_protocol::ALPN_CONTROLLER {
        "controller"
    } else {
        "exporter"
    };
    let conn = connect_retrying_refusals(endpoint, addr, alpn, peer, retries, &config).await?;
    let got = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| Fingerprint::of(c.as_ref())))
        .ok_or_else(|| ConnectError::Tls(format!("the {peer} presented no certificate")))?;
    if let Some(expected) = pin {
        if expected != got {
            conn.close(0u32.into(), b"certificate fingerprint mismatch");
            return Err(ConnectError::FingerprintMismatch {
                peer,
                addr,
                expected,
                got,
            });
        }
    }
    Ok((conn, got))
}

/// Pauses before each new attempt after the peer refused a connection outright (its
/// per-source connection rate: a CI host running many `jmp` commands at once). The peer refuses
/// before any handshake work, so a retry is cheap for it; after the last pause the refusal is
/// the answer.
const REFUSED_BACKOFF: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(1000),
];

fn refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

async fn connect_retrying_refusals(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    alpn: &[u8],
    peer: &'static str,
    retries: &[Duration],
    config: &quinn::ClientConfig,
) -> Result<quinn::Connection, ConnectError> {
    let mut pauses = retries.iter();
    loop {
        match connect_once(endpoint, addr, alpn, peer, config).await {
            Err(ConnectError::Connection { source, .. }) if refused(&source) => {
                match pauses.next() {
                    Some(p) => {
                        // A little jitter, so that processes refused together do not all
                        // come back in the same instant.
                        let jitter = Duration::from_millis(u64::from(rand::random::<u8>() % 50));
                        tracing::debug!(%addr, "the {peer} refused the connection; retrying in {:?}", *p + jitter);
                        tokio::time::sleep(*p + jitter).await;
                    }
                    None => return Err(ConnectError::Connection { peer, addr, source }),
                }
            }
            other => return other,
        }
    }
}

async fn connect_once(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    alpn: &[u8],
    peer: &'static str,
    config: &quinn::ClientConfig,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = endpoint
        .connect_with(config.clone(), addr, "jmp-exporter")
        .map_err(|source| ConnectError::Connect { addr, source })?;
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        // The idle timeout (shorter than HANDSHAKE_TIMEOUT for the controller) ran out first.
        Ok(Err(quinn::ConnectionError::TimedOut)) => {
            return Err(ConnectError::NoAnswer {
                peer,
                addr,
                timeout: if alpn == jmp_protocol::ALPN_CONTROLLER {
                    CONTROLLER_IDLE_TIMEOUT
                } else {
                    IDLE_TIMEOUT.min(HANDSHAKE_TIMEOUT)
                },
            })
        }
        Ok(c) => c.map_err(|source| ConnectError::Connection { peer, addr, source })?,
        Err(_) => {
            return Err(ConnectError::NoAnswer {
                peer,
                addr,
                timeout: HANDSHAKE_TIMEOUT,
            })
        }
    };
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advice for a mismatch fits the peer: `jmp trust pin` changes an exporter's pin, and
    /// nothing of the controller's (the client config's `fingerprint:` wins).
    #[test]
    fn a_mismatch_advises_what_changes_that_peers_pin() {
        let addr: SocketAddr = "127.0.0.1:7700".parse().expect("addr");
        let (expected, got) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        let ctl = ConnectError::FingerprintMismatch {
            peer: "controller",
            addr,
            expected,
            got,
        }
        .to_string();
        assert!(ctl.contains("client config"), "{ctl}");
        assert!(
            ctl.contains(&format!("fingerprint: {got}")),
            "names the new value: {ctl}"
        );
        assert!(!ctl.contains("`jmp trust pin 127"), "{ctl}");
        let exp = ConnectError::FingerprintMismatch {
            peer: "exporter",
            addr,
            expected,
            got,
        }
        .to_string();
        assert!(
            exp.contains(&format!("jmp trust pin {addr} {got}")),
            "{exp}"
        );
    }
}
