//! The console history: every byte a serial device printed gets an offset (counted since the
//! exporter started); the last `capacity` bytes are kept so that a client attaching late, or
//! coming back after a network blip, gets what it missed.
//!
//! The device's reader is the only writer; channels read from their own offset and wait on the
//! end offset. A live channel holds a [`Cursor`]: the reader does not overwrite bytes a cursor
//! has not passed yet, it waits ([`History::wait_room`]) and so leaves the device's output in
//! the device (a pty's or UART driver's buffer, hardware flow control) — a slow client slows
//! the console down instead of losing bytes. Without a live channel the reader never waits; a
//! client coming back later resumes from what is still kept, and learns how much it lost.
//!
//! Each push is stamped with when it was read from the device (microseconds on a monotonic
//! clock since the history began): a timed channel sends each chunk with its stamp, so a
//! recording shows the board's own rhythm even for output replayed long after it was printed.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Notify};

pub const DEFAULT_CAPACITY: usize = 64 * 1024;
/// Most stamps kept: the oldest go first, and the bytes they covered take the time of the next
/// stamp kept (a little late, never early). A device printing in tiny pieces cannot make the
/// history hold more than this many.
pub const MAX_STAMPS: usize = 4096;

pub struct History {
    ring: Mutex<Ring>,
    end: watch::Sender<u64>,
    /// Live channels' positions: bytes before the smallest are sent.
    cursors: Mutex<HashMap<u64, u64>>,
    next_cursor: AtomicU64,
    /// Woken when a cursor moves or goes away.
    room: Notify,
    /// Where the stamps' clock starts.
    epoch: std::time::Instant,
}

/// A live channel's position in the history; dropping it releases the reader.
pub struct Cursor {
    history: Arc<History>,
    id: u64,
}

impl Cursor {
    /// Everything before `offset` has been sent.
    pub fn advance(&self, offset: u64) {
        self.history.lock_cursors().insert(self.id, offset);
        self.history.room.notify_waiters();
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.history.lock_cursors().remove(&self.id);
        self.history.room.notify_waiters();
    }
}

struct Ring {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]`.
    start: u64,
    capacity: usize,
    /// (offset of a push's first byte, when it was read), offsets and times ascending; at
    /// most [`MAX_STAMPS`].
    stamps: VecDeque<(u64, u64)>,
}

impl Ring {
    /// The time of the byte at `offset` and the offset where the next stamp begins (`None`:
    /// the last stamp's bytes run to the end).
    fn stamp_at(&self, offset: u64) -> (u64, Option<u64>) {
        let i = self.stamps.partition_point(|(o, _)| *o <= offset);
        match i {
            // Older than every stamp kept: the oldest one's time (see MAX_STAMPS).
            0 => (
                self.stamps.front().map_or(0, |s| s.1),
                self.stamps.front().map(|s| s.0),
            ),
            i => (self.stamps[i - 1].1, self.stamps.get(i).map(|s| s.0)),
        }
    }
}

/// What [`History::read`] found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    /// Offset of `data[0]`: larger than asked for when the asked-for bytes were already dropped.
    pub offset: u64,
    pub data: Bytes,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        History {
            ring: Mutex::new(Ring {
                buf: VecDeque::with_capacity(capacity.min(1 << 20)),
                start: 0,
                capacity: capacity.max(1),
                stamps: VecDeque::new(),
            }),
            end: watch::channel(0).0,
            cursors: Mutex::new(HashMap::new()),
            next_cursor: AtomicU64::new(0),
            room: Notify::new(),
            epoch: std::time::Instant::now(),
        }
    }

    /// Now on the stamps' clock.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn lock_cursors(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.cursors.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// Registers a live channel at `offset`.
    pub fn cursor(self: &Arc<Self>, offset: u64) -> Cursor {
        let id = self.next_cursor.fetch_add(1, Ordering::Relaxed);
        self.lock_cursors().insert(id, offset);
        Cursor {
            history: self.clone(),
            id,
        }
    }

    /// Whether `n` more bytes can be pushed without dropping bytes a live channel still needs.
    pub fn has_room(&self, n: usize) -> bool {
        let Some(min) = self.lock_cursors().values().min().copied() else {
            return true;
        };
        // Bytes before the start are gone already (dropped, or forgotten for a new holder):
        // a cursor behind it holds nothing back.
        let min = min.max(self.start());
        let end = self.end();
        let cap = self.capacity() as u64;
        end.saturating_sub(min) + n as u64 <= cap
    }

    /// Waits until [`History::has_room`] for `n` bytes.
    pub async fn wait_room(&self, n: usize) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room(n) {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A poisoned lock only means a panic elsewhere mid-copy; the ring is still consistent
        // enough to serve bytes (worst case a few garbled ones), better than a dead console.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends what the device printed just now.
    pub fn push(&self, data: &[u8]) {
        self.push_at(data, self.now_us())
    }

    /// Appends what the device printed at `time_us` (on [`History::now_us`]'s clock; a time
    /// before the last push's counts as that one's, so times never go back).
    pub fn push_at(&self, data: &[u8], time_us: u64) {
        if data.is_empty() {
            return;
        }
        let end = {
            let mut r = self.lock();
            let at = r.start + r.buf.len() as u64;
            let time_us = r.stamps.back().map_or(time_us, |s| s.1.max(time_us));
            r.stamps.push_back((at, time_us));
            if r.stamps.len() > MAX_STAMPS {
                r.stamps.pop_front();
            }
            let cap = r.capacity;
            // Keep only what fits; drop the oldest first.
            let (dropped, data) = if data.len() > cap {
                (data.len() - cap, &data[data.len() - cap..])
            } else {
                (0, data)
            };
            // Bytes too old to keep still count: clear the ring and advance past them.
            if dropped > 0 {
                let n = r.buf.len();
                r.buf.clear();
                r.start += (n + dropped) as u64;
            }
            let overflow = (r.buf.len() + data.len()).saturating_sub(cap);
            r.buf.drain(..overflow);
            r.start += overflow as u64;
            r.buf.extend(data);
            // Stamps wholly before the start cover nothing kept.
            let start = r.start;
            while r.stamps.len() > 1 && r.stamps[1].0 <= start {
                r.stamps.pop_front();
            }
            r.start + r.buf.len() as u64
        };
        // Offsets count every byte, also the ones too old to keep.
        self.end.send_replace(end);
    }

    /// Drops everything kept: a new holder of the board must not be shown what was printed
    /// for the one before. Offsets go on (the next byte printed is at [`History::end`]); a
    /// channel still reading older bytes continues from here.
    pub fn forget(&self) {
        let mut r = self.lock();
        let end = r.start + r.buf.len() as u64;
        r.buf.clear();
        r.start = end;
        r.stamps.clear();
        drop(r);
        // Cursors behind the new start count as having sent everything before it.
        self.room.notify_waiters();
    }

    /// Offset one past the last byte printed.
    pub fn end(&self) -> u64 {
        *self.end.borrow()
    }

    /// Offset of the oldest byte still kept.
    pub fn start(&self) -> u64 {
        self.lock().start
    }

    /// Up to `max` bytes from `offset` (or from the oldest kept byte, if `offset` is older).
    /// Empty when `offset` is at the end.
    pub fn read(&self, offset: u64, max: usize) -> Read {
        self.lock().read(offset, max)
    }

    /// Like [`History::read`], but only bytes read from the device together (one stamp), and
    /// when that was. One lock: the stamp and the bytes are of the same moment.
    pub fn read_timed(&self, offset: u64, max: usize) -> (Read, u64) {
        let r = self.lock();
        let from = offset.max(r.start);
        let (time, next) = r.stamp_at(from);
        let max = next.map_or(max, |n| max.min(usize::try_from(n - from).unwrap_or(max)));
        (r.read(from, max.max(1)), time)
    }

    /// Wakes when the end moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }
}

impl Ring {
    fn read(&self, offset: u64, max: usize) -> Read {
        let r = self;
        let from = offset.max(r.start);
        let end = r.start + r.buf.len() as u64;
        if from >= end {
            return Read {
                offset: from.min(end),
                data: Bytes::new(),
            };
        }
        let skip = (from - r.start) as usize;
        let n = (r.buf.len() - skip).min(max);
        let (a, b) = r.buf.as_slices();
        let mut out = Vec::with_capacity(n);
        if skip < a.len() {
            let take = (a.len() - skip).min(n);
            out.extend_from_slice(&a[skip..skip + take]);
            out.extend_from_slice(&b[..n - take]);
        } else {
            let s = skip - a.len();
            out.extend_from_slice(&b[s..s + n]);
        }
        Read {
            offset: from,
            data: Bytes::from(out),
        }
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_from_offsets_and_skips_what_was_dropped() {
        let h = History::new(8);
        h.push(b"abcdef");
        assert_eq!(h.end(), 6);
        assert_eq!(h.read(0, 100).data, Bytes::from_static(b"abcdef"));
        assert_eq!(h.read(4, 100).data, Bytes::from_static(b"ef"));
        assert_eq!(h.read(6, 100).data, Bytes::new());
        h.push(b"ghijk"); // 11 bytes printed, 8 kept: "defghijk"
        assert_eq!(h.end(), 11);
        assert_eq!(h.start(), 3);
        let r = h.read(1, 100);
        assert_eq!(r.offset, 3, "offsets 1..3 were lost");
        assert_eq!(r.data, Bytes::from_static(b"defghijk"));
        let r = h.read(5, 3);
        assert_eq!((r.offset, r.data), (5, Bytes::from_static(b"fgh")));
        // A push larger than the capacity keeps its tail and still counts every byte.
        h.push(b"0123456789");
        assert_eq!(h.end(), 21);
        assert_eq!(h.read(0, 100).data, Bytes::from_static(b"23456789"));
        assert_eq!(h.read(0, 100).offset, 13);
    }

    #[test]
    fn forgotten_bytes_are_never_read_again_and_offsets_go_on() {
        let h = History::new(64);
        h.push(b"team A's login");
        h.forget();
        assert_eq!((h.start(), h.end()), (14, 14));
        let r = h.read(0, 100);
        assert_eq!((r.offset, r.data), (14, Bytes::new()), "nothing before the new start");
        h.push(b"B");
        assert_eq!(h.read(0, 100).data, Bytes::from_static(b"B"));
        assert_eq!(h.read(0, 100).offset, 14);
    }

    #[test]
    fn wraparound_reads_are_contiguous() {
        let h = History::new(5);
        for chunk in [&b"ab"[..], b"cd", b"ef", b"gh", b"ij"] {
            h.push(chunk);
        }
        assert_eq!(h.read(0, 100).data, Bytes::from_static(b"fghij"));
        assert_eq!(h.read(7, 2).data, Bytes::from_static(b"hi"));
    }

    #[tokio::test]
    async fn live_cursors_hold_the_reader_back() {
        let h = std::sync::Arc::new(History::new(8));
        assert!(h.has_room(100), "no live channel: never wait");
        let c = h.cursor(0);
        h.push(b"abcdef");
        assert!(h.has_room(2));
        assert!(
            !h.has_room(3),
            "would overwrite bytes the channel has not sent"
        );
        let h2 = h.clone();
        let waiter = tokio::spawn(async move { h2.wait_room(3).await });
        c.advance(4);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken by the cursor moving")
            .expect("task");
        drop(c);
        assert!(h.has_room(1000));
    }

    #[test]
    fn timed_reads_keep_each_push_with_its_time() {
        let h = History::new(16);
        h.push_at(b"abc", 10);
        h.push_at(b"de", 20);
        h.push_at(b"f", 15); // earlier than the last: counts as 20
        let (r, t) = h.read_timed(0, 100);
        assert_eq!((r.offset, r.data.as_ref(), t), (0, &b"abc"[..], 10));
        let (r, t) = h.read_timed(1, 100);
        assert_eq!((r.data.as_ref(), t), (&b"bc"[..], 10));
        let (r, t) = h.read_timed(3, 100);
        assert_eq!((r.data.as_ref(), t), (&b"de"[..], 20));
        let (r, t) = h.read_timed(5, 100);
        assert_eq!((r.data.as_ref(), t), (&b"f"[..], 20));
        let (r, _) = h.read_timed(3, 1);
        assert_eq!(r.data.as_ref(), b"d", "max still applies");
        // Dropped bytes take their stamps with them.
        h.push_at(&[b'x'; 14], 30); // 20 printed, 16 kept: from offset 4
        let (r, t) = h.read_timed(0, 100);
        assert_eq!((r.offset, r.data.as_ref(), t), (4, &b"e"[..], 20));
        let (r, t) = h.read_timed(6, 100);
        assert_eq!((r.data.len(), t), (14, 30));
        h.forget();
        h.push_at(b"new", 40);
        assert_eq!(h.read_timed(0, 100).1, 40);
    }

    #[test]
    fn stamps_are_bounded_and_never_early() {
        let h = History::new(1 << 20);
        for i in 0..(MAX_STAMPS as u64 + 100) {
            h.push_at(b"x", 1000 + i);
        }
        assert_eq!(h.lock().stamps.len(), MAX_STAMPS);
        // The first 100 bytes lost their own stamps: they take the oldest kept (later) time.
        let (r, t) = h.read_timed(0, 1000);
        assert_eq!((r.data.len(), t), (100, 1100));
    }

    #[tokio::test]
    async fn subscribers_wake_on_new_output() {
        let h = std::sync::Arc::new(History::new(64));
        let mut rx = h.subscribe();
        let h2 = h.clone();
        tokio::spawn(async move { h2.push(b"x") });
        rx.changed().await.expect("sender alive");
        assert_eq!(*rx.borrow(), 1);
    }
}
