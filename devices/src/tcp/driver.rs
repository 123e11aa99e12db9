//! Exporter side of a TCP forward: each channel opened on the device is one fresh connection
//! from the exporter to the device's host:port, refused with the OS's reason when the target
//! cannot be reached.

use super::forward::forward;
use crate::{BoxFuture, Channel, Driver, Refusal};
use jmp_protocol::{ChannelMode, DeviceInfo, ErrorCode, Open};
use jmp_transport::Pipe;
use std::time::Duration;
use tokio::net::TcpStream;
use tracing::debug;

/// Longer than any LAN needs, short enough that the client's user is not left waiting on a
/// target that silently drops SYNs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP target reachable from the exporter, exported as a device.
#[derive(Debug, Clone)]
pub struct TcpDriver {
    name: String,
    host: String,
    port: u16,
}

impl TcpDriver {
    pub fn new(name: String, host: String, port: u16) -> Self {
        TcpDriver { name, host, port }
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
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            kind: "tcp".into(),
            detail: self.target(),
        }
    }

    fn open<'a>(&'a self, req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            if req.mode == ChannelMode::Datagram {
                return Err(Refusal::new(
                    ErrorCode::Unsupported,
                    format!("{}: a tcp device carries streams, not datagrams", self.name),
                ));
            }
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
    fn offset(&self) -> u64 {
        0
    }

    fn serve(self: Box<Self>, pipe: Pipe) -> BoxFuture<'static, ()> {
        Box::pin(async move {
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
