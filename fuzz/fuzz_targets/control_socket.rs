//! Requests on an attachment's local control socket (one JSON line from any local program).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static A: jmp_fuzz::Bounded = jmp_fuzz::Bounded;

fuzz_target!(|data: &[u8]| {
    jmp_fuzz::start(data);
    let _ = serde_json::from_slice::<jmp::ctlsock::Request>(data);
    let _ = serde_json::from_slice::<jmp::ctlsock::Reply>(data);
});
