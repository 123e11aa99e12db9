//! TCP port forwards: each local connection is one stream channel; the exporter connects to the
//! device's host:port (as seen from the exporter) per channel.

pub mod bridge;
pub mod driver;
pub mod spec;

pub use bridge::{ClientArgs, TcpBridge};
pub use driver::TcpDriver;
pub use spec::TcpSpec;
