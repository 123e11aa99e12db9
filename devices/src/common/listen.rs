//! Local listening addresses chosen on the command line (`--forward LOCAL=DEVICE`), for every
//! kind whose bridge listens, and who may use them: local endpoints belong to the user who
//! attached ([`LocalUsers`]), whatever kind listens (TCP and UDP forwards, SOCKS, socketcand).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

/// `--forward LOCAL=DEVICE`: where the bridge of a device that listens (a kind with
/// `DeviceKind::LISTENS`: TCP and UDP forwards) listens.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ForwardArgs {
    /// Local address of a forward: LOCAL=DEVICE, LOCAL a port or ADDR:PORT (default: an
    /// ephemeral port on 127.0.0.1).
    #[arg(long = "forward", value_name = "LOCAL=DEVICE")]
    pub forwards: Vec<String>,
    /// Let other users of this machine use the local ports (forwards, SOCKS, socketcand): by
    /// default a connection or datagram from another local user is refused. Also
    /// `JMP_ALLOW_LOCAL_USERS=1`, for a cloud IDE whose port-forwarding proxy runs as
    /// another user and starts attachments from scripts it does not own.
    #[arg(
        long = "allow-local-users",
        env = "JMP_ALLOW_LOCAL_USERS",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub allow_local_users: bool,
}

impl ForwardArgs {
    /// device name → local address.
    pub fn parse(&self) -> Result<HashMap<String, SocketAddr>, crate::kind::OptionError> {
        let mut out = HashMap::new();
        for f in &self.forwards {
            let (local, device) = f
                .split_once('=')
                .ok_or_else(|| format!("--forward {f:?}: expected LOCAL=DEVICE, e.g. 2222=ssh"))?;
            let addr = if let Ok(port) = local.parse::<u16>() {
                SocketAddr::from(([127, 0, 0, 1], port))
            } else {
                local
                    .parse()
                    .map_err(|_| format!("--forward {f:?}: {local:?} is not a port or ADDR:PORT"))?
            };
            out.insert(device.to_string(), addr);
        }
        Ok(out)
    }
}

/// Who may use the local ports of an attachment. Another user of the machine reaching the
/// board through the owner's port would use a lease that is not theirs: by default only the
/// owner (the user who attached, and the user jmp runs as) is let in. Who is at the other end
/// comes from the kernel's socket table (sock_diag, as `ss -e` reads it): the uid that owns
/// the peer's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalUsers {
    /// Only these uids.
    Only(Vec<u32>),
    /// Anyone (`--allow-local-users`).
    Any,
}

impl LocalUsers {
    /// The owner `owner` (`BridgeCtx::owner`, `None`: whoever runs jmp) and the user jmp runs
    /// as; anyone if `any`.
    pub fn new(owner: Option<(u32, u32)>, any: bool) -> Self {
        if any {
            return LocalUsers::Any;
        }
        let me = nix::unistd::geteuid().as_raw();
        let mut uids = vec![me];
        if let Some((uid, _)) = owner {
            if uid != me {
                uids.push(uid);
            }
        }
        LocalUsers::Only(uids)
    }

    /// Whether the TCP connection accepted on `local` from `peer` may be served; why not.
    pub fn admit_tcp(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), String> {
        self.admit(Proto::Tcp, local, peer)
    }

    /// Whether a datagram that reached `local` from `peer` may be served; why not.
    pub fn admit_udp(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), String> {
        self.admit(Proto::Udp, local, peer)
    }

    fn admit(&self, proto: Proto, local: SocketAddr, peer: SocketAddr) -> Result<(), String> {
        let LocalUsers::Only(uids) = self else {
            return Ok(());
        };
        match peer_uid(proto, local, peer) {
            Ok(Some(uid)) if uids.contains(&uid) => Ok(()),
            Ok(Some(uid)) => Err(format!(
                "{peer} belongs to uid {uid}, another user of this machine (--allow-local-users to share the attachment's ports)"
            )),
            // A loopback port is reached from this machine only: a peer the table does not
            // know cannot be told apart from another user, so it is refused.
            Ok(None) if local.ip().to_canonical().is_loopback() => Err(format!(
                "{peer}: no such socket on this machine, so no owner to check"
            )),
            // A port the user chose to listen on beyond loopback also takes other machines'
            // connections: those have no local owner.
            Ok(None) => Ok(()),
            Err(e) => Err(format!("{peer}: cannot read its owner: {e}")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
}

/// The uid owning the socket at `peer` that talks to `local`, from the kernel's socket table;
/// `None` when there is no such socket on this machine (in this network namespace).
fn peer_uid(proto: Proto, local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (local, peer) = (canon(local), canon(peer));
    let (family, local, peer) = match (local.ip(), peer.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (AF_INET, local, peer),
        (IpAddr::V6(_), IpAddr::V6(_)) => (AF_INET6, local, peer),
        // One side mapped, the other not: the peer's socket is of the peer's family.
        (_, IpAddr::V4(_)) => return Ok(None),
        (_, IpAddr::V6(_)) => return Ok(None),
    };
    // The kernel finds one socket by its 4-tuple: for TCP the one whose own end is `source`,
    // for UDP (the fields swapped, "for historical reasons" says udp_diag.c) the one whose
    // own end is `destination`. A cookie of all ones means "any".
    let (source, destination, protocol) = match proto {
        Proto::Tcp => (peer, local, IPPROTO_TCP),
        Proto::Udp => (local, peer, IPPROTO_UDP),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: source.port(),
                destination_port: destination.port(),
                source_address: source.ip(),
                destination_address: destination.ip(),
                interface_id: 0,
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    msg.finalize();
    let mut req = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut req);

    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    sock.send(&req, 0)?;
    // One answer: the socket's description, or an error (ENOENT: no such socket).
    let mut buf = vec![0u8; 8192];
    let n = sock.recv(&mut &mut buf[..], 0)?;
    let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..n])
        .map_err(|e| io::Error::other(format!("unreadable sock_diag answer: {e}")))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(r.header.uid)),
        NetlinkPayload::Error(e) => match e.code {
            Some(code) if -code.get() == libc::ENOENT => Ok(None),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(None),
        },
        other => Err(io::Error::other(format!(
            "unexpected sock_diag answer {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_ports_and_addresses_and_name_bad_ones() {
        let a = ForwardArgs {
            forwards: vec!["2222=ssh".into(), "127.0.0.2:8080=web".into()],
            ..ForwardArgs::default()
        };
        let f = a.parse().expect("valid");
        assert_eq!(f["ssh"], SocketAddr::from(([127, 0, 0, 1], 2222)));
        assert_eq!(
            f["web"],
            "127.0.0.2:8080".parse::<SocketAddr>().expect("addr")
        );
        for bad in ["ssh", "x=ssh", "99999=ssh"] {
            let e = ForwardArgs {
                forwards: vec![bad.into()],
                ..ForwardArgs::default()
            }
            .parse()
            .expect_err(bad);
            assert!(e.0.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_owner_of_a_local_tcp_or_udp_peer_is_read_from_the_kernel() {
        let me = nix::unistd::geteuid().as_raw();
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_s, peer) = l.accept().expect("accept");
        let local = l.local_addr().expect("addr");
        assert_eq!(peer_uid(Proto::Tcp, local, peer).expect("lookup"), Some(me));
        assert_eq!(peer, c.local_addr().expect("addr"));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let sender = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sender
            .send_to(b"x", u.local_addr().expect("addr"))
            .expect("send");
        let (_, from) = u.recv_from(&mut [0u8; 8]).expect("recv");
        let local = u.local_addr().expect("addr");
        assert_eq!(peer_uid(Proto::Udp, local, from).expect("lookup"), Some(me));
        // Nobody there: no owner, and on loopback that is a refusal.
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let nobody = gone.local_addr().expect("addr");
        drop(gone);
        assert_eq!(peer_uid(Proto::Udp, local, nobody).expect("lookup"), None);
        let only_me = LocalUsers::new(None, false);
        assert_eq!(only_me, LocalUsers::Only(vec![me]));
        assert!(only_me.admit_udp(local, from).is_ok());
        let e = only_me.admit_udp(local, nobody).expect_err("nobody");
        assert!(e.contains("no owner"), "{e}");
        let others = LocalUsers::Only(vec![me + 4242]);
        let e = others.admit_udp(local, from).expect_err("another uid");
        assert!(e.contains(&format!("uid {me}")), "{e}");
        assert!(LocalUsers::Any.admit_udp(local, nobody).is_ok());
    }
}
