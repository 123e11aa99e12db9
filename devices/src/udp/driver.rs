//! Exporter side of a UDP forward: each channel (one client flow) gets a fresh UDP socket
//! connected to the device's host:port; datagrams go both ways until the channel ends.

use crate::common::Drops;
use crate::{BoxFuture, Channel, DeviceStatus, Driver, Refusal};
use bytes::Bytes;
use jmp_protocol::codec::to_bytes;
use jmp_protocol::kinds::udp::DeviceParams;
use jmp_protocol::{ChannelMode, ErrorCode, Kind, Open};
use jmp_transport::{ChannelIo, PipeError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::debug;

/// Largest UDP payload.
const MAX_UDP: usize = 65535;

pub struct UdpDriver {
    name: String,
    host: String,
    port: u16,
    status: watch::Receiver<DeviceStatus>,
    too_large: Arc<Drops>,
}

impl UdpDriver {
    pub fn new(name: String, host: String, port: u16) -> Self {
        let params = to_bytes(&DeviceParams {
            host: host.clone(),
            port,
        });
        let (_, status) = watch::channel(DeviceStatus::available(params));
        UdpDriver {
            name,
            host,
            port,
            status,
            too_large: Arc::new(Drops::new("datagram larger than the path allows")),
        }
    }

    fn target(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Driver for UdpDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> Kind {
        Kind::Udp
    }

    fn detail(&self) -> String {
        format!("udp {}", self.target())
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.status.clone()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Datagram]
    }

    fn open<'a>(&'a self, _req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let target = self.target();
            let fail =
                |e: String| Refusal::new(ErrorCode::ConnectFailed, format!("udp {target}: {e}"));
            let host = self.host.trim_start_matches('[').trim_end_matches(']');
            let addr: SocketAddr = tokio::net::lookup_host((host, self.port))
                .await
                .map_err(|e| fail(e.to_string()))?
                .next()
                .ok_or_else(|| fail("the name has no address".into()))?;
            let bind: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(bind)
                .await
                .map_err(|e| fail(e.to_string()))?;
            sock.connect(addr).await.map_err(|e| fail(e.to_string()))?;
            Ok(Box::new(UdpChannel {
                device: self.name.clone(),
                sock,
                too_large: self.too_large.clone(),
            }) as Box<dyn Channel>)
        })
    }
}

struct UdpChannel {
    device: String,
    sock: UdpSocket,
    too_large: Arc<Drops>,
}

impl Channel for UdpChannel {
    fn params(&self) -> Bytes {
        Bytes::new()
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Datagram(pipe) = io else {
                return;
            };
            let UdpChannel {
                device,
                sock,
                too_large,
            } = *self;
            let (tx, mut rx, _control) = (pipe.tx, pipe.rx, pipe.control_rx);
            let mut buf = vec![0u8; MAX_UDP];
            loop {
                tokio::select! {
                    d = rx.recv() => match d {
                        Some(d) => {
                            if let Err(e) = sock.send(&d).await {
                                debug!(device = %device, "udp send: {e}");
                            }
                        }
                        None => break,
                    },
                    r = sock.recv(&mut buf) => match r {
                        Ok(n) => match tx.send(&buf[..n]) {
                            Ok(()) => {}
                            Err(PipeError::TooLarge { size, max }) => {
                                too_large.hit(&device, format_args!("{size} bytes from the target, datagrams up to {max}"))
                            }
                            Err(_) => break,
                        },
                        // An ICMP error for an earlier datagram (port unreachable): the flow
                        // goes on, as UDP would.
                        Err(e) => debug!(device = %device, "udp recv: {e}"),
                    },
                }
            }
        })
    }
}
