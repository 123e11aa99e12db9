//! The session on virtual time: every deadline is an `Instant` passed in.

use super::*;

fn hello() -> Hello {
    Hello {
        features: 0,
        client: "c".into(),
        session: 7,
        token: "t".into(),
    }
}

fn welcome(devices: &[&str]) -> Welcome {
    Welcome {
        exporter: "x".into(),
        features: 0,
        instance: 1,
        devices: devices
            .iter()
            .map(|n| DeviceInfo {
                name: n.to_string(),
                kind: crate::Kind::Serial,
                state: DeviceState::Available,
                params: Bytes::new(),
                detail: String::new(),
            })
            .collect(),
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
    e.welcome(welcome(&["console", "ssh"]));
    pump(&mut e, &mut c, now);
    assert!(matches!(c.poll_event(), Some(Event::Welcome(_))));
    assert_eq!(c.state(), State::Established);
    assert_eq!(e.state(), State::Established);
    (c, e)
}

fn incoming(e: &mut Session) -> Open {
    match e.poll_event() {
        Some(Event::Incoming(o)) => o,
        other => panic!("expected Incoming, got {other:?}"),
    }
}

#[test]
fn stream_open_paired_when_the_stream_comes_first_or_second() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    // Open first, stream second.
    let ch = c
        .open("console", ChannelMode::Stream, Bytes::from_static(b"p"), t0)
        .expect("open");
    assert_eq!(ch, 1);
    pump(&mut c, &mut e, t0);
    assert_eq!(e.poll_event(), None, "no Incoming before its stream");
    assert_eq!(e.handle_stream(1, t0), StreamVerdict::Keep);
    let o = incoming(&mut e);
    assert_eq!((o.channel, &o.params[..]), (1, &b"p"[..]));
    // Stream first, Open second.
    assert_eq!(e.handle_stream(2, t0), StreamVerdict::Keep);
    assert_eq!(e.poll_event(), None);
    c.open("ssh", ChannelMode::Stream, Bytes::new(), t0);
    pump(&mut c, &mut e, t0);
    assert_eq!(incoming(&mut e).channel, 2);
    // A second stream for a paired channel, and one for channel 0, are refused.
    assert_eq!(e.handle_stream(2, t0), StreamVerdict::Refuse);
    assert_eq!(e.handle_stream(0, t0), StreamVerdict::Refuse);
    e.opened(1, Bytes::from_static(b"o"));
    pump(&mut e, &mut c, t0);
    assert_eq!(
        c.poll_event(),
        Some(Event::Opened {
            channel: 1,
            params: Bytes::from_static(b"o")
        })
    );
}

#[test]
fn an_orphan_stream_is_dropped_when_its_open_never_comes() {
    let t0 = Instant::now();
    let (_c, mut e) = established(t0);
    assert_eq!(e.handle_stream(5, t0), StreamVerdict::Keep);
    let deadline = e.poll_timeout().expect("the orphan has a deadline");
    assert_eq!(deadline, t0 + Config::default().open_timeout);
    e.handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(e.poll_event(), None);
    e.handle_timeout(deadline);
    assert_eq!(e.poll_event(), Some(Event::DropStream(5)));
    assert_eq!(e.poll_timeout(), None);
}

#[test]
fn orphans_are_bounded() {
    let t0 = Instant::now();
    let (_c, mut e) = established(t0);
    for ch in 1..=MAX_ORPHAN_STREAMS as u64 {
        assert_eq!(e.handle_stream(ch, t0), StreamVerdict::Keep);
    }
    assert_eq!(
        e.handle_stream(MAX_ORPHAN_STREAMS as u64 + 1, t0),
        StreamVerdict::Refuse
    );
}

#[test]
fn a_stream_open_whose_stream_never_comes_is_rejected() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    c.open("console", ChannelMode::Stream, Bytes::new(), t0);
    pump(&mut c, &mut e, t0);
    let later = t0 + Config::default().open_timeout;
    e.handle_timeout(later);
    pump(&mut e, &mut c, later);
    assert!(matches!(
        c.poll_event(),
        Some(Event::Rejected {
            channel: 1,
            code: ErrorCode::Protocol,
            ..
        })
    ));
}

#[test]
fn datagram_opens_need_no_stream() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    c.open("can0", ChannelMode::Datagram, Bytes::new(), t0);
    pump(&mut c, &mut e, t0);
    assert_eq!(incoming(&mut e).mode, ChannelMode::Datagram);
    e.opened(1, Bytes::new());
    pump(&mut e, &mut c, t0);
    assert!(matches!(
        c.poll_event(),
        Some(Event::Opened { channel: 1, .. })
    ));
    assert!(c.control(1, Bytes::from_static(b"ctl")));
    pump(&mut c, &mut e, t0);
    assert_eq!(
        e.poll_event(),
        Some(Event::Control {
            channel: 1,
            body: Bytes::from_static(b"ctl")
        })
    );
}

#[test]
fn reject_and_close_reach_the_other_side() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    c.open("ssh", ChannelMode::Stream, Bytes::new(), t0);
    pump(&mut c, &mut e, t0);
    e.handle_stream(1, t0);
    incoming(&mut e);
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
    c.open("ssh", ChannelMode::Stream, Bytes::new(), t0);
    pump(&mut c, &mut e, t0);
    e.handle_stream(2, t0);
    incoming(&mut e);
    e.opened(2, Bytes::new());
    pump(&mut e, &mut c, t0);
    c.poll_event();
    c.close(2, ErrorCode::Ok, "");
    pump(&mut c, &mut e, t0);
    assert!(matches!(
        e.poll_event(),
        Some(Event::Closed { channel: 2, .. })
    ));
    // A late Control for the closed channel is a race, not a violation.
    e.handle_message(
        Message::Control(Control {
            channel: 2,
            body: Bytes::new(),
        }),
        t0,
    );
    assert_eq!(e.state(), State::Established);
}

#[test]
fn open_times_out_on_virtual_time() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    c.open("console", ChannelMode::Stream, Bytes::new(), t0);
    pump(&mut c, &mut e, t0);
    let deadline = c.poll_timeout().expect("an open is pending");
    assert_eq!(deadline, t0 + Config::default().open_timeout);
    c.handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(c.poll_event(), None);
    c.handle_timeout(deadline);
    assert!(matches!(
        c.poll_event(),
        Some(Event::Rejected {
            channel: 1,
            code: ErrorCode::Timeout,
            ..
        })
    ));
    assert!(matches!(
        c.poll_transmit(),
        Some(Message::Close(Close { channel: 1, .. }))
    ));
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn requests_are_answered_or_time_out_or_fail_with_the_session() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    let deadline = t0 + Duration::from_secs(5);
    let id = c
        .request("power", Bytes::from_static(b"on"), Some(deadline))
        .expect("request");
    pump(&mut c, &mut e, t0);
    match e.poll_event() {
        Some(Event::Request(r)) => {
            assert_eq!((r.id, r.device.as_str()), (id, "power"));
        }
        other => panic!("{other:?}"),
    }
    e.done(id, ErrorCode::Ok, "", Bytes::from_static(b"state"));
    // A second answer to the same request is not sent.
    e.done(id, ErrorCode::Ok, "", Bytes::new());
    pump(&mut e, &mut c, t0);
    assert_eq!(
        c.poll_event(),
        Some(Event::Done(Done {
            id,
            code: ErrorCode::Ok,
            reason: String::new(),
            body: Bytes::from_static(b"state")
        }))
    );
    assert_eq!(c.poll_event(), None);

    // No answer by the deadline.
    let id2 = c
        .request("power", Bytes::new(), Some(deadline))
        .expect("request");
    assert_eq!(c.poll_timeout(), Some(deadline));
    c.handle_timeout(deadline);
    assert!(matches!(
        c.poll_event(),
        Some(Event::Done(Done { id, code: ErrorCode::Timeout, .. })) if id == id2
    ));
    // Its late answer is ignored, not a violation.
    pump(&mut c, &mut e, t0);
    e.poll_event();
    e.done(id2, ErrorCode::Ok, "", Bytes::new());
    pump(&mut e, &mut c, t0);
    assert_eq!(c.poll_event(), None);
    assert_eq!(c.state(), State::Established);

    // Pending when the session ends: answered with the end's reason.
    let id3 = c.request("power", Bytes::new(), None).expect("request");
    pump(&mut c, &mut e, t0);
    e.bye(ErrorCode::LeaseEnded, "lease over");
    pump(&mut e, &mut c, t0);
    assert_eq!(
        c.poll_event(),
        Some(Event::Done(Done {
            id: id3,
            code: ErrorCode::LeaseEnded,
            reason: "lease over".into(),
            body: Bytes::new()
        }))
    );
    assert!(matches!(
        c.poll_event(),
        Some(Event::Ended { by_peer: true, .. })
    ));
}

#[test]
fn too_many_requests_are_answered_busy_and_ids_never_reused() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    for _ in 0..=MAX_REQUESTS {
        c.request("power", Bytes::new(), None);
    }
    assert!(e.takes_requests() && c.takes_requests());
    pump(&mut c, &mut e, t0);
    let mut delivered = 0;
    while let Some(Event::Request(_)) = e.poll_event() {
        delivered += 1;
    }
    assert_eq!(delivered, MAX_REQUESTS);
    assert!(
        !e.takes_requests(),
        "the exporter's transport stops reading until one is answered"
    );
    pump(&mut e, &mut c, t0);
    assert!(matches!(
        c.poll_event(),
        Some(Event::Done(Done {
            code: ErrorCode::Busy,
            ..
        }))
    ));
    e.handle_message(
        Message::Request(Request {
            id: 1,
            device: "power".into(),
            body: Bytes::new(),
        }),
        t0,
    );
    assert!(matches!(
        e.poll_event(),
        Some(Event::Ended {
            code: ErrorCode::Protocol,
            ..
        })
    ));
}

#[test]
fn a_welcome_with_names_that_would_escape_a_directory_is_refused() {
    let t0 = Instant::now();
    for (exporter, devices, want) in [
        ("x/../../victim", vec!["console"], "exporter name"),
        ("rpi4", vec!["../../etc/passwd"], "device name"),
        ("rpi4", vec!["con\u{1b}[2Jsole"], "device name"),
        ("rpi4", vec!["a", "a"], "listed twice"),
        ("..", vec!["a"], "exporter name"),
    ] {
        let mut c = Session::client(hello(), Config::default(), t0);
        c.poll_transmit();
        let mut w = welcome(&devices);
        w.exporter = exporter.into();
        c.handle_message(Message::Welcome(w), t0);
        match c.poll_event() {
            Some(Event::Ended {
                code,
                reason,
                by_peer,
            }) => {
                assert_eq!(code, ErrorCode::Protocol);
                assert!(!by_peer);
                assert!(reason.contains(want), "{reason}");
                assert!(!reason.contains('\u{1b}'), "{reason:?}");
            }
            other => panic!("{exporter} {devices:?}: {other:?}"),
        }
        assert!(matches!(c.poll_transmit(), Some(Message::Bye(_))));
    }
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
    let open = |channel| {
        Message::Open(Open {
            channel,
            device: "x".into(),
            mode: ChannelMode::Datagram,
            params: Bytes::new(),
        })
    };
    // Open before Hello.
    let mut e = Session::exporter(Config::default(), t0);
    e.handle_message(open(1), t0);
    match e.poll_event() {
        Some(Event::Ended { code, reason, .. }) => {
            assert_eq!(code, ErrorCode::Protocol);
            assert!(reason.contains("Open"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Reused channel id.
    let (_c, mut e) = established(t0);
    e.handle_message(open(3), t0);
    e.poll_event();
    e.handle_message(open(3), t0);
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
            params: Bytes::new(),
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
    // A Done for a request never made.
    let (mut c, _e) = established(t0);
    c.handle_message(
        Message::Done(Done {
            id: 4,
            code: ErrorCode::Ok,
            reason: String::new(),
            body: Bytes::new(),
        }),
        t0,
    );
    assert!(matches!(c.poll_event(), Some(Event::Ended { .. })));
    // Open parameters larger than any kind's.
    let (_c, mut e) = established(t0);
    e.handle_message(
        Message::Open(Open {
            channel: 1,
            device: "x".into(),
            mode: ChannelMode::Datagram,
            params: Bytes::from(vec![0u8; MAX_OPEN_PARAMS + 1]),
        }),
        t0,
    );
    match e.poll_event() {
        Some(Event::Ended { code, reason, .. }) => {
            assert_eq!(code, ErrorCode::Protocol);
            assert!(reason.contains("parameters"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn opens_pending_at_the_end_are_rejected_and_orphans_dropped() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    c.open("console", ChannelMode::Stream, Bytes::new(), t0);
    e.handle_stream(9, t0);
    c.bye(ErrorCode::Ok, "bye");
    assert!(matches!(
        c.poll_event(),
        Some(Event::Rejected { channel: 1, .. })
    ));
    assert!(matches!(c.poll_event(), Some(Event::Ended { .. })));
    pump(&mut c, &mut e, t0);
    assert_eq!(e.poll_event(), Some(Event::DropStream(9)));
    assert!(matches!(
        e.poll_event(),
        Some(Event::Ended { by_peer: true, .. })
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
    assert_eq!(c.open("x", ChannelMode::Stream, Bytes::new(), t0), None);
}

#[test]
fn notices_and_status_flow() {
    let t0 = Instant::now();
    let (mut c, mut e) = established(t0);
    assert!(e.notice(0, "lease ends in 5m"));
    e.status(Status {
        device: "console".into(),
        state: DeviceState::Unavailable("unplugged".into()),
        params: Bytes::new(),
    });
    pump(&mut e, &mut c, t0);
    assert!(matches!(c.poll_event(), Some(Event::Notice(n)) if n.text.contains("5m")));
    assert!(matches!(c.poll_event(), Some(Event::Status(s)) if s.device == "console"));
}

/// The holder hears who is attached beside it; a client has no business sending the list, and
/// an exporter's list is dropped before its Welcome (it sends the list as it is then, after).
#[test]
fn guests_flow_from_exporter_to_client_only() {
    let t0 = Instant::now();
    let bob = Guests {
        guests: vec![GuestInfo {
            client: "bob".into(),
            control: true,
            since: 42,
        }],
    };
    let mut c = Session::client(hello(), Config::default(), t0);
    let mut e = Session::exporter(Config::default(), t0);
    pump(&mut c, &mut e, t0);
    e.guests(bob.clone());
    assert!(
        !std::iter::from_fn(|| e.poll_transmit()).any(|m| matches!(m, Message::Guests(_))),
        "nothing before the Welcome"
    );
    let (mut c, mut e) = established(t0);
    e.guests(bob.clone());
    e.guests(Guests::default());
    pump(&mut e, &mut c, t0);
    assert_eq!(c.poll_event(), Some(Event::Guests(bob.clone())));
    assert_eq!(c.poll_event(), Some(Event::Guests(Guests::default())));
    // The other way is a protocol violation.
    e.handle_message(Message::Guests(bob), t0);
    assert!(matches!(
        e.poll_event(),
        Some(Event::Ended {
            code: ErrorCode::Protocol,
            ..
        })
    ));
}

#[test]
fn notices_before_welcome_keep_a_waiting_client_waiting() {
    let t0 = Instant::now();
    let mut c = Session::client(hello(), Config::default(), t0);
    let mut e = Session::exporter(Config::default(), t0);
    // Before the Hello the exporter has nobody to tell anything.
    assert!(!e.notice(0, "too early"));
    pump(&mut c, &mut e, t0);
    assert!(matches!(e.poll_event(), Some(Event::Hello(_))));
    // Preparing the board: notices every few seconds, each restarting the client's clock.
    let mut t = t0;
    for i in 0..5 {
        t += Duration::from_secs(8);
        assert!(e.notice(0, format!("preparing board ({i})")));
        assert!(!e.notice(3, "not a channel yet"));
        pump(&mut e, &mut c, t);
        c.handle_timeout(t);
        assert!(matches!(c.poll_event(), Some(Event::Notice(n)) if n.text.contains("preparing")));
        assert_eq!(c.state(), State::Handshake);
    }
    e.welcome(welcome(&["console"]));
    pump(&mut e, &mut c, t);
    assert!(matches!(c.poll_event(), Some(Event::Welcome(_))));
    // Silence for longer than the handshake timeout still ends a wait.
    let mut c = Session::client(hello(), Config::default(), t0);
    c.handle_message(
        Message::Notice(Notice {
            channel: 0,
            text: "preparing".into(),
        }),
        t0,
    );
    assert!(matches!(c.poll_event(), Some(Event::Notice(_))));
    c.handle_timeout(t0 + Duration::from_secs(11));
    assert!(matches!(c.poll_event(), Some(Event::Ended { .. })));
    // A channel notice before Welcome is still a violation.
    let mut c = Session::client(hello(), Config::default(), t0);
    c.handle_message(
        Message::Notice(Notice {
            channel: 2,
            text: "x".into(),
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
