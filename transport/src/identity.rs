//! The exporter's TLS identity: a self-signed certificate whose SHA-256 fingerprint clients pin.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write identity {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hexs = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        let bytes = hex::decode(hexs.replace(':', ""))
            .map_err(|e| format!("fingerprint {s:?} is not sha256:<64 hex digits>: {e}"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("fingerprint {s:?} is not sha256:<64 hex digits>: wrong length")
        })?;
        Ok(Fingerprint(arr))
    }
}

#[derive(Clone)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    /// A fresh identity held only in memory (local mode, tests).
    pub fn generate() -> Result<Self, IdentityError> {
        let ck = rcgen::generate_simple_self_signed(vec!["jmp-exporter".to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Ok(Identity {
            cert: ck.cert.der().clone(),
            key_der: ck.key_pair.serialize_der(),
        })
    }

    /// Loads `identity.key`/`identity.crt` from `dir`, creating both on first start. The key is
    /// written 0600 before any content reaches it.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let key_path = dir.join("identity.key");
        let cert_path = dir.join("identity.crt");
        if key_path.exists() || cert_path.exists() {
            let key_der = std::fs::read(&key_path).map_err(|source| IdentityError::Read {
                path: key_path.clone(),
                source,
            })?;
            let cert = std::fs::read(&cert_path).map_err(|source| IdentityError::Read {
                path: cert_path.clone(),
                source,
            })?;
            return Ok(Identity {
                cert: CertificateDer::from(cert),
                key_der,
            });
        }
        let id = Self::generate()?;
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(werr(dir))?;
        write_private(&key_path, &id.key_der).map_err(werr(&key_path))?;
        std::fs::write(&cert_path, id.cert.as_ref()).map_err(werr(&cert_path))?;
        Ok(id)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.cert.as_ref())
    }

    /// The private key, PKCS#8 DER (ECDSA P-256).
    pub(crate) fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Key material for stateless resets, derived from the private key so that a restarted
    /// exporter can reset connections its previous run held (the client then reconnects at
    /// once instead of waiting for its idle timeout).
    /// Key of the connection-id generator: quinn validates a packet's connection id with it
    /// before it answers with a stateless reset, so it must survive restarts too.
    pub(crate) fn cid_key(&self) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"jmp connection ids v1");
        ctx.update(&self.key_der);
        let d = ctx.finish();
        let mut k = [0u8; 8];
        k.copy_from_slice(&d.as_ref()[..8]);
        u64::from_le_bytes(k)
    }

    pub(crate) fn reset_key(&self) -> ring::hmac::Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"jmp stateless reset v1");
        ctx.update(&self.key_der);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
    }
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_key_is_private() {
        let dir = std::env::temp_dir().join(format!("jmp-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Identity::load_or_create(&dir).expect("create");
        let b = Identity::load_or_create(&dir).expect("load");
        assert_eq!(a.fingerprint(), b.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("identity.key"))
            .expect("key exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let c = Identity::generate().expect("generate");
        assert_ne!(a.fingerprint(), c.fingerprint());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fingerprint_text_round_trip_and_errors() {
        let f = Fingerprint::of(b"x");
        let s = f.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(s.parse::<Fingerprint>(), Ok(f));
        let e = "sha256:abcd".parse::<Fingerprint>().unwrap_err();
        assert!(e.contains("wrong length"), "{e}");
        assert!("sha256:zz".parse::<Fingerprint>().is_err());
    }
}
