//! Serial consoles: a real tty or a simulated board on the exporter, a pty on the client.

pub mod bridge;
pub mod driver;
pub mod history;
pub mod pty;
pub mod sim;

pub use bridge::SerialBridge;
pub use driver::SerialDriver;
