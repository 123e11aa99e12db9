//! Tokens and credentials as jmpd and the controller parse them (the unverified peek, and the
//! verification against a key).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[global_allocator]
static A: jmp_fuzz::Bounded = jmp_fuzz::Bounded;

fn verifier() -> &'static jmp_transport::token::Verifier {
    static V: OnceLock<jmp_transport::token::Verifier> = OnceLock::new();
    // A fixed Ed25519 public key (32 zero bytes are not a valid point: verification simply
    // fails, which is what an attacker's token does too).
    V.get_or_init(|| {
        jmp_transport::token::Verifier::from_public_key("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .expect("a valid public key encoding")
    })
}

fuzz_target!(|data: &[u8]| {
    let v = verifier();
    jmp_fuzz::start(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = jmp_transport::token::peek(s);
    let _ = v.verify_any(s, 1_800_000_000);
    let _ = v.verify(s, jmp_protocol::token::TokenKind::Lease, 1_800_000_000);
});
