//! The seat: who holds the board. A pure state machine (no I/O, no clock: `now` is passed in)
//! deciding whether a new session may attach, whom it replaces, and when a lease's end or
//! warning is due. The exporter acts on the [`Action`]s it returns.
//!
//! The rules, in order, for a new session that its token admits:
//! 1. Nobody holds the board: it attaches.
//! 2. The holder has the same session id (the same `jmp attach` reconnecting after a network
//!    blip): the new connection replaces the old (`replaced`).
//! 3. Both attach under leases and the leases differ: if the controller has confirmed the new
//!    lease as current, the holder's lease is over (`lease ended`) and the new one attaches.
//!    If it has not (jmpd restarted and has not heard from the controller yet), a token alone
//!    cannot end a live session: the new one is refused as `busy`, saying why.
//! 4. The same client (the token's client in controller mode, the Hello's name in direct mode)
//!    under the same lease, with a new session id: a `jmp attach` that crashed and was started
//!    again, or another one of that client. The newer replaces the older (`replaced`), so a
//!    crash never locks its own client out until the old connection times out.
//! 5. Otherwise the board is busy: refused, naming the holder.
//!
//! A one-shot session (a `jmp power` without an attachment) never takes the board and never
//! replaces anyone: it is admitted while nobody holds the board, or beside a holder that is the
//! same client under the same lease; otherwise it is busy. At most [`MAX_ONE_SHOT`] are
//! admitted at once (each has a session's budget). One that may no longer stay (its lease
//! ended, expired or was superseded, or someone else holds the board now) is ended like a
//! holder would be: [`Seat::strays`] names them after every change.
//!
//! A **guest** (a colleague the holder shared the lease with, `jmp share lease`) attaches
//! beside whoever holds the board, never as the holder and never replacing anyone: admitted
//! while its lease is the current one and the controller's last word lists its share, at most
//! [`MAX_GUESTS`] at once and at most [`MAX_GUESTS_PER_CLIENT`] of one colleague, so one
//! colleague cannot take every guest slot from the others. It goes (a stray) when its lease
//! ends or is superseded, its token expires (the share's `--until`), or its share is revoked or
//! its terms changed. The holder is told who is attached beside it ([`Seat::guest_watch`]).

use crate::auth::Admission;
use jmp_protocol::ErrorCode;
use std::time::{Duration, Instant};

/// How long before a lease's end the attached user is warned.
pub const LEASE_WARNING: Duration = Duration::from_secs(300);

/// One-shot sessions admitted at once. Each may hold a session's budget of the exporter, so
/// their number is bounded too; `jmp power` needs one for a second or two.
pub const MAX_ONE_SHOT: usize = 4;

/// Guest sessions (colleagues of a shared lease) admitted at once, each with a session's
/// budget.
pub const MAX_GUESTS: usize = 8;

/// Guest sessions of one colleague at once (a console watcher and a `jmp power`, or two
/// terminals): the rest of [`MAX_GUESTS`] stays for the others the holder shared with.
pub const MAX_GUESTS_PER_CLIENT: usize = 2;

/// Leases remembered as ended, for one-shot sessions still attached under them.
const ENDED_KEPT: usize = 16;

/// Something the exporter must do to a session, named by its handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<H> {
    /// End that session, telling its client why.
    Bye {
        handle: H,
        code: ErrorCode,
        reason: String,
    },
    /// Tell its user something (a lease ending soon).
    Notice { handle: H, text: String },
}

/// The answer to a session that asks to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<H> {
    /// It holds the board now; first end whoever held it before (if anyone).
    Admit {
        evict: Option<Action<H>>,
    },
    Refuse {
        code: ErrorCode,
        reason: String,
    },
}

/// A session asking for the board.
#[derive(Debug, Clone)]
pub struct Claim<'a, H> {
    /// Distinguishes connections (a reconnect is a new connection of the same session).
    pub conn: u64,
    pub handle: H,
    /// The Hello's self-declared name ("alice@laptop"), for messages.
    pub client: &'a str,
    pub session: u64,
    pub admission: &'a Admission,
    /// Requests only; does not take the board (`features::ONE_SHOT`).
    pub one_shot: bool,
    /// Its Hello says it understands the list of guests (`features::GUESTS`): as the holder,
    /// it is told who is attached beside it.
    pub wants_guests: bool,
}

#[derive(Debug, Clone)]
struct Holder<H> {
    conn: u64,
    handle: H,
    client: String,
    /// Who it is for rule 4: the token's client, else the Hello's name.
    identity: String,
    session: u64,
    lease: Option<String>,
    until: Option<u64>,
    warned: bool,
    since: Instant,
    wants_guests: bool,
}

/// A one-shot session admitted and not yet gone.
#[derive(Debug, Clone)]
struct OneShot<H> {
    conn: u64,
    handle: H,
    identity: String,
    lease: Option<String>,
    until: Option<u64>,
}

/// A colleague's session under a shared lease.
#[derive(Debug, Clone)]
struct Guest<H> {
    conn: u64,
    handle: H,
    identity: String,
    lease: String,
    until: Option<u64>,
    control: bool,
    since: Instant,
}

#[derive(Debug)]
pub struct Seat<H> {
    exporter: String,
    holder: Option<Holder<H>>,
    one_shots: Vec<OneShot<H>>,
    guests: Vec<Guest<H>>,
    /// The shares of the current lease as the controller last said: (lease, [(client,
    /// control)]). `None`: it has not said; no guest is admitted then.
    shares: Option<(String, Vec<(String, bool)>)>,
    /// Leases the controller ended lately, and the one it says is current (`None`: it has
    /// not said, or no lease is current).
    ended: std::collections::VecDeque<String>,
    current: Option<Option<String>>,
}

impl<H: Clone> Seat<H> {
    pub fn new(exporter: &str) -> Self {
        Seat {
            exporter: exporter.to_string(),
            holder: None,
            one_shots: Vec::new(),
            guests: Vec::new(),
            shares: None,
            ended: std::collections::VecDeque::new(),
            current: None,
        }
    }

    /// One-shot sessions that may no longer stay, removed from the seat, each with the Bye
    /// that ends it: its lease ended or was superseded, it expired (`unix_now`, seconds), or
    /// the board is now held by another client or lease. Ask after every change.
    pub fn strays(&mut self, unix_now: u64) -> Vec<Action<H>> {
        let holder = self
            .holder
            .as_ref()
            .map(|h| (h.identity.clone(), h.lease.clone(), h.client.clone()));
        let ended = &self.ended;
        let current = &self.current;
        let mut out = Vec::new();
        self.one_shots.retain(|o| {
            let lease = o.lease.as_deref().unwrap_or_default();
            let why = if o.lease.as_ref().is_some_and(|l| ended.contains(l)) {
                Some(format!("lease {lease} ended"))
            } else if o.lease.is_some()
                && current
                    .as_ref()
                    .is_some_and(|c| c.as_ref() != o.lease.as_ref())
            {
                Some(format!("lease {lease} is over"))
            } else if o.until.is_some_and(|u| unix_now >= u) {
                Some(format!("lease {lease} expired"))
            } else {
                match &holder {
                    Some((id, l, client)) if *id != o.identity || *l != o.lease => {
                        Some(format!("the board is now held by {client}"))
                    }
                    _ => None,
                }
            };
            match why {
                Some(reason) => {
                    out.push(Action::Bye {
                        handle: o.handle.clone(),
                        code: ErrorCode::LeaseEnded,
                        reason,
                    });
                    false
                }
                None => true,
            }
        });
        let shares = &self.shares;
        self.guests.retain(|g| {
            let lease = &g.lease;
            let who = &g.identity;
            let why = if ended.contains(lease) {
                Some(format!("lease {lease} ended"))
            } else if current
                .as_ref()
                .is_some_and(|c| c.as_deref() != Some(lease.as_str()))
            {
                Some(format!("lease {lease} is over"))
            } else if g.until.is_some_and(|u| unix_now >= u) {
                Some(format!("the share of lease {lease} with {who} ended"))
            } else {
                match share_of(shares, lease, who) {
                    None => Some(format!(
                        "the holder of lease {lease} ended its share with {who}"
                    )),
                    Some(control) if control != g.control => Some(format!(
                        "the holder of lease {lease} changed its share with {who} ({}): attach again",
                        if control { "control given" } else { "now read-only" }
                    )),
                    Some(_) => None,
                }
            };
            match why {
                Some(reason) => {
                    out.push(Action::Bye {
                        handle: g.handle.clone(),
                        code: ErrorCode::LeaseEnded,
                        reason,
                    });
                    false
                }
                None => true,
            }
        });
        out
    }

    /// The controller says lease `lease` is shared with these clients (each with whether it
    /// has control). Guests whose share is gone or changed are strays from now on.
    pub fn set_shares(&mut self, lease: Option<&str>, shares: Vec<(String, bool)>) {
        self.shares = lease.map(|l| (l.to_string(), shares));
    }

    /// The controller's end of each share of `lease` (client, Unix seconds): a guest is not
    /// kept past its share's end, even when its token (made before the holder narrowed the
    /// share) says later.
    pub fn cap_guests(&mut self, lease: &str, ends: &[(String, u64)]) {
        for g in self.guests.iter_mut().filter(|g| g.lease == lease) {
            if let Some((_, end)) = ends.iter().find(|(c, _)| *c == g.identity) {
                g.until = Some(g.until.map_or(*end, |u| u.min(*end)));
            }
        }
    }

    /// Guest sessions attached now, as (client, control).
    pub fn guests(&self) -> Vec<(String, bool)> {
        self.guests
            .iter()
            .map(|g| (g.identity.clone(), g.control))
            .collect()
    }

    /// The holder to tell who is attached beside it (if it holds the board and understands
    /// the list), and the list: (client, control, since) of each guest session.
    pub fn guest_watch(&self) -> (Option<H>, Vec<(String, bool, Instant)>) {
        let to = self
            .holder
            .as_ref()
            .filter(|h| h.wants_guests)
            .map(|h| h.handle.clone());
        let list = self
            .guests
            .iter()
            .map(|g| (g.identity.clone(), g.control, g.since))
            .collect();
        (to, list)
    }

    /// The connection holding the board, if any.
    pub fn holder_conn(&self) -> Option<u64> {
        self.holder.as_ref().map(|h| h.conn)
    }

    /// The lease a session uses now, for the controller's liveness: the holder's, else a
    /// guest's (a colleague watching a shared lease keeps it in use while the holder is away).
    pub fn lease_in_use(&self) -> Option<&str> {
        self.holder_lease()
            .or_else(|| self.guests.first().map(|g| g.lease.as_str()))
    }

    /// Who holds the board now, if anyone.
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_ref().map(|h| h.client.as_str())
    }

    /// The lease the holder attached under, if any.
    pub fn holder_lease(&self) -> Option<&str> {
        self.holder.as_ref().and_then(|h| h.lease.as_deref())
    }

    pub fn admit(&mut self, c: Claim<'_, H>, now: Instant) -> Verdict<H> {
        let identity = c
            .admission
            .client
            .clone()
            .unwrap_or_else(|| c.client.to_string());
        if let Some(share) = c.admission.share {
            return self.admit_guest(&c, identity, share.control, now);
        }
        if c.one_shot {
            let admit = |seat: &mut Self| {
                seat.one_shots.push(OneShot {
                    conn: c.conn,
                    handle: c.handle.clone(),
                    identity: identity.clone(),
                    lease: c.admission.lease.clone(),
                    until: c.admission.until,
                });
                Verdict::Admit { evict: None }
            };
            if self.one_shots.len() >= MAX_ONE_SHOT {
                return Verdict::Refuse {
                    code: ErrorCode::Busy,
                    reason: format!(
                        "{} already serves {MAX_ONE_SHOT} one-shot sessions; try again when one is done",
                        self.exporter
                    ),
                };
            }
            return match &self.holder {
                None => admit(self),
                Some(h) if h.identity == identity && h.lease == c.admission.lease => admit(self),
                Some(h) => Verdict::Refuse {
                    code: ErrorCode::Busy,
                    reason: format!(
                        "{} is held by {} (attached {}s ago)",
                        self.exporter,
                        h.client,
                        now.saturating_duration_since(h.since).as_secs()
                    ),
                },
            };
        }
        let evict = match &self.holder {
            None => None,
            Some(h) if h.session == c.session => Some(Action::Bye {
                handle: h.handle.clone(),
                code: ErrorCode::Replaced,
                reason: "replaced by a new connection of the same session".into(),
            }),
            Some(h)
                if c.admission.lease.is_some()
                    && h.lease.is_some()
                    && h.lease != c.admission.lease =>
            {
                let held = h.lease.clone().unwrap_or_default();
                if !c.admission.confirmed {
                    return Verdict::Refuse {
                        code: ErrorCode::Busy,
                        reason: format!(
                            "{} is held by {} under lease {held}; it has not heard from the controller since it started, so lease {} cannot end that session yet (try again in a moment)",
                            self.exporter,
                            h.client,
                            c.admission.lease.as_deref().unwrap_or_default()
                        ),
                    };
                }
                Some(Action::Bye {
                    handle: h.handle.clone(),
                    code: ErrorCode::LeaseEnded,
                    reason: format!(
                        "lease {held} ended; {} is now leased to {}",
                        self.exporter, c.client
                    ),
                })
            }
            Some(h) if h.identity == identity && h.lease == c.admission.lease => {
                Some(Action::Bye {
                    handle: h.handle.clone(),
                    code: ErrorCode::Replaced,
                    reason: format!(
                        "replaced by a newer attachment of the same client ({})",
                        c.client
                    ),
                })
            }
            Some(h) => {
                return Verdict::Refuse {
                    code: ErrorCode::Busy,
                    reason: format!(
                        "{} is held by {} (attached {}s ago)",
                        self.exporter,
                        h.client,
                        now.saturating_duration_since(h.since).as_secs()
                    ),
                }
            }
        };
        self.holder = Some(Holder {
            conn: c.conn,
            handle: c.handle,
            client: c.client.to_string(),
            identity,
            session: c.session,
            lease: c.admission.lease.clone(),
            until: c.admission.until,
            warned: false,
            since: now,
            wants_guests: c.wants_guests,
        });
        Verdict::Admit { evict }
    }

    /// A colleague of a shared lease: beside whoever is there, if the controller's last word
    /// lists its share with the terms its token claims.
    fn admit_guest(
        &mut self,
        c: &Claim<'_, H>,
        identity: String,
        control: bool,
        now: Instant,
    ) -> Verdict<H> {
        let refuse = |reason: String| Verdict::Refuse {
            code: ErrorCode::Unauthorized,
            reason,
        };
        let Some(lease) = c.admission.lease.clone() else {
            return refuse("a share's token names no lease".into());
        };
        if self.ended.contains(&lease) {
            return refuse(format!("lease {lease} ended"));
        }
        match share_of(&self.shares, &lease, &identity) {
            None => {
                return refuse(format!(
                    "lease {lease} is not shared with {identity} (any more), as far as {} heard from the controller",
                    self.exporter
                ))
            }
            Some(granted) if granted != control => {
                return refuse(format!(
                    "the share of lease {lease} with {identity} changed; fetch a new token (attach again)"
                ))
            }
            Some(_) => {}
        }
        if self.guests.len() >= MAX_GUESTS {
            return Verdict::Refuse {
                code: ErrorCode::Busy,
                reason: format!(
                    "{} already serves {MAX_GUESTS} sessions of shared leases; try again when one is done",
                    self.exporter
                ),
            };
        }
        let own = self
            .guests
            .iter()
            .filter(|g| g.identity == identity)
            .count();
        if own >= MAX_GUESTS_PER_CLIENT {
            return Verdict::Refuse {
                code: ErrorCode::Busy,
                reason: format!(
                    "{identity} already has {own} sessions on {} under lease {lease} (at most {MAX_GUESTS_PER_CLIENT} per colleague); end one first",
                    self.exporter
                ),
            };
        }
        self.guests.push(Guest {
            conn: c.conn,
            handle: c.handle.clone(),
            identity,
            lease,
            until: c.admission.until,
            control,
            since: now,
        });
        Verdict::Admit { evict: None }
    }

    /// Nobody holds the board any more (the exporter is shutting down); the holder's handle.
    pub fn vacate(&mut self) -> Option<H> {
        self.holder.take().map(|h| h.handle)
    }

    /// The connection `conn` ended; if it held the board, nobody does now.
    pub fn detached(&mut self, conn: u64) {
        if self.holder.as_ref().is_some_and(|h| h.conn == conn) {
            self.holder = None;
        }
        self.one_shots.retain(|o| o.conn != conn);
        self.guests.retain(|g| g.conn != conn);
    }

    fn take_if(&mut self, pred: impl Fn(&Holder<H>) -> bool) -> Option<Holder<H>> {
        if self.holder.as_ref().is_some_and(pred) {
            self.holder.take()
        } else {
            None
        }
    }

    /// `lease` ended (deleted, revoked): its session, if attached, ends (and its one-shot
    /// sessions, see [`Seat::strays`]).
    pub fn end_lease(&mut self, lease: &str, reason: &str) -> Option<Action<H>> {
        if !self.ended.iter().any(|l| l == lease) {
            self.ended.push_back(lease.to_string());
            if self.ended.len() > ENDED_KEPT {
                self.ended.pop_front();
            }
        }
        self.take_if(|h| h.lease.as_deref() == Some(lease))
            .map(|h| Action::Bye {
                handle: h.handle,
                code: ErrorCode::LeaseEnded,
                reason: reason.to_string(),
            })
    }

    /// The controller says `current` is this exporter's lease now: a session attached under
    /// any other lease is over (its end was missed while the controller was unreachable).
    pub fn keep_only_lease(&mut self, current: Option<&str>) -> Option<Action<H>> {
        self.current = Some(current.map(str::to_string));
        self.take_if(|h| h.lease.is_some() && h.lease.as_deref() != current)
            .map(|h| {
                let lease = h.lease.unwrap_or_default();
                Action::Bye {
                    handle: h.handle,
                    code: ErrorCode::LeaseEnded,
                    reason: format!("lease {lease} ended"),
                }
            })
    }

    /// A lease's end moved (extended or shortened); `until` in Unix seconds. `extends`: the
    /// controller extends it while a session uses it (auto-extending, below its hard limit),
    /// so its holder, who is using it, is not warned of this end; once it reaches its hard
    /// limit the push says `extends: false` and the warning comes as for any lease.
    pub fn set_lease_end(&mut self, lease: &str, until: u64, extends: bool) {
        for o in &mut self.one_shots {
            if o.lease.as_deref() == Some(lease) {
                o.until = Some(until);
            }
        }
        if let Some(h) = self.holder.as_mut() {
            if h.lease.as_deref() == Some(lease) {
                let moved = h.until != Some(until);
                h.until = Some(until);
                h.warned = extends || (h.warned && !moved);
            }
        }
    }

    /// Ends a session whose lease ran out and warns one whose lease ends soon. `unix_now` in
    /// seconds; called on a short period, so a session ends within a second of its lease even
    /// with no controller around.
    pub fn tick(&mut self, unix_now: u64) -> Option<Action<H>> {
        let h = self.holder.as_mut()?;
        let until = h.until?;
        let lease = h.lease.clone().unwrap_or_default();
        if unix_now >= until {
            let h = self.holder.take()?;
            return Some(Action::Bye {
                handle: h.handle,
                code: ErrorCode::LeaseEnded,
                reason: format!("lease {lease} expired"),
            });
        }
        if !h.warned && until - unix_now <= LEASE_WARNING.as_secs() {
            h.warned = true;
            let left = until - unix_now;
            return Some(Action::Notice {
                handle: h.handle.clone(),
                text: format!(
                    "lease {lease} ends in {}m{:02}s; extend it with: jmp update lease {lease} --extend 30m",
                    left / 60,
                    left % 60
                ),
            });
        }
        None
    }
}

/// Whether `client` may attach under `lease` as its colleague, and with control, as the
/// controller last said.
fn share_of(
    shares: &Option<(String, Vec<(String, bool)>)>,
    lease: &str,
    client: &str,
) -> Option<bool> {
    let (l, list) = shares.as_ref()?;
    if l != lease {
        return None;
    }
    list.iter()
        .find(|(c, _)| c == client)
        .map(|(_, control)| *control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, client: &str, confirmed: bool) -> Admission {
        Admission {
            lease: Some(name.into()),
            until: Some(1000),
            client: Some(client.into()),
            confirmed,
            share: None,
        }
    }

    fn claim<'a>(conn: u64, client: &'a str, session: u64, a: &'a Admission) -> Claim<'a, u64> {
        Claim {
            conn,
            handle: conn,
            client,
            session,
            admission: a,
            one_shot: false,
            wants_guests: true,
        }
    }

    fn evicted(v: &Verdict<u64>) -> Option<(u64, ErrorCode)> {
        match v {
            Verdict::Admit {
                evict: Some(Action::Bye { handle, code, .. }),
            } => Some((*handle, *code)),
            _ => None,
        }
    }

    #[test]
    fn first_comes_in_and_others_are_busy() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let direct = Admission::default();
        assert_eq!(
            s.admit(claim(1, "alice@a", 10, &direct), t0),
            Verdict::Admit { evict: None }
        );
        let later = t0 + Duration::from_secs(42);
        match s.admit(claim(2, "bob@b", 20, &direct), later) {
            Verdict::Refuse { code, reason } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(
                    reason.contains("alice@a") && reason.contains("42s"),
                    "{reason}"
                );
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(s.holder(), Some("alice@a"));
        s.detached(2);
        assert_eq!(
            s.holder(),
            Some("alice@a"),
            "a refused connection frees nothing"
        );
        s.detached(1);
        assert_eq!(s.holder(), None);
    }

    #[test]
    fn the_same_session_reconnecting_replaces_its_old_connection() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let a = Admission::default();
        s.admit(claim(1, "alice@a", 10, &a), t0);
        let v = s.admit(claim(2, "alice@a", 10, &a), t0);
        assert_eq!(evicted(&v), Some((1, ErrorCode::Replaced)));
        // The old connection ending later does not free the board.
        s.detached(1);
        assert_eq!(s.holder(), Some("alice@a"));
    }

    #[test]
    fn a_crashed_attach_of_the_same_client_is_replaced_not_busy() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let l1 = lease("L1", "ci-client", true);
        s.admit(claim(1, "ci@runner", 10, &l1), t0);
        // A new process (new session id) of the same client and lease.
        let v = s.admit(claim(2, "ci@runner", 11, &l1), t0);
        assert_eq!(evicted(&v), Some((1, ErrorCode::Replaced)));
        // Direct mode: the same self-declared name.
        let mut s = Seat::new("rpi4");
        let d = Admission::default();
        s.admit(claim(1, "alice@a", 10, &d), t0);
        assert_eq!(
            evicted(&s.admit(claim(2, "alice@a", 11, &d), t0)),
            Some((1, ErrorCode::Replaced))
        );
    }

    #[test]
    fn a_confirmed_newer_lease_ends_the_old_one_an_unconfirmed_one_cannot() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let l1 = lease("L1", "alice", true);
        s.admit(claim(1, "alice@a", 10, &l1), t0);
        // jmpd restarted and has not heard from the controller: L2's token alone.
        let l2 = lease("L2", "bob", false);
        match s.admit(claim(2, "bob@b", 20, &l2), t0) {
            Verdict::Refuse { code, reason } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(reason.contains("not heard from the controller"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(s.holder_lease(), Some("L1"));
        // Once the controller confirms L2 is current, L1 is over.
        let l2 = lease("L2", "bob", true);
        let v = s.admit(claim(3, "bob@b", 20, &l2), t0);
        assert_eq!(evicted(&v), Some((1, ErrorCode::LeaseEnded)));
        assert_eq!(s.holder_lease(), Some("L2"));
        // A different client under the same lease is busy (rule 4 needs the same client).
        let l2_other = lease("L2", "mallory", true);
        assert!(matches!(
            s.admit(claim(4, "m@x", 30, &l2_other), t0),
            Verdict::Refuse {
                code: ErrorCode::Busy,
                ..
            }
        ));
    }

    #[test]
    fn a_one_shot_session_never_takes_the_board_or_replaces_anyone() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let l1 = lease("L1", "alice", true);
        let mut c = claim(1, "alice@a", 10, &l1);
        c.one_shot = true;
        assert_eq!(s.admit(c, t0), Verdict::Admit { evict: None });
        assert_eq!(s.holder(), None, "a one-shot session holds nothing");
        s.admit(claim(2, "alice@a", 11, &l1), t0);
        let mut c = claim(3, "alice@a", 12, &l1);
        c.one_shot = true;
        assert_eq!(
            s.admit(c, t0),
            Verdict::Admit { evict: None },
            "beside its own client"
        );
        assert_eq!(s.holder_lease(), Some("L1"));
        let other = lease("L1", "bob", true);
        let mut c = claim(4, "bob@b", 13, &other);
        c.one_shot = true;
        assert!(matches!(
            s.admit(c, t0),
            Verdict::Refuse {
                code: ErrorCode::Busy,
                ..
            }
        ));
    }

    #[test]
    fn one_shot_sessions_are_bounded_and_end_with_their_lease() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let l1 = lease("L1", "alice", true);
        let one_shot = |conn, a| {
            let mut c = claim(conn, "alice@a", 100 + conn, a);
            c.one_shot = true;
            c
        };
        for conn in 1..=MAX_ONE_SHOT as u64 {
            assert_eq!(
                s.admit(one_shot(conn, &l1), t0),
                Verdict::Admit { evict: None }
            );
        }
        match s.admit(one_shot(9, &l1), t0) {
            Verdict::Refuse { code, reason } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(reason.contains("one-shot"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        s.detached(1);
        assert_eq!(s.strays(0), vec![], "all still within their lease");
        // Expired (the token's end), ended by the controller, superseded by another lease.
        assert_eq!(s.strays(1000).len(), 3, "L1's token ends at 1000");
        s.admit(one_shot(10, &l1), t0);
        s.end_lease("L1", "deleted");
        assert!(matches!(
            &s.strays(0)[..],
            [Action::Bye {
                handle: 10,
                code: ErrorCode::LeaseEnded,
                ..
            }]
        ));
        let l2 = lease("L2", "alice", true);
        s.admit(one_shot(11, &l2), t0);
        s.keep_only_lease(Some("L3"));
        assert_eq!(s.strays(0).len(), 1, "L2 is no longer current");
        // Another client's holder: a one-shot of the previous one goes.
        let mut s = Seat::new("rpi4");
        s.admit(one_shot(1, &l1), t0);
        let l3 = lease("L3", "bob", true);
        s.admit(claim(2, "bob@b", 20, &l3), t0);
        match &s.strays(0)[..] {
            [Action::Bye {
                handle: 1, reason, ..
            }] => assert!(reason.contains("bob@b"), "{reason}"),
            a => panic!("{a:?}"),
        }
        assert_eq!(s.holder(), Some("bob@b"), "the holder stays");
    }

    #[test]
    fn an_auto_extending_lease_warns_only_at_its_hard_limit() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let mut l1 = lease("L1", "alice", true);
        l1.until = Some(1000);
        s.admit(claim(1, "alice@a", 10, &l1), t0);
        // The controller says it extends while used: no warning before this end.
        s.set_lease_end("L1", 1000, true);
        assert_eq!(
            s.tick(700),
            None,
            "an end that moves while in use is not announced"
        );
        // Extended up to its hard limit: from now on it ends as any lease and is announced.
        s.set_lease_end("L1", 1500, false);
        match s.tick(1200) {
            Some(Action::Notice { handle: 1, text }) => assert!(text.contains("5m00s"), "{text}"),
            a => panic!("{a:?}"),
        }
        // A push repeating the same end does not warn twice.
        s.set_lease_end("L1", 1500, false);
        assert_eq!(s.tick(1201), None);
        // Expiry still ends an extending lease whose extension never came (no controller).
        s.set_lease_end("L1", 1600, true);
        assert!(matches!(s.tick(1600), Some(Action::Bye { handle: 1, .. })));
    }

    #[test]
    fn leases_end_expire_and_warn_on_virtual_time() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let mut l1 = lease("L1", "alice", true);
        l1.until = Some(1000);
        s.admit(claim(1, "alice@a", 10, &l1), t0);
        assert_eq!(s.tick(600), None, "more than five minutes left");
        match s.tick(700) {
            Some(Action::Notice { handle: 1, text }) => assert!(text.contains("5m00s"), "{text}"),
            a => panic!("{a:?}"),
        }
        assert_eq!(s.tick(701), None, "warned once");
        // Extended: warned again near the new end.
        s.set_lease_end("L1", 2000, false);
        assert_eq!(s.tick(1000), None);
        assert!(matches!(s.tick(1700), Some(Action::Notice { .. })));
        assert!(matches!(
            s.tick(2000),
            Some(Action::Bye {
                handle: 1,
                code: ErrorCode::LeaseEnded,
                ..
            })
        ));
        assert_eq!(s.holder(), None);
        // Ended by the controller, and superseded.
        s.admit(claim(2, "alice@a", 10, &l1), t0);
        assert_eq!(s.end_lease("other", "deleted"), None);
        assert!(matches!(
            s.end_lease("L1", "deleted"),
            Some(Action::Bye { handle: 2, .. })
        ));
        s.admit(claim(3, "alice@a", 10, &l1), t0);
        assert_eq!(s.keep_only_lease(Some("L1")), None);
        assert!(matches!(
            s.keep_only_lease(None),
            Some(Action::Bye {
                handle: 3,
                code: ErrorCode::LeaseEnded,
                ..
            })
        ));
    }

    fn guest(name: &str, client: &str, control: bool, until: u64) -> Admission {
        Admission {
            until: Some(until),
            share: Some(jmp_protocol::token::ShareClaim { control }),
            ..lease(name, client, true)
        }
    }

    fn bye_reason(a: &[Action<u64>], handle: u64) -> String {
        match a {
            [Action::Bye {
                handle: h,
                code: ErrorCode::LeaseEnded,
                reason,
            }] if *h == handle => reason.clone(),
            a => panic!("{a:?}"),
        }
    }

    /// Issue 21 item 2: a colleague of a shared lease attaches beside the holder (never as the
    /// holder), only while the controller lists its share with the terms its token claims; it
    /// goes when the share is revoked or changed, when the share's end passes, and when the
    /// lease ends or is superseded.
    #[test]
    fn a_colleague_of_a_shared_lease_attaches_beside_the_holder_until_unshared() {
        let t0 = Instant::now();
        let mut s = Seat::new("rpi4");
        let l1 = lease("L1", "alice", true);
        s.admit(claim(1, "alice@a", 10, &l1), t0);
        s.keep_only_lease(Some("L1"));
        let bob = guest("L1", "bob", false, 1000);
        // Not shared as far as the controller said: refused, saying so.
        match s.admit(claim(2, "bob@b", 20, &bob), t0) {
            Verdict::Refuse { code, reason } => {
                assert_eq!(code, ErrorCode::Unauthorized);
                assert!(reason.contains("not shared with bob"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        s.set_shares(Some("L1"), vec![("bob".into(), false)]);
        assert_eq!(
            s.admit(claim(2, "bob@b", 20, &bob), t0),
            Verdict::Admit { evict: None }
        );
        assert_eq!(s.holder(), Some("alice@a"), "the holder stays the holder");
        assert_eq!(s.guests(), vec![("bob".to_string(), false)]);
        // A token claiming control the share does not give is refused.
        let bob_ctl = guest("L1", "bob", true, 1000);
        assert!(matches!(
            s.admit(claim(3, "bob@b", 21, &bob_ctl), t0),
            Verdict::Refuse {
                code: ErrorCode::Unauthorized,
                ..
            }
        ));
        assert_eq!(s.strays(0), vec![]);
        // Control given: the read-only session goes (attach again for control).
        s.set_shares(Some("L1"), vec![("bob".into(), true)]);
        assert!(bye_reason(&s.strays(0), 2).contains("changed its share with bob"));
        assert_eq!(
            s.admit(claim(3, "bob@b", 21, &bob_ctl), t0),
            Verdict::Admit { evict: None }
        );
        // Unshared: the colleague's session is ended with the reason.
        s.set_shares(Some("L1"), vec![]);
        assert!(bye_reason(&s.strays(0), 3).contains("ended its share with bob"));
        assert!(s.guests().is_empty());
        assert_eq!(s.holder(), Some("alice@a"));
        // The share's end (its token's), and the lease's end.
        s.set_shares(Some("L1"), vec![("bob".into(), false)]);
        s.admit(claim(4, "bob@b", 22, &guest("L1", "bob", false, 500)), t0);
        assert!(bye_reason(&s.strays(500), 4).contains("share of lease L1 with bob ended"));
        // The holder narrowed the share after the token was made: the pushed end counts.
        s.admit(claim(7, "bob@b", 25, &bob), t0);
        s.cap_guests("L1", &[("bob".into(), 600)]);
        assert_eq!(s.strays(599), vec![]);
        assert!(bye_reason(&s.strays(600), 7).contains("share of lease L1 with bob ended"));
        s.admit(claim(5, "bob@b", 23, &bob), t0);
        s.end_lease("L1", "released");
        assert!(bye_reason(&s.strays(0), 5).contains("lease L1 ended"));
        // A share of a lease that is not the current one admits nobody.
        let mut s = Seat::new("rpi4");
        s.keep_only_lease(Some("L2"));
        s.set_shares(Some("L2"), vec![("bob".into(), false)]);
        assert!(matches!(
            s.admit(claim(6, "bob@b", 24, &bob), t0),
            Verdict::Refuse { .. }
        ));
        // Guests are bounded: in all, and per colleague (issue 21: one colleague cannot take
        // every slot from the others the holder shared with).
        let names: Vec<String> = (0..MAX_GUESTS).map(|i| format!("c{i}")).collect();
        s.set_shares(
            Some("L2"),
            names.iter().map(|n| (n.clone(), false)).collect(),
        );
        let c0 = guest("L2", "c0", false, 1000);
        for conn in 0..MAX_GUESTS_PER_CLIENT as u64 {
            assert_eq!(
                s.admit(claim(10 + conn, "c0@b", 30 + conn, &c0), t0),
                Verdict::Admit { evict: None }
            );
        }
        match s.admit(claim(98, "c0@b", 98, &c0), t0) {
            Verdict::Refuse { code, reason } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(
                    reason.contains("c0 already has 2 sessions")
                        && reason.contains("per colleague"),
                    "{reason}"
                );
            }
            v => panic!("{v:?}"),
        }
        for (i, n) in names.iter().enumerate().skip(1) {
            if s.guests().len() == MAX_GUESTS {
                break;
            }
            let a = guest("L2", n, false, 1000);
            assert_eq!(
                s.admit(claim(20 + i as u64, "x@b", 40 + i as u64, &a), t0),
                Verdict::Admit { evict: None },
                "{n}"
            );
        }
        assert_eq!(s.guests().len(), MAX_GUESTS);
        let last = guest("L2", &names[MAX_GUESTS - 1], false, 1000);
        match s.admit(claim(99, "x@b", 99, &last), t0) {
            Verdict::Refuse { code, reason } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(reason.contains("already serves 8"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        s.detached(10);
        assert_eq!(s.guests().len(), MAX_GUESTS - 1);
        assert_eq!(
            s.admit(claim(12, "c0@b", 32, &c0), t0),
            Verdict::Admit { evict: None },
            "a colleague's slot comes back when its session ends"
        );
    }

    /// Issue 21: the holder is told who is attached beside it (if its Hello asked), and a
    /// guest alone keeps its lease in use.
    #[test]
    fn the_holder_sees_its_guests_and_a_guest_alone_keeps_the_lease_in_use() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        let mut s = Seat::new("rpi4");
        let l1 = lease("L1", "alice", true);
        s.keep_only_lease(Some("L1"));
        s.set_shares(
            Some("L1"),
            vec![("bob".into(), false), ("carol".into(), true)],
        );
        assert_eq!(s.guest_watch(), (None, vec![]), "nobody holds the board");
        s.admit(claim(1, "alice@a", 10, &l1), t0);
        s.admit(claim(2, "bob@b", 20, &guest("L1", "bob", false, 1000)), t1);
        s.admit(
            claim(3, "carol@c", 30, &guest("L1", "carol", true, 1000)),
            t1,
        );
        assert_eq!(
            s.guest_watch(),
            (
                Some(1),
                vec![("bob".into(), false, t1), ("carol".into(), true, t1)]
            )
        );
        assert_eq!(s.lease_in_use(), Some("L1"));
        // The holder leaves: the colleagues still use the lease.
        s.detached(1);
        assert_eq!(s.guest_watch().0, None);
        assert_eq!(s.lease_in_use(), Some("L1"));
        s.detached(2);
        s.detached(3);
        assert_eq!(s.lease_in_use(), None);
        // A holder whose Hello does not understand the list is not sent it.
        let mut c = claim(4, "alice@a", 11, &l1);
        c.wants_guests = false;
        s.admit(c, t1);
        s.admit(claim(5, "bob@b", 21, &guest("L1", "bob", false, 1000)), t1);
        assert_eq!(s.guest_watch(), (None, vec![("bob".into(), false, t1)]));
    }
}
