//! jmp-protocol: the wire protocol of jmp, sans-IO.
//!
//! Owns: the generic control messages and their one codec ([`codec`], [`message`]), each device
//! kind's own wire inside them ([`kinds`]: typed parameters, requests and answers), the
//! error-code table shared by the wire and the CLIs' exit codes ([`ErrorCode`], [`exit`]), the
//! per-connection session state machine ([`session`]: handshake, channels, the pairing of
//! streams with their `Open`, requests and their deadlines), the one rule for names that
//! become local paths ([`name`]), labels with Kubernetes-style selectors ([`selector`]), the
//! controller API's messages ([`ctl`]) and the claims of the tokens it signs ([`token`]).
//!
//! Does not own: sockets, tasks, clocks or TLS. Nothing here performs I/O or reads the time; the
//! caller passes `now` in. `cargo tree -p jmp-protocol` must never show tokio or quinn (CI checks).

pub mod api;
pub mod codec;
pub mod duration;
pub mod error;
pub mod kinds;
pub mod message;
pub mod name;
pub mod relay;
pub mod selector;
pub mod session;
pub mod token;
pub mod usage;
pub mod web;

pub use codec::{Codec, DecodeError, FrameDecoder};
pub use error::{exit, ErrorCode, Refusal};
pub use kinds::Kind;
pub use message::*;

/// The port an exporter listens on when its config or an address names none.
pub const DEFAULT_EXPORTER_PORT: u16 = 7700;
/// ALPN between a client and an exporter. The ALPN carries the major version; `Hello` carries
/// feature bits for everything compatible.
pub const ALPN_EXPORTER: &[u8] = b"jmp/1";
/// ALPN to the controller.
pub const ALPN_CONTROLLER: &[u8] = b"jmp-ctl/1";

/// Feature bits sent in `Hello` (what the client speaks) and `Welcome` (what this exporter
/// serves: only what at least one of its devices uses). Unknown bits are ignored.
pub mod features {
    /// Datagram channels.
    pub const DATAGRAMS: u64 = 1 << 0;
    /// Device requests (`Request`/`Done`).
    pub const REQUESTS: u64 = 1 << 1;
    /// Device status pushes (`Status`).
    pub const STATUS: u64 = 1 << 2;
    /// In `Hello` only: this session makes device requests and opens no channels (`jmp power`
    /// without an attachment). It does not take the board: it is admitted beside the holder's
    /// own session, or while nobody holds it, and never replaces anyone.
    pub const ONE_SHOT: u64 = 1 << 3;
    /// In `Hello` only: this client understands session `Notice`s before `Welcome` ("preparing
    /// board" while the exporter's beforeLease hook runs) and keeps waiting for the `Welcome`
    /// while they come. An exporter never holds a client without it: it refuses as busy.
    pub const WAITS: u64 = 1 << 4;
    /// In `Hello` only: this client understands `Guests` (the colleagues attached beside it
    /// under a shared lease). An exporter sends it only to a holder whose Hello has this bit.
    pub const GUESTS: u64 = 1 << 5;
    /// Everything this build speaks (`ONE_SHOT` is a choice, not a capability).
    pub const ALL: u64 = DATAGRAMS | REQUESTS | STATUS;
    /// What this build's `jmp` says in its Hello.
    pub const CLIENT: u64 = ALL | WAITS | GUESTS;
}
