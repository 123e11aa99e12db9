//! Exporter side of a TCP forward: each channel opened on the device is one fresh connection
//! from the exporter to the device's host:port, refused with the OS's reason when the target
//! cannot be reached.

use crate::common::forward::forward;
use crate::{BoxFuture, Channel, DeviceStatus, Driver, Refusal};
use bytes::Bytes;
use jmp_protocol::codec::to_bytes;
use jmp_protocol::kinds::tcp::DeviceParams;
use jmp_protocol::{ChannelMode, ErrorCode, Kind, Open};
use jmp_transport::ChannelIo;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

/// Longer than any LAN needs, short enough that the client's user is not left waiting on a
/// target that silently drops SYNs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP target reachable from the exporter, exported as a device.
pub struct TcpDriver {
    name: String,
    host: String,
    port: u16,
    status: watch::Receiver<DeviceStatus>,
}

impl TcpDriver {
    pub fn new(name: String, host: String, port: u16) -> Self {
        let params = to_bytes(&DeviceParams {
            host: host.clone(),
            port,
        });
        // The target's reachability is only known per connection (each open connects): the
        // device itself is always available, a failed connect is that channel's refusal.
        let (_, status) = watch::channel(DeviceStatus::available(params));
        TcpDriver {
            name,
            host,
            port,
            status,
        }
    }

    /// `host:port`, with an IPv6 literal in brackets so the port stays unambiguous.
    fn target(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Driver for TcpDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> Kind {
        Kind::Tcp
    }

    fn detail(&self) -> String {
        self.target()
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.status.clone()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Stream]
    }

    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let target = self.target();
            let host = self.host.trim_start_matches('[').trim_end_matches(']');
            let connect = TcpStream::connect((host, self.port));
            let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(Refusal::new(
                        ErrorCode::ConnectFailed,
                        format!("connect to {target}: {e}"),
                    ))
                }
                Err(_) => {
                    return Err(Refusal::new(
                        ErrorCode::ConnectFailed,
                        format!(
                            "connect to {target}: no answer within {} s",
                            CONNECT_TIMEOUT.as_secs()
                        ),
                    ))
                }
            };
            // Interactive protocols (ssh keystrokes) must not wait for Nagle's timer; bulk
            // transfers fill segments anyway.
            if let Err(e) = stream.set_nodelay(true) {
                debug!(device = %self.name, "cannot set TCP_NODELAY: {e}");
            }
            debug!(device = %self.name, channel = req.channel, %target, "connected");
            Ok(Box::new(TcpChannel {
                device: self.name.clone(),
                stream,
            }) as Box<dyn Channel>)
        })
    }
}

/// One connection to the target, waiting for its channel's pipe.
struct TcpChannel {
    device: String,
    stream: TcpStream,
}

impl Channel for TcpChannel {
    fn params(&self) -> Bytes {
        Bytes::new()
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Stream(pipe) = io else { return };
            let TcpChannel { device, stream } = *self;
            let channel = pipe.channel;
            let out = forward(stream, pipe).await;
            match out.error {
                None => debug!(
                    device = %device,
                    channel,
                    sent = out.sent,
                    received = out.received,
                    "tcp channel done"
                ),
                Some(e) => debug!(
                    device = %device,
                    channel,
                    sent = out.sent,
                    received = out.received,
                    "tcp channel aborted: {e}"
                ),
            }
        })
    }
}
