//! The simulated ECU of `type: can-sim`, as a pure state machine (the driver's bus task owns
//! the clock and the board's power):
//!
//! - a counter frame on `counterId` every `period`: the counter as a big-endian u32, then
//!   `4a 4d 50 00` ("JMP");
//! - optional background load on id 0x7ff (8 bytes: a big-endian u64 count);
//! - an ISO-TP (ISO 15765-2, normal addressing, classic frames padded to 8 bytes with 0xcc)
//!   server on `requestId`, answering on `responseId`: a request `P` gets the response `P` with
//!   its first byte + 0x40 (a UDS positive response), same length, single or multi frame; it
//!   sends a flow control (continue, block size 0, STmin 0) after a first frame and honours the
//!   client's flow control (block size, wait, overflow) for multi-frame responses;
//! - every other frame is mirrored back unchanged (same id, flags and data), so that traffic
//!   of every kind can be checked end to end.

use jmp_protocol::kinds::can::{Frame, MAX_STANDARD_ID};

/// Id of the background load frames.
pub const LOAD_ID: u32 = 0x7ff;
/// Longest ISO-TP message (12-bit length).
pub const MAX_ISOTP: usize = 4095;
const PAD: u8 = 0xcc;

#[derive(Debug, Default)]
struct Rx {
    buf: Vec<u8>,
    want: usize,
    next_sn: u8,
}

#[derive(Debug, Default)]
struct Tx {
    data: Vec<u8>,
    pos: usize,
    next_sn: u8,
    /// CFs left before the next flow control (0: no limit).
    block_left: u32,
    waiting_fc: bool,
}

pub struct SimEcu {
    pub counter_id: u32,
    pub request_id: u32,
    pub response_id: u32,
    counter: u32,
    load: u64,
    rx: Option<Rx>,
    tx: Option<Tx>,
}

fn padded(id: u32, bytes: &[u8]) -> Frame {
    let mut d = [PAD; 8];
    d[..bytes.len()].copy_from_slice(bytes);
    Frame::new(id & MAX_STANDARD_ID, 0, &d).expect("an 8-byte standard frame is valid")
}

impl SimEcu {
    pub fn new(counter_id: u32, request_id: u32, response_id: u32) -> Self {
        SimEcu {
            counter_id,
            request_id,
            response_id,
            counter: 0,
            load: 0,
            rx: None,
            tx: None,
        }
    }

    /// The next counter frame.
    pub fn counter_frame(&mut self) -> Frame {
        let c = self.counter;
        self.counter = self.counter.wrapping_add(1);
        let mut d = [0u8; 8];
        d[..4].copy_from_slice(&c.to_be_bytes());
        d[4..].copy_from_slice(b"JMP\0");
        Frame::new(self.counter_id & MAX_STANDARD_ID, 0, &d).expect("valid")
    }

    /// The next background load frame.
    pub fn load_frame(&mut self) -> Frame {
        let n = self.load;
        self.load += 1;
        Frame::new(LOAD_ID, 0, &n.to_be_bytes()).expect("valid")
    }

    /// Power went off: a powered-down ECU forgets transfers in progress.
    pub fn reset(&mut self) {
        self.rx = None;
        self.tx = None;
    }

    /// A frame from the bus; what the ECU sends in answer is appended to `out`.
    pub fn on_frame(&mut self, f: &Frame, out: &mut Vec<Frame>) {
        if f.is_error() {
            return;
        }
        let isotp = !f.is_extended() && !f.is_fd() && !f.is_rtr() && f.id == self.request_id;
        if !isotp {
            out.push(*f);
            return;
        }
        let d = f.data();
        let Some(&pci) = d.first() else {
            return;
        };
        match pci >> 4 {
            0 => {
                let len = usize::from(pci & 0xf);
                if len == 0 || len > 7 || d.len() < 1 + len {
                    return;
                }
                self.rx = None;
                let req = d[1..1 + len].to_vec();
                self.respond(req, out);
            }
            1 => {
                if d.len() < 8 {
                    return;
                }
                let want = (usize::from(pci & 0xf) << 8) | usize::from(d[1]);
                if want < 8 {
                    return;
                }
                self.rx = Some(Rx {
                    buf: d[2..8].to_vec(),
                    want,
                    next_sn: 1,
                });
                // Flow control: continue to send, no block limit, no separation time.
                out.push(padded(self.response_id, &[0x30, 0, 0]));
            }
            2 => {
                let Some(rx) = self.rx.as_mut() else {
                    return;
                };
                if pci & 0xf != rx.next_sn {
                    // Out of sequence: ISO 15765-2 aborts the reception.
                    self.rx = None;
                    return;
                }
                rx.next_sn = (rx.next_sn + 1) & 0xf;
                let take = (rx.want - rx.buf.len()).min(d.len() - 1);
                rx.buf.extend_from_slice(&d[1..1 + take]);
                if rx.buf.len() >= rx.want {
                    let req = std::mem::take(&mut rx.buf);
                    self.rx = None;
                    self.respond(req, out);
                }
            }
            3 => {
                let Some(tx) = self.tx.as_mut() else {
                    return;
                };
                if !tx.waiting_fc || d.len() < 3 {
                    return;
                }
                match pci & 0xf {
                    0 => {
                        tx.waiting_fc = false;
                        tx.block_left = u32::from(d[1]);
                        self.send_cfs(out);
                    }
                    1 => {}              // wait: the next flow control follows
                    _ => self.tx = None, // overflow: abort
                }
            }
            _ => {}
        }
    }

    fn respond(&mut self, mut msg: Vec<u8>, out: &mut Vec<Frame>) {
        msg[0] = msg[0].wrapping_add(0x40);
        if msg.len() <= 7 {
            let mut b = vec![msg.len() as u8];
            b.extend_from_slice(&msg);
            out.push(padded(self.response_id, &b));
            return;
        }
        let len = msg.len().min(MAX_ISOTP);
        let ff = [
            0x10 | ((len >> 8) as u8 & 0xf),
            (len & 0xff) as u8,
            msg[0],
            msg[1],
            msg[2],
            msg[3],
            msg[4],
            msg[5],
        ];
        out.push(padded(self.response_id, &ff));
        self.tx = Some(Tx {
            data: msg,
            pos: 6,
            next_sn: 1,
            block_left: 0,
            waiting_fc: true,
        });
    }

    fn send_cfs(&mut self, out: &mut Vec<Frame>) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        let limit = tx.block_left;
        let mut sent = 0;
        while tx.pos < tx.data.len() {
            let end = (tx.pos + 7).min(tx.data.len());
            let mut b = vec![0x20 | tx.next_sn];
            b.extend_from_slice(&tx.data[tx.pos..end]);
            out.push(padded(self.response_id, &b));
            tx.pos = end;
            tx.next_sn = (tx.next_sn + 1) & 0xf;
            sent += 1;
            if limit != 0 && sent == limit && tx.pos < tx.data.len() {
                tx.waiting_fc = true;
                return;
            }
        }
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ecu() -> SimEcu {
        SimEcu::new(0x100, 0x7e0, 0x7e8)
    }

    fn req(e: &mut SimEcu, bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        e.on_frame(&padded(0x7e0, bytes), &mut out);
        out
    }

    #[test]
    fn single_frame_request_gets_a_positive_response() {
        let mut e = ecu();
        let out = req(&mut e, &[0x02, 0x10, 0x03]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, 0x7e8);
        assert_eq!(&out[0].data()[..3], &[0x02, 0x50, 0x03]);
    }

    #[test]
    fn multi_frame_both_ways_in_order() {
        let mut e = ecu();
        let msg: Vec<u8> = (0..20u8).collect();
        // First frame: 20 bytes, first 6 of them.
        let out = req(&mut e, &[0x10, 20, 0, 1, 2, 3, 4, 5]);
        assert_eq!(&out[0].data()[..3], &[0x30, 0, 0], "flow control");
        assert!(req(&mut e, &[0x21, 6, 7, 8, 9, 10, 11, 12]).is_empty());
        let out = req(&mut e, &[0x22, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(out.len(), 1, "first frame of the response");
        assert_eq!(&out[0].data()[..4], &[0x10, 20, 0x40, 1]);
        // Flow control with block size 1: one CF, then wait for the next FC.
        let out = req(&mut e, &[0x30, 1, 0]);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].data()[..2], &[0x21, 6]);
        let out = req(&mut e, &[0x30, 0, 0]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data(), &[0x22, 13, 14, 15, 16, 17, 18, 19]);
        let _ = msg;
    }

    #[test]
    fn other_frames_are_mirrored_and_counters_count() {
        let mut e = ecu();
        let f = Frame::new(0x1234, jmp_protocol::kinds::can::EXTENDED, &[1, 2]).expect("valid");
        let mut out = Vec::new();
        e.on_frame(&f, &mut out);
        assert_eq!(out, vec![f]);
        assert_eq!(&e.counter_frame().data()[..4], &[0, 0, 0, 0]);
        assert_eq!(&e.counter_frame().data()[..4], &[0, 0, 0, 1]);
    }
}
