//! Client side of a network device: the TUN tunnel (with CAP_NET_ADMIN) or the SOCKS5
//! listener (`--socks`, no privileges).
//!
//! The TUN, its address and its routes outlive links: after a reconnect the tunnel asks the
//! exporter for the same address, so connections through it carry on. Routes go only to the
//! exported subnets, and none is added if it would overlap a route the machine already has.
//! Dropping the bridge closes the TUN, which takes its address and routes with it.

use super::pump::{self, Carry, PeerTx, Read, Stats, TunReader, TunWriter};
use super::socks::{self, Request, Target};
use super::tun::{self, Tun, TunError};
use super::{ifname, sys};
use crate::common::TaskGuard;
use crate::kind::{BridgeError, OptionError};
use crate::{BoxFuture, Bridge, BridgeCtx, BridgeExit, Endpoint, Local, Refusal};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::net::{refusal, Assigned, Connected, DeviceParams, Open, Subnet};
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::Channels;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

/// A SOCKS client that sends nothing is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `jmp attach` options of network devices.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "network-args")]
pub struct NetArgs {
    /// Reach network devices through a SOCKS5 proxy on [ADDR:]PORT (127.0.0.1 by default)
    /// instead of a TUN: no privileges needed; names resolve on the exporter (socks5h).
    #[arg(long = "socks", value_name = "[ADDR:]PORT")]
    pub socks: Option<String>,
}

impl NetArgs {
    pub fn parse(&self) -> Result<Option<SocketAddr>, String> {
        let Some(s) = &self.socks else {
            return Ok(None);
        };
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Some(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse()
            .map(Some)
            .map_err(|_| format!("--socks {s:?}: expected PORT or ADDR:PORT, e.g. 1080"))
    }

    pub fn check(&self, exporter: &str, devices: &[DeviceInfo]) -> Result<(), String> {
        if self.socks.is_some() && !devices.iter().any(|d| d.kind == Kind::Network) {
            return Err(format!("--socks: {exporter} has no network device"));
        }
        Ok(())
    }
}

enum Mode {
    Tunnel(TunnelSide),
    Socks(SocksSide),
    /// No TUN could be made without privileges; the device is listed, not bridged.
    Off,
}

struct TunnelSide {
    tun: Tun,
    /// What the exporter assigned on the last link; the TUN has this address and the routes.
    assigned: Option<Assigned>,
    stats: Arc<Stats>,
}

struct SocksSide {
    listener: TcpListener,
    addr: SocketAddr,
}

/// A `network` device on this machine.
pub struct NetBridge {
    device: String,
    subnets: Vec<Subnet>,
    mode: Mode,
}

/// The bridge for `info`: SOCKS if `--socks` was given, else a TUN.
pub async fn create(
    info: &DeviceInfo,
    ctx: &BridgeCtx,
    args: &NetArgs,
) -> Result<NetBridge, BridgeError> {
    let params = DeviceParams::decode_exact(&info.params).map_err(|e| {
        BridgeError::Exporter(format!(
            "the exporter's description of this network device is unreadable: {e}"
        ))
    })?;
    let device = info.name.clone();
    if let Some(addr) = args.parse().map_err(OptionError)? {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| BridgeError::Local(format!("--socks: cannot listen on {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BridgeError::Local(e.to_string()))?;
        return Ok(NetBridge {
            device,
            subnets: params.subnets,
            mode: Mode::Socks(SocksSide { listener, addr }),
        });
    }
    let name = ifname::ifname(ifname::CLIENT_PREFIX, &ctx.exporter)
        .map_err(|e| BridgeError::Exporter(e.to_string()))?;
    // Refuse before creating anything: a route that overlaps one the machine has would hide
    // part of its network (or be hidden by it).
    let routes = sys::routes().map_err(|e| BridgeError::Local(e.to_string()))?;
    for s in &params.subnets {
        if let Some(r) = sys::conflict(&routes, s, &name) {
            return Err(BridgeError::Exporter(format!(
                "the exported subnet {s} overlaps this machine's route {}; not adding a route for it (use --socks to reach the board without routes)",
                r.text
            )));
        }
    }
    let mode = match tun::create(&name, params.mtu) {
        Ok(tun) => Mode::Tunnel(TunnelSide {
            tun,
            assigned: None,
            stats: Arc::new(Stats::new()),
        }),
        Err(TunError::NoPermission { name, .. }) => {
            warn!(
                "{device}: no tunnel: creating the TUN {name} needs CAP_NET_ADMIN (run jmp attach as root); without privileges, add --socks [ADDR:]PORT to reach {} through SOCKS5",
                params
                    .subnets
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Mode::Off
        }
        Err(e) => return Err(BridgeError::Local(e.to_string())),
    };
    Ok(NetBridge {
        device,
        subnets: params.subnets,
        mode,
    })
}

impl Bridge for NetBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Network
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        match &self.mode {
            Mode::Tunnel(t) => vec![Endpoint::new(Local::Interface(t.tun.name.clone()))],
            Mode::Socks(s) => vec![Endpoint::with_role("socks", Local::Address(s.addr))],
            Mode::Off => Vec::new(),
        }
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(async move {
            let device = self.device.clone();
            let subnets = self.subnets.clone();
            match &mut self.mode {
                Mode::Tunnel(t) => run_tunnel(t, &device, &subnets, link).await,
                Mode::Socks(s) => run_socks(s, &device, &subnets, link).await,
                Mode::Off => {
                    link.closed().await;
                    BridgeExit::LinkLost
                }
            }
        })
    }
}

/// What to do when an open failed: the device is gone for good, or wait for the link's end.
async fn open_failed(link: &dyn Channels, device: &str, what: &str, e: Refusal) -> BridgeExit {
    if e.code == ErrorCode::NoSuchDevice {
        return BridgeExit::Refused(e);
    }
    if !link.is_closed() {
        warn!(
            "{device}: the exporter refused the {what}: {} ({})",
            e.reason, e.code
        );
    }
    link.closed().await;
    BridgeExit::LinkLost
}

async fn run_tunnel(
    t: &mut TunnelSide,
    device: &str,
    subnets: &[Subnet],
    link: Arc<dyn Channels>,
) -> BridgeExit {
    let want = t.assigned.map(|a| a.client);
    let open = to_bytes(&Open::Tunnel { want });
    let (pipe, params) = match link.open_datagram(device, open).await {
        Ok(p) => p,
        Err(e) => return open_failed(link.as_ref(), device, "tunnel", e).await,
    };
    let assigned = match Assigned::decode_exact(&params) {
        Ok(a) => a,
        Err(e) => {
            warn!("{device}: the exporter's tunnel answer is unreadable: {e}");
            link.close(
                pipe.channel,
                ErrorCode::Protocol,
                "unreadable tunnel answer",
            );
            link.closed().await;
            return BridgeExit::LinkLost;
        }
    };
    if t.assigned != Some(assigned) {
        if let Err(e) = configure(&t.tun.name, &assigned, subnets) {
            return BridgeExit::Refused(Refusal::new(
                ErrorCode::Internal,
                format!("cannot set up {}: {e}", t.tun.name),
            ));
        }
        info!(
            "{device}: {} {} routes {}",
            t.tun.name,
            assigned.client,
            subnets
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        t.assigned = Some(assigned);
    }
    info!(
        "{device}: tunnel up on {} ({})",
        t.tun.name, assigned.client
    );
    let peer = PeerTx::new(pipe.tx.clone());
    let mut guards = Vec::new();
    let fb = to_bytes(&Open::Fallback {
        addr: assigned.client,
    });
    match link.open_stream(device, fb).await {
        Ok((fpipe, _)) => {
            let (q_tx, q_rx) = mpsc::channel(pump::FALLBACK_DEPTH);
            let _ = peer.fallback.set(q_tx);
            guards.push(TaskGuard(tokio::spawn(pump::fallback_writer(
                q_rx, fpipe.tx,
            ))));
            let w = TunWriter::new(t.tun.dev.clone());
            let stats = t.stats.clone();
            let dev = device.to_string();
            let accept = to_client(assigned, subnets.to_vec(), stats.clone(), dev.clone());
            guards.push(TaskGuard(tokio::spawn(async move {
                pump::fallback_to_tun(fpipe.rx, w, &dev, &stats, accept).await;
            })));
        }
        Err(e) => debug!(
            "{device}: no fallback stream ({}): packets larger than a datagram are dropped",
            e.reason
        ),
    }
    // Into the TUN.
    {
        let w = TunWriter::new(t.tun.dev.clone());
        let stats = t.stats.clone();
        let dev = device.to_string();
        let accept = to_client(assigned, subnets.to_vec(), stats.clone(), dev.clone());
        let rx = pipe.rx;
        guards.push(TaskGuard(tokio::spawn(async move {
            pump::datagrams_to_tun(rx, w, &dev, &stats, accept).await;
        })));
    }
    // Out of the TUN: only packets from our address (the kernel also sends its own chatter
    // to any interface that is up). Where they go is the exporter's to decide: it forwards
    // into its subnets only, and counts the rest.
    let up = {
        let mut r = TunReader::new(t.tun.dev.clone());
        let stats = t.stats.clone();
        let dev = device.to_string();
        let me = assigned.client;
        let carry = Carry::from_env();
        tokio::spawn(async move {
            loop {
                let sent = match r.read(carry, &dev, &stats).await {
                    Ok(Read::Packets(segs)) => segs
                        .into_iter()
                        .filter(|p| super::packet::parse_ipv4(p).is_ok_and(|p| p.src == me))
                        .try_for_each(|seg| peer.send(seg, &dev, &stats)),
                    Ok(Read::Super(segment, pkt)) => {
                        if super::packet::parse_ipv4(pkt).is_ok_and(|p| p.src == me) {
                            peer.send_super(segment, pkt).await
                        } else {
                            Ok(())
                        }
                    }
                    Ok(Read::Nothing) => Ok(()),
                    Err(e) => {
                        warn!("{dev}: reading the TUN failed: {e}");
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        })
    };
    let _up = TaskGuard(up);
    let _control = pipe.control_rx;
    link.closed().await;
    drop(guards);
    BridgeExit::LinkLost
}

/// The filter for packets from the exporter: to our address, from the subnets or the
/// exporter's end of the tunnel (its ICMP errors).
fn to_client(
    a: Assigned,
    subnets: Vec<Subnet>,
    stats: Arc<Stats>,
    device: String,
) -> impl Fn(&super::packet::Ipv4Info) -> bool + Send + 'static {
    move |p| {
        if p.dst != a.client {
            stats
                .spoofed
                .hit(&device, format_args!("to {} from the exporter", p.dst));
            return false;
        }
        if p.src != a.gateway && !subnets.iter().any(|s| s.contains(p.src)) {
            stats.outside.hit(&device, format_args!("from {}", p.src));
            return false;
        }
        true
    }
}

/// Gives the TUN the assigned address and routes the subnets through it.
fn configure(tun: &str, a: &Assigned, subnets: &[Subnet]) -> Result<(), sys::CmdError> {
    sys::set_address(tun, a.client, 32)?;
    for s in subnets {
        sys::add_route(s, tun, a.client)?;
    }
    Ok(())
}

async fn run_socks(
    s: &mut SocksSide,
    device: &str,
    subnets: &[Subnet],
    link: Arc<dyn Channels>,
) -> BridgeExit {
    let (back_tx, mut back_rx) = mpsc::unbounded_channel::<Refusal>();
    loop {
        tokio::select! {
            biased;
            _ = link.closed() => return BridgeExit::LinkLost,
            Some(r) = back_rx.recv() => return BridgeExit::Refused(r),
            accepted = s.listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::debug_span!("socks", device = %device, %peer);
                    tokio::spawn(
                        serve_socks(link.clone(), device.to_string(), subnets.to_vec(), stream, back_tx.clone())
                            .instrument(span),
                    );
                }
                Err(e) => {
                    warn!("{device}: accept on {} failed: {e}", s.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn serve_socks(
    link: Arc<dyn Channels>,
    device: String,
    subnets: Vec<Subnet>,
    mut stream: TcpStream,
    back: mpsc::UnboundedSender<Refusal>,
) {
    let _ = stream.set_nodelay(true);
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, socks::handshake(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            info!("{device}: SOCKS client refused: {e}");
            return;
        }
        Err(_) => {
            debug!("{device}: SOCKS client sent no request in time");
            return;
        }
    };
    let target = match req {
        Request::Connect(t) => t,
        Request::Other(cmd, t) => {
            info!("{device}: SOCKS command {cmd} to {t} refused: only CONNECT is served");
            let _ = stream
                .write_all(&socks::reply(socks::REP_COMMAND, None))
                .await;
            return;
        }
    };
    // Literals are decided here; names only the exporter can resolve.
    let refused_here = match &target {
        Target::V4(a) => !subnets.iter().any(|s| s.contains(*a.ip())),
        Target::V6(_) => true,
        Target::Name(..) => false,
    };
    if refused_here {
        info!(
            "{device}: SOCKS connect to {target} refused: outside the exported subnets ({})",
            subnets
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = stream
            .write_all(&socks::reply(socks::REP_NOT_ALLOWED, None))
            .await;
        return;
    }
    let (host, port) = target.host_port();
    let open = to_bytes(&Open::Connect { host, port });
    match link.open_stream(&device, open).await {
        Ok((pipe, params)) => {
            let bound = Connected::decode_exact(&params).ok().map(|c| c.bound);
            if stream
                .write_all(&socks::reply(socks::REP_OK, bound))
                .await
                .is_err()
            {
                link.close(pipe.channel, ErrorCode::Ok, "");
                return;
            }
            let channel = pipe.channel;
            let out = crate::common::forward::forward(stream, pipe).await;
            debug!(
                channel,
                sent = out.sent,
                received = out.received,
                "SOCKS connection done"
            );
            link.close(channel, ErrorCode::Ok, "");
        }
        Err(e) => {
            let code = refusal::socks_reply(&e.reason);
            let code = if code == socks::REP_FAILURE && e.code == ErrorCode::NoSuchDevice {
                let _ = back.send(Refusal::new(e.code, e.reason.clone()));
                socks::REP_FAILURE
            } else {
                code
            };
            info!(
                "{device}: SOCKS connect to {target} refused: {} (SOCKS reply {code})",
                e.reason
            );
            let _ = stream.write_all(&socks::reply(code, None)).await;
        }
    }
}

use tokio::io::AsyncWriteExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socks_option_parses_port_or_address() {
        let a = |s: &str| NetArgs {
            socks: Some(s.into()),
        };
        assert_eq!(
            a("1080").parse(),
            Ok(Some(SocketAddr::from(([127, 0, 0, 1], 1080))))
        );
        assert_eq!(
            a("0.0.0.0:1080").parse(),
            Ok(Some("0.0.0.0:1080".parse().expect("addr")))
        );
        assert!(a("x").parse().unwrap_err().contains("\"x\""));
        assert_eq!(NetArgs::default().parse(), Ok(None));
    }
}
