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

use jmp_protocol::kinds::udp as wire;
use jmp_protocol::Kind;

/// UDP forwards: a local port per device, a datagram channel per flow.
pub struct Udp;

crate::config_types! {
    /// `type: udp`.
    pub enum UdpConfig {
        Target(UdpSpec) = "udp" => "{host: 192.168.10.2, port: 69}",
    }
}

crate::common::forward_kind! {
    impl DeviceKind for Udp {
        kind: Kind::Udp,
        config: UdpConfig,
        spec: UdpSpec,
        params: wire::DeviceParams,
        bridge: bridge::create,
        summary: "to udp",
    }
}
