//! Control frames as they arrive on the control stream: split anywhere, decoded, and fed to the
//! session state machine in both roles. Must never panic, loop or over-allocate.
#![no_main]
use jmp_protocol::session::{Config, Session};
use jmp_protocol::{FrameDecoder, Hello, Message};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

#[global_allocator]
static A: jmp_fuzz::Bounded = jmp_fuzz::Bounded;

fuzz_target!(|data: &[u8]| {
    jmp_fuzz::start(data);
    let _ = <Message as jmp_protocol::Codec>::decode_exact(data);
    let cut = data.first().map_or(1, |b| (*b as usize % 7) + 1);
    let now = Instant::now();
    let mut exporter = Session::exporter(Config::default(), now);
    let mut client = Session::client(
        Hello {
            features: 0,
            client: "c".into(),
            session: 1,
            token: "t".into(),
        },
        Config::default(),
        now,
    );
    let mut d = FrameDecoder::new();
    for piece in data.chunks(cut) {
        d.feed(piece);
        loop {
            match d.next_message::<Message>() {
                Ok(Some(m)) => {
                    exporter.handle_message(m.clone(), now);
                    client.handle_message(m, now);
                    let _ = exporter.handle_stream(u64::from(piece[0]), now);
                }
                Ok(None) => break,
                Err(_) => return,
            }
            while exporter.poll_event().is_some() || client.poll_event().is_some() {}
            while exporter.poll_transmit().is_some() || client.poll_transmit().is_some() {}
        }
    }
    exporter.handle_timeout(now + Duration::from_secs(60));
    client.handle_timeout(now + Duration::from_secs(60));
});
