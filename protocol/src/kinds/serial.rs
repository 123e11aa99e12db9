//! Serial consoles on the wire.
//!
//! - `DeviceInfo.params`: [`DeviceParams`] (the real port's line settings as configured).
//! - `Open.params`: [`OpenParams`] (where to resume, and optionally how to pace what the
//!   channel types); `Opened.params`: [`OpenedParams`] (the offset the stream starts at).
//! - Stream payload: raw bytes both ways; on a *timed* channel (asked for with
//!   `OpenParams.timed`, confirmed by `OpenedParams.timed`) the device's output comes as
//!   [timed frames](TimedDecoder) instead: each chunk with the time the exporter read it from
//!   the board. What the client types stays raw bytes. A peer that does not know timed
//!   channels never sees one: the client asks per channel, and an exporter that does not
//!   know the option refuses the open (the client then opens a plain channel again).
//! - `Control.body` (client → exporter, no answer): [`Control`]: a local program changed the
//!   pty's settings (only what a pty carries: speed, stop bits, flow control); a failure to
//!   apply them comes back as a `Notice`.
//! - `Request.body`: [`Request`] (what a pty cannot carry: parity, data bits, break, modem
//!   lines), answered by `Done.body`: [`Response`], the real port's settings afterwards.

use crate::codec::*;
use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

/// Longest break the exporter performs; a longer request is refused (it would hold the port).
pub const MAX_BREAK_MS: u32 = 10_000;
/// Longest pause after each character a channel may ask for (a slower board is not a console).
pub const MAX_CHAR_DELAY_US: u32 = 100_000;
/// Longest pause after each line end a channel may ask for.
pub const MAX_LINE_DELAY_US: u32 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    #[serde(alias = "xonxoff")]
    Software,
    #[serde(alias = "rtscts")]
    Hardware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// A partial change of line settings: what is `None` stays as the real port has it (the
/// exporter merges, so the client needs no copy of the port's state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baud: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bits: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parity: Option<Parity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_bits: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowControl>,
}

impl LineChange {
    pub fn apply(&self, mut s: LineSettings) -> LineSettings {
        if let Some(b) = self.baud {
            s.baud = b;
        }
        if let Some(d) = self.data_bits {
            s.data_bits = d;
        }
        if let Some(p) = self.parity {
            s.parity = p;
        }
        if let Some(st) = self.stop_bits {
            s.stop_bits = st;
        }
        if let Some(f) = self.flow {
            s.flow = f;
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceParams {
    pub settings: LineSettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenParams {
    /// The device-output offset the client has already seen; `None` on first attach (then the
    /// exporter replays its whole history).
    pub resume_from: Option<u64>,
    /// How the exporter paces what this channel types (`None`: as the device is configured).
    pub pacing: Option<Pacing>,
    /// Send the device's output as timed frames ([`TimedDecoder`]), for recordings.
    pub timed: bool,
}

/// Pauses the exporter makes between the bytes it writes to the port, for a bootloader that
/// reads slowly: after each byte, and in addition after each line end (`\r` or `\n`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pacing {
    /// Microseconds after each byte, at most [`MAX_CHAR_DELAY_US`].
    pub char_us: u32,
    /// Microseconds after each line end, at most [`MAX_LINE_DELAY_US`].
    pub line_us: u32,
}

impl Pacing {
    /// Whether it pauses at all.
    pub fn is_paced(&self) -> bool {
        self.char_us > 0 || self.line_us > 0
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenedParams {
    /// The device-output offset of the first byte sent on the stream. Larger than the client's
    /// `resume_from` when history was lost in between.
    pub offset: u64,
    /// The output comes as timed frames (the client asked, and the exporter knows them).
    pub timed: bool,
}

// ---------------------------------------------------------------------------------------------
// Timed output

/// Largest chunk of output one timed frame carries (the exporter cuts its reads to it).
pub const MAX_TIMED_CHUNK: usize = 64 * 1024;
/// Latest time a frame may carry: 10 years of the exporter's uptime, in microseconds. The
/// clock is the exporter's monotonic one, counted from when the device's history began, so
/// anything beyond is a broken or hostile peer (and would lose precision as seconds in f64).
pub const MAX_TIMED_US: u64 = 10 * 366 * 86_400 * 1_000_000;
/// Longest frame header: two varints.
const TIMED_HEADER_MAX: usize = 16;

/// One chunk of the device's output and when the exporter read it from the board:
/// microseconds on the exporter's monotonic clock since the device's history began. Only
/// differences between times mean something (a recording counts from its first one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedChunk {
    pub time_us: u64,
    pub data: bytes::Bytes,
}

/// A timed frame on the wire: varint time (µs), varint length (1..=[`MAX_TIMED_CHUNK`]), the
/// bytes. Times never go back.
pub fn put_timed(buf: &mut BytesMut, time_us: u64, data: &[u8]) {
    debug_assert!(!data.is_empty() && data.len() <= MAX_TIMED_CHUNK);
    put_varint(buf, time_us);
    put_varint(buf, data.len() as u64);
    buf.put_slice(data);
}

/// What is wrong with a timed stream; the channel is unusable after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimedError {
    #[error("timed console output: a chunk of {0} bytes (1 to {MAX_TIMED_CHUNK} allowed)")]
    ChunkSize(u64),
    #[error("timed console output: time {now} µs is before the previous chunk's {prev} µs")]
    Backwards { prev: u64, now: u64 },
    #[error("timed console output: time {0} µs is beyond the {MAX_TIMED_US} µs allowed")]
    Absurd(u64),
    #[error("timed console output: {0}")]
    Decode(DecodeError),
}

/// Splits a timed stream, received in pieces of any size, into [`TimedChunk`]s. Holds at most
/// one frame's header and [`MAX_TIMED_CHUNK`] bytes of a frame not yet whole; everything from
/// the peer is checked: the length of each chunk, and each time against the previous one and
/// [`MAX_TIMED_US`].
#[derive(Debug, Default)]
pub struct TimedDecoder {
    buf: BytesMut,
    last: Option<u64>,
}

impl TimedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The whole chunks `data` completes, in order.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<TimedChunk>, TimedError> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let mut rest: &[u8] = &self.buf;
            let header = (|| -> Result<(u64, u64), DecodeError> {
                Ok((get_varint(&mut rest, "time")?, get_varint(&mut rest, "length")?))
            })();
            let (time_us, len) = match header {
                Ok(h) => h,
                Err(DecodeError::Truncated(_)) if self.buf.len() < TIMED_HEADER_MAX => break,
                Err(e) => return Err(TimedError::Decode(e)),
            };
            if len == 0 || len > MAX_TIMED_CHUNK as u64 {
                return Err(TimedError::ChunkSize(len));
            }
            if time_us > MAX_TIMED_US {
                return Err(TimedError::Absurd(time_us));
            }
            if let Some(prev) = self.last {
                if time_us < prev {
                    return Err(TimedError::Backwards { prev, now: time_us });
                }
            }
            let head = self.buf.len() - rest.len();
            let len = len as usize;
            if rest.len() < len {
                break;
            }
            self.last = Some(time_us);
            let _ = self.buf.split_to(head);
            out.push(TimedChunk {
                time_us,
                data: self.buf.split_to(len).freeze(),
            });
        }
        Ok(out)
    }

    /// Bytes of a frame not yet whole.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// A local program changed these line settings on the pty: apply them to the real port
    /// (what the change leaves out stays as the port has it).
    Follow(LineChange),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    /// Change line settings (including those a pty cannot carry).
    Set(LineChange),
    /// Send a break of this many milliseconds (at most [`MAX_BREAK_MS`]).
    Break { millis: u32 },
    /// Set modem lines; `None` leaves a line as it is.
    Modem {
        #[serde(default)]
        dtr: Option<bool>,
        #[serde(default)]
        rts: Option<bool>,
    },
    /// Only report the settings.
    Get,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The real port's settings after the request.
    pub settings: LineSettings,
}

const LINE_LEN: usize = 4;

fn put_line(buf: &mut BytesMut, l: &LineSettings) {
    put_varint(buf, l.baud.into());
    buf.put_u8(l.data_bits);
    buf.put_u8(parity_wire(l.parity));
    buf.put_u8(l.stop_bits);
    buf.put_u8(flow_wire(l.flow));
}

fn line_len(l: &LineSettings) -> usize {
    varint_len(l.baud.into()) + LINE_LEN
}

fn parity_wire(p: Parity) -> u8 {
    match p {
        Parity::None => 0,
        Parity::Odd => 1,
        Parity::Even => 2,
    }
}

fn flow_wire(f: FlowControl) -> u8 {
    match f {
        FlowControl::None => 0,
        FlowControl::Software => 1,
        FlowControl::Hardware => 2,
    }
}

fn get_baud(buf: &mut &[u8]) -> Result<u32, DecodeError> {
    let baud = get_varint(buf, "baud")?;
    u32::try_from(baud)
        .ok()
        .filter(|b| *b > 0)
        .ok_or(DecodeError::Invalid {
            field: "baud",
            value: baud,
        })
}

fn get_data_bits(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    let d = get_u8(buf, "data bits")?;
    if (5..=8).contains(&d) {
        Ok(d)
    } else {
        Err(DecodeError::Invalid {
            field: "data bits",
            value: d.into(),
        })
    }
}

fn get_parity(buf: &mut &[u8]) -> Result<Parity, DecodeError> {
    match get_u8(buf, "parity")? {
        0 => Ok(Parity::None),
        1 => Ok(Parity::Odd),
        2 => Ok(Parity::Even),
        v => Err(DecodeError::Invalid {
            field: "parity",
            value: v.into(),
        }),
    }
}

fn get_stop_bits(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    let s = get_u8(buf, "stop bits")?;
    if (1..=2).contains(&s) {
        Ok(s)
    } else {
        Err(DecodeError::Invalid {
            field: "stop bits",
            value: s.into(),
        })
    }
}

fn get_flow(buf: &mut &[u8]) -> Result<FlowControl, DecodeError> {
    match get_u8(buf, "flow control")? {
        0 => Ok(FlowControl::None),
        1 => Ok(FlowControl::Software),
        2 => Ok(FlowControl::Hardware),
        v => Err(DecodeError::Invalid {
            field: "flow control",
            value: v.into(),
        }),
    }
}

fn get_line(buf: &mut &[u8]) -> Result<LineSettings, DecodeError> {
    Ok(LineSettings {
        baud: get_baud(buf)?,
        data_bits: get_data_bits(buf)?,
        parity: get_parity(buf)?,
        stop_bits: get_stop_bits(buf)?,
        flow: get_flow(buf)?,
    })
}

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

impl Codec for LineSettings {
    fn encode(&self, buf: &mut BytesMut) {
        put_line(buf, self)
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        get_line(buf)
    }
    fn encoded_len(&self) -> usize {
        line_len(self)
    }
}

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_line(buf, &self.settings)
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(DeviceParams {
            settings: get_line(buf)?,
        })
    }
    fn encoded_len(&self) -> usize {
        line_len(&self.settings)
    }
}

const O_PACING: u8 = 0x01;
const O_TIMED: u8 = 0x02;

/// Options are trailing tagged fields, each at most once and in tag order: an older client's
/// `OpenParams` (resume only) still decode.
impl Codec for OpenParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_opt_varint(buf, self.resume_from);
        if let Some(p) = &self.pacing {
            buf.put_u8(O_PACING);
            put_varint(buf, p.char_us.into());
            put_varint(buf, p.line_us.into());
        }
        if self.timed {
            buf.put_u8(O_TIMED);
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let resume_from = get_opt_varint(buf, "resume")?;
        let mut pacing = None;
        let mut timed = false;
        let mut after = 0u8;
        while !buf.is_empty() {
            let tag = get_u8(buf, "open option")?;
            if tag <= after {
                // Repeated or out of order: one spelling per body.
                return Err(DecodeError::Invalid {
                    field: "open option",
                    value: tag.into(),
                });
            }
            after = tag;
            match tag {
                O_TIMED => timed = true,
                O_PACING => {
                    let char_us = get_u32_varint(buf, "char delay")?;
                    if char_us > MAX_CHAR_DELAY_US {
                        return Err(DecodeError::Invalid {
                            field: "char delay",
                            value: char_us.into(),
                        });
                    }
                    let line_us = get_u32_varint(buf, "line delay")?;
                    if line_us > MAX_LINE_DELAY_US {
                        return Err(DecodeError::Invalid {
                            field: "line delay",
                            value: line_us.into(),
                        });
                    }
                    pacing = Some(Pacing { char_us, line_us });
                }
                t => {
                    return Err(DecodeError::Invalid {
                        field: "open option",
                        value: t.into(),
                    })
                }
            }
        }
        Ok(OpenParams {
            resume_from,
            pacing,
            timed,
        })
    }
    fn encoded_len(&self) -> usize {
        opt_varint_len(self.resume_from)
            + self.pacing.map_or(0, |p| {
                1 + varint_len(p.char_us.into()) + varint_len(p.line_us.into())
            })
            + usize::from(self.timed)
    }
}

const OPENED_TIMED: u8 = 0x01;

/// The timed flag is a trailing byte, present only on a timed channel (which only a client
/// that knows it asks for), so an older client never sees it.
impl Codec for OpenedParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.offset);
        if self.timed {
            buf.put_u8(OPENED_TIMED);
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let offset = get_varint(buf, "offset")?;
        let timed = if buf.is_empty() {
            false
        } else {
            match get_u8(buf, "opened flags")? {
                OPENED_TIMED => true,
                v => {
                    return Err(DecodeError::Invalid {
                        field: "opened flags",
                        value: v.into(),
                    })
                }
            }
        };
        Ok(OpenedParams { offset, timed })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.offset) + usize::from(self.timed)
    }
}

const C_LINE: u8 = 0x01;

impl Codec for Control {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Control::Follow(c) => {
                buf.put_u8(C_LINE);
                c.encode(buf);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "serial control")? {
            C_LINE => Ok(Control::Follow(LineChange::decode(buf)?)),
            t => Err(DecodeError::Invalid {
                field: "serial control",
                value: t.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            Control::Follow(c) => c.encoded_len(),
        }
    }
}

const R_SET: u8 = 0x01;
const R_BREAK: u8 = 0x02;
const R_MODEM: u8 = 0x03;
const R_GET: u8 = 0x04;

// A change is a presence bitmap (baud, data bits, parity, stop bits, flow) followed by the
// present fields in that order.
impl Codec for LineChange {
    fn encode(&self, buf: &mut BytesMut) {
        let mut bits = 0u8;
        for (i, present) in [
            self.baud.is_some(),
            self.data_bits.is_some(),
            self.parity.is_some(),
            self.stop_bits.is_some(),
            self.flow.is_some(),
        ]
        .into_iter()
        .enumerate()
        {
            if present {
                bits |= 1 << i;
            }
        }
        buf.put_u8(bits);
        if let Some(b) = self.baud {
            put_varint(buf, b.into());
        }
        if let Some(d) = self.data_bits {
            buf.put_u8(d);
        }
        if let Some(p) = self.parity {
            buf.put_u8(parity_wire(p));
        }
        if let Some(s) = self.stop_bits {
            buf.put_u8(s);
        }
        if let Some(f) = self.flow {
            buf.put_u8(flow_wire(f));
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let bits = get_u8(buf, "line change")?;
        if bits & !0x1f != 0 {
            return Err(DecodeError::Invalid {
                field: "line change",
                value: bits.into(),
            });
        }
        let has = |i: u8| bits & (1 << i) != 0;
        Ok(LineChange {
            baud: if has(0) { Some(get_baud(buf)?) } else { None },
            data_bits: if has(1) {
                Some(get_data_bits(buf)?)
            } else {
                None
            },
            parity: if has(2) { Some(get_parity(buf)?) } else { None },
            stop_bits: if has(3) {
                Some(get_stop_bits(buf)?)
            } else {
                None
            },
            flow: if has(4) { Some(get_flow(buf)?) } else { None },
        })
    }
    fn encoded_len(&self) -> usize {
        1 + self.baud.map_or(0, |b| varint_len(b.into()))
            + usize::from(self.data_bits.is_some())
            + usize::from(self.parity.is_some())
            + usize::from(self.stop_bits.is_some())
            + usize::from(self.flow.is_some())
    }
}

impl Codec for Request {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Request::Set(c) => {
                buf.put_u8(R_SET);
                c.encode(buf);
            }
            Request::Break { millis } => {
                buf.put_u8(R_BREAK);
                put_varint(buf, (*millis).into());
            }
            Request::Modem { dtr, rts } => {
                buf.put_u8(R_MODEM);
                buf.put_u8(tri(*dtr));
                buf.put_u8(tri(*rts));
            }
            Request::Get => buf.put_u8(R_GET),
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "serial request")? {
            R_SET => Ok(Request::Set(LineChange::decode(buf)?)),
            R_BREAK => Ok(Request::Break {
                millis: get_u32_varint(buf, "break duration")?,
            }),
            R_MODEM => Ok(Request::Modem {
                dtr: get_tri(buf, "dtr")?,
                rts: get_tri(buf, "rts")?,
            }),
            R_GET => Ok(Request::Get),
            t => Err(DecodeError::Invalid {
                field: "serial request",
                value: t.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            Request::Set(c) => c.encoded_len(),
            Request::Break { millis } => varint_len((*millis).into()),
            Request::Modem { .. } => 2,
            Request::Get => 0,
        }
    }
}

impl Codec for Response {
    fn encode(&self, buf: &mut BytesMut) {
        put_line(buf, &self.settings)
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(Response {
            settings: get_line(buf)?,
        })
    }
    fn encoded_len(&self) -> usize {
        line_len(&self.settings)
    }
}

/// Decodes `data` as every body of this kind (the fuzz target `kind_bodies` runs it for every
/// kind): whatever the bytes, nothing panics and nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = LineSettings::decode_exact(data);
    let _ = DeviceParams::decode_exact(data);
    let _ = OpenParams::decode_exact(data);
    let _ = OpenedParams::decode_exact(data);
    let _ = Control::decode_exact(data);
    let _ = LineChange::decode_exact(data);
    let _ = Request::decode_exact(data);
    let _ = Response::decode_exact(data);
    let mut d = TimedDecoder::new();
    for piece in data.chunks(7) {
        if d.feed(piece).is_err() {
            break;
        }
        assert!(d.pending() <= TIMED_HEADER_MAX + MAX_TIMED_CHUNK);
    }
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let l = LineSettings {
        baud: 250_000,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 2,
        flow: FlowControl::Hardware,
    };
    vec![
        (
            "serial-params",
            to_bytes(&DeviceParams { settings: l }).to_vec(),
        ),
        (
            "serial-open",
            to_bytes(&OpenParams {
                resume_from: Some(4096),
                pacing: None,
                timed: false,
            })
            .to_vec(),
        ),
        (
            "serial-open-timed",
            to_bytes(&OpenParams {
                resume_from: None,
                pacing: None,
                timed: true,
            })
            .to_vec(),
        ),
        (
            "serial-open-paced",
            to_bytes(&OpenParams {
                resume_from: None,
                pacing: Some(Pacing {
                    char_us: 2000,
                    line_us: 50_000,
                }),
                timed: false,
            })
            .to_vec(),
        ),
        (
            "serial-opened",
            to_bytes(&OpenedParams {
                offset: 4096,
                timed: false,
            })
            .to_vec(),
        ),
        (
            "serial-opened-timed",
            to_bytes(&OpenedParams {
                offset: 4096,
                timed: true,
            })
            .to_vec(),
        ),
        (
            "serial-control-follow",
            to_bytes(&Control::Follow(LineChange {
                baud: Some(250_000),
                stop_bits: Some(2),
                flow: Some(FlowControl::Hardware),
                ..LineChange::default()
            }))
            .to_vec(),
        ),
        (
            "serial-request-set",
            to_bytes(&Request::Set(LineChange {
                parity: Some(Parity::Even),
                data_bits: Some(7),
                ..LineChange::default()
            }))
            .to_vec(),
        ),
        (
            "serial-request-break",
            to_bytes(&Request::Break { millis: 250 }).to_vec(),
        ),
        (
            "serial-request-modem",
            to_bytes(&Request::Modem {
                dtr: Some(true),
                rts: None,
            })
            .to_vec(),
        ),
        (
            "serial-response",
            to_bytes(&Response { settings: l }).to_vec(),
        ),
    ]
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    match name {
        "serial-params" => DeviceParams::decode_exact(bytes).is_ok(),
        "serial-open" | "serial-open-paced" | "serial-open-timed" => {
            OpenParams::decode_exact(bytes).is_ok()
        }
        "serial-opened" | "serial-opened-timed" => OpenedParams::decode_exact(bytes).is_ok(),
        "serial-control-follow" => Control::decode_exact(bytes).is_ok(),
        n if n.starts_with("serial-request") => Request::decode_exact(bytes).is_ok(),
        "serial-response" => Response::decode_exact(bytes).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    pub(crate) fn arb_line() -> impl Strategy<Value = LineSettings> {
        (1u32..=4_000_000, 5u8..=8, 0usize..3, 1u8..=2, 0usize..3).prop_map(
            |(baud, data_bits, p, stop_bits, f)| LineSettings {
                baud,
                data_bits,
                parity: [Parity::None, Parity::Odd, Parity::Even][p],
                stop_bits,
                flow: [
                    FlowControl::None,
                    FlowControl::Software,
                    FlowControl::Hardware,
                ][f],
            },
        )
    }

    fn arb_change() -> impl Strategy<Value = LineChange> {
        (
            proptest::option::of(1u32..=4_000_000),
            proptest::option::of(5u8..=8),
            proptest::option::of(0usize..3),
            proptest::option::of(1u8..=2),
            proptest::option::of(0usize..3),
        )
            .prop_map(|(baud, data_bits, p, stop_bits, f)| LineChange {
                baud,
                data_bits,
                parity: p.map(|p| [Parity::None, Parity::Odd, Parity::Even][p]),
                stop_bits,
                flow: f.map(|f| {
                    [
                        FlowControl::None,
                        FlowControl::Software,
                        FlowControl::Hardware,
                    ][f]
                }),
            })
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            arb_change().prop_map(Request::Set),
            any::<u32>().prop_map(|millis| Request::Break { millis }),
            (any::<Option<bool>>(), any::<Option<bool>>())
                .prop_map(|(dtr, rts)| Request::Modem { dtr, rts }),
            Just(Request::Get),
        ]
    }

    proptest! {
        #[test]
        fn bodies_round_trip(l in arb_line(), c in arb_change(), r in arb_request(), off in proptest::option::of(0u64..=VARINT_MAX)) {
            round_trip(&DeviceParams { settings: l });
            round_trip(&Control::Follow(c));
            round_trip(&Response { settings: l });
            round_trip(&r);
            round_trip(&OpenParams { resume_from: off, pacing: None, timed: false });
            round_trip(&OpenParams { resume_from: off, pacing: None, timed: true });
            round_trip(&OpenParams { resume_from: off, pacing: Some(Pacing { char_us: (off.unwrap_or(0) % u64::from(MAX_CHAR_DELAY_US + 1)) as u32, line_us: MAX_LINE_DELAY_US }), timed: off.is_some() });
            round_trip(&OpenedParams { offset: off.unwrap_or(0), timed: false });
            round_trip(&OpenedParams { offset: off.unwrap_or(0), timed: true });
        }

        #[test]
        fn corrupted_bodies_never_panic(r in arb_request(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            let b = to_bytes(&r);
            corrupt::<Request>(&b, &flips, cut);
            corrupt::<Control>(&b, &flips, cut);
            corrupt::<LineChange>(&b, &flips, cut);
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        assert_eq!(
            Control::decode_exact(&[C_LINE, 0x02, 9]),
            Err(DecodeError::Invalid {
                field: "data bits",
                value: 9
            })
        );
        assert_eq!(
            Request::decode_exact(&[R_SET, 0x20]),
            Err(DecodeError::Invalid {
                field: "line change",
                value: 0x20
            })
        );
    }

    #[test]
    fn pacing_beyond_its_limits_is_refused_by_name() {
        let mut b = BytesMut::new();
        put_opt_varint(&mut b, None);
        b.put_u8(O_PACING);
        put_varint(&mut b, u64::from(MAX_CHAR_DELAY_US) + 1);
        put_varint(&mut b, 0);
        assert_eq!(
            OpenParams::decode_exact(&b),
            Err(DecodeError::Invalid {
                field: "char delay",
                value: u64::from(MAX_CHAR_DELAY_US) + 1
            })
        );
        let mut b = BytesMut::new();
        put_opt_varint(&mut b, None);
        b.put_u8(O_PACING);
        put_varint(&mut b, 0);
        put_varint(&mut b, u64::from(MAX_LINE_DELAY_US) + 1);
        assert!(matches!(
            OpenParams::decode_exact(&b),
            Err(DecodeError::Invalid {
                field: "line delay",
                ..
            })
        ));
        // An older client's body (resume only) still decodes, without pacing.
        assert_eq!(
            OpenParams::decode_exact(&[0]),
            Ok(OpenParams::default())
        );
    }

    proptest! {
        /// However a timed stream is cut into pieces, the same chunks come out, in order.
        #[test]
        fn timed_frames_survive_any_split(
            chunks in proptest::collection::vec((0u64..1_000_000, proptest::collection::vec(any::<u8>(), 1..300)), 0..20),
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let mut wire = BytesMut::new();
            let mut t = 0;
            let mut want = Vec::new();
            for (dt, data) in &chunks {
                t += dt;
                put_timed(&mut wire, t, data);
                want.push(TimedChunk { time_us: t, data: bytes::Bytes::from(data.clone()) });
            }
            let mut d = TimedDecoder::new();
            let mut got = Vec::new();
            let mut rest: &[u8] = &wire;
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                got.extend(d.feed(&rest[..n]).expect("valid"));
                rest = &rest[n..];
                i += 1;
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn hostile_timed_streams_never_panic_nor_hoard(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            fuzz(&data);
        }
    }

    #[test]
    fn hostile_timed_frames_are_refused_by_name() {
        let frame = |t: u64, len: u64, body: &[u8]| {
            let mut b = BytesMut::new();
            put_varint(&mut b, t);
            put_varint(&mut b, len);
            b.put_slice(body);
            b
        };
        // A chunk longer than allowed is refused from its header, before its bytes arrive.
        let mut d = TimedDecoder::new();
        let big = MAX_TIMED_CHUNK as u64 + 1;
        assert_eq!(d.feed(&frame(5, big, b"")), Err(TimedError::ChunkSize(big)));
        // So is an empty one (a flood of frames carrying nothing).
        assert_eq!(TimedDecoder::new().feed(&frame(5, 0, b"")), Err(TimedError::ChunkSize(0)));
        // Time going back.
        let mut d = TimedDecoder::new();
        let mut b = frame(2_000_000, 2, b"ab");
        b.extend_from_slice(&frame(1_000_000, 1, b"c"));
        let e = d.feed(&b).expect_err("backwards");
        assert_eq!(e, TimedError::Backwards { prev: 2_000_000, now: 1_000_000 });
        assert!(e.to_string().contains("before the previous chunk"), "{e}");
        // The same time twice is fine (two reads within a microsecond).
        let mut d = TimedDecoder::new();
        let mut b = frame(7, 1, b"a");
        b.extend_from_slice(&frame(7, 1, b"b"));
        assert_eq!(d.feed(&b).map(|v| v.len()), Ok(2));
        // An absurd time.
        let e = TimedDecoder::new().feed(&frame(MAX_TIMED_US + 1, 1, b"x")).expect_err("absurd");
        assert_eq!(e, TimedError::Absurd(MAX_TIMED_US + 1));
        // A header of all-ones varints: the length is checked before anything is held.
        let mut d = TimedDecoder::new();
        assert!(d.feed(&[0xff; TIMED_HEADER_MAX + 1]).is_err());
        // A header cut short is held, and no more than a header.
        let mut d = TimedDecoder::new();
        assert_eq!(d.feed(&[0xc0, 0, 0]), Ok(vec![]));
        assert!(d.pending() <= TIMED_HEADER_MAX);
        // A frame's bytes trickling in are held, no more than announced.
        let mut d = TimedDecoder::new();
        let f = frame(1, 3, b"xyz");
        assert_eq!(d.feed(&f[..3]), Ok(vec![]));
        assert_eq!(d.pending(), 3);
        assert_eq!(d.feed(&f[3..]).expect("whole")[0].data.as_ref(), b"xyz");
    }

    #[test]
    fn open_options_are_each_given_once_in_order() {
        let timed = to_bytes(&OpenParams { resume_from: None, pacing: None, timed: true });
        assert_eq!(
            OpenParams::decode_exact(&timed),
            Ok(OpenParams { resume_from: None, pacing: None, timed: true })
        );
        let mut twice = timed.to_vec();
        twice.push(O_TIMED);
        assert!(OpenParams::decode_exact(&twice).is_err());
        // An older exporter refuses the option by name; the client then opens plainly.
        assert_eq!(
            OpenedParams::decode_exact(&[0x05]),
            Ok(OpenedParams { offset: 5, timed: false })
        );
        assert!(OpenedParams::decode_exact(&[0x05, 0x02]).is_err());
    }

    #[test]
    fn a_change_keeps_what_it_does_not_name() {
        let c = LineChange {
            parity: Some(Parity::Even),
            data_bits: Some(7),
            ..LineChange::default()
        };
        let s = c.apply(LineSettings::default());
        assert_eq!(
            (s.baud, s.data_bits, s.parity, s.stop_bits),
            (115_200, 7, Parity::Even, 1)
        );
    }
}
