//! Machinery that several kinds use and that names no kind: a pty playing a local device
//! (serial consoles, slcan fronts), byte forwarding between a TCP socket and a stream channel
//! (TCP forwards, SOCKS connections), the seam implementations of port-forward kinds
//! (`forward_kind!`), counters of dropped items, task guards, and non-blocking descriptor I/O. A kind folder may use anything here; nothing here may use a kind folder.

pub mod counters;
pub(crate) mod fdio;
pub(crate) mod forward;
mod forward_kind;
pub mod listen;
pub mod pty;
pub mod task;

pub use counters::Drops;
pub(crate) use forward_kind::forward_kind;
pub use task::TaskGuard;
