//! Storage (an SD card, an eMMC, a disk image) on the wire.
//!
//! - `DeviceInfo.params`, `Status.params` and `Opened.params`: [`DeviceParams`] (size, block
//!   size, what the exporter allows, and a generation that changes whenever the board may have
//!   written the medium behind the client's back).
//! - `Open.params`: empty. One stream channel carries many requests at once.
//! - Stream payload, client → exporter: [`Request`] frames, each `varint(len) || body`, a
//!   write's data following its frame raw; exporter → client: [`Response`] frames, a read's
//!   data following raw. Responses come in the order requests *finish*, matched by id, so a
//!   slow request never holds up the others; id 0 carries unsolicited [`Response::Changed`].
//! - `Request.body` (device requests, no channel): [`DeviceRequest`]; `Done.body`:
//!   [`DeviceResponse`].
//!
//! [`FrameReader`] reassembles frames and their raw payloads from chunks as they arrive,
//! handing payloads out as the received `Bytes` themselves (no copy).

use crate::codec::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Largest read or write one request may carry: large enough for FUSE's 1 MiB requests and a
/// flasher's batches, small enough that one request cannot monopolise the link for long.
pub const MAX_IO: u64 = 8 << 20;

/// Largest frame header (an error's message is the longest).
pub const MAX_HEADER: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceParams {
    /// Bytes.
    pub size: u64,
    /// The medium's logical block size (512 for most cards, 4096 for image files).
    pub block_size: u32,
    /// The exporter was told it may write (`writable: true`) and the medium is not read-only.
    pub writable: bool,
    /// Discard (TRIM, hole punching) is available.
    pub discard: bool,
    /// The medium is shared with the board (an SD-mux): writes are refused while the board's
    /// power is on.
    pub shared: bool,
    /// The board's power is on now (only meaningful when `shared`).
    pub board_on: bool,
    /// Changes whenever the board may have written the medium (its power went on): a client
    /// caching the medium's contents drops its cache when this changes.
    pub generation: u64,
}

impl DeviceParams {
    /// Writes are accepted now.
    pub fn accepts_writes(&self) -> bool {
        self.writable && !(self.shared && self.board_on)
    }
}

const P_WRITABLE: u8 = 0x01;
const P_DISCARD: u8 = 0x02;
const P_SHARED: u8 = 0x04;
const P_BOARD_ON: u8 = 0x08;

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.size);
        put_varint(buf, self.block_size.into());
        let mut f = 0;
        for (on, bit) in [
            (self.writable, P_WRITABLE),
            (self.discard, P_DISCARD),
            (self.shared, P_SHARED),
            (self.board_on, P_BOARD_ON),
        ] {
            if on {
                f |= bit;
            }
        }
        buf.put_u8(f);
        put_varint(buf, self.generation);
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let size = get_varint(buf, "storage size")?;
        let block_size = get_u32_varint(buf, "block size")?;
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(DecodeError::Invalid {
                field: "block size",
                value: block_size.into(),
            });
        }
        let f = get_u8(buf, "storage flags")?;
        if f & !(P_WRITABLE | P_DISCARD | P_SHARED | P_BOARD_ON) != 0 {
            return Err(DecodeError::Invalid {
                field: "storage flags",
                value: f.into(),
            });
        }
        Ok(DeviceParams {
            size,
            block_size,
            writable: f & P_WRITABLE != 0,
            discard: f & P_DISCARD != 0,
            shared: f & P_SHARED != 0,
            board_on: f & P_BOARD_ON != 0,
            generation: get_varint(buf, "generation")?,
        })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.size) + varint_len(self.block_size.into()) + 1 + varint_len(self.generation)
    }
}

/// What a request asks, without its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `len` bytes at `offset`. `compress`: the exporter may answer with zstd-compressed data
    /// when that is smaller (for a dump over a slow link).
    Read {
        offset: u64,
        len: u64,
        compress: bool,
    },
    /// `len` raw bytes follow the frame.
    Write { offset: u64, len: u64 },
    /// A zstd frame of `clen` bytes follows, `len` bytes once decompressed.
    WriteZstd { offset: u64, len: u64, clen: u64 },
    /// Makes the range read back as zeros (hole punching, `BLKZEROOUT`).
    Zero { offset: u64, len: u64 },
    /// The range's contents are no longer needed (TRIM); they may read back as anything.
    Discard { offset: u64, len: u64 },
    /// Everything acknowledged so far reaches the medium (`fsync`).
    Flush,
    /// SHA-256 of the range as the medium holds it (read past any cache on the exporter).
    Hash { offset: u64, len: u64 },
}

/// One request frame of a storage channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client, unique among its unanswered requests; never 0.
    pub id: u64,
    pub op: Op,
}

const OP_READ: u8 = 0x01;
const OP_WRITE: u8 = 0x02;
const OP_WRITE_ZSTD: u8 = 0x03;
const OP_ZERO: u8 = 0x04;
const OP_DISCARD: u8 = 0x05;
const OP_FLUSH: u8 = 0x06;
const OP_HASH: u8 = 0x07;

/// A length that must be positive and at most [`MAX_IO`].
fn get_io_len(buf: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    let v = get_varint(buf, what)?;
    if v == 0 || v > MAX_IO {
        return Err(DecodeError::Invalid {
            field: what,
            value: v,
        });
    }
    Ok(v)
}

/// A range length: positive, otherwise unbounded (zeroing or hashing a whole card is one
/// request).
fn get_range_len(buf: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    let v = get_varint(buf, what)?;
    if v == 0 {
        return Err(DecodeError::Invalid {
            field: what,
            value: 0,
        });
    }
    Ok(v)
}

fn get_id(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    get_varint(buf, "request id")
}

impl Codec for Request {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.id);
        match self.op {
            Op::Read {
                offset,
                len,
                compress,
            } => {
                buf.put_u8(OP_READ);
                put_varint(buf, offset);
                put_varint(buf, len);
                buf.put_u8(compress.into());
            }
            Op::Write { offset, len } => {
                buf.put_u8(OP_WRITE);
                put_varint(buf, offset);
                put_varint(buf, len);
            }
            Op::WriteZstd { offset, len, clen } => {
                buf.put_u8(OP_WRITE_ZSTD);
                put_varint(buf, offset);
                put_varint(buf, len);
                put_varint(buf, clen);
            }
            Op::Zero { offset, len } | Op::Discard { offset, len } | Op::Hash { offset, len } => {
                buf.put_u8(match self.op {
                    Op::Zero { .. } => OP_ZERO,
                    Op::Discard { .. } => OP_DISCARD,
                    _ => OP_HASH,
                });
                put_varint(buf, offset);
                put_varint(buf, len);
            }
            Op::Flush => buf.put_u8(OP_FLUSH),
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let id = get_id(buf)?;
        if id == 0 {
            return Err(DecodeError::Invalid {
                field: "request id",
                value: 0,
            });
        }
        let op = match get_u8(buf, "storage op")? {
            OP_READ => {
                let offset = get_varint(buf, "offset")?;
                let len = get_io_len(buf, "read length")?;
                let compress = match get_u8(buf, "compress")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "compress",
                            value: v.into(),
                        })
                    }
                };
                Op::Read {
                    offset,
                    len,
                    compress,
                }
            }
            OP_WRITE => Op::Write {
                offset: get_varint(buf, "offset")?,
                len: get_io_len(buf, "write length")?,
            },
            OP_WRITE_ZSTD => Op::WriteZstd {
                offset: get_varint(buf, "offset")?,
                len: get_io_len(buf, "write length")?,
                clen: get_io_len(buf, "compressed length")?,
            },
            OP_ZERO => Op::Zero {
                offset: get_varint(buf, "offset")?,
                len: get_range_len(buf, "zero length")?,
            },
            OP_DISCARD => Op::Discard {
                offset: get_varint(buf, "offset")?,
                len: get_range_len(buf, "discard length")?,
            },
            OP_FLUSH => Op::Flush,
            OP_HASH => Op::Hash {
                offset: get_varint(buf, "offset")?,
                len: get_range_len(buf, "hash length")?,
            },
            t => {
                return Err(DecodeError::Invalid {
                    field: "storage op",
                    value: t.into(),
                })
            }
        };
        Ok(Request { id, op })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.id)
            + 1
            + match self.op {
                Op::Read { offset, len, .. } => varint_len(offset) + varint_len(len) + 1,
                Op::Write { offset, len }
                | Op::Zero { offset, len }
                | Op::Discard { offset, len }
                | Op::Hash { offset, len } => varint_len(offset) + varint_len(len),
                Op::WriteZstd { offset, len, clen } => {
                    varint_len(offset) + varint_len(len) + varint_len(clen)
                }
                Op::Flush => 0,
            }
    }
}

/// Why a storage request failed. Each has an errno the client's programs see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageError {
    /// The medium reported an I/O error (a dying card).
    Io,
    /// The exporter does not write this medium (`writable` not set, or a read-only device).
    ReadOnly,
    /// The range is outside the medium.
    OutOfRange,
    /// The lab host's disk is full (an image file could not grow).
    NoSpace,
    /// The board holds the medium (shared, power on).
    BoardHolds,
    /// The medium cannot do this (discard on a device without it).
    Unsupported,
    /// The medium went away (unplugged card reader).
    Gone,
    /// The request's data was bad (a compressed payload that does not decompress to its
    /// stated length).
    BadData,
}

impl StorageError {
    const ALL: [StorageError; 8] = [
        StorageError::Io,
        StorageError::ReadOnly,
        StorageError::OutOfRange,
        StorageError::NoSpace,
        StorageError::BoardHolds,
        StorageError::Unsupported,
        StorageError::Gone,
        StorageError::BadData,
    ];

    fn to_wire(self) -> u8 {
        match self {
            StorageError::Io => 1,
            StorageError::ReadOnly => 2,
            StorageError::OutOfRange => 3,
            StorageError::NoSpace => 4,
            StorageError::BoardHolds => 5,
            StorageError::Unsupported => 6,
            StorageError::Gone => 7,
            StorageError::BadData => 8,
        }
    }

    fn from_wire(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.to_wire() == v)
    }

    /// The errno a program reading or writing the mounted medium gets.
    pub fn errno(self) -> i32 {
        match self {
            StorageError::Io | StorageError::Gone => 5, // EIO
            StorageError::ReadOnly => 30,               // EROFS
            StorageError::OutOfRange => 22,             // EINVAL
            StorageError::NoSpace => 28,                // ENOSPC
            StorageError::BoardHolds => 16,             // EBUSY
            StorageError::Unsupported => 95,            // EOPNOTSUPP
            StorageError::BadData => 74,                // EBADMSG
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StorageError::Io => "I/O error on the medium",
            StorageError::ReadOnly => "read-only",
            StorageError::OutOfRange => "out of range",
            StorageError::NoSpace => "no space left on the lab host",
            StorageError::BoardHolds => "the board holds the medium",
            StorageError::Unsupported => "not supported by the medium",
            StorageError::Gone => "the medium is gone",
            StorageError::BadData => "bad data",
        }
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One response frame of a storage channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done (a write, zero, discard or flush).
    Ok { id: u64 },
    /// A read's `len` raw bytes follow the frame.
    Data { id: u64, len: u64 },
    /// A read's data follows as a zstd frame of `clen` bytes, `len` once decompressed.
    DataZstd { id: u64, len: u64, clen: u64 },
    /// A hash request's SHA-256.
    Hash { id: u64, sha256: [u8; 32] },
    /// The request failed: why, and a message naming the medium for people.
    Error {
        id: u64,
        error: StorageError,
        message: String,
    },
    /// Unsolicited (its frame's id is 0): the device's parameters changed (the board's power
    /// switched, so the generation moved or writes are now refused or accepted again).
    Changed(DeviceParams),
}

impl Response {
    /// The request this answers (0 for [`Response::Changed`]).
    pub fn id(&self) -> u64 {
        match self {
            Response::Ok { id }
            | Response::Data { id, .. }
            | Response::DataZstd { id, .. }
            | Response::Hash { id, .. }
            | Response::Error { id, .. } => *id,
            Response::Changed(_) => 0,
        }
    }
}

const R_OK: u8 = 0x00;
const R_DATA: u8 = 0x01;
const R_DATA_ZSTD: u8 = 0x02;
const R_HASH: u8 = 0x03;
const R_ERROR: u8 = 0x04;
const R_CHANGED: u8 = 0x05;

impl Codec for Response {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.id());
        match self {
            Response::Ok { .. } => buf.put_u8(R_OK),
            Response::Data { len, .. } => {
                buf.put_u8(R_DATA);
                put_varint(buf, *len);
            }
            Response::DataZstd { len, clen, .. } => {
                buf.put_u8(R_DATA_ZSTD);
                put_varint(buf, *len);
                put_varint(buf, *clen);
            }
            Response::Hash { sha256, .. } => {
                buf.put_u8(R_HASH);
                buf.put_slice(sha256);
            }
            Response::Error { error, message, .. } => {
                buf.put_u8(R_ERROR);
                buf.put_u8(error.to_wire());
                put_str(buf, message);
            }
            Response::Changed(p) => {
                buf.put_u8(R_CHANGED);
                p.encode(buf);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let id = get_id(buf)?;
        let t = get_u8(buf, "storage response")?;
        if (t == R_CHANGED) != (id == 0) {
            return Err(DecodeError::Invalid {
                field: "response id",
                value: id,
            });
        }
        Ok(match t {
            R_OK => Response::Ok { id },
            R_DATA => Response::Data {
                id,
                len: get_io_len(buf, "data length")?,
            },
            R_DATA_ZSTD => Response::DataZstd {
                id,
                len: get_io_len(buf, "data length")?,
                clen: get_io_len(buf, "compressed length")?,
            },
            R_HASH => {
                if buf.len() < 32 {
                    return Err(DecodeError::Truncated("sha256"));
                }
                let mut sha256 = [0u8; 32];
                sha256.copy_from_slice(&buf[..32]);
                buf.advance(32);
                Response::Hash { id, sha256 }
            }
            R_ERROR => {
                let e = get_u8(buf, "storage error")?;
                let error = StorageError::from_wire(e).ok_or(DecodeError::Invalid {
                    field: "storage error",
                    value: e.into(),
                })?;
                Response::Error {
                    id,
                    error,
                    message: get_str(buf, "error message")?,
                }
            }
            R_CHANGED => Response::Changed(DeviceParams::decode(buf)?),
            t => {
                return Err(DecodeError::Invalid {
                    field: "storage response",
                    value: t.into(),
                })
            }
        })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.id())
            + 1
            + match self {
                Response::Ok { .. } => 0,
                Response::Data { len, .. } => varint_len(*len),
                Response::DataZstd { len, clen, .. } => varint_len(*len) + varint_len(*clen),
                Response::Hash { .. } => 32,
                Response::Error { message, .. } => 1 + str_len(message),
                Response::Changed(p) => p.encoded_len(),
            }
    }
}

/// A frame whose raw payload follows it on the stream.
pub trait Framed: Codec {
    /// Bytes of payload after the frame.
    fn payload_len(&self) -> u64;
}

impl Framed for Request {
    fn payload_len(&self) -> u64 {
        match self.op {
            Op::Write { len, .. } => len,
            Op::WriteZstd { clen, .. } => clen,
            _ => 0,
        }
    }
}

impl Framed for Response {
    fn payload_len(&self) -> u64 {
        match self {
            Response::Data { len, .. } => *len,
            Response::DataZstd { clen, .. } => *clen,
            _ => 0,
        }
    }
}

/// `varint(len) || frame`, ready to send before the frame's payload.
pub fn frame<T: Codec>(v: &T) -> Bytes {
    let len = v.encoded_len();
    let mut b = BytesMut::with_capacity(varint_len(len as u64) + len);
    put_varint(&mut b, len as u64);
    v.encode(&mut b);
    b.freeze()
}

/// Reassembles frames and their payloads from a storage stream arriving in pieces (sans-IO:
/// push what was read, take complete frames). Payloads are slices of the pushed chunks.
#[derive(Debug)]
pub struct FrameReader<T> {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    /// A decoded frame waiting for the rest of its payload.
    pending: Option<T>,
}

impl<T> Default for FrameReader<T> {
    fn default() -> Self {
        FrameReader {
            chunks: VecDeque::new(),
            buffered: 0,
            pending: None,
        }
    }
}

impl<T: Framed> FrameReader<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Bytes received and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The frame whose header has been decoded and whose payload is still incomplete: what a
    /// reader must make room for before it reads the payload.
    pub fn pending(&self) -> Option<&T> {
        self.pending.as_ref()
    }

    /// The next frame and its payload (as received chunks, in order), `Ok(None)` until both
    /// are complete. After an error the stream is unusable.
    pub fn next_frame(&mut self) -> Result<Option<(T, Vec<Bytes>)>, DecodeError> {
        if self.pending.is_none() {
            // The header is small: copy at most its bytes together to decode it.
            let mut head = [0u8; 8];
            let n = self.peek(&mut head);
            let mut p: &[u8] = &head[..n];
            let len = match get_varint(&mut p, "frame length") {
                Ok(l) => l,
                Err(DecodeError::Truncated(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            if len > MAX_HEADER {
                return Err(DecodeError::FrameTooLarge(len));
            }
            let hlen = n - p.len();
            let total = hlen + len as usize;
            if self.buffered < total {
                return Ok(None);
            }
            let mut header = self.take(total);
            header.advance(hlen);
            let v = T::decode_exact(&header)?;
            if v.payload_len() > MAX_IO {
                return Err(DecodeError::Invalid {
                    field: "payload length",
                    value: v.payload_len(),
                });
            }
            self.pending = Some(v);
        }
        let need = self.pending.as_ref().map_or(0, |v| v.payload_len()) as usize;
        if self.buffered < need {
            return Ok(None);
        }
        let mut payload = Vec::new();
        let mut left = need;
        while left > 0 {
            let Some(c) = self.chunks.front_mut() else {
                break;
            };
            if c.len() <= left {
                left -= c.len();
                let c = self.chunks.pop_front().unwrap_or_default();
                payload.push(c);
            } else {
                payload.push(c.split_to(left));
                left = 0;
            }
        }
        self.buffered -= need;
        Ok(self.pending.take().map(|v| (v, payload)))
    }

    /// Copies up to `out.len()` leading bytes without consuming them.
    fn peek(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for c in &self.chunks {
            let k = (out.len() - n).min(c.len());
            out[n..n + k].copy_from_slice(&c[..k]);
            n += k;
            if n == out.len() {
                break;
            }
        }
        n
    }

    /// Removes `n` leading bytes into one buffer (headers only: a few bytes).
    fn take(&mut self, n: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(c) = self.chunks.front_mut() else {
                break;
            };
            let k = (n - out.len()).min(c.len());
            out.extend_from_slice(&c.split_to(k));
            if c.is_empty() {
                self.chunks.pop_front();
            }
        }
        self.buffered -= out.len();
        out.freeze()
    }
}

/// Device requests on a storage device (no channel needed): what `jmp storage` asks through an
/// attachment's control socket or a one-shot connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRequest {
    /// The device's parameters now.
    Info,
    /// SHA-256 of a range as the medium holds it.
    Hash { offset: u64, len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceResponse {
    Info(DeviceParams),
    Hash {
        #[serde(with = "hex_sha")]
        sha256: [u8; 32],
    },
}

mod hex_sha {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("a sha256 is 32 bytes"))
    }
}

const D_INFO: u8 = 0x01;
const D_HASH: u8 = 0x02;

impl Codec for DeviceRequest {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            DeviceRequest::Info => buf.put_u8(D_INFO),
            DeviceRequest::Hash { offset, len } => {
                buf.put_u8(D_HASH);
                put_varint(buf, *offset);
                put_varint(buf, *len);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "storage request")? {
            D_INFO => Ok(DeviceRequest::Info),
            D_HASH => Ok(DeviceRequest::Hash {
                offset: get_varint(buf, "offset")?,
                len: get_range_len(buf, "hash length")?,
            }),
            t => Err(DecodeError::Invalid {
                field: "storage request",
                value: t.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            DeviceRequest::Info => 0,
            DeviceRequest::Hash { offset, len } => varint_len(*offset) + varint_len(*len),
        }
    }
}

impl Codec for DeviceResponse {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            DeviceResponse::Info(p) => {
                buf.put_u8(D_INFO);
                p.encode(buf);
            }
            DeviceResponse::Hash { sha256 } => {
                buf.put_u8(D_HASH);
                buf.put_slice(sha256);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "storage answer")? {
            D_INFO => Ok(DeviceResponse::Info(DeviceParams::decode(buf)?)),
            D_HASH => {
                if buf.len() < 32 {
                    return Err(DecodeError::Truncated("sha256"));
                }
                let mut sha256 = [0u8; 32];
                sha256.copy_from_slice(&buf[..32]);
                buf.advance(32);
                Ok(DeviceResponse::Hash { sha256 })
            }
            t => Err(DecodeError::Invalid {
                field: "storage answer",
                value: t.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            DeviceResponse::Info(p) => p.encoded_len(),
            DeviceResponse::Hash { .. } => 32,
        }
    }
}

fn example_params() -> DeviceParams {
    DeviceParams {
        size: 256 << 20,
        block_size: 512,
        writable: true,
        discard: true,
        shared: true,
        board_on: false,
        generation: 3,
    }
}

/// Decodes `data` as every body of this kind (the fuzz target `kind_bodies` runs it for every
/// kind): whatever the bytes, nothing panics and nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = DeviceParams::decode_exact(data);
    let _ = Request::decode_exact(data);
    let _ = Response::decode_exact(data);
    let _ = DeviceRequest::decode_exact(data);
    let _ = DeviceResponse::decode_exact(data);
    for split in [1, data.len() / 2] {
        let mut r = FrameReader::<Request>::new();
        let mut a = FrameReader::<Response>::new();
        for c in data.chunks(split.max(1)) {
            r.push(Bytes::copy_from_slice(c));
            a.push(Bytes::copy_from_slice(c));
        }
        while let Ok(Some(_)) = r.next_frame() {}
        while let Ok(Some(_)) = a.next_frame() {}
    }
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("storage-params", to_bytes(&example_params()).to_vec()),
        (
            "storage-read",
            frame(&Request {
                id: 7,
                op: Op::Read {
                    offset: 1 << 20,
                    len: 128 << 10,
                    compress: false,
                },
            })
            .to_vec(),
        ),
        (
            "storage-write",
            frame(&Request {
                id: 8,
                op: Op::Write {
                    offset: 4096,
                    len: 4,
                },
            })
            .iter()
            .copied()
            .chain(*b"\xde\xad\xbe\xef")
            .collect(),
        ),
        (
            "storage-flush",
            frame(&Request {
                id: 9,
                op: Op::Flush,
            })
            .to_vec(),
        ),
        (
            "storage-data",
            frame(&Response::Data { id: 7, len: 4 })
                .iter()
                .copied()
                .chain(*b"\x00\x01\x02\x03")
                .collect(),
        ),
        (
            "storage-error",
            frame(&Response::Error {
                id: 8,
                error: StorageError::BoardHolds,
                message: "sd: power is on".into(),
            })
            .to_vec(),
        ),
        (
            "storage-changed",
            frame(&Response::Changed(DeviceParams {
                board_on: true,
                generation: 4,
                ..example_params()
            }))
            .to_vec(),
        ),
        (
            "storage-request-hash",
            to_bytes(&DeviceRequest::Hash {
                offset: 0,
                len: 1 << 20,
            })
            .to_vec(),
        ),
    ]
}

fn reads_as<T: Framed>(bytes: &[u8]) -> bool {
    let mut r = FrameReader::<T>::new();
    r.push(Bytes::copy_from_slice(bytes));
    matches!(r.next_frame(), Ok(Some(_))) && r.buffered() == 0
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    match name {
        "storage-params" => DeviceParams::decode_exact(bytes).is_ok(),
        "storage-read" | "storage-write" | "storage-flush" => reads_as::<Request>(bytes),
        "storage-data" | "storage-error" | "storage-changed" => reads_as::<Response>(bytes),
        "storage-request-hash" => DeviceRequest::decode_exact(bytes).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    fn arb_params() -> impl Strategy<Value = DeviceParams> {
        (
            0u64..=VARINT_MAX,
            9u32..=16,
            any::<[bool; 4]>(),
            0u64..=VARINT_MAX,
        )
            .prop_map(|(size, bs, f, generation)| DeviceParams {
                size,
                block_size: 1 << bs,
                writable: f[0],
                discard: f[1],
                shared: f[2],
                board_on: f[3],
                generation,
            })
    }

    fn arb_len() -> impl Strategy<Value = u64> {
        1u64..=MAX_IO
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let off = 0u64..=VARINT_MAX;
        let op = prop_oneof![
            (off.clone(), arb_len(), any::<bool>()).prop_map(|(offset, len, compress)| Op::Read {
                offset,
                len,
                compress
            }),
            (off.clone(), arb_len()).prop_map(|(offset, len)| Op::Write { offset, len }),
            (off.clone(), arb_len(), arb_len()).prop_map(|(offset, len, clen)| Op::WriteZstd {
                offset,
                len,
                clen
            }),
            (off.clone(), 1u64..=VARINT_MAX).prop_map(|(offset, len)| Op::Zero { offset, len }),
            (off.clone(), 1u64..=VARINT_MAX).prop_map(|(offset, len)| Op::Discard { offset, len }),
            Just(Op::Flush),
            (off, 1u64..=VARINT_MAX).prop_map(|(offset, len)| Op::Hash { offset, len }),
        ];
        (1u64..=VARINT_MAX, op).prop_map(|(id, op)| Request { id, op })
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        let id = 1u64..=VARINT_MAX;
        prop_oneof![
            id.clone().prop_map(|id| Response::Ok { id }),
            (id.clone(), arb_len()).prop_map(|(id, len)| Response::Data { id, len }),
            (id.clone(), arb_len(), arb_len()).prop_map(|(id, len, clen)| Response::DataZstd {
                id,
                len,
                clen
            }),
            (id.clone(), any::<[u8; 32]>()).prop_map(|(id, sha256)| Response::Hash { id, sha256 }),
            (id, 0usize..8, "[a-z :/]{0,40}").prop_map(|(id, e, message)| Response::Error {
                id,
                error: StorageError::ALL[e],
                message
            }),
            arb_params().prop_map(Response::Changed),
        ]
    }

    /// A frame and a payload of its stated length (capped: a few KiB is enough to split).
    fn with_payload<T: Framed>(v: &T) -> Vec<u8> {
        let mut b = frame(v).to_vec();
        let n = v.payload_len().min(5000) as usize;
        b.extend((0..n).map(|i| i as u8));
        b
    }

    fn small_payload(r: Request) -> Request {
        let cap = |l: u64| 1 + l % 3000;
        let op = match r.op {
            Op::Write { offset, len } => Op::Write {
                offset,
                len: cap(len),
            },
            Op::WriteZstd { offset, len, clen } => Op::WriteZstd {
                offset,
                len,
                clen: cap(clen),
            },
            other => other,
        };
        Request { id: r.id, op }
    }

    proptest! {
        #[test]
        fn bodies_round_trip_with_encoded_len(p in arb_params(), r in arb_request(), resp in arb_response(), hoff in 0u64..=VARINT_MAX, hlen in 1u64..=VARINT_MAX) {
            round_trip(&p);
            round_trip(&r);
            round_trip(&resp);
            round_trip(&DeviceRequest::Hash { offset: hoff, len: hlen });
            round_trip(&DeviceRequest::Info);
            round_trip(&DeviceResponse::Info(p));
            round_trip(&DeviceResponse::Hash { sha256: [7; 32] });
        }

        #[test]
        fn frames_and_payloads_survive_arbitrary_splits(reqs in proptest::collection::vec(arb_request(), 1..6), cuts in proptest::collection::vec(1usize..700, 1..40)) {
            let reqs: Vec<Request> = reqs.into_iter().map(small_payload).collect();
            let mut stream = Vec::new();
            for r in &reqs {
                stream.extend(with_payload(r));
            }
            let mut reader = FrameReader::<Request>::new();
            let mut got = Vec::new();
            let mut at = 0;
            let mut i = 0;
            while at < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - at);
                i += 1;
                reader.push(Bytes::copy_from_slice(&stream[at..at + n]));
                at += n;
                while let Some((r, payload)) = reader.next_frame().expect("valid stream") {
                    let data: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
                    prop_assert_eq!(data.len() as u64, r.payload_len());
                    prop_assert!(data.iter().enumerate().all(|(i, b)| *b == i as u8));
                    got.push(r);
                }
            }
            prop_assert_eq!(got, reqs);
            prop_assert_eq!(reader.buffered(), 0);
        }

        #[test]
        fn corrupted_input_never_panics(r in arb_request(), resp in arb_response(), p in arb_params(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            corrupt::<Request>(&to_bytes(&r), &flips, cut);
            corrupt::<Response>(&to_bytes(&resp), &flips, cut);
            corrupt::<DeviceParams>(&to_bytes(&p), &flips, cut);
            corrupt::<DeviceRequest>(&to_bytes(&DeviceRequest::Hash { offset: 1, len: 2 }), &flips, cut);
            let mut b = with_payload(&resp);
            for &(i, x) in &flips {
                let i = i % b.len();
                b[i] ^= x;
            }
            let mut reader = FrameReader::<Response>::new();
            reader.push(Bytes::from(b));
            while let Ok(Some(_)) = reader.next_frame() {}
        }

        #[test]
        fn random_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut reader = FrameReader::<Request>::new();
            reader.push(Bytes::from(bytes));
            while let Ok(Some(_)) = reader.next_frame() {}
        }
    }

    #[test]
    fn bad_fields_are_named() {
        // A read of zero bytes, a read larger than MAX_IO, request id 0, an odd block size.
        let zero_read = [0x01, OP_READ, 0x00, 0x00, 0x00];
        assert_eq!(
            Request::decode_exact(&zero_read),
            Err(DecodeError::Invalid {
                field: "read length",
                value: 0
            })
        );
        let id0 = [0x00, OP_FLUSH];
        assert!(matches!(
            Request::decode_exact(&id0),
            Err(DecodeError::Invalid {
                field: "request id",
                ..
            })
        ));
        let mut big = BytesMut::new();
        put_varint(&mut big, 1);
        big.put_u8(OP_WRITE);
        put_varint(&mut big, 0);
        put_varint(&mut big, MAX_IO + 1);
        assert!(matches!(
            Request::decode_exact(&big),
            Err(DecodeError::Invalid {
                field: "write length",
                ..
            })
        ));
        let odd = [0x10, 0x43, 0xe8, 0x00, 0x00];
        assert!(matches!(
            DeviceParams::decode_exact(&odd),
            Err(DecodeError::Invalid {
                field: "block size",
                ..
            })
        ));
        // A header claiming more than MAX_HEADER is refused before anything is buffered.
        let mut r = FrameReader::<Response>::new();
        r.push(Bytes::from_static(&[0x7f, 0xff]));
        assert!(matches!(r.next_frame(), Err(DecodeError::FrameTooLarge(_))));
    }

    #[test]
    fn pending_names_a_frame_before_its_payload_is_read() {
        let req = Request {
            id: 3,
            op: Op::Write {
                offset: 0,
                len: 10,
            },
        };
        let mut r = FrameReader::<Request>::new();
        assert_eq!(r.pending(), None);
        r.push(frame(&req));
        assert_eq!(r.next_frame(), Ok(None), "payload missing");
        assert_eq!(r.pending(), Some(&req), "known before its payload arrives");
        r.push(Bytes::from_static(b"0123456789"));
        let (got, payload) = r.next_frame().expect("decodes").expect("complete");
        assert_eq!((got, payload.concat()), (req, b"0123456789".to_vec()));
        assert_eq!(r.pending(), None);
    }

    #[test]
    fn device_requests_read_as_json_for_the_control_socket() {
        let r: DeviceRequest =
            serde_json::from_str(r#"{"hash":{"offset":0,"len":4096}}"#).expect("json");
        assert_eq!(
            r,
            DeviceRequest::Hash {
                offset: 0,
                len: 4096
            }
        );
        let a = DeviceResponse::Hash { sha256: [0xab; 32] };
        let j = serde_json::to_string(&a).expect("json");
        assert!(j.contains(&"ab".repeat(32)), "{j}");
        assert_eq!(serde_json::from_str::<DeviceResponse>(&j).ok(), Some(a));
    }
}
