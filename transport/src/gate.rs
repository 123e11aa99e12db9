//! The gate in front of a server endpoint (jmpd, the controller): how many connections may be
//! in the expensive, unauthenticated part of their life at once — the QUIC handshake and the
//! time until their credential or token has been checked — in total and per source address.
//!
//! Three rules keep memory and CPU bounded whatever arrives:
//! - **A rate per source.** Each source address may start [`Limits::rate`] connections a
//!   second (with a burst of [`Limits::per_source`]); beyond that new ones are refused before
//!   any handshake work (`Incoming::refuse`, one packet). Every accepted connection costs a
//!   handshake and, once closed, some seconds of draining state in quinn: the rate bounds both.
//! - **Places.** At most [`Limits::per_source`] unauthenticated connections per source and
//!   [`Limits::total`] in all. When a place is needed and the oldest holder (of that source,
//!   or in all) has had [`Limits::grace`] to authenticate — far more than a real client needs
//!   for its handshake and Hello — it is displaced (told through its ticket to close) instead
//!   of the newcomer being refused, so idle connections cannot hold the door shut.
//! - **Address validation.** Past [`Limits::retry_above`] unauthenticated connections a source
//!   must first prove its address with a QUIC Retry, so spoofed Initials take no places.
//!
//! An authenticated connection leaves the gate ([`Ticket::release`]): a holder's session is
//! never touched by a flood. A flood from the holder's own address can delay that address's
//! *new* connections; it cannot hurt the established session or exhaust the daemon.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits of a [`Gate`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unauthenticated connections at once.
    pub total: usize,
    /// Unauthenticated connections from one source address at once, and its burst.
    pub per_source: usize,
    /// New connections a second one source may start (sustained).
    pub rate: f64,
    /// How long a place is safe from displacement.
    pub grace: Duration,
    /// Above this many, a source must pass a Retry (address validation) first.
    pub retry_above: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 256,
            per_source: 32,
            rate: 20.0,
            grace: Duration::from_millis(500),
            retry_above: 64,
        }
    }
}

#[derive(Default)]
struct Counts {
    next: u64,
    /// Places held, oldest first: ticket id, source, since when, and how to tell it to go.
    held: std::collections::BTreeMap<u64, (IpAddr, Instant, Arc<tokio::sync::Notify>)>,
    by_source: HashMap<IpAddr, usize>,
    /// Token buckets of new connections per source: tokens and when last filled.
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl Counts {
    fn total(&self) -> usize {
        self.held.len()
    }

    /// Frees the oldest place matching `pred` if it has had its grace, and tells its
    /// connection to go; false if there is none to free.
    fn displace(&mut self, now: Instant, grace: Duration, pred: impl Fn(&IpAddr) -> bool) -> bool {
        let Some((id, since)) = self
            .held
            .iter()
            .find(|(_, (src, _, _))| pred(src))
            .map(|(id, (_, since, _))| (*id, *since))
        else {
            return false;
        };
        if now.duration_since(since) < grace {
            return false;
        }
        if let Some((src, _, go)) = self.held.remove(&id) {
            go.notify_one();
            self.forget_source(src);
        }
        true
    }

    fn forget_source(&mut self, src: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&src) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&src);
            }
        }
    }
}

pub struct Gate {
    limits: Limits,
    counts: Mutex<Counts>,
}

/// What to do with a new connection.
pub enum Decision {
    Accept(Ticket),
    /// Ask it to prove its address first (it comes back validated).
    Retry,
    /// Refuse it before any handshake work (the reason is for the log).
    Refuse(&'static str),
}

/// A place in the gate, held from the connection's arrival until it has authenticated (or is
/// gone: dropping the ticket frees the place). A newer connection may displace it: then
/// [`Ticket::displaced`] completes and the connection must close.
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    go: Arc<tokio::sync::Notify>,
}

impl Ticket {
    /// The connection authenticated: it no longer counts against the limits.
    pub fn release(self) {}

    /// Completes when a newer connection has taken this one's place.
    pub async fn displaced(&self) {
        self.go.notified().await
    }

    /// What [`Ticket::displaced`] waits on, for a task that does not hold the ticket.
    pub fn go_handle(&self) -> Arc<tokio::sync::Notify> {
        self.go.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.gate.lock();
        if let Some((src, _, _)) = c.held.remove(&self.id) {
            c.forget_source(src);
        }
    }
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on a connection from `source`; `validated`: it has already passed a Retry.
    pub fn decide(self: &Arc<Self>, source: IpAddr, validated: bool) -> Decision {
        self.decide_at(source, validated, Instant::now())
    }

    fn decide_at(self: &Arc<Self>, source: IpAddr, validated: bool, now: Instant) -> Decision {
        let l = self.limits;
        let mut c = self.lock();
        if !validated && c.total() >= l.retry_above {
            return Decision::Retry;
        }
        // The source's rate first: a refused connection costs nothing.
        let burst = l.per_source as f64;
        if c.buckets.len() > 4 * l.total {
            // Forget full buckets (sources that have been quiet): the map stays small.
            c.buckets
                .retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * l.rate < burst);
        }
        let (tokens, at) = c.buckets.entry(source).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * l.rate).min(burst);
        *at = now;
        if *tokens < 1.0 {
            return Decision::Refuse("this address starts connections faster than allowed");
        }
        if c.by_source.get(&source).copied().unwrap_or(0) >= l.per_source
            && !c.displace(now, l.grace, |s| *s == source)
        {
            return Decision::Refuse("this address holds all its places with fresh connections");
        }
        if c.total() >= l.total && !c.displace(now, l.grace, |_| true) {
            return Decision::Refuse("all places are held by fresh connections");
        }
        if let Some((t, _)) = c.buckets.get_mut(&source) {
            *t -= 1.0;
        }
        let id = c.next;
        c.next += 1;
        let go = Arc::new(tokio::sync::Notify::new());
        c.held.insert(id, (source, now, go.clone()));
        *c.by_source.entry(source).or_insert(0) += 1;
        Decision::Accept(Ticket {
            gate: self.clone(),
            id,
            go,
        })
    }

    /// Unauthenticated connections now (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.lock().total()
    }
}

/// The gate's decision carried out on a quinn `Incoming`: the connecting future and its ticket,
/// or `None` when it was refused or asked to retry.
pub fn admit(gate: &Arc<Gate>, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Ticket)> {
    let source = incoming.remote_address().ip();
    match gate.decide(source, incoming.remote_address_validated()) {
        Decision::Accept(t) => Some((incoming, t)),
        Decision::Retry => {
            // Only possible before validation; a validated one is never asked again.
            let _ = incoming.retry();
            None
        }
        Decision::Refuse(why) => {
            tracing::debug!(%source, "refused a connection: {why}");
            incoming.refuse();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn rates_places_and_displacement_of_the_old_on_virtual_time() {
        let g = Gate::new(Limits {
            total: 4,
            per_source: 2,
            rate: 10.0,
            grace: Duration::from_millis(500),
            retry_above: 3,
        });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let accept = |g: &Arc<Gate>, s, v, t| match g.decide_at(s, v, t) {
            Decision::Accept(t) => t,
            Decision::Retry => panic!("asked to retry"),
            Decision::Refuse(why) => panic!("refused: {why}"),
        };
        let a1 = accept(&g, ip(1), false, at(0));
        let _a2 = accept(&g, ip(1), false, at(0));
        // A third from one source while its places are fresh: refused (and the burst is used).
        assert!(matches!(
            g.decide_at(ip(1), true, at(100)),
            Decision::Refuse(_)
        ));
        // Once the oldest has had its grace, a newcomer (with a token again) displaces it.
        let a1_go = a1.go.clone();
        let _a3 = accept(&g, ip(1), true, at(600));
        assert!(
            futures_lite_now(a1_go.notified()),
            "the oldest of that source was told to go"
        );
        assert_eq!(g.pending(), 2);
        drop(a1);
        assert_eq!(g.pending(), 2, "a displaced ticket frees nothing twice");
        // The rate: 10 a second with a burst of 2. At 650 ms one token and a half are there
        // (the oldest place, a2, has had its grace: it goes); right after, none is.
        let a2_go = _a2.go.clone();
        let _a4 = accept(&g, ip(1), true, at(650));
        assert!(futures_lite_now(a2_go.notified()));
        assert!(matches!(
            g.decide_at(ip(1), true, at(660)),
            Decision::Refuse(_)
        ));
        let b1 = accept(&g, ip(2), false, at(700));
        assert!(
            matches!(g.decide_at(ip(3), false, at(700)), Decision::Retry),
            "past the soft limit an unvalidated source must retry"
        );
        let c1 = accept(&g, ip(3), true, at(700));
        assert_eq!(g.pending(), 4);
        // Full in all, every place fresh: refused; later the oldest in all goes.
        assert!(matches!(
            g.decide_at(ip(4), true, at(800)),
            Decision::Refuse(_)
        ));
        let _d1 = accept(&g, ip(4), true, at(1300));
        assert_eq!(g.pending(), 4);
        c1.release();
        assert_eq!(g.pending(), 3, "authenticated: no longer counted");
        drop(b1);
        assert!(g.pending() <= 3, "gone: its place is free");
    }

    /// Whether a `Notified` is ready now (a permit was stored by `notify_one`).
    fn futures_lite_now(n: tokio::sync::futures::Notified<'_>) -> bool {
        use std::future::Future;
        let mut n = std::pin::pin!(n);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        n.as_mut().poll(&mut cx).is_ready()
    }
}
