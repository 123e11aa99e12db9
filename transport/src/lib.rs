//! jmp-transport: everything between two jmp processes that is not the protocol's logic.
//!
//! Owns: the exporter's TLS identity (created on first start, kept on disk) and its fingerprint;
//! quinn endpoints configured for jmp (ALPN, keep-alive, idle timeout, a stateless-reset key that
//! survives restarts so a client learns at once that a restarted exporter lost its connection);
//! certificate pinning on the client; the [`Link`] (one task owns one connection and its
//! protocol `Session`); [`Pipe`]s, the byte channels devices use, over QUIC streams or in memory
//! ([`pipe::pair`]) for tests; and datagram channels.
//!
//! Does not own: what a device does with its bytes (jmp-devices), tokens' meaning or leases.

pub mod endpoint;
pub mod identity;
pub mod link;
pub mod pipe;

pub use endpoint::{client_endpoint, connect, server_endpoint, ConnectError};
pub use identity::{Fingerprint, Identity, IdentityError};
pub use link::{Incoming, Link, LinkEvent, LinkHandle, OpenError};
pub use pipe::{ControlTx, DatagramPipe, Pipe, PipeError, PipeRx, PipeTx};
