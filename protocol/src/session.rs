//! The session state machine: which control message is legal when, which channels exist, the
//! pairing of an exporter's incoming data streams with their `Open`, requests and their answers,
//! and when a pending step has waited too long. Sans-IO in the quinn-proto style: input through
//! `handle_*`, commands as methods, output through `poll_*`. Time is only what callers pass in.
//!
//! One `Session` per connection, owned by the one task that owns the connection (transport's
//! Link). A protocol violation by the peer ends the session with `Bye { Protocol }` rather than a
//! panic: everything handled here came from the network. Every collection here is bounded, so a
//! peer cannot grow this side's memory without bound.

use crate::error::ErrorCode;
use crate::message::*;
use crate::name;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// Streams an exporter holds for `Open`s that have not arrived yet (the two race).
pub const MAX_ORPHAN_STREAMS: usize = 256;
/// Channels (open or opening) one connection may have: as many as QUIC lets a client open
/// streams at once.
pub const MAX_CHANNELS: usize = 1024;
/// Device requests one connection may have unanswered at the exporter. The exporter's link
/// stops reading control messages while this many are unanswered ([`Session::takes_requests`]),
/// so a client that sends more waits; a request beyond it that arrives anyway is answered at
/// once with `busy`.
pub const MAX_REQUESTS: usize = 64;
/// Largest `Open.params` an exporter accepts: every kind's are a few dozen bytes, and an
/// exporter holds each channel's `Open` while it waits for its stream.
pub const MAX_OPEN_PARAMS: usize = 4096;

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
    /// Client: the exporter accepted us (its names already checked against [`crate::name`]).
    Welcome(Welcome),
    /// Exporter: a channel request, ready to decide: answer with [`Session::opened`] or
    /// [`Session::reject`]. For a stream channel its stream has arrived (reported through
    /// [`Session::handle_stream`]) and belongs to this request now.
    Incoming(Open),
    /// Exporter: reset the stream held for this channel (its `Open` never came, or was
    /// refused before the stream arrived).
    DropStream(u64),
    /// Client: a channel we asked for is open.
    Opened {
        channel: u64,
        params: Bytes,
    },
    /// Client: a channel we asked for was refused, timed out, or the session ended first.
    Rejected {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    Control {
        channel: u64,
        body: Bytes,
    },
    /// The peer closed a channel.
    Closed {
        channel: u64,
        code: ErrorCode,
        reason: String,
    },
    /// Exporter: a device request; answer with [`Session::done`].
    Request(Request),
    /// Client: the answer to a request (from the exporter, or made here when its deadline
    /// passed or the session ended first).
    Done(Done),
    Notice(Notice),
    /// Client: a device's state changed.
    Status(Status),
    /// Client: the colleagues attached beside this session now (the whole list).
    Guests(Guests),
    /// The session is over; always the last event. `by_peer`: the other side said Bye;
    /// otherwise we ended it (a protocol violation, a timeout, or our own `bye`).
    Ended {
        code: ErrorCode,
        reason: String,
        by_peer: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chan {
    /// Client asked, exporter has not answered yet.
    Opening {
        deadline: Instant,
    },
    /// Exporter: a stream `Open` whose stream has not arrived yet.
    AwaitingStream {
        open: Open,
        deadline: Instant,
    },
    /// Exporter: request delivered to the application, not answered yet.
    Requested,
    Open,
}

/// What the exporter's transport does with a data stream it just read the header of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamVerdict {
    /// Hold it: an [`Event::Incoming`] or [`Event::DropStream`] for its channel follows.
    Keep,
    /// Reset it now (a used channel id, a duplicate, too many waiting).
    Refuse,
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// How long the handshake may take (Hello → Welcome).
    pub handshake_timeout: Duration,
    /// How long an Open may wait for its answer, and an exporter for the other half of a
    /// channel (its stream, or its `Open`).
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
    /// Exporter: streams that arrived before their `Open`, and until when they wait.
    orphans: BTreeMap<u64, Instant>,
    /// Client: requests sent and not answered, with their deadlines. Exporter: requests
    /// delivered and not answered.
    requests: BTreeMap<u64, Option<Instant>>,
    next_request: u64,
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
            orphans: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 1,
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

    /// Exporter: whether another request may be delivered now (fewer than [`MAX_REQUESTS`]
    /// unanswered). While it may not, the transport reads no more control messages: the
    /// client's requests wait in its own flow control. Always true on the client.
    pub fn takes_requests(&self) -> bool {
        self.role == Role::Client || self.requests.len() < MAX_REQUESTS
    }

    // ---- input ----

    pub fn handle_message(&mut self, msg: Message, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        match (self.role, self.state, msg) {
            (_, _, Message::Bye(b)) => self.ended(b.code, b.reason, true),
            (Role::Exporter, State::Handshake, Message::Hello(h))
                if self.handshake_deadline.is_some() =>
            {
                // The application decides (it may check a token with the controller's key);
                // a second Hello meanwhile is a violation, caught by the guard above.
                self.handshake_deadline = None;
                self.events.push_back(Event::Hello(h));
            }
            (Role::Client, State::Handshake, Message::Welcome(w)) => {
                if let Err(why) = check_welcome(&w) {
                    return self.violation(format!("the exporter's Welcome is refused: {why}"));
                }
                self.state = State::Established;
                self.handshake_deadline = None;
                self.events.push_back(Event::Welcome(w));
            }
            (Role::Client, State::Handshake, Message::Notice(n)) if n.channel == 0 => {
                // The exporter is still deciding (it prepares the board for this lease): each
                // session notice restarts the handshake's clock, so a long preparation keeps
                // the client waiting as long as the exporter keeps saying so.
                self.handshake_deadline = Some(now + self.config.handshake_timeout);
                self.events.push_back(Event::Notice(n));
            }
            (Role::Exporter, State::Established, Message::Open(o)) => self.open_arrived(o, now),
            (Role::Client, State::Established, Message::Opened(o)) => {
                match self.channels.get_mut(&o.channel) {
                    Some(c @ Chan::Opening { .. }) => {
                        *c = Chan::Open;
                        self.events.push_back(Event::Opened {
                            channel: o.channel,
                            params: o.params,
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
            (_, State::Established, Message::Close(c)) => match self.channels.remove(&c.channel) {
                Some(Chan::AwaitingStream { .. }) => {
                    // Closed before its stream came: nothing was delivered, nothing to say.
                }
                Some(_) => self.events.push_back(Event::Closed {
                    channel: c.channel,
                    code: c.code,
                    reason: c.reason,
                }),
                None => {
                    if self.orphans.remove(&c.channel).is_some() {
                        self.events.push_back(Event::DropStream(c.channel));
                    } else if !self.was_used(c.channel) {
                        self.violation(format!("Close for unknown channel {}", c.channel));
                    }
                    // Otherwise both sides closed at once: nothing to do.
                }
            },
            (_, State::Established, Message::Control(c)) => {
                if matches!(self.channels.get(&c.channel), Some(Chan::Open)) {
                    self.events.push_back(Event::Control {
                        channel: c.channel,
                        body: c.body,
                    });
                } else if !self.was_used(c.channel) {
                    self.violation(format!("Control for unknown channel {}", c.channel));
                }
            }
            (_, State::Established, Message::Notice(n)) => {
                if n.channel == 0 || self.channels.contains_key(&n.channel) {
                    self.events.push_back(Event::Notice(n));
                } else if !self.was_used(n.channel) {
                    self.violation(format!("Notice for unknown channel {}", n.channel));
                }
            }
            (Role::Exporter, State::Established, Message::Request(r)) => {
                if r.id == 0 || r.id < self.next_request {
                    return self.violation(format!("Request reuses id {}", r.id));
                }
                self.next_request = r.id.saturating_add(1);
                if self.requests.len() >= MAX_REQUESTS {
                    self.outbox.push_back(Message::Done(Done {
                        id: r.id,
                        code: ErrorCode::Busy,
                        reason: format!("more than {MAX_REQUESTS} requests in flight"),
                        body: Bytes::new(),
                    }));
                    return;
                }
                self.requests.insert(r.id, None);
                self.events.push_back(Event::Request(r));
            }
            (Role::Client, State::Established, Message::Done(d)) => {
                if self.requests.remove(&d.id).is_some() {
                    self.events.push_back(Event::Done(d));
                } else if d.id == 0 || d.id >= self.next_request {
                    self.violation(format!("Done for request {} never made", d.id));
                }
                // Otherwise it answers a request that already timed out here: too late.
            }
            (Role::Client, State::Established, Message::Status(s)) => {
                self.events.push_back(Event::Status(s));
            }
            (Role::Client, State::Established, Message::Guests(g)) => {
                self.events.push_back(Event::Guests(g));
            }
            (_, _, m) => self.violation(format!("unexpected {} in this state", m.name())),
        }
    }

    fn open_arrived(&mut self, o: Open, now: Instant) {
        if o.channel == 0 || o.channel < self.next_channel {
            return self.violation(format!("Open reuses channel id {}", o.channel));
        }
        if self.channels.len() >= MAX_CHANNELS {
            return self.violation(format!("more than {MAX_CHANNELS} channels"));
        }
        if o.params.len() > MAX_OPEN_PARAMS {
            return self.violation(format!(
                "Open for channel {} carries {} bytes of parameters (at most {MAX_OPEN_PARAMS})",
                o.channel,
                o.params.len()
            ));
        }
        self.next_channel = o.channel.saturating_add(1);
        // Orphans with lower ids than this Open will never get theirs: ids only grow.
        let stale: Vec<u64> = self.orphans.range(..o.channel).map(|(c, _)| *c).collect();
        for c in stale {
            self.orphans.remove(&c);
            self.events.push_back(Event::DropStream(c));
        }
        let has_stream = self.orphans.remove(&o.channel).is_some();
        match (o.mode, has_stream) {
            (ChannelMode::Stream, true) | (ChannelMode::Datagram, false) => {
                self.channels.insert(o.channel, Chan::Requested);
                self.events.push_back(Event::Incoming(o));
            }
            (ChannelMode::Stream, false) => {
                let deadline = now + self.config.open_timeout;
                self.channels
                    .insert(o.channel, Chan::AwaitingStream { open: o, deadline });
            }
            (ChannelMode::Datagram, true) => {
                self.violation(format!(
                    "a stream was opened for datagram channel {}",
                    o.channel
                ));
            }
        }
    }

    /// Exporter: a data stream arrived naming `channel` in its header.
    pub fn handle_stream(&mut self, channel: u64, now: Instant) -> StreamVerdict {
        if self.role != Role::Exporter || self.state != State::Established {
            return StreamVerdict::Refuse;
        }
        match self.channels.get(&channel) {
            Some(Chan::AwaitingStream { .. }) => {
                if let Some(Chan::AwaitingStream { open, .. }) = self.channels.remove(&channel) {
                    self.channels.insert(channel, Chan::Requested);
                    self.events.push_back(Event::Incoming(open));
                }
                StreamVerdict::Keep
            }
            Some(_) => StreamVerdict::Refuse,
            None if channel == 0
                || channel < self.next_channel
                || self.orphans.contains_key(&channel)
                || self.orphans.len() >= MAX_ORPHAN_STREAMS =>
            {
                StreamVerdict::Refuse
            }
            None => {
                self.orphans.insert(channel, now + self.config.open_timeout);
                StreamVerdict::Keep
            }
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
            .filter(|(_, c)| match c {
                Chan::Opening { deadline } | Chan::AwaitingStream { deadline, .. } => {
                    now >= *deadline
                }
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for channel in expired {
            match self.channels.remove(&channel) {
                Some(Chan::Opening { .. }) => {
                    self.events.push_back(Event::Rejected {
                        channel,
                        code: ErrorCode::Timeout,
                        reason: "the exporter did not answer the open in time".into(),
                    });
                    // Tell the exporter too, in case its answer is merely late.
                    self.outbox.push_back(Message::Close(Close {
                        channel,
                        code: ErrorCode::Timeout,
                        reason: "open timed out".into(),
                    }));
                }
                Some(Chan::AwaitingStream { .. }) => {
                    self.outbox.push_back(Message::Reject(Reject {
                        channel,
                        code: ErrorCode::Protocol,
                        reason: "the channel's stream never arrived".into(),
                    }));
                }
                _ => {}
            }
        }
        let orphans: Vec<u64> = self
            .orphans
            .iter()
            .filter(|(_, d)| now >= **d)
            .map(|(c, _)| *c)
            .collect();
        for c in orphans {
            self.orphans.remove(&c);
            self.events.push_back(Event::DropStream(c));
        }
        if self.role == Role::Client {
            let late: Vec<u64> = self
                .requests
                .iter()
                .filter(|(_, d)| d.is_some_and(|d| now >= d))
                .map(|(id, _)| *id)
                .collect();
            for id in late {
                self.requests.remove(&id);
                self.events.push_back(Event::Done(Done {
                    id,
                    code: ErrorCode::Timeout,
                    reason: "no answer from the exporter in time".into(),
                    body: Bytes::new(),
                }));
            }
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
        params: Bytes,
        now: Instant,
    ) -> Option<u64> {
        if self.role != Role::Client
            || self.state != State::Established
            || self.channels.len() >= MAX_CHANNELS
        {
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
            params,
        }));
        Some(channel)
    }

    /// Exporter: the channel delivered by `Incoming` is ready.
    pub fn opened(&mut self, channel: u64, params: Bytes) {
        if let Some(c @ Chan::Requested) = self.channels.get_mut(&channel) {
            *c = Chan::Open;
            self.outbox
                .push_back(Message::Opened(Opened { channel, params }));
        }
    }

    /// Exporter: refuse the channel delivered by `Incoming`.
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

    /// Either side: a kind's out-of-band message for an open channel.
    pub fn control(&mut self, channel: u64, body: Bytes) -> bool {
        let ok = self.state == State::Established
            && matches!(self.channels.get(&channel), Some(Chan::Open));
        if ok {
            self.outbox
                .push_back(Message::Control(Control { channel, body }));
        }
        ok
    }

    /// Either side: text for the user, about a channel or (0) the session.
    /// An exporter may also send session notices (channel 0) after the Hello and before its
    /// Welcome, to a client whose Hello has [`crate::features::WAITS`].
    pub fn notice(&mut self, channel: u64, text: impl Into<String>) -> bool {
        let deciding = self.role == Role::Exporter
            && self.state == State::Handshake
            && self.handshake_deadline.is_none()
            && channel == 0;
        let ok = deciding
            || (self.state == State::Established
                && (channel == 0 || self.channels.contains_key(&channel)));
        if ok {
            self.outbox.push_back(Message::Notice(Notice {
                channel,
                text: text.into(),
            }));
        }
        ok
    }

    /// Client: a device request, answered by an [`Event::Done`] with the returned id (made
    /// here if no answer comes by `deadline`, or if the session ends first).
    pub fn request(&mut self, device: &str, body: Bytes, deadline: Option<Instant>) -> Option<u64> {
        if self.role != Role::Client || self.state != State::Established {
            return None;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, deadline);
        self.outbox.push_back(Message::Request(Request {
            id,
            device: device.to_string(),
            body,
        }));
        Some(id)
    }

    /// Exporter: the answer to the request delivered as `Request { id }`.
    pub fn done(&mut self, id: u64, code: ErrorCode, reason: impl Into<String>, body: Bytes) {
        if self.role == Role::Exporter
            && self.state == State::Established
            && self.requests.remove(&id).is_some()
        {
            self.outbox.push_back(Message::Done(Done {
                id,
                code,
                reason: reason.into(),
                body,
            }));
        }
    }

    /// Exporter: a device's state changed.
    pub fn status(&mut self, status: Status) {
        if self.role == Role::Exporter && self.state == State::Established {
            self.outbox.push_back(Message::Status(status));
        }
    }

    /// Exporter: the colleagues attached beside this session (send only to a holder whose
    /// Hello has [`crate::features::GUESTS`]; the caller knows). Dropped before the Welcome:
    /// the exporter sends the list as it is then, after it.
    pub fn guests(&mut self, guests: Guests) {
        if self.role == Role::Exporter && self.state == State::Established {
            self.outbox.push_back(Message::Guests(guests));
        }
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
        self.outbox.push_back(Message::Bye(Bye {
            code,
            reason: reason.clone(),
        }));
        self.ended(code, reason, false);
    }

    /// Everything still waiting is answered with the end's reason, then `Ended`.
    fn ended(&mut self, code: ErrorCode, reason: String, by_peer: bool) {
        self.state = State::Closed;
        self.handshake_deadline = None;
        let channels = std::mem::take(&mut self.channels);
        for (channel, c) in channels {
            if let Chan::Opening { .. } = c {
                self.events.push_back(Event::Rejected {
                    channel,
                    code,
                    reason: reason.clone(),
                });
            }
        }
        for channel in std::mem::take(&mut self.orphans).into_keys() {
            self.events.push_back(Event::DropStream(channel));
        }
        if self.role == Role::Client {
            for id in std::mem::take(&mut self.requests).into_keys() {
                self.events.push_back(Event::Done(Done {
                    id,
                    code,
                    reason: reason.clone(),
                    body: Bytes::new(),
                }));
            }
        }
        self.requests.clear();
        self.events.push_back(Event::Ended {
            code,
            reason,
            by_peer,
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
        let chans = self.channels.values().filter_map(|c| match c {
            Chan::Opening { deadline } | Chan::AwaitingStream { deadline, .. } => Some(*deadline),
            _ => None,
        });
        let requests = self.requests.values().filter_map(|d| *d);
        self.handshake_deadline
            .into_iter()
            .chain(chans)
            .chain(self.orphans.values().copied())
            .chain(requests)
            .min()
    }
}

/// Names in a Welcome become local paths, interface names and log lines: each must follow
/// [`crate::name`], and device names must be distinct.
fn check_welcome(w: &Welcome) -> Result<(), String> {
    name::check("exporter name", &w.exporter).map_err(|e| e.to_string())?;
    if w.devices.len() > MAX_DEVICES {
        return Err(format!(
            "it lists {} devices (at most {MAX_DEVICES})",
            w.devices.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for d in &w.devices {
        name::check("device name", &d.name).map_err(|e| e.to_string())?;
        if !seen.insert(d.name.as_str()) {
            return Err(format!("device {} is listed twice", d.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
