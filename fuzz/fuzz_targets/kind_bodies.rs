//! Every device kind's bodies (what the generic messages carry as bytes).
#![no_main]
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::{power, serial, tcp};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static A: jmp_fuzz::Bounded = jmp_fuzz::Bounded;

fuzz_target!(|data: &[u8]| {
    jmp_fuzz::start(data);
    let _ = serial::DeviceParams::decode_exact(data);
    let _ = serial::OpenParams::decode_exact(data);
    let _ = serial::OpenedParams::decode_exact(data);
    let _ = serial::Control::decode_exact(data);
    let _ = serial::Request::decode_exact(data);
    let _ = serial::Response::decode_exact(data);
    let _ = tcp::DeviceParams::decode_exact(data);
    let _ = power::DeviceParams::decode_exact(data);
    let _ = power::Request::decode_exact(data);
    let _ = power::Response::decode_exact(data);
});
