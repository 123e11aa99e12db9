//! The gate in front of a server endpoint (jmpd, the controller): how many connections may be
//! in the expensive, unauthenticated part of their life at once — the QUIC handshake and the
//! time until their credential or token has been checked — in total and per source address.
//!
//! At a limit, the newest connection does not wait behind the flood: the *oldest*
//! unauthenticated connection (of that source, or in all) is displaced — told through its
//! ticket to close — so a legitimate client that completes its handshake and Hello in a few
//! milliseconds gets through even while a flood holds every place, unless the flood opens
//! more connections in that time than a source may hold. Past a soft limit a source must first
//! prove its address with a QUIC Retry, so spoofed Initials cannot take places at all. An
//! authenticated connection leaves the gate ([`Ticket::release`]): a holder's session is never
//! touched by a flood, and the flood's connections time out on their own (the handshake and
//! the session's Hello deadline, 10 s each) when nothing displaces them sooner.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Limits of a [`Gate`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unauthenticated connections at once.
    pub total: usize,
    /// Unauthenticated connections from one source address at once.
    pub per_source: usize,
    /// Above this many, a source must pass a Retry (address validation) first.
    pub retry_above: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 256,
            per_source: 32,
            retry_above: 64,
        }
    }
}

#[derive(Default)]
struct Counts {
    next: u64,
    /// Places held, oldest first: ticket id, source, and how to tell it to go.
    held: std::collections::BTreeMap<u64, (IpAddr, Arc<tokio::sync::Notify>)>,
    by_source: HashMap<IpAddr, usize>,
}

impl Counts {
    fn total(&self) -> usize {
        self.held.len()
    }

    /// Frees the oldest place matching `pred` and tells its connection to go.
    fn displace(&mut self, pred: impl Fn(&IpAddr) -> bool) -> bool {
        let Some(id) = self
            .held
            .iter()
            .find(|(_, (src, _))| pred(src))
            .map(|(id, _)| *id)
        else {
            return false;
        };
        if let Some((src, go)) = self.held.remove(&id) {
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
        if let Some((src, _)) = c.held.remove(&self.id) {
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
        let mut c = self.lock();
        if !validated && c.total() >= self.limits.retry_above {
            return Decision::Retry;
        }
        if c.by_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source {
            c.displace(|s| *s == source);
        }
        if c.total() >= self.limits.total {
            c.displace(|_| true);
        }
        let id = c.next;
        c.next += 1;
        let go = Arc::new(tokio::sync::Notify::new());
        c.held.insert(id, (source, go.clone()));
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_oldest_unauthenticated_place_is_displaced_and_tickets_free_their_place() {
        let g = Gate::new(Limits {
            total: 4,
            per_source: 2,
            retry_above: 3,
        });
        let accept = |g: &Arc<Gate>, s, v| match g.decide(s, v) {
            Decision::Accept(t) => t,
            Decision::Retry => panic!("asked to retry"),
        };
        let displaced = |t: &Ticket| t.go.clone();
        let a1 = accept(&g, ip(1), false);
        let a2 = accept(&g, ip(1), false);
        let a1_go = displaced(&a1);
        // A third from one source takes the oldest place of that source.
        let a3 = accept(&g, ip(1), true);
        assert!(
            futures_lite_now(a1_go.notified()),
            "the oldest of that source was told to go"
        );
        assert_eq!(g.pending(), 2);
        drop(a1);
        assert_eq!(g.pending(), 2, "a displaced ticket frees nothing twice");
        let b1 = accept(&g, ip(2), false);
        assert!(
            matches!(g.decide(ip(3), false), Decision::Retry),
            "past the soft limit an unvalidated source must retry"
        );
        let _c1 = accept(&g, ip(3), true);
        assert_eq!(g.pending(), 4);
        // Full: the oldest in all goes (a2).
        let a2_go = displaced(&a2);
        let _d1 = accept(&g, ip(4), true);
        assert!(futures_lite_now(a2_go.notified()));
        assert_eq!(g.pending(), 4);
        a3.release();
        assert_eq!(g.pending(), 3, "authenticated: no longer counted");
        drop(b1);
        assert_eq!(g.pending(), 2, "gone: its place is free");
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
