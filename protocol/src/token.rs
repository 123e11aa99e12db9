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
    /// Expiry (Unix seconds). Lease tokens always have one; credentials one unless the
    /// controller runs with `--credential-ttl 0` (see [`renew_at`]).
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
    /// Lease tokens of a share: `client` is not the lease's holder but a colleague it shared
    /// the lease with (`jmp share lease`), attaching beside the holder; absent: the holder's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<ShareClaim>,
}

/// What a share's lease token lets its colleague do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ShareClaim {
    /// Type on the console and use the board's controls (power, storage writes); without it
    /// the colleague only watches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
}

impl Claims {
    /// When a credential should be renewed, if it expires: see [`renew_at`].
    pub fn renew_at(&self, renew_before: Option<u64>) -> Option<u64> {
        self.exp.map(|exp| renew_at(self.iat, exp, renew_before))
    }
}

/// When a credential issued at `iat` and expiring at `exp` (Unix seconds, the controller's
/// clock) is renewed: `renew_before` seconds before it expires, by default when a third of its
/// life is left. The holder compares this with its own clock, so a clock that is behind the
/// controller's by less than that margin still renews in time (and one that is ahead renews
/// early, which costs nothing); the controller also accepts a credential for its
/// `--credential-skew` after `exp`. Never before `iat`.
pub fn renew_at(iat: u64, exp: u64, renew_before: Option<u64>) -> u64 {
    let life = exp.saturating_sub(iat);
    let before = renew_before.unwrap_or(life / 3).min(life);
    exp - before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_a_third_of_the_life_before_expiry_or_as_configured() {
        // 90 days: renewed at day 60.
        let day = 86_400;
        assert_eq!(renew_at(0, 90 * day, None), 60 * day);
        assert_eq!(
            renew_at(1_000, 1_000 + 90 * day, Some(7 * day)),
            1_000 + 83 * day
        );
        // A margin longer than the life renews at once (never before it was issued).
        assert_eq!(renew_at(1_000, 2_000, Some(5_000)), 1_000);
        // A degenerate credential (exp before iat) is due at once too.
        assert_eq!(renew_at(2_000, 1_000, None), 1_000);
    }
}
