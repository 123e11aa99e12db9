//! Network devices (`type: network`): the board's subnets reached from the client's machine.
//!
//! Two ways in, chosen on the client:
//! - a TUN tunnel (needs CAP_NET_ADMIN): an interface named after the exporter ([`ifname`]),
//!   an address the exporter assigns, routes for the exported subnets only; the exporter's TUN
//!   forwards into the subnets with source NAT ([`nat`]). Packets travel as QUIC datagrams, one
//!   IP packet each; the kernel's super-packets are split into segments on the way in and
//!   coalesced again on the way out ([`pump`]), packets that fit no datagram take the tunnel's
//!   fallback stream;
//! - SOCKS5 (`--socks`, no privileges): CONNECTs made by the exporter, names resolved there
//!   ([`socks`]).
//!
//! The exporter forwards only to the configured subnets: anything else is dropped and counted.

pub mod bridge;
pub mod driver;
pub mod ifname;
pub(crate) mod nat;
pub(crate) mod packet;
pub(crate) mod pump;
pub mod socks;
pub mod spec;
pub(crate) mod sys;
pub(crate) mod tun;

pub use bridge::{ClientArgs, NetBridge};
pub use driver::NetDriver;
pub use spec::NetSpec;
