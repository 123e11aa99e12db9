//! The codec tested four ways: hex snapshots that are also the examples in docs/protocol.md,
//! proptest round trips, `encoded_len` against the bytes written, and corrupted input that must
//! never panic.

use super::*;
use bytes::Bytes;
use proptest::prelude::*;

/// The examples of docs/protocol.md, by the name their fenced block carries (` ```hex NAME`).
fn examples() -> Vec<(&'static str, Message)> {
    use crate::kinds::{serial, tcp};
    let console = serial::DeviceParams {
        settings: serial::LineSettings::default(),
    };
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
                features: crate::features::REQUESTS | crate::features::STATUS,
                instance: 0x1122_3344_5566_7788,
                devices: vec![
                    DeviceInfo {
                        name: "console".into(),
                        kind: Kind::Serial,
                        state: DeviceState::Available,
                        params: to_bytes(&console),
                        detail: "115200 8N1".into(),
                    },
                    DeviceInfo {
                        name: "ssh".into(),
                        kind: Kind::Tcp,
                        state: DeviceState::Unavailable("no route".into()),
                        params: to_bytes(&tcp::DeviceParams {
                            host: "192.168.10.2".into(),
                            port: 22,
                        }),
                        detail: String::new(),
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
                params: to_bytes(&serial::OpenParams {
                    resume_from: Some(4096),
                    pacing: None,
                    timed: false,
                }),
            }),
        ),
        (
            "opened",
            Message::Opened(Opened {
                channel: 1,
                params: to_bytes(&serial::OpenedParams {
                    offset: 4096,
                    timed: false,
                }),
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
            "control",
            Message::Control(Control {
                channel: 1,
                body: to_bytes(&serial::Control::Follow(serial::LineChange {
                    baud: Some(9600),
                    stop_bits: Some(1),
                    flow: Some(serial::FlowControl::None),
                    ..serial::LineChange::default()
                })),
            }),
        ),
        (
            "request",
            Message::Request(Request {
                id: 1,
                device: "power".into(),
                body: to_bytes(&crate::kinds::power::Request::Cycle { off_ms: None }),
            }),
        ),
        (
            "done",
            Message::Done(Done {
                id: 1,
                code: ErrorCode::Failed,
                reason: "exit 1: relay busy".into(),
                body: Bytes::new(),
            }),
        ),
        (
            "notice",
            Message::Notice(Notice {
                channel: 0,
                text: "lease ends in 5m".into(),
            }),
        ),
        (
            "status",
            Message::Status(Status {
                device: "console".into(),
                state: DeviceState::Unavailable("unplugged".into()),
                params: Bytes::new(),
            }),
        ),
        (
            "guests",
            Message::Guests(Guests {
                guests: vec![GuestInfo {
                    client: "bob".into(),
                    control: false,
                    since: 1_700_000_000,
                }],
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

/// The kinds' bodies documented in docs/protocol.md (not frames: the bytes inside a message).
fn kind_examples() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<_> = crate::kinds::WIRE
        .iter()
        .flat_map(|w| (w.examples)())
        .collect();
    v.extend(crate::relay::examples());
    v
}

fn decode_kind_example(name: &str, bytes: &[u8]) -> bool {
    crate::kinds::WIRE
        .iter()
        .any(|w| (w.decode_example)(name, bytes))
        || crate::relay::decode_example(name, bytes)
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
                let bytes = hex::decode(&hexs)
                    .unwrap_or_else(|e| panic!("doc hex block {name} is not valid hex: {e}"));
                out.push((name, bytes));
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
    let kinds = kind_examples();
    for (name, encoded) in &kinds {
        let Some((_, bytes)) = docs.iter().find(|(n, _)| n == name) else {
            panic!(
                "docs/protocol.md lacks the example `{name}`; it encodes as:\n```hex {name}\n{}\n```",
                hex::encode(encoded)
            );
        };
        assert_eq!(
            hex::encode(bytes),
            hex::encode(encoded),
            "example `{name}` in docs/protocol.md differs from the codec"
        );
        assert!(decode_kind_example(name, bytes), "{name} decodes");
    }
    for (name, _) in &docs {
        assert!(
            examples.iter().any(|(n, _)| n == name) || kinds.iter().any(|(n, _)| n == name),
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

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn arb_state() -> impl Strategy<Value = DeviceState> {
    prop_oneof![
        Just(DeviceState::Available),
        arb_string().prop_map(DeviceState::Unavailable)
    ]
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Serial),
        Just(Kind::Tcp),
        Just(Kind::Power),
        "[a-z]{1,8}".prop_map(|s| Kind::from_wire(&s)),
    ]
}

fn arb_device() -> impl Strategy<Value = DeviceInfo> {
    (
        arb_string(),
        arb_kind(),
        arb_state(),
        arb_bytes(),
        arb_string(),
    )
        .prop_map(|(name, kind, state, params, detail)| DeviceInfo {
            name,
            kind,
            state,
            params,
            detail,
        })
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
            proptest::collection::vec(arb_device(), 0..5)
        )
            .prop_map(|(exporter, features, devices)| Message::Welcome(Welcome {
                exporter,
                features,
                instance: features.rotate_left(17),
                devices
            })),
        (varint.clone(), arb_string(), any::<bool>(), arb_bytes()).prop_map(
            |(channel, device, dg, params)| Message::Open(Open {
                channel,
                device,
                mode: if dg {
                    ChannelMode::Datagram
                } else {
                    ChannelMode::Stream
                },
                params
            })
        ),
        (varint.clone(), arb_bytes())
            .prop_map(|(channel, params)| Message::Opened(Opened { channel, params })),
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
        (varint.clone(), arb_bytes())
            .prop_map(|(channel, body)| Message::Control(Control { channel, body })),
        (arb_code(), arb_string()).prop_map(|(code, reason)| Message::Bye(Bye { code, reason })),
        (varint.clone(), arb_string(), arb_bytes())
            .prop_map(|(id, device, body)| Message::Request(Request { id, device, body })),
        (varint.clone(), arb_code(), arb_string(), arb_bytes()).prop_map(
            |(id, code, reason, body)| Message::Done(Done {
                id,
                code,
                reason,
                body
            })
        ),
        (varint, arb_string())
            .prop_map(|(channel, text)| Message::Notice(Notice { channel, text })),
        (arb_string(), arb_state(), arb_bytes()).prop_map(|(device, state, params)| {
            Message::Status(Status {
                device,
                state,
                params,
            })
        }),
        proptest::collection::vec((arb_string(), any::<bool>(), 0u64..(1 << 62)), 0..4).prop_map(
            |g| Message::Guests(Guests {
                guests: g
                    .into_iter()
                    .map(|(client, control, since)| GuestInfo {
                        client,
                        control,
                        since
                    })
                    .collect()
            })
        ),
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
    assert_eq!(
        Message::decode_exact(&[0x7f]),
        Err(DecodeError::UnknownType(0x7f))
    );
    assert_eq!(
        Message::decode_exact(&[T_OPENED, 1, 0, 0]),
        Err(DecodeError::Trailing(1))
    );
    assert_eq!(
        Message::decode_exact(&[T_OPEN, 1, 0, 7, 0]),
        Err(DecodeError::Invalid {
            field: "mode",
            value: 7
        })
    );
}

#[test]
fn a_welcome_listing_more_devices_than_allowed_is_refused_by_the_decoder() {
    let w = Welcome {
        exporter: "x".into(),
        features: 0,
        instance: 0,
        devices: (0..=MAX_DEVICES)
            .map(|i| DeviceInfo {
                name: format!("d{i}"),
                kind: Kind::Serial,
                state: DeviceState::Available,
                params: Bytes::new(),
                detail: String::new(),
            })
            .collect(),
    };
    let mut b = BytesMut::new();
    Message::Welcome(w).encode(&mut b);
    assert_eq!(
        Message::decode_exact(&b),
        Err(DecodeError::Invalid {
            field: "device count",
            value: MAX_DEVICES as u64 + 1
        })
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
    for (name, b) in kind_examples() {
        println!("```hex {name}\n{}\n```\n", hex::encode(&b));
    }
}
