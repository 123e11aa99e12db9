//! Control messages: the only things ever sent on the control stream (the first bidirectional
//! stream of a connection), each in one length-delimited frame (see [`crate::codec`]).
//!
//! These messages are generic: what is particular to a device kind travels inside them as
//! opaque bytes (`params`, `body`) whose codec lives in that kind's module under
//! [`crate::kinds`].
//!
//! Channel ids are chosen by the client, start at 1 and are never reused within a connection;
//! channel 0 means "the session itself" (used by `Notice`). A stream channel's QUIC stream
//! starts with `varint(channel id)`; a datagram starts with `varint(channel id)`. Request ids
//! are chosen by the client, start at 1 and are never reused within a connection.

use crate::codec::*;
use crate::error::ErrorCode;
use crate::kinds::Kind;
use bytes::{BufMut, Bytes, BytesMut};

/// Most devices one exporter may offer (and one Welcome may list). A board has a handful;
/// the bound keeps a hostile exporter from exhausting the client's ptys or ports.
pub const MAX_DEVICES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Open(Open),
    Opened(Opened),
    Reject(Reject),
    Close(Close),
    Control(Control),
    Bye(Bye),
    Request(Request),
    Done(Done),
    Notice(Notice),
    Status(Status),
    Guests(Guests),
}

/// Client → exporter, first message. The token is a secret: never log it (Debug masks it).
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub features: u64,
    /// Human-readable client identity ("alice@laptop"), shown to others who find the board busy.
    pub client: String,
    /// Random per `jmp attach` process; a reconnect with the same session replaces the old
    /// connection instead of being refused as "busy".
    pub session: u64,
    pub token: String,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("features", &self.features)
            .field("client", &self.client)
            .field("session", &format_args!("{:016x}", self.session))
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Exporter → client, answer to a good `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub exporter: String,
    /// What this exporter serves (`crate::features`).
    pub features: u64,
    /// Random per exporter process. Per-device offsets (serial history) are only comparable
    /// within one instance: a client that sees a new instance does not resume, it replays.
    pub instance: u64,
    pub devices: Vec<DeviceInfo>,
}

/// Whether a device can be used now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "lowercase")]
pub enum DeviceState {
    Available,
    /// Exists, but cannot be used now (port unplugged, adapter missing), and why.
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: Kind,
    pub state: DeviceState,
    /// The kind's typed parameters (its wire module's `DeviceParams`).
    pub params: Bytes,
    /// Free text for people: "/dev/ttyUSB0 115200 8N1", "192.168.10.2:22". Never parsed.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelMode {
    Stream,
    Datagram,
}

/// Client → exporter: open a channel on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub channel: u64,
    pub device: String,
    pub mode: ChannelMode,
    /// The kind's open parameters (its wire module's `OpenParams`).
    pub params: Bytes,
}

/// Exporter → client: the channel is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub channel: u64,
    /// The kind's answer (its wire module's `OpenedParams`).
    pub params: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub channel: u64,
    pub code: ErrorCode,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub channel: u64,
    pub code: ErrorCode,
    pub reason: String,
}

/// A kind's out-of-band message for an open channel (either direction, not answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub channel: u64,
    pub body: Bytes,
}

/// Either side, last message: why the session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bye {
    pub code: ErrorCode,
    pub reason: String,
}

/// Client → exporter: an operation on a device (power cycle, serial break), answered by exactly
/// one `Done` with the same id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub device: String,
    /// The kind's request (its wire module's `Request`).
    pub body: Bytes,
}

/// Exporter → client: the result of `Request { id }`: `code` ok with the kind's answer in
/// `body`, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub id: u64,
    pub code: ErrorCode,
    pub reason: String,
    pub body: Bytes,
}

/// Text for the user (either direction); channel 0 is the session (a lease ending soon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub channel: u64,
    pub text: String,
}

/// Exporter → client: a device's state or parameters changed (a port vanished or came back,
/// power went off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub device: String,
    pub state: DeviceState,
    pub params: Bytes,
}

const T_HELLO: u8 = 0x01;
const T_WELCOME: u8 = 0x02;
const T_OPEN: u8 = 0x03;
const T_OPENED: u8 = 0x04;
const T_REJECT: u8 = 0x05;
const T_CLOSE: u8 = 0x06;
const T_CONTROL: u8 = 0x07;
const T_BYE: u8 = 0x08;
const T_REQUEST: u8 = 0x09;
const T_DONE: u8 = 0x0a;
const T_NOTICE: u8 = 0x0b;
const T_STATUS: u8 = 0x0c;
const T_GUESTS: u8 = 0x0d;

/// Most colleagues one [`Guests`] may list: the exporter admits 8 guest sessions; the bound
/// keeps a hostile exporter from making a client hold an unbounded list.
pub const MAX_GUESTS_LISTED: usize = 64;

/// Exporter → client, only to the session holding the board and only when its Hello has
/// [`crate::features::GUESTS`]: the colleagues attached beside it under a shared lease (`jmp
/// share lease`), the whole list each time it changes (empty: nobody any more).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Guests {
    pub guests: Vec<GuestInfo>,
}

/// One colleague's session beside the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// The client the share names (the identity its token proves).
    pub client: String,
    /// Whether it may type and power (`--control`), or only watches.
    pub control: bool,
    /// Unix seconds it attached at, by the exporter's clock.
    pub since: u64,
}

fn put_state(buf: &mut BytesMut, s: &DeviceState) {
    match s {
        DeviceState::Available => buf.put_u8(0),
        DeviceState::Unavailable(why) => {
            buf.put_u8(1);
            put_str(buf, why);
        }
    }
}

fn state_len(s: &DeviceState) -> usize {
    1 + match s {
        DeviceState::Available => 0,
        DeviceState::Unavailable(why) => str_len(why),
    }
}

fn get_state(buf: &mut &[u8]) -> Result<DeviceState, DecodeError> {
    match get_u8(buf, "device state")? {
        0 => Ok(DeviceState::Available),
        1 => Ok(DeviceState::Unavailable(get_str(
            buf,
            "unavailable reason",
        )?)),
        v => Err(DecodeError::Invalid {
            field: "device state",
            value: v.into(),
        }),
    }
}

fn put_code(buf: &mut BytesMut, c: ErrorCode) {
    put_varint(buf, c.to_wire())
}

fn get_code(buf: &mut &[u8]) -> Result<ErrorCode, DecodeError> {
    Ok(ErrorCode::from_wire(get_varint(buf, "code")?))
}

fn code_len(c: ErrorCode) -> usize {
    varint_len(c.to_wire())
}

impl Codec for DeviceInfo {
    fn encode(&self, buf: &mut BytesMut) {
        put_str(buf, &self.name);
        put_str(buf, self.kind.as_str());
        put_state(buf, &self.state);
        put_bytes(buf, &self.params);
        put_str(buf, &self.detail);
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(DeviceInfo {
            name: get_str(buf, "device name")?,
            kind: Kind::from_wire(&get_str(buf, "device kind")?),
            state: get_state(buf)?,
            params: get_bytes(buf, "device params")?,
            detail: get_str(buf, "device detail")?,
        })
    }

    fn encoded_len(&self) -> usize {
        str_len(&self.name)
            + str_len(self.kind.as_str())
            + state_len(&self.state)
            + bytes_len(&self.params)
            + str_len(&self.detail)
    }
}

impl Codec for Message {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Message::Hello(h) => {
                buf.put_u8(T_HELLO);
                put_varint(buf, h.features);
                put_str(buf, &h.client);
                buf.put_u64(h.session);
                put_str(buf, &h.token);
            }
            Message::Welcome(w) => {
                buf.put_u8(T_WELCOME);
                put_str(buf, &w.exporter);
                put_varint(buf, w.features);
                buf.put_u64(w.instance);
                put_varint(buf, w.devices.len() as u64);
                for d in &w.devices {
                    d.encode(buf);
                }
            }
            Message::Open(o) => {
                buf.put_u8(T_OPEN);
                put_varint(buf, o.channel);
                put_str(buf, &o.device);
                buf.put_u8(match o.mode {
                    ChannelMode::Stream => 0,
                    ChannelMode::Datagram => 1,
                });
                put_bytes(buf, &o.params);
            }
            Message::Opened(o) => {
                buf.put_u8(T_OPENED);
                put_varint(buf, o.channel);
                put_bytes(buf, &o.params);
            }
            Message::Reject(r) => {
                buf.put_u8(T_REJECT);
                put_varint(buf, r.channel);
                put_code(buf, r.code);
                put_str(buf, &r.reason);
            }
            Message::Close(c) => {
                buf.put_u8(T_CLOSE);
                put_varint(buf, c.channel);
                put_code(buf, c.code);
                put_str(buf, &c.reason);
            }
            Message::Control(c) => {
                buf.put_u8(T_CONTROL);
                put_varint(buf, c.channel);
                put_bytes(buf, &c.body);
            }
            Message::Bye(b) => {
                buf.put_u8(T_BYE);
                put_code(buf, b.code);
                put_str(buf, &b.reason);
            }
            Message::Request(r) => {
                buf.put_u8(T_REQUEST);
                put_varint(buf, r.id);
                put_str(buf, &r.device);
                put_bytes(buf, &r.body);
            }
            Message::Done(d) => {
                buf.put_u8(T_DONE);
                put_varint(buf, d.id);
                put_code(buf, d.code);
                put_str(buf, &d.reason);
                put_bytes(buf, &d.body);
            }
            Message::Notice(n) => {
                buf.put_u8(T_NOTICE);
                put_varint(buf, n.channel);
                put_str(buf, &n.text);
            }
            Message::Status(s) => {
                buf.put_u8(T_STATUS);
                put_str(buf, &s.device);
                put_state(buf, &s.state);
                put_bytes(buf, &s.params);
            }
            Message::Guests(g) => {
                buf.put_u8(T_GUESTS);
                put_varint(buf, g.guests.len() as u64);
                for x in &g.guests {
                    put_str(buf, &x.client);
                    buf.put_u8(u8::from(x.control));
                    put_varint(buf, x.since);
                }
            }
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let t = get_u8(buf, "message type")?;
        Ok(match t {
            T_HELLO => Message::Hello(Hello {
                features: get_varint(buf, "features")?,
                client: get_str(buf, "client")?,
                session: get_u64(buf, "session")?,
                token: get_str(buf, "token")?,
            }),
            T_WELCOME => {
                let exporter = get_str(buf, "exporter")?;
                let features = get_varint(buf, "features")?;
                let instance = get_u64(buf, "instance")?;
                // Five bytes is the smallest device (four empty strings and a state byte).
                let n = get_count(buf, "device count", 5)?;
                if n > MAX_DEVICES {
                    return Err(DecodeError::Invalid {
                        field: "device count",
                        value: n as u64,
                    });
                }
                let mut devices = Vec::with_capacity(n);
                for _ in 0..n {
                    devices.push(DeviceInfo::decode(buf)?);
                }
                Message::Welcome(Welcome {
                    exporter,
                    features,
                    instance,
                    devices,
                })
            }
            T_OPEN => {
                let channel = get_varint(buf, "channel")?;
                let device = get_str(buf, "device")?;
                let mode = match get_u8(buf, "mode")? {
                    0 => ChannelMode::Stream,
                    1 => ChannelMode::Datagram,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "mode",
                            value: v.into(),
                        })
                    }
                };
                Message::Open(Open {
                    channel,
                    device,
                    mode,
                    params: get_bytes(buf, "open params")?,
                })
            }
            T_OPENED => Message::Opened(Opened {
                channel: get_varint(buf, "channel")?,
                params: get_bytes(buf, "opened params")?,
            }),
            T_REJECT => Message::Reject(Reject {
                channel: get_varint(buf, "channel")?,
                code: get_code(buf)?,
                reason: get_str(buf, "reason")?,
            }),
            T_CLOSE => Message::Close(Close {
                channel: get_varint(buf, "channel")?,
                code: get_code(buf)?,
                reason: get_str(buf, "reason")?,
            }),
            T_CONTROL => Message::Control(Control {
                channel: get_varint(buf, "channel")?,
                body: get_bytes(buf, "control body")?,
            }),
            T_BYE => Message::Bye(Bye {
                code: get_code(buf)?,
                reason: get_str(buf, "reason")?,
            }),
            T_REQUEST => Message::Request(Request {
                id: get_varint(buf, "request id")?,
                device: get_str(buf, "device")?,
                body: get_bytes(buf, "request body")?,
            }),
            T_DONE => Message::Done(Done {
                id: get_varint(buf, "request id")?,
                code: get_code(buf)?,
                reason: get_str(buf, "reason")?,
                body: get_bytes(buf, "done body")?,
            }),
            T_NOTICE => Message::Notice(Notice {
                channel: get_varint(buf, "channel")?,
                text: get_str(buf, "notice")?,
            }),
            T_STATUS => Message::Status(Status {
                device: get_str(buf, "device")?,
                state: get_state(buf)?,
                params: get_bytes(buf, "status params")?,
            }),
            T_GUESTS => {
                // Three bytes is the smallest guest (an empty name, the flag, a 1-byte time).
                let n = get_count(buf, "guest count", 3)?;
                if n > MAX_GUESTS_LISTED {
                    return Err(DecodeError::Invalid {
                        field: "guest count",
                        value: n as u64,
                    });
                }
                let mut guests = Vec::with_capacity(n);
                for _ in 0..n {
                    let client = get_str(buf, "guest client")?;
                    let control = match get_u8(buf, "guest control")? {
                        0 => false,
                        1 => true,
                        v => {
                            return Err(DecodeError::Invalid {
                                field: "guest control",
                                value: v.into(),
                            })
                        }
                    };
                    guests.push(GuestInfo {
                        client,
                        control,
                        since: get_varint(buf, "guest since")?,
                    });
                }
                Message::Guests(Guests { guests })
            }
            t => return Err(DecodeError::UnknownType(t)),
        })
    }

    fn encoded_len(&self) -> usize {
        1 + match self {
            Message::Hello(h) => {
                varint_len(h.features) + str_len(&h.client) + 8 + str_len(&h.token)
            }
            Message::Welcome(w) => {
                str_len(&w.exporter)
                    + varint_len(w.features)
                    + 8
                    + varint_len(w.devices.len() as u64)
                    + w.devices.iter().map(|d| d.encoded_len()).sum::<usize>()
            }
            Message::Open(o) => {
                varint_len(o.channel) + str_len(&o.device) + 1 + bytes_len(&o.params)
            }
            Message::Opened(o) => varint_len(o.channel) + bytes_len(&o.params),
            Message::Reject(Reject {
                channel,
                code,
                reason,
            })
            | Message::Close(Close {
                channel,
                code,
                reason,
            }) => varint_len(*channel) + code_len(*code) + str_len(reason),
            Message::Control(c) => varint_len(c.channel) + bytes_len(&c.body),
            Message::Bye(b) => code_len(b.code) + str_len(&b.reason),
            Message::Request(r) => varint_len(r.id) + str_len(&r.device) + bytes_len(&r.body),
            Message::Done(d) => {
                varint_len(d.id) + code_len(d.code) + str_len(&d.reason) + bytes_len(&d.body)
            }
            Message::Notice(n) => varint_len(n.channel) + str_len(&n.text),
            Message::Status(s) => str_len(&s.device) + state_len(&s.state) + bytes_len(&s.params),
            Message::Guests(g) => {
                varint_len(g.guests.len() as u64)
                    + g.guests
                        .iter()
                        .map(|x| str_len(&x.client) + 1 + varint_len(x.since))
                        .sum::<usize>()
            }
        }
    }
}

impl Message {
    /// The name used in logs and protocol errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Open(_) => "Open",
            Message::Opened(_) => "Opened",
            Message::Reject(_) => "Reject",
            Message::Close(_) => "Close",
            Message::Control(_) => "Control",
            Message::Bye(_) => "Bye",
            Message::Request(_) => "Request",
            Message::Done(_) => "Done",
            Message::Notice(_) => "Notice",
            Message::Status(_) => "Status",
            Message::Guests(_) => "Guests",
        }
    }

    /// One frame (length prefix included), ready to write on the control stream.
    pub fn to_frame(&self) -> Bytes {
        let mut b = BytesMut::new();
        encode_frame(self, &mut b);
        b.freeze()
    }
}

/// The header that starts every stream channel and every datagram: the channel id.
pub fn channel_header(channel: u64) -> BytesMut {
    let mut b = BytesMut::with_capacity(8);
    put_varint(&mut b, channel);
    b
}

#[cfg(test)]
mod tests;
