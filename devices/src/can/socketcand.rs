//! The socketcand protocol, server side, raw mode (what python-can's `socketcand` interface and
//! Kayak speak): `< hi >` on connect, `< open BUS >` / `< ok >`, `< rawmode >` / `< ok >`, then
//! frames both ways. Client → server: `< send ID LEN B0 B1 … >` (data bytes as hex words),
//! `< sendrtr ID DLC >`, `< fdsend ID FLAGS HEX >` (CAN FD; FLAGS: 1 bit rate switch, 2 error
//! state indicator; data as one hex string), `< echo >`. Server → client: `< frame ID SECS.USECS
//! HEX >`, `< rtr ID SECS.USECS DLC >`, `< fdframe ID SECS.USECS FLAGS HEX >`, `< error CLASS
//! SECS.USECS HEX >` (an error frame, `linux/can/error.h`), `< error TEXT >` (a command refused).
//! An id of up to three hex digits is standard, a longer one extended (printed with eight).

use jmp_protocol::kinds::can::{Frame, BRS, ESI, EXTENDED, FD};

/// A command a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Open(String),
    RawMode,
    BcmMode,
    ControlMode,
    Echo,
    Send(Frame),
}

/// Why a command is refused (sent back as `< error … >`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse(msg: impl Into<String>) -> Refused {
    Refused(msg.into())
}

fn parse_id(s: &str) -> Result<(u32, bool), Refused> {
    let id = u32::from_str_radix(s, 16).map_err(|_| refuse(format!("id {s:?} is not hex")))?;
    Ok((id, s.len() > 3))
}

fn parse_hex_byte(s: &str) -> Result<u8, Refused> {
    u8::from_str_radix(s, 16).map_err(|_| refuse(format!("data byte {s:?} is not hex")))
}

/// Parses the inside of one `< … >` message.
pub fn parse(msg: &str) -> Result<Command, Refused> {
    let w: Vec<&str> = msg.split_ascii_whitespace().collect();
    let frame_err = |e: jmp_protocol::kinds::can::FrameError| refuse(e.to_string());
    match w.as_slice() {
        ["open", bus] => Ok(Command::Open(bus.to_string())),
        ["rawmode"] => Ok(Command::RawMode),
        ["bcmmode"] => Ok(Command::BcmMode),
        ["controlmode"] => Ok(Command::ControlMode),
        ["echo"] => Ok(Command::Echo),
        ["send", id, len, data @ ..] => {
            let (id, ext) = parse_id(id)?;
            let len = usize::from_str_radix(len, 16)
                .map_err(|_| refuse(format!("length {len:?} is not a number")))?;
            if len != data.len() {
                return Err(refuse(format!(
                    "length {len} but {} data bytes given",
                    data.len()
                )));
            }
            let bytes = data
                .iter()
                .map(|b| parse_hex_byte(b))
                .collect::<Result<Vec<u8>, _>>()?;
            Frame::new(id, if ext { EXTENDED } else { 0 }, &bytes)
                .map(Command::Send)
                .map_err(frame_err)
        }
        ["sendrtr", id, dlc] => {
            let (id, ext) = parse_id(id)?;
            let dlc = u8::from_str_radix(dlc, 16)
                .map_err(|_| refuse(format!("DLC {dlc:?} is not a number")))?;
            Frame::remote(id, ext, dlc)
                .map(Command::Send)
                .map_err(frame_err)
        }
        ["fdsend", id, flags, data @ ..] if data.len() <= 1 => {
            let (id, ext) = parse_id(id)?;
            let fl = u8::from_str_radix(flags, 16)
                .map_err(|_| refuse(format!("flags {flags:?} are not hex")))?;
            if fl & !0x3 != 0 {
                return Err(refuse(format!("unknown FD flags {fl:x} (1 BRS, 2 ESI)")));
            }
            let hex = data.first().copied().unwrap_or("");
            if hex.len() % 2 != 0 {
                return Err(refuse("FD data has an odd number of hex digits"));
            }
            let bytes = (0..hex.len() / 2)
                .map(|i| parse_hex_byte(&hex[2 * i..2 * i + 2]))
                .collect::<Result<Vec<u8>, _>>()?;
            let flags = FD
                | if ext { EXTENDED } else { 0 }
                | if fl & 1 != 0 { BRS } else { 0 }
                | if fl & 2 != 0 { ESI } else { 0 };
            Frame::new(id, flags, &bytes)
                .map(Command::Send)
                .map_err(frame_err)
        }
        [cmd, ..] => Err(refuse(format!(
            "unknown command {:?} (this server speaks rawmode: open, rawmode, send, sendrtr, fdsend, echo)",
            jmp_protocol::name::escape(cmd)
        ))),
        [] => Err(refuse("empty command")),
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_hex(out: &mut Vec<u8>, data: &[u8]) {
    for b in data {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

/// Appends the message for a frame received at `time_us` (µs since the Unix epoch).
pub fn encode_frame(out: &mut Vec<u8>, f: &Frame, time_us: u64) {
    use std::io::Write;
    let (secs, usecs) = (time_us / 1_000_000, time_us % 1_000_000);
    let id = if f.is_extended() || f.is_error() {
        format!("{:08X}", f.id)
    } else {
        format!("{:03X}", f.id)
    };
    let _ = if f.is_error() {
        write!(out, "< error {id} {secs}.{usecs:06} ")
    } else if f.is_rtr() {
        write!(out, "< rtr {id} {secs}.{usecs:06} {:X} >", f.len)
    } else if f.is_fd() {
        let fl = u8::from(f.flags & BRS != 0) | (u8::from(f.flags & ESI != 0) << 1);
        write!(out, "< fdframe {id} {secs}.{usecs:06} {fl:X} ")
    } else {
        write!(out, "< frame {id} {secs}.{usecs:06} ")
    };
    if !f.is_rtr() {
        push_hex(out, f.data());
        out.extend_from_slice(b" >");
    }
}

/// Splits a byte stream into `< … >` messages. Text outside them is an error; a message longer
/// than any valid one is refused.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    inside: bool,
}

/// Longest message: an `fdsend` with 64 data bytes, and room.
pub const MAX_MESSAGE: usize = 256;

impl Splitter {
    pub fn feed(&mut self, data: &[u8], mut msg: impl FnMut(Result<&str, Refused>)) {
        for &c in data {
            if !self.inside {
                match c {
                    b'<' => {
                        self.inside = true;
                        self.buf.clear();
                    }
                    c if c.is_ascii_whitespace() => {}
                    c => msg(Err(refuse(format!(
                        "{:?} outside < >",
                        (c as char).escape_default().to_string()
                    )))),
                }
                continue;
            }
            match c {
                b'>' => {
                    self.inside = false;
                    match std::str::from_utf8(&self.buf) {
                        Ok(s) => msg(Ok(s)),
                        Err(_) => msg(Err(refuse("a message that is not ASCII"))),
                    }
                }
                c if self.buf.len() >= MAX_MESSAGE => {
                    let _ = c;
                    self.inside = false;
                    msg(Err(refuse(format!(
                        "a message longer than {MAX_MESSAGE} characters"
                    ))));
                }
                c => self.buf.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_python_can_sends() {
        assert_eq!(parse(" open can0 "), Ok(Command::Open("can0".into())));
        assert_eq!(parse(" rawmode "), Ok(Command::RawMode));
        assert_eq!(
            parse(" send 123 2 de ad "),
            Ok(Command::Send(
                Frame::new(0x123, 0, &[0xde, 0xad]).expect("valid")
            ))
        );
        assert_eq!(
            parse(" send 1AAAAAAA 0 "),
            Ok(Command::Send(
                Frame::new(0x1aaa_aaaa, EXTENDED, &[]).expect("valid")
            ))
        );
        assert_eq!(
            parse(" sendrtr 123 8 "),
            Ok(Command::Send(
                Frame::remote(0x123, false, 8).expect("valid")
            ))
        );
        assert_eq!(
            parse(" fdsend 123 1 00112233445566778899AABB "),
            Ok(Command::Send(
                Frame::new(
                    0x123,
                    FD | BRS,
                    &[0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb]
                )
                .expect("valid")
            ))
        );
        assert!(parse(" send 123 9 1 2 3 4 5 6 7 8 9 ").is_err_and(|e| e.0.contains("at most 8")));
        assert!(parse(" send 123 2 1 ").is_err_and(|e| e.0.contains("length 2")));
        assert!(parse(" frobnicate ").is_err_and(|e| e.0.contains("unknown command")));
    }

    #[test]
    fn frames_as_python_can_reads_them() {
        let mut out = Vec::new();
        encode_frame(
            &mut out,
            &Frame::new(0x123, 0, &[0x11, 0x22]).expect("valid"),
            1_700_000_000_000_042,
        );
        assert_eq!(out, b"< frame 123 1700000000.000042 1122 >");
        out.clear();
        encode_frame(
            &mut out,
            &Frame::remote(0x1234_5678, true, 4).expect("valid"),
            1,
        );
        assert_eq!(out, b"< rtr 12345678 0.000001 4 >");
        let mut s = Splitter::default();
        let mut got = Vec::new();
        s.feed(b"< hi >< open x >\n< ok", |m| {
            got.push(m.map(str::to_string))
        });
        s.feed(b" >x", |m| got.push(m.map(str::to_string)));
        assert_eq!(
            got[..3],
            [Ok(" hi ".into()), Ok(" open x ".into()), Ok(" ok ".into())]
        );
        assert!(got[3].is_err());
    }
}
