//! Proof that the peer of one QUIC connection holds the private key of a TLS identity.
//!
//! The prover signs keying material exported from that connection's TLS session (RFC 8446
//! section 7.5, RFC 5705): both ends of the connection compute the same bytes and nobody else
//! can, so the signature shows possession of the key now, on this connection. A proof is
//! worthless on any other connection, and whoever has only the identity's public certificate
//! (its fingerprint is public: clients pin it) cannot make one. The controller uses it so that
//! a leaked exporter credential cannot register the exporter at another address.
//!
//! The signature is ECDSA P-256 with SHA-256 (ASN.1 DER), the key type of [`Identity`].

use crate::{Fingerprint, Identity};
use jmp_protocol::api::{IdentityProof, REGISTRATION_BINDING};
use rustls::pki_types::CertificateDer;

/// Bytes of keying material signed.
const BINDING_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PossessionError {
    #[error("the connection's keying material cannot be exported: {0}")]
    Keying(String),
    #[error("the identity's key cannot sign: {0}")]
    Key(String),
    #[error("the certificate is not readable: {0}")]
    Certificate(String),
    #[error("the signature does not verify with the certificate's key")]
    Signature,
}

/// The keying material of `conn` for `label` (which must start with `EXPORTER-`, RFC 8446)
/// and `context`.
fn binding(
    conn: &quinn::Connection,
    label: &[u8],
    context: &[u8],
) -> Result<[u8; BINDING_LEN], PossessionError> {
    let mut out = [0u8; BINDING_LEN];
    conn.export_keying_material(&mut out, label, context)
        .map_err(|e| PossessionError::Keying(format!("{e:?}")))?;
    Ok(out)
}

impl Identity {
    /// Signs `conn`'s keying material for `label` and `context` with this identity's key.
    pub fn prove(
        &self,
        conn: &quinn::Connection,
        label: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, PossessionError> {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, self.key_der(), &rng)
            .map_err(|e| PossessionError::Key(e.to_string()))?;
        let msg = binding(conn, label, context)?;
        key.sign(&rng, &msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| PossessionError::Key(e.to_string()))
    }
}

/// Checks that `signature` is `certificate`'s key's over `conn`'s keying material for `label`
/// and `context` (the peer of `conn` holds that key); returns the certificate's fingerprint.
pub fn verify(
    conn: &quinn::Connection,
    label: &[u8],
    context: &[u8],
    certificate: &[u8],
    signature: &[u8],
) -> Result<Fingerprint, PossessionError> {
    let der = CertificateDer::from(certificate);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| PossessionError::Certificate(e.to_string()))?;
    let msg = binding(conn, label, context)?;
    cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, &msg, signature)
        .map_err(|_| PossessionError::Signature)?;
    Ok(Fingerprint::of(certificate))
}

/// An exporter's proof, in its registration on `conn`, that it holds `identity`'s key.
pub fn registration_proof(
    identity: &Identity,
    conn: &quinn::Connection,
    exporter: &str,
) -> Result<IdentityProof, PossessionError> {
    let signature = identity.prove(conn, REGISTRATION_BINDING, exporter.as_bytes())?;
    Ok(IdentityProof {
        certificate: hex::encode(identity.cert.as_ref()),
        signature: hex::encode(signature),
    })
}

/// Checks the proof in exporter `exporter`'s registration that arrived on `conn`; the
/// fingerprint whose key it proves.
pub fn check_registration(
    conn: &quinn::Connection,
    exporter: &str,
    proof: &IdentityProof,
) -> Result<Fingerprint, PossessionError> {
    let cert = hex::decode(&proof.certificate)
        .map_err(|e| PossessionError::Certificate(format!("not hex: {e}")))?;
    let sig = hex::decode(&proof.signature).map_err(|_| PossessionError::Signature)?;
    verify(conn, REGISTRATION_BINDING, exporter.as_bytes(), &cert, &sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real connection on loopback: the proof verifies on it, names the prover's
    /// fingerprint, and fails for another identity's certificate, another context, another
    /// connection, or a changed signature.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proof_holds_for_its_key_and_its_connection_only() {
        let server_id = Identity::generate().unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let server = crate::server_endpoint(sock, &server_id, b"test").unwrap();
        let pin = Some(server_id.fingerprint());
        let accept = async {
            let mut conns = Vec::new();
            for _ in 0..2 {
                conns.push(server.accept().await.unwrap().await.unwrap());
            }
            conns
        };
        let dial = async {
            let mut conns = Vec::new();
            for _ in 0..2 {
                let ep = crate::client_endpoint(addr).unwrap();
                let (c, _) = crate::connect(&ep, addr, b"test", pin).await.unwrap();
                conns.push((ep, c));
            }
            conns
        };
        let (servers, clients) = tokio::join!(accept, dial);
        // The accepts come in dial order (each dial completes before the next begins).
        let (client, other_client) = (&clients[0].1, &clients[1].1);
        let (server_side, other_server_side) = (&servers[0], &servers[1]);
        let label = b"EXPORTER-jmp-test";

        let me = Identity::generate().unwrap();
        let stranger = Identity::generate().unwrap();
        let cert = me.cert.as_ref();
        let sig = me.prove(client, label, b"e1").unwrap();
        assert_eq!(
            verify(server_side, label, b"e1", cert, &sig).unwrap(),
            me.fingerprint()
        );
        // Someone with only my certificate (public) signs with their own key.
        let forged = stranger.prove(client, label, b"e1").unwrap();
        assert!(matches!(
            verify(server_side, label, b"e1", cert, &forged),
            Err(PossessionError::Signature)
        ));
        // My proof replayed on another connection, or for another name.
        assert!(verify(other_server_side, label, b"e1", cert, &sig).is_err());
        assert!(verify(server_side, label, b"e2", cert, &sig).is_err());
        let _ = other_client;
        let mut bent = sig.clone();
        let n = bent.len() - 1;
        bent[n] ^= 1;
        assert!(verify(server_side, label, b"e1", cert, &bent).is_err());
        assert!(matches!(
            verify(server_side, label, b"e1", b"not a certificate", &sig),
            Err(PossessionError::Certificate(_))
        ));
        // The registration's form of it.
        let p = registration_proof(&me, client, "e1").unwrap();
        assert_eq!(
            check_registration(server_side, "e1", &p).unwrap(),
            me.fingerprint()
        );
        assert!(check_registration(server_side, "e2", &p).is_err());
    }
}
