//! TCP port forwards: each local connection is one stream channel; the exporter connects to the
//! device's host:port (as seen from the exporter) per channel.

pub mod bridge;
pub mod driver;
pub mod spec;

pub use bridge::TcpBridge;
pub use driver::TcpDriver;
pub use spec::TcpSpec;

use crate::kind::{
    BridgeError, InvalidSpec, BuildCtx, DeviceKind, NoOptions, NoRequest, NoVerb, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::tcp as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;

/// TCP forwards: a local port per device, a stream channel per connection.
pub struct Tcp;

crate::config_types! {
    /// `type: tcp`.
    pub enum TcpConfig {
        Target(TcpSpec) = "tcp" => "{host: 192.168.10.2, port: 22}",
    }
}

impl DeviceKind for Tcp {
    const KIND: Kind = Kind::Tcp;
    const LISTENS: bool = true;
    type Config = TcpConfig;
    type Options = NoOptions;
    type Verb = NoVerb;
    type Request = NoRequest;
    type Response = NoRequest;

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        _opts: &'a NoOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            let b = bridge::create(info, ctx).await.map_err(BridgeError::Local)?;
            Ok(Box::new(b) as Box<dyn Bridge>)
        })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| format!("to {}:{}", p.host, p.port))
    }
}

impl Spec for TcpSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        TcpSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, _ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        TcpSpec::start(self, name)
    }
}
