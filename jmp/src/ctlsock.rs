//! The attachment's local control socket: how `jmp status`, `jmp power`, `jmp serial` (and the
//! Python test integrations) talk to a running attachment. One JSON line each way per
//! connection, with a version, in the shapes of [`Request`] and [`Reply`] below. This is a
//! contract other programs depend on: the snapshot tests pin every shape; change them only by
//! adding fields or bumping [`VERSION`].
//!
//! One op turns the connection into a channel: `channel` opens a stream channel on a device
//! over the attachment's link, answers with a `channel` reply line, and from then on relays
//! raw bytes both ways until either side ends (how `jmp storage flash` streams an image
//! through the attachment's one connection).
//!
//! `settle` waits until the local cache of a device (a storage mount's page cache) has caught
//! up with a generation of the device (at most [`SETTLE_WAIT`]): `jmp storage flash` asks
//! every attachment of the exporter before it reports success, so a read through a mount
//! after it sees the new bytes.

use crate::attach::{Live, Shared};
use jmp_devices::registry::{DeviceRequest, DeviceResponse};
use jmp_protocol::{ErrorCode, Kind, Refusal};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const VERSION: u32 = 1;

/// Longest request line accepted (a request is a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;

/// How long a `settle` waits for a mount to catch up. Catching up is one invalidation and a
/// partition table read once the change arrives; this long means the mount's link is down.
pub const SETTLE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// The attachment as it is now.
    Status,
    /// An operation on a device; `device` may be left out when the attachment has exactly one
    /// device of the request's kind.
    Device {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        request: DeviceRequest,
    },
    /// Opens a stream channel on a device of `kind` (`device` may be left out when there is
    /// one of that kind) with the kind's open parameters (hex); after the `channel` reply the
    /// connection carries the channel's raw bytes.
    Channel {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        kind: Kind,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        params: String,
    },
    /// Waits until the local cache of `device` holds nothing older than `generation` of the
    /// device (of exporter instance `instance`, when given), then answers `settled`; an error
    /// (`timed out`) after [`SETTLE_WAIT`]. A device with no local cache is settled at once.
    Settle {
        device: String,
        generation: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    #[serde(flatten)]
    pub body: ReplyBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum ReplyBody {
    Status(Live),
    Done {
        device: String,
        response: DeviceResponse,
        /// One line for people.
        message: String,
    },
    /// The channel is open; raw bytes follow. `params`: the kind's `Opened.params` (hex);
    /// `instance`: the exporter instance it was opened on (absent: not known).
    Channel {
        device: String,
        params: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<u64>,
    },
    /// The local cache of `device` has caught up: `generation` is the one it holds now
    /// (absent: the device has no local cache here).
    Settled {
        device: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
    },
    Error {
        /// The wire code's name (`failed`, `timeout`, `no such device`, ...).
        code: String,
        /// The exit code `jmp` uses for it.
        exit: i32,
        message: String,
    },
}

impl Reply {
    fn new(body: ReplyBody) -> Self {
        Reply { v: VERSION, body }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::new(ReplyBody::Error {
            code: code.as_str().to_string(),
            exit: code.exit_code(),
            message: message.into(),
        })
    }
}

/// The device of `kind` named `device`, or the only one of that kind, among `devices`.
pub fn pick<'a>(
    exporter: &str,
    devices: impl Iterator<Item = (&'a str, &'a Kind)>,
    device: Option<&str>,
    kind: &Kind,
) -> Result<String, Refusal> {
    let of_kind: Vec<&str> = devices
        .filter(|(_, k)| *k == kind)
        .map(|(n, _)| n)
        .collect();
    match device {
        Some(d) if of_kind.contains(&d) => Ok(d.to_string()),
        Some(d) => Err(Refusal::new(
            ErrorCode::NoSuchDevice,
            format!(
                "{exporter} has no {kind} device {:?} ({kind} devices: {})",
                jmp_protocol::name::escape(d),
                if of_kind.is_empty() {
                    "none".to_string()
                } else {
                    of_kind.join(", ")
                }
            ),
        )),
        None => match of_kind.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(Refusal::new(
                ErrorCode::NoSuchDevice,
                format!("{exporter} has no {kind} device"),
            )),
            many => Err(Refusal::new(
                ErrorCode::NoSuchDevice,
                format!(
                    "{exporter} has several {kind} devices ({}); name one",
                    many.join(", ")
                ),
            )),
        },
    }
}

/// Which device of `live` a request means, or why none.
pub fn pick_device(
    live: &Live,
    device: Option<&str>,
    req: &DeviceRequest,
) -> Result<String, Refusal> {
    pick(
        &live.ready.exporter,
        live.ready
            .devices
            .iter()
            .map(|d| (d.name.as_str(), &d.kind)),
        device,
        &req.kind(),
    )
}

async fn answer(shared: &Shared, req: Request) -> Reply {
    if req.v != VERSION {
        return Reply::error(
            ErrorCode::Unsupported,
            format!(
                "control socket version {} is not spoken by this attachment (it speaks {VERSION})",
                req.v
            ),
        );
    }
    match req.op {
        Op::Status => Reply::new(ReplyBody::Status(shared.live())),
        Op::Device { device, request } => {
            let live = shared.live();
            let device = match pick_device(&live, device.as_deref(), &request) {
                Ok(d) => d,
                Err(r) => return Reply::error(r.code, r.reason),
            };
            let link = shared.links.borrow().link.clone();
            let Some(link) = link else {
                return Reply::error(
                    ErrorCode::Internal,
                    "the link to the exporter is down; try again once it is back",
                );
            };
            match request.run(link.as_ref(), &device).await {
                Ok((response, message)) => Reply::new(ReplyBody::Done {
                    device,
                    response,
                    message,
                }),
                Err(r) => Reply::error(r.code, r.reason),
            }
        }
        Op::Channel { .. } => {
            Reply::error(ErrorCode::Internal, "a channel is relayed, not answered")
        }
        Op::Settle {
            device,
            generation,
            instance,
        } => settle(shared, device, instance, generation).await,
    }
}

/// Waits (at most [`SETTLE_WAIT`]) until the local cache of `device` covers `generation`.
async fn settle(shared: &Shared, device: String, instance: Option<u64>, generation: u64) -> Reply {
    let Some((_, cache)) = shared.caches.iter().find(|(d, _)| *d == device) else {
        return Reply::new(ReplyBody::Settled {
            device,
            generation: None,
        });
    };
    let mut cache = cache.clone();
    // Copied out at once: the watch's borrow must not be held across anything.
    let waited = tokio::time::timeout(
        SETTLE_WAIT,
        cache.wait_for(|c| c.covers(instance, generation)),
    )
    .await
    .map(|r| r.map(|c| *c));
    match waited {
        Ok(Ok(c)) => Reply::new(ReplyBody::Settled {
            device,
            generation: c.generation,
        }),
        Ok(Err(_)) => Reply::error(
            ErrorCode::Internal,
            format!("{device}: the attachment is ending; its mount is going away"),
        ),
        Err(_) => {
            let now = *cache.borrow();
            let live = shared.live();
            let at = live
                .ready
                .devices
                .iter()
                .find(|d| d.name == device)
                .map(|d| d.local.clone())
                .unwrap_or_default();
            Reply::error(
                ErrorCode::Timeout,
                format!(
                    "{device}: the mount at {at} did not drop its cache within {}s (it holds generation {} of the medium, the write made {generation}; link {}): reads through it may still show the old data",
                    SETTLE_WAIT.as_secs(),
                    now.generation.map_or("none yet".to_string(), |g| g.to_string()),
                    live.link,
                ),
            )
        }
    }
}

/// Opens the channel a `channel` op asks for; the device and the pipe, or the error reply.
async fn open_channel(
    shared: &Shared,
    device: Option<String>,
    kind: &Kind,
    params: &str,
) -> Result<(String, jmp_transport::Pipe, bytes::Bytes, Option<u64>), Reply> {
    let live = shared.live();
    let device = pick(
        &live.ready.exporter,
        live.ready
            .devices
            .iter()
            .map(|d| (d.name.as_str(), &d.kind)),
        device.as_deref(),
        kind,
    )
    .map_err(|r| Reply::error(r.code, r.reason))?;
    let params = hex::decode(params)
        .map_err(|e| Reply::error(ErrorCode::Protocol, format!("bad channel params: {e}")))?;
    let (link, instance) = {
        let slot = shared.links.borrow();
        (slot.link.clone(), slot.welcome.as_ref().map(|w| w.instance))
    };
    let Some(link) = link else {
        return Err(Reply::error(
            ErrorCode::Internal,
            "the link to the exporter is down; try again once it is back",
        ));
    };
    let (pipe, opened) = link
        .open_stream(&device, bytes::Bytes::from(params))
        .await
        .map_err(|r| Reply::error(r.code, r.reason))?;
    Ok((device, pipe, opened, instance))
}

/// Most one read of the socket yields (the relay's read buffer grows by this much at a time).
const RELAY_CHUNK: usize = 256 << 10;
/// A read buffer with less spare room than this is renewed: reads do not shrink to slivers
/// while earlier chunks, still queued on the stream, hold the rest of its allocation.
const RELAY_MIN_SPARE: usize = 16 << 10;

/// Relays raw bytes between the socket and the channel until either ends. Bulk kinds
/// (`storage`: a flash streams gigabytes) send at [`jmp_transport::PRIORITY_BULK`], below
/// the default and the consoles, as the attachment's own storage channels do.
async fn relay(
    mut r: impl tokio::io::AsyncRead + Unpin,
    mut w: impl tokio::io::AsyncWrite + Unpin,
    pipe: jmp_transport::Pipe,
    bulk: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tx, mut rx) = pipe.split();
    if bulk {
        tx.set_priority(jmp_transport::PRIORITY_BULK);
    }
    let up = async {
        // One allocation serves many reads: each read's bytes are split off and sent, the
        // rest of the buffer takes the next read (a fresh 256 KiB per read cost an allocation
        // and page faults per read on every flash).
        let mut b = bytes::BytesMut::new();
        loop {
            if b.capacity() < RELAY_MIN_SPARE {
                b.reserve(RELAY_CHUNK);
            }
            match r.read_buf(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(b.split().freeze()).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.finish();
    };
    let down = async {
        while let Ok(Some(b)) = rx.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Serves the socket until the task is aborted (the attachment ending).
pub async fn serve(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    while let Ok((stream, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r.take(MAX_LINE));
            let read = reader.read_line(&mut line);
            match tokio::time::timeout(Duration::from_secs(10), read).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let send = |reply: Reply| {
                let mut text = serde_json::to_string(&reply).unwrap_or_default();
                text.push('\n');
                text
            };
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request {
                    v: VERSION,
                    op:
                        Op::Channel {
                            device,
                            kind,
                            params,
                        },
                }) => match open_channel(&shared, device, &kind, &params).await {
                    Ok((device, pipe, opened, instance)) => {
                        let text = send(Reply::new(ReplyBody::Channel {
                            device,
                            params: hex::encode(&opened),
                            instance,
                        }));
                        if w.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                        // The request line was read through a buffer: bytes after it are the
                        // channel's, so the relay reads them first.
                        let pre = std::io::Cursor::new(reader.buffer().to_vec());
                        let rest = reader.into_inner().into_inner();
                        return relay(pre.chain(rest), w, pipe, jmp_devices::registry::bulk(&kind))
                            .await;
                    }
                    Err(reply) => reply,
                },
                Ok(req) => answer(&shared, req).await,
                Err(e) => Reply::error(ErrorCode::Protocol, format!("bad request: {e}")),
            };
            let _ = w.write_all(send(reply).as_bytes()).await;
        });
    }
}

/// Asks the attachment listening at `socket`; `timeout` bounds the whole exchange.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, String> {
    use std::io::{BufRead, Write};
    let mut sock = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the attachment at {}: {e}", socket.display()))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    text.push('\n');
    sock.write_all(text.as_bytes())
        .map_err(|e| format!("writing to {}: {e}", socket.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(&sock)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", socket.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("bad reply from the attachment: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::{DeviceRow, Ready};
    use jmp_devices::{Endpoint, Local};
    use jmp_protocol::kinds::{power, serial};
    use jmp_protocol::DeviceState;

    fn json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).expect("serializes")
    }

    fn round<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        v: &T,
        want: &str,
    ) {
        assert_eq!(json(v), want);
        assert_eq!(&serde_json::from_str::<T>(want).expect("parses"), v);
    }

    /// The contract, pinned: each shape as it is on the socket.
    #[test]
    fn snapshots_of_every_request_and_reply() {
        round(
            &Request {
                v: 1,
                op: Op::Status,
            },
            r#"{"v":1,"op":"status"}"#,
        );
        round(
            &Request {
                v: 1,
                op: Op::Device {
                    device: None,
                    request: DeviceRequest::Power(power::Request::Cycle { off_ms: Some(500) }),
                },
            },
            r#"{"v":1,"op":"device","request":{"kind":"power","request":{"cycle":{"off_ms":500}}}}"#,
        );
        round(
            &Request {
                v: 1,
                op: Op::Device {
                    device: Some("console".into()),
                    request: DeviceRequest::Serial(serial::Request::Break { millis: 250 }),
                },
            },
            r#"{"v":1,"op":"device","device":"console","request":{"kind":"serial","request":{"break":{"millis":250}}}}"#,
        );
        round(
            &Request {
                v: 1,
                op: Op::Device {
                    device: Some("console".into()),
                    request: DeviceRequest::Serial(serial::Request::Set(serial::LineChange {
                        parity: Some(serial::Parity::Even),
                        data_bits: Some(7),
                        ..Default::default()
                    })),
                },
            },
            r#"{"v":1,"op":"device","device":"console","request":{"kind":"serial","request":{"set":{"data_bits":7,"parity":"even"}}}}"#,
        );
        round(
            &Request {
                v: 1,
                op: Op::Channel {
                    device: Some("sd".into()),
                    kind: Kind::Storage,
                    params: String::new(),
                },
            },
            r#"{"v":1,"op":"channel","device":"sd","kind":"storage"}"#,
        );
        round(
            &Request {
                v: 1,
                op: Op::Device {
                    device: None,
                    request: DeviceRequest::Storage(
                        jmp_protocol::kinds::storage::DeviceRequest::Hash {
                            offset: 0,
                            len: 4096,
                        },
                    ),
                },
            },
            r#"{"v":1,"op":"device","request":{"kind":"storage","request":{"hash":{"offset":0,"len":4096}}}}"#,
        );
        round(
            &Reply::new(ReplyBody::Channel {
                device: "sd".into(),
                params: "90000000420007 03".replace(' ', ""),
                instance: None,
            }),
            r#"{"v":1,"reply":"channel","device":"sd","params":"9000000042000703"}"#,
        );
        round(
            &Reply::new(ReplyBody::Channel {
                device: "sd".into(),
                params: "9000000042000703".into(),
                instance: Some(7),
            }),
            r#"{"v":1,"reply":"channel","device":"sd","params":"9000000042000703","instance":7}"#,
        );
        round(
            &Request {
                v: 1,
                op: Op::Settle {
                    device: "sd".into(),
                    generation: 4,
                    instance: Some(7),
                },
            },
            r#"{"v":1,"op":"settle","device":"sd","generation":4,"instance":7}"#,
        );
        round(
            &Reply::new(ReplyBody::Settled {
                device: "sd".into(),
                generation: Some(4),
            }),
            r#"{"v":1,"reply":"settled","device":"sd","generation":4}"#,
        );
        round(
            &Reply::new(ReplyBody::Settled {
                device: "console".into(),
                generation: None,
            }),
            r#"{"v":1,"reply":"settled","device":"console"}"#,
        );
        round(
            &Reply::new(ReplyBody::Done {
                device: "power".into(),
                response: DeviceResponse::Power(power::Response {
                    state: power::PowerState::On,
                    readable: true,
                }),
                message: "power: cycled; power is on".into(),
            }),
            r#"{"v":1,"reply":"done","device":"power","response":{"kind":"power","response":{"state":"on","readable":true}},"message":"power: cycled; power is on"}"#,
        );
        round(
            &Reply::error(
                ErrorCode::Failed,
                "power: power on failed: relay exited with status 1",
            ),
            r#"{"v":1,"reply":"error","code":"failed","exit":8,"message":"power: power on failed: relay exited with status 1"}"#,
        );
        let live = Live {
            ready: Ready {
                exporter: "rpi4-01".into(),
                fingerprint: "sha256:ab".into(),
                pid: 42,
                lease: Some("L1".into()),
                devices: vec![
                    DeviceRow {
                        name: "console".into(),
                        kind: Kind::Serial,
                        local: "/dev/jmp/rpi4-01/console".into(),
                        endpoints: vec![Endpoint::new(Local::Path(
                            "/dev/jmp/rpi4-01/console".into(),
                        ))],
                        state: DeviceState::Available,
                        summary: Some("115200 8N1".into()),
                        notes: None,
                    },
                    DeviceRow {
                        name: "power".into(),
                        kind: Kind::Power,
                        local: String::new(),
                        endpoints: vec![],
                        state: DeviceState::Unavailable("relay unplugged".into()),
                        summary: None,
                        notes: None,
                    },
                ],
            },
            link: "up".into(),
            since: 1_795_000_000,
            log: None,
            local: false,
            guests: Vec::new(),
        };
        round(
            &Reply::new(ReplyBody::Status(live.clone())),
            concat!(
                r#"{"v":1,"reply":"status","exporter":"rpi4-01","fingerprint":"sha256:ab","pid":42,"lease":"L1","devices":["#,
                r#"{"name":"console","kind":"serial","local":"/dev/jmp/rpi4-01/console","endpoints":[{"type":"path","at":"/dev/jmp/rpi4-01/console"}],"state":"available","summary":"115200 8N1"},"#,
                r#"{"name":"power","kind":"power","local":"","endpoints":[],"state":"unavailable","reason":"relay unplugged"}],"#,
                r#""link":"up","since":1795000000}"#
            ),
        );
        // Issue 21: the colleagues attached beside the holder (absent when there are none).
        let mut shared = live.clone();
        shared.ready.devices.clear();
        shared.guests = vec![crate::attach::GuestRow {
            client: "bob".into(),
            control: false,
            since: 1_795_000_100,
        }];
        round(
            &Reply::new(ReplyBody::Status(shared)),
            concat!(
                r#"{"v":1,"reply":"status","exporter":"rpi4-01","fingerprint":"sha256:ab","pid":42,"lease":"L1","devices":[],"#,
                r#""link":"up","since":1795000000,"guests":[{"client":"bob","control":false,"since":1795000100}]}"#
            ),
        );
    }

    #[test]
    fn a_request_without_a_device_picks_the_only_one_of_its_kind() {
        let row = |name: &str, kind: Kind| DeviceRow {
            name: name.into(),
            kind,
            local: String::new(),
            endpoints: vec![],
            state: DeviceState::Available,
            summary: None,
            notes: None,
        };
        let mut live = Live {
            ready: Ready {
                exporter: "x".into(),
                fingerprint: String::new(),
                pid: 1,
                lease: None,
                devices: vec![row("console", Kind::Serial), row("power", Kind::Power)],
            },
            link: "up".into(),
            since: 0,
            log: None,
            local: false,
            guests: Vec::new(),
        };
        let p = DeviceRequest::Power(power::Request::On);
        assert_eq!(pick_device(&live, None, &p).ok().as_deref(), Some("power"));
        assert!(
            pick_device(&live, Some("console"), &p).is_err(),
            "wrong kind"
        );
        live.ready.devices.push(row("power2", Kind::Power));
        match pick_device(&live, None, &p) {
            Err(r) => {
                assert!(r.reason.contains("several"), "{}", r.reason);
                assert_eq!(r.code.exit_code(), 5);
            }
            other => panic!("{other:?}"),
        }
    }

    /// The relay reuses one read buffer across reads: many reads of every size (larger than
    /// the buffer, and slivers) reach the channel complete and in order; what the channel
    /// sends reaches the socket; the socket's end finishes the channel.
    #[tokio::test]
    async fn relay_carries_many_reads_intact_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (sock_app, sock_relay) = tokio::io::duplex(64 << 10);
        let (relay_end, mut far) = jmp_transport::pipe::pair(8);
        let (r, w) = tokio::io::split(sock_relay);
        let task = tokio::spawn(relay(r, w, relay_end, true));
        let (mut app_r, mut app_w) = tokio::io::split(sock_app);
        far.tx
            .send(bytes::Bytes::from_static(b"answer"))
            .await
            .expect("send back");
        let mut back = [0u8; 6];
        app_r.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"answer");
        // Writes of varied sizes, some larger than RELAY_CHUNK: 3 MiB that no repeat of a
        // short pattern could fake.
        let data: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                let sizes = [1usize, 7, 4096, 300 << 10, 17, 65_536, 1 << 20];
                let mut at = 0;
                let mut k = 0;
                while at < data.len() {
                    let n = sizes[k % sizes.len()].min(data.len() - at);
                    app_w.write_all(&data[at..at + n]).await.expect("write");
                    at += n;
                    k += 1;
                }
                app_w.shutdown().await.expect("shutdown");
            })
        };
        let mut got = Vec::with_capacity(data.len());
        while let Some(c) = far.rx.recv().await.expect("recv") {
            got.extend_from_slice(&c);
        }
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the relayed bytes differ from those written");
        writer.await.expect("writer");
        task.await.expect("relay ends");
    }
}
