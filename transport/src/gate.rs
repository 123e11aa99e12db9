//! The gate in front of a server endpoint (jmpd, the controller): how many connections may be
//! in the expensive, unauthenticated part of their life at once — the QUIC handshake and the
//! time until their credential or token has been checked — in total and per source address.
//!
//! Beyond the limits a new connection is refused before its handshake (`Incoming::refuse`,
//! which costs one packet), and once past a soft limit a source must first prove its address
//! with a QUIC Retry, so a flood of spoofed Initials cannot fill the table. An authenticated
//! connection leaves the gate ([`Ticket::release`]): a holder's session is never refused
//! because of a flood, and the flood's connections time out on their own (the handshake and the
//! session's Hello deadline, 10 s each).

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
    total: usize,
    by_source: HashMap<IpAddr, usize>,
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
    /// Too many from here or in all: refuse it (the reason is for the log).
    Refuse(&'static str),
}

/// A place in the gate, held from the connection's arrival until it has authenticated (or is
/// gone: dropping the ticket frees the place).
pub struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
    held: bool,
}

impl Ticket {
    /// The connection authenticated: it no longer counts against the limits.
    pub fn release(mut self) {
        self.free();
    }

    fn free(&mut self) {
        if std::mem::take(&mut self.held) {
            let mut c = self.gate.lock();
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.by_source.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_source.remove(&self.source);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.free();
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
        let from_here = c.by_source.get(&source).copied().unwrap_or(0);
        if c.total >= self.limits.total {
            return Decision::Refuse("too many connections are authenticating");
        }
        if from_here >= self.limits.per_source {
            return Decision::Refuse("too many connections from this address are authenticating");
        }
        if !validated && c.total >= self.limits.retry_above {
            return Decision::Retry;
        }
        c.total += 1;
        *c.by_source.entry(source).or_insert(0) += 1;
        Decision::Accept(Ticket {
            gate: self.clone(),
            source,
            held: true,
        })
    }

    /// Unauthenticated connections now (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.lock().total
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
    fn limits_hold_per_source_and_in_total_and_tickets_free_their_place() {
        let g = Gate::new(Limits {
            total: 4,
            per_source: 2,
            retry_above: 3,
        });
        let accept = |g: &Arc<Gate>, s, v| match g.decide(s, v) {
            Decision::Accept(t) => Some(t),
            _ => None,
        };
        let a1 = accept(&g, ip(1), false).expect("first");
        let _a2 = accept(&g, ip(1), false).expect("second from the same source");
        assert!(
            matches!(g.decide(ip(1), true), Decision::Refuse(_)),
            "a third from one source is refused"
        );
        let _b1 = accept(&g, ip(2), false).expect("another source");
        assert!(
            matches!(g.decide(ip(3), false), Decision::Retry),
            "past the soft limit an unvalidated source must retry"
        );
        let _c1 = accept(&g, ip(3), true).expect("validated");
        assert!(matches!(g.decide(ip(4), true), Decision::Refuse(_)), "full");
        assert_eq!(g.pending(), 4);
        a1.release();
        assert_eq!(g.pending(), 3, "authenticated: no longer counted");
        drop(_b1);
        assert_eq!(g.pending(), 2, "gone: its place is free");
        assert!(accept(&g, ip(4), true).is_some());
    }
}
