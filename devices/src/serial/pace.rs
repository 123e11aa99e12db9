//! Paced typing, done where the port is: the pauses are made between the exporter's own
//! writes to the port, so neither the network nor the client's scheduling can squeeze them
//! together again. And the simulated board's slow reader, which loses what arrives faster
//! than a bootloader polling its UART would take it.

use bytes::Bytes;
use jmp_protocol::kinds::serial::Pacing;
use std::time::{Duration, Instant};

/// The pause after `b`.
pub fn pause_after(p: &Pacing, b: u8) -> Duration {
    let line = if b == b'\r' || b == b'\n' {
        p.line_us
    } else {
        0
    };
    Duration::from_micros(u64::from(p.char_us) + u64::from(line))
}

/// Splits `data` into the runs written at once: each ends with a byte followed by a pause
/// (every byte when there is a per-character pause, else each line end), with that pause.
pub fn runs(p: &Pacing, data: &Bytes) -> Vec<(Bytes, Duration)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &b) in data.iter().enumerate() {
        let d = pause_after(p, b);
        if !d.is_zero() {
            out.push((data.slice(start..=i), d));
            start = i + 1;
        }
    }
    if start < data.len() {
        out.push((data.slice(start..), Duration::ZERO));
    }
    out
}

/// A bootloader reading its UART slowly: a receive FIFO of `fifo` bytes that the reader
/// empties one byte per `char_time`. What arrives while the FIFO is full is lost, as on the
/// real thing (U-Boot at a prompt, a shell that polls). Pure: the caller says what time it is.
#[derive(Debug, Clone)]
pub struct SlowReader {
    fifo: usize,
    char_time: Duration,
    /// When the reader will have taken everything accepted so far.
    busy_until: Option<Instant>,
    dropped: u64,
}

impl SlowReader {
    pub fn new(fifo: usize, char_time: Duration) -> SlowReader {
        SlowReader {
            fifo: fifo.max(1),
            char_time: char_time.max(Duration::from_nanos(1)),
            busy_until: None,
            dropped: 0,
        }
    }

    /// Bytes lost so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// What of `data`, arriving at `now` all at once, the FIFO takes (the rest is lost).
    pub fn accept(&mut self, now: Instant, data: &[u8]) -> Vec<u8> {
        let mut busy = self.busy_until.filter(|t| *t > now).unwrap_or(now);
        let waiting = |busy: Instant| {
            let ns = busy.duration_since(now).as_nanos();
            ns.div_ceil(self.char_time.as_nanos()) as usize
        };
        let mut out = Vec::with_capacity(data.len().min(self.fifo));
        for &b in data {
            if waiting(busy) < self.fifo {
                out.push(b);
                busy += self.char_time;
            } else {
                self.dropped += 1;
            }
        }
        self.busy_until = Some(busy);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_end_where_a_pause_follows() {
        let data = Bytes::from_static(b"ab\rcd");
        let lines = Pacing {
            char_us: 0,
            line_us: 5000,
        };
        let r = runs(&lines, &data);
        assert_eq!(
            r,
            vec![
                (Bytes::from_static(b"ab\r"), Duration::from_millis(5)),
                (Bytes::from_static(b"cd"), Duration::ZERO)
            ]
        );
        let chars = Pacing {
            char_us: 1000,
            line_us: 5000,
        };
        let r = runs(&chars, &data);
        assert_eq!(r.len(), 5);
        assert_eq!(r[2], (Bytes::from_static(b"\r"), Duration::from_millis(6)));
        assert!(r.iter().all(|(b, _)| b.len() == 1));
    }

    #[test]
    fn a_burst_overflows_the_fifo_and_paced_bytes_do_not() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut r = SlowReader::new(16, ms);
        let burst = [b'x'; 100];
        assert_eq!(r.accept(t0, &burst).len(), 16);
        assert_eq!(r.dropped(), 84);
        // Ten byte-times later ten places are free again.
        assert_eq!(r.accept(t0 + 10 * ms, &burst).len(), 10);

        let mut r = SlowReader::new(16, ms);
        let mut t = t0;
        for _ in 0..1000 {
            assert_eq!(r.accept(t, b"y").len(), 1);
            t += ms;
        }
        assert_eq!(r.dropped(), 0);
    }
}
