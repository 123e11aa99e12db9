//! Signing and verifying the controller's tokens: EdDSA (Ed25519, ring) JWTs carrying
//! [`jmp_protocol::token::Claims`]. A standard format on purpose: `jwt decode` or any JWT
//! library can inspect one.
//!
//! The controller holds the [`Signer`]; jmpd holds a [`Verifier`] built from the public key in
//! its own exporter credential, so it checks lease tokens without asking the controller.

use base64::Engine;
use jmp_protocol::token::{Claims, TokenKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::Path;

/// Clock skew tolerated between the controller and an exporter, in seconds.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a valid token: {0}")]
    Malformed(String),
    #[error("token signature does not verify (not issued by this controller, or altered)")]
    BadSignature,
    #[error("token is a {found} token, expected a {expected} token")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    #[error("token expired {0}s ago")]
    Expired(u64),
    #[error("signing key {path}: {why}")]
    Key { path: String, why: String },
}

pub struct Signer {
    pair: Ed25519KeyPair,
    enc: EncodingKey,
}

impl Signer {
    /// Loads the PKCS#8 key at `path`, or creates one there (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Signer, TokenError> {
        let err = |why: String| TokenError::Key {
            path: path.display().to_string(),
            why,
        };
        let der = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| err("cannot generate a key".into()))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                crate::identity::write_private(path, doc.as_ref())
                    .map_err(|e| err(e.to_string()))?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(err(e.to_string())),
        };
        Signer::from_pkcs8(&der).map_err(|_| err("not an Ed25519 PKCS#8 key".into()))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Signer, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .map_err(|_| TokenError::Malformed("bad Ed25519 key".into()))?;
        Ok(Signer {
            pair,
            enc: EncodingKey::from_ed_der(der),
        })
    }

    /// The public key, base64url without padding (as carried in credentials).
    pub fn public_key(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref())
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            key: DecodingKey::from_ed_der(self.pair.public_key().as_ref()),
        }
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.enc)
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }
}

#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
}

impl Verifier {
    /// From a base64url public key (the `ctl.key` of a credential).
    pub fn from_public_key(b64: &str) -> Result<Verifier, TokenError> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64.trim())
            .map_err(|e| TokenError::Malformed(format!("controller key: {e}")))?;
        if raw.len() != 32 {
            return Err(TokenError::Malformed(format!(
                "controller key is {} bytes, expected 32",
                raw.len()
            )));
        }
        Ok(Verifier {
            key: DecodingKey::from_ed_der(&raw),
        })
    }

    /// Checks signature, kind and expiry (against `now`, Unix seconds, with [`LEEWAY_SECS`]).
    /// Revocation is the caller's business (the controller's store; jmpd's pushed lease ends).
    pub fn verify(&self, token: &str, kind: TokenKind, now: u64) -> Result<Claims, TokenError> {
        let claims = self.verify_any(token, now)?;
        if claims.kind != kind {
            return Err(TokenError::WrongKind {
                expected: kind.as_str(),
                found: claims.kind.as_str(),
            });
        }
        Ok(claims)
    }

    /// Checks signature and expiry, for callers that accept more than one kind (the
    /// controller's API takes client and exporter credentials alike).
    pub fn verify_any(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        self.verify_any_within(token, now, LEEWAY_SECS)
    }

    /// [`Verifier::verify_any`] with `leeway` seconds of tolerance after the expiry instead of
    /// [`LEEWAY_SECS`] (the controller's `--credential-skew` for credentials).
    pub fn verify_any_within(
        &self,
        token: &str,
        now: u64,
        leeway: u64,
    ) -> Result<Claims, TokenError> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Claims>(token.trim(), &self.key, &v)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed(e.to_string()),
            })?
            .claims;
        if let Some(exp) = claims.exp {
            if now > exp.saturating_add(leeway) {
                return Err(TokenError::Expired(now - exp));
            }
        }
        Ok(claims)
    }
}

/// Reads a token's claims without checking the signature: only for finding out which
/// controller a credential belongs to, never for deciding access. A token that cannot be read
/// says why in words a user can act on (it was cut, or characters were changed), not with the
/// JSON or base64 decoder's internals.
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Malformed("it is empty".into()));
    }
    let parts = token.split('.').count();
    if parts != 3 {
        return Err(TokenError::Malformed(format!(
            "it has {parts} part(s) separated by '.', a token has 3 (it was cut, joined or \
             is not a token)"
        )));
    }
    let mut v = Validation::new(Algorithm::EdDSA);
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&[]), &v)
        .map(|d| d.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            TokenError::Malformed(
                match e.kind() {
                    K::Base64(_) | K::Utf8(_) => {
                        "its text is not what the controller wrote (a character was changed, \
                         added or removed)"
                    }
                    K::Json(_) => {
                        "its contents do not read as a credential (a character was changed, \
                         or it comes from another program)"
                    }
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                        "it is not signed the way the controller signs (EdDSA)"
                    }
                    _ => "it cannot be read as a token",
                }
                .into(),
            )
        })
}

/// A credential read and checked against the controller key it names itself: readable, and
/// signed by that key, so that a file changed by hand (or damaged) is caught where it is read,
/// before anything is sent. Not a security check (the controller checks the credential); the
/// expiry is not checked here either.
pub fn self_check(token: &str) -> Result<Claims, TokenError> {
    let claims = peek(token)?;
    let ctl = claims.ctl.as_ref().ok_or_else(|| {
        TokenError::Malformed("it names no controller (it is not a credential)".into())
    })?;
    let verifier = Verifier::from_public_key(&ctl.key)
        .map_err(|_| TokenError::Malformed("the controller key it names is damaged".into()))?;
    // Expiry is the controller's business: 0 as "now" never counts as expired.
    verifier.verify_any(token, 0).map_err(|e| match e {
        TokenError::BadSignature => TokenError::Malformed(
            "its signature does not match its contents (it was changed after the controller \
             issued it)"
                .into(),
        ),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(kind: TokenKind, exp: Option<u64>) -> Claims {
        Claims {
            iss: "jmp-controller".into(),
            sub: "l1".into(),
            kind,
            jti: "j1".into(),
            iat: 1000,
            exp,
            client: Some("alice".into()),
            exporter: Some("rpi4-01".into()),
            ctl: None,
            admin: false,
            share: None,
        }
    }

    #[test]
    fn damaged_credentials_say_what_is_wrong_in_plain_words() {
        let dir = std::env::temp_dir().join(format!("jmp-token-dmg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Signer::load_or_create(&dir.join("signing.key")).unwrap();
        let mut c = claims(TokenKind::Client, None);
        c.ctl = Some(jmp_protocol::token::ControllerRef {
            endpoint: "ctl:7780".into(),
            fingerprint: "sha256:00".into(),
            key: s.public_key(),
        });
        let t = s.sign(&c).unwrap();
        assert_eq!(self_check(&t).unwrap().sub, "l1");
        let why = |t: &str| match self_check(t) {
            Err(TokenError::Malformed(m)) => m,
            other => panic!("{t}: {other:?}"),
        };
        let (head, rest) = t.split_once('.').unwrap();
        let (body, sig) = rest.split_once('.').unwrap();
        // A control character in the claims (the "JSON error: control character").
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        raw[10] = 0x01;
        let bad_json = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        let m = why(&format!("{head}.{bad_json}.{sig}"));
        assert!(m.contains("do not read as a credential"), "{m}");
        assert!(!m.contains("JSON") && !m.contains("column"), "{m}");
        // Another client's name written into the claims: readable, but the signature fails.
        let forged = serde_json::to_vec(&Claims {
            sub: "mallory".into(),
            ..c.clone()
        })
        .unwrap();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged);
        let m = why(&format!("{head}.{forged}.{sig}"));
        assert!(m.contains("signature does not match"), "{m}");
        let m = why(&format!("{head}.{body}"));
        assert!(m.contains("2 part(s)"), "{m}");
        let m = why(&format!("{head}.{body}!.{sig}"));
        assert!(m.contains("a character was changed"), "{m}");
        assert_eq!(why("  "), "it is empty");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sign_verify_and_every_refusal() {
        let dir = std::env::temp_dir().join(format!("jmp-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Signer::load_or_create(&dir.join("signing.key")).unwrap();
        // Reloading gives the same key.
        let s2 = Signer::load_or_create(&dir.join("signing.key")).unwrap();
        assert_eq!(s.public_key(), s2.public_key());
        let v = Verifier::from_public_key(&s.public_key()).unwrap();
        let t = s.sign(&claims(TokenKind::Lease, Some(2000))).unwrap();
        assert_eq!(v.verify(&t, TokenKind::Lease, 1500).unwrap().sub, "l1");
        assert_eq!(peek(&t).unwrap().exporter.as_deref(), Some("rpi4-01"));
        assert!(matches!(
            v.verify(&t, TokenKind::Client, 1500),
            Err(TokenError::WrongKind { .. })
        ));
        assert!(matches!(
            v.verify(&t, TokenKind::Lease, 2100),
            Err(TokenError::Expired(100))
        ));
        // Another controller's key.
        let other = Signer::from_pkcs8(
            Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        assert!(matches!(
            other.verifier().verify(&t, TokenKind::Lease, 1500),
            Err(TokenError::BadSignature)
        ));
        // Tampered claims: swap the payload for one naming another exporter.
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(TokenKind::Lease, Some(2000));
        c.exporter = Some("rpi4-02".into());
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&c).unwrap());
        let forged = format!("{}.{}.{}", parts[0], payload, parts[2]);
        assert!(matches!(
            v.verify(&forged, TokenKind::Lease, 1500),
            Err(TokenError::BadSignature)
        ));
        assert!(matches!(
            v.verify("garbage", TokenKind::Lease, 1500),
            Err(TokenError::Malformed(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
