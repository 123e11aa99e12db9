//! The codec: QUIC-style variable-length integers, length-prefixed strings and frames.
//!
//! A control frame is `varint(len) || type u8 || body`, where `len` counts type and body. Every
//! decoder works on untrusted input: it returns [`DecodeError`], never panics, and never
//! allocates more than the bytes actually present justify.

use bytes::{Buf, BufMut, BytesMut};

/// Largest control frame accepted. Control messages are small; a larger length is an attack or a
/// peer that is not speaking jmp.
pub const MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("invalid {field}: {value}")]
    Invalid { field: &'static str, value: u64 },
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge(u64),
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

/// Something with a wire form. `encoded_len` must equal the bytes `encode` writes (tested).
pub trait Codec: Sized {
    fn encode(&self, buf: &mut BytesMut);
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError>;
    fn encoded_len(&self) -> usize;

    /// Decodes a value that must fill `bytes` exactly.
    fn decode_exact(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        let v = Self::decode(&mut bytes)?;
        if !bytes.is_empty() {
            return Err(DecodeError::Trailing(bytes.len()));
        }
        Ok(v)
    }
}

pub const VARINT_MAX: u64 = (1 << 62) - 1;

pub fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Writes `v` (clamped to 2^62-1, which no jmp field reaches) as a QUIC varint.
pub fn put_varint(buf: &mut impl BufMut, v: u64) {
    let v = v.min(VARINT_MAX);
    match varint_len(v) {
        1 => buf.put_u8(v as u8),
        2 => buf.put_u16(0x4000 | v as u16),
        4 => buf.put_u32(0x8000_0000 | v as u32),
        _ => buf.put_u64(0xc000_0000_0000_0000 | v),
    }
}

pub fn get_varint(buf: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    let first = *buf.first().ok_or(DecodeError::Truncated(what))?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return Err(DecodeError::Truncated(what));
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    buf.advance(len);
    Ok(v)
}

pub fn get_u8(buf: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Truncated(what));
    }
    Ok(buf.get_u8())
}

pub fn get_u64(buf: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    if buf.len() < 8 {
        return Err(DecodeError::Truncated(what));
    }
    Ok(buf.get_u64())
}

pub fn str_len(s: &str) -> usize {
    varint_len(s.len() as u64) + s.len()
}

pub fn put_str(buf: &mut BytesMut, s: &str) {
    put_varint(buf, s.len() as u64);
    buf.put_slice(s.as_bytes());
}

pub fn get_str(buf: &mut &[u8], what: &'static str) -> Result<String, DecodeError> {
    let len = get_varint(buf, what)?;
    // The length is checked against what is present before anything is allocated.
    if len > buf.len() as u64 {
        return Err(DecodeError::Truncated(what));
    }
    let len = len as usize;
    let s = std::str::from_utf8(&buf[..len]).map_err(|_| DecodeError::Utf8(what))?;
    let s = s.to_owned();
    buf.advance(len);
    Ok(s)
}

pub fn bytes_len(b: &[u8]) -> usize {
    varint_len(b.len() as u64) + b.len()
}

/// Writes `varint(len) || bytes`: a kind's body inside a generic message.
pub fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    put_varint(buf, b.len() as u64);
    buf.put_slice(b);
}

pub fn get_bytes(buf: &mut &[u8], what: &'static str) -> Result<bytes::Bytes, DecodeError> {
    let len = get_varint(buf, what)?;
    if len > buf.len() as u64 {
        return Err(DecodeError::Truncated(what));
    }
    let len = len as usize;
    let b = bytes::Bytes::copy_from_slice(&buf[..len]);
    buf.advance(len);
    Ok(b)
}

pub fn opt_varint_len(v: Option<u64>) -> usize {
    1 + v.map_or(0, varint_len)
}

/// `0` for none, `1 || varint` for some.
pub fn put_opt_varint(buf: &mut BytesMut, v: Option<u64>) {
    match v {
        None => buf.put_u8(0),
        Some(v) => {
            buf.put_u8(1);
            put_varint(buf, v);
        }
    }
}

pub fn get_opt_varint(buf: &mut &[u8], what: &'static str) -> Result<Option<u64>, DecodeError> {
    match get_u8(buf, what)? {
        0 => Ok(None),
        1 => get_varint(buf, what).map(Some),
        v => Err(DecodeError::Invalid {
            field: what,
            value: v.into(),
        }),
    }
}

/// A varint that must fit a `u32`.
pub fn get_u32_varint(buf: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    let v = get_varint(buf, what)?;
    u32::try_from(v).map_err(|_| DecodeError::Invalid {
        field: what,
        value: v,
    })
}

/// Encodes a value into a fresh buffer of exactly its length (a kind's body).
pub fn to_bytes<T: Codec>(v: &T) -> bytes::Bytes {
    let mut b = BytesMut::with_capacity(v.encoded_len());
    v.encode(&mut b);
    b.freeze()
}

/// A count of list elements; each element takes at least `min_elem` bytes, which bounds the
/// count by the input actually present.
pub fn get_count(
    buf: &mut &[u8],
    what: &'static str,
    min_elem: usize,
) -> Result<usize, DecodeError> {
    let n = get_varint(buf, what)?;
    if n.saturating_mul(min_elem as u64) > buf.len() as u64 {
        return Err(DecodeError::Truncated(what));
    }
    Ok(n as usize)
}

/// Writes one length-delimited frame holding `msg`.
pub fn encode_frame<T: Codec>(msg: &T, buf: &mut BytesMut) {
    let len = msg.encoded_len();
    buf.reserve(varint_len(len as u64) + len);
    put_varint(buf, len as u64);
    msg.encode(buf);
}

/// Reassembles frames from a byte stream that arrives in arbitrary pieces (sans-IO: the caller
/// feeds what it read and asks for complete messages).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the stream
    /// is unusable: the caller must close the connection.
    pub fn next_message<T: Codec>(&mut self) -> Result<Option<T>, DecodeError> {
        let mut peek: &[u8] = &self.buf;
        let len = match get_varint(&mut peek, "frame length") {
            Ok(len) => len,
            Err(DecodeError::Truncated(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if len > MAX_FRAME as u64 {
            return Err(DecodeError::FrameTooLarge(len));
        }
        let header = self.buf.len() - peek.len();
        if peek.len() < len as usize {
            return Ok(None);
        }
        let frame = self.buf.split_to(header + len as usize);
        T::decode_exact(&frame[header..]).map(Some)
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_boundaries_match_rfc9000() {
        // RFC 9000 section A.1 examples.
        let cases: &[(u64, &str)] = &[
            (37, "25"),
            (15293, "7bbd"),
            (494878333, "9d7f3e7d"),
            (151288809941952652, "c2197c5eff14e88c"),
        ];
        for (v, hexs) in cases {
            let mut b = BytesMut::new();
            put_varint(&mut b, *v);
            assert_eq!(hex::encode(&b), *hexs);
            assert_eq!(varint_len(*v), b.len());
            let mut s: &[u8] = &b;
            assert_eq!(get_varint(&mut s, "v").ok(), Some(*v));
            assert!(s.is_empty());
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering_it() {
        let mut d = FrameDecoder::new();
        let mut b = BytesMut::new();
        put_varint(&mut b, (MAX_FRAME + 1) as u64);
        d.feed(&b);
        assert!(matches!(
            d.next_message::<crate::Message>(),
            Err(DecodeError::FrameTooLarge(_))
        ));
    }

    #[test]
    fn huge_string_length_is_truncation_not_allocation() {
        let mut b = BytesMut::new();
        put_varint(&mut b, VARINT_MAX);
        let mut s: &[u8] = &b;
        assert_eq!(get_str(&mut s, "name"), Err(DecodeError::Truncated("name")));
    }

    proptest! {
        #[test]
        fn varint_round_trip(v in 0u64..=VARINT_MAX) {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            prop_assert_eq!(b.len(), varint_len(v));
            let mut s: &[u8] = &b;
            prop_assert_eq!(get_varint(&mut s, "v").ok(), Some(v));
        }
    }
}
