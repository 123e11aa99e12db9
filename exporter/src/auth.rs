//! Who may attach: direct mode checks a shared token ([`TokenAuth`]); jmpd's controller mode
//! checks lease tokens against the controller's key and what the controller last said (in
//! jmpd, implementing [`Authorizer`] too).

use jmp_protocol::Hello;
use std::path::Path;
use tokio::sync::watch;

/// Why a Hello was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Refused for good; the reason is shown to the client.
    Refused(String),
    /// Valid, but the authority has not confirmed it yet (a lease granted a moment ago whose
    /// push has not arrived): ask again after the next change, then refuse with this reason.
    NotYet(String),
}

/// Decides whether a Hello may attach.
pub trait Authorizer: Send + Sync + 'static {
    fn check(&self, hello: &Hello) -> Result<Admission, AuthError>;

    /// Ticks whenever what `check` knows changes (a push from the controller); `None` if it
    /// never changes.
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// What an accepted Hello is entitled to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The lease it attaches under (controller mode); `None` in direct mode.
    pub lease: Option<String>,
    /// When the session must end (Unix seconds); `None`: no limit.
    pub until: Option<u64>,
    /// Who it is, as the token proves (controller mode: the lease's client); `None` when only
    /// the Hello's self-declared name is known (direct mode).
    pub client: Option<String>,
    /// The authority has confirmed that `lease` is this exporter's current lease (the
    /// controller said so). A lease the exporter has only the token's word for cannot end
    /// another live session.
    pub confirmed: bool,
    /// A colleague the lease's holder shared it with (`jmp share lease`): it attaches beside
    /// the holder, never as the holder, and only watches unless the share gives control.
    pub share: Option<jmp_protocol::token::ShareClaim>,
}

/// Direct mode: the client must present the token from the exporter's token file.
pub struct TokenAuth {
    digest: [u8; 32],
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenAuth {
    pub fn new(token: &str) -> Self {
        TokenAuth {
            digest: sha256(token.trim().as_bytes()),
        }
    }

    /// Reads the token file; creates it (0600, 32 random bytes as hex) if it does not exist.
    /// Returns whether it was created.
    pub fn from_file(path: &Path) -> Result<(TokenAuth, bool), String> {
        match std::fs::read_to_string(path) {
            Ok(t) if t.trim().is_empty() => Err(format!("token file {} is empty", path.display())),
            Ok(t) => Ok((TokenAuth::new(&t), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = random_token()?;
                jmp_transport::write_secret_file(path, format!("{token}\n").as_bytes())
                    .map_err(|e| format!("cannot create token file {}: {e}", path.display()))?;
                Ok((TokenAuth::new(&token), true))
            }
            Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
        }
    }
}

/// 32 random bytes as hex. A failing random source is an error, never a predictable token.
pub fn random_token() -> Result<String, String> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(hex::encode(b))
}

/// A random `u64` (instance and session ids). A failing random source is an error, never 0.
pub fn random_u64() -> Result<u64, String> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(u64::from_le_bytes(b))
}

impl Authorizer for TokenAuth {
    fn check(&self, hello: &Hello) -> Result<Admission, AuthError> {
        // Comparing digests keeps the comparison's timing independent of the secret.
        if sha256(hello.token.trim().as_bytes()) == self.digest {
            Ok(Admission::default())
        } else if hello.token.is_empty() {
            Err(AuthError::Refused("no token presented".into()))
        } else {
            Err(AuthError::Refused("invalid token".into()))
        }
    }
}
