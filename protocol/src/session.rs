//! The channel session state machine: which control message is legal when, which channels exist,
//! and when a pending step has waited too long. Sans-IO in the quinn-proto style: input through
//! `handle_*`, commands as methods, output through `poll_*`. Time is only what callers pass in.
//!
//! One `Session` per connection, owned by the one task that owns the connection (transport's
//! Link). A protocol violation by the peer ends the session with `Bye { Protocol }` rather than a
//! panic: everything handled here came from the network.

use crate::error::ErrorCode;
use crate::message::*;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Exporter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Client: Hello sent, waiting for Welcome. Exporter: waiting for Hello, or for the
    /// application to decide on it.
    Handshake,
    Established,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Exporter: the client said Hello; answer with [`Session::welcome`] or [`Session::bye`].
    Hello(Hello),
    /// Client: the exporter accepted us.
    Welcome(Welcome),
    /// Exporter: the client wants a channel; answer with [`Session::opened`] or
    /// [`Session::reject`].
    OpenRequested(Open),
    /// Client: a channel we asked for is open.
    Opened {
        channel: u64,
        offset: u64,
    },
    /// Client: a channel we asked for was refused (or timed out: code `Internal`).
    Rejected {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    Control {
        channel: u64,
        body: ControlBody,
    },
    /// The peer closed a channel.
    Closed {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    /// The session is over. `by_peer`: the other side said Bye; otherwise we ended it (a
    /// protocol violation, a timeout, or our own `bye`).
    Ended {
        code: ErrorCode,
        reason: String,
        by_peer: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chan {
    /// Client asked, exporter has not answered yet.
    Opening {
        deadline: Instant,
    },
    /// Exporter: request delivered to the application, not answered yet.
    Requested,
    Open,
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// How long the handshake may take (Hello → Welcome).
    pub handshake_timeout: Duration,
    /// How long an Open may wait for its answer.
    pub open_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug)]
pub struct Session {
    role: Role,
    state: State,
    config: Config,
    handshake_deadline: Option<Instant>,
    channels: BTreeMap<u64, Chan>,
    /// Client: the next id to hand out. Exporter: one more than the highest id seen; ids are
    /// never reused, so anything below it that is not in `channels` was closed.
    next_channel: u64,
    outbox: VecDeque<Message>,
    events: VecDeque<Event>,
}

impl Session {
    /// A client session; `Hello` is queued at once.
    pub fn client(hello: Hello, config: Config, now: Instant) -> Self {
        let mut s = Self::new(Role::Client, config, now);
        s.outbox.push_back(Message::Hello(hello));
        s
    }

    pub fn exporter(config: Config, now: Instant) -> Self {
        Self::new(Role::Exporter, config, now)
    }

    fn new(role: Role, config: Config, now: Instant) -> Self {
        Session {
            role,
            state: State::Handshake,
            config,
            handshake_deadline: Some(now + config.handshake_timeout),
            channels: BTreeMap::new(),
            next_channel: 1,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn open_channels(&self) -> usize {
        self.channels.len()
    }

    // ---- input ----

    pub fn handle_message(&mut self, msg: Message, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        match (self.role, self.state, msg) {
            (_, _, Message::Bye(b)) => {
                self.state = State::Closed;
                self.channels.clear();
                self.events.push_back(Event::Ended {
                    code: b.code,
                    reason: b.reason,
                    by_peer: true,
                });
            }
            (Role::Exporter, State::Handshake, Message::Hello(h))
                if self.handshake_deadline.is_some() =>
            {
                // The application decides (it may check a token with the controller's key);
                // a second Hello meanwhile is a violation, caught by the guard above.
                let _ = now;
                self.handshake_deadline = None;
                self.events.push_back(Event::Hello(h));
            }
            (Role::Client, State::Handshake, Message::Welcome(w)) => {
                self.state = State::Established;
                self.handshake_deadline = None;
                self.events.push_back(Event::Welcome(w));
            }
            (Role::Exporter, State::Established, Message::Open(o)) => {
                if o.channel == 0 || o.channel < self.next_channel {
                    return self.violation(format!("Open reuses channel id {}", o.channel));
                }
                self.next_channel = o.channel.saturating_add(1);
                self.channels.insert(o.channel, Chan::Requested);
                self.events.push_back(Event::OpenRequested(o));
            }
            (Role::Client, State::Established, Message::Opened(o)) => {
                match self.channels.get_mut(&o.channel) {
                    Some(c @ Chan::Opening { .. }) => {
                        *c = Chan::Open;
                        self.events.push_back(Event::Opened {
                            channel: o.channel,
                            offset: o.offset,
                        });
                    }
                    _ => self.violation(format!(
                        "Opened for channel {} that was not opening",
                        o.channel
                    )),
                }
            }
            (Role::Client, State::Established, Message::Reject(r)) => {
                match self.channels.get(&r.channel) {
                    Some(Chan::Opening { .. }) => {
                        self.channels.remove(&r.channel);
                        self.events.push_back(Event::Rejected {
                            channel: r.channel,
                            code: r.code,
                            reason: r.reason,
                        });
                    }
                    _ => self.violation(format!(
                        "Reject for channel {} that was not opening",
                        r.channel
                    )),
                }
            }
            (_, State::Established, Message::Close(c)) => {
                if self.channels.remove(&c.channel).is_some() {
                    self.events.push_back(Event::Closed {
                        channel: c.channel,
                        code: c.code,
                        reason: c.reason,
                    });
                } else if !self.was_used(c.channel) {
                    self.violation(format!("Close for unknown channel {}", c.channel));
                }
                // Otherwise both sides closed at once: nothing to do.
            }
            (_, State::Established, Message::Control(c)) => {
                if c.channel == 0 || self.channels.contains_key(&c.channel) {
                    self.events.push_back(Event::Control {
                        channel: c.channel,
                        body: c.body,
                    });
                } else if !self.was_used(c.channel) {
                    self.violation(format!("Control for unknown channel {}", c.channel));
                }
            }
            (_, _, m) => self.violation(format!("unexpected {} in this state", m.name())),
        }
    }

    /// Whether `channel` existed once (closed since): late messages for it are a harmless race.
    fn was_used(&self, channel: u64) -> bool {
        channel != 0 && channel < self.next_channel
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.handshake_deadline.is_some_and(|d| now >= d) {
            self.handshake_deadline = None;
            let what = match self.role {
                Role::Client => "no Welcome from the exporter",
                Role::Exporter => "no Hello from the client",
            };
            self.end(ErrorCode::Protocol, format!("handshake timed out: {what}"));
            return;
        }
        let expired: Vec<u64> = self
            .channels
            .iter()
            .filter(|(_, c)| matches!(c, Chan::Opening { deadline } if now >= *deadline))
            .map(|(id, _)| *id)
            .collect();
        for channel in expired {
            self.channels.remove(&channel);
            self.events.push_back(Event::Rejected {
                channel,
                code: ErrorCode::Internal,
                reason: "the exporter did not answer the open in time".into(),
            });
            // Tell the exporter too, in case its answer is merely late.
            self.outbox.push_back(Message::Close(Close {
                channel,
                code: ErrorCode::Internal,
                reason: "open timed out".into(),
            }));
        }
    }

    // ---- commands ----

    /// Exporter: accept the Hello just reported.
    pub fn welcome(&mut self, welcome: Welcome) {
        if self.role == Role::Exporter && self.state == State::Handshake {
            self.state = State::Established;
            self.outbox.push_back(Message::Welcome(welcome));
        }
    }

    /// Client: ask for a channel. Returns its id, or `None` if the session is not established.
    pub fn open(
        &mut self,
        device: &str,
        mode: ChannelMode,
        resume_from: Option<u64>,
        now: Instant,
    ) -> Option<u64> {
        if self.role != Role::Client || self.state != State::Established {
            return None;
        }
        let channel = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(
            channel,
            Chan::Opening {
                deadline: now + self.config.open_timeout,
            },
        );
        self.outbox.push_back(Message::Open(Open {
            channel,
            device: device.to_string(),
            mode,
            resume_from,
        }));
        Some(channel)
    }

    /// Exporter: the channel requested by `OpenRequested` is ready.
    pub fn opened(&mut self, channel: u64, offset: u64) {
        if let Some(c @ Chan::Requested) = self.channels.get_mut(&channel) {
            *c = Chan::Open;
            self.outbox
                .push_back(Message::Opened(Opened { channel, offset }));
        }
    }

    /// Exporter: refuse the channel requested by `OpenRequested`.
    pub fn reject(&mut self, channel: u64, code: ErrorCode, reason: impl Into<String>) {
        if let Some(Chan::Requested) = self.channels.get(&channel) {
            self.channels.remove(&channel);
            self.outbox.push_back(Message::Reject(Reject {
                channel,
                code,
                reason: reason.into(),
            }));
        }
    }

    /// Either side: close an open channel.
    pub fn close(&mut self, channel: u64, code: ErrorCode, reason: impl Into<String>) {
        if self.channels.remove(&channel).is_some() && self.state == State::Established {
            self.outbox.push_back(Message::Close(Close {
                channel,
                code,
                reason: reason.into(),
            }));
        }
    }

    /// Either side: send out-of-band settings for an open channel (or 0: the session).
    pub fn control(&mut self, channel: u64, body: ControlBody) -> bool {
        let ok = self.state == State::Established
            && (channel == 0 || matches!(self.channels.get(&channel), Some(Chan::Open)));
        if ok {
            self.outbox
                .push_back(Message::Control(Control { channel, body }));
        }
        ok
    }

    /// End the session, telling the peer why.
    pub fn bye(&mut self, code: ErrorCode, reason: impl Into<String>) {
        if self.state != State::Closed {
            self.end(code, reason.into());
        }
    }

    fn violation(&mut self, reason: String) {
        self.end(ErrorCode::Protocol, reason);
    }

    fn end(&mut self, code: ErrorCode, reason: String) {
        self.state = State::Closed;
        self.channels.clear();
        self.handshake_deadline = None;
        self.outbox.push_back(Message::Bye(Bye {
            code,
            reason: reason.clone(),
        }));
        self.events.push_back(Event::Ended {
            code,
            reason,
            by_peer: false,
        });
    }

    // ---- output ----

    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time [`Session::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let opens = self.channels.values().filter_map(|c| match c {
            Chan::Opening { deadline } => Some(*deadline),
            _ => None,
        });
        self.handshake_deadline.into_iter().chain(opens).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            features: 0,
            client: "c".into(),
            session: 7,
            token: "t".into(),
        }
    }

    /// Moves every queued message from one session to the other.
    fn pump(from: &mut Session, to: &mut Session, now: Instant) {
        while let Some(m) = from.poll_transmit() {
            to.handle_message(m, now);
        }
    }

    fn established(now: Instant) -> (Session, Session) {
        let mut c = Session::client(hello(), Config::default(), now);
        let mut e = Session::exporter(Config::default(), now);
        pump(&mut c, &mut e, now);
        assert!(matches!(e.poll_event(), Some(Event::Hello(h)) if h.session == 7));
        e.welcome(Welcome {
            exporter: "x".into(),
            features: 0,
            instance: 1,
            devices: vec![],
        });
        pump(&mut e, &mut c, now);
        assert!(matches!(c.poll_event(), Some(Event::Welcome(_))));
        assert_eq!(c.state(), State::Established);
        assert_eq!(e.state(), State::Established);
        (c, e)
    }

    #[test]
    fn open_accept_close() {
        let t0 = Instant::now();
        let (mut c, mut e) = established(t0);
        let ch = c.open("console", ChannelMode::Stream, None, t0);
        assert_eq!(ch, Some(1));
        pump(&mut c, &mut e, t0);
        assert!(matches!(e.poll_event(), Some(Event::OpenRequested(o)) if o.device == "console"));
        e.opened(1, 42);
        pump(&mut e, &mut c, t0);
        assert_eq!(
            c.poll_event(),
            Some(Event::Opened {
                channel: 1,
                offset: 42
            })
        );
        assert!(c.control(1, ControlBody::Break { millis: 5 }));
        pump(&mut c, &mut e, t0);
        assert!(matches!(
            e.poll_event(),
            Some(Event::Control { channel: 1, .. })
        ));
        c.close(1, ErrorCode::Ok, "");
        pump(&mut c, &mut e, t0);
        assert!(matches!(
            e.poll_event(),
            Some(Event::Closed { channel: 1, .. })
        ));
        assert_eq!(e.open_channels(), 0);
        // A late Control for the closed channel is a race, not a violation.
        e.handle_message(
            Message::Control(Control {
                channel: 1,
                body: ControlBody::Break { millis: 1 },
            }),
            t0,
        );
        assert_eq!(e.state(), State::Established);
    }

    #[test]
    fn reject_reaches_the_client() {
        let t0 = Instant::now();
        let (mut c, mut e) = established(t0);
        c.open("ssh", ChannelMode::Stream, None, t0);
        pump(&mut c, &mut e, t0);
        e.poll_event();
        e.reject(1, ErrorCode::ConnectFailed, "refused");
        pump(&mut e, &mut c, t0);
        assert_eq!(
            c.poll_event(),
            Some(Event::Rejected {
                channel: 1,
                code: ErrorCode::ConnectFailed,
                reason: "refused".into()
            })
        );
        assert_eq!(c.open_channels(), 0);
    }

    #[test]
    fn open_times_out_on_virtual_time() {
        let t0 = Instant::now();
        let (mut c, mut e) = established(t0);
        c.open("console", ChannelMode::Stream, None, t0);
        pump(&mut c, &mut e, t0);
        let deadline = c.poll_timeout().expect("an open is pending");
        assert_eq!(deadline, t0 + Config::default().open_timeout);
        c.handle_timeout(deadline - Duration::from_millis(1));
        assert_eq!(c.poll_event(), None);
        c.handle_timeout(deadline);
        assert!(matches!(
            c.poll_event(),
            Some(Event::Rejected { channel: 1, .. })
        ));
        assert!(matches!(
            c.poll_transmit(),
            Some(Message::Close(Close { channel: 1, .. }))
        ));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn handshake_times_out() {
        let t0 = Instant::now();
        let mut e = Session::exporter(Config::default(), t0);
        e.handle_timeout(t0 + Duration::from_secs(11));
        assert!(matches!(
            e.poll_event(),
            Some(Event::Ended {
                code: ErrorCode::Protocol,
                by_peer: false,
                ..
            })
        ));
        assert!(matches!(e.poll_transmit(), Some(Message::Bye(_))));
        assert_eq!(e.state(), State::Closed);
    }

    #[test]
    fn violations_end_the_session_with_a_reason() {
        let t0 = Instant::now();
        // Open before Hello.
        let mut e = Session::exporter(Config::default(), t0);
        e.handle_message(
            Message::Open(Open {
                channel: 1,
                device: "x".into(),
                mode: ChannelMode::Stream,
                resume_from: None,
            }),
            t0,
        );
        match e.poll_event() {
            Some(Event::Ended { code, reason, .. }) => {
                assert_eq!(code, ErrorCode::Protocol);
                assert!(reason.contains("Open"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Reused channel id.
        let (_c, mut e) = established(t0);
        let open = Message::Open(Open {
            channel: 3,
            device: "x".into(),
            mode: ChannelMode::Stream,
            resume_from: None,
        });
        e.handle_message(open.clone(), t0);
        e.poll_event();
        e.handle_message(open, t0);
        assert!(matches!(
            e.poll_event(),
            Some(Event::Ended {
                code: ErrorCode::Protocol,
                ..
            })
        ));
        // Opened for a channel never asked for.
        let (mut c, _e) = established(t0);
        c.handle_message(
            Message::Opened(Opened {
                channel: 9,
                offset: 0,
            }),
            t0,
        );
        assert!(matches!(
            c.poll_event(),
            Some(Event::Ended {
                code: ErrorCode::Protocol,
                ..
            })
        ));
    }

    #[test]
    fn bye_from_peer_is_reported_once() {
        let t0 = Instant::now();
        let (mut c, mut e) = established(t0);
        e.bye(ErrorCode::LeaseEnded, "lease expired");
        pump(&mut e, &mut c, t0);
        assert_eq!(
            c.poll_event(),
            Some(Event::Ended {
                code: ErrorCode::LeaseEnded,
                reason: "lease expired".into(),
                by_peer: true
            })
        );
        c.handle_message(
            Message::Bye(Bye {
                code: ErrorCode::Ok,
                reason: String::new(),
            }),
            t0,
        );
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.open("x", ChannelMode::Stream, None, t0), None);
    }
}
