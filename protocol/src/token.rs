//! Claims of the tokens the controller signs (EdDSA JWTs; signing and verifying live in
//! `jmp-transport::token`, which has the crypto).
//!
//! Three kinds: a **client** or **exporter** credential (long-lived, revocable by the controller,
//! carries how to reach and trust the controller), and a **lease token** (short-lived, names the
//! lease, client and exporter; jmpd checks it offline with the controller's public key).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum TokenKind {
    Client,
    Exporter,
    Lease,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Client => "client",
            TokenKind::Exporter => "exporter",
            TokenKind::Lease => "lease",
        }
    }
}

/// How to reach and trust the controller that issued a credential.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControllerRef {
    /// `host:port` of the controller's QUIC endpoint.
    pub endpoint: String,
    /// The controller's TLS certificate fingerprint (`sha256:…`).
    pub fingerprint: String,
    /// The controller's Ed25519 public key, base64url without padding; lease tokens verify
    /// against it.
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The issuing controller (`jmp-controller`).
    pub iss: String,
    /// The identity's name (client or exporter), or the lease's name.
    pub sub: String,
    pub kind: TokenKind,
    /// Unique id: a credential is valid only while it is the identity's current one.
    pub jti: String,
    pub iat: u64,
    /// Expiry (Unix seconds). Lease tokens always have one; credentials none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Lease tokens: who holds the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Lease tokens: the exporter leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exporter: Option<String>,
    /// Credentials: the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctl: Option<ControllerRef>,
    /// Client credentials: admin rights.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}
