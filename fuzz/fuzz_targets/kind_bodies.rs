//! Every device kind's bodies (what the generic messages carry as bytes): each kind's wire
//! module decodes the input as every body it has (`jmp_protocol::kinds::WIRE`, so a new kind is
//! fuzzed without being named here).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static A: jmp_fuzz::Bounded = jmp_fuzz::Bounded;

fuzz_target!(|data: &[u8]| {
    jmp_fuzz::start(data);
    for w in jmp_protocol::kinds::WIRE {
        (w.fuzz)(data);
    }
});
