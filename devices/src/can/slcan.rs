//! The slcan (Lawicel ASCII) line protocol, both roles: the exporter speaks it as the host of a
//! real adapter (CANable and compatibles), the client's slcan pty speaks it as the adapter to
//! local programs (python-can `slcan`, SavvyCAN, `slcand`).
//!
//! Lines end with `\r`. Frames: `tIIIL…` / `TIIIIIIIIL…` (classic, standard/extended id, DLC
//! 0–8, data as hex), `rIIIL` / `RIIIIIIIIL` (remote), and the CANable-2 FD letters `dIIIL…` /
//! `DIIIIIIIIL…` (FD) and `b`/`B` (FD with bit rate switch), whose DLC is one hex digit 0–F.
//! With timestamps on (`Z1`), a frame is followed by four hex digits: milliseconds 0–59999.
//! Commands: `O` open, `L` open listen-only, `C` close, `Sn` nominal bit rate, `sXXYY` BTR
//! registers, `Yn` data bit rate, `Zn` timestamps, `V`/`v`/`N` versions and serial number,
//! `F` status flags, `M`/`m` acceptance code/mask. Answers: `\r` (ok), `z\r`/`Z\r` (a frame was
//! queued), `\a` (error). Error frames and ESI have no slcan form.

use jmp_protocol::kinds::can::{Frame, FrameError, BRS, EXTENDED, FD, FD_LENGTHS, RTR};

/// Why an slcan line is refused: what was wrong, with the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed slcan line {line:?}: {why}")]
pub struct SlcanError {
    pub line: String,
    pub why: String,
}

fn err(line: &[u8], why: impl Into<String>) -> SlcanError {
    let text: String = String::from_utf8_lossy(&line[..line.len().min(160)]).into_owned();
    SlcanError {
        line: jmp_protocol::name::escape(&text).to_string(),
        why: why.into(),
    }
}

/// A line a host sends to an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostLine {
    Frame(Frame),
    Open,
    ListenOnly,
    Close,
    /// `Sn`: the code's digit.
    Bitrate(char),
    /// `sXXYY`: BTR0/BTR1 of an SJA1000 at 8 MHz.
    Btr(String),
    /// `Yn`: the code's digit.
    DataBitrate(char),
    Timestamps(bool),
    Version,
    SoftwareVersion,
    SerialNumber,
    Status,
    /// Accepted and ignored (`M`, `m`, `X`, `W`, `Q`, `U`).
    Ignored(char),
    Empty,
}

/// A line an adapter sends to its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterLine {
    Frame {
        frame: Frame,
        timestamp: Option<u16>,
    },
    /// `\r`, `z\r` or `Z\r`: the last command or frame was accepted.
    Ok,
    /// `\a`: the last command or frame was refused.
    Error,
    /// Anything else an adapter answers (`V1013`, `F00`, `NA123`).
    Info(String),
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_num(line: &[u8], s: &[u8], what: &str) -> Result<u32, SlcanError> {
    let mut v = 0u32;
    for &c in s {
        v = (v << 4)
            | u32::from(hex_val(c).ok_or_else(|| err(line, format!("{what} is not hex")))?);
    }
    Ok(v)
}

/// Parses a frame line (`t`, `T`, `r`, `R`, `d`, `D`, `b`, `B`); the rest after the data is
/// either nothing or a 4-digit timestamp.
fn parse_frame(line: &[u8]) -> Result<(Frame, Option<u16>), SlcanError> {
    let letter = line[0];
    let extended = letter.is_ascii_uppercase();
    let (fd, brs, rtr) = match letter.to_ascii_lowercase() {
        b't' => (false, false, false),
        b'r' => (false, false, true),
        b'd' => (true, false, false),
        b'b' => (true, true, false),
        _ => return Err(err(line, "not a frame")),
    };
    let id_len = if extended { 8 } else { 3 };
    if line.len() < 1 + id_len + 1 {
        return Err(err(line, "too short for an id and a DLC"));
    }
    let id = hex_num(line, &line[1..=id_len], "the id")?;
    let dlc = hex_val(line[1 + id_len]).ok_or_else(|| err(line, "the DLC is not a hex digit"))?;
    let len = if fd {
        FD_LENGTHS[usize::from(dlc)]
    } else if dlc > 8 {
        return Err(err(
            line,
            format!("DLC {dlc} is more than a classic frame's 8 bytes"),
        ));
    } else {
        dlc
    };
    let rest = &line[2 + id_len..];
    let data_chars = if rtr { 0 } else { 2 * usize::from(len) };
    if rest.len() < data_chars {
        return Err(err(
            line,
            format!(
                "DLC {dlc} announces {len} data bytes but the line carries {}",
                rest.len() / 2
            ),
        ));
    }
    let (data_hex, tail) = rest.split_at(data_chars);
    let timestamp = match tail.len() {
        0 => None,
        4 => Some(hex_num(line, tail, "the timestamp")? as u16),
        n => {
            return Err(err(
                line,
                format!(
                "{n} characters after the data (longer than DLC {dlc} allows; a timestamp has 4)"
            ),
            ))
        }
    };
    let mut data = [0u8; 64];
    for (i, pair) in data_hex.chunks(2).enumerate() {
        data[i] = hex_num(line, pair, "the data")? as u8;
    }
    let flags = if extended { EXTENDED } else { 0 }
        | if rtr { RTR } else { 0 }
        | if fd { FD } else { 0 }
        | if brs { BRS } else { 0 };
    let frame = if rtr {
        Frame::remote(id, extended, len)
    } else {
        Frame::new(id, flags, &data[..usize::from(len)])
    }
    .map_err(|e: FrameError| err(line, e.to_string()))?;
    Ok((frame, timestamp))
}

/// Parses one line (without its `\r`) that a host sent.
pub fn parse_host_line(line: &[u8]) -> Result<HostLine, SlcanError> {
    let Some(&first) = line.first() else {
        return Ok(HostLine::Empty);
    };
    let only = |l: HostLine| {
        if line.len() == 1 {
            Ok(l)
        } else {
            Err(err(line, "unexpected characters after the command"))
        }
    };
    match first {
        b't' | b'T' | b'r' | b'R' | b'd' | b'D' | b'b' | b'B' => {
            let (f, ts) = parse_frame(line)?;
            if ts.is_some() {
                return Err(err(line, "a host does not send timestamps"));
            }
            Ok(HostLine::Frame(f))
        }
        b'O' => only(HostLine::Open),
        b'L' => only(HostLine::ListenOnly),
        b'C' => only(HostLine::Close),
        b'V' => only(HostLine::Version),
        b'v' => only(HostLine::SoftwareVersion),
        b'N' => only(HostLine::SerialNumber),
        b'F' => only(HostLine::Status),
        b'S' | b'Y' if line.len() == 2 && line[1].is_ascii_digit() => Ok(if first == b'S' {
            HostLine::Bitrate(line[1] as char)
        } else {
            HostLine::DataBitrate(line[1] as char)
        }),
        b'S' | b'Y' => Err(err(line, "expected one digit after the command")),
        b's' if line.len() == 5 && line[1..].iter().all(|c| hex_val(*c).is_some()) => Ok(
            HostLine::Btr(String::from_utf8_lossy(&line[1..]).into_owned()),
        ),
        b's' => Err(err(line, "expected four hex digits (BTR0 BTR1) after s")),
        b'Z' if line.len() == 2 && matches!(line[1], b'0' | b'1') => {
            Ok(HostLine::Timestamps(line[1] == b'1'))
        }
        b'Z' => Err(err(line, "expected Z0 or Z1")),
        b'M' | b'm' | b'X' | b'W' | b'Q' | b'U' => Ok(HostLine::Ignored(first as char)),
        c => Err(err(
            line,
            format!(
                "unknown command {:?}",
                (c as char).escape_default().to_string()
            ),
        )),
    }
}

/// Parses one line (without its terminator) that an adapter sent. `\a` arrives as its own
/// "line" (see [`LineSplitter`]).
pub fn parse_adapter_line(line: &[u8]) -> Result<AdapterLine, SlcanError> {
    match line.first() {
        None => Ok(AdapterLine::Ok),
        Some(b'\x07') => Ok(AdapterLine::Error),
        Some(b'z' | b'Z') if line.len() == 1 => Ok(AdapterLine::Ok),
        Some(b't' | b'T' | b'r' | b'R' | b'd' | b'D' | b'b' | b'B') => {
            let (frame, timestamp) = parse_frame(line)?;
            Ok(AdapterLine::Frame { frame, timestamp })
        }
        Some(_) => Ok(AdapterLine::Info(
            String::from_utf8_lossy(line).into_owned(),
        )),
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `f` as an slcan line (with `\r`), with a timestamp if given. `None` for a frame
/// slcan cannot carry (an error frame).
pub fn encode_frame(out: &mut Vec<u8>, f: &Frame, timestamp: Option<u16>) -> Option<()> {
    if f.is_error() {
        return None;
    }
    let letter = match (f.is_fd(), f.flags & BRS != 0, f.is_rtr()) {
        (true, true, _) => b'b',
        (true, false, _) => b'd',
        (false, _, true) => b'r',
        (false, _, false) => b't',
    };
    let ext = f.is_extended();
    out.push(if ext {
        letter.to_ascii_uppercase()
    } else {
        letter
    });
    let digits = if ext { 8 } else { 3 };
    for i in (0..digits).rev() {
        out.push(HEX[((f.id >> (4 * i)) & 0xf) as usize]);
    }
    out.push(HEX[usize::from(f.dlc() & 0xf)]);
    for b in f.data() {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
    if let Some(ts) = timestamp {
        for i in (0..4).rev() {
            out.push(HEX[usize::from((ts >> (4 * i)) & 0xf)]);
        }
    }
    out.push(b'\r');
    Some(())
}

/// Splits a byte stream into lines at `\r` (a `\n` after it is ignored); a `\a` is a line of its
/// own. Lines longer than any slcan line are cut off and reported as malformed.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    overlong: bool,
}

/// Longest valid line: `B` + 8 id digits + DLC + 128 data digits + 4 timestamp digits.
pub const MAX_LINE: usize = 1 + 8 + 1 + 128 + 4;

impl LineSplitter {
    /// Feeds `data`; calls `line` with each complete line (`Err` for an over-long one).
    pub fn feed(&mut self, data: &[u8], mut line: impl FnMut(Result<&[u8], SlcanError>)) {
        for &c in data {
            match c {
                b'\r' => {
                    if self.overlong {
                        line(Err(err(
                            &self.buf,
                            format!("longer than {MAX_LINE} characters"),
                        )));
                    } else {
                        line(Ok(&self.buf));
                    }
                    self.buf.clear();
                    self.overlong = false;
                }
                b'\n' if self.buf.is_empty() => {}
                b'\x07' => {
                    self.buf.clear();
                    self.overlong = false;
                    line(Ok(b"\x07"));
                }
                c => {
                    if self.buf.len() < MAX_LINE {
                        self.buf.push(c);
                    } else {
                        self.overlong = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(f: Frame, ts: Option<u16>) {
        let mut out = Vec::new();
        encode_frame(&mut out, &f, ts).expect("encodable");
        assert_eq!(out.last(), Some(&b'\r'));
        let line = &out[..out.len() - 1];
        assert_eq!(
            parse_adapter_line(line),
            Ok(AdapterLine::Frame {
                frame: f,
                timestamp: ts
            }),
            "{}",
            String::from_utf8_lossy(line)
        );
        if ts.is_none() {
            assert_eq!(parse_host_line(line), Ok(HostLine::Frame(f)));
        }
    }

    #[test]
    fn every_kind_of_frame_round_trips() {
        for len in 0..=8u8 {
            let data: Vec<u8> = (0..len).collect();
            round(Frame::new(0x7ff, 0, &data).expect("valid"), None);
            round(
                Frame::new(0x1fff_ffff, EXTENDED, &data).expect("valid"),
                Some(59_999),
            );
            round(Frame::remote(0x123, false, len).expect("valid"), None);
            round(Frame::remote(0x1234_5678, true, len).expect("valid"), None);
        }
        for len in FD_LENGTHS {
            let data: Vec<u8> = (0..len).map(|i| i ^ 0x5a).collect();
            round(Frame::new(0x123, FD, &data).expect("valid"), None);
            round(
                Frame::new(0x1abc_def0, FD | BRS | EXTENDED, &data).expect("valid"),
                Some(7),
            );
        }
    }

    #[test]
    fn known_lines() {
        let mut out = Vec::new();
        encode_frame(
            &mut out,
            &Frame::new(0x123, 0, &[0xde, 0xad]).expect("valid"),
            None,
        );
        assert_eq!(out, b"t1232DEAD\r");
        assert_eq!(parse_host_line(b"S6"), Ok(HostLine::Bitrate('6')));
        assert_eq!(parse_host_line(b"Y2"), Ok(HostLine::DataBitrate('2')));
        assert_eq!(parse_host_line(b""), Ok(HostLine::Empty));
        assert_eq!(parse_host_line(b"Z1"), Ok(HostLine::Timestamps(true)));
        assert_eq!(parse_adapter_line(b"z"), Ok(AdapterLine::Ok));
        assert_eq!(parse_adapter_line(b"\x07"), Ok(AdapterLine::Error));
    }

    #[test]
    fn malformed_lines_name_what_is_wrong() {
        let e = |l: &[u8]| parse_host_line(l).expect_err("malformed").why;
        assert!(e(b"t1239").contains("DLC 9"), "{}", e(b"t1239"));
        assert!(e(b"t1232DE").contains("announces 2 data bytes"));
        assert!(e(b"t1231DEAD").contains("after the data"));
        assert!(e(b"t8001AA").contains("11 bits"));
        assert!(e(b"tXYZ0").contains("id is not hex"));
        assert!(e(b"q").contains("unknown command"));
        assert!(e(b"S").contains("one digit"));
        assert!(e(b"Ox").contains("after the command"));
        let mut s = LineSplitter::default();
        let mut got = Vec::new();
        s.feed(&[b'x'; MAX_LINE + 10], |_| {});
        s.feed(b"\rt1230\r\x07\n", |l| got.push(l.map(|l| l.to_vec())));
        assert!(got[0]
            .as_ref()
            .is_err_and(|e| e.why.contains("longer than")));
        assert_eq!(got[1], Ok(b"t1230".to_vec()));
        assert_eq!(got[2], Ok(b"\x07".to_vec()));
    }
}
