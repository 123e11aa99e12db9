//! TCP port forwards: each local connection is one stream channel; the exporter connects to the
//! device's host:port (as seen from the exporter) per channel.

pub mod bridge;
pub mod driver;
pub mod spec;

pub use bridge::TcpBridge;
pub use driver::TcpDriver;
pub use spec::TcpSpec;

use jmp_protocol::kinds::tcp as wire;
use jmp_protocol::Kind;

/// TCP forwards: a local port per device, a stream channel per connection.
pub struct Tcp;

crate::config_types! {
    /// `type: tcp`.
    pub enum TcpConfig {
        Target(TcpSpec) = "tcp" => "{host: 192.168.10.2, port: 22}",
    }
}

crate::common::forward_kind! {
    impl DeviceKind for Tcp {
        kind: Kind::Tcp,
        config: TcpConfig,
        spec: TcpSpec,
        params: wire::DeviceParams,
        bridge: bridge::create,
        summary: "to",
    }
}
