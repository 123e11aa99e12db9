//! UDP forwards (`type: udp`): a local UDP port whose every source address (a *flow*) gets its
//! own datagram channel, both ways; the exporter sends each flow's datagrams from its own
//! socket to the device's host:port, so replies find their way back to the right local client.
//!
//! Idle flows end after [`bridge::FLOW_IDLE`] without a datagram either way. A datagram larger
//! than the path's datagram size is dropped and counted (logged at the 1st, 10th, 100th...),
//! never cut.

pub mod bridge;
pub mod driver;
pub mod spec;

pub use bridge::UdpBridge;
pub use driver::UdpDriver;
pub use spec::UdpSpec;

use crate::kind::{
    BridgeError, InvalidSpec, BuildCtx, DeviceKind, NoOptions, NoRequest, NoVerb, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::udp as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;

/// UDP forwards: a local port per device, a datagram channel per flow.
pub struct Udp;

crate::config_types! {
    /// `type: udp`.
    pub enum UdpConfig {
        Target(UdpSpec) = "udp" => "{host: 192.168.10.2, port: 69}",
    }
}

impl DeviceKind for Udp {
    const KIND: Kind = Kind::Udp;
    const LISTENS: bool = true;
    type Config = UdpConfig;
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
            .map(|p| format!("to udp {}:{}", p.host, p.port))
    }
}

impl Spec for UdpSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        UdpSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, _ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        UdpSpec::start(self, name)
    }
}
