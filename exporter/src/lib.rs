//! jmp-exporter: the exporter as a library, shared by `jmpd` and `jmp local`.
//!
//! Owns: the exporter's config ([`config`]: YAML, each device's table read by its kind's spec),
//! who may attach ([`auth`]), who holds the board ([`seat`]: a pure state machine on virtual
//! time), and serving connections ([`serve`]: the handshake, the seat's verdict, the Welcome,
//! handing channels and requests to the devices, pushing device status).
//!
//! Does not own: what devices do (jmp-devices), the wire (jmp-protocol, jmp-transport), the
//! daemon's command line, identity files and controller registration (jmpd).

pub mod auth;
pub mod config;
pub mod seat;
pub mod serve;

pub use auth::{Admission, AuthError, Authorizer, TokenAuth};
pub use config::ExporterConfig;
pub use serve::{Exporter, Prep, PrepState, Stats};
