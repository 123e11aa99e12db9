//! Controller API frames: calls as the controller reads them before any credential is checked
//! (the small call limit), and replies as clients and exporters read them.
#![no_main]
use jmp_protocol::api::{decode, decode_limited, Call, Reply, MAX_CALL_FRAME};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static A: jmp_fuzz::Bounded = jmp_fuzz::Bounded;

fuzz_target!(|data: &[u8]| {
    jmp_fuzz::start(data);
    let mut buf = data.to_vec();
    while let Ok(Some(_)) = decode_limited::<Call>(&mut buf, MAX_CALL_FRAME) {}
    let mut buf = data.to_vec();
    while let Ok(Some(_)) = decode::<Reply>(&mut buf) {}
});
