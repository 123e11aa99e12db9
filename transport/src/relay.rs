//! Both ends of a relayed session (see [`jmp_protocol::relay`]): the exporter's punch, sent from
//! its QUIC socket so that its NAT lets the relay's datagrams in, and the client's claim, sent
//! from the socket its QUIC endpoint then uses. The relay itself is the controller's.

use jmp_protocol::relay::{decode, encode, same_secret, Kind, Secret};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// How often an unanswered claim is repeated (UDP may lose it).
const CLAIM_RETRY: Duration = Duration::from_millis(250);

/// Exporter: one punch to `relay` from `socket` (a duplicate of the exporter's QUIC socket, so
/// the relay learns the address QUIC packets come from). Repeating it is harmless.
pub fn punch(socket: &std::net::UdpSocket, relay: SocketAddr, secret: &Secret) -> io::Result<()> {
    socket
        .send_to(&encode(Kind::Punch, secret), relay)
        .map(|_| ())
}

/// Client: claims the relay session from `socket`, repeating until the relay acknowledges or
/// `timeout` passes. Datagrams other than the ack are ignored (nothing else is expected yet).
pub async fn claim(
    socket: &tokio::net::UdpSocket,
    relay: SocketAddr,
    secret: &Secret,
    timeout: Duration,
) -> io::Result<()> {
    let packet = encode(Kind::Claim, secret);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 64];
    loop {
        socket.send_to(&packet, relay).await?;
        let wait = tokio::time::sleep(CLAIM_RETRY);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                r = socket.recv_from(&mut buf) => {
                    let (n, from) = match r {
                        Ok(x) => x,
                        // An ICMP error from an earlier send (the port is not open yet, or
                        // any more): keep trying until the deadline.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Err(e),
                    };
                    if from == relay
                        && matches!(decode(&buf[..n]), Some((Kind::Ack, s)) if same_secret(&s, secret))
                    {
                        return Ok(());
                    }
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the relay at {relay} did not acknowledge the claim within {}s",
                    timeout.as_secs_f64()
                ),
            ));
        }
    }
}
