//! CAN buses on the wire.
//!
//! - `DeviceInfo.params`, `Status.params`: [`DeviceParams`]: the bus as the exporter runs it
//!   (bit rates set by the exporter's config, bus state, error counters) and its frame counters.
//! - `Open.params`: [`OpenParams`] (receive filters the exporter applies); `Opened.params`:
//!   [`OpenedParams`] (frames the bus carried while no channel of this device was open).
//! - Channel payload, both ways: [`Record`]s, each a frame with its sequence number and the
//!   exporter's receive time. On a stream channel records follow each other with no other
//!   framing ([`RecordReader`] reassembles them from chunks split anywhere); on a datagram
//!   channel a datagram holds one or more whole records.
//! - No `Control` bodies and no requests: what the exporter has to say about a channel (a frame
//!   not sent because the adapter is gone) travels as a `Notice`.
//!
//! Sequence numbers count every record a sender meant to send on a channel, from 0. A receiver
//! that sees a number jump knows exactly how many were lost (a full queue on the exporter, a
//! datagram the network dropped) and reports them; one that sees a number go back (a datagram
//! overtaken) drops it, so frames are never delivered out of order.

use crate::codec::*;
use bytes::{Buf, BufMut, BytesMut};

/// Most data bytes of a frame (CAN FD).
pub const MAX_DATA: usize = 64;
/// Largest id of a standard (11-bit) frame.
pub const MAX_STANDARD_ID: u32 = 0x7ff;
/// Largest id of an extended (29-bit) frame.
pub const MAX_EXTENDED_ID: u32 = 0x1fff_ffff;
/// Largest encoded record: tag, 8-byte seq, time, id, flags, len, 64 data bytes.
pub const MAX_RECORD: usize = 1 + 8 + 8 + 4 + 1 + 1 + MAX_DATA;

/// The data lengths a CAN FD frame may have, indexed by its DLC (0..=15).
pub const FD_LENGTHS: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64];

/// Frame flags (the `flags` byte on the wire).
pub const EXTENDED: u8 = 0x01;
pub const RTR: u8 = 0x02;
/// An error frame: `id` holds the error class bits and `data` the details, as SocketCAN's
/// `linux/can/error.h` lays them out (the fronts pass them on in that form).
pub const ERROR: u8 = 0x04;
pub const FD: u8 = 0x08;
/// CAN FD bit rate switch.
pub const BRS: u8 = 0x10;
/// CAN FD error state indicator.
pub const ESI: u8 = 0x20;
const ALL_FLAGS: u8 = EXTENDED | RTR | ERROR | FD | BRS | ESI;

/// Error classes and details of `linux/can/error.h` that jmp itself produces.
pub mod error {
    /// Controller problems: `data[1]` says which.
    pub const CRTL: u32 = 0x0004;
    /// Bus off.
    pub const BUSOFF: u32 = 0x0040;
    /// The controller restarted (back to error-active after bus-off).
    pub const RESTARTED: u32 = 0x0100;
    /// `data[6]`/`data[7]` hold the TX/RX error counters.
    pub const CNT: u32 = 0x0200;
    /// `data[1]`: a receive buffer overflowed (jmp: frames were lost on the way).
    pub const CRTL_RX_OVERFLOW: u8 = 0x01;
    /// `data[1]`: a transmit buffer overflowed (jmp: frames were refused, the link was down).
    pub const CRTL_TX_OVERFLOW: u8 = 0x02;
    pub const CRTL_RX_WARNING: u8 = 0x04;
    pub const CRTL_TX_WARNING: u8 = 0x08;
    pub const CRTL_RX_PASSIVE: u8 = 0x10;
    pub const CRTL_TX_PASSIVE: u8 = 0x20;
    pub const CRTL_ACTIVE: u8 = 0x40;
}

/// Why a frame is not a valid CAN frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("id 0x{0:x} does not fit 11 bits (a standard frame's id is at most 0x7ff)")]
    StandardId(u32),
    #[error("id 0x{0:x} does not fit 29 bits (an extended frame's id is at most 0x1fffffff)")]
    ExtendedId(u32),
    #[error("a classic CAN frame carries at most 8 data bytes, not {0}")]
    ClassicLength(usize),
    #[error("a CAN FD frame cannot carry {0} bytes (valid: 0-8, 12, 16, 20, 24, 32, 48, 64)")]
    FdLength(usize),
    #[error("CAN FD has no remote frames")]
    FdRemote,
    #[error("bit rate switch and error state indicator exist only in CAN FD frames")]
    FdOnlyFlag,
    #[error("an error frame is a classic frame with no other flags")]
    ErrorFlags,
    #[error("unknown frame flags 0x{0:02x}")]
    UnknownFlags(u8),
}

/// One CAN frame: classic, remote, CAN FD or error. `len` is the data length; for a remote
/// frame (which carries no data) it is the length requested.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub id: u32,
    pub flags: u8,
    pub len: u8,
    pub data: [u8; MAX_DATA],
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Frame {
    /// candump's notation: `123#DEADBEEF`, `12345678#R2`, `123##1AABB` (FD, flags nibble).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_extended() || self.is_error() {
            write!(f, "{:08X}", self.id)?;
        } else {
            write!(f, "{:03X}", self.id)?;
        }
        if self.is_rtr() {
            return write!(f, "#R{}", self.len);
        }
        if self.is_fd() {
            write!(f, "##{:X}", (self.flags & (BRS | ESI)) >> 4)?;
        } else {
            f.write_str("#")?;
        }
        for b in self.data() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl Frame {
    /// A data frame (classic, or FD with `FD` in `flags`), checked.
    pub fn new(id: u32, flags: u8, data: &[u8]) -> Result<Frame, FrameError> {
        let mut f = Frame {
            id,
            flags,
            len: 0,
            data: [0; MAX_DATA],
        };
        if data.len() > MAX_DATA {
            return Err(if flags & FD != 0 {
                FrameError::FdLength(data.len())
            } else {
                FrameError::ClassicLength(data.len())
            });
        }
        f.len = data.len() as u8;
        if flags & RTR == 0 {
            f.data[..data.len()].copy_from_slice(data);
        }
        f.check()?;
        Ok(f)
    }

    /// A remote frame asking for `len` bytes.
    pub fn remote(id: u32, extended: bool, len: u8) -> Result<Frame, FrameError> {
        let f = Frame {
            id,
            flags: RTR | if extended { EXTENDED } else { 0 },
            len,
            data: [0; MAX_DATA],
        };
        f.check()?;
        Ok(f)
    }

    /// An error frame with `class` bits and the 8 detail bytes.
    pub fn error(class: u32, details: [u8; 8]) -> Frame {
        let mut data = [0; MAX_DATA];
        data[..8].copy_from_slice(&details);
        Frame {
            id: class & MAX_EXTENDED_ID,
            flags: ERROR,
            len: 8,
            data,
        }
    }

    /// Checks the frame's fields against each other (what a decoder must refuse).
    pub fn check(&self) -> Result<(), FrameError> {
        let len = usize::from(self.len);
        if self.flags & !ALL_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(self.flags));
        }
        if self.is_error() {
            if self.flags != ERROR || len != 8 || self.id > MAX_EXTENDED_ID {
                return Err(FrameError::ErrorFlags);
            }
            return Ok(());
        }
        if self.is_extended() {
            if self.id > MAX_EXTENDED_ID {
                return Err(FrameError::ExtendedId(self.id));
            }
        } else if self.id > MAX_STANDARD_ID {
            return Err(FrameError::StandardId(self.id));
        }
        if self.is_fd() {
            if self.is_rtr() {
                return Err(FrameError::FdRemote);
            }
            if !FD_LENGTHS.contains(&self.len) {
                return Err(FrameError::FdLength(len));
            }
        } else {
            if self.flags & (BRS | ESI) != 0 {
                return Err(FrameError::FdOnlyFlag);
            }
            if len > 8 {
                return Err(FrameError::ClassicLength(len));
            }
        }
        Ok(())
    }

    pub fn is_extended(&self) -> bool {
        self.flags & EXTENDED != 0
    }
    pub fn is_rtr(&self) -> bool {
        self.flags & RTR != 0
    }
    pub fn is_error(&self) -> bool {
        self.flags & ERROR != 0
    }
    pub fn is_fd(&self) -> bool {
        self.flags & FD != 0
    }

    /// The data bytes (none for a remote frame).
    pub fn data(&self) -> &[u8] {
        if self.is_rtr() {
            &[]
        } else {
            &self.data[..usize::from(self.len)]
        }
    }

    /// The frame's DLC: its length, or for CAN FD the code of its length.
    pub fn dlc(&self) -> u8 {
        if self.is_fd() {
            fd_dlc(self.len).unwrap_or(15)
        } else {
            self.len
        }
    }

    fn wire_len(&self) -> usize {
        self.data().len()
    }
}

/// The DLC of a CAN FD data length (`None` for a length FD cannot carry).
pub fn fd_dlc(len: u8) -> Option<u8> {
    FD_LENGTHS.iter().position(|l| *l == len).map(|i| i as u8)
}

/// A receive filter, as SocketCAN's: a frame passes when its id masked equals `id` masked.
/// A filter matches standard or extended frames only, never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub id: u32,
    pub mask: u32,
    pub extended: bool,
}

impl Filter {
    /// Whether `f` passes. Error frames always do: they are the bus's state, not traffic.
    pub fn matches(&self, f: &Frame) -> bool {
        f.is_error()
            || (f.is_extended() == self.extended && (f.id & self.mask) == (self.id & self.mask))
    }
}

/// Whether `f` passes a list of filters (an empty list lets everything pass).
pub fn passes(filters: &[Filter], f: &Frame) -> bool {
    filters.is_empty() || filters.iter().any(|x| x.matches(f))
}

/// A bus's state as its controller reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BusState {
    ErrorActive,
    ErrorWarning,
    ErrorPassive,
    BusOff,
    /// The controller is not running (adapter closed, interface down, board unpowered).
    Stopped,
    /// The backend cannot tell (a virtual bus, an adapter that does not report it).
    Unknown,
}

impl BusState {
    fn wire(self) -> u8 {
        match self {
            BusState::ErrorActive => 0,
            BusState::ErrorWarning => 1,
            BusState::ErrorPassive => 2,
            BusState::BusOff => 3,
            BusState::Stopped => 4,
            BusState::Unknown => 5,
        }
    }

    fn from_wire(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => BusState::ErrorActive,
            1 => BusState::ErrorWarning,
            2 => BusState::ErrorPassive,
            3 => BusState::BusOff,
            4 => BusState::Stopped,
            5 => BusState::Unknown,
            v => {
                return Err(DecodeError::Invalid {
                    field: "bus state",
                    value: v.into(),
                })
            }
        })
    }
}

impl std::fmt::Display for BusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BusState::ErrorActive => "error-active",
            BusState::ErrorWarning => "error-warning",
            BusState::ErrorPassive => "error-passive",
            BusState::BusOff => "bus-off",
            BusState::Stopped => "stopped",
            BusState::Unknown => "state unknown",
        })
    }
}

/// The bus as the exporter runs it, with its counters since the exporter started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceParams {
    /// Nominal bit rate in bit/s, set by the exporter's config (0: a virtual bus has none).
    pub bitrate: u32,
    /// CAN FD data-phase bit rate (0: the bus carries no CAN FD).
    pub data_bitrate: u32,
    /// Whether the bus carries CAN FD frames.
    pub fd: bool,
    pub state: BusState,
    pub tx_errors: u32,
    pub rx_errors: u32,
    /// Frames received from the bus.
    pub rx_frames: u64,
    /// Frames sent to the bus.
    pub tx_frames: u64,
    /// Frames from the bus the exporter could not hand to a client in time (its queue was full).
    pub dropped: u64,
    /// Frames from clients that were not sent (the adapter was gone, the bus refused them).
    pub refused: u64,
}

impl DeviceParams {
    /// A bus with these rates and no traffic yet.
    pub fn new(bitrate: u32, data_bitrate: u32, fd: bool, state: BusState) -> Self {
        DeviceParams {
            bitrate,
            data_bitrate,
            fd,
            state,
            tx_errors: 0,
            rx_errors: 0,
            rx_frames: 0,
            tx_frames: 0,
            dropped: 0,
            refused: 0,
        }
    }
}

impl std::fmt::Display for DeviceParams {
    /// `500 kbit/s, FD 2 Mbit/s, error-active, TEC 0 REC 0, rx 10 tx 3`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn rate(b: u32) -> String {
            if b >= 1_000_000 && b.is_multiple_of(1_000_000) {
                format!("{} Mbit/s", b / 1_000_000)
            } else if b >= 1000 && b.is_multiple_of(1000) {
                format!("{} kbit/s", b / 1000)
            } else {
                format!("{b} bit/s")
            }
        }
        if self.bitrate == 0 {
            f.write_str("virtual bus")?;
        } else {
            f.write_str(&rate(self.bitrate))?;
        }
        if self.fd {
            if self.data_bitrate == 0 {
                f.write_str(", FD")?;
            } else {
                write!(f, ", FD {}", rate(self.data_bitrate))?;
            }
        }
        write!(f, ", {}", self.state)?;
        if self.tx_errors != 0 || self.rx_errors != 0 {
            write!(f, ", TEC {} REC {}", self.tx_errors, self.rx_errors)?;
        }
        write!(f, ", rx {} tx {}", self.rx_frames, self.tx_frames)?;
        if self.dropped != 0 {
            write!(f, ", {} not delivered", self.dropped)?;
        }
        if self.refused != 0 {
            write!(f, ", {} not sent", self.refused)?;
        }
        Ok(())
    }
}

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.bitrate.into());
        put_varint(buf, self.data_bitrate.into());
        buf.put_u8(u8::from(self.fd));
        buf.put_u8(self.state.wire());
        put_varint(buf, self.tx_errors.into());
        put_varint(buf, self.rx_errors.into());
        put_varint(buf, self.rx_frames);
        put_varint(buf, self.tx_frames);
        put_varint(buf, self.dropped);
        put_varint(buf, self.refused);
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let bitrate = get_u32_varint(buf, "bitrate")?;
        let data_bitrate = get_u32_varint(buf, "data bitrate")?;
        let fd = match get_u8(buf, "fd")? {
            0 => false,
            1 => true,
            v => {
                return Err(DecodeError::Invalid {
                    field: "fd",
                    value: v.into(),
                })
            }
        };
        Ok(DeviceParams {
            bitrate,
            data_bitrate,
            fd,
            state: BusState::from_wire(get_u8(buf, "bus state")?)?,
            tx_errors: get_u32_varint(buf, "tx errors")?,
            rx_errors: get_u32_varint(buf, "rx errors")?,
            rx_frames: get_varint(buf, "rx frames")?,
            tx_frames: get_varint(buf, "tx frames")?,
            dropped: get_varint(buf, "dropped frames")?,
            refused: get_varint(buf, "refused frames")?,
        })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.bitrate.into())
            + varint_len(self.data_bitrate.into())
            + 2
            + varint_len(self.tx_errors.into())
            + varint_len(self.rx_errors.into())
            + varint_len(self.rx_frames)
            + varint_len(self.tx_frames)
            + varint_len(self.dropped)
            + varint_len(self.refused)
    }
}

/// Most filters one open may carry (SocketCAN allows more, but a client needing this many
/// wants the whole bus).
pub const MAX_FILTERS: usize = 64;

/// What the client asks for when it opens a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenParams {
    /// Receive filters applied on the exporter (empty: every frame).
    pub filters: Vec<Filter>,
}

const FILTER_EXTENDED: u32 = 0x8000_0000;

impl Codec for OpenParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.filters.len() as u64);
        for f in &self.filters {
            buf.put_u32(f.id | if f.extended { FILTER_EXTENDED } else { 0 });
            buf.put_u32(f.mask);
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let n = get_varint(buf, "filter count")?;
        if n > MAX_FILTERS as u64 {
            return Err(DecodeError::Invalid {
                field: "filter count",
                value: n,
            });
        }
        let mut filters = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if buf.len() < 8 {
                return Err(DecodeError::Truncated("filter"));
            }
            let id = buf.get_u32();
            let mask = buf.get_u32();
            let extended = id & FILTER_EXTENDED != 0;
            let id = id & !FILTER_EXTENDED;
            let max = if extended {
                MAX_EXTENDED_ID
            } else {
                MAX_STANDARD_ID
            };
            if id > max || id & 0x6000_0000 != 0 {
                return Err(DecodeError::Invalid {
                    field: "filter id",
                    value: id.into(),
                });
            }
            filters.push(Filter { id, mask, extended });
        }
        Ok(OpenParams { filters })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.filters.len() as u64) + 8 * self.filters.len()
    }
}

/// The exporter's answer to an open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenedParams {
    /// Frames the bus carried while no channel of this device was open (since the last one
    /// closed, or since the exporter started): what a client reconnecting after an outage
    /// missed.
    pub missed: u64,
}

impl Codec for OpenedParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.missed)
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(OpenedParams {
            missed: get_varint(buf, "missed frames")?,
        })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.missed)
    }
}

const REC_FRAME: u8 = 0x01;

/// One frame on a channel: `seq` numbers it on this channel and direction, `time_us` is when
/// the exporter received it from the bus (microseconds since the Unix epoch; 0 from a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_us: u64,
    pub frame: Frame,
}

impl Codec for Record {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(REC_FRAME);
        put_varint(buf, self.seq);
        buf.put_u64(self.time_us);
        buf.put_u32(self.frame.id);
        buf.put_u8(self.frame.flags);
        buf.put_u8(self.frame.len);
        buf.put_slice(self.frame.data());
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "can record")? {
            REC_FRAME => {}
            t => {
                return Err(DecodeError::Invalid {
                    field: "can record",
                    value: t.into(),
                })
            }
        }
        let seq = get_varint(buf, "sequence number")?;
        let time_us = get_u64(buf, "receive time")?;
        if buf.len() < 6 {
            return Err(DecodeError::Truncated("can frame"));
        }
        let id = buf.get_u32();
        let flags = buf.get_u8();
        let len = buf.get_u8();
        let mut frame = Frame {
            id,
            flags,
            len,
            data: [0; MAX_DATA],
        };
        // Checked before the data is read, so a bad length never reads past the frame.
        frame.check().map_err(|e| DecodeError::Invalid {
            field: match e {
                FrameError::StandardId(_) | FrameError::ExtendedId(_) => "can id",
                FrameError::ClassicLength(_) | FrameError::FdLength(_) => "can data length",
                _ => "can frame flags",
            },
            value: match e {
                FrameError::StandardId(v) | FrameError::ExtendedId(v) => v.into(),
                FrameError::ClassicLength(n) | FrameError::FdLength(n) => n as u64,
                _ => flags.into(),
            },
        })?;
        let n = frame.wire_len();
        if buf.len() < n {
            return Err(DecodeError::Truncated("can data"));
        }
        frame.data[..n].copy_from_slice(&buf[..n]);
        buf.advance(n);
        Ok(Record {
            seq,
            time_us,
            frame,
        })
    }
    fn encoded_len(&self) -> usize {
        1 + varint_len(self.seq) + 8 + 4 + 1 + 1 + self.frame.wire_len()
    }
}

/// Reassembles records from a stream channel's chunks, which may split a record anywhere.
#[derive(Debug, Default)]
pub struct RecordReader {
    buf: BytesMut,
}

impl RecordReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete record, `None` until more bytes arrive, or the error that makes the
    /// rest of the stream meaningless.
    pub fn next_record(&mut self) -> Result<Option<Record>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut s: &[u8] = &self.buf;
        match Record::decode(&mut s) {
            Ok(r) => {
                let used = self.buf.len() - s.len();
                self.buf.advance(used);
                Ok(Some(r))
            }
            // Short only because the rest has not arrived: a whole record is never longer
            // than MAX_RECORD, so a longer buffer that is still "short" is corrupt.
            Err(DecodeError::Truncated(_)) if self.buf.len() < MAX_RECORD => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes held that are not yet a whole record.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Decodes every record of one datagram.
pub fn decode_datagram(mut d: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let mut out = Vec::new();
    while !d.is_empty() {
        out.push(Record::decode(&mut d)?);
    }
    Ok(out)
}

/// Tracks one direction's sequence numbers: how many records were lost and which to drop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    next: u64,
    /// Records that never arrived (gaps).
    pub lost: u64,
    /// Records that arrived after a later one and were dropped to keep the order.
    pub late: u64,
}

impl SeqTracker {
    /// Accounts for `seq`; returns how many records were skipped just before it (0 in the
    /// normal case), or `None` when it is late and must be dropped.
    pub fn accept(&mut self, seq: u64) -> Option<u64> {
        if seq < self.next {
            self.late += 1;
            // It was counted lost when the gap opened; it still is (it is not delivered).
            return None;
        }
        let gap = seq - self.next;
        self.lost += gap;
        self.next = seq + 1;
        Some(gap)
    }
}

fn example_record() -> Record {
    Record {
        seq: 300,
        time_us: 1_700_000_000_000_000,
        frame: Frame::new(0x123, 0, &[0xde, 0xad, 0xbe, 0xef]).expect("valid"),
    }
}

/// Decodes `data` as every body of this kind (the fuzz target `kind_bodies` runs it for every
/// kind): whatever the bytes, nothing panics and nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = DeviceParams::decode_exact(data);
    let _ = OpenParams::decode_exact(data);
    let _ = OpenedParams::decode_exact(data);
    let _ = Record::decode_exact(data);
    let _ = decode_datagram(data);
    let mut r = RecordReader::new();
    r.push(data);
    while let Ok(Some(_)) = r.next_record() {}
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let mut p = DeviceParams::new(500_000, 2_000_000, true, BusState::ErrorPassive);
    p.tx_errors = 128;
    p.rx_frames = 1000;
    p.tx_frames = 10;
    vec![
        ("can-params", to_bytes(&p).to_vec()),
        (
            "can-open",
            to_bytes(&OpenParams {
                filters: vec![
                    Filter {
                        id: 0x7e8,
                        mask: 0x7ff,
                        extended: false,
                    },
                    Filter {
                        id: 0x18da_f100,
                        mask: 0x1fff_ff00,
                        extended: true,
                    },
                ],
            })
            .to_vec(),
        ),
        (
            "can-opened",
            to_bytes(&OpenedParams { missed: 42 }).to_vec(),
        ),
        ("can-record", to_bytes(&example_record()).to_vec()),
        (
            "can-record-fd",
            to_bytes(&Record {
                seq: 1,
                time_us: 0,
                frame: Frame::new(0x18da_f110, EXTENDED | FD | BRS, &[0x11; 12]).expect("valid"),
            })
            .to_vec(),
        ),
        (
            "can-record-rtr",
            to_bytes(&Record {
                seq: 2,
                time_us: 0,
                frame: Frame::remote(0x7df, false, 8).expect("valid"),
            })
            .to_vec(),
        ),
    ]
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    match name {
        "can-params" => DeviceParams::decode_exact(bytes).is_ok(),
        "can-open" => OpenParams::decode_exact(bytes).is_ok(),
        "can-opened" => OpenedParams::decode_exact(bytes).is_ok(),
        n if n.starts_with("can-record") => Record::decode_exact(bytes).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        let classic = (
            any::<bool>(),
            0u32..=MAX_EXTENDED_ID,
            proptest::collection::vec(any::<u8>(), 0..=8),
        )
            .prop_map(|(ext, id, data)| {
                let id = if ext { id } else { id & MAX_STANDARD_ID };
                Frame::new(id, if ext { EXTENDED } else { 0 }, &data).expect("valid classic")
            });
        let remote = (any::<bool>(), 0u32..=MAX_EXTENDED_ID, 0u8..=8).prop_map(|(ext, id, len)| {
            let id = if ext { id } else { id & MAX_STANDARD_ID };
            Frame::remote(id, ext, len).expect("valid remote")
        });
        let fd = (
            any::<bool>(),
            0u32..=MAX_EXTENDED_ID,
            0usize..16,
            any::<bool>(),
            any::<bool>(),
            any::<u8>(),
        )
            .prop_map(|(ext, id, dlc, brs, esi, fill)| {
                let id = if ext { id } else { id & MAX_STANDARD_ID };
                let flags = FD
                    | if ext { EXTENDED } else { 0 }
                    | if brs { BRS } else { 0 }
                    | if esi { ESI } else { 0 };
                let data: Vec<u8> = (0..FD_LENGTHS[dlc]).map(|i| i.wrapping_mul(fill)).collect();
                Frame::new(id, flags, &data).expect("valid fd")
            });
        let err = (0u32..=MAX_EXTENDED_ID, any::<[u8; 8]>()).prop_map(|(c, d)| Frame::error(c, d));
        prop_oneof![classic, remote, fd, err]
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (0u64..=VARINT_MAX, any::<u64>(), arb_frame()).prop_map(|(seq, time_us, frame)| Record {
            seq,
            time_us,
            frame,
        })
    }

    fn arb_params() -> impl Strategy<Value = DeviceParams> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            0u8..6,
            any::<(u32, u32)>(),
            (
                0u64..=VARINT_MAX,
                0u64..=VARINT_MAX,
                0u64..=VARINT_MAX,
                0u64..=VARINT_MAX,
            ),
        )
            .prop_map(|(b, d, fd, st, (te, re), (rx, tx, dr, rf))| DeviceParams {
                bitrate: b,
                data_bitrate: d,
                fd,
                state: BusState::from_wire(st).expect("valid state"),
                tx_errors: te,
                rx_errors: re,
                rx_frames: rx,
                tx_frames: tx,
                dropped: dr,
                refused: rf,
            })
    }

    fn arb_open() -> impl Strategy<Value = OpenParams> {
        proptest::collection::vec(
            (any::<bool>(), 0u32..=MAX_EXTENDED_ID, any::<u32>()),
            0..MAX_FILTERS,
        )
        .prop_map(|v| OpenParams {
            filters: v
                .into_iter()
                .map(|(extended, id, mask)| Filter {
                    id: if extended { id } else { id & MAX_STANDARD_ID },
                    mask,
                    extended,
                })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn bodies_round_trip(p in arb_params(), o in arb_open(), r in arb_record(), missed in 0u64..=VARINT_MAX) {
            round_trip(&p);
            round_trip(&o);
            round_trip(&r);
            round_trip(&OpenedParams { missed });
        }

        #[test]
        fn records_survive_any_split(rs in proptest::collection::vec(arb_record(), 1..20), cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
            let mut all = BytesMut::new();
            for r in &rs {
                r.encode(&mut all);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (all.len() + 1)).collect();
            cuts.push(all.len());
            cuts.sort_unstable();
            let mut reader = RecordReader::new();
            let mut got = Vec::new();
            let mut from = 0;
            for c in cuts {
                reader.push(&all[from..c]);
                from = c;
                while let Some(r) = reader.next_record().expect("valid stream") {
                    got.push(r);
                }
            }
            prop_assert_eq!(reader.pending(), 0);
            prop_assert_eq!(&got, &rs);
            prop_assert_eq!(decode_datagram(&all).expect("valid datagram"), rs);
        }

        #[test]
        fn corrupted_bodies_never_panic(r in arb_record(), p in arb_params(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            let b = to_bytes(&r);
            corrupt::<Record>(&b, &flips, cut);
            corrupt::<OpenParams>(&b, &flips, cut);
            corrupt::<DeviceParams>(&to_bytes(&p), &flips, cut);
            let mut reader = RecordReader::new();
            let mut bad = b.to_vec();
            for &(i, x) in &flips {
                let i = i % bad.len();
                bad[i] ^= x;
            }
            reader.push(&bad);
            reader.push(&bad);
            while let Ok(Some(_)) = reader.next_record() {}
            let _ = decode_datagram(&bad);
        }
    }

    #[test]
    fn invalid_frames_are_refused_naming_the_field() {
        assert_eq!(
            Frame::new(0x800, 0, &[]),
            Err(FrameError::StandardId(0x800))
        );
        assert_eq!(
            Frame::new(0x1, 0, &[0; 9]),
            Err(FrameError::ClassicLength(9))
        );
        assert_eq!(Frame::new(0x1, FD, &[0; 9]), Err(FrameError::FdLength(9)));
        assert_eq!(Frame::new(0x1, BRS, &[]), Err(FrameError::FdOnlyFlag));
        assert_eq!(
            Frame::remote(0x1, false, 9),
            Err(FrameError::ClassicLength(9))
        );
        // A record claiming 9 bytes in a classic frame: refused before the data is read.
        let mut b = to_bytes(&example_record()).to_vec();
        let len_at = b.len() - 4 - 1;
        b[len_at] = 9;
        assert_eq!(
            Record::decode_exact(&b),
            Err(DecodeError::Invalid {
                field: "can data length",
                value: 9
            })
        );
        let mut r = RecordReader::new();
        r.push(&b);
        assert!(r.next_record().is_err(), "a stream with a bad record fails");
    }

    #[test]
    fn sequence_gaps_are_counted_and_late_records_dropped() {
        let mut t = SeqTracker::default();
        assert_eq!(t.accept(0), Some(0));
        assert_eq!(t.accept(1), Some(0));
        assert_eq!(t.accept(5), Some(3));
        assert_eq!(t.accept(3), None, "overtaken: dropped to keep the order");
        assert_eq!(t.accept(6), Some(0));
        assert_eq!((t.lost, t.late), (3, 1));
    }

    #[test]
    fn filters_match_like_socketcan() {
        let f = Filter {
            id: 0x7e8,
            mask: 0x7f8,
            extended: false,
        };
        let std = |id| Frame::new(id, 0, &[]).expect("valid");
        assert!(f.matches(&std(0x7e8)) && f.matches(&std(0x7ef)));
        assert!(!f.matches(&std(0x7e0)));
        assert!(!f.matches(&Frame::new(0x7e8, EXTENDED, &[]).expect("valid")));
        assert!(f.matches(&Frame::error(error::BUSOFF, [0; 8])));
        assert!(passes(&[], &std(0x1)));
    }

    #[test]
    fn display_is_candump_notation() {
        assert_eq!(example_record().frame.to_string(), "123#DEADBEEF");
        assert_eq!(
            Frame::remote(0x1234_5678 & MAX_EXTENDED_ID, true, 2)
                .expect("valid")
                .to_string(),
            "12345678#R2"
        );
        assert_eq!(
            Frame::new(0x123, FD | BRS, &[0xaa, 0xbb])
                .expect("valid")
                .to_string(),
            "123##1AABB"
        );
        let p = DeviceParams::new(500_000, 2_000_000, true, BusState::ErrorActive);
        assert_eq!(
            p.to_string(),
            "500 kbit/s, FD 2 Mbit/s, error-active, rx 0 tx 0"
        );
    }
}
