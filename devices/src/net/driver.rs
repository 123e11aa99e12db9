//! Exporter side of a network device: the lab host's TUN, its NAT table, the tunnels of the
//! attached client (one datagram channel and its fallback stream each), and the TCP
//! connections made for SOCKS.
//!
//! The TUN and the table are made at start and live as long as the exporter. Tunnel addresses
//! come from the `tunnel` range: the first is the TUN's own, the others go to tunnels, the
//! address a client asks for again (after a reconnect) first. Packets from a tunnel must come
//! from its address and go into the exported subnets; packets out of the TUN go to the tunnel
//! their destination names. Everything else is dropped and counted.
//!
//! If the TUN cannot be made (jmpd without CAP_NET_ADMIN, no `nft`), the device still serves
//! SOCKS CONNECTs; tunnel opens are refused with the reason.

use super::nat::NatTable;
use super::pump::{self, Carry, PeerTx, Read, Stats, TunReader, TunWriter};
use super::spec::NetPlan;
use super::{ifname, sys, tun};
use crate::common::TaskGuard;
use crate::{BoxFuture, Channel, DeviceStatus, Driver, Refusal};
use bytes::Bytes;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::net::{refusal, Assigned, Connected, DeviceParams, Open, Subnet};
use jmp_protocol::{ChannelMode, DeviceState, ErrorCode, Kind};
use jmp_transport::ChannelIo;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A tunnel as the exporter routes to it.
struct Peer {
    /// Which open made it: a newer open of the same address replaces it, and the older
    /// channel's end must then not remove the newer entry.
    gen: u64,
    tx: Option<PeerTx>,
    fallback: Arc<OnceLock<mpsc::Sender<pump::Frame>>>,
}

/// The tunnel side: what the TUN reader and the channels share.
struct Tunnel {
    device: String,
    tun_name: String,
    dev: Arc<tun_rs::AsyncDevice>,
    range: Subnet,
    gateway: Ipv4Addr,
    subnets: Vec<Subnet>,
    peers: RwLock<HashMap<Ipv4Addr, Peer>>,
    next_gen: AtomicU64,
    stats: Stats,
}

impl Tunnel {
    fn peers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Ipv4Addr, Peer>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn peers_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Ipv4Addr, Peer>> {
        self.peers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// An address for a new tunnel: `want` if it is a client address of the range, else the
    /// first free one.
    fn assign(&self, want: Option<Ipv4Addr>) -> Option<(Ipv4Addr, u64)> {
        let size = 1u64 << (32 - u32::from(self.range.prefix()));
        let usable = |a: Ipv4Addr| {
            self.range.contains(a)
                && a != self.gateway
                && a != self.range.addr()
                && u64::from(u32::from(a) - u32::from(self.range.addr())) != size - 1
        };
        let mut peers = self.peers_mut();
        let addr = match want.filter(|w| usable(*w)) {
            // The only client that can open channels is the one holding the board: asking for
            // an address it had is a reconnect, so it gets it even if the old channel lingers.
            Some(w) => w,
            None => (2..size.saturating_sub(1))
                .filter_map(|n| self.range.nth(n as u32))
                .find(|a| usable(*a) && !peers.contains_key(a))?,
        };
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        peers.insert(
            addr,
            Peer {
                gen,
                tx: None,
                fallback: Arc::new(OnceLock::new()),
            },
        );
        Some((addr, gen))
    }

    fn release(&self, addr: Ipv4Addr, gen: u64) {
        let mut peers = self.peers_mut();
        if peers.get(&addr).is_some_and(|p| p.gen == gen) {
            peers.remove(&addr);
        }
    }

    /// The tunnel a packet out of the TUN goes to (its destination's).
    fn route(&self, pkt: &[u8]) -> Option<PeerTx> {
        // IPv6 and the like: the tunnel carries IPv4 only.
        let info = super::packet::parse_ipv4(pkt).ok()?;
        let peers = self.peers();
        let tx = peers.get(&info.dst).and_then(|p| p.tx.clone());
        if tx.is_none() {
            self.stats.unrouted.hit(&self.device, info.dst);
        }
        tx
    }

    /// Packets out of the TUN, each to the tunnel of its destination.
    async fn read_tun(self: Arc<Self>) {
        let mut r = TunReader::new(self.dev.clone());
        let device = self.device.clone();
        let carry = Carry::from_env();
        loop {
            match r.read(carry, &device, &self.stats).await {
                Ok(Read::Packets(segs)) => {
                    for seg in segs {
                        if let Some(tx) = self.route(seg) {
                            let _ = tx.send(seg, &device, &self.stats);
                        }
                    }
                }
                Ok(Read::Super(segment, pkt)) => {
                    if let Some(tx) = self.route(pkt) {
                        if tx.has_stream() {
                            // A tunnel whose stream is gone is closing; its packets are lost.
                            let _ = tx.send_super(segment, pkt).await;
                        } else {
                            self.stats.too_large.hit(
                                &device,
                                format_args!(
                                    "a super-packet of {} bytes for a tunnel without a stream",
                                    pkt.len()
                                ),
                            );
                        }
                    }
                }
                Ok(Read::Nothing) => {}
                Err(e) => {
                    error!("{device}: reading the TUN {} failed: {e}", self.tun_name);
                    return;
                }
            }
        }
    }

    /// The filter for packets from the tunnel of `addr`.
    fn filter_from(&self, addr: Ipv4Addr) -> impl Fn(&super::packet::Ipv4Info) -> bool + '_ {
        move |p| {
            if p.src != addr {
                self.stats.spoofed.hit(
                    &self.device,
                    format_args!("{} from the tunnel of {addr}", p.src),
                );
                return false;
            }
            if !self.subnets.iter().any(|s| s.contains(p.dst)) {
                self.stats.outside.hit(&self.device, p.dst);
                return false;
            }
            true
        }
    }
}

/// The tunnel and the NAT table that lives as long as it.
struct TunnelSide {
    tunnel: Arc<Tunnel>,
    _reader: TaskGuard,
    // Declared after the reader: the table goes after the reader has stopped.
    _nat: NatTable,
}

/// A `type: network` device.
pub struct NetDriver {
    name: String,
    subnets: Vec<Subnet>,
    /// The lab host's own addresses a holder may reach (`hostAccess`).
    host_access: Vec<Ipv4Addr>,
    detail: String,
    side: Result<TunnelSide, String>,
    status: watch::Receiver<DeviceStatus>,
}

impl NetDriver {
    /// Makes the TUN and the NAT table (`plan` is the checked spec; its error makes the device
    /// unavailable).
    pub fn start(name: &str, exporter: &str, plan: Result<NetPlan, String>) -> Self {
        let plan = match plan {
            Ok(p) => p,
            Err(e) => return Self::unavailable(name, e),
        };
        let side = start_tunnel(name, exporter, &plan);
        Self::with(name, plan, side)
    }

    /// A device that serves SOCKS CONNECTs only, making no TUN and changing nothing on the
    /// machine (tunnel opens are refused with `why`).
    pub fn without_tunnel(name: &str, plan: NetPlan, why: &str) -> Self {
        Self::with(name, plan, Err(why.to_string()))
    }

    fn with(name: &str, plan: NetPlan, side: Result<TunnelSide, String>) -> Self {
        let subnets: Vec<String> = plan.subnets.iter().map(|s| s.to_string()).collect();
        let detail = match &side {
            Ok(s) => format!(
                "{} via {} (tunnel {} on {})",
                subnets.join(", "),
                plan.via,
                plan.tunnel,
                s.tunnel.tun_name
            ),
            Err(e) => {
                error!("{name}: no tunnel, SOCKS only: {e}");
                format!("{} via {} (SOCKS only: {e})", subnets.join(", "), plan.via)
            }
        };
        let params = to_bytes(&DeviceParams {
            subnets: plan.subnets.clone(),
            mtu: plan.mtu,
        });
        let (_, status) = watch::channel(DeviceStatus::available(params));
        NetDriver {
            name: name.to_string(),
            subnets: plan.subnets,
            host_access: plan.host_access,
            detail,
            side,
            status,
        }
    }

    fn unavailable(name: &str, why: String) -> Self {
        error!("{name}: {why}");
        let (_, status) = watch::channel(DeviceStatus {
            state: DeviceState::Unavailable(why.clone()),
            params: Bytes::new(),
        });
        NetDriver {
            name: name.to_string(),
            subnets: Vec::new(),
            host_access: Vec::new(),
            detail: why.clone(),
            side: Err(why),
            status,
        }
    }

    /// Packets dropped because their destination was outside the subnets (for tests).
    pub fn outside_drops(&self) -> u64 {
        self.side
            .as_ref()
            .map_or(0, |s| s.tunnel.stats.outside.count())
    }

    fn open_tunnel(&self, want: Option<Ipv4Addr>) -> Result<Box<dyn Channel>, Refusal> {
        let side = self.side.as_ref().map_err(|e| {
            Refusal::new(
                ErrorCode::DeviceUnavailable,
                format!("{}: the exporter has no tunnel: {e}", self.name),
            )
        })?;
        let t = &side.tunnel;
        let (addr, gen) = t.assign(want).ok_or_else(|| {
            Refusal::new(
                ErrorCode::DeviceUnavailable,
                format!(
                    "{}: every address of the tunnel range {} is taken",
                    self.name, t.range
                ),
            )
        })?;
        info!(device = %self.name, %addr, "tunnel opened");
        Ok(Box::new(TunnelChannel {
            tunnel: t.clone(),
            addr,
            gen,
        }))
    }

    fn open_fallback(&self, addr: Ipv4Addr) -> Result<Box<dyn Channel>, Refusal> {
        let no = || {
            Refusal::new(
                ErrorCode::DeviceUnavailable,
                format!("{}: no tunnel has the address {addr}", self.name),
            )
        };
        let side = self.side.as_ref().map_err(|_| no())?;
        let fallback = side
            .tunnel
            .peers()
            .get(&addr)
            .map(|p| p.fallback.clone())
            .ok_or_else(no)?;
        Ok(Box::new(FallbackChannel {
            tunnel: side.tunnel.clone(),
            addr,
            fallback,
        }))
    }

    async fn open_connect(&self, host: &str, port: u16) -> Result<Box<dyn Channel>, Refusal> {
        let refuse = |word: &str, what: String| {
            Refusal::new(ErrorCode::ConnectFailed, format!("{word}: {what}"))
        };
        let shown = jmp_protocol::name::escape(host).into_owned();
        let addrs: Vec<Ipv4Addr> = match host.parse::<Ipv4Addr>() {
            Ok(a) => vec![a],
            Err(_) => {
                let looked =
                    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
                        .await;
                match looked {
                    Ok(Ok(it)) => it
                        .filter_map(|a| match a {
                            SocketAddr::V4(v4) => Some(*v4.ip()),
                            SocketAddr::V6(_) => None,
                        })
                        .collect(),
                    Ok(Err(e)) => {
                        return Err(refuse(refusal::NO_SUCH_HOST, format!("{shown}: {e}")))
                    }
                    Err(_) => {
                        return Err(refuse(
                            refusal::NO_SUCH_HOST,
                            format!("{shown}: no answer from the resolver"),
                        ))
                    }
                }
            }
        };
        let Some(ip) = addrs
            .iter()
            .copied()
            .find(|a| self.subnets.iter().any(|s| s.contains(*a)))
        else {
            let list: Vec<String> = self.subnets.iter().map(|s| s.to_string()).collect();
            let found: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            let r = refuse(
                refusal::NOT_ALLOWED,
                format!(
                    "{shown} ({}) is outside the exported subnets ({})",
                    if found.is_empty() {
                        "no IPv4 address".to_string()
                    } else {
                        found.join(", ")
                    },
                    list.join(", ")
                ),
            );
            info!(device = %self.name, "SOCKS connect refused: {}", r.reason);
            return Err(r);
        };
        // The lab host itself is not the board's: its addresses (read now, they change) are
        // refused even inside the subnets, unless `hostAccess` names them.
        if is_host_address(ip) && !self.host_access.contains(&ip) {
            let r = refuse(
                refusal::NOT_ALLOWED,
                format!("{shown} ({ip}) is an address of the lab host itself"),
            );
            info!(device = %self.name, "SOCKS connect refused: {}", r.reason);
            return Err(r);
        }
        let target = SocketAddrV4::new(ip, port);
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let word = match e.raw_os_error() {
                    Some(libc::ECONNREFUSED) => refusal::REFUSED,
                    Some(libc::ENETUNREACH) => refusal::NET_UNREACHABLE,
                    _ => refusal::HOST_UNREACHABLE,
                };
                return Err(refuse(word, format!("connect to {target}: {e}")));
            }
            Err(_) => {
                return Err(refuse(
                    refusal::HOST_UNREACHABLE,
                    format!(
                        "connect to {target}: no answer within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let bound = match stream.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        };
        debug!(device = %self.name, %target, "SOCKS connect");
        Ok(Box::new(ConnectChannel { stream, bound }))
    }
}

/// Whether `ip` is one of this host's own: loopback, unspecified (0.0.0.0 reaches local
/// listeners), or an address of any of its interfaces. When the interfaces cannot be read,
/// every address counts as the host's (fail closed).
fn is_host_address(ip: Ipv4Addr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs.into_iter().any(|a| {
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some_and(|s| s.ip() == ip)
        }),
        Err(e) => {
            warn!("cannot read this host's addresses ({e}): refusing {ip}");
            true
        }
    }
}

fn start_tunnel(device: &str, exporter: &str, plan: &NetPlan) -> Result<TunnelSide, String> {
    let name = ifname::ifname(ifname::EXPORTER_PREFIX, exporter).map_err(|e| e.to_string())?;
    let gateway = plan
        .tunnel
        .nth(1)
        .ok_or_else(|| format!("tunnel {} has no room", plan.tunnel))?;
    let t = tun::create(&name, plan.mtu).map_err(|e| e.to_string())?;
    sys::set_address(&name, gateway, plan.tunnel.prefix()).map_err(|e| e.to_string())?;
    let nat = NatTable::install(&name, &name, &plan.tunnel, &plan.via, &plan.host_access)?;
    let tunnel = Arc::new(Tunnel {
        device: device.to_string(),
        tun_name: name.clone(),
        dev: t.dev.clone(),
        range: plan.tunnel,
        gateway,
        subnets: plan.subnets.clone(),
        peers: RwLock::new(HashMap::new()),
        next_gen: AtomicU64::new(1),
        stats: Stats::new(),
    });
    let reader = TaskGuard(tokio::spawn(tunnel.clone().read_tun()));
    info!(
        "{device}: TUN {name} {gateway}/{} forwarding to {} via {}",
        plan.tunnel.prefix(),
        plan.subnets
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        plan.via
    );
    Ok(TunnelSide {
        tunnel,
        _reader: reader,
        _nat: nat,
    })
}

impl Driver for NetDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> Kind {
        Kind::Network
    }

    fn detail(&self) -> String {
        self.detail.clone()
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.status.clone()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Datagram, ChannelMode::Stream]
    }

    fn open<'a>(
        &'a self,
        req: &'a jmp_protocol::Open,
    ) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let open = Open::decode_exact(&req.params).map_err(|e| {
                Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: unreadable open parameters: {e}", self.name),
                )
            })?;
            match (open, req.mode) {
                (Open::Tunnel { want }, ChannelMode::Datagram) => self.open_tunnel(want),
                (Open::Fallback { addr }, ChannelMode::Stream) => self.open_fallback(addr),
                (Open::Connect { host, port }, ChannelMode::Stream) => {
                    self.open_connect(&host, port).await
                }
                (o, mode) => Err(Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: {o:?} on a {mode:?} channel", self.name),
                )),
            }
        })
    }
}

/// The datagram channel of one tunnel.
struct TunnelChannel {
    tunnel: Arc<Tunnel>,
    addr: Ipv4Addr,
    gen: u64,
}

impl Channel for TunnelChannel {
    fn params(&self) -> Bytes {
        to_bytes(&Assigned {
            client: self.addr,
            gateway: self.tunnel.gateway,
        })
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let t = self.tunnel;
            let ChannelIo::Datagram(pipe) = io else {
                t.release(self.addr, self.gen);
                return;
            };
            if let Some(p) = t.peers_mut().get_mut(&self.addr) {
                if p.gen == self.gen {
                    p.tx = Some(PeerTx {
                        dg: pipe.tx.clone(),
                        fallback: p.fallback.clone(),
                    });
                }
            }
            let _control = pipe.control_rx;
            let w = TunWriter::new(t.dev.clone());
            pump::datagrams_to_tun(pipe.rx, w, &t.device, &t.stats, t.filter_from(self.addr)).await;
            t.release(self.addr, self.gen);
            info!(device = %t.device, addr = %self.addr, "tunnel closed");
        })
    }
}

/// The fallback stream of one tunnel.
struct FallbackChannel {
    tunnel: Arc<Tunnel>,
    addr: Ipv4Addr,
    fallback: Arc<OnceLock<mpsc::Sender<pump::Frame>>>,
}

impl Channel for FallbackChannel {
    fn params(&self) -> Bytes {
        Bytes::new()
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Stream(pipe) = io else { return };
            let t = self.tunnel;
            let (q_tx, q_rx) = mpsc::channel(pump::FALLBACK_DEPTH);
            // A second fallback for the same tunnel keeps the first one's queue.
            let _ = self.fallback.set(q_tx);
            let _control = pipe.control_rx;
            let writer = TaskGuard(tokio::spawn(pump::fallback_writer(q_rx, pipe.tx)));
            let w = TunWriter::new(t.dev.clone());
            pump::fallback_to_tun(pipe.rx, w, &t.device, &t.stats, t.filter_from(self.addr)).await;
            drop(writer);
        })
    }
}

/// A TCP connection made for a SOCKS CONNECT.
struct ConnectChannel {
    stream: TcpStream,
    bound: SocketAddrV4,
}

impl Channel for ConnectChannel {
    fn params(&self) -> Bytes {
        to_bytes(&Connected { bound: self.bound })
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Stream(pipe) = io else { return };
            let out = crate::common::forward::forward(self.stream, pipe).await;
            debug!(
                sent = out.sent,
                received = out.received,
                "SOCKS connection done"
            );
        })
    }
}
