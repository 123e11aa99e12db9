//! The codec tested four ways: hex snapshots that are also the examples in docs/protocol.md,
//! proptest round trips, `encoded_len` against the bytes written, and corrupted input that must
//! never panic.

use super::*;
use proptest::prelude::*;

/// The examples of docs/protocol.md, by the name their fenced block carries (` ```hex NAME`).
fn examples() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello(Hello {
                features: crate::features::ALL,
                client: "alice@laptop".into(),
                session: 0x0123_4567_89ab_cdef,
                token: "s3cret".into(),
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                exporter: "rpi4-01".into(),
                features: crate::features::ALL,
                instance: 0x1122_3344_5566_7788,
                devices: vec![
                    DeviceInfo {
                        name: "console".into(),
                        kind: "serial".into(),
                        detail: "115200 8N1".into(),
                    },
                    DeviceInfo {
                        name: "ssh".into(),
                        kind: "tcp".into(),
                        detail: "192.168.10.2:22".into(),
                    },
                ],
            }),
        ),
        (
            "open",
            Message::Open(Open {
                channel: 1,
                device: "console".into(),
                mode: ChannelMode::Stream,
                resume_from: Some(4096),
            }),
        ),
        (
            "opened",
            Message::Opened(Opened {
                channel: 1,
                offset: 4096,
            }),
        ),
        (
            "reject",
            Message::Reject(Reject {
                channel: 2,
                code: ErrorCode::ConnectFailed,
                reason: "connection refused".into(),
            }),
        ),
        (
            "close",
            Message::Close(Close {
                channel: 2,
                code: ErrorCode::Ok,
                reason: String::new(),
            }),
        ),
        (
            "control-line",
            Message::Control(Control {
                channel: 1,
                body: ControlBody::LineSettings(LineSettings {
                    baud: 250_000,
                    data_bits: 8,
                    parity: Parity::None,
                    stop_bits: 2,
                    flow: FlowControl::Hardware,
                }),
            }),
        ),
        (
            "control-break",
            Message::Control(Control {
                channel: 1,
                body: ControlBody::Break { millis: 250 },
            }),
        ),
        (
            "control-modem",
            Message::Control(Control {
                channel: 1,
                body: ControlBody::ModemLines {
                    dtr: Some(true),
                    rts: None,
                },
            }),
        ),
        (
            "control-notice",
            Message::Control(Control {
                channel: 1,
                body: ControlBody::Notice("parity unsupported".into()),
            }),
        ),
        (
            "bye",
            Message::Bye(Bye {
                code: ErrorCode::Busy,
                reason: "held by bob@ci".into(),
            }),
        ),
    ]
}

/// Hex blocks of docs/protocol.md: ` ```hex NAME ` ... ` ``` `, whitespace and `#` comments
/// ignored inside.
fn doc_snapshots() -> Vec<(String, Vec<u8>)> {
    let doc = include_str!("../../../docs/protocol.md");
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        if let Some((name, mut hexs)) = current.take() {
            if line.trim_start().starts_with("```") {
                out.push((
                    name,
                    hex::decode(&hexs).expect("doc hex block is valid hex"),
                ));
            } else {
                let code = line.split('#').next().unwrap_or("");
                hexs.extend(code.chars().filter(|c| !c.is_whitespace()));
                current = Some((name, hexs));
            }
        } else if let Some(name) = line.trim().strip_prefix("```hex ") {
            current = Some((name.trim().to_string(), String::new()));
        }
    }
    assert!(
        current.is_none(),
        "unterminated hex block in docs/protocol.md"
    );
    out
}

#[test]
fn docs_hex_snapshots_match_the_codec() {
    let docs = doc_snapshots();
    let examples = examples();
    for (name, msg) in &examples {
        let encoded = msg.to_frame();
        let Some((_, bytes)) = docs.iter().find(|(n, _)| n == name) else {
            panic!(
                "docs/protocol.md lacks the example `{name}`; it encodes as:\n```hex {name}\n{}\n```",
                hex::encode(&encoded)
            );
        };
        assert_eq!(
            hex::encode(bytes),
            hex::encode(&encoded),
            "example `{name}` in docs/protocol.md differs from the codec"
        );
        let mut d = FrameDecoder::new();
        d.feed(bytes);
        assert_eq!(
            d.next_message::<Message>().ok().flatten().as_ref(),
            Some(msg),
            "{name} decodes"
        );
    }
    for (name, _) in &docs {
        assert!(
            examples.iter().any(|(n, _)| n == name),
            "docs/protocol.md has an example `{name}` that no test checks"
        );
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9@._-]{1,20}", any::<String>()]
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    (0u64..20).prop_map(ErrorCode::from_wire)
}

fn arb_body() -> impl Strategy<Value = ControlBody> {
    prop_oneof![
        (1u32..=4_000_000, 5u8..=8, 0u8..3, 1u8..=2, 0u8..3).prop_map(
            |(baud, data_bits, p, stop_bits, f)| {
                ControlBody::LineSettings(LineSettings {
                    baud,
                    data_bits,
                    parity: [Parity::None, Parity::Odd, Parity::Even][p as usize],
                    stop_bits,
                    flow: [
                        FlowControl::None,
                        FlowControl::Software,
                        FlowControl::Hardware,
                    ][f as usize],
                })
            }
        ),
        any::<u32>().prop_map(|millis| ControlBody::Break { millis }),
        (any::<Option<bool>>(), any::<Option<bool>>())
            .prop_map(|(dtr, rts)| ControlBody::ModemLines { dtr, rts }),
        arb_string().prop_map(ControlBody::Notice),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    let varint = 0u64..=VARINT_MAX;
    prop_oneof![
        (varint.clone(), arb_string(), any::<u64>(), arb_string()).prop_map(
            |(features, client, session, token)| Message::Hello(Hello {
                features,
                client,
                session,
                token
            })
        ),
        (
            arb_string(),
            varint.clone(),
            proptest::collection::vec((arb_string(), arb_string(), arb_string()), 0..5)
        )
            .prop_map(|(exporter, features, devs)| Message::Welcome(Welcome {
                exporter,
                features,
                instance: features.rotate_left(17),
                devices: devs
                    .into_iter()
                    .map(|(name, kind, detail)| DeviceInfo { name, kind, detail })
                    .collect()
            })),
        (
            varint.clone(),
            arb_string(),
            any::<bool>(),
            proptest::option::of(varint.clone())
        )
            .prop_map(|(channel, device, dg, resume_from)| Message::Open(Open {
                channel,
                device,
                mode: if dg {
                    ChannelMode::Datagram
                } else {
                    ChannelMode::Stream
                },
                resume_from
            })),
        (varint.clone(), varint.clone())
            .prop_map(|(channel, offset)| Message::Opened(Opened { channel, offset })),
        (varint.clone(), arb_code(), arb_string()).prop_map(|(channel, code, reason)| {
            Message::Reject(Reject {
                channel,
                code,
                reason,
            })
        }),
        (varint.clone(), arb_code(), arb_string()).prop_map(|(channel, code, reason)| {
            Message::Close(Close {
                channel,
                code,
                reason,
            })
        }),
        (varint, arb_body())
            .prop_map(|(channel, body)| Message::Control(Control { channel, body })),
        (arb_code(), arb_string()).prop_map(|(code, reason)| Message::Bye(Bye { code, reason })),
    ]
}

proptest! {
    #[test]
    fn round_trip_and_encoded_len(msg in arb_message()) {
        let mut b = BytesMut::new();
        msg.encode(&mut b);
        prop_assert_eq!(b.len(), msg.encoded_len());
        prop_assert_eq!(Message::decode_exact(&b), Ok(msg));
    }

    #[test]
    fn frames_survive_arbitrary_splits(msgs in proptest::collection::vec(arb_message(), 1..6), cut in 1usize..64) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode_frame(m, &mut wire);
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in wire.chunks(cut) {
            d.feed(piece);
            while let Some(m) = d.next_message::<Message>().expect("valid frames decode") {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn corrupted_input_never_panics(msg in arb_message(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), truncate in any::<prop::sample::Index>()) {
        let mut b = BytesMut::new();
        encode_frame(&msg, &mut b);
        let mut bytes = b.to_vec();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= v;
        }
        let cut = truncate.index(bytes.len() + 1);
        let mut d = FrameDecoder::new();
        d.feed(&bytes[..cut]);
        // Any result is fine; a panic or an endless loop is not.
        for _ in 0..4 {
            match d.next_message::<Message>() {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
        let _ = Message::decode_exact(&bytes[..cut]);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Message::decode_exact(&bytes);
        let mut d = FrameDecoder::new();
        d.feed(&bytes);
        let _ = d.next_message::<Message>();
    }
}

#[test]
fn hello_debug_masks_the_token() {
    let h = Hello {
        features: 0,
        client: "c".into(),
        session: 1,
        token: "topsecret".into(),
    };
    let s = format!("{h:?}");
    assert!(!s.contains("topsecret"), "{s}");
    assert!(s.contains("redacted"));
}

#[test]
fn invalid_fields_are_named() {
    // Control/LineSettings with 9 data bits.
    let bytes = [T_CONTROL, 0x01, C_LINE, 0x01, 9, 0, 1, 0];
    assert_eq!(
        Message::decode_exact(&bytes),
        Err(DecodeError::Invalid {
            field: "data bits",
            value: 9
        })
    );
    assert_eq!(
        Message::decode_exact(&[0x7f]),
        Err(DecodeError::UnknownType(0x7f))
    );
    assert_eq!(
        Message::decode_exact(&[T_OPENED, 1, 0, 0]),
        Err(DecodeError::Trailing(1))
    );
}

/// `cargo test -p jmp-protocol print_examples -- --ignored --nocapture` prints every example as
/// the fenced block docs/protocol.md needs (for when a message is added).
#[test]
#[ignore]
fn print_examples() {
    for (name, msg) in examples() {
        let f = msg.to_frame();
        println!("```hex {name}\n{}\n```\n", hex::encode(&f));
    }
}
