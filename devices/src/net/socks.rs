//! A SOCKS5 server (RFC 1928) for `jmp attach --socks`: the unprivileged way into the board's
//! subnets. Hand-written: the protocol is small (a greeting, one request, one reply), and the
//! server crates on crates.io either resolve names locally (we must resolve on the exporter:
//! `socks5h`) or bring their own connection handling where we need our channels.
//!
//! Served: no authentication (the listener is on loopback by default), CONNECT to an IPv4
//! address or a name. Refused with the right reply code: other commands (BIND, UDP ASSOCIATE:
//! 0x07), IPv6 and addresses outside the exported subnets (0x02, decided here for literals and
//! on the exporter for names), and the exporter's connect errors (0x03-0x05).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const VERSION: u8 = 5;
pub const CMD_CONNECT: u8 = 1;
pub const REP_OK: u8 = 0x00;
pub const REP_FAILURE: u8 = 0x01;
pub const REP_NOT_ALLOWED: u8 = 0x02;
pub const REP_COMMAND: u8 = 0x07;
pub const REP_ADDRESS_TYPE: u8 = 0x08;

/// Where a client asked to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    V4(std::net::SocketAddrV4),
    V6(std::net::SocketAddrV6),
    Name(String, u16),
}

impl Target {
    /// What the exporter's Connect gets: an address literal or the name.
    pub fn host_port(&self) -> (String, u16) {
        match self {
            Target::V4(a) => (a.ip().to_string(), a.port()),
            Target::V6(a) => (a.ip().to_string(), a.port()),
            Target::Name(n, p) => (n.clone(), *p),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::V4(a) => write!(f, "{a}"),
            Target::V6(a) => write!(f, "{a}"),
            Target::Name(n, p) => write!(f, "{}:{p}", jmp_protocol::name::escape(n)),
        }
    }
}

/// A request the client made, or why it made none we can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Connect(Target),
    /// A command we do not serve (its code), with its target.
    Other(u8, Target),
}

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    #[error("the client offers no method without authentication")]
    NoMethod,
    #[error("unknown address type {0}")]
    AddressType(u8),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads the greeting, answers it (no authentication), and reads the request. On a protocol
/// error the client has been told where SOCKS allows it.
pub async fn handshake(s: &mut TcpStream) -> Result<Request, SocksError> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(SocksError::Version(head[0]));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[VERSION, 0xff]).await?;
        return Err(SocksError::NoMethod);
    }
    s.write_all(&[VERSION, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(SocksError::Version(req[0]));
    }
    let target = match req[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).await?;
            Target::V4(std::net::SocketAddrV4::new(
                [a[0], a[1], a[2], a[3]].into(),
                u16::from_be_bytes([a[4], a[5]]),
            ))
        }
        3 => {
            let mut n = [0u8; 1];
            s.read_exact(&mut n).await?;
            let mut name = vec![0u8; usize::from(n[0]) + 2];
            s.read_exact(&mut name).await?;
            let port = u16::from_be_bytes([name[name.len() - 2], name[name.len() - 1]]);
            name.truncate(name.len() - 2);
            Target::Name(String::from_utf8_lossy(&name).into_owned(), port)
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).await?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Target::V6(std::net::SocketAddrV6::new(
                ip.into(),
                u16::from_be_bytes([a[16], a[17]]),
                0,
                0,
            ))
        }
        t => {
            let _ = s.write_all(&reply(REP_ADDRESS_TYPE, None)).await;
            return Err(SocksError::AddressType(t));
        }
    };
    Ok(match req[1] {
        CMD_CONNECT => Request::Connect(target),
        c => Request::Other(c, target),
    })
}

/// A reply with `code` and the bound address (zeros when there is none).
pub fn reply(code: u8, bound: Option<std::net::SocketAddrV4>) -> [u8; 10] {
    let b = bound.unwrap_or(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        0,
    ));
    let ip = b.ip().octets();
    let port = b.port().to_be_bytes();
    [
        VERSION, code, 0, 1, ip[0], ip[1], ip[2], ip[3], port[0], port[1],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn client_server(greeting: Vec<u8>) -> (Result<Request, SocksError>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(&greeting).await.expect("write");
            c.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got).await;
            got
        });
        let (mut s, _) = l.accept().await.expect("accept");
        let r = handshake(&mut s).await;
        drop(s);
        (r, client.await.expect("client"))
    }

    #[tokio::test]
    async fn connect_by_name_and_by_address_and_refusals() {
        let mut g = vec![5, 1, 0, 5, 1, 0, 3, 5];
        g.extend_from_slice(b"board");
        g.extend_from_slice(&22u16.to_be_bytes());
        let (r, answer) = client_server(g).await;
        assert_eq!(
            r.expect("request"),
            Request::Connect(Target::Name("board".into(), 22))
        );
        assert_eq!(answer, vec![5, 0]);

        let g = vec![5, 2, 2, 0, 5, 1, 0, 1, 192, 168, 10, 2, 0, 80];
        let (r, _) = client_server(g).await;
        assert_eq!(
            r.expect("request"),
            Request::Connect(Target::V4("192.168.10.2:80".parse().expect("addr")))
        );

        let g = vec![5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
        let (r, _) = client_server(g).await;
        assert!(matches!(r, Ok(Request::Other(3, _))), "{r:?}");

        let (r, answer) = client_server(vec![5, 1, 2]).await;
        assert!(matches!(r, Err(SocksError::NoMethod)), "{r:?}");
        assert_eq!(answer, vec![5, 0xff]);

        let (r, _) = client_server(vec![4, 1, 0, 80]).await;
        assert!(matches!(r, Err(SocksError::Version(4))), "{r:?}");

        let (r, answer) = client_server(vec![5, 1, 0, 5, 1, 0, 9]).await;
        assert!(matches!(r, Err(SocksError::AddressType(9))), "{r:?}");
        assert_eq!(answer[3], REP_ADDRESS_TYPE);

        // Cut short anywhere: an error, never a panic.
        for cut in 0..12 {
            let full = vec![5, 1, 0, 5, 1, 0, 3, 200, b'x', b'y', 0, 22];
            let (r, _) = client_server(full[..cut].to_vec()).await;
            assert!(r.is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn replies_carry_the_code_and_bound_address() {
        let r = reply(REP_OK, Some("192.168.10.1:40000".parse().expect("addr")));
        assert_eq!(r, [5, 0, 0, 1, 192, 168, 10, 1, 0x9c, 0x40]);
        assert_eq!(reply(REP_NOT_ALLOWED, None)[1], 2);
    }
}
