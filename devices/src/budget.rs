//! Budgets: what one session (a client's connection to the exporter) may make the exporter hold,
//! and how work a session started ends with it.
//!
//! The exporter serves each session's channels and requests inside [`scope`] (see
//! [`crate::serve::SessionScope`]). A driver that holds memory for the client (a storage read's
//! buffer, a write's payload, an answer not yet handed to QUIC) or runs blocking work takes its
//! share from [`current`] before it reads the next request, and waits while the share is used
//! up: the channel stops reading, QUIC flow control stops the client, and nothing fails. Every
//! share is taken from the channel's budget and from its session's, so one channel cannot take
//! a whole session's, and a session cannot multiply its share by opening channels.
//!
//! Blocking work cannot be aborted from outside: it checks its [`Job`] between chunks and stops
//! when whoever asked for it is gone. The flag is set by a [`StopOnDrop`] that the asking
//! future owns (a channel's task, a request's task), so it is set however that future ends:
//! returning, its channel reset, or its session's tasks aborted when the session ends.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How much one session may make the exporter hold. docs/architecture.md ("Budgets") states
/// the memory bound these give; change both together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes all channels and requests of a session may hold at once (request payloads, read
    /// buffers, answers waiting for the client).
    pub session_bytes: usize,
    /// Bytes one channel may hold of those.
    pub channel_bytes: usize,
    /// Blocking jobs (a storage read, write, hash) a session may run at once.
    pub session_jobs: usize,
    /// Blocking jobs one channel may run at once.
    pub channel_jobs: usize,
    /// Jobs that keep a CPU busy for long (hashes over a whole medium) a session may run at
    /// once, out of its jobs.
    pub session_heavy: usize,
    /// Channels a session may have served at once; more wait until one ends.
    pub channels: usize,
}

/// The limits jmpd applies to every session.
pub const LIMITS: Limits = Limits {
    session_bytes: 64 << 20,
    channel_bytes: 32 << 20,
    session_jobs: 32,
    channel_jobs: 32,
    session_heavy: 2,
    channels: 256,
};

/// What the budgets of all sessions hold now, and the work done under them (for the
/// exporter's metrics, and for tests that must see work stop without timing it).
#[derive(Debug, Default)]
pub struct Usage {
    /// Bytes held under budgets now.
    pub bytes: AtomicU64,
    /// Blocking jobs running now.
    pub jobs: AtomicU64,
    /// Bytes blocking jobs have read, written or hashed, in all (their progress).
    pub job_bytes: AtomicU64,
    /// Channels served now.
    pub channels: AtomicU64,
    /// Channel opens waiting for their session's channel budget now.
    pub waiting_channels: AtomicU64,
}

impl Usage {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One session's budget. Cheap to share (`Arc`); each channel and request takes a
/// [`ChannelBudget`] of it.
#[derive(Debug)]
pub struct SessionBudget {
    limits: Limits,
    bytes: Arc<Semaphore>,
    jobs: Arc<Semaphore>,
    heavy: Arc<Semaphore>,
    channels: Arc<Semaphore>,
    usage: Arc<Usage>,
}

/// A permit semaphore of `n` units (Tokio's limit is far above any budget here).
fn units(n: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)))
}

impl SessionBudget {
    pub fn new(limits: Limits, usage: Arc<Usage>) -> Arc<Self> {
        Arc::new(SessionBudget {
            limits,
            bytes: units(limits.session_bytes),
            jobs: units(limits.session_jobs),
            heavy: units(limits.session_heavy),
            channels: units(limits.channels),
            usage,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    /// A budget for one channel (or one request) of this session.
    pub fn channel(self: &Arc<Self>) -> ChannelBudget {
        ChannelBudget {
            session: self.clone(),
            bytes: units(self.limits.channel_bytes),
            jobs: units(self.limits.channel_jobs),
        }
    }

    /// A place among the session's served channels; waits while all are taken.
    pub async fn channel_slot(&self) -> ChannelSlot {
        Usage::add(&self.usage.waiting_channels, 1);
        let waiting = Counted(&self.usage.waiting_channels, 1);
        // The semaphore is never closed: acquiring fails only if it were.
        let permit = self.channels.clone().acquire_owned().await.ok();
        drop(waiting);
        Usage::add(&self.usage.channels, 1);
        ChannelSlot {
            _permit: permit,
            usage: self.usage.clone(),
        }
    }
}

/// Subtracts `n` from a counter when dropped (a wait that may be cancelled).
struct Counted<'a>(&'a AtomicU64, u64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        Usage::sub(self.0, self.1);
    }
}

/// A served channel's place in its session's channel budget.
#[derive(Debug)]
pub struct ChannelSlot {
    _permit: Option<OwnedSemaphorePermit>,
    usage: Arc<Usage>,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        Usage::sub(&self.usage.channels, 1);
    }
}

/// One channel's (or request's) budget inside its session's.
#[derive(Debug)]
pub struct ChannelBudget {
    session: Arc<SessionBudget>,
    bytes: Arc<Semaphore>,
    jobs: Arc<Semaphore>,
}

/// Bytes taken from a channel's and its session's budgets; given back when dropped.
#[derive(Debug)]
pub struct Held {
    _channel: Option<OwnedSemaphorePermit>,
    _session: Option<OwnedSemaphorePermit>,
    n: u64,
    usage: Arc<Usage>,
}

impl Drop for Held {
    fn drop(&mut self) {
        Usage::sub(&self.usage.bytes, self.n);
    }
}

/// A running blocking job's place in its channel's and session's budgets; given back when
/// dropped.
#[derive(Debug)]
pub struct JobSlot {
    _channel: Option<OwnedSemaphorePermit>,
    _session: Option<OwnedSemaphorePermit>,
    _heavy: Option<OwnedSemaphorePermit>,
    usage: Arc<Usage>,
}

impl Drop for JobSlot {
    fn drop(&mut self) {
        Usage::sub(&self.usage.jobs, 1);
    }
}

async fn take(s: &Arc<Semaphore>, n: usize) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    // The semaphores are never closed.
    s.clone().acquire_many_owned(n).await.ok()
}

impl ChannelBudget {
    pub fn limits(&self) -> &Limits {
        &self.session.limits
    }

    /// Takes `n` bytes (at most the channel's whole budget: more could never be granted),
    /// waiting until the channel and its session have them.
    pub async fn bytes(&self, n: usize) -> Held {
        let n = n
            .min(self.session.limits.channel_bytes)
            .min(self.session.limits.session_bytes);
        // Channel first, then session, always in this order (and jobs only after bytes), so
        // two waiters never hold what the other waits for.
        let channel = take(&self.bytes, n).await;
        let session = take(&self.session.bytes, n).await;
        Usage::add(&self.session.usage.bytes, n as u64);
        Held {
            _channel: channel,
            _session: session,
            n: n as u64,
            usage: self.session.usage.clone(),
        }
    }

    /// A place for one blocking job; `heavy`: it may keep a CPU busy for long (a hash).
    pub async fn job(&self, heavy: bool) -> JobSlot {
        let channel = take(&self.jobs, 1).await;
        let session = take(&self.session.jobs, 1).await;
        let heavy = if heavy {
            take(&self.session.heavy, 1).await
        } else {
            None
        };
        Usage::add(&self.session.usage.jobs, 1);
        JobSlot {
            _channel: channel,
            _session: session,
            _heavy: heavy,
            usage: self.session.usage.clone(),
        }
    }

    /// What the jobs of this channel check and report to, and the guard that stops them when
    /// its owner drops it (keep it in the future that owns the work).
    pub fn jobs(&self) -> (Job, StopOnDrop) {
        let stop = Arc::new(AtomicBool::new(false));
        (
            Job {
                stop: stop.clone(),
                usage: self.session.usage.clone(),
            },
            StopOnDrop(stop),
        )
    }
}

/// What a blocking job checks between chunks, and where it reports its progress.
#[derive(Debug, Clone)]
pub struct Job {
    stop: Arc<AtomicBool>,
    usage: Arc<Usage>,
}

impl Job {
    /// A job nobody can stop, counted nowhere but in `usage` (tools and tests outside a
    /// session).
    pub fn detached() -> Job {
        Job {
            stop: Arc::new(AtomicBool::new(false)),
            usage: Arc::default(),
        }
    }

    /// Whoever asked for this work is gone: stop at the next chunk.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// `n` more bytes read, written or hashed.
    pub fn progress(&self, n: u64) {
        Usage::add(&self.usage.job_bytes, n);
    }
}

/// Stops the jobs of a [`Job`] when dropped.
#[derive(Debug)]
pub struct StopOnDrop(Arc<AtomicBool>);

impl StopOnDrop {
    /// Stops them now.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

tokio::task_local! {
    static CURRENT: Arc<SessionBudget>;
}

/// Runs `f` with `budget` as its session's budget ([`current`] inside it).
pub async fn scope<F: Future>(budget: Arc<SessionBudget>, f: F) -> F::Output {
    CURRENT.scope(budget, f).await
}

/// The budget of the session whose channel or request is being served. Outside any session
/// (a driver driven directly by a test) each call gets a budget of its own with the usual
/// limits.
pub fn current() -> Arc<SessionBudget> {
    CURRENT
        .try_with(|b| b.clone())
        .unwrap_or_else(|_| SessionBudget::new(LIMITS, Arc::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn small() -> Limits {
        Limits {
            session_bytes: 100,
            channel_bytes: 60,
            session_jobs: 2,
            channel_jobs: 2,
            session_heavy: 1,
            channels: 2,
        }
    }

    /// Whether `f` completes without any other task making progress first.
    async fn ready<F: Future>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::ZERO, f).await.ok()
    }

    #[tokio::test]
    async fn a_channel_takes_at_most_its_share_and_a_session_at_most_its_own() {
        let usage = Arc::new(Usage::default());
        let s = SessionBudget::new(small(), usage.clone());
        let (a, b) = (s.channel(), s.channel());
        let a1 = ready(a.bytes(50)).await.expect("within both budgets");
        assert!(
            ready(a.bytes(20)).await.is_none(),
            "60 per channel: 50 + 20 waits"
        );
        let b1 = ready(b.bytes(40)).await.expect("the session has 50 left");
        assert_eq!(usage.bytes.load(Ordering::Relaxed), 90);
        assert!(
            ready(b.bytes(20)).await.is_none(),
            "100 per session: 90 + 20 waits although b has room"
        );
        drop(a1);
        let b2 = ready(b.bytes(20)).await.expect("given back");
        assert_eq!(usage.bytes.load(Ordering::Relaxed), 60);
        // A request larger than a channel's whole budget is cut to it, never waits forever.
        drop((b1, b2));
        let big = ready(a.bytes(1 << 30)).await.expect("clamped");
        assert_eq!(usage.bytes.load(Ordering::Relaxed), 60);
        drop(big);
        assert_eq!(usage.bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn jobs_heavy_jobs_and_channels_are_counted_per_session() {
        let usage = Arc::new(Usage::default());
        let s = SessionBudget::new(small(), usage.clone());
        let (a, b) = (s.channel(), s.channel());
        let h = ready(a.job(true)).await.expect("first heavy job");
        assert!(
            ready(b.job(true)).await.is_none(),
            "one heavy job per session"
        );
        let j = ready(b.job(false)).await.expect("a light one fits");
        assert_eq!(usage.jobs.load(Ordering::Relaxed), 2);
        assert!(ready(a.job(false)).await.is_none(), "two jobs per session");
        drop((h, j));
        assert_eq!(usage.jobs.load(Ordering::Relaxed), 0);
        let c1 = ready(s.channel_slot()).await.expect("slot");
        let _c2 = ready(s.channel_slot()).await.expect("slot");
        assert!(ready(s.channel_slot()).await.is_none(), "two channels");
        assert_eq!(usage.waiting_channels.load(Ordering::Relaxed), 0);
        drop(c1);
        assert!(ready(s.channel_slot()).await.is_some());
    }

    #[tokio::test]
    async fn a_job_stops_when_its_owner_is_dropped() {
        let s = SessionBudget::new(small(), Arc::default());
        let (job, guard) = s.channel().jobs();
        assert!(!job.stopped());
        drop(guard);
        assert!(job.stopped());
    }

    #[tokio::test]
    async fn current_is_the_scope_s_budget() {
        let s = SessionBudget::new(small(), Arc::default());
        let inner = scope(s.clone(), async { current() }).await;
        assert!(Arc::ptr_eq(&s, &inner));
        assert_eq!(current().limits(), &LIMITS, "outside any session");
    }
}
