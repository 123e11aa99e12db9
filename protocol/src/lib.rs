//! jmp-protocol: the wire protocol of jmp, sans-IO.
//!
//! Owns: the control messages and their one codec ([`codec`], [`message`]), the error-code table
//! shared by the wire and the CLIs' exit codes ([`ErrorCode`]), the per-connection channel session
//! state machine ([`session`]), labels with Kubernetes-style selectors ([`selector`]), the
//! controller API's messages ([`ctl`]) and the claims of the tokens it signs ([`token`]).
//!
//! Does not own: sockets, tasks, clocks or TLS. Nothing here performs I/O or reads the time; the
//! caller passes `now` in. `cargo tree -p jmp-protocol` must never show tokio or quinn (CI checks).

pub mod codec;
pub mod ctl;
pub mod duration;
pub mod error;
pub mod message;
pub mod selector;
pub mod session;
pub mod token;

pub use codec::{Codec, DecodeError, FrameDecoder};
pub use error::ErrorCode;
pub use message::*;

/// ALPN between a client and an exporter. The ALPN carries the major version; `Hello` carries
/// feature bits for everything compatible.
pub const ALPN_EXPORTER: &[u8] = b"jmp/1";
/// ALPN to the controller.
pub const ALPN_CONTROLLER: &[u8] = b"jmp-ctl/1";

/// Feature bits sent in `Hello`/`Welcome`. Unknown bits are ignored by the receiver.
pub mod features {
    /// Serial channels accept `Open.resume_from` and answer with the offset they start at.
    pub const SERIAL_RESUME: u64 = 1 << 0;
    /// Serial line settings, break and modem lines via `Control`.
    pub const SERIAL_CONTROL: u64 = 1 << 1;
    /// Datagram channels.
    pub const DATAGRAMS: u64 = 1 << 2;
    /// Everything this build speaks.
    pub const ALL: u64 = SERIAL_RESUME | SERIAL_CONTROL | DATAGRAMS;
}
