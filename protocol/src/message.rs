//! Control messages: the only things ever sent on the control stream (the first bidirectional
//! stream of a connection), each in one length-delimited frame (see [`crate::codec`]).
//!
//! Channel ids are chosen by the client, start at 1 and are never reused within a connection;
//! channel 0 means "the session itself" (used by `Control` notices). A stream channel's QUIC
//! stream starts with `varint(channel id)`; a datagram starts with `varint(channel id)`.

use crate::codec::*;
use crate::error::ErrorCode;
use bytes::{BufMut, BytesMut};

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
    pub features: u64,
    /// Random per exporter process. Serial offsets are only comparable within one instance: a
    /// client that sees a new instance (the exporter restarted) does not resume, it replays.
    pub instance: u64,
    pub devices: Vec<DeviceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// "serial", "tcp", ...: a string so a new device kind needs no wire change.
    pub kind: String,
    /// Free text for people: "/dev/ttyUSB0 115200 8N1", "192.168.10.2:22".
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Serial: the device-output offset the client has already seen; `None` on first attach
    /// (then the exporter replays its whole history).
    pub resume_from: Option<u64>,
}

/// Exporter → client: the channel is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub channel: u64,
    /// Serial: the device-output offset of the first byte sent on the stream. Larger than the
    /// client's `resume_from` when history was lost in between. 0 for other devices.
    pub offset: u64,
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

/// Out-of-band settings for a channel's device (either direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub channel: u64,
    pub body: ControlBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlBody {
    /// Apply these line settings to the real port.
    LineSettings(LineSettings),
    /// Send a break of this many milliseconds.
    Break { millis: u32 },
    /// Set modem lines; `None` leaves a line as it is.
    ModemLines {
        dtr: Option<bool>,
        rts: Option<bool>,
    },
    /// Text for the user (exporter → client), e.g. why a setting could not be applied.
    Notice(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowControl {
    None,
    Software,
    Hardware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    /// 5..=8
    pub data_bits: u8,
    pub parity: Parity,
    /// 1 or 2
    pub stop_bits: u8,
    pub flow: FlowControl,
}

impl Default for LineSettings {
    fn default() -> Self {
        LineSettings {
            baud: 115_200,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow: FlowControl::None,
        }
    }
}

impl std::fmt::Display for LineSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Odd => 'O',
            Parity::Even => 'E',
        };
        let flow = match self.flow {
            FlowControl::None => "",
            FlowControl::Software => " xon/xoff",
            FlowControl::Hardware => " rts/cts",
        };
        write!(
            f,
            "{} {}{}{}{}",
            self.baud, self.data_bits, p, self.stop_bits, flow
        )
    }
}

/// Either side, last message: why the session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bye {
    pub code: ErrorCode,
    pub reason: String,
}

const T_HELLO: u8 = 0x01;
const T_WELCOME: u8 = 0x02;
const T_OPEN: u8 = 0x03;
const T_OPENED: u8 = 0x04;
const T_REJECT: u8 = 0x05;
const T_CLOSE: u8 = 0x06;
const T_CONTROL: u8 = 0x07;
const T_BYE: u8 = 0x08;

const C_LINE: u8 = 0x01;
const C_BREAK: u8 = 0x02;
const C_MODEM: u8 = 0x03;
const C_NOTICE: u8 = 0x04;

fn tri(v: Option<bool>) -> u8 {
    match v {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    }
}

fn get_tri(buf: &mut &[u8], what: &'static str) -> Result<Option<bool>, DecodeError> {
    match get_u8(buf, what)? {
        0 => Ok(None),
        1 => Ok(Some(false)),
        2 => Ok(Some(true)),
        v => Err(DecodeError::Invalid {
            field: what,
            value: v.into(),
        }),
    }
}

impl Codec for ControlBody {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            ControlBody::LineSettings(l) => {
                buf.put_u8(C_LINE);
                put_varint(buf, l.baud.into());
                buf.put_u8(l.data_bits);
                buf.put_u8(match l.parity {
                    Parity::None => 0,
                    Parity::Odd => 1,
                    Parity::Even => 2,
                });
                buf.put_u8(l.stop_bits);
                buf.put_u8(match l.flow {
                    FlowControl::None => 0,
                    FlowControl::Software => 1,
                    FlowControl::Hardware => 2,
                });
            }
            ControlBody::Break { millis } => {
                buf.put_u8(C_BREAK);
                put_varint(buf, (*millis).into());
            }
            ControlBody::ModemLines { dtr, rts } => {
                buf.put_u8(C_MODEM);
                buf.put_u8(tri(*dtr));
                buf.put_u8(tri(*rts));
            }
            ControlBody::Notice(s) => {
                buf.put_u8(C_NOTICE);
                put_str(buf, s);
            }
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "control type")? {
            C_LINE => {
                let baud = get_varint(buf, "baud")?;
                let baud =
                    u32::try_from(baud)
                        .ok()
                        .filter(|b| *b > 0)
                        .ok_or(DecodeError::Invalid {
                            field: "baud",
                            value: baud,
                        })?;
                let data_bits = get_u8(buf, "data bits")?;
                if !(5..=8).contains(&data_bits) {
                    return Err(DecodeError::Invalid {
                        field: "data bits",
                        value: data_bits.into(),
                    });
                }
                let parity = match get_u8(buf, "parity")? {
                    0 => Parity::None,
                    1 => Parity::Odd,
                    2 => Parity::Even,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "parity",
                            value: v.into(),
                        })
                    }
                };
                let stop_bits = get_u8(buf, "stop bits")?;
                if !(1..=2).contains(&stop_bits) {
                    return Err(DecodeError::Invalid {
                        field: "stop bits",
                        value: stop_bits.into(),
                    });
                }
                let flow = match get_u8(buf, "flow control")? {
                    0 => FlowControl::None,
                    1 => FlowControl::Software,
                    2 => FlowControl::Hardware,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "flow control",
                            value: v.into(),
                        })
                    }
                };
                Ok(ControlBody::LineSettings(LineSettings {
                    baud,
                    data_bits,
                    parity,
                    stop_bits,
                    flow,
                }))
            }
            C_BREAK => {
                let ms = get_varint(buf, "break duration")?;
                let millis = u32::try_from(ms).map_err(|_| DecodeError::Invalid {
                    field: "break duration",
                    value: ms,
                })?;
                Ok(ControlBody::Break { millis })
            }
            C_MODEM => Ok(ControlBody::ModemLines {
                dtr: get_tri(buf, "dtr")?,
                rts: get_tri(buf, "rts")?,
            }),
            C_NOTICE => Ok(ControlBody::Notice(get_str(buf, "notice")?)),
            t => Err(DecodeError::Invalid {
                field: "control type",
                value: t.into(),
            }),
        }
    }

    fn encoded_len(&self) -> usize {
        1 + match self {
            ControlBody::LineSettings(l) => varint_len(l.baud.into()) + 4,
            ControlBody::Break { millis } => varint_len((*millis).into()),
            ControlBody::ModemLines { .. } => 2,
            ControlBody::Notice(s) => str_len(s),
        }
    }
}

fn opt_len(v: Option<u64>) -> usize {
    1 + v.map_or(0, varint_len)
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
                    put_str(buf, &d.name);
                    put_str(buf, &d.kind);
                    put_str(buf, &d.detail);
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
                match o.resume_from {
                    None => buf.put_u8(0),
                    Some(off) => {
                        buf.put_u8(1);
                        put_varint(buf, off);
                    }
                }
            }
            Message::Opened(o) => {
                buf.put_u8(T_OPENED);
                put_varint(buf, o.channel);
                put_varint(buf, o.offset);
            }
            Message::Reject(r) => {
                buf.put_u8(T_REJECT);
                put_varint(buf, r.channel);
                put_varint(buf, r.code.to_wire());
                put_str(buf, &r.reason);
            }
            Message::Close(c) => {
                buf.put_u8(T_CLOSE);
                put_varint(buf, c.channel);
                put_varint(buf, c.code.to_wire());
                put_str(buf, &c.reason);
            }
            Message::Control(c) => {
                buf.put_u8(T_CONTROL);
                put_varint(buf, c.channel);
                c.body.encode(buf);
            }
            Message::Bye(b) => {
                buf.put_u8(T_BYE);
                put_varint(buf, b.code.to_wire());
                put_str(buf, &b.reason);
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
                let n = get_count(buf, "device count", 3)?;
                let mut devices = Vec::with_capacity(n);
                for _ in 0..n {
                    devices.push(DeviceInfo {
                        name: get_str(buf, "device name")?,
                        kind: get_str(buf, "device kind")?,
                        detail: get_str(buf, "device detail")?,
                    });
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
                let mode = match get_u8(buf, "channel mode")? {
                    0 => ChannelMode::Stream,
                    1 => ChannelMode::Datagram,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "channel mode",
                            value: v.into(),
                        })
                    }
                };
                let resume_from = match get_u8(buf, "resume flag")? {
                    0 => None,
                    1 => Some(get_varint(buf, "resume offset")?),
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "resume flag",
                            value: v.into(),
                        })
                    }
                };
                Message::Open(Open {
                    channel,
                    device,
                    mode,
                    resume_from,
                })
            }
            T_OPENED => Message::Opened(Opened {
                channel: get_varint(buf, "channel")?,
                offset: get_varint(buf, "offset")?,
            }),
            T_REJECT => Message::Reject(Reject {
                channel: get_varint(buf, "channel")?,
                code: ErrorCode::from_wire(get_varint(buf, "code")?),
                reason: get_str(buf, "reason")?,
            }),
            T_CLOSE => Message::Close(Close {
                channel: get_varint(buf, "channel")?,
                code: ErrorCode::from_wire(get_varint(buf, "code")?),
                reason: get_str(buf, "reason")?,
            }),
            T_CONTROL => Message::Control(Control {
                channel: get_varint(buf, "channel")?,
                body: ControlBody::decode(buf)?,
            }),
            T_BYE => Message::Bye(Bye {
                code: ErrorCode::from_wire(get_varint(buf, "code")?),
                reason: get_str(buf, "reason")?,
            }),
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
                    + w.devices
                        .iter()
                        .map(|d| str_len(&d.name) + str_len(&d.kind) + str_len(&d.detail))
                        .sum::<usize>()
            }
            Message::Open(o) => {
                varint_len(o.channel) + str_len(&o.device) + 1 + opt_len(o.resume_from)
            }
            Message::Opened(o) => varint_len(o.channel) + varint_len(o.offset),
            Message::Reject(Reject {
                channel,
                code,
                reason,
            })
            | Message::Close(Close {
                channel,
                code,
                reason,
            }) => varint_len(*channel) + varint_len(code.to_wire()) + str_len(reason),
            Message::Control(c) => varint_len(c.channel) + c.body.encoded_len(),
            Message::Bye(b) => varint_len(b.code.to_wire()) + str_len(&b.reason),
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
        }
    }

    /// One frame (length prefix included), ready to write on the control stream.
    pub fn to_frame(&self) -> bytes::Bytes {
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
