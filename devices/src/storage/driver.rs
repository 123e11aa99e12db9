//! Exporter side of a storage device: opens the medium, publishes its parameters, and serves
//! storage channels. Each request of a channel runs on its own blocking thread (`pread`,
//! `pwritev`, `fsync` block), so a slow one never holds up the others; answers go back in the
//! order they finish. The one exception: a small read the page cache holds entirely is
//! answered on the channel's task, without waiting on the device ([`INLINE_READ_MAX`]). A medium shared with the board (an SD-mux) refuses writes while the
//! board's power is on, and every power-on bumps the generation so clients drop their caches.
//!
//! **Budgets.** Before a request is read any further than its header, the channel takes what
//! it will hold from its session's budget ([`crate::budget`]): the bytes of its payload, read
//! buffer and answer (see [`cost`]), then a place for its job. The bytes are given back once
//! the answer has been handed to QUIC. While the budget is used up the channel reads nothing
//! more, so a client that sends reads and never reads the answers holds at most its share of
//! the exporter's memory, however many it sends or channels it opens. When the channel ends
//! (reset, its session gone) its jobs stop at their next chunk; a channel the client finished
//! cleanly still gets every answer.
//!
//! **Generations and writers.** A mount caches what it read; the generation tells it when
//! that may be stale. It moves (1) when a channel writes that is not the one that wrote last
//! (a flash beside a mount: the mount drops what it had), and (2) when such a channel's
//! writes are done, at its flush or its end, if another channel was open meanwhile (pages a
//! mount read *during* the flash may be old: they are dropped after its last write). The
//! change is sent on every channel before any answer that follows it, so the writer's own
//! flush answer comes after the generation that flush made: the writer knows which
//! generation a mount must have reached to show its data (`jmp storage flash` waits for the
//! local mounts to reach it, see jmp/src/storage.rs).

use super::medium::{Failure, Medium, CHUNK};
use crate::board::Board;
use crate::budget::{self, ChannelBudget, Held, Job};
use crate::{BoxFuture, Channel, DeviceStatus, Driver, Refusal};
use bytes::Bytes;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::storage::{
    frame, DeviceParams, DeviceRequest, DeviceResponse, FrameReader, Op, Request, Response,
    StorageError, MAX_IO,
};
use jmp_protocol::{ChannelMode, DeviceState, ErrorCode, Kind, Open};
use jmp_transport::{ChannelIo, PipeRx, PipeTx};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Answers of one channel queued for its writer. Each comes from a job holding a job place
/// until it is queued, so the queue holds at most the channel's jobs' worth.
const ANSWERS: usize = 64;

/// Least a request counts against the byte budget (its frame, its answer, bookkeeping), so
/// that requests without payload are bounded by bytes too.
const REQUEST_FLOOR: u64 = 4096;

/// What a request may hold at most while it is read, run and answered: the bytes taken from
/// the budget before its payload is read.
pub fn cost(op: &Op) -> usize {
    let b = match *op {
        Op::Read {
            len,
            compress: false,
            ..
        } => len,
        // The data and its compressed copy, both held while compressing.
        Op::Read {
            len,
            compress: true,
            ..
        } => 2 * len,
        Op::Write { len, .. } => len,
        // The payload, the payload joined into one buffer, the decompressed data.
        Op::WriteZstd { len, clen, .. } => 2 * clen + len,
        // One chunk's buffer (hashing, writing zeros where holes cannot be punched).
        Op::Zero { .. } | Op::Discard { .. } | Op::Hash { .. } => CHUNK as u64,
        Op::Flush => 0,
    };
    usize::try_from(b.saturating_add(REQUEST_FLOOR)).unwrap_or(usize::MAX)
}

/// Work that keeps a CPU busy for long.
fn heavy(op: &Op) -> bool {
    matches!(op, Op::Hash { .. })
}

/// A test hook: reads and writes overlapping this range take this long (how the "a slow
/// request does not stall the others" test makes one slow, and the flash progress test a slow
/// card).
#[derive(Debug, Clone, Copy)]
pub struct SlowRange {
    pub offset: u64,
    pub len: u64,
    pub delay: Duration,
}

/// Everything a driver and its channels share.
pub struct Inner {
    name: String,
    path: PathBuf,
    /// The config allows writing.
    writable: bool,
    /// Shared with the board: writes wait for its power to be off.
    board: Option<Board>,
    medium: Mutex<Option<Arc<Medium>>>,
    state: watch::Sender<DeviceStatus>,
    status: watch::Receiver<DeviceStatus>,
    slow: Option<SlowRange>,
    /// The channel that wrote last (0: none yet), and the counter naming channels (from 1).
    writer: AtomicU64,
    channels: AtomicU64,
    /// Channels being served now.
    open: AtomicU64,
}

/// The exporter's storage device (the `Driver`); its channels hold its [`Inner`].
pub struct StorageDriver(Arc<Inner>);

impl StorageDriver {
    /// A driver for `path`. `board`: the medium is shared with the board whose power it
    /// follows. Call inside a tokio runtime (it follows the board's power in a task).
    pub fn start(
        name: &str,
        path: PathBuf,
        writable: bool,
        board: Option<Board>,
        slow: Option<SlowRange>,
    ) -> StorageDriver {
        let (state, status) = watch::channel(DeviceStatus {
            state: DeviceState::Unavailable("not opened yet".into()),
            params: Bytes::new(),
        });
        let d = Arc::new(Inner {
            name: name.to_string(),
            path,
            writable,
            board,
            medium: Mutex::new(None),
            state,
            status,
            slow,
            writer: AtomicU64::new(0),
            channels: AtomicU64::new(1),
            open: AtomicU64::new(0),
        });
        let _ = d.medium();
        if let Some(board) = &d.board {
            let mut power = board.subscribe();
            let mut ons = power.borrow_and_update().ons;
            let weak = Arc::downgrade(&d);
            tokio::spawn(async move {
                while power.changed().await.is_ok() {
                    let now = *power.borrow_and_update();
                    let Some(d) = weak.upgrade() else { break };
                    // A cycle this task saw as one change was a power-on all the same: the
                    // board may have written the card.
                    d.power_changed(now.on, now.ons != ons);
                    ons = now.ons;
                }
            });
        }
        StorageDriver(d)
    }
}

impl Inner {
    fn params(&self) -> Option<DeviceParams> {
        DeviceParams::decode_exact(&self.status.borrow().params).ok()
    }

    fn power_changed(&self, on: bool, switched_on: bool) {
        self.state.send_modify(|st| {
            if let Ok(mut p) = DeviceParams::decode_exact(&st.params) {
                p.board_on = on;
                if switched_on {
                    // The board may write the card from now on: whatever a client cached is
                    // suspect.
                    p.generation += 1;
                }
                st.params = to_bytes(&p);
            }
        });
        info!(device = %self.name, on, "board power changed; writes {}", if on { "refused" } else { "accepted" });
    }

    /// The open medium, opened (again) if it is not: a card put back in its reader.
    fn medium(&self) -> Result<Arc<Medium>, Failure> {
        let mut g = self.medium.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = g.as_ref() {
            return Ok(m.clone());
        }
        match Medium::open(&self.path, self.writable) {
            Ok(m) => {
                if self.writable && !m.writable {
                    // Said once per open, not left for the first refused write to reveal.
                    warn!(
                        device = %self.name,
                        "{} is write-protected (a card's lock switch, a read-only device or \
                         file system): serving it read-only although the config says \
                         `writable: true`",
                        self.path.display()
                    );
                }
                let m = Arc::new(m);
                let generation = self.params().map_or(0, |p| p.generation);
                let p = DeviceParams {
                    size: m.size,
                    block_size: m.block_size,
                    writable: m.writable,
                    discard: true,
                    shared: self.board.is_some(),
                    board_on: self.board.as_ref().is_some_and(|b| b.powered()),
                    generation,
                };
                self.state
                    .send_replace(DeviceStatus::available(to_bytes(&p)));
                *g = Some(m.clone());
                Ok(m)
            }
            Err(e) => {
                let why = format!("cannot open {}: {e}", self.path.display());
                warn!(device = %self.name, "{why}");
                self.state.send_replace(DeviceStatus {
                    state: DeviceState::Unavailable(why.clone()),
                    params: Bytes::new(),
                });
                Err(Failure::new(StorageError::Gone, why))
            }
        }
    }

    /// Forgets the medium after it reported itself gone, so the next open tries again.
    fn lost(&self, f: &Failure) {
        if f.error == StorageError::Gone {
            *self.medium.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.state.send_replace(DeviceStatus {
                state: DeviceState::Unavailable(f.message.clone()),
                params: Bytes::new(),
            });
        }
    }

    /// Refuses a write while the board holds the medium or the config forbids writing.
    fn may_write(&self) -> Result<(), Failure> {
        let p = self.params().unwrap_or_default();
        if !self.writable {
            return Err(Failure::new(
                StorageError::ReadOnly,
                format!(
                    "{}: read-only (the exporter's config does not say `writable: true`)",
                    self.name
                ),
            ));
        }
        if !p.writable {
            return Err(Failure::new(
                StorageError::ReadOnly,
                format!(
                    "{}: {} is write-protected on the lab host (a card's lock switch, a \
                     read-only device or file system)",
                    self.name,
                    self.path.display()
                ),
            ));
        }
        if p.shared && p.board_on {
            return Err(Failure::new(
                StorageError::BoardHolds,
                format!(
                    "{}: the board's power is on and the medium is shared with it (sharedWithBoard); switch the board off first",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Moves the generation: whatever a client cached may be stale. Every channel hears it
    /// (a `changed` frame) before any answer sent after this returns.
    fn bump(&self) {
        self.state.send_modify(|st| {
            if let Ok(mut p) = DeviceParams::decode_exact(&st.params) {
                p.generation += 1;
                st.params = to_bytes(&p);
            }
        });
    }

    /// Channel `ch` is about to write: if it is not the one that wrote last, what others
    /// cached may go stale, so the generation moves (a flash beside a mount). This holds even
    /// when no other channel is open now: a mount whose link is down comes back to a
    /// generation it has not seen, and drops its cache. A writer that stays the writer keeps
    /// everyone's cache (a lone mount's own writes go through its cache).
    fn writing(&self, ch: &Writes) {
        if self.open.load(Ordering::Relaxed) > 1 {
            ch.beside_others.store(true, Ordering::Relaxed);
        }
        let prev = self.writer.swap(ch.id, Ordering::Relaxed);
        if prev != ch.id {
            self.bump();
        }
    }

    /// Channel `ch`'s writes so far are done (it flushed, or it ended): if another channel was
    /// open while it wrote, that one may have read (and cached) old data after the bump of
    /// the first write, so the generation moves again, after the last write.
    fn writes_done(&self, ch: &Writes) {
        let dirty = ch.dirty.swap(false, Ordering::AcqRel);
        let others =
            ch.beside_others.swap(false, Ordering::AcqRel) || self.open.load(Ordering::Relaxed) > 1;
        if dirty && others {
            self.bump();
        }
    }

    fn run(
        &self,
        ch: &Writes,
        m: &Medium,
        op: Op,
        payload: Vec<Bytes>,
        job: &Job,
    ) -> Result<(Response, Option<Bytes>), Failure> {
        let write = matches!(
            op,
            Op::Write { .. } | Op::WriteZstd { .. } | Op::Zero { .. } | Op::Discard { .. }
        );
        if write {
            self.may_write()?;
            self.writing(ch);
        }
        let r = self.execute(m, op, payload, job);
        if write {
            // Marked after the write (whatever its outcome: a failed write may have written
            // part): a write still running when a flush finishes is covered by the next
            // flush or the channel's end.
            ch.dirty.store(true, Ordering::Release);
        }
        if matches!(op, Op::Flush) && r.is_ok() {
            self.writes_done(ch);
        }
        r
    }

    /// The test hook [`SlowRange`]: a request overlapping it waits first.
    fn slow_down(&self, offset: u64, len: u64) {
        if let Some(s) = self.slow {
            if offset < s.offset + s.len && s.offset < offset + len {
                std::thread::sleep(s.delay);
            }
        }
    }

    fn execute(
        &self,
        m: &Medium,
        op: Op,
        payload: Vec<Bytes>,
        job: &Job,
    ) -> Result<(Response, Option<Bytes>), Failure> {
        let ok = Response::Ok { id: 0 };
        match op {
            Op::Read {
                offset,
                len,
                compress,
            } => {
                self.slow_down(offset, len);
                let data = m.read(offset, len as usize, job)?;
                if compress {
                    if let Ok(z) = zstd::bulk::compress(&data, 1) {
                        if z.len() < data.len() {
                            return Ok((
                                Response::DataZstd {
                                    id: 0,
                                    len,
                                    clen: z.len() as u64,
                                },
                                Some(Bytes::from(z)),
                            ));
                        }
                    }
                }
                Ok((Response::Data { id: 0, len }, Some(data)))
            }
            Op::Write { offset, len } => {
                self.slow_down(offset, len);
                m.write(offset, &payload, job)?;
                Ok((ok, None))
            }
            Op::WriteZstd { offset, len, .. } => {
                self.slow_down(offset, len);
                let z: Vec<u8> = payload.concat();
                let data = zstd::bulk::decompress(&z, len as usize).map_err(|e| {
                    Failure::new(
                        StorageError::BadData,
                        format!(
                            "{}: a compressed write at {offset} does not decompress: {e}",
                            self.name
                        ),
                    )
                })?;
                if data.len() as u64 != len {
                    return Err(Failure::new(
                        StorageError::BadData,
                        format!(
                            "{}: a compressed write at {offset} holds {} bytes, not the {len} it claims",
                            self.name,
                            data.len()
                        ),
                    ));
                }
                m.write(offset, &[Bytes::from(data)], job)?;
                Ok((ok, None))
            }
            Op::Zero { offset, len } => {
                m.zero(offset, len, job)?;
                Ok((ok, None))
            }
            Op::Discard { offset, len } => {
                m.discard(offset, len, job)?;
                Ok((ok, None))
            }
            Op::Flush => {
                m.flush()?;
                Ok((ok, None))
            }
            Op::Hash { offset, len } => Ok((
                Response::Hash {
                    id: 0,
                    sha256: m.hash(offset, len, job)?,
                },
                None,
            )),
        }
    }
}

fn with_id(r: Response, id: u64) -> Response {
    match r {
        Response::Ok { .. } => Response::Ok { id },
        Response::Data { len, .. } => Response::Data { id, len },
        Response::DataZstd { len, clen, .. } => Response::DataZstd { id, len, clen },
        Response::Hash { sha256, .. } => Response::Hash { id, sha256 },
        Response::Error { error, message, .. } => Response::Error { id, error, message },
        c @ Response::Changed(_) => c,
    }
}

impl Driver for StorageDriver {
    // Everything reads the shared state; channels get their own `Arc` of it.
    fn name(&self) -> &str {
        &self.0.name
    }

    fn kind(&self) -> Kind {
        Kind::Storage
    }

    fn detail(&self) -> String {
        let p = self.0.params();
        let size = p
            .map(|p| format!(" {} MiB", p.size >> 20))
            .unwrap_or_default();
        let rw = match p {
            Some(p) if p.writable => "",
            _ => " read-only",
        };
        let shared = if self.0.board.is_some() {
            " shared with the board"
        } else {
            ""
        };
        format!("{}{size}{rw}{shared}", self.0.path.display())
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.0.status.clone()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[ChannelMode::Stream]
    }

    fn open<'a>(&'a self, _req: &'a Open) -> BoxFuture<'a, Result<Box<dyn Channel>, Refusal>> {
        Box::pin(async move {
            let medium = self
                .0
                .medium()
                .map_err(|f| Refusal::new(ErrorCode::DeviceUnavailable, f.message))?;
            Ok(Box::new(StorageChannel {
                writes: Arc::new(Writes {
                    id: self.0.channels.fetch_add(1, Ordering::Relaxed),
                    ..Writes::default()
                }),
                driver: self.0.clone(),
                medium,
            }) as Box<dyn Channel>)
        })
    }

    fn request<'a>(&'a self, body: Bytes) -> BoxFuture<'a, Result<Bytes, Refusal>> {
        Box::pin(async move {
            let req = DeviceRequest::decode_exact(&body).map_err(|e| {
                Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: bad request: {e}", self.0.name),
                )
            })?;
            let medium = self
                .0
                .medium()
                .map_err(|f| Refusal::new(ErrorCode::DeviceUnavailable, f.message))?;
            let resp = match req {
                DeviceRequest::Info => DeviceResponse::Info(self.0.params().unwrap_or_default()),
                DeviceRequest::Hash { offset, len } => {
                    // A request is budgeted like a channel of its session; the guard stops the
                    // hash when this future is dropped (the session ended).
                    let budget = budget::current().channel();
                    let held = budget.bytes(cost(&Op::Hash { offset, len })).await;
                    let slot = budget.job(true).await;
                    let (job, _stop) = budget.jobs();
                    let r = tokio::task::spawn_blocking(move || {
                        let r = medium.hash(offset, len, &job);
                        drop((slot, held));
                        r
                    })
                    .await
                    .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
                    DeviceResponse::Hash {
                        sha256: r.map_err(|f| Refusal::new(ErrorCode::Failed, f.message))?,
                    }
                }
            };
            Ok(to_bytes(&resp))
        })
    }
}

struct StorageChannel {
    writes: Arc<Writes>,
    driver: Arc<Inner>,
    medium: Arc<Medium>,
}

/// Reads up to this size that the page cache holds are answered on the channel's own task
/// ([`Medium::read_cached`]): copying them costs less than the two thread hand-offs of a
/// blocking job (a 4 KiB random read's round trip), and little enough not to hold up the
/// runtime's other tasks (a console). Larger reads, and misses, run as jobs.
const INLINE_READ_MAX: u64 = 64 << 10;

impl StorageChannel {
    /// The data of `op` if it is a small plain read the page cache can answer at once.
    fn cached_read(&self, op: &Op, job: &Job) -> Option<Bytes> {
        match *op {
            Op::Read {
                offset,
                len,
                compress: false,
            } if len <= INLINE_READ_MAX && self.driver.slow.is_none() && !job.stopped() => {
                self.medium.read_cached(offset, len as usize)
            }
            _ => None,
        }
    }
}

/// One channel's writing, as the generation rules need it (see the module's doc).
#[derive(Debug, Default)]
struct Writes {
    id: u64,
    /// It wrote since its last flush.
    dirty: AtomicBool,
    /// Another channel was open at one of those writes.
    beside_others: AtomicBool,
}

impl Channel for StorageChannel {
    fn params(&self) -> Bytes {
        self.driver.status.borrow().params.clone()
    }

    fn serve(self: Box<Self>, io: ChannelIo) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ChannelIo::Stream(pipe) = io else { return };
            self.driver.open.fetch_add(1, Ordering::Relaxed);
            let _open = OpenGuard(self.driver.clone(), self.writes.clone());
            let budget = budget::current().channel();
            // Dropped when this future ends however it ends (finished, reset, aborted with
            // its session): the channel's jobs stop at their next chunk.
            let (job, _stop) = budget.jobs();
            let (tx, rx) = pipe.split();
            let (out, outq) = mpsc::channel::<Answer>(ANSWERS);
            let writer = write_responses(tx, outq, self.driver.status.clone());
            tokio::pin!(writer);
            let name = self.driver.name.clone();
            let reader = read_requests(&self, rx, &budget, &job, out);
            tokio::select! {
                finished = reader => {
                    if finished {
                        // The client finished cleanly: the answers of requests still running
                        // go out before the channel ends.
                        writer.await;
                    }
                }
                // The writer ended first: the client stopped reading or the stream is gone.
                () = &mut writer => debug!(device = %name, "storage channel's answers cannot be sent; stopping"),
            }
        })
    }
}

/// An answer ready to send, with the budget its request held, given back once it is sent.
struct Answer {
    resp: Response,
    data: Option<Bytes>,
    held: Held,
}

/// Reads requests and starts a job for each, within the channel's budget. True when the
/// client finished the stream cleanly; false when it broke off (reset, bad frame, lost
/// connection), and the jobs should stop.
async fn read_requests(
    ch: &StorageChannel,
    mut rx: PipeRx,
    budget: &ChannelBudget,
    job: &Job,
    out: mpsc::Sender<Answer>,
) -> bool {
    let name = &ch.driver.name;
    let mut reader = FrameReader::<Request>::new();
    // The budget taken for the frame whose header has arrived and whose payload is still
    // coming: taken before reading any of that payload.
    let mut taken: Option<Held> = None;
    loop {
        loop {
            let (req, payload) = match reader.next_frame() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if let (None, Some(req)) = (&taken, reader.pending()) {
                        taken = Some(budget.bytes(cost(&req.op)).await);
                    }
                    break;
                }
                Err(e) => {
                    warn!(device = %name, "bad storage request, closing the channel: {e}");
                    return false;
                }
            };
            let held = match taken.take() {
                Some(h) => h,
                None => budget.bytes(cost(&req.op)).await,
            };
            let slot = budget.job(heavy(&req.op)).await;
            if let Some(data) = ch.cached_read(&req.op, job) {
                let len = data.len() as u64;
                let answer = Answer {
                    resp: Response::Data { id: req.id, len },
                    data: Some(data),
                    held,
                };
                // Waiting here for room in the answer queue holds off reading further
                // requests, as a job waiting in `blocking_send` would hold its place.
                if out.send(answer).await.is_err() {
                    return false;
                }
                drop(slot);
                continue;
            }
            let driver = ch.driver.clone();
            let medium = ch.medium.clone();
            let out = out.clone();
            let writes = ch.writes.clone();
            let job = job.clone();
            tokio::task::spawn_blocking(move || {
                if job.stopped() {
                    return;
                }
                let (resp, data) = match driver.run(&writes, &medium, req.op, payload, &job) {
                    Ok((r, data)) => (with_id(r, req.id), data),
                    Err(f) => {
                        driver.lost(&f);
                        (
                            Response::Error {
                                id: req.id,
                                error: f.error,
                                message: f.message,
                            },
                            None,
                        )
                    }
                };
                // The job's place is given back only once its answer is queued, so threads
                // waiting for room in the queue are counted among the channel's jobs.
                let _ = out.blocking_send(Answer {
                    resp,
                    data,
                    held,
                });
                drop(slot);
            });
        }
        match rx.recv().await {
            Ok(Some(c)) => reader.push(c),
            Ok(None) => return true,
            Err(e) => {
                debug!(device = %name, "storage channel ended: {e}");
                return false;
            }
        }
    }
}

/// Counts a channel as open while it is served; at its end, writes it never flushed count
/// as done (a flash killed halfway still moves the generation after its last write).
struct OpenGuard(Arc<Inner>, Arc<Writes>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        // Before the count drops: `writes_done` counts this channel among the open ones.
        self.0.writes_done(&self.1);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes answers as they finish, and a `changed` frame whenever the device's parameters
/// change (power switched, the generation moved), until every sender is gone. A change made
/// before an answer was queued goes out before that answer: a flush's answer follows the
/// generation the flush made (the writer relies on it, see the module's doc).
async fn write_responses(
    mut tx: PipeTx,
    mut q: mpsc::Receiver<Answer>,
    mut status: watch::Receiver<DeviceStatus>,
) {
    // Megabytes of read answers must not hold back console output on the same connection.
    tx.set_priority(jmp_transport::PRIORITY_BULK);
    status.borrow_and_update();
    let mut watching = true;
    loop {
        let answer = tokio::select! {
            r = q.recv() => match r {
                Some(r) => Some(r),
                None => break,
            },
            c = status.changed(), if watching => {
                if c.is_err() {
                    watching = false;
                    continue;
                }
                None
            }
        };
        // Checked for an answer too: `select!` may pick the answer although the change that
        // happened before it is also ready.
        if (watching && status.has_changed().unwrap_or(false)) || answer.is_none() {
            let st = status.borrow_and_update().clone();
            if let Ok(p) = DeviceParams::decode_exact(&st.params) {
                if tx.send(frame(&Response::Changed(p))).await.is_err() {
                    return;
                }
            }
        }
        let Some(a) = answer else { continue };
        debug_assert!(a.data.as_ref().is_none_or(|d| d.len() as u64 <= MAX_IO));
        if tx.send(frame(&a.resp)).await.is_err() {
            return;
        }
        if let Some(d) = a.data {
            if tx.send(d).await.is_err() {
                return;
            }
        }
        // Handed to QUIC (whose own buffers are bounded by its windows): the budget the
        // request held is free again.
        drop(a.held);
    }
    let _ = tx.finish();
}
