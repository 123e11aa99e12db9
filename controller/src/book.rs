//! The lease book: which exporter is leased to whom, and who waits for which exporters.
//!
//! `LeaseBook` is the pure lease logic of the controller. It does no I/O and reads no clock:
//! every method that depends on time takes `now` (Unix milliseconds), so the same sequence of
//! calls always gives the same results. The server owns one book, applies commands to it,
//! persists the records named by [`LeaseBook::take_changes`] and forwards the returned
//! [`Event`]s to clients.
//!
//! # Promises
//!
//! - **One lease per exporter.** An exporter is busy from the grant until its lease ends. Going
//!   offline does not end a lease (the board may come back); the lease still ends on time.
//! - **Fairness.** Requests that cannot be served at once wait in arrival order (`seq`). When an
//!   exporter becomes grantable it goes to the *active* waiting request (its `not_before` has
//!   passed) with the lowest `seq` that has it as a candidate.
//! - **Work conserving.** After every method, no active waiting request has a grantable
//!   candidate. That is also why a new request never jumps the queue: it is only granted an
//!   exporter that is grantable right now, and by this invariant no earlier waiter wants it.
//! - **Deterministic choice.** Among several grantable candidates the lowest exporter name wins.
//! - **Only what can be served waits.** A request that no registered exporter could ever
//!   serve (none matches its selector or name, or its client's policy forbids every match) is
//!   refused at once, even with a wait or a begin time; one whose candidates are offline,
//!   disabled or busy may wait. A client's policy narrowed later ([`LeaseBook::set_policy`])
//!   withdraws its waiting requests that can no longer be served and ends its leases on
//!   exporters the policy now forbids.
//! - **Liveness apart from duration.** A lease with an idle timeout ends
//!   ([`EndReason::Idle`]) once nothing has used it for that long: no session of it attached at
//!   its exporter ([`LeaseBook::set_attached`]) and no use reported ([`LeaseBook::touch`]).
//!   An attached lease never ends as idle; when its session leaves, its idle timeout starts.
//! - **Auto-extension.** An auto-extending lease that is in use at its *checkpoint* (half a
//!   step before its end), or is used after it, is extended by one step (its first duration),
//!   never past its hard limit. "In use" means attached, or used within its idle timeout (a
//!   lease without one: within half a step). One not in use is not extended, and ends at its
//!   end unless used before.
//! - **Clean before the next lease.** An exporter that declared a cleanup
//!   ([`LeaseBook::set_cleanup`]: its afterLease hook) is *cleaning* from the moment a lease on
//!   it ends until it reports done ([`LeaseBook::set_cleaning`]) or its declared time has
//!   passed; it is granted to nobody meanwhile. The end of the lease and the start of the
//!   cleaning are one step, so no waiter can be granted the board in between.
//!
//! # Time
//!
//! The book keeps a clock: the latest `now` it was advanced to. Time never goes backwards inside
//! the book: a smaller `now` is treated as the clock. Every method that returns events first
//! *advances* the book to `now`, in this order:
//!
//! 1. what is due on leases, in the order of its time (at the same time: idle ends, then
//!    checkpoints, then ends): leases idle since `last_use + idle_timeout <= now` end
//!    ([`EndReason::Idle`]), auto-extending leases at their checkpoint are extended if in use
//!    ([`Event::Extended`]), leases with `end <= now` end ([`EndReason::Expired`]);
//! 2. waiting requests with `not_before <= now` become active;
//! 3. grantable exporters go to active waiters (in `seq` order);
//! 4. waiting requests with `wait_until <= now` that are still waiting give up
//!    ([`Event::WaitExpired`]).
//!
//! So a waiter is *served before it gives up*: if an exporter frees up at the very tick its wait
//! ends (or the tick comes late), it still gets the exporter. Events from advancing are returned
//! by whichever method did the advancing (a `request` may return `Ended{Expired}` of an
//! unrelated lease); the server should handle events uniformly. [`LeaseBook::set_end`] and the
//! read-only methods do not advance; [`LeaseBook::next_deadline`] says when to call
//! [`LeaseBook::tick`] next.
//!
//! # Cost
//!
//! Exporters get a dense slot number; each waiting request keeps its candidate set as a bitset
//! over slots, and the book keeps the set of grantable exporters as one more bitset. Granting
//! after a change is one pass over the queue doing word-wise ANDs (about 160 words for 10,000
//! exporters), a new request is one pass over the exporters, and a label change re-evaluates
//! one exporter against every waiter.

use std::collections::{BTreeMap, BTreeSet};

use jmp_protocol::selector::{Labels, Selector};
use serde::{Deserialize, Serialize};

/// Unix time in milliseconds.
pub type Millis = u64;

/// How an auto-extending lease grows while it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoExtend {
    /// Each extension moves the end this much later (the lease's first duration); > 0.
    pub step: Millis,
    /// Never extended past this (its begin plus the requested hard limit); `>= end`.
    pub hard_end: Millis,
}

/// A granted lease: `client` may use `exporter` from `begin` until `end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub client: String,
    pub exporter: String,
    /// Canonical selector string the request used.
    pub selector: String,
    pub request_id: String,
    /// When the request arrived (for wait-time metrics).
    pub requested: Millis,
    pub begin: Millis,
    pub end: Millis,
    /// The CI job (or other scope) that asked for it, as the client said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Made as a reservation (a begin time, no caller waiting): nobody is expected to claim
    /// the grant at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reserved: bool,
    /// Ends when nothing has used it for this long (`None`: only at `end`); > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Millis>,
    /// When something last used it: its grant, a use reported by a call naming it, a session
    /// of it attaching to or leaving its exporter. `begin <= last_use <= clock`.
    #[serde(default)]
    pub last_use: Millis,
    /// Its exporter says a session of it is attached: in use for as long as that lasts.
    /// Kept while the exporter is offline (it cannot say otherwise until it registers again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attached: bool,
    /// Extended while in use, up to a hard limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_extend: Option<AutoExtend>,
    /// It does not end as idle before this: a restored lease waits for its exporter to say
    /// whether a session is attached ([`LeaseBook::hold_idle_ends`]). Not persisted: each load
    /// sets its own.
    #[serde(skip)]
    pub idle_not_before: Millis,
    /// Other clients its holder lets attach beside it (`jmp share lease`), at most
    /// [`MAX_SHARES`], one per client. Part of the record, so they survive a restart or
    /// failover like the lease; they end with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
}

/// Clients one lease may be shared with at once (each may hold sessions at the exporter).
pub const MAX_SHARES: usize = 8;

/// A lease shared with another client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub client: String,
    /// When the share ends (`None`: with the lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
    /// The colleague may type and use the board's controls; else it only watches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
}

impl Share {
    /// Whether it still lets its client attach at `now`.
    pub fn live_at(&self, now: Millis) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

impl Lease {
    /// When it ends as idle unless something uses it first: `None` while attached or without
    /// an idle timeout.
    pub fn idle_deadline(&self) -> Option<Millis> {
        if self.attached {
            return None;
        }
        self.idle_timeout
            .map(|d| self.last_use.saturating_add(d).max(self.idle_not_before))
    }

    /// Whether it counts as in use at `t` for its auto-extension: attached, or used within
    /// its idle timeout before `t` (a lease without one: within half a step, so that its grant
    /// alone does not earn its first extension).
    pub fn in_use_at(&self, t: Millis) -> bool {
        let window = self
            .idle_timeout
            .or(self.auto_extend.map(|a| a.step / 2))
            .unwrap_or(0);
        self.attached || self.last_use.saturating_add(window) > t
    }

    /// When its next extension is due: half a step before its end (rounded towards the end,
    /// so never at its begin). `None`: not auto-extending, or at its hard limit.
    pub fn checkpoint(&self) -> Option<Millis> {
        let a = self.auto_extend?;
        (self.end < a.hard_end).then(|| self.end.saturating_sub(a.step / 2))
    }
}

/// A request waiting for an exporter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub request_id: String,
    pub lease_name: String,
    pub client: String,
    /// Canonical; the request's selector.
    pub selector: String,
    /// Canonical; the client's allow-selector.
    pub policy: String,
    /// A specific exporter by name, if requested.
    pub exporter: Option<String>,
    pub duration: Millis,
    /// Arrival order; unique, increasing.
    pub seq: u64,
    pub arrived: Millis,
    /// The request becomes active (may be granted) at this time; never before `arrived`.
    pub not_before: Millis,
    /// The request gives up at this time if still waiting; never before `not_before`.
    pub wait_until: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// A reservation: it keeps its place without a caller waiting on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reserved: bool,
    /// The lease's idle timeout (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Millis>,
    /// Auto-extending: the hard limit counted from the lease's begin (`>= duration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<Millis>,
}

/// A lease request as the server received it.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub request_id: String,
    pub lease_name: String,
    pub client: String,
    pub selector: Selector,
    pub policy: Selector,
    pub exporter: Option<String>,
    pub duration: Millis,
    /// Begin time; `<= now` means now.
    pub not_before: Millis,
    /// `None`: don't wait (refuse if not grantable at once), unless `not_before` is in the
    /// future, in which case it waits until `not_before` and gives up then if not served.
    /// `Some(t)` with `t < not_before` is treated as `not_before` for the same reason.
    pub wait_until: Option<Millis>,
    pub job: Option<String>,
    pub reserved: bool,
    /// The lease ends after this long without use (`None` or 0: no idle timeout).
    pub idle_timeout: Option<Millis>,
    /// Auto-extend up to this long from the lease's begin (`None`: no auto-extension; less
    /// than `duration` is taken as `duration`).
    pub max_duration: Option<Millis>,
}

/// Why a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    Expired,
    Released,
    ExporterRemoved,
    ExporterDisabled,
    ClientRemoved,
    /// Its client's policy no longer allows its exporter.
    PolicyChanged,
    /// Nothing used it for its idle timeout.
    Idle,
}

impl EndReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Released => "released",
            EndReason::ExporterRemoved => "exporter removed",
            EndReason::ExporterDisabled => "exporter disabled",
            EndReason::ClientRemoved => "client removed",
            EndReason::PolicyChanged => "policy changed",
            EndReason::Idle => "idle",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something the server must tell a client about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A waiting request got its lease.
    Granted {
        lease: Lease,
    },
    /// An auto-extending lease in use was extended (`lease` as it is now).
    Extended {
        lease: Lease,
    },
    Ended {
        lease: Lease,
        reason: EndReason,
    },
    /// A request gave up waiting (its `wait_until` passed).
    WaitExpired {
        request: Waiting,
    },
    /// An exporter did not report its cleanup after `lease` done within its declared time:
    /// it is grantable again.
    CleanupOverdue {
        exporter: String,
        lease: String,
    },
}

/// The answer to [`LeaseBook::request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Granted(Lease),
    Queued {
        position: u32,
        behind: Option<String>,
    },
    Refused(Denial),
    /// The request_id is already known (a retry after reconnect / controller restart): its
    /// current state. Nothing was changed for it.
    Existing(RequestState),
}

/// Where a known request stands.
// One per answer to a retried request, never stored in bulk: boxing the lease would only
// add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestState {
    Waiting {
        position: u32,
        behind: Option<String>,
        wait_until: Millis,
    },
    Leased(Lease),
}

/// Why a request was refused, most specific reason first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The named exporter is not registered.
    NoSuchExporter(String),
    /// No registered exporter matches the selector (and name).
    NoMatch,
    /// Some match the selector but none is within the client's policy.
    OutsidePolicy { matching: usize },
    /// Candidates exist but none is online and enabled.
    AllOffline { matching: usize },
    /// Candidates are online and enabled but all leased; `behind` ends first.
    AllBusy {
        matching: usize,
        behind: Option<String>,
    },
    /// `duration == 0`.
    BadDuration,
    /// Another live lease or waiting request already uses this lease name. Lease names key the
    /// persisted records and `release`, so they must be unique.
    LeaseNameInUse(String),
}

impl Denial {
    /// A human-readable explanation naming the request's `selector` (and the client's
    /// `policy` where that is the reason), e.g. "no exporter matches selector 'board=rpi4'".
    /// The refusal as the user reads it: `selector` is the request's ("" for any),
    /// `exporter` the exporter it named (`--name`), `policy` the client's allow-selector.
    pub fn message(&self, selector: &str, exporter: Option<&str>, policy: &str) -> String {
        let subject = |n: usize| match exporter {
            Some(e) if selector.is_empty() => format!("exporter '{e}' exists"),
            Some(e) => format!("exporter '{e}' matches '{selector}'"),
            None => matching_phrase(n, selector),
        };
        match self {
            Denial::NoSuchExporter(name) => format!("no exporter named '{name}' is registered"),
            Denial::NoMatch => match exporter {
                Some(e) => format!("exporter '{e}' does not match selector '{selector}'"),
                None if selector.is_empty() => "no exporter is registered".to_owned(),
                None => format!("no exporter matches selector '{selector}'"),
            },
            Denial::OutsidePolicy { .. } if exporter.is_some() => format!(
                "{} but this client's policy '{policy}' does not allow it",
                subject(1)
            ),
            Denial::OutsidePolicy { matching } => format!(
                "{} but none is allowed by this client's policy '{policy}'",
                subject(*matching)
            ),
            Denial::AllOffline { matching: 1 } => {
                format!("{} but it is not online and enabled", subject(1))
            }
            Denial::AllOffline { matching } => {
                format!("{} but none is online and enabled", subject(*matching))
            }
            Denial::AllBusy { matching, behind } => {
                let verb = if *matching == 1 {
                    "it is leased"
                } else {
                    "all are leased"
                };
                let next = behind
                    .as_ref()
                    .map(|b| format!(" (next free: lease {b})"))
                    .unwrap_or_default();
                format!("{} but {verb}{next}", subject(*matching))
            }
            Denial::BadDuration => "the lease duration must be greater than zero".to_owned(),
            Denial::LeaseNameInUse(name) => format!("lease name '{name}' is already in use"),
        }
    }
}

/// "2 exporters match 'x'", or "2 exporters exist" for the empty selector.
fn matching_phrase(n: usize, selector: &str) -> String {
    let noun = if n == 1 { "exporter" } else { "exporters" };
    match (selector.is_empty(), n == 1) {
        (true, true) => format!("{n} {noun} exists"),
        (true, false) => format!("{n} {noun} exist"),
        (false, true) => format!("{n} {noun} matches '{selector}'"),
        (false, false) => format!("{n} {noun} match '{selector}'"),
    }
}

/// A persisted record that changed; the server looks up its current value (absent: delete).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    /// A lease name: created, ended or modified.
    Lease(String),
    /// A request_id: enqueued or dequeued.
    Waiting(String),
    /// An exporter name: registered, labels or enabled changed, or removed.
    Exporter(String),
}

/// A registered exporter as the book sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExporterState {
    pub labels: Labels,
    /// Connected right now. Not persisted: exporters come back offline after a restart.
    pub online: bool,
    /// Disabled by an admin: not leased out.
    pub enabled: bool,
    /// How long the exporter may take to clean up after each lease (its afterLease hook);
    /// `None`: it needs no cleanup. Declared at registration, not persisted.
    pub cleanup: Option<Millis>,
    /// Cleaning up after lease `.1` until `.0` at the latest: not grantable meanwhile.
    pub cleaning: Option<(Millis, String)>,
}

/// A lease's end, idle deadline and checkpoint: what the book's time indexes hold of it.
type LeaseTimes = (Millis, Option<Millis>, Option<Millis>);

fn times(l: &Lease) -> LeaseTimes {
    (l.end, l.idle_deadline(), l.checkpoint())
}

/// The auto-extension of a lease granted at `begin` for `duration` that may grow to
/// `max_duration` (at least `duration`).
fn auto_extend(
    begin: Millis,
    duration: Millis,
    max_duration: Option<Millis>,
) -> Option<AutoExtend> {
    max_duration.map(|m| AutoExtend {
        step: duration,
        hard_end: begin.saturating_add(m.max(duration)),
    })
}

/// A small fixed-universe bitset over exporter slots. Missing words are zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }

    fn set(&mut self, i: usize, on: bool) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if on {
            if self.0.len() <= word {
                self.0.resize(word + 1, 0);
            }
            self.0[word] |= bit;
        } else if let Some(w) = self.0.get_mut(word) {
            *w &= !bit;
        }
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn intersects(&self, other: &Bits) -> bool {
        self.0.iter().zip(&other.0).any(|(a, b)| a & b != 0)
    }

    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(i, w)| ones_of(i, *w))
    }

    /// The positions set in both.
    fn and_ones<'a>(&'a self, other: &'a Bits) -> impl Iterator<Item = usize> + 'a {
        self.0
            .iter()
            .zip(&other.0)
            .enumerate()
            .flat_map(|(i, (a, b))| ones_of(i, a & b))
    }
}

fn ones_of(word_index: usize, mut word: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if word == 0 {
            return None;
        }
        let bit = word.trailing_zeros() as usize;
        word &= word - 1;
        Some(word_index * 64 + bit)
    })
}

#[derive(Debug, Clone)]
struct ExporterEntry {
    state: ExporterState,
    /// Index into the slot bitsets; reused after removal.
    slot: usize,
    /// Name of the lease on this exporter.
    lease: Option<String>,
}

#[derive(Debug, Clone)]
struct QueueEntry {
    w: Waiting,
    selector: Selector,
    policy: Selector,
    /// Slots of the registered exporters this request could be granted.
    cand: Bits,
    /// `w.not_before <= clock`: the request may be granted.
    active: bool,
}

fn is_candidate(
    selector: &Selector,
    policy: &Selector,
    exporter: Option<&str>,
    name: &str,
    labels: &Labels,
) -> bool {
    exporter.is_none_or(|n| n == name) && selector.matches(labels) && policy.matches(labels)
}

impl QueueEntry {
    fn wants(&self, name: &str, labels: &Labels) -> bool {
        is_candidate(
            &self.selector,
            &self.policy,
            self.w.exporter.as_deref(),
            name,
            labels,
        )
    }
}

/// What a new request finds among the registered exporters.
#[derive(Default)]
struct Scan {
    named_missing: bool,
    /// Match the selector (and name).
    matching: usize,
    /// ... and the policy.
    candidates: usize,
    /// ... and are online and enabled.
    usable: usize,
    cand: Bits,
}

impl Scan {
    /// Why no registered exporter could ever serve the request (`None`: some could, once
    /// online, enabled and free).
    fn unservable(&self, exporter: Option<&str>) -> Option<Denial> {
        if self.named_missing {
            Some(Denial::NoSuchExporter(
                exporter.unwrap_or_default().to_owned(),
            ))
        } else if self.matching == 0 {
            Some(Denial::NoMatch)
        } else if self.candidates == 0 {
            Some(Denial::OutsidePolicy {
                matching: self.matching,
            })
        } else {
            None
        }
    }
}

/// The lease logic; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct LeaseBook {
    /// The latest `now` the book advanced to.
    clock: Millis,
    exporters: BTreeMap<String, ExporterEntry>,
    /// slot → exporter name.
    slots: Vec<Option<String>>,
    free_slots: Vec<usize>,
    /// Slots of exporters that are online, enabled and not leased.
    grantable: Bits,
    /// slot → (end, name) of the lease on that exporter, for "behind" without lookups.
    slot_lease: Vec<Option<(Millis, String)>>,
    leases: BTreeMap<String, Lease>,
    lease_by_request: BTreeMap<String, String>,
    lease_ends: BTreeSet<(Millis, String)>,
    /// (idle deadline, name) of leases that have one (not attached, with an idle timeout).
    idle_ends: BTreeSet<(Millis, String)>,
    /// (checkpoint, name) of auto-extending leases whose checkpoint is still to be judged.
    /// One judged not in use leaves the index until something changes it (a use, a new end).
    checkpoints: BTreeSet<(Millis, String)>,
    /// (until, exporter) of exporters cleaning up after a lease.
    cleaning_ends: BTreeSet<(Millis, String)>,
    /// Waiting requests by seq.
    queue: BTreeMap<u64, QueueEntry>,
    queue_by_id: BTreeMap<String, u64>,
    queue_by_lease: BTreeMap<String, u64>,
    /// Waiting requests not active yet, by `not_before`.
    not_before_idx: BTreeSet<(Millis, u64)>,
    wait_until_idx: BTreeSet<(Millis, u64)>,
    next_seq: u64,
    changes: BTreeSet<Change>,
    /// Events found by `restore`, returned by the next advancing call.
    pending: Vec<Event>,
    /// Some exporter may have become grantable, or some waiter active, since the last `fill`.
    dirty: bool,
}

impl LeaseBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the book after a restart from the persisted records. Exporters come back
    /// offline (the server marks them online when they reconnect), so nothing is granted here.
    ///
    /// The clock starts at the latest `begin`/`arrived` seen, so time keeps moving forward.
    /// New requests get a `seq` above every restored one. Records a consistent book never
    /// produces are repaired, and the repair is recorded in the changes: a lease on an exporter
    /// that is not registered or disabled ends (the next advancing call returns the `Ended`
    /// event); a lease or waiting request that repeats a lease name, request_id, exporter (for
    /// leases) or seq of an earlier record, or whose selectors no longer parse, is dropped; a
    /// waiting request's selector strings are made canonical and its times put in order.
    pub fn restore(
        exporters: Vec<(String, Labels, bool)>,
        leases: Vec<Lease>,
        waiting: Vec<Waiting>,
    ) -> Self {
        let mut book = Self::new();
        for (name, labels, enabled) in exporters {
            if book.exporters.contains_key(&name) {
                continue;
            }
            let slot = book.alloc_slot(&name);
            let state = ExporterState {
                labels,
                online: false,
                enabled,
                cleanup: None,
                cleaning: None,
            };
            book.exporters.insert(
                name,
                ExporterEntry {
                    state,
                    slot,
                    lease: None,
                },
            );
        }
        book.clock = leases
            .iter()
            .map(|l| l.begin.max(l.last_use))
            .chain(waiting.iter().map(|w| w.arrived))
            .max()
            .unwrap_or(0);

        // Restoring a record is not a change; repairing or dropping one is.
        let mut changes = BTreeSet::new();
        let mut ended = Vec::new();
        for mut lease in leases {
            // Liveness fields as the book itself would have written them.
            let original = lease.clone();
            lease.last_use = lease.last_use.max(lease.begin);
            lease.idle_timeout = lease.idle_timeout.filter(|d| *d > 0);
            lease.auto_extend = lease
                .auto_extend
                .filter(|a| a.step > 0)
                .map(|a| AutoExtend {
                    hard_end: a.hard_end.max(lease.end),
                    ..a
                });
            if lease != original {
                changes.insert(Change::Lease(lease.name.clone()));
            }
            let duplicate = book.leases.contains_key(&lease.name)
                || book.lease_by_request.contains_key(&lease.request_id)
                || book
                    .exporters
                    .get(&lease.exporter)
                    .is_some_and(|e| e.lease.is_some());
            if duplicate {
                changes.insert(Change::Lease(lease.name));
                continue;
            }
            let reason = match book.exporters.get(&lease.exporter) {
                None => Some(EndReason::ExporterRemoved),
                Some(e) if !e.state.enabled => Some(EndReason::ExporterDisabled),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                changes.insert(Change::Lease(lease.name.clone()));
                ended.push((lease.name.clone(), reason));
            }
            book.insert_lease(lease);
        }
        let mut pending = Vec::new();
        for (name, reason) in ended {
            book.end_lease(&name, reason, &mut pending);
        }
        book.pending = pending;

        let mut waiting = waiting;
        waiting.sort_by_key(|w| w.seq);
        let mut last_arrived = 0;
        for mut w in waiting {
            let id = Change::Waiting(w.request_id.clone());
            let parsed = Selector::parse(&w.selector)
                .and_then(|s| Selector::parse(&w.policy).map(|p| (s, p)));
            let duplicate = book.queue.contains_key(&w.seq)
                || book.queue_by_id.contains_key(&w.request_id)
                || book.lease_by_request.contains_key(&w.request_id)
                || book.queue_by_lease.contains_key(&w.lease_name)
                || book.leases.contains_key(&w.lease_name);
            let (selector, policy) = match parsed {
                Ok(sp) if !duplicate && w.duration > 0 => sp,
                _ => {
                    changes.insert(id);
                    continue;
                }
            };
            // Canonical strings and ordered times, as the book itself would have written.
            let original = w.clone();
            w.selector = selector.to_string();
            w.policy = policy.to_string();
            w.arrived = w.arrived.max(last_arrived);
            w.not_before = w.not_before.max(w.arrived);
            w.wait_until = w.wait_until.max(w.not_before);
            w.idle_timeout = w.idle_timeout.filter(|d| *d > 0);
            w.max_duration = w.max_duration.map(|m| m.max(w.duration));
            if w != original {
                changes.insert(id);
            }
            last_arrived = w.arrived;
            book.next_seq = book.next_seq.max(w.seq.saturating_add(1));
            let mut entry = QueueEntry {
                active: w.not_before <= book.clock,
                w,
                selector,
                policy,
                cand: Bits::default(),
            };
            entry.cand = book.candidates_of(&entry);
            book.enqueue(entry);
        }
        book.changes = changes;
        // Exporters are offline: nothing is grantable, so the book is work-conserving as is.
        book.dirty = false;
        book
    }

    /// Registers an exporter or updates its labels and enabled flag. A new exporter starts
    /// offline. Disabling ends its lease ([`EndReason::ExporterDisabled`]); a label change may
    /// make waiters match it, so it may be granted.
    pub fn upsert_exporter(
        &mut self,
        now: Millis,
        name: &str,
        labels: Labels,
        enabled: bool,
    ) -> Vec<Event> {
        let mut events = self.advance(now);
        let labels_changed = match self.exporters.get_mut(name) {
            None => {
                let slot = self.alloc_slot(name);
                let state = ExporterState {
                    labels,
                    online: false,
                    enabled,
                    cleanup: None,
                    cleaning: None,
                };
                self.exporters.insert(
                    name.to_owned(),
                    ExporterEntry {
                        state,
                        slot,
                        lease: None,
                    },
                );
                self.changes.insert(Change::Exporter(name.to_owned()));
                true
            }
            Some(e) => {
                let labels_changed = e.state.labels != labels;
                if labels_changed || e.state.enabled != enabled {
                    self.changes.insert(Change::Exporter(name.to_owned()));
                }
                e.state.labels = labels;
                e.state.enabled = enabled;
                let lease = e.lease.clone();
                if let Some(lease) = lease.filter(|_| !enabled) {
                    self.end_lease(&lease, EndReason::ExporterDisabled, &mut events);
                }
                labels_changed
            }
        };
        if labels_changed {
            let e = &self.exporters[name];
            let (slot, labels) = (e.slot, &e.state.labels);
            for q in self.queue.values_mut() {
                let wants = q.wants(name, labels);
                q.cand.set(slot, wants);
            }
            // Already grantable, but maybe wanted by someone new now.
            if self.grantable.get(slot) {
                self.dirty = true;
            }
        }
        self.refresh_grantable(name);
        self.fill(&mut events);
        events
    }

    /// Marks an exporter connected or not. Coming online may grant it to a waiter; going
    /// offline does *not* end its lease. Unknown names are ignored. Not a persisted change.
    pub fn set_online(&mut self, now: Millis, name: &str, online: bool) -> Vec<Event> {
        let mut events = self.advance(now);
        if let Some(e) = self.exporters.get_mut(name) {
            e.state.online = online;
            self.refresh_grantable(name);
            self.fill(&mut events);
        }
        events
    }

    /// Declares how long `name` cleans up after each lease (`None`: it does not). Takes effect
    /// at the next lease end. Unknown names are ignored.
    pub fn set_cleanup(&mut self, name: &str, cleanup: Option<Millis>) {
        if let Some(e) = self.exporters.get_mut(name) {
            e.state.cleanup = cleanup;
        }
    }

    /// Starts (`Some`: cleaning after `lease` until `until`, as an exporter reports at its
    /// registration) or ends (`None`: the exporter reports it is done) a cleanup. Ending one
    /// may grant the exporter to a waiter. Unknown names are ignored.
    pub fn set_cleaning(
        &mut self,
        now: Millis,
        name: &str,
        cleaning: Option<(Millis, String)>,
    ) -> Vec<Event> {
        let mut events = self.advance(now);
        if let Some(e) = self.exporters.get_mut(name) {
            if let Some((old, _)) = e.state.cleaning.take() {
                self.cleaning_ends.remove(&(old, name.to_owned()));
            }
            if let Some((until, lease)) = cleaning {
                self.cleaning_ends.insert((until, name.to_owned()));
                e.state.cleaning = Some((until, lease));
            }
            self.refresh_grantable(name);
            self.fill(&mut events);
        }
        events
    }

    /// Unregisters an exporter, ending its lease ([`EndReason::ExporterRemoved`]). Requests
    /// waiting for it by name keep waiting (it may be registered again).
    pub fn remove_exporter(&mut self, now: Millis, name: &str) -> Vec<Event> {
        let mut events = self.advance(now);
        if let Some(lease) = self.exporters.get(name).and_then(|e| e.lease.clone()) {
            self.end_lease(&lease, EndReason::ExporterRemoved, &mut events);
        }
        if let Some(e) = self.exporters.remove(name) {
            if let Some((until, _)) = &e.state.cleaning {
                self.cleaning_ends.remove(&(*until, name.to_owned()));
            }
            for q in self.queue.values_mut() {
                q.cand.set(e.slot, false);
            }
            self.grantable.set(e.slot, false);
            self.slots[e.slot] = None;
            self.slot_lease[e.slot] = None;
            self.free_slots.push(e.slot);
            self.changes.insert(Change::Exporter(name.to_owned()));
        }
        self.fill(&mut events);
        events
    }

    /// Ends every lease of `client` ([`EndReason::ClientRemoved`]) and drops its waiting
    /// requests without an event (there is nobody left to tell). Freed exporters go to other
    /// waiters.
    pub fn remove_client(&mut self, now: Millis, client: &str) -> Vec<Event> {
        let mut events = self.advance(now);
        let waiting: Vec<u64> = self
            .queue
            .iter()
            .filter(|(_, q)| q.w.client == client)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in waiting {
            self.dequeue(seq);
        }
        let leases: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.client == client)
            .map(|l| l.name.clone())
            .collect();
        for name in leases {
            self.end_lease(&name, EndReason::ClientRemoved, &mut events);
        }
        self.fill(&mut events);
        events
    }

    /// A new lease request. See the module documentation for the rules; in short: a known
    /// request_id gives its current state, a grantable candidate is granted at once (lowest
    /// name), a request that may wait is queued, anything else is refused with the most
    /// specific reason. The events are those of advancing to `now` first.
    pub fn request(&mut self, now: Millis, req: NewRequest) -> (Outcome, Vec<Event>) {
        let events = self.advance(now);
        let now = self.clock;
        // A retry is recognised by its request_id alone, whatever else it carries.
        if let Some(state) = self.request_state(now, &req.request_id) {
            return (Outcome::Existing(state), events);
        }
        if req.duration == 0 {
            return (Outcome::Refused(Denial::BadDuration), events);
        }
        if self.leases.contains_key(&req.lease_name)
            || self.queue_by_lease.contains_key(&req.lease_name)
        {
            let refusal = Denial::LeaseNameInUse(req.lease_name);
            return (Outcome::Refused(refusal), events);
        }
        let not_before = req.not_before.max(now);
        if not_before == now {
            let exporter = req.exporter.as_deref();
            if let Some(exporter) = self.first_grantable(&req.selector, &req.policy, exporter) {
                let lease = Lease {
                    name: req.lease_name,
                    client: req.client,
                    exporter,
                    selector: req.selector.to_string(),
                    request_id: req.request_id,
                    requested: now,
                    begin: now,
                    end: now.saturating_add(req.duration),
                    job: req.job,
                    reserved: req.reserved,
                    idle_timeout: req.idle_timeout.filter(|d| *d > 0),
                    last_use: now,
                    attached: false,
                    auto_extend: auto_extend(now, req.duration, req.max_duration),
                    idle_not_before: 0,
                    shares: Vec::new(),
                };
                self.insert_lease(lease.clone());
                return (Outcome::Granted(lease), events);
            }
        }
        let scan = self.scan(&req.selector, &req.policy, req.exporter.as_deref());
        // Waiting cannot help a request no registered exporter could ever serve.
        if let Some(refusal) = scan.unservable(req.exporter.as_deref()) {
            return (Outcome::Refused(refusal), events);
        }
        let wait_until = match req.wait_until {
            Some(t) if t > now || not_before > now => Some(t.max(not_before)),
            None if not_before > now => Some(not_before),
            _ => None,
        };
        let Some(wait_until) = wait_until else {
            let refusal = if scan.usable == 0 {
                Denial::AllOffline {
                    matching: scan.candidates,
                }
            } else {
                Denial::AllBusy {
                    matching: scan.candidates,
                    behind: self.behind(&scan.cand),
                }
            };
            return (Outcome::Refused(refusal), events);
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = QueueEntry {
            w: Waiting {
                request_id: req.request_id.clone(),
                lease_name: req.lease_name,
                client: req.client,
                selector: req.selector.to_string(),
                policy: req.policy.to_string(),
                exporter: req.exporter,
                duration: req.duration,
                seq,
                arrived: now,
                not_before,
                wait_until,
                job: req.job,
                reserved: req.reserved,
                idle_timeout: req.idle_timeout.filter(|d| *d > 0),
                max_duration: req.max_duration.map(|m| m.max(req.duration)),
            },
            selector: req.selector,
            policy: req.policy,
            cand: scan.cand,
            active: not_before <= now,
        };
        // An active newcomer has no grantable candidate (else it was granted above), so the
        // book stays work-conserving without a fill.
        self.enqueue(entry);
        let (position, behind) = self.position(now, &req.request_id).unwrap_or((1, None));
        (Outcome::Queued { position, behind }, events)
    }

    /// `client`'s policy is now `policy`: its waiting requests wait for what the new policy
    /// allows, and those that no registered exporter could serve any more are withdrawn
    /// (returned with why, no event); its leases on exporters the policy forbids end
    /// ([`EndReason::PolicyChanged`]), and the freed exporters go to other waiters.
    pub fn set_policy(
        &mut self,
        now: Millis,
        client: &str,
        policy: &Selector,
    ) -> (Vec<Event>, Vec<(Waiting, Denial)>) {
        let mut events = self.advance(now);
        let mine: Vec<u64> = self
            .queue
            .iter()
            .filter(|(_, q)| q.w.client == client)
            .map(|(seq, _)| *seq)
            .collect();
        let mut withdrawn = Vec::new();
        for seq in mine {
            let Some(q) = self.queue.get(&seq) else {
                continue;
            };
            let scan = self.scan(&q.selector, policy, q.w.exporter.as_deref());
            if let Some(why) = scan.unservable(q.w.exporter.as_deref()) {
                if let Some(q) = self.dequeue(seq) {
                    withdrawn.push((q.w, why));
                }
                continue;
            }
            if let Some(q) = self.queue.get_mut(&seq) {
                q.policy = policy.clone();
                q.w.policy = policy.to_string();
                q.cand = scan.cand;
                self.changes.insert(Change::Waiting(q.w.request_id.clone()));
                // A wider policy may give it a grantable candidate.
                self.dirty = true;
            }
        }
        let forbidden: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.client == client)
            .filter(|l| {
                self.exporters
                    .get(&l.exporter)
                    .is_some_and(|e| !policy.matches(&e.state.labels))
            })
            .map(|l| l.name.clone())
            .collect();
        for name in forbidden {
            self.end_lease(&name, EndReason::PolicyChanged, &mut events);
        }
        self.fill(&mut events);
        (events, withdrawn)
    }

    /// `client`'s policy now limits idle timeouts to `max_idle` (`None`: no limit) and leases
    /// to `max_duration` in all: its leases and waiting requests with a longer idle timeout,
    /// or none, get `max_idle`, and its auto-extending ones a hard limit within `max_duration`
    /// of their begin (never before their current end: shortening a live lease is
    /// [`LeaseBook::set_end`]'s). A lease idle for longer than its new timeout ends now.
    pub fn limit_client(
        &mut self,
        now: Millis,
        client: &str,
        max_idle: Option<Millis>,
        max_duration: Millis,
    ) -> Vec<Event> {
        let mut events = self.advance(now);
        let cap = |idle: Option<Millis>| match (idle, max_idle) {
            (_, None) => idle,
            (None, Some(m)) => Some(m),
            (Some(d), Some(m)) => Some(d.min(m)),
        };
        let mine: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.client == client)
            .map(|l| l.name.clone())
            .collect();
        for name in mine {
            let Some(l) = self.leases.get(&name) else {
                continue;
            };
            let idle = cap(l.idle_timeout).filter(|d| *d > 0);
            let hard = l.auto_extend.map(|a| AutoExtend {
                hard_end: a
                    .hard_end
                    .min(l.begin.saturating_add(max_duration))
                    .max(l.end),
                ..a
            });
            if idle != l.idle_timeout || hard != l.auto_extend {
                self.modify_lease(&name, |l| {
                    l.idle_timeout = idle;
                    l.auto_extend = hard;
                });
            }
        }
        for q in self.queue.values_mut().filter(|q| q.w.client == client) {
            let idle = cap(q.w.idle_timeout).filter(|d| *d > 0);
            let hard =
                q.w.max_duration
                    .map(|m| m.min(max_duration).max(q.w.duration));
            if idle != q.w.idle_timeout || hard != q.w.max_duration {
                q.w.idle_timeout = idle;
                q.w.max_duration = hard;
                self.changes.insert(Change::Waiting(q.w.request_id.clone()));
            }
        }
        self.process_due(&mut events);
        self.fill(&mut events);
        events
    }

    /// Why no registered exporter could ever serve a request for `selector` within `policy`
    /// (and by name `exporter`): waiting cannot help it. `None`: some could.
    pub fn unservable(
        &self,
        selector: &Selector,
        policy: &Selector,
        exporter: Option<&str>,
    ) -> Option<Denial> {
        self.scan(selector, policy, exporter).unservable(exporter)
    }

    /// The registered exporters a waiting request could be granted (by name).
    pub fn candidates(&self, request_id: &str) -> Vec<&str> {
        let Some(q) = self
            .queue_by_id
            .get(request_id)
            .and_then(|s| self.queue.get(s))
        else {
            return Vec::new();
        };
        q.cand
            .ones()
            .filter_map(|slot| self.slots.get(slot)?.as_deref())
            .collect()
    }

    /// Ends the lease `lease_name` ([`EndReason::Released`]) and grants the freed exporter to
    /// the next waiter; or, if that name belongs to a waiting request, withdraws it (no event,
    /// but a change). Unknown names do nothing.
    pub fn release(&mut self, now: Millis, lease_name: &str) -> Vec<Event> {
        let mut events = self.advance(now);
        if self.leases.contains_key(lease_name) {
            self.end_lease(lease_name, EndReason::Released, &mut events);
            self.fill(&mut events);
        } else if let Some(seq) = self.queue_by_lease.get(lease_name).copied() {
            self.dequeue(seq);
        }
        events
    }

    /// Moves the end of a live lease (extend or shorten). Does not advance the book: an `end`
    /// at or before the clock ends the lease at the next advancing call, which
    /// [`LeaseBook::next_deadline`] then reports as due. A lease whose end has passed but that
    /// was not ended yet can still be extended. Errors if there is no such lease.
    ///
    /// An auto-extending lease moved past its hard limit takes the new end as its hard limit:
    /// the limit is its holder's own, and an explicit change says more than it (the client's
    /// policy is the caller's to check).
    pub fn set_end(
        &mut self,
        _now: Millis,
        lease_name: &str,
        end: Millis,
    ) -> Result<Lease, String> {
        self.modify_lease(lease_name, |l| {
            l.end = end;
            if let Some(a) = l.auto_extend.as_mut() {
                a.hard_end = a.hard_end.max(end);
            }
        })
        .ok_or_else(|| format!("no lease named '{lease_name}'"))
    }

    /// Replaces lease `name`'s shares (the caller checked who may share with whom). Errors if
    /// there is no such lease or there would be more than [`MAX_SHARES`].
    pub fn set_shares(&mut self, name: &str, shares: Vec<Share>) -> Result<Lease, String> {
        if shares.len() > MAX_SHARES {
            return Err(format!(
                "lease {name} would be shared with {} clients; at most {MAX_SHARES} at once",
                shares.len()
            ));
        }
        self.modify_lease(name, |l| l.shares = shares)
            .ok_or_else(|| format!("no lease named '{name}'"))
    }

    /// Something used lease `name` now (a call naming it): its idle timeout starts again, and
    /// an auto-extending lease past its checkpoint is extended. Returns the lease as it is
    /// now, or `None` if it is not live (it may have ended just now: see the events, which
    /// are those of advancing to `now` first).
    pub fn touch(&mut self, now: Millis, name: &str) -> (Option<Lease>, Vec<Event>) {
        let mut events = self.advance(now);
        let clock = self.clock;
        if self.modify_lease(name, |l| l.last_use = clock).is_none() {
            return (None, events);
        }
        self.process_due(&mut events);
        (self.leases.get(name).cloned(), events)
    }

    /// Exporter `exporter` says a session of `lease` is attached now (`None`: nobody is).
    /// Its current lease is in use while a report names it: attaching holds its idle timeout
    /// (and extends an auto-extending lease past its checkpoint), leaving starts it again. A
    /// report naming another lease than the current one (an old session, or a grant the
    /// exporter heard of first) counts as none. Unknown exporters are ignored.
    pub fn set_attached(&mut self, now: Millis, exporter: &str, lease: Option<&str>) -> Vec<Event> {
        let mut events = self.advance(now);
        let clock = self.clock;
        let Some(current) = self.exporters.get(exporter).and_then(|e| e.lease.clone()) else {
            return events;
        };
        let attached = lease == Some(current.as_str());
        if self
            .leases
            .get(&current)
            .is_some_and(|l| l.attached != attached)
        {
            self.modify_lease(&current, |l| {
                l.attached = attached;
                l.last_use = clock;
            });
            self.process_due(&mut events);
        }
        events
    }

    /// Advances the book to `now`: expires leases (`end <= now`), activates requests whose
    /// `not_before` has come, grants, then gives up requests with `wait_until <= now` that
    /// are still waiting. Served before giving up: see the module documentation.
    pub fn tick(&mut self, now: Millis) -> Vec<Event> {
        self.advance(now)
    }

    /// When the next `tick` has work: the earliest lease end, idle deadline or checkpoint, the
    /// end of a cleanup, `not_before` of a waiting request not yet active, or `wait_until`. It may be at or before the clock (after `set_end` into
    /// the past, or after `restore`): then tick at once. `None`: nothing will happen by itself.
    pub fn next_deadline(&self) -> Option<Millis> {
        let due_now = (!self.pending.is_empty()).then_some(self.clock);
        [
            due_now,
            self.lease_ends.first().map(|(t, _)| *t),
            self.idle_ends.first().map(|(t, _)| *t),
            self.checkpoints.first().map(|(t, _)| *t),
            self.cleaning_ends.first().map(|(t, _)| *t),
            self.not_before_idx.first().map(|(t, _)| *t),
            self.wait_until_idx.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The state of a known request: its live lease, or its place in the queue.
    /// The live lease granted for `request_id`, if any (by index).
    pub fn lease_by_request(&self, request_id: &str) -> Option<&Lease> {
        self.lease_by_request
            .get(request_id)
            .and_then(|name| self.leases.get(name))
    }

    pub fn request_state(&self, now: Millis, request_id: &str) -> Option<RequestState> {
        if let Some(name) = self.lease_by_request.get(request_id) {
            return self.leases.get(name).cloned().map(RequestState::Leased);
        }
        let (position, behind) = self.position(now, request_id)?;
        let wait_until = self.waiting_by_id(request_id)?.wait_until;
        Some(RequestState::Waiting {
            position,
            behind,
            wait_until,
        })
    }

    /// A waiting request's place: 1 + the number of active waiting requests with a lower seq
    /// whose candidate sets intersect this one's (they would be served first), and the lease
    /// that ends first among the leases on its candidates. For a request that is not active
    /// yet, "active" is judged at its `not_before`, i.e. the place it will get then.
    pub fn position(&self, now: Millis, request_id: &str) -> Option<(u32, Option<String>)> {
        let seq = *self.queue_by_id.get(request_id)?;
        let entry = self.queue.get(&seq)?;
        let at = now.max(self.clock).max(entry.w.not_before);
        let ahead = self
            .queue
            .range(..seq)
            .filter(|(_, q)| q.w.not_before <= at && q.cand.intersects(&entry.cand))
            .count();
        let position = u32::try_from(ahead + 1).unwrap_or(u32::MAX);
        Some((position, self.behind(&entry.cand)))
    }

    /// What changed since the last call, sorted and deduplicated. The server persists these
    /// keys: it looks up the current value, and deletes the record if there is none.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes).into_iter().collect()
    }

    pub fn lease(&self, name: &str) -> Option<&Lease> {
        self.leases.get(name)
    }

    /// Live leases, by name.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Waiting requests, in seq order.
    pub fn waiting(&self) -> impl Iterator<Item = &Waiting> {
        self.queue.values().map(|q| &q.w)
    }

    pub fn waiting_by_id(&self, request_id: &str) -> Option<&Waiting> {
        let seq = self.queue_by_id.get(request_id)?;
        self.queue.get(seq).map(|q| &q.w)
    }

    pub fn exporter(&self, name: &str) -> Option<&ExporterState> {
        self.exporters.get(name).map(|e| &e.state)
    }

    /// Registered exporters, by name.
    pub fn exporters(&self) -> impl Iterator<Item = (&String, &ExporterState)> {
        self.exporters.iter().map(|(n, e)| (n, &e.state))
    }

    pub fn lease_of_exporter(&self, exporter: &str) -> Option<&Lease> {
        let name = self.exporters.get(exporter)?.lease.as_ref()?;
        self.leases.get(name)
    }

    /// The latest `now` the book advanced to (time never goes backwards inside the book).
    pub fn clock(&self) -> Millis {
        self.clock
    }

    /// No lease live now ends as idle before `until`; one whose idle deadline passes earlier
    /// ends then (if nothing used it meanwhile). For a restored book: what the store says is
    /// attached is kept until the exporter says otherwise, but a session that attached while no
    /// controller listened is only heard of when its exporter registers again, so idle
    /// deadlines that passed during the downtime wait for that (a lease nobody used still
    /// ends, a little later). Leases granted later are not held. Not a change to persist.
    pub fn hold_idle_ends(&mut self, until: Millis) {
        let names: Vec<String> = self.leases.keys().cloned().collect();
        for name in names {
            let change = Change::Lease(name.clone());
            let had = self.changes.contains(&change);
            self.modify_lease(&name, |l| l.idle_not_before = until);
            if !had {
                self.changes.remove(&change);
            }
        }
    }

    /// Checks every promise and every index against a from-scratch recomputation; slow, for
    /// tests and debugging. "Active" is judged at the book's clock, since only advancing
    /// activates requests; `now` bounds the times the book may have recorded.
    pub fn check_invariants(&self, now: Millis) -> Result<(), String> {
        let now = now.max(self.clock);
        // Exporters and slots.
        let mut used_slots = BTreeSet::new();
        for (name, e) in &self.exporters {
            if self.slots.get(e.slot).and_then(|s| s.as_deref()) != Some(name.as_str()) {
                return Err(format!(
                    "exporter '{name}': slot {} does not name it",
                    e.slot
                ));
            }
            if !used_slots.insert(e.slot) {
                return Err(format!("exporter '{name}': slot {} used twice", e.slot));
            }
            let grantable = e.state.online
                && e.state.enabled
                && e.lease.is_none()
                && e.state.cleaning.is_none();
            if let Some((until, _)) = &e.state.cleaning {
                if !self.cleaning_ends.contains(&(*until, name.clone())) {
                    return Err(format!("exporter '{name}': cleaning is not indexed"));
                }
            }
            if self.grantable.get(e.slot) != grantable {
                return Err(format!(
                    "exporter '{name}': grantable index says {}, state says {grantable}",
                    !grantable
                ));
            }
            let slot_lease = self.slot_lease.get(e.slot).cloned().flatten();
            match &e.lease {
                Some(l) => match self.leases.get(l) {
                    Some(lease) if lease.exporter == *name => {
                        if slot_lease != Some((lease.end, l.clone())) {
                            return Err(format!(
                                "slot lease index of '{name}' says {slot_lease:?}, not lease '{l}'"
                            ));
                        }
                    }
                    _ => {
                        return Err(format!(
                            "exporter '{name}' points at lease '{l}' which is not on it"
                        ))
                    }
                },
                None if slot_lease.is_some() => {
                    return Err(format!(
                        "slot lease index of unleased '{name}' says {slot_lease:?}"
                    ))
                }
                None => {}
            }
        }
        let named_slots = self.slots.iter().filter(|s| s.is_some()).count();
        if named_slots != self.exporters.len() {
            return Err(format!(
                "{named_slots} slots are named but {} exporters are registered",
                self.exporters.len()
            ));
        }
        if self.slot_lease.len() != self.slots.len() {
            return Err(format!(
                "slot lease index has {} slots but there are {}",
                self.slot_lease.len(),
                self.slots.len()
            ));
        }
        for &s in &self.free_slots {
            if self.slots.get(s).is_none_or(|n| n.is_some())
                || used_slots.contains(&s)
                || self.slot_lease[s].is_some()
            {
                return Err(format!("free slot {s} is in use"));
            }
        }
        if let Some(s) = self.grantable.ones().find(|s| !used_slots.contains(s)) {
            return Err(format!("grantable index names unused slot {s}"));
        }

        // Leases.
        let mut on_exporter: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, lease) in &self.leases {
            if *name != lease.name {
                return Err(format!("lease '{}' is stored under '{name}'", lease.name));
            }
            if let Some(other) = on_exporter.insert(&lease.exporter, name) {
                return Err(format!(
                    "two leases on exporter '{}': '{other}' and '{name}'",
                    lease.exporter
                ));
            }
            let Some(e) = self.exporters.get(&lease.exporter) else {
                return Err(format!(
                    "lease '{name}' is on exporter '{}' which is not registered",
                    lease.exporter
                ));
            };
            if e.lease.as_deref() != Some(name.as_str()) {
                return Err(format!(
                    "exporter index of '{}' does not point at its lease '{name}'",
                    lease.exporter
                ));
            }
            if self.lease_by_request.get(&lease.request_id) != Some(name) {
                return Err(format!(
                    "request index does not map '{}' to lease '{name}'",
                    lease.request_id
                ));
            }
            if !self.lease_ends.contains(&(lease.end, name.clone())) {
                return Err(format!("end index is missing lease '{name}'"));
            }
            if lease.last_use < lease.begin || lease.last_use > self.clock {
                return Err(format!(
                    "lease '{name}': last use {} is outside begin {} .. clock {}",
                    lease.last_use, lease.begin, self.clock
                ));
            }
            if lease.idle_timeout == Some(0) {
                return Err(format!("lease '{name}' has an idle timeout of 0"));
            }
            if let Some(d) = lease.idle_deadline() {
                if !self.idle_ends.contains(&(d, name.clone())) {
                    return Err(format!("idle index is missing lease '{name}' at {d}"));
                }
            }
            if let Some(a) = lease.auto_extend {
                if a.step == 0 || a.hard_end < lease.end {
                    return Err(format!(
                        "lease '{name}': auto-extension {a:?} with end {}",
                        lease.end
                    ));
                }
            }
            if let Some(c) = lease.checkpoint() {
                let judged = c <= self.clock && !lease.in_use_at(c);
                if !self.checkpoints.contains(&(c, name.clone())) && !judged {
                    return Err(format!(
                        "checkpoint index is missing lease '{name}' at {c} (in use then)"
                    ));
                }
            }
            if lease.begin > now {
                return Err(format!(
                    "lease '{name}' begins at {} after now {now}",
                    lease.begin
                ));
            }
            if self.queue_by_lease.contains_key(name) {
                return Err(format!("lease name '{name}' is also a waiting request's"));
            }
        }
        let idle = self
            .leases
            .values()
            .filter(|l| l.idle_deadline().is_some())
            .count();
        if idle != self.idle_ends.len() {
            return Err(format!(
                "idle index has {} entries for {idle} leases with an idle deadline",
                self.idle_ends.len()
            ));
        }
        if let Some((t, n)) = self
            .checkpoints
            .iter()
            .find(|(t, n)| self.leases.get(n).and_then(Lease::checkpoint) != Some(*t))
        {
            return Err(format!(
                "checkpoint index names '{n}' at {t}, which is not its checkpoint"
            ));
        }
        if self.lease_by_request.len() != self.leases.len()
            || self.lease_ends.len() != self.leases.len()
        {
            return Err(format!(
                "lease indexes have {} request ids and {} ends for {} leases",
                self.lease_by_request.len(),
                self.lease_ends.len(),
                self.leases.len()
            ));
        }
        let leased = self
            .exporters
            .values()
            .filter(|e| e.lease.is_some())
            .count();
        if leased != self.leases.len() {
            return Err(format!(
                "{leased} exporters point at a lease but there are {} leases",
                self.leases.len()
            ));
        }

        // Waiting requests.
        let mut last: Option<&Waiting> = None;
        for (&seq, q) in &self.queue {
            let w = &q.w;
            let id = &w.request_id;
            if w.seq != seq {
                return Err(format!(
                    "waiting '{id}' has seq {} but is stored at {seq}",
                    w.seq
                ));
            }
            if seq >= self.next_seq {
                return Err(format!(
                    "waiting '{id}': seq {seq} is not below next seq {}",
                    self.next_seq
                ));
            }
            if let Some(prev) = last {
                if prev.arrived > w.arrived {
                    return Err(format!(
                        "waiting '{id}' (seq {seq}) arrived before '{}' (seq {})",
                        prev.request_id, prev.seq
                    ));
                }
            }
            last = Some(w);
            if self.queue_by_id.get(id) != Some(&seq) {
                return Err(format!("request index does not map '{id}' to seq {seq}"));
            }
            if self.queue_by_lease.get(&w.lease_name) != Some(&seq) {
                return Err(format!(
                    "lease-name index does not map '{}' to seq {seq}",
                    w.lease_name
                ));
            }
            if self.lease_by_request.contains_key(id) {
                return Err(format!("request '{id}' is both waiting and leased"));
            }
            if w.selector != q.selector.to_string() || w.policy != q.policy.to_string() {
                return Err(format!(
                    "waiting '{id}': selector strings differ from the parsed ones"
                ));
            }
            if w.duration == 0 {
                return Err(format!("waiting '{id}' has duration 0"));
            }
            if w.idle_timeout == Some(0) || w.max_duration.is_some_and(|m| m < w.duration) {
                return Err(format!(
                    "waiting '{id}': idle timeout {:?} or hard limit {:?} out of range",
                    w.idle_timeout, w.max_duration
                ));
            }
            if !(w.arrived <= w.not_before && w.not_before <= w.wait_until) || w.arrived > now {
                return Err(format!(
                    "waiting '{id}': arrived {} not_before {} wait_until {} now {now} are out of order",
                    w.arrived, w.not_before, w.wait_until
                ));
            }
            if q.active != (w.not_before <= self.clock) {
                return Err(format!(
                    "waiting '{id}': active is {} at clock {} with not_before {}",
                    q.active, self.clock, w.not_before
                ));
            }
            if q.active == self.not_before_idx.contains(&(w.not_before, seq)) {
                return Err(format!("not-before index is wrong about waiting '{id}'"));
            }
            if !self.wait_until_idx.contains(&(w.wait_until, seq)) {
                return Err(format!("wait-until index is missing waiting '{id}'"));
            }
            let expected: BTreeSet<usize> = self
                .exporters
                .iter()
                .filter(|(n, e)| q.wants(n, &e.state.labels))
                .map(|(_, e)| e.slot)
                .collect();
            let actual: BTreeSet<usize> = q.cand.ones().collect();
            if expected != actual {
                return Err(format!(
                    "waiting '{id}': candidate slots {actual:?}, should be {expected:?}"
                ));
            }
            if q.active {
                if let Some((name, _)) = self.exporters.iter().find(|(n, e)| {
                    e.state.online
                        && e.state.enabled
                        && e.lease.is_none()
                        && e.state.cleaning.is_none()
                        && q.wants(n, &e.state.labels)
                }) {
                    return Err(format!(
                        "not work-conserving: active waiting '{id}' (seq {seq}) could have exporter '{name}'"
                    ));
                }
            }
        }
        let n = self.queue.len();
        if self.queue_by_id.len() != n
            || self.queue_by_lease.len() != n
            || self.wait_until_idx.len() != n
            || self.not_before_idx.len() != self.queue.values().filter(|q| !q.active).count()
        {
            return Err(format!(
                "waiting indexes disagree in size with the {n} waiting requests"
            ));
        }
        Ok(())
    }

    // ---- internals ----

    /// Advances the clock to `now` and does what is due; see the module documentation.
    fn advance(&mut self, now: Millis) -> Vec<Event> {
        let mut events = std::mem::take(&mut self.pending);
        self.clock = self.clock.max(now);
        let now = self.clock;
        self.process_due(&mut events);
        while let Some((until, name)) = self.cleaning_ends.first().cloned() {
            if until > now {
                break;
            }
            self.cleaning_ends.pop_first();
            if let Some(e) = self.exporters.get_mut(&name) {
                if let Some((_, lease)) = e.state.cleaning.take() {
                    events.push(Event::CleanupOverdue {
                        exporter: name.clone(),
                        lease,
                    });
                }
            }
            self.refresh_grantable(&name);
        }
        while let Some(&(not_before, seq)) = self.not_before_idx.first() {
            if not_before > now {
                break;
            }
            self.not_before_idx.pop_first();
            if let Some(q) = self.queue.get_mut(&seq) {
                q.active = true;
                self.dirty = true;
            }
        }
        self.fill(&mut events);
        while let Some(&(wait_until, seq)) = self.wait_until_idx.first() {
            if wait_until > now {
                break;
            }
            if let Some(q) = self.dequeue(seq) {
                events.push(Event::WaitExpired { request: q.w });
            }
        }
        events
    }

    /// Restores work conservation: each active waiter in seq order takes the lowest-named
    /// grantable candidate. Waiters that were already active only ever find exporters that
    /// became grantable since the last fill, so FIFO holds per exporter.
    fn fill(&mut self, events: &mut Vec<Event>) {
        if !std::mem::take(&mut self.dirty) || self.grantable.is_empty() {
            return;
        }
        let active: Vec<u64> = self
            .queue
            .iter()
            .filter(|(_, q)| q.active)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in active {
            let pick = self.queue[&seq]
                .cand
                .and_ones(&self.grantable)
                .filter_map(|slot| self.slots[slot].as_deref())
                .min()
                .map(str::to_owned);
            if let Some(exporter) = pick {
                self.grant_waiter(seq, exporter, events);
                if self.grantable.is_empty() {
                    break;
                }
            }
        }
    }

    /// Does what is due on leases up to the clock, in the order of its time: idle ends, then
    /// checkpoints, then ends at the same time (see the module documentation).
    fn process_due(&mut self, events: &mut Vec<Event>) {
        let now = self.clock;
        let due = |set: &BTreeSet<(Millis, String)>, kind: u8| {
            set.first()
                .filter(|(t, _)| *t <= now)
                .map(|(t, n)| (*t, kind, n.clone()))
        };
        loop {
            let next = [
                due(&self.idle_ends, 0),
                due(&self.checkpoints, 1),
                due(&self.lease_ends, 2),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some((t, kind, name)) = next else {
                break;
            };
            match kind {
                0 => self.end_lease(&name, EndReason::Idle, events),
                1 => {
                    // Judged once: in use, it is extended (its next checkpoint is later, so
                    // this loop ends at its hard limit); not in use, it leaves the index.
                    self.checkpoints.remove(&(t, name.clone()));
                    if self.leases.get(&name).is_some_and(|l| l.in_use_at(t)) {
                        let extended = self.modify_lease(&name, |l| {
                            if let Some(a) = l.auto_extend {
                                l.end = l.end.saturating_add(a.step).min(a.hard_end);
                            }
                        });
                        if let Some(lease) = extended {
                            events.push(Event::Extended { lease });
                        }
                    }
                }
                _ => self.end_lease(&name, EndReason::Expired, events),
            }
        }
    }

    /// Changes a live lease and keeps every index that depends on its times right; the lease
    /// as it is now (`None`: no such live lease).
    fn modify_lease(&mut self, name: &str, f: impl FnOnce(&mut Lease)) -> Option<Lease> {
        let l = self.leases.get_mut(name)?;
        let before = times(l);
        f(l);
        let after = times(l);
        let lease = l.clone();
        self.unindex(name, before);
        self.index(name, after);
        if let Some(e) = self.exporters.get(&lease.exporter) {
            if e.lease.as_deref() == Some(name) {
                self.slot_lease[e.slot] = Some((lease.end, name.to_owned()));
            }
        }
        self.changes.insert(Change::Lease(name.to_owned()));
        Some(lease)
    }

    fn index(&mut self, name: &str, (end, idle, check): LeaseTimes) {
        self.lease_ends.insert((end, name.to_owned()));
        if let Some(d) = idle {
            self.idle_ends.insert((d, name.to_owned()));
        }
        if let Some(c) = check {
            self.checkpoints.insert((c, name.to_owned()));
        }
    }

    fn unindex(&mut self, name: &str, (end, idle, check): LeaseTimes) {
        let name = name.to_owned();
        self.lease_ends.remove(&(end, name.clone()));
        if let Some(d) = idle {
            self.idle_ends.remove(&(d, name.clone()));
        }
        if let Some(c) = check {
            self.checkpoints.remove(&(c, name));
        }
    }

    fn grant_waiter(&mut self, seq: u64, exporter: String, events: &mut Vec<Event>) {
        let Some(q) = self.dequeue(seq) else {
            return;
        };
        let w = q.w;
        let lease = Lease {
            name: w.lease_name,
            client: w.client,
            exporter,
            selector: w.selector,
            request_id: w.request_id,
            requested: w.arrived,
            begin: self.clock,
            end: self.clock.saturating_add(w.duration),
            job: w.job,
            reserved: w.reserved,
            idle_timeout: w.idle_timeout,
            last_use: self.clock,
            attached: false,
            auto_extend: auto_extend(self.clock, w.duration, w.max_duration),
            idle_not_before: 0,
            shares: Vec::new(),
        };
        self.insert_lease(lease.clone());
        events.push(Event::Granted { lease });
    }

    fn alloc_slot(&mut self, name: &str) -> usize {
        match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot] = Some(name.to_owned());
                slot
            }
            None => {
                self.slots.push(Some(name.to_owned()));
                self.slot_lease.push(None);
                self.slots.len() - 1
            }
        }
    }

    /// Recomputes the grantable bit of `name`; an exporter that becomes grantable makes the
    /// book dirty (some waiter may want it).
    fn refresh_grantable(&mut self, name: &str) {
        let Some(e) = self.exporters.get(name) else {
            return;
        };
        let on =
            e.state.online && e.state.enabled && e.lease.is_none() && e.state.cleaning.is_none();
        if on && !self.grantable.get(e.slot) {
            self.dirty = true;
        }
        self.grantable.set(e.slot, on);
    }

    fn insert_lease(&mut self, lease: Lease) {
        if let Some(e) = self.exporters.get_mut(&lease.exporter) {
            e.lease = Some(lease.name.clone());
            self.grantable.set(e.slot, false);
            self.slot_lease[e.slot] = Some((lease.end, lease.name.clone()));
        }
        self.lease_by_request
            .insert(lease.request_id.clone(), lease.name.clone());
        self.index(&lease.name, times(&lease));
        self.changes.insert(Change::Lease(lease.name.clone()));
        self.leases.insert(lease.name.clone(), lease);
    }

    fn end_lease(&mut self, name: &str, reason: EndReason, events: &mut Vec<Event>) {
        let Some(lease) = self.leases.remove(name) else {
            return;
        };
        self.lease_by_request.remove(&lease.request_id);
        self.unindex(&lease.name, times(&lease));
        if let Some(e) = self.exporters.get_mut(&lease.exporter) {
            if e.lease.as_deref() == Some(name) {
                e.lease = None;
                self.slot_lease[e.slot] = None;
                // The board is cleaned before anyone else gets it: in the same step as the
                // end, so no grant can come in between.
                if let Some(d) = e.state.cleanup {
                    let until = self.clock.saturating_add(d);
                    if let Some((old, _)) = e.state.cleaning.take() {
                        self.cleaning_ends.remove(&(old, lease.exporter.clone()));
                    }
                    e.state.cleaning = Some((until, name.to_owned()));
                    self.cleaning_ends.insert((until, lease.exporter.clone()));
                }
            }
        }
        self.refresh_grantable(&lease.exporter);
        self.changes.insert(Change::Lease(lease.name.clone()));
        events.push(Event::Ended { lease, reason });
    }

    fn enqueue(&mut self, q: QueueEntry) {
        let seq = q.w.seq;
        self.queue_by_id.insert(q.w.request_id.clone(), seq);
        self.queue_by_lease.insert(q.w.lease_name.clone(), seq);
        if !q.active {
            self.not_before_idx.insert((q.w.not_before, seq));
        }
        self.wait_until_idx.insert((q.w.wait_until, seq));
        self.changes.insert(Change::Waiting(q.w.request_id.clone()));
        self.queue.insert(seq, q);
    }

    fn dequeue(&mut self, seq: u64) -> Option<QueueEntry> {
        let q = self.queue.remove(&seq)?;
        self.queue_by_id.remove(&q.w.request_id);
        self.queue_by_lease.remove(&q.w.lease_name);
        self.not_before_idx.remove(&(q.w.not_before, seq));
        self.wait_until_idx.remove(&(q.w.wait_until, seq));
        self.changes.insert(Change::Waiting(q.w.request_id.clone()));
        Some(q)
    }

    fn candidates_of(&self, q: &QueueEntry) -> Bits {
        let mut cand = Bits::default();
        for (name, e) in &self.exporters {
            if q.wants(name, &e.state.labels) {
                cand.set(e.slot, true);
            }
        }
        cand
    }

    fn scan(&self, selector: &Selector, policy: &Selector, exporter: Option<&str>) -> Scan {
        let mut scan = Scan {
            named_missing: exporter.is_some_and(|n| !self.exporters.contains_key(n)),
            ..Scan::default()
        };
        let mut visit = |e: &ExporterEntry| {
            if !selector.matches(&e.state.labels) {
                return;
            }
            scan.matching += 1;
            if !policy.matches(&e.state.labels) {
                return;
            }
            scan.candidates += 1;
            scan.cand.set(e.slot, true);
            if e.state.online && e.state.enabled {
                scan.usable += 1;
            }
        };
        match exporter {
            Some(n) => self.exporters.get(n).into_iter().for_each(&mut visit),
            None => self.exporters.values().for_each(visit),
        }
        scan
    }

    /// The lowest-named grantable candidate. Checks the cheap grantable bit before the
    /// selectors and stops at the first hit, so granting in a busy lab costs little more than
    /// walking the exporter names.
    fn first_grantable(
        &self,
        selector: &Selector,
        policy: &Selector,
        exporter: Option<&str>,
    ) -> Option<String> {
        let fits = |(_, e): &(&String, &ExporterEntry)| {
            self.grantable.get(e.slot)
                && selector.matches(&e.state.labels)
                && policy.matches(&e.state.labels)
        };
        match exporter {
            Some(n) => self.exporters.get_key_value(n).filter(fits),
            None => self.exporters.iter().find(fits),
        }
        .map(|(name, _)| name.clone())
    }

    /// The lease that ends first (then lowest name) among leases on the given slots.
    fn behind(&self, cand: &Bits) -> Option<String> {
        cand.ones()
            .filter_map(|slot| self.slot_lease.get(slot)?.as_ref())
            .min()
            .map(|(_, name)| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    /// A request for `selector` that does not wait, duration 100, lease name `L-{id}`.
    fn req(id: &str, selector: &str) -> NewRequest {
        NewRequest {
            request_id: id.to_owned(),
            lease_name: format!("L-{id}"),
            client: "alice".to_owned(),
            selector: sel(selector),
            policy: Selector::default(),
            exporter: None,
            duration: 100,
            not_before: 0,
            wait_until: None,
            job: None,
            reserved: false,
            idle_timeout: None,
            max_duration: None,
        }
    }

    fn wait_req(id: &str, selector: &str, wait_until: Millis) -> NewRequest {
        NewRequest {
            wait_until: Some(wait_until),
            ..req(id, selector)
        }
    }

    const RPI: &[(&str, &str)] = &[("board", "rpi4")];

    /// A book with these exporters registered, online and enabled at time 0; changes taken.
    fn book_with(exporters: &[(&str, &[(&str, &str)])]) -> LeaseBook {
        let mut b = LeaseBook::new();
        for (name, l) in exporters {
            assert!(b.upsert_exporter(0, name, labels(l), true).is_empty());
            assert!(b.set_online(0, name, true).is_empty());
        }
        b.take_changes();
        b
    }

    #[track_caller]
    fn granted(o: &Outcome) -> Lease {
        match o {
            Outcome::Granted(l) => l.clone(),
            other => panic!("expected Granted, got {other:?}"),
        }
    }

    #[track_caller]
    fn refused(o: &Outcome) -> Denial {
        match o {
            Outcome::Refused(r) => r.clone(),
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[track_caller]
    fn ok(b: &LeaseBook, now: Millis) {
        if let Err(e) = b.check_invariants(now) {
            panic!("invariant broken at {now}: {e}");
        }
    }

    fn grants(events: &[Event]) -> Vec<(String, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Granted { lease } => {
                    Some((lease.request_id.clone(), lease.exporter.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn ended(events: &[Event]) -> Vec<(String, EndReason)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Ended { lease, reason } => Some((lease.name.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn refusals_of_a_named_exporter_name_it() {
        let busy = Denial::AllBusy {
            matching: 1,
            behind: None,
        };
        let out = Denial::OutsidePolicy { matching: 1 };
        let off = Denial::AllOffline { matching: 1 };
        let m = out.message("", Some("board-b"), "team=a");
        assert_eq!(
            m,
            "exporter 'board-b' exists but this client's policy 'team=a' does not allow it"
        );
        assert_eq!(
            busy.message("", Some("board-b"), ""),
            "exporter 'board-b' exists but it is leased"
        );
        assert_eq!(
            off.message("soc=x", Some("board-b"), ""),
            "exporter 'board-b' matches 'soc=x' but it is not online and enabled"
        );
        assert_eq!(
            Denial::NoMatch.message("soc=x", Some("board-b"), ""),
            "exporter 'board-b' does not match selector 'soc=x'"
        );
        // No name and no selector: any exporter, never "matches '(any)'".
        assert_eq!(
            Denial::AllBusy {
                matching: 2,
                behind: None
            }
            .message("", None, ""),
            "2 exporters exist but all are leased"
        );
        assert_eq!(
            out.message("soc=x", None, "team=a"),
            "1 exporter matches 'soc=x' but none is allowed by this client's policy 'team=a'"
        );
    }

    #[test]
    fn an_exporter_that_cleans_up_is_granted_only_once_it_is_done_or_overdue() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        b.set_cleanup("rpi-1", Some(500));
        let l1 = granted(&b.request(10, req("r1", "board=rpi4")).0);
        // Someone waits; the lease is released: the same step starts the cleanup, so the
        // waiter is not granted the board yet.
        let (o, _) = b.request(20, wait_req("r2", "board=rpi4", 10_000));
        assert!(matches!(o, Outcome::Queued { .. }), "{o:?}");
        let ev = b.release(30, &l1.name);
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Released)]);
        assert!(grants(&ev).is_empty(), "granted while cleaning: {ev:?}");
        assert_eq!(
            b.exporter("rpi-1").unwrap().cleaning,
            Some((530, s("L-r1")))
        );
        ok(&b, 30);
        // A newcomer without --wait is refused as busy, not offline.
        assert!(matches!(
            refused(&b.request(40, req("r3", "board=rpi4")).0),
            Denial::AllBusy { .. }
        ));
        assert_eq!(b.next_deadline(), Some(530));
        // Done: the waiter gets it at once.
        let ev = b.set_cleaning(100, "rpi-1", None);
        assert_eq!(grants(&ev), vec![(s("r2"), s("rpi-1"))]);
        ok(&b, 100);
        // Its lease expires; this time the exporter never reports: overdue at its deadline.
        let (o, _) = b.request(110, wait_req("r4", "board=rpi4", 10_000));
        assert!(matches!(o, Outcome::Queued { .. }), "{o:?}");
        let ev = b.tick(200);
        assert_eq!(ended(&ev), vec![(s("L-r2"), EndReason::Expired)]);
        assert!(grants(&ev).is_empty());
        assert!(b.tick(699).is_empty());
        let ev = b.tick(700);
        assert!(ev.iter().any(|e| matches!(e, Event::CleanupOverdue { exporter, lease } if exporter == "rpi-1" && lease == "L-r2")), "{ev:?}");
        assert_eq!(grants(&ev), vec![(s("r4"), s("rpi-1"))]);
        ok(&b, 700);
        // A cleanup reported at registration holds the board the same way.
        let mut b = book_with(&[("rpi-1", RPI)]);
        let ev = b.set_cleaning(0, "rpi-1", Some((50, s("old"))));
        assert!(ev.is_empty());
        assert!(matches!(
            refused(&b.request(1, req("r1", "board=rpi4")).0),
            Denial::AllBusy { .. }
        ));
        ok(&b, 1);
        b.remove_exporter(2, "rpi-1");
        ok(&b, 2);
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn three_requests_two_exporters_third_waits_for_the_first_freed() {
        let mut b = book_with(&[("rpi-1", RPI), ("rpi-2", RPI), ("other", &[("board", "x")])]);
        let (o1, ev) = b.request(10, req("r1", "board=rpi4"));
        assert!(ev.is_empty());
        let l1 = granted(&o1);
        assert_eq!((l1.exporter.as_str(), l1.begin, l1.end), ("rpi-1", 10, 110));
        assert_eq!(
            (l1.name.as_str(), l1.selector.as_str()),
            ("L-r1", "board=rpi4")
        );
        let (o2, _) = b.request(
            20,
            NewRequest {
                duration: 50,
                ..req("r2", "board=rpi4")
            },
        );
        assert_eq!(granted(&o2).exporter, "rpi-2");
        let (o3, _) = b.request(30, wait_req("r3", "board=rpi4", 1000));
        assert_eq!(
            o3,
            Outcome::Queued {
                position: 1,
                behind: Some(s("L-r2"))
            }
        );
        ok(&b, 30);
        assert_eq!(b.next_deadline(), Some(70));
        assert!(b.tick(69).is_empty());
        let ev = b.tick(70);
        assert_eq!(ended(&ev), vec![(s("L-r2"), EndReason::Expired)]);
        assert_eq!(grants(&ev), vec![(s("r3"), s("rpi-2"))]);
        let l3 = b.lease_of_exporter("rpi-2").unwrap();
        assert_eq!(
            (l3.name.as_str(), l3.requested, l3.begin, l3.end),
            ("L-r3", 30, 70, 170)
        );
        assert_eq!(b.waiting().count(), 0);
        ok(&b, 70);
    }

    #[test]
    fn waiters_are_served_in_arrival_order_not_by_later_arrivals() {
        let mut b = book_with(&[("rpi-1", RPI), ("pi-0", &[("board", "pi0")])]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        granted(&b.request(0, req("p1", "board=pi0")).0);
        let o2 = b.request(1, wait_req("r2", "board=rpi4", 1000)).0;
        let o3 = b.request(2, wait_req("r3", "", 1000)).0;
        let o4 = b.request(3, wait_req("r4", "board=pi0", 1000)).0;
        assert_eq!(
            o2,
            Outcome::Queued {
                position: 1,
                behind: Some(s("L-r1"))
            }
        );
        // r3 takes any board, so it is behind r2 for rpi-1; pi0 leases end at the same time,
        // "behind" names the one that ends first, then by name.
        assert_eq!(
            o3,
            Outcome::Queued {
                position: 2,
                behind: Some(s("L-p1"))
            }
        );
        // r4 only competes with r3 (r2 does not want pi-0).
        assert_eq!(
            o4,
            Outcome::Queued {
                position: 2,
                behind: Some(s("L-p1"))
            }
        );
        ok(&b, 3);

        let ev = b.release(50, "L-r1");
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Released)]);
        assert_eq!(grants(&ev), vec![(s("r2"), s("rpi-1"))]);
        assert_eq!(b.position(50, "r3"), Some((1, Some(s("L-p1")))));
        let ev = b.release(60, "L-p1");
        assert_eq!(
            grants(&ev),
            vec![(s("r3"), s("pi-0"))],
            "r3 arrived before r4"
        );
        assert_eq!(b.position(60, "r4"), Some((1, Some(s("L-r3")))));
        ok(&b, 60);
        let ev = b.release(70, "L-r3");
        assert_eq!(grants(&ev), vec![(s("r4"), s("pi-0"))]);
        ok(&b, 70);
    }

    #[test]
    fn the_lowest_name_is_granted_and_a_specific_exporter_can_be_requested() {
        let mut b = book_with(&[("b", RPI), ("a", RPI)]);
        assert_eq!(
            granted(&b.request(0, req("r1", "board=rpi4")).0).exporter,
            "a"
        );
        // Wants "a" only, although "b" is free.
        let named = NewRequest {
            exporter: Some(s("a")),
            ..wait_req("r2", "", 500)
        };
        assert_eq!(
            b.request(1, named).0,
            Outcome::Queued {
                position: 1,
                behind: Some(s("L-r1"))
            }
        );
        // A later request for any rpi4 gets "b" at once: r2 does not want it.
        assert_eq!(
            granted(&b.request(2, req("r3", "board=rpi4")).0).exporter,
            "b"
        );
        ok(&b, 2);
        let ev = b.release(3, "L-r1");
        assert_eq!(grants(&ev), vec![(s("r2"), s("a"))]);

        // A name that is not registered: refused even with a wait (no wait can help); once
        // registered, but offline, it waits, and gets it once online.
        let named = NewRequest {
            exporter: Some(s("c")),
            ..wait_req("r4", "board=rpi4", 500)
        };
        assert_eq!(
            b.request(4, named.clone()).0,
            Outcome::Refused(Denial::NoSuchExporter(s("c")))
        );
        assert!(b.upsert_exporter(5, "c", labels(RPI), true).is_empty());
        ok(&b, 5);
        assert_eq!(
            b.request(5, named).0,
            Outcome::Queued {
                position: 1,
                behind: None
            }
        );
        let ev = b.set_online(6, "c", true);
        assert_eq!(grants(&ev), vec![(s("r4"), s("c"))]);
        ok(&b, 6);
    }

    #[test]
    fn a_begin_time_in_the_future_waits_until_then() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        // Not granted early although rpi-1 is free; without wait_until it waits until not_before.
        let future = NewRequest {
            not_before: 100,
            ..req("r1", "board=rpi4")
        };
        assert_eq!(
            b.request(10, future).0,
            Outcome::Queued {
                position: 1,
                behind: None
            }
        );
        let w = b.waiting_by_id("r1").unwrap().clone();
        assert_eq!((w.arrived, w.not_before, w.wait_until), (10, 100, 100));
        assert_eq!(b.next_deadline(), Some(100));
        ok(&b, 10);
        // Someone else may use the board in the meantime...
        assert_eq!(granted(&b.request(20, req("r2", "board=rpi4")).0).end, 120);
        // ... and then r1 gives up at its begin time, because wait_until defaulted to it.
        let ev = b.tick(100);
        assert!(matches!(&ev[..], [Event::WaitExpired { request }] if request.request_id == "r1"));
        ok(&b, 100);

        // With a wait window after the begin time it gets the board when it frees up.
        let future = NewRequest {
            not_before: 150,
            ..wait_req("r3", "board=rpi4", 300)
        };
        assert!(matches!(b.request(110, future).0, Outcome::Queued { .. }));
        let ev = b.tick(120);
        assert_eq!(ended(&ev), vec![(s("L-r2"), EndReason::Expired)]);
        assert!(grants(&ev).is_empty(), "not before 150");
        ok(&b, 120);
        assert_eq!(b.next_deadline(), Some(150));
        let ev = b.tick(150);
        assert_eq!(grants(&ev), vec![(s("r3"), s("rpi-1"))]);
        let l = b.lease("L-r3").unwrap();
        assert_eq!((l.requested, l.begin, l.end), (110, 150, 250));
        ok(&b, 150);

        // A wait_until before the begin time is stretched to the begin time.
        let early = NewRequest {
            not_before: 400,
            ..wait_req("r4", "board=rpi4", 300)
        };
        assert!(matches!(b.request(200, early).0, Outcome::Queued { .. }));
        assert_eq!(b.waiting_by_id("r4").unwrap().wait_until, 400);
    }

    #[test]
    fn a_request_whose_begin_has_come_is_served_before_a_newcomer() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        let future = NewRequest {
            not_before: 100,
            ..wait_req("r1", "board=rpi4", 200)
        };
        assert!(matches!(b.request(0, future).0, Outcome::Queued { .. }));
        // The server's timer is late: the next call comes at 150 and it is a new request.
        let (o, ev) = b.request(150, req("r2", "board=rpi4"));
        assert_eq!(grants(&ev), vec![(s("r1"), s("rpi-1"))]);
        assert!(matches!(refused(&o), Denial::AllBusy { matching: 1, .. }));
        ok(&b, 150);
    }

    #[test]
    fn waiting_gives_up_at_wait_until_but_is_served_first_if_possible() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, req("r1", "board=rpi4")).0); // ends 100
        assert!(matches!(
            b.request(1, wait_req("r2", "board=rpi4", 50)).0,
            Outcome::Queued { .. }
        ));
        b.take_changes();
        assert_eq!(b.next_deadline(), Some(50));
        assert!(b.tick(49).is_empty());
        let ev = b.tick(50);
        match &ev[..] {
            [Event::WaitExpired { request }] => {
                assert_eq!(
                    (request.request_id.as_str(), request.wait_until),
                    ("r2", 50)
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.take_changes(), vec![Change::Waiting(s("r2"))]);
        assert!(b.waiting_by_id("r2").is_none());
        ok(&b, 50);

        // Waits until exactly the end of the lease: served, not given up.
        assert!(matches!(
            b.request(60, wait_req("r3", "board=rpi4", 100)).0,
            Outcome::Queued { .. }
        ));
        let ev = b.tick(100);
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Expired)]);
        assert_eq!(grants(&ev), vec![(s("r3"), s("rpi-1"))]);
        assert_eq!(ev.len(), 2);
        ok(&b, 100);

        // A late tick: the wait ended at 150, the lease at 200, tick at 250 still serves it.
        assert!(matches!(
            b.request(110, wait_req("r4", "board=rpi4", 150)).0,
            Outcome::Queued { .. }
        ));
        let ev = b.tick(250);
        assert_eq!(grants(&ev), vec![(s("r4"), s("rpi-1"))]);
        assert_eq!(b.lease("L-r4").unwrap().begin, 250);
        ok(&b, 250);
    }

    #[test]
    fn an_offline_exporter_keeps_its_lease_until_it_expires() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        b.take_changes();
        assert!(b.set_online(10, "rpi-1", false).is_empty());
        assert_eq!(b.lease_of_exporter("rpi-1").unwrap().name, "L-r1");
        assert!(!b.exporter("rpi-1").unwrap().online);
        assert_eq!(b.take_changes(), vec![], "online is not persisted");
        assert_eq!(
            refused(&b.request(20, req("r2", "board=rpi4")).0),
            Denial::AllOffline { matching: 1 }
        );
        assert!(matches!(
            b.request(30, wait_req("r3", "board=rpi4", 1000)).0,
            Outcome::Queued { .. }
        ));
        let ev = b.tick(100);
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Expired)]);
        assert!(grants(&ev).is_empty(), "offline");
        ok(&b, 100);
        let ev = b.set_online(120, "rpi-1", true);
        assert_eq!(grants(&ev), vec![(s("r3"), s("rpi-1"))]);
        ok(&b, 120);
    }

    #[test]
    fn disabling_ends_the_lease_and_enabling_grants_again() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        assert!(matches!(
            b.request(1, wait_req("r2", "board=rpi4", 1000)).0,
            Outcome::Queued { .. }
        ));
        b.take_changes();
        let ev = b.upsert_exporter(10, "rpi-1", labels(RPI), false);
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::ExporterDisabled)]);
        assert!(grants(&ev).is_empty(), "disabled exporters are not granted");
        assert_eq!(
            b.take_changes(),
            vec![Change::Lease(s("L-r1")), Change::Exporter(s("rpi-1"))]
        );
        ok(&b, 10);
        assert_eq!(
            refused(&b.request(11, req("r3", "board=rpi4")).0),
            Denial::AllOffline { matching: 1 }
        );
        let ev = b.upsert_exporter(20, "rpi-1", labels(RPI), true);
        assert_eq!(grants(&ev), vec![(s("r2"), s("rpi-1"))]);
        ok(&b, 20);
        // An upsert that changes nothing records nothing.
        b.take_changes();
        assert!(b.upsert_exporter(21, "rpi-1", labels(RPI), true).is_empty());
        assert_eq!(b.take_changes(), vec![]);
    }

    #[test]
    fn a_label_change_can_make_a_waiter_match() {
        // "y" matches but is offline, so r1 may wait; "x" comes to match it.
        let mut b = book_with(&[("x", &[("board", "old")]), ("y", RPI)]);
        assert!(b.set_online(0, "y", false).is_empty());
        // Nothing registered matches: no wait can help.
        assert_eq!(
            b.request(0, wait_req("r0", "board=imx8", 1000)).0,
            Outcome::Refused(Denial::NoMatch)
        );
        assert!(matches!(
            b.request(0, wait_req("r1", "board=rpi4", 1000)).0,
            Outcome::Queued {
                position: 1,
                behind: None
            }
        ));
        let ev = b.upsert_exporter(5, "x", labels(RPI), true);
        assert_eq!(grants(&ev), vec![(s("r1"), s("x"))]);
        ok(&b, 5);
        // A label change does not end a lease that no longer matches.
        assert!(b
            .upsert_exporter(6, "x", labels(&[("board", "new")]), true)
            .is_empty());
        assert!(b.lease("L-r1").is_some());
        ok(&b, 6);
    }

    #[test]
    fn a_narrowed_policy_withdraws_what_it_forbids_and_a_wider_one_grants() {
        let mut b = book_with(&[
            ("a", &[("board", "rpi4"), ("team", "x")]),
            ("b", &[("board", "rpi4"), ("team", "y")]),
            ("c", &[("board", "imx8"), ("team", "x")]),
        ]);
        // alice holds "a", reserves any rpi4 for later, and waits for an imx8 behind c2.
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        granted(
            &b.request(
                0,
                NewRequest {
                    client: s("c2"),
                    ..req("r2", "board=imx8")
                },
            )
            .0,
        );
        let reserve = NewRequest {
            not_before: 100,
            ..wait_req("r3", "board=rpi4", 500)
        };
        assert!(matches!(b.request(1, reserve).0, Outcome::Queued { .. }));
        assert!(matches!(
            b.request(1, wait_req("r4", "board=imx8", 500)).0,
            Outcome::Queued { .. }
        ));
        b.take_changes();
        // Now alice may use team y only: her lease on "a" ends, the rpi4 reservation waits for
        // "b" alone, the imx8 request can never be served and is withdrawn.
        let (ev, withdrawn) = b.set_policy(2, "alice", &sel("team=y"));
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::PolicyChanged)]);
        let withdrawn: Vec<(&str, &Denial)> = withdrawn
            .iter()
            .map(|(w, r)| (w.request_id.as_str(), r))
            .collect();
        assert_eq!(
            withdrawn,
            vec![("r4", &Denial::OutsidePolicy { matching: 1 })]
        );
        assert_eq!(b.candidates("r3"), vec!["b"]);
        assert_eq!(b.waiting_by_id("r3").unwrap().policy, "team=y");
        ok(&b, 2);
        // Widening again lets the reservation take "a" at its begin; nothing else changes.
        let (ev, withdrawn) = b.set_policy(3, "alice", &sel(""));
        assert!(ev.is_empty() && withdrawn.is_empty());
        assert_eq!(b.candidates("r3"), vec!["a", "b"]);
        let ev = b.tick(100);
        assert_eq!(grants(&ev), vec![(s("r3"), s("a"))]);
        ok(&b, 100);
    }

    #[test]
    fn the_client_policy_limits_the_candidates() {
        let mut b = book_with(&[
            ("a", &[("board", "rpi4"), ("project", "other")]),
            ("b", &[("board", "rpi4"), ("project", "other")]),
            ("c", &[("board", "rpi4"), ("project", "mine")]),
        ]);
        let mine = |id: &str| NewRequest {
            policy: sel("project=mine"),
            ..req(id, "board=rpi4")
        };
        assert_eq!(granted(&b.request(0, mine("r1")).0).exporter, "c");
        assert_eq!(
            refused(&b.request(1, mine("r2")).0),
            Denial::AllBusy {
                matching: 1,
                behind: Some(s("L-r1"))
            }
        );
        let outside = NewRequest {
            policy: sel("project=mine"),
            ..req("r3", "project=other")
        };
        let r = refused(&b.request(2, outside).0);
        assert_eq!(r, Denial::OutsidePolicy { matching: 2 });
        assert_eq!(
            r.message("project=other", None, "project=mine"),
            "2 exporters match 'project=other' but none is allowed by this client's policy 'project=mine'"
        );
        // The policy also limits who waits for what: the waiter is not granted "a" or "b".
        assert!(matches!(
            b.request(
                3,
                NewRequest {
                    wait_until: Some(100),
                    ..mine("r4")
                }
            )
            .0,
            Outcome::Queued { .. }
        ));
        ok(&b, 3);
    }

    #[test]
    fn each_refusal_names_the_most_specific_reason() {
        let mut b = book_with(&[("rpi-1", RPI), ("rpi-2", RPI)]);
        assert!(b
            .upsert_exporter(0, "off", labels(&[("board", "pi0")]), true)
            .is_empty());
        assert!(b
            .upsert_exporter(0, "dis", labels(&[("board", "pi0")]), false)
            .is_empty());
        assert!(b.set_online(0, "dis", true).is_empty());

        let named = NewRequest {
            exporter: Some(s("nope")),
            ..req("n", "")
        };
        let r = refused(&b.request(1, named).0);
        assert_eq!(r, Denial::NoSuchExporter(s("nope")));
        assert_eq!(
            r.message("", None, ""),
            "no exporter named 'nope' is registered"
        );

        let r = refused(&b.request(1, req("m", "board=x")).0);
        assert_eq!(r, Denial::NoMatch);
        assert_eq!(
            r.message("board=x", None, ""),
            "no exporter matches selector 'board=x'"
        );
        // A named exporter that does not match the selector.
        let named = NewRequest {
            exporter: Some(s("rpi-1")),
            ..req("m2", "board=pi0")
        };
        assert_eq!(refused(&b.request(1, named).0), Denial::NoMatch);

        let r = refused(
            &b.request(
                1,
                NewRequest {
                    policy: sel("team=x"),
                    ..req("p", "board=rpi4")
                },
            )
            .0,
        );
        assert_eq!(r, Denial::OutsidePolicy { matching: 2 });

        let r = refused(&b.request(1, req("o", "board=pi0")).0);
        assert_eq!(r, Denial::AllOffline { matching: 2 });
        assert_eq!(
            r.message("board=pi0", None, ""),
            "2 exporters match 'board=pi0' but none is online and enabled"
        );

        granted(
            &b.request(
                1,
                NewRequest {
                    duration: 300,
                    ..req("g1", "board=rpi4")
                },
            )
            .0,
        );
        granted(
            &b.request(
                1,
                NewRequest {
                    duration: 200,
                    ..req("g2", "board=rpi4")
                },
            )
            .0,
        );
        let r = refused(&b.request(2, req("busy", "board=rpi4")).0);
        assert_eq!(
            r,
            Denial::AllBusy {
                matching: 2,
                behind: Some(s("L-g2"))
            }
        );
        assert_eq!(
            r.message("board=rpi4", None, ""),
            "2 exporters match 'board=rpi4' but all are leased (next free: lease L-g2)"
        );
        // wait_until <= now does not wait either.
        assert!(matches!(
            refused(&b.request(2, wait_req("busy2", "board=rpi4", 2)).0),
            Denial::AllBusy { .. }
        ));

        let r = refused(
            &b.request(
                2,
                NewRequest {
                    duration: 0,
                    ..wait_req("d", "", 100)
                },
            )
            .0,
        );
        assert_eq!(r, Denial::BadDuration);
        assert!(r.message("", None, "").contains("greater than zero"));

        let dup = NewRequest {
            lease_name: s("L-g1"),
            ..wait_req("dup", "board=rpi4", 100)
        };
        let r = refused(&b.request(2, dup).0);
        assert_eq!(r, Denial::LeaseNameInUse(s("L-g1")));
        assert_eq!(
            r.message("", None, ""),
            "lease name 'L-g1' is already in use"
        );

        assert_eq!(
            Denial::NoMatch.message("", None, ""),
            "no exporter is registered"
        );
        assert_eq!(
            Denial::AllOffline { matching: 1 }.message("", None, ""),
            "1 exporter exists but it is not online and enabled"
        );
        assert_eq!(
            Denial::AllBusy {
                matching: 1,
                behind: None
            }
            .message("a=b", None, ""),
            "1 exporter matches 'a=b' but it is leased"
        );
        assert_eq!(b.waiting().count(), 0, "refusals queue nothing");
        assert_eq!(b.leases().count(), 2);
        ok(&b, 2);
    }

    #[test]
    fn a_repeated_request_id_gets_its_current_state() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        let l1 = granted(&b.request(0, req("r1", "board=rpi4")).0);
        assert!(matches!(
            b.request(1, wait_req("r2", "board=rpi4", 500)).0,
            Outcome::Queued { .. }
        ));
        b.take_changes();
        // A retry, even with different parameters, changes nothing.
        let retry = NewRequest {
            duration: 0,
            lease_name: s("other"),
            ..req("r1", "x=y")
        };
        assert_eq!(
            b.request(5, retry).0,
            Outcome::Existing(RequestState::Leased(l1))
        );
        assert_eq!(
            b.request(6, wait_req("r2", "board=rpi4", 500)).0,
            Outcome::Existing(RequestState::Waiting {
                position: 1,
                behind: Some(s("L-r1")),
                wait_until: 500
            })
        );
        assert_eq!(b.take_changes(), vec![]);
        assert_eq!(b.waiting().count(), 1);
        // Once the lease has ended the id is forgotten and a new request may use it.
        b.release(7, "L-r1");
        assert_eq!(b.lease("L-r2").unwrap().request_id, "r2");
        assert!(matches!(
            b.request(8, wait_req("r1", "board=rpi4", 500)).0,
            Outcome::Queued { .. }
        ));
        ok(&b, 8);
    }

    #[test]
    fn release_withdraws_a_waiting_request() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        assert!(matches!(
            b.request(1, wait_req("r2", "board=rpi4", 500)).0,
            Outcome::Queued { .. }
        ));
        assert!(matches!(
            b.request(2, wait_req("r3", "board=rpi4", 500)).0,
            Outcome::Queued { position: 2, .. }
        ));
        b.take_changes();
        assert!(b.release(3, "L-r2").is_empty());
        assert_eq!(b.take_changes(), vec![Change::Waiting(s("r2"))]);
        assert_eq!(b.position(3, "r3"), Some((1, Some(s("L-r1")))));
        assert!(b.release(3, "no-such-lease").is_empty());
        assert_eq!(b.take_changes(), vec![]);
        let ev = b.release(4, "L-r1");
        assert_eq!(grants(&ev), vec![(s("r3"), s("rpi-1"))]);
        assert_eq!(
            b.take_changes(),
            vec![
                Change::Lease(s("L-r1")),
                Change::Lease(s("L-r3")),
                Change::Waiting(s("r3"))
            ]
        );
        ok(&b, 4);
    }

    /// A lease that asks for an idle timeout of 10 and a hard limit of `max` (if any).
    fn live_req(id: &str, idle: Option<Millis>, max: Option<Millis>) -> NewRequest {
        NewRequest {
            idle_timeout: idle,
            max_duration: max,
            ..req(id, "board=rpi4")
        }
    }

    #[test]
    fn a_lease_nothing_uses_ends_as_idle_and_its_waiter_gets_the_board() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        let l = granted(&b.request(0, live_req("r1", Some(10), None)).0);
        assert_eq!((l.last_use, l.idle_deadline()), (0, Some(10)));
        assert!(matches!(
            b.request(1, wait_req("r2", "board=rpi4", 1000)).0,
            Outcome::Queued { .. }
        ));
        // A use moves the deadline: nothing happens at the old one.
        let (touched, ev) = b.touch(5, "L-r1");
        assert!(ev.is_empty());
        assert_eq!(touched.unwrap().idle_deadline(), Some(15));
        assert_eq!(b.next_deadline(), Some(15));
        assert!(b.tick(14).is_empty());
        ok(&b, 14);
        let ev = b.tick(15);
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Idle)]);
        assert_eq!(grants(&ev), vec![(s("r2"), s("rpi-1"))]);
        ok(&b, 15);
        // Touching what ended finds nothing.
        assert_eq!(b.touch(16, "L-r1").0, None);
        // Without an idle timeout a lease only ends at its end.
        let l = b.lease("L-r2").unwrap();
        assert_eq!(
            (l.idle_timeout, l.idle_deadline(), l.end),
            (None, None, 115)
        );
    }

    #[test]
    fn an_attached_lease_never_ends_as_idle_and_its_timeout_starts_when_the_session_leaves() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, live_req("r1", Some(10), None)).0);
        // A session of another lease (an old one, say) is no use of this one.
        assert!(b.set_attached(3, "rpi-1", Some("L-old")).is_empty());
        assert!(!b.lease("L-r1").unwrap().attached);
        assert!(b.set_attached(4, "rpi-1", Some("L-r1")).is_empty());
        let l = b.lease("L-r1").unwrap();
        assert!(l.attached && l.idle_deadline().is_none());
        assert_eq!(b.next_deadline(), Some(100), "only its end is due");
        b.take_changes();
        assert!(
            b.tick(60).is_empty(),
            "in use for far longer than its idle timeout"
        );
        // The same report again changes nothing (nothing to store).
        assert!(b.set_attached(61, "rpi-1", Some("L-r1")).is_empty());
        assert!(b.take_changes().is_empty());
        // The session leaves: the idle timeout runs from then.
        assert!(b.set_attached(70, "rpi-1", None).is_empty());
        assert_eq!(b.take_changes(), vec![Change::Lease(s("L-r1"))]);
        assert_eq!(b.lease("L-r1").unwrap().idle_deadline(), Some(80));
        assert!(b.tick(79).is_empty());
        assert_eq!(ended(&b.tick(80)), vec![(s("L-r1"), EndReason::Idle)]);
        ok(&b, 80);
        // A report from an exporter without a lease, or an unknown one, is ignored.
        assert!(b.set_attached(81, "rpi-1", Some("L-r1")).is_empty());
        assert!(b.set_attached(81, "nope", None).is_empty());
        ok(&b, 81);
    }

    #[test]
    fn an_auto_extending_lease_grows_while_used_up_to_its_hard_limit() {
        let mut b = book_with(&[("rpi-1", RPI), ("rpi-2", RPI)]);
        // Step 100, hard limit 250 from its begin, idle timeout 30.
        let l = granted(&b.request(0, live_req("r1", Some(30), Some(250))).0);
        assert_eq!(
            l.auto_extend,
            Some(AutoExtend {
                step: 100,
                hard_end: 250
            })
        );
        assert_eq!(l.checkpoint(), Some(50));
        b.set_attached(10, "rpi-1", Some("L-r1"));
        assert_eq!(b.next_deadline(), Some(50));
        let ev = b.tick(50);
        match &ev[..] {
            [Event::Extended { lease }] => {
                assert_eq!((lease.end, lease.checkpoint()), (200, Some(150)))
            }
            other => panic!("{other:?}"),
        }
        ok(&b, 50);
        // A late tick does everything due in order: extended at 150 to the hard limit, then
        // it ends there (still in use: the hard limit is the end).
        let ev = b.tick(400);
        match &ev[..] {
            [Event::Extended { lease }, Event::Ended {
                lease: gone,
                reason: EndReason::Expired,
            }] => {
                assert_eq!((lease.end, lease.checkpoint()), (250, None));
                assert_eq!(gone.end, 250);
            }
            other => panic!("{other:?}"),
        }
        ok(&b, 400);

        // Not in use at its checkpoint: not extended, and with an idle timeout it ends as idle
        // before that anyway.
        let l = granted(&b.request(400, live_req("r2", Some(30), Some(1000))).0);
        assert_eq!(l.exporter, "rpi-1");
        let ev = b.tick(450);
        assert_eq!(ended(&ev), vec![(s("L-r2"), EndReason::Idle)]);
        assert!(!ev.iter().any(|e| matches!(e, Event::Extended { .. })));

        // Without an idle timeout, "in use" is a use within the last half step: its grant
        // alone is not, so it is not extended at its checkpoint; a use before its end extends
        // it, and one not used again ends at its end.
        granted(&b.request(500, live_req("r3", None, Some(1000))).0);
        assert_eq!(b.next_deadline(), Some(550));
        assert!(b.tick(550).is_empty());
        assert_eq!(b.lease("L-r3").unwrap().end, 600);
        ok(&b, 550);
        let (l, ev) = b.touch(560, "L-r3");
        assert_eq!(l.unwrap().end, 700);
        assert!(matches!(&ev[..], [Event::Extended { lease }] if lease.end == 700));
        ok(&b, 560);
        assert!(
            b.tick(650).is_empty(),
            "last used 90 ago, more than half a step"
        );
        assert_eq!(ended(&b.tick(700)), vec![(s("L-r3"), EndReason::Expired)]);
        ok(&b, 700);
    }

    #[test]
    fn set_end_of_an_auto_extending_lease_past_its_hard_limit_moves_the_limit() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, live_req("r1", None, Some(150))).0);
        let l = b.set_end(10, "L-r1", 400).unwrap();
        assert_eq!(l.auto_extend.unwrap().hard_end, 400);
        assert_eq!(l.checkpoint(), None);
        let l = b.set_end(10, "L-r1", 120).unwrap();
        assert_eq!(
            (l.auto_extend.unwrap().hard_end, l.checkpoint()),
            (400, Some(70))
        );
        ok(&b, 10);
    }

    #[test]
    fn liveness_survives_a_restart_of_the_book() {
        let mut b = book_with(&[("rpi-1", RPI), ("rpi-2", RPI)]);
        granted(&b.request(0, live_req("r1", Some(10), None)).0);
        granted(&b.request(0, live_req("r2", Some(10), Some(500))).0);
        b.set_attached(5, "rpi-1", Some("L-r1"));
        b.touch(7, "L-r2");
        let (exporters, leases, waiting) = parts(&b);
        let mut r = LeaseBook::restore(exporters, leases, waiting);
        ok(&r, 7);
        assert_eq!(r.take_changes(), vec![]);
        assert!(
            r.lease("L-r1").unwrap().attached,
            "kept until its exporter says otherwise"
        );
        assert_eq!(r.lease("L-r2").unwrap().idle_deadline(), Some(17));
        // Time passes while the book is down: the unattached lease, idle since 7, ends at the
        // first call; the attached one's exporter registers again and says nobody is attached,
        // so its timeout starts then.
        let ev = r.set_online(30, "rpi-1", true);
        assert_eq!(ended(&ev), vec![(s("L-r2"), EndReason::Idle)]);
        assert!(r.set_attached(30, "rpi-1", None).is_empty());
        assert!(r.tick(39).is_empty());
        assert_eq!(ended(&r.tick(40)), vec![(s("L-r1"), EndReason::Idle)]);
        ok(&r, 40);
        // Records a consistent book never writes are repaired.
        let mut bad = b.lease("L-r2").unwrap().clone();
        bad.last_use = 0;
        bad.begin = 3;
        bad.idle_timeout = Some(0);
        bad.auto_extend = Some(AutoExtend {
            step: 100,
            hard_end: 1,
        });
        let r = LeaseBook::restore(vec![(s("rpi-2"), labels(RPI), true)], vec![bad], vec![]);
        ok(&r, 3);
        let l = r.lease("L-r2").unwrap();
        assert_eq!((l.last_use, l.idle_timeout), (3, None));
        assert_eq!(l.auto_extend.unwrap().hard_end, l.end);
    }

    #[test]
    fn after_a_restart_idle_ends_wait_for_the_exporters_to_report() {
        let mut b = book_with(&[("rpi-1", RPI), ("rpi-2", RPI)]);
        granted(&b.request(0, live_req("r1", Some(10), None)).0);
        granted(&b.request(0, live_req("r2", Some(10), None)).0);
        let (exporters, leases, waiting) = parts(&b);
        let mut r = LeaseBook::restore(exporters, leases, waiting);
        // Down from 0 to 30: both deadlines (10) passed; the exporters may register until 50.
        r.hold_idle_ends(50);
        assert_eq!(r.next_deadline(), Some(50));
        assert!(r.set_online(30, "rpi-1", true).is_empty());
        assert!(r.set_online(30, "rpi-2", true).is_empty());
        // rpi-1's session attached while the controller was down: it says so, and is in use.
        assert!(r.set_attached(40, "rpi-1", Some("L-r1")).is_empty());
        assert!(r.tick(49).is_empty());
        // Nobody used L-r2: it ends once the hold is over, not later.
        assert_eq!(ended(&r.tick(50)), vec![(s("L-r2"), EndReason::Idle)]);
        assert!(r.lease("L-r1").is_some_and(|l| l.attached));
        ok(&r, 50);
    }

    #[test]
    fn a_narrower_policy_caps_idle_timeouts_and_hard_limits() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, live_req("r1", None, Some(1000))).0);
        assert!(matches!(
            b.request(
                1,
                NewRequest {
                    idle_timeout: Some(500),
                    max_duration: Some(800),
                    ..wait_req("r2", "board=rpi4", 5000)
                }
            )
            .0,
            Outcome::Queued { .. }
        ));
        b.take_changes();
        let ev = b.limit_client(20, "alice", Some(15), 300);
        // Unused since its grant at 0, it is idle for longer than its new timeout: it ends,
        // and the waiter (with its own limits capped) gets the board.
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Idle)]);
        assert_eq!(grants(&ev), vec![(s("r2"), s("rpi-1"))]);
        let l = b.lease("L-r2").unwrap();
        assert_eq!(l.idle_timeout, Some(15));
        assert_eq!(l.auto_extend.unwrap().hard_end, 20 + 300);
        ok(&b, 20);
    }

    #[test]
    fn set_end_extends_and_shortens() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        b.take_changes();
        assert_eq!(b.set_end(10, "L-r1", 500).unwrap().end, 500);
        assert_eq!(b.take_changes(), vec![Change::Lease(s("L-r1"))]);
        assert_eq!(b.next_deadline(), Some(500));
        assert!(b.tick(100).is_empty());
        assert_eq!(b.set_end(200, "L-r1", 300).unwrap().end, 300);
        assert!(b.tick(299).is_empty());
        // Shortened into the past: ends at the next tick, which is due at once.
        assert_eq!(b.set_end(299, "L-r1", 50).unwrap().end, 50);
        ok(&b, 299);
        assert_eq!(b.next_deadline(), Some(50));
        let ev = b.tick(299);
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::Expired)]);
        assert!(b.set_end(300, "L-r1", 400).unwrap_err().contains("L-r1"));
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn removing_an_exporter_or_a_client_ends_their_leases() {
        let mut b = book_with(&[("rpi-1", RPI), ("rpi-2", RPI)]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        let bob = |r: NewRequest| NewRequest {
            client: s("bob"),
            ..r
        };
        granted(&b.request(0, bob(req("r2", "board=rpi4"))).0);
        assert!(matches!(
            b.request(1, bob(wait_req("r3", "board=rpi4", 500))).0,
            Outcome::Queued { .. }
        ));
        assert!(matches!(
            b.request(2, wait_req("r4", "board=rpi4", 500)).0,
            Outcome::Queued { .. }
        ));
        b.take_changes();

        // bob goes: his lease ends, his waiting request is dropped silently, and the
        // freed exporter goes to alice's r4, not to bob's r3.
        let ev = b.remove_client(10, "bob");
        assert_eq!(ended(&ev), vec![(s("L-r2"), EndReason::ClientRemoved)]);
        assert_eq!(grants(&ev), vec![(s("r4"), s("rpi-2"))]);
        assert_eq!(ev.len(), 2);
        assert!(b.waiting_by_id("r3").is_none());
        assert_eq!(
            b.take_changes(),
            vec![
                Change::Lease(s("L-r2")),
                Change::Lease(s("L-r4")),
                Change::Waiting(s("r3")),
                Change::Waiting(s("r4"))
            ]
        );
        ok(&b, 10);

        let ev = b.remove_exporter(20, "rpi-1");
        assert_eq!(ended(&ev), vec![(s("L-r1"), EndReason::ExporterRemoved)]);
        assert!(b.exporter("rpi-1").is_none());
        assert_eq!(
            b.take_changes(),
            vec![Change::Lease(s("L-r1")), Change::Exporter(s("rpi-1"))]
        );
        ok(&b, 20);
        // The slot is reused by the next registration.
        assert!(b.upsert_exporter(21, "rpi-3", labels(RPI), true).is_empty());
        assert_eq!(b.exporters.get("rpi-3").unwrap().slot, 0);
        ok(&b, 21);
    }

    #[test]
    fn position_counts_earlier_active_waiters_that_compete() {
        let mut b = book_with(&[
            ("a", &[("k", "a")]),
            ("b", &[("k", "b")]),
            ("c", &[("k", "c")]),
        ]);
        for (id, s_) in [("la", "k=a"), ("lb", "k=b"), ("lc", "k=c")] {
            granted(&b.request(0, req(id, s_)).0);
        }
        let q = |b: &mut LeaseBook, r: NewRequest| match b.request(1, r).0 {
            Outcome::Queued { position, .. } => position,
            other => panic!("{other:?}"),
        };
        assert_eq!(q(&mut b, wait_req("w1", "k=a", 1000)), 1);
        assert_eq!(q(&mut b, wait_req("w2", "k=b", 1000)), 1);
        assert_eq!(q(&mut b, wait_req("w3", "k in (a,b)", 1000)), 3);
        assert_eq!(q(&mut b, wait_req("w4", "k=c", 1000)), 1);
        // Not active yet at now=1: a future request is not ahead of anyone until it begins...
        let future = NewRequest {
            not_before: 50,
            ..wait_req("w5", "k=c", 1000)
        };
        assert_eq!(
            q(&mut b, future),
            2,
            "its own place counts w4, active by then"
        );
        assert_eq!(
            q(&mut b, wait_req("w6", "k=c", 1000)),
            2,
            "w5 is not active yet"
        );
        assert_eq!(
            b.position(60, "w6"),
            Some((3, Some(s("L-lc")))),
            "w5 is active at 60"
        );
        assert_eq!(b.position(1, "nope"), None);
        ok(&b, 1);
    }

    #[test]
    fn take_changes_is_sorted_and_deduplicated() {
        let mut b = LeaseBook::new();
        b.upsert_exporter(0, "z", labels(RPI), true);
        b.upsert_exporter(0, "a", labels(RPI), true);
        b.set_online(0, "z", true);
        granted(&b.request(0, req("r1", "")).0);
        b.set_end(0, "L-r1", 10).unwrap();
        b.set_end(0, "L-r1", 20).unwrap();
        assert!(matches!(
            b.request(0, wait_req("r2", "", 50)).0,
            Outcome::Queued { .. }
        ));
        assert_eq!(
            b.take_changes(),
            vec![
                Change::Lease(s("L-r1")),
                Change::Waiting(s("r2")),
                Change::Exporter(s("a")),
                Change::Exporter(s("z"))
            ]
        );
        assert_eq!(b.take_changes(), vec![]);
    }

    #[test]
    fn time_does_not_go_backwards() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        assert!(b.tick(1000).is_empty());
        let l = granted(&b.request(500, req("r1", "")).0);
        assert_eq!((l.begin, l.end), (1000, 1100));
        assert_eq!(b.clock(), 1000);
    }

    #[test]
    fn next_deadline_is_the_earliest_thing_to_do() {
        let mut b = book_with(&[("rpi-1", RPI)]);
        assert_eq!(b.next_deadline(), None);
        granted(
            &b.request(
                0,
                NewRequest {
                    duration: 300,
                    ..req("r1", "")
                },
            )
            .0,
        );
        assert_eq!(b.next_deadline(), Some(300));
        b.request(0, wait_req("r2", "", 200));
        assert_eq!(b.next_deadline(), Some(200));
        b.request(
            0,
            NewRequest {
                not_before: 100,
                ..wait_req("r3", "", 250)
            },
        );
        assert_eq!(b.next_deadline(), Some(100));
        b.tick(100);
        assert_eq!(b.next_deadline(), Some(200));
    }

    fn populated() -> LeaseBook {
        let mut b = book_with(&[("a", RPI), ("b", RPI), ("c", &[("board", "pi0")])]);
        granted(&b.request(0, req("r1", "board=rpi4")).0);
        granted(&b.request(5, req("r2", "")).0);
        b.request(6, wait_req("r3", "board=rpi4", 500));
        b.request(
            7,
            NewRequest {
                not_before: 300,
                ..wait_req("r4", "board=pi0", 600)
            },
        );
        b.request(
            8,
            NewRequest {
                exporter: Some(s("b")),
                ..wait_req("r5", "", 700)
            },
        );
        b.set_online(9, "c", false);
        b.take_changes();
        b
    }

    /// What the server persists: the arguments of `restore`.
    type Parts = (Vec<(String, Labels, bool)>, Vec<Lease>, Vec<Waiting>);

    fn parts(b: &LeaseBook) -> Parts {
        (
            b.exporters()
                .map(|(n, e)| (n.clone(), e.labels.clone(), e.enabled))
                .collect(),
            b.leases().cloned().collect(),
            b.waiting().cloned().collect(),
        )
    }

    #[test]
    fn restore_rebuilds_an_equal_book() {
        let b = populated();
        ok(&b, 9);
        let (exporters, leases, waiting) = parts(&b);
        let mut r = LeaseBook::restore(exporters, leases, waiting);
        ok(&r, 9);
        assert_eq!(parts(&r), parts(&b));
        assert!(
            r.exporters().all(|(_, e)| !e.online),
            "exporters come back offline"
        );
        assert_eq!(r.take_changes(), vec![]);
        for id in ["r1", "r2", "r3", "r4", "r5"] {
            assert_eq!(r.request_state(9, id), b.request_state(9, id), "{id}");
        }
        assert_eq!(r.next_deadline(), b.next_deadline());
        // seq continues above the restored ones.
        let max = r.waiting().map(|w| w.seq).max().unwrap();
        assert!(matches!(
            r.request(10, wait_req("r6", "", 800)).0,
            Outcome::Queued { .. }
        ));
        assert!(r.waiting_by_id("r6").unwrap().seq > max);
        // Once the boards reconnect it behaves like the original.
        let mut orig = b.clone();
        assert!(matches!(
            orig.request(10, wait_req("r6", "", 800)).0,
            Outcome::Queued { .. }
        ));
        for name in ["a", "b"] {
            assert!(r.set_online(11, name, true).is_empty());
        }
        let (e1, e2) = (r.release(12, "L-r1"), orig.release(12, "L-r1"));
        assert_eq!(e1, e2);
        assert_eq!(parts(&r), parts(&orig));
        ok(&r, 12);
    }

    #[test]
    fn restore_repairs_records_a_consistent_book_never_has() {
        let b = populated();
        let (mut exporters, mut leases, mut waiting) = parts(&b);
        exporters.retain(|(n, _, _)| n != "a"); // L-r1 was on "a"
        exporters.iter_mut().find(|e| e.0 == "b").unwrap().2 = false; // L-r2 is on "b"
        let mut dup = waiting[0].clone();
        dup.seq = 99;
        waiting.push(dup); // same request_id as r3
        let mut bad = waiting[1].clone();
        bad.request_id = s("bad");
        bad.lease_name = s("L-bad");
        bad.selector = s("((");
        waiting.push(bad);
        let mut twice = leases[1].clone();
        twice.name = s("L-twice");
        twice.request_id = s("twice");
        leases.push(twice); // on "b" as well
        waiting[0].selector = s(" board = rpi4 "); // r3, not canonical
        let mut r = LeaseBook::restore(exporters, leases, waiting);
        ok(&r, 9);
        assert_eq!(r.leases().count(), 0);
        assert_eq!(
            r.waiting()
                .map(|w| w.request_id.as_str())
                .collect::<Vec<_>>(),
            ["r3", "r4", "r5"]
        );
        assert_eq!(
            r.take_changes(),
            vec![
                Change::Lease(s("L-r1")),
                Change::Lease(s("L-r2")),
                Change::Lease(s("L-twice")),
                Change::Waiting(s("bad")),
                Change::Waiting(s("r3"))
            ]
        );
        assert_eq!(r.waiting_by_id("r3").unwrap().selector, "board=rpi4");
        assert_eq!(
            r.next_deadline(),
            Some(r.clock()),
            "the pending events are due"
        );
        let ev = r.tick(10);
        assert_eq!(
            ended(&ev),
            vec![
                (s("L-r1"), EndReason::ExporterRemoved),
                (s("L-r2"), EndReason::ExporterDisabled)
            ]
        );
        ok(&r, 10);
    }

    #[test]
    fn check_invariants_names_what_is_wrong() {
        let b = populated();
        ok(&b, 9);

        let mut x = b.clone();
        let mut second = x.leases["L-r1"].clone();
        second.name = s("L-x");
        second.request_id = s("x");
        x.leases.insert(s("L-x"), second);
        let e = x.check_invariants(9).unwrap_err();
        assert!(e.contains("two leases on exporter 'a'"), "{e}");

        let mut x = b.clone();
        let slot = x.exporters["c"].slot;
        x.exporters.get_mut("c").unwrap().state.online = true;
        let e = x.check_invariants(9).unwrap_err();
        assert!(e.contains("grantable index"), "{e}");
        x.grantable.set(slot, true);
        // r4 (board=pi0) is not active yet, so that is fine; make it active.
        let seq = x.queue_by_id["r4"];
        let q = x.queue.get_mut(&seq).unwrap();
        x.not_before_idx.remove(&(q.w.not_before, seq));
        q.w.not_before = 7;
        q.active = true;
        let e = x.check_invariants(9).unwrap_err();
        assert!(
            e.contains("not work-conserving: active waiting 'r4'"),
            "{e}"
        );
        assert!(e.contains("'c'"), "{e}");

        let mut x = b.clone();
        x.lease_by_request.clear();
        let e = x.check_invariants(9).unwrap_err();
        assert!(e.contains("request index"), "{e}");

        let mut x = b.clone();
        x.queue.values_mut().next().unwrap().cand = Bits::default();
        let e = x.check_invariants(9).unwrap_err();
        assert!(e.contains("candidate slots"), "{e}");

        let mut x = b.clone();
        x.next_seq = 0;
        let e = x.check_invariants(9).unwrap_err();
        assert!(e.contains("next seq"), "{e}");

        let mut x = b.clone();
        x.exporters.remove("b");
        let e = x.check_invariants(9).unwrap_err();
        assert!(
            e.contains("slots are named") || e.contains("not registered"),
            "{e}"
        );
    }

    #[test]
    fn end_reasons_read_well() {
        let all = [
            EndReason::Expired,
            EndReason::Released,
            EndReason::ExporterRemoved,
            EndReason::ExporterDisabled,
            EndReason::ClientRemoved,
        ];
        let text: Vec<String> = all.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            text,
            [
                "expired",
                "released",
                "exporter removed",
                "exporter disabled",
                "client removed"
            ]
        );
    }

    #[test]
    fn lease_and_waiting_round_trip_through_json() {
        let b = populated();
        for l in b.leases() {
            let back: Lease = serde_json::from_str(&serde_json::to_string(l).unwrap()).unwrap();
            assert_eq!(&back, l);
        }
        for w in b.waiting() {
            let back: Waiting = serde_json::from_str(&serde_json::to_string(w).unwrap()).unwrap();
            assert_eq!(&back, w);
        }
    }

    /// 10,000 exporters and 1,000 waiting requests, as the server expects to hold. Prints
    /// timings; the point is that it finishes quickly (nothing quadratic per operation).
    #[test]
    fn scales_to_ten_thousand_exporters_and_a_thousand_waiters() {
        use std::time::Instant;
        let mut b = LeaseBook::new();
        let t = Instant::now();
        for i in 0..10_000 {
            let l = labels(&[
                ("board", &format!("b{}", i % 10)),
                ("rack", &format!("r{}", i % 100)),
            ]);
            b.upsert_exporter(0, &format!("e{i:05}"), l, true);
            b.set_online(0, &format!("e{i:05}"), true);
        }
        let register = t.elapsed();
        let t = Instant::now();
        for i in 0..10_000 {
            // Every exporter leased, ending at different times.
            let r = NewRequest {
                duration: 1_000 + i,
                ..req(&format!("g{i}"), &format!("board=b{}", i % 10))
            };
            granted(&b.request(1, r).0);
        }
        let grant = t.elapsed();
        let t = Instant::now();
        for i in 0..1_000u64 {
            let selector = match i % 3 {
                0 => String::new(),
                1 => format!("board=b{}", i % 10),
                _ => format!("rack=r{}", i % 100),
            };
            let o = b
                .request(2, wait_req(&format!("w{i}"), &selector, 1_000_000))
                .0;
            assert!(matches!(o, Outcome::Queued { .. }), "{o:?}");
        }
        let queue = t.elapsed();
        let t = Instant::now();
        let mut served = 0;
        for i in 0..200 {
            served += grants(&b.release(3, &format!("L-g{i}"))).len();
        }
        let release = t.elapsed();
        assert_eq!(served, 200);
        let t = Instant::now();
        for i in 0..100 {
            b.position(3, &format!("w{}", 999 - i));
        }
        let position = t.elapsed();
        let t = Instant::now();
        let ev = b.tick(1_000 + 1_500);
        let tick = t.elapsed();
        assert!(grants(&ev).len() >= 500);
        eprintln!(
            "10k exporters: register {register:?}, 10k grants {grant:?}, 1k queued {queue:?}, \
             200 releases {release:?}, 100 positions {position:?}, tick of {} events {tick:?}",
            ev.len()
        );
    }

    // ---- property tests ----

    /// "e6" is never registered.
    const EXPORTER_NAMES: &[&str] = &["e0", "e1", "e2", "e3", "e4", "e5", "e6"];
    const REGISTERED: usize = 6;
    const LABEL_SETS: &[&[(&str, &str)]] = &[
        &[],
        &[("a", "x")],
        &[("a", "y")],
        &[("a", "x"), ("b", "x")],
        &[("a", "y"), ("b", "y")],
        &[("b", "x")],
    ];
    const SELECTORS: &[&str] = &["", "a=x", "a=y", "b", "!b", "a in (x,y)", "a=x,b=x", "a!=x"];
    const POLICIES: &[&str] = &["", "", "", "a=x", "b!=y"];
    const CLIENTS: &[&str] = &["c0", "c1", "c2"];

    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes without a call.
        Advance(Millis),
        Tick,
        /// Jump to `next_deadline` (checking nothing happens just before it) and tick.
        TickAtDeadline,
        Register {
            exporter: usize,
            labels: usize,
            enabled: bool,
        },
        Online {
            exporter: usize,
            online: bool,
        },
        Remove(usize),
        RemoveClient(usize),
        /// A client's policy changes (an admin narrows or widens it).
        SetPolicy {
            client: usize,
            policy: usize,
        },
        Request {
            client: usize,
            selector: usize,
            policy: usize,
            exporter: Option<usize>,
            duration: Millis,
            delay: Option<Millis>,
            wait: Option<Millis>,
            reuse_id: Option<usize>,
            reuse_name: Option<usize>,
            idle: Option<Millis>,
            max_duration: Option<Millis>,
        },
        Release(usize),
        SetEnd(usize, i64),
        /// restore() from the records, then the previously online exporters reconnect.
        Restart,
        /// An exporter declares (or drops) a cleanup after each lease.
        Cleanup {
            exporter: usize,
            cleanup: Option<Millis>,
        },
        /// An exporter reports its cleanup done.
        Cleaned(usize),
        /// A call names a lease (one of the live ones, else a missing one).
        Touch(usize),
        /// An exporter reports a session: 0 none, 1 its current lease, 2 some other lease.
        Attach {
            exporter: usize,
            which: usize,
        },
        /// A client's policy caps idle timeouts and lease durations.
        Limit {
            client: usize,
            max_idle: Option<Millis>,
            max_duration: Millis,
        },
    }

    fn arb_request() -> impl Strategy<Value = Op> {
        (
            0..CLIENTS.len(),
            0..SELECTORS.len(),
            0..POLICIES.len(),
            proptest::option::weighted(0.15, 0..EXPORTER_NAMES.len()),
            prop_oneof![1 => Just(0u64), 25 => 1u64..80],
            proptest::option::weighted(0.2, 1u64..60),
            proptest::option::weighted(0.7, 0u64..120),
            proptest::option::weighted(0.05, any::<usize>()),
            proptest::option::weighted(0.03, any::<usize>()),
            proptest::option::weighted(0.5, 0u64..40),
            proptest::option::weighted(0.4, 0u64..200),
        )
            .prop_map(
                |(
                    client,
                    selector,
                    policy,
                    exporter,
                    duration,
                    delay,
                    wait,
                    reuse_id,
                    reuse_name,
                    idle,
                    max_duration,
                )| {
                    Op::Request {
                        client,
                        selector,
                        policy,
                        exporter,
                        duration,
                        delay,
                        wait,
                        reuse_id,
                        reuse_name,
                        idle,
                        max_duration,
                    }
                },
            )
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..40).prop_map(Op::Advance),
            2 => Just(Op::Tick),
            3 => Just(Op::TickAtDeadline),
            3 => (0..REGISTERED, 0..LABEL_SETS.len(), proptest::bool::weighted(0.85))
                .prop_map(|(exporter, labels, enabled)| Op::Register { exporter, labels, enabled }),
            3 => (0..REGISTERED, proptest::bool::weighted(0.7))
                .prop_map(|(exporter, online)| Op::Online { exporter, online }),
            1 => (0..REGISTERED).prop_map(Op::Remove),
            1 => (0..CLIENTS.len()).prop_map(Op::RemoveClient),
            2 => (0..CLIENTS.len(), 0..POLICIES.len())
                .prop_map(|(client, policy)| Op::SetPolicy { client, policy }),
            12 => arb_request(),
            3 => any::<usize>().prop_map(Op::Release),
            2 => (any::<usize>(), -30i64..80).prop_map(|(i, d)| Op::SetEnd(i, d)),
            1 => Just(Op::Restart),
            2 => (0..REGISTERED, proptest::option::weighted(0.7, 1u64..60))
                .prop_map(|(exporter, cleanup)| Op::Cleanup { exporter, cleanup }),
            3 => (0..REGISTERED).prop_map(Op::Cleaned),
            4 => any::<usize>().prop_map(Op::Touch),
            5 => (0..EXPORTER_NAMES.len(), prop_oneof![2 => Just(0usize), 5 => Just(1usize), 1 => Just(2usize)])
                .prop_map(|(exporter, which)| Op::Attach { exporter, which }),
            1 => (0..CLIENTS.len(), proptest::option::weighted(0.7, 1u64..30), 1u64..150)
                .prop_map(|(client, max_idle, max_duration)| Op::Limit { client, max_idle, max_duration }),
        ]
    }

    /// The persisted view of a book, to diff against `take_changes`.
    #[derive(Debug, Clone, PartialEq)]
    struct Snapshot {
        leases: BTreeMap<String, Lease>,
        waiting: BTreeMap<String, Waiting>,
        exporters: BTreeMap<String, (Labels, bool)>,
    }

    fn snapshot(b: &LeaseBook) -> Snapshot {
        Snapshot {
            leases: b.leases().map(|l| (l.name.clone(), l.clone())).collect(),
            waiting: b
                .waiting()
                .map(|w| (w.request_id.clone(), w.clone()))
                .collect(),
            exporters: b
                .exporters()
                .map(|(n, e)| (n.clone(), (e.labels.clone(), e.enabled)))
                .collect(),
        }
    }

    fn waiter_wants(w: &Waiting, exporter: &str, labels: Option<&Labels>) -> bool {
        labels.is_some_and(|l| {
            is_candidate(
                &sel(&w.selector),
                &sel(&w.policy),
                w.exporter.as_deref(),
                exporter,
                l,
            )
        })
    }

    /// The refusal a request should get, from the exporters alone.
    fn naive_refusal(
        b: &LeaseBook,
        selector: &Selector,
        policy: &Selector,
        exporter: Option<&str>,
    ) -> Denial {
        if let Some(n) = exporter.filter(|n| b.exporter(n).is_none()) {
            return Denial::NoSuchExporter(n.to_owned());
        }
        let matching: Vec<(&String, &ExporterState)> = b
            .exporters()
            .filter(|(n, e)| {
                exporter.is_none_or(|x| x == n.as_str()) && selector.matches(&e.labels)
            })
            .collect();
        let candidates: Vec<_> = matching
            .iter()
            .filter(|(_, e)| policy.matches(&e.labels))
            .collect();
        let usable = candidates
            .iter()
            .filter(|(_, e)| e.online && e.enabled)
            .count();
        let behind = candidates
            .iter()
            .filter_map(|(n, _)| b.lease_of_exporter(n))
            .min_by(|x, y| (x.end, &x.name).cmp(&(y.end, &y.name)))
            .map(|l| l.name.clone());
        match (matching.len(), candidates.len(), usable) {
            (0, _, _) => Denial::NoMatch,
            (m, 0, _) => Denial::OutsidePolicy { matching: m },
            (_, c, 0) => Denial::AllOffline { matching: c },
            (_, c, _) => Denial::AllBusy {
                matching: c,
                behind,
            },
        }
    }

    /// A refusal no wait can change.
    fn is_unservable(r: &Denial) -> bool {
        matches!(
            r,
            Denial::NoSuchExporter(_) | Denial::NoMatch | Denial::OutsidePolicy { .. }
        )
    }

    /// Position from scratch: earlier waiters, active by `max(now, not_before)`, sharing a
    /// registered candidate.
    fn naive_position(b: &LeaseBook, now: Millis, w: &Waiting) -> u32 {
        let at = now.max(w.not_before);
        let cands = |x: &Waiting| -> BTreeSet<String> {
            b.exporters()
                .filter(|(n, e)| waiter_wants(x, n, Some(&e.labels)))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let mine = cands(w);
        1 + b
            .waiting()
            .filter(|x| x.seq < w.seq && x.not_before <= at && !cands(x).is_disjoint(&mine))
            .count() as u32
    }

    #[derive(Default)]
    struct Harness {
        book: LeaseBook,
        now: Millis,
        counter: u64,
        stats: BTreeMap<&'static str, usize>,
    }

    impl Harness {
        fn stat(&mut self, what: &'static str) {
            *self.stats.entry(what).or_default() += 1;
        }

        /// Checks one call that returned `events` (and, for a request, its own grant).
        fn check_call(
            &mut self,
            pre: &Snapshot,
            events: &[Event],
            immediate: Option<&Lease>,
        ) -> Result<(), String> {
            let now = self.now;
            let b = &mut self.book;
            b.check_invariants(now)?;
            let post = snapshot(b);

            // take_changes: sorted, deduplicated, and covering every record that differs.
            let changes = b.take_changes();
            let mut sorted = changes.clone();
            sorted.sort();
            sorted.dedup();
            if sorted != changes {
                return Err(format!(
                    "take_changes not sorted and deduplicated: {changes:?}"
                ));
            }
            let changes: BTreeSet<Change> = changes.into_iter().collect();
            let missing = |differs: bool, c: Change| -> Result<(), String> {
                if differs && !changes.contains(&c) {
                    return Err(format!(
                        "{c:?} changed but is not in take_changes {changes:?}"
                    ));
                }
                Ok(())
            };
            for k in pre.leases.keys().chain(post.leases.keys()) {
                missing(
                    pre.leases.get(k) != post.leases.get(k),
                    Change::Lease(k.clone()),
                )?;
            }
            for k in pre.waiting.keys().chain(post.waiting.keys()) {
                missing(
                    pre.waiting.get(k) != post.waiting.get(k),
                    Change::Waiting(k.clone()),
                )?;
            }
            for k in pre.exporters.keys().chain(post.exporters.keys()) {
                missing(
                    pre.exporters.get(k) != post.exporters.get(k),
                    Change::Exporter(k.clone()),
                )?;
            }

            // FIFO: nobody got exporter E while an earlier active waiter wanting E was left
            // waiting (still waiting after the call, served later in it, or given up in it).
            let queue_grants = events.iter().enumerate().filter_map(|(i, e)| match e {
                Event::Granted { lease } => Some((i, lease)),
                _ => None,
            });
            let all_grants: Vec<(usize, &Lease)> = queue_grants
                .chain(immediate.map(|l| (events.len(), l)))
                .collect();
            for (i, lease) in all_grants {
                let seq = match pre.waiting.get(&lease.request_id) {
                    Some(w) => w.seq,
                    None if i < events.len() => {
                        return Err(format!(
                            "Granted {} which was not waiting",
                            lease.request_id
                        ))
                    }
                    None => u64::MAX,
                };
                // (An immediate grant's end is checked against its request.)
                let duration = pre
                    .waiting
                    .get(&lease.request_id)
                    .map(|w| w.duration)
                    .filter(|_| i < events.len());
                if lease.begin != b.clock()
                    || duration.is_some_and(|d| lease.end != lease.begin + d)
                {
                    return Err(format!(
                        "lease {} does not begin now or has the wrong end",
                        lease.name
                    ));
                }
                let e = &lease.exporter;
                let pre_labels = pre.exporters.get(e).map(|x| &x.0);
                let post_labels = post.exporters.get(e).map(|x| &x.0);
                for w in pre.waiting.values() {
                    // What it wants now: a policy change in this call may have narrowed it.
                    let now_w = post.waiting.get(&w.request_id).unwrap_or(w);
                    if w.seq >= seq
                        || w.not_before > b.clock()
                        || !waiter_wants(w, e, pre_labels)
                        || !waiter_wants(now_w, e, post_labels)
                    {
                        continue;
                    }
                    self.stats
                        .entry("fifo: earlier waiter checked")
                        .and_modify(|n| *n += 1)
                        .or_insert(1);
                    let id = &w.request_id;
                    let still = post.waiting.contains_key(id);
                    let later =
                        events.get(i + 1..).unwrap_or(&[]).iter().any(
                            |e| matches!(e, Event::Granted { lease } if lease.request_id == *id),
                        );
                    // Events are in the order things happened: giving up before this grant
                    // (an earlier step of the same call) is no violation.
                    let gave_up = events.get(i + 1..).unwrap_or(&[]).iter().any(
                        |e| matches!(e, Event::WaitExpired { request } if request.request_id == *id),
                    );
                    if still || later || gave_up {
                        return Err(format!(
                            "FIFO: {} (seq {seq}) got {e} while earlier {id} (seq {}) wanted it \
                             (still waiting {still}, served later {later}, gave up {gave_up})",
                            lease.request_id, w.seq
                        ));
                    }
                }
            }
            // Liveness: an idle end only for a lease that nobody used for its idle timeout;
            // an extension only of a lease in use, by one step within its hard limit; an
            // auto-extending lease expiring below its hard limit was not in use.
            let clock = b.clock();
            let mut ends: BTreeMap<String, Millis> =
                pre.leases.iter().map(|(n, l)| (n.clone(), l.end)).collect();
            for e in events {
                match e {
                    Event::Ended {
                        lease,
                        reason: EndReason::Idle,
                    } => {
                        let due = lease.idle_deadline().is_some_and(|d| d <= clock);
                        if lease.attached || !due {
                            return Err(format!("{lease:?} ended as idle at {clock}"));
                        }
                        self.stat("event: idle");
                    }
                    Event::Ended {
                        lease,
                        reason: EndReason::Expired,
                    } => {
                        if lease.end > clock {
                            return Err(format!("{lease:?} expired at {clock}"));
                        }
                        if let Some(c) = lease.checkpoint() {
                            if lease.in_use_at(c) {
                                return Err(format!(
                                    "{lease:?} in use at its checkpoint {c} expired unextended"
                                ));
                            }
                            self.stat("event: expired while auto-extending, not in use");
                        } else if lease.auto_extend.is_some() {
                            self.stat("event: auto-extended lease reached its hard limit");
                        }
                    }
                    Event::Extended { lease } => {
                        let Some(a) = lease.auto_extend else {
                            return Err(format!("extended {lease:?} which does not auto-extend"));
                        };
                        let before = ends.get(&lease.name).copied().unwrap_or(lease.begin);
                        let expected = before.saturating_add(a.step).min(a.hard_end);
                        let checkpoint = before.saturating_sub(a.step / 2);
                        if lease.end != expected
                            || checkpoint > clock
                            || !lease.in_use_at(checkpoint)
                        {
                            return Err(format!(
                                "extended {lease:?} from {before} at {clock} (checkpoint {checkpoint})"
                            ));
                        }
                        ends.insert(lease.name.clone(), lease.end);
                        if lease.end.saturating_sub(lease.begin) > 2 * a.step {
                            self.stat("extended past twice its first duration");
                        }
                    }
                    _ => {}
                }
            }
            for e in events {
                self.stat(match e {
                    Event::Granted { .. } => "event: granted from queue",
                    Event::Ended {
                        reason: EndReason::Expired,
                        ..
                    } => "event: expired",
                    Event::Ended { .. } => "event: ended otherwise",
                    Event::WaitExpired { .. } => "event: wait expired",
                    Event::CleanupOverdue { .. } => "event: cleanup overdue",
                    Event::Extended { .. } => "event: extended",
                });
            }
            Ok(())
        }

        /// After a call that advanced the book: nothing is left due on a lease (every idle
        /// deadline and end is later than the clock, and a checkpoint at or before it was
        /// judged: the lease was not in use then).
        fn nothing_due(&self) -> Result<(), String> {
            let clock = self.book.clock();
            for l in self.book.leases() {
                let idle_due = l.idle_deadline().is_some_and(|d| d <= clock);
                let check_due = l.checkpoint().is_some_and(|c| c <= clock && l.in_use_at(c));
                if l.end <= clock || idle_due || check_due {
                    return Err(format!(
                        "{l:?} is due at clock {clock} after an advancing call"
                    ));
                }
            }
            Ok(())
        }

        fn fresh(&mut self, prefix: &str) -> String {
            self.counter += 1;
            format!("{prefix}{}", self.counter)
        }

        fn step(&mut self, op: &Op) -> Result<(), String> {
            let pre = snapshot(&self.book);
            let now = self.now;
            match op {
                Op::Advance(dt) => {
                    self.now += dt;
                    return Ok(());
                }
                Op::Tick => {
                    let ev = self.book.tick(now);
                    self.check_call(&pre, &ev, None)?;
                }
                Op::TickAtDeadline => {
                    let Some(d) = self.book.next_deadline() else {
                        return Ok(());
                    };
                    if d > self.book.clock() + 1 {
                        // Nothing happens before the deadline.
                        let mut early = self.book.clone();
                        let ev = early.tick(d - 1);
                        if !ev.is_empty() || !early.take_changes().is_empty() {
                            return Err(format!(
                                "tick({}) before next_deadline {d} did {ev:?}",
                                d - 1
                            ));
                        }
                    }
                    self.now = self.now.max(d);
                    let ev = self.book.tick(self.now);
                    if ev.is_empty() && d >= now {
                        self.stat("deadline tick without events");
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Register {
                    exporter,
                    labels: l,
                    enabled,
                } => {
                    let ev = self.book.upsert_exporter(
                        now,
                        EXPORTER_NAMES[*exporter],
                        labels(LABEL_SETS[*l]),
                        *enabled,
                    );
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Online { exporter, online } => {
                    let ev = self
                        .book
                        .set_online(now, EXPORTER_NAMES[*exporter], *online);
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Cleanup { exporter, cleanup } => {
                    self.book.set_cleanup(EXPORTER_NAMES[*exporter], *cleanup);
                }
                Op::Cleaned(e) => {
                    let name = EXPORTER_NAMES[*e];
                    let ev = self.book.set_cleaning(now, name, None);
                    if self
                        .book
                        .exporter(name)
                        .is_some_and(|x| x.cleaning.is_some())
                    {
                        return Err(format!("{name} still cleaning after it reported done"));
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Remove(e) => {
                    let name = EXPORTER_NAMES[*e];
                    let ev = self.book.remove_exporter(now, name);
                    if self.book.exporter(name).is_some()
                        || self.book.leases().any(|l| l.exporter == name)
                    {
                        return Err(format!("{name} still there after removal"));
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::RemoveClient(c) => {
                    let client = CLIENTS[*c];
                    let ev = self.book.remove_client(now, client);
                    if self.book.leases().any(|l| l.client == client)
                        || self.book.waiting().any(|w| w.client == client)
                    {
                        return Err(format!("{client} still has leases or waiting requests"));
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::SetPolicy { client, policy } => {
                    let (client, policy) = (CLIENTS[*client], sel(POLICIES[*policy]));
                    let (ev, withdrawn) = self.book.set_policy(now, client, &policy);
                    let b = &self.book;
                    for (w, why) in &withdrawn {
                        let expected =
                            naive_refusal(b, &sel(&w.selector), &policy, w.exporter.as_deref());
                        if !is_unservable(&expected) || *why != expected {
                            return Err(format!(
                                "withdrew {} for {why:?}, expected {expected:?}",
                                w.request_id
                            ));
                        }
                        if w.client != client || !pre.waiting.contains_key(&w.request_id) {
                            return Err(format!("withdrew {w:?}, not a waiter of {client}"));
                        }
                    }
                    for w in b.waiting().filter(|w| w.client == client) {
                        let r = naive_refusal(b, &sel(&w.selector), &policy, w.exporter.as_deref());
                        if w.policy != policy.to_string() || is_unservable(&r) {
                            return Err(format!(
                                "{w:?} kept waiting under policy '{policy}' ({r:?})"
                            ));
                        }
                    }
                    for l in b.leases().filter(|l| l.client == client) {
                        if b.exporter(&l.exporter)
                            .is_some_and(|e| !policy.matches(&e.labels))
                        {
                            return Err(format!("{l:?} outlived a policy that forbids it"));
                        }
                    }
                    if !withdrawn.is_empty() {
                        self.stat("policy: withdrew a waiter");
                    }
                    if ev.iter().any(|e| {
                        matches!(
                            e,
                            Event::Ended {
                                reason: EndReason::PolicyChanged,
                                ..
                            }
                        )
                    }) {
                        self.stat("policy: ended a lease");
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Release(i) => {
                    let mut names: Vec<String> = pre.leases.keys().cloned().collect();
                    names.extend(pre.waiting.values().map(|w| w.lease_name.clone()));
                    names.push(s("no-such-lease"));
                    let name = &names[i % names.len()];
                    let ev = self.book.release(now, name);
                    if self.book.lease(name).is_some()
                        || self.book.waiting().any(|w| w.lease_name == *name)
                    {
                        return Err(format!("{name} still there after release"));
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::SetEnd(i, delta) => {
                    let names: Vec<&String> = pre.leases.keys().collect();
                    let end = (now as i64 + delta).max(0) as Millis;
                    if names.is_empty() {
                        if self.book.set_end(now, "nope", end).is_ok() {
                            return Err(s("set_end of a missing lease succeeded"));
                        }
                    } else {
                        let name = names[i % names.len()];
                        let lease = self.book.set_end(now, name, end)?;
                        if lease.end != end || self.book.lease(name) != Some(&lease) {
                            return Err(format!("set_end({name}, {end}) gave {lease:?}"));
                        }
                    }
                    self.check_call(&pre, &[], None)?;
                }
                Op::Restart => {
                    let (exporters, leases, waiting) = parts(&self.book);
                    let online: Vec<String> = self
                        .book
                        .exporters()
                        .filter(|(_, e)| e.online)
                        .map(|(n, _)| n.clone())
                        .collect();
                    let mut restored = LeaseBook::restore(exporters, leases, waiting);
                    restored.check_invariants(now)?;
                    if !restored.take_changes().is_empty() || snapshot(&restored) != pre {
                        return Err(s("restore did not rebuild an equal book"));
                    }
                    for id in pre.waiting.keys() {
                        if restored.request_state(now, id) != self.book.request_state(now, id) {
                            return Err(format!("restore changed the state of {id}"));
                        }
                    }
                    // Idle ends wait a little for the exporters to say what is attached.
                    restored.hold_idle_ends(now + 3);
                    self.book = restored;
                    self.stat("restart");
                    for name in online {
                        let pre = snapshot(&self.book);
                        let ev = self.book.set_online(now, &name, true);
                        self.check_call(&pre, &ev, None)?;
                    }
                }
                Op::Touch(i) => {
                    let mut names: Vec<String> = pre.leases.keys().cloned().collect();
                    names.push(s("no-such-lease"));
                    let name = &names[i % names.len()];
                    let (lease, ev) = self.book.touch(now, name);
                    let clock = self.book.clock();
                    match &lease {
                        Some(l) => {
                            if l.last_use != clock || self.book.lease(name) != Some(l) {
                                return Err(format!("touch({name}) gave {l:?} at {clock}"));
                            }
                            self.stat("touch");
                        }
                        None if self.book.lease(name).is_some() => {
                            return Err(format!("touch({name}) found no live lease, but it is"));
                        }
                        None => {}
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Attach { exporter, which } => {
                    let name = EXPORTER_NAMES[*exporter];
                    let current = self.book.lease_of_exporter(name).map(|l| l.name.clone());
                    let said = match which {
                        0 => None,
                        1 => current.clone(),
                        _ => Some(s("some-other-lease")),
                    };
                    let ev = self.book.set_attached(now, name, said.as_deref());
                    // The exporter's lease after the call (a new grant may have come with
                    // advancing) is attached exactly when the report named it.
                    if let Some(l) = self.book.lease_of_exporter(name) {
                        if current.as_ref() == Some(&l.name)
                            && l.attached != (said.as_ref() == Some(&l.name))
                        {
                            return Err(format!("{name} said {said:?}, its lease is {l:?}"));
                        }
                        if l.attached {
                            self.stat("attached");
                        }
                    }
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Limit {
                    client,
                    max_idle,
                    max_duration,
                } => {
                    let client = CLIENTS[*client];
                    let ev = self
                        .book
                        .limit_client(now, client, *max_idle, *max_duration);
                    for l in self.book.leases().filter(|l| l.client == client) {
                        let idle_ok = match (max_idle, l.idle_timeout) {
                            (None, _) => true,
                            (Some(m), Some(d)) => d <= *m,
                            (Some(_), None) => false,
                        };
                        let hard_ok = l
                            .auto_extend
                            .is_none_or(|a| a.hard_end <= (l.begin + max_duration).max(l.end));
                        if !idle_ok || !hard_ok {
                            return Err(format!(
                                "{l:?} outlived the limits {max_idle:?} {max_duration}"
                            ));
                        }
                    }
                    self.stat("limit");
                    self.check_call(&pre, &ev, None)?;
                }
                Op::Request {
                    client,
                    selector,
                    policy,
                    exporter,
                    duration,
                    delay,
                    wait,
                    reuse_id,
                    reuse_name,
                    idle,
                    max_duration,
                } => {
                    let mut ids: Vec<String> = pre.waiting.keys().cloned().collect();
                    ids.extend(pre.leases.values().map(|l| l.request_id.clone()));
                    let id = match reuse_id {
                        Some(i) if !ids.is_empty() => ids[i % ids.len()].clone(),
                        _ => self.fresh("r"),
                    };
                    let mut names: Vec<String> = pre.leases.keys().cloned().collect();
                    names.extend(pre.waiting.values().map(|w| w.lease_name.clone()));
                    let lease_name = match reuse_name {
                        Some(i) if !names.is_empty() => names[i % names.len()].clone(),
                        _ => self.fresh("L"),
                    };
                    let exporter = exporter.map(|i| EXPORTER_NAMES[i].to_owned());
                    let not_before = delay.map_or(0, |d| now + d);
                    let wait_until = wait.map(|w| now + w);
                    let (selector, policy) = (sel(SELECTORS[*selector]), sel(POLICIES[*policy]));
                    let req = NewRequest {
                        request_id: id.clone(),
                        lease_name: lease_name.clone(),
                        client: CLIENTS[*client].to_owned(),
                        selector: selector.clone(),
                        policy: policy.clone(),
                        exporter: exporter.clone(),
                        duration: *duration,
                        not_before,
                        wait_until,
                        job: None,
                        reserved: false,
                        idle_timeout: *idle,
                        // A hard limit may come out below the duration: the book takes the
                        // duration then.
                        max_duration: max_duration.map(|m| m + duration / 2),
                    };
                    let (outcome, ev) = self.book.request(now, req);
                    let b = &self.book;
                    let known_before = pre.waiting.contains_key(&id)
                        || pre.leases.values().any(|l| l.request_id == id);
                    let may_wait = not_before > now || wait_until.is_some_and(|t| t > now);
                    let kind = match &outcome {
                        Outcome::Existing(state) => {
                            if b.request_state(now, &id).as_ref() != Some(state) {
                                return Err(format!(
                                    "Existing({state:?}) but the book says otherwise"
                                ));
                            }
                            "existing"
                        }
                        _ if known_before => {
                            let ended_now = ev.iter().any(|e| match e {
                                Event::Ended { lease, .. } => lease.request_id == id,
                                Event::WaitExpired { request } => request.request_id == id,
                                _ => false,
                            });
                            if !ended_now {
                                return Err(format!(
                                    "known request {id} was not recognised: {outcome:?}"
                                ));
                            }
                            "known id, ended just now"
                        }
                        Outcome::Granted(l) => {
                            let labels = b.exporter(&l.exporter).map(|e| &e.labels);
                            let wants = labels.is_some_and(|lb| {
                                is_candidate(
                                    &selector,
                                    &policy,
                                    exporter.as_deref(),
                                    &l.exporter,
                                    lb,
                                )
                            });
                            let liveness = l.idle_timeout == idle.filter(|d| *d > 0)
                                && l.last_use == now
                                && !l.attached
                                && l.auto_extend
                                    == max_duration.map(|m| AutoExtend {
                                        step: *duration,
                                        hard_end: now + (m + duration / 2).max(*duration),
                                    });
                            if l.request_id != id
                                || l.name != lease_name
                                || l.begin != now
                                || l.requested != now
                                || l.end != now + duration
                                || not_before > now
                                || !wants
                                || !liveness
                            {
                                return Err(format!("bad immediate grant {l:?}"));
                            }
                            "granted at once"
                        }
                        Outcome::Queued { position, behind } => {
                            let w = b.waiting_by_id(&id).ok_or("queued but not waiting")?;
                            if !may_wait || w.seq < b.waiting().map(|x| x.seq).max().unwrap_or(0) {
                                return Err(format!("bad enqueue {w:?}"));
                            }
                            let r = naive_refusal(b, &selector, &policy, exporter.as_deref());
                            if is_unservable(&r) {
                                return Err(format!("queued although unservable: {r:?}"));
                            }
                            if b.position(now, &id) != Some((*position, behind.clone()))
                                || naive_position(b, now, w) != *position
                            {
                                return Err(format!("position {position} of {id} is wrong"));
                            }
                            if *position > 1 {
                                self.stats
                                    .entry("queued behind others")
                                    .and_modify(|n| *n += 1)
                                    .or_insert(1);
                            }
                            "queued"
                        }
                        Outcome::Refused(r) => {
                            let expected = if *duration == 0 {
                                Denial::BadDuration
                            } else if b.lease(&lease_name).is_some()
                                || b.waiting().any(|w| w.lease_name == lease_name)
                            {
                                Denial::LeaseNameInUse(lease_name.clone())
                            } else {
                                let naive =
                                    naive_refusal(b, &selector, &policy, exporter.as_deref());
                                if may_wait && !is_unservable(&naive) {
                                    return Err(format!("refused {r:?} although it may wait"));
                                }
                                if may_wait {
                                    self.stat("refused at once although it may wait");
                                }
                                naive
                            };
                            if *r != expected {
                                return Err(format!("refused {r:?}, expected {expected:?}"));
                            }
                            match r {
                                Denial::NoSuchExporter(_) => "refused: no such exporter",
                                Denial::NoMatch => "refused: no match",
                                Denial::OutsidePolicy { .. } => "refused: outside policy",
                                Denial::AllOffline { .. } => "refused: all offline",
                                Denial::AllBusy { .. } => "refused: all busy",
                                Denial::BadDuration => "refused: bad duration",
                                Denial::LeaseNameInUse(_) => "refused: lease name in use",
                            }
                        }
                    };
                    self.stat(kind);
                    let immediate = match &outcome {
                        Outcome::Granted(l) => Some(l.clone()),
                        _ => None,
                    };
                    self.check_call(&pre, &ev, immediate.as_ref())?;
                }
            }
            // Every call but these advances the book.
            if !matches!(op, Op::SetEnd(..) | Op::Cleanup { .. } | Op::Restart) {
                self.nothing_due()?;
            }
            Ok(())
        }
    }

    fn run(ops: &[Op]) -> Result<Harness, String> {
        let mut h = Harness::default();
        for (i, op) in ops.iter().enumerate() {
            h.step(op)
                .map_err(|e| format!("op {i} {op:?} at {}: {e}", h.now))?;
        }
        Ok(h)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn random_operations_keep_every_promise(ops in proptest::collection::vec(arb_op(), 1..300)) {
            if let Err(e) = run(&ops) {
                prop_assert!(false, "{}", e);
            }
        }
    }

    /// The property test is only as good as the situations it reaches: make sure the
    /// generator produces each of them.
    #[test]
    fn random_operations_reach_the_interesting_cases() {
        let mut runner = TestRunner::deterministic();
        let strategy = proptest::collection::vec(arb_op(), 300);
        let mut stats: BTreeMap<&'static str, usize> = BTreeMap::new();
        for _ in 0..30 {
            let ops = strategy.new_tree(&mut runner).unwrap().current();
            let h = run(&ops).unwrap();
            for (k, v) in h.stats {
                *stats.entry(k).or_default() += v;
            }
        }
        eprintln!("{stats:#?}");
        for what in [
            "existing",
            "granted at once",
            "queued",
            "queued behind others",
            "refused: no such exporter",
            "refused: no match",
            "refused: outside policy",
            "refused: all offline",
            "refused: all busy",
            "refused: bad duration",
            "refused: lease name in use",
            "event: granted from queue",
            "event: expired",
            "event: ended otherwise",
            "event: wait expired",
            "fifo: earlier waiter checked",
            "restart",
            "refused at once although it may wait",
            "policy: withdrew a waiter",
            "policy: ended a lease",
            "event: idle",
            "event: extended",
            "extended past twice its first duration",
            "event: auto-extended lease reached its hard limit",
            "event: expired while auto-extending, not in use",
            "touch",
            "attached",
            "limit",
        ] {
            assert!(
                stats.get(what).is_some_and(|n| *n > 0),
                "never reached: {what}"
            );
        }
    }
}
