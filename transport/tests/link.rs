//! The Link over a real quinn connection on loopback: handshake, stream and datagram channels
//! (with their control messages), too-large datagrams, device requests, refusals, pinning, and
//! a session ended with a reason.

use bytes::Bytes;
use jmp_protocol::*;
use jmp_transport::link::LinkError;
use jmp_transport::*;
use std::net::SocketAddr;

struct Server {
    addr: SocketAddr,
    fingerprint: Fingerprint,
    _endpoint: quinn::Endpoint,
}

/// An exporter that welcomes token "good", echoes stream channels on device "echo" (answering
/// the open's params reversed), echoes datagram channels on "dg" and answers each control
/// message on them with the same body plus "!", answers requests on "clock" with their body
/// repeated, never answers requests on "slow", and holds the first `MAX_REQUESTS` on "batch"
/// until it has them all (then answers every one at once); rejects everything else.
async fn server() -> Server {
    let id = Identity::generate().expect("identity");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let endpoint = server_endpoint(sock, &id, ALPN_EXPORTER).expect("endpoint");
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let conn = incoming.await.expect("handshake");
                let mut link = Link::exporter(conn).await.expect("link");
                let mut slow = Vec::new();
                let mut batch = Vec::new();
                let mut batched = false;
                while let Some(ev) = link.events.recv().await {
                    match ev {
                        LinkEvent::Hello(h) if h.token == "good" => link.handle.welcome(Welcome {
                            exporter: "test".into(),
                            features: features::ALL,
                            instance: 1,
                            devices: vec![DeviceInfo {
                                name: "echo".into(),
                                kind: Kind::from_wire("test"),
                                state: DeviceState::Available,
                                params: Bytes::new(),
                                detail: String::new(),
                            }],
                        }),
                        LinkEvent::Hello(_) => {
                            link.handle.bye(ErrorCode::Unauthorized, "bad token")
                        }
                        LinkEvent::Incoming(inc) if inc.open.device == "echo" => {
                            let mut p = inc.open.params.to_vec();
                            p.reverse();
                            let Some(ChannelIo::Stream(mut pipe)) = inc.accept(Bytes::from(p))
                            else {
                                panic!("a stream")
                            };
                            tokio::spawn(async move {
                                while let Ok(Some(b)) = pipe.rx.recv().await {
                                    if pipe.tx.send(b).await.is_err() {
                                        break;
                                    }
                                }
                                let _ = pipe.tx.finish();
                            });
                        }
                        LinkEvent::Incoming(inc) if inc.open.device == "dg" => {
                            let Some(ChannelIo::Datagram(mut dg)) = inc.accept(Bytes::new()) else {
                                panic!("a datagram channel")
                            };
                            tokio::spawn(async move {
                                loop {
                                    tokio::select! {
                                        m = dg.rx.recv() => match m {
                                            Some(m) => { let _ = dg.tx.send(&m); }
                                            None => break,
                                        },
                                        c = dg.control_rx.recv() => match c {
                                            Some(ChannelMsg::Control(b)) => {
                                                let mut v = b.to_vec();
                                                v.push(b'!');
                                                dg.control_tx.control(Bytes::from(v));
                                            }
                                            Some(_) => {}
                                            None => break,
                                        },
                                    }
                                }
                            });
                        }
                        LinkEvent::Incoming(inc) => {
                            let reason = format!("no device {:?}", inc.open.device);
                            inc.reject(ErrorCode::NoSuchDevice, reason);
                        }
                        LinkEvent::Request(r) if r.device == "clock" => {
                            let mut v = r.body.to_vec();
                            v.extend_from_slice(&r.body);
                            r.answer(Ok(Bytes::from(v)));
                        }
                        LinkEvent::Request(r) if r.device == "slow" => slow.push(r),
                        LinkEvent::Request(r) if r.device == "batch" && !batched => {
                            batch.push(r);
                            if batch.len() == jmp_protocol::session::MAX_REQUESTS {
                                batched = true;
                                for r in batch.drain(..) {
                                    r.answer(Ok(Bytes::from_static(b"ok")));
                                }
                            }
                        }
                        LinkEvent::Request(r) if r.device == "batch" => {
                            r.answer(Ok(Bytes::from_static(b"ok")))
                        }
                        LinkEvent::Request(r) => {
                            let reason = format!("no device {:?}", r.device);
                            r.answer(Err(Refusal::new(ErrorCode::NoSuchDevice, reason)));
                        }
                        LinkEvent::Ended { .. } => break,
                        _ => {}
                    }
                }
            });
        }
    });
    Server {
        addr,
        fingerprint: id.fingerprint(),
        _endpoint: endpoint,
    }
}

fn hello(token: &str) -> Hello {
    Hello {
        features: features::ALL,
        client: "test".into(),
        session: 1,
        token: token.into(),
    }
}

#[tokio::test]
async fn stream_and_datagram_channels_work_and_refusals_have_reasons() {
    let s = server().await;
    let ep = client_endpoint(s.addr).expect("client endpoint");
    let (conn, fp) = connect(&ep, s.addr, ALPN_EXPORTER, Some(s.fingerprint))
        .await
        .expect("connect");
    assert_eq!(fp, s.fingerprint);
    let (link, welcome) = Link::client(conn, hello("good")).await.expect("welcome");
    assert_eq!(welcome.exporter, "test");

    // Several stream channels at once, each echoing its own data.
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let h = link.handle.clone();
        tasks.push(tokio::spawn(async move {
            let (pipe, params) = h
                .open_stream("echo", Bytes::from_static(b"abc"))
                .await
                .expect("open");
            assert_eq!(
                &params[..],
                b"cba",
                "the kind's answer to the open's params"
            );
            let data: Vec<u8> = (0..100_000u32).map(|x| (x as u8) ^ i).collect();
            let (mut tx, mut rx) = pipe.split();
            let sent = data.clone();
            let w = tokio::spawn(async move {
                for c in sent.chunks(7000) {
                    tx.send(Bytes::copy_from_slice(c)).await.expect("send");
                }
                tx.finish().expect("finish");
            });
            let mut got = Vec::new();
            while let Some(b) = rx.recv().await.expect("recv") {
                got.extend_from_slice(&b);
            }
            w.await.expect("writer");
            assert_eq!(got, data, "channel {i} echoes byte-exact and then ends");
        }));
    }
    for t in tasks {
        t.await.expect("channel task");
    }

    let err = link
        .handle
        .open_stream("nope", Bytes::new())
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code, ErrorCode::NoSuchDevice);
    assert!(err.reason.contains("nope"), "{err}");

    let (mut dg, _) = link
        .handle
        .open_datagram("dg", Bytes::new())
        .await
        .expect("datagram channel");
    assert!(dg.max_size() >= 1100, "max datagram {}", dg.max_size());
    let mut got = None;
    for _ in 0..50 {
        dg.send(b"frame").expect("send datagram");
        if let Ok(Some(m)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), dg.recv()).await
        {
            got = Some(m);
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"frame"[..]));
    // A datagram channel keeps its control messages, both ways, reliably.
    assert!(dg.control_tx.control(Bytes::from_static(b"bitrate?")));
    assert_eq!(
        dg.control_rx.recv().await,
        Some(ChannelMsg::Control(Bytes::from_static(b"bitrate?!")))
    );
    // Too large for one datagram: its own error, nothing sent, the link fine.
    let big = vec![0u8; dg.max_size() + 1];
    match dg.send(&big) {
        Err(PipeError::TooLarge { size, max }) => {
            assert_eq!(size, big.len());
            assert_eq!(max, big.len() - 1);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    dg.send(b"after").expect("the channel still works");

    // Requests: answered, refused with the reason, or timed out on the client's deadline.
    let r = link
        .handle
        .request(
            "clock",
            Bytes::from_static(b"ab"),
            std::time::Duration::from_secs(5),
        )
        .await
        .expect("answered");
    assert_eq!(&r[..], b"abab");
    let e = link
        .handle
        .request("nope", Bytes::new(), std::time::Duration::from_secs(5))
        .await
        .expect_err("refused");
    assert_eq!(e.code, ErrorCode::NoSuchDevice);
    let e = link
        .handle
        .request("slow", Bytes::new(), std::time::Duration::from_millis(200))
        .await
        .expect_err("no answer");
    assert_eq!(e.code, ErrorCode::Timeout);

    // Ending the session carries the reason to the peer and closes the connection.
    link.handle.bye(ErrorCode::Ok, "done");
}

/// A pump in the serial bridge's style: one task writes with `write_some` beside reading the
/// echo in one `select!`, so writes are dropped half-way whenever the echo comes first. Every
/// byte must arrive exactly once and in order, on a stream given a priority, beside a bulk one.
#[tokio::test]
async fn write_some_in_a_select_loop_delivers_every_byte_once() {
    let s = server().await;
    let ep = client_endpoint(s.addr).expect("client endpoint");
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, Some(s.fingerprint))
        .await
        .expect("connect");
    let (link, _) = Link::client(conn, hello("good")).await.expect("welcome");
    let (bulk, _) = link
        .handle
        .open_stream("echo", Bytes::new())
        .await
        .expect("open bulk");
    let (pipe, _) = link
        .handle
        .open_stream("echo", Bytes::new())
        .await
        .expect("open");
    let (mut bulk_tx, mut bulk_rx) = bulk.split();
    bulk_tx.set_priority(PRIORITY_BULK);
    let bulk_data = Bytes::from(vec![0x5a; 4 << 20]);
    let bulk_len = bulk_data.len();
    let bulk_task = tokio::spawn(async move {
        bulk_tx.send(bulk_data).await.expect("bulk send");
        bulk_tx.finish().expect("finish");
        let mut n = 0;
        while let Some(b) = bulk_rx.recv().await.expect("bulk recv") {
            assert!(b.iter().all(|&x| x == 0x5a));
            n += b.len();
        }
        n
    });
    let (mut tx, mut rx) = pipe.split();
    tx.set_priority(PRIORITY_INTERACTIVE);
    let data: Vec<u8> = (0..300_000u32).map(|x| (x % 251) as u8).collect();
    let mut chunks = data.chunks(3000).map(Bytes::copy_from_slice);
    let mut pending = Bytes::new();
    let mut got = Vec::new();
    let mut finished = false;
    while got.len() < data.len() {
        if pending.is_empty() {
            match chunks.next() {
                Some(c) => pending = c,
                None if !finished => {
                    tx.finish().expect("finish");
                    finished = true;
                }
                None => {}
            }
        }
        tokio::select! {
            w = tx.write_some(&mut pending), if !pending.is_empty() => w.expect("write_some"),
            r = rx.recv() => got.extend_from_slice(&r.expect("recv").expect("echo ended early")),
        }
    }
    assert_eq!(got, data, "every byte once, in order");
    assert_eq!(bulk_task.await.expect("bulk task"), bulk_len);
}

#[tokio::test]
async fn requests_beyond_the_exporter_s_budget_wait_instead_of_failing() {
    let s = server().await;
    let ep = client_endpoint(s.addr).expect("client endpoint");
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, Some(s.fingerprint))
        .await
        .expect("connect");
    let (link, _) = Link::client(conn, hello("good")).await.expect("welcome");
    // One more than the exporter takes at once, all sent together: the last waits in the
    // client's flow control until the exporter has answered the others, then is answered too.
    let n = jmp_protocol::session::MAX_REQUESTS + 1;
    let mut calls = Vec::new();
    for _ in 0..n {
        let h = link.handle.clone();
        calls.push(tokio::spawn(async move {
            h.request("batch", Bytes::new(), std::time::Duration::from_secs(20))
                .await
        }));
    }
    for c in calls {
        let r = c.await.expect("task");
        assert_eq!(r.as_deref().ok(), Some(&b"ok"[..]), "{r:?}");
    }
    link.handle.bye(ErrorCode::Ok, "done");
}

#[tokio::test]
async fn wrong_token_is_refused_with_the_reason() {
    let s = server().await;
    let ep = client_endpoint(s.addr).expect("client endpoint");
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, None)
        .await
        .expect("connect");
    match Link::client(conn, hello("bad")).await {
        Err(LinkError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::Unauthorized);
            assert_eq!(reason, "bad token");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a welcome"),
    }
}

#[tokio::test]
async fn pinned_fingerprint_mismatch_is_refused_before_hello() {
    let s = server().await;
    let other = Identity::generate().expect("identity").fingerprint();
    let ep = client_endpoint(s.addr).expect("client endpoint");
    match connect(&ep, s.addr, ALPN_EXPORTER, Some(other)).await {
        Err(ConnectError::FingerprintMismatch { expected, got, .. }) => {
            assert_eq!(expected, other);
            assert_eq!(got, s.fingerprint);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("connected despite a wrong pin"),
    }
}

#[tokio::test]
async fn garbage_on_the_control_stream_ends_only_that_session() {
    let s = server().await;
    let ep = client_endpoint(s.addr).expect("client endpoint");
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, None)
        .await
        .expect("connect");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let e = conn.closed().await;
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code.into_inner(), ErrorCode::Protocol.to_wire());
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            assert!(reason.contains("unknown message type 0xff"), "{reason}");
        }
        other => panic!("expected a protocol close, got {other}"),
    }
    // The server still serves others.
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, None)
        .await
        .expect("connect again");
    assert!(Link::client(conn, hello("good")).await.is_ok());
}

/// A driver that never reads its channel's control messages cannot make the link buffer
/// without bound: past the channel's queue the session ends, saying why.
#[tokio::test]
async fn control_messages_nobody_reads_end_the_session_with_a_reason() {
    let id = Identity::generate().expect("identity");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let endpoint = server_endpoint(sock, &id, ALPN_EXPORTER).expect("endpoint");
    let ep = endpoint.clone();
    tokio::spawn(async move {
        let Some(incoming) = ep.accept().await else {
            return;
        };
        let conn = incoming.await.expect("handshake");
        let mut link = Link::exporter(conn).await.expect("link");
        let mut keep = Vec::new();
        while let Some(ev) = link.events.recv().await {
            match ev {
                LinkEvent::Hello(_) => link.handle.welcome(Welcome {
                    exporter: "deaf".into(),
                    features: features::ALL,
                    instance: 1,
                    devices: vec![],
                }),
                // Accepted, and its control messages never read.
                LinkEvent::Incoming(inc) => keep.push(inc.accept(Bytes::new())),
                LinkEvent::Ended { .. } => break,
                _ => {}
            }
        }
    });
    let ep = client_endpoint(addr).expect("client endpoint");
    let (conn, _) = connect(&ep, addr, ALPN_EXPORTER, Some(id.fingerprint()))
        .await
        .expect("connect");
    let (mut link, _) = Link::client(conn, hello("any")).await.expect("welcome");
    let (dg, _) = link
        .handle
        .open_datagram("deaf", Bytes::new())
        .await
        .expect("open");
    for _ in 0..(jmp_transport::pipe::CONTROL_DEPTH * 2) {
        dg.control_tx.control(Bytes::from_static(b"x"));
    }
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match link.events.recv().await {
                Some(LinkEvent::Ended { code, reason, .. }) => return (code, reason),
                Some(_) => {}
                None => return (ErrorCode::Internal, "no event".to_string()),
            }
        }
    })
    .await
    .expect("the session ends");
    assert_eq!(ended.0, ErrorCode::Internal);
    assert!(ended.1.contains("not keeping up"), "{}", ended.1);
    drop(endpoint);
}

/// A peer that refuses its first `refusals` connections outright (as the pre-authentication
/// gate does past a source's rate), then accepts.
async fn refusing_server(refusals: usize) -> (SocketAddr, quinn::Endpoint) {
    let id = Identity::generate().expect("identity");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    let endpoint = server_endpoint(sock, &id, ALPN_EXPORTER).expect("endpoint");
    let ep = endpoint.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        while let Some(incoming) = ep.accept().await {
            seen += 1;
            if seen <= refusals {
                incoming.refuse();
            } else if let Ok(conn) = incoming.await {
                // Held open until the client is done.
                tokio::spawn(async move { conn.closed().await });
            }
        }
    });
    (addr, endpoint)
}

#[tokio::test]
async fn a_refused_connection_is_retried_with_backoff_and_a_lasting_refusal_is_the_answer() {
    // Refused twice (a rate limit's burst used up): the third attempt gets through.
    let (addr, _server) = refusing_server(2).await;
    let ep = client_endpoint(addr).expect("client endpoint");
    let (conn, _) = connect(&ep, addr, ALPN_EXPORTER, None)
        .await
        .expect("connected after two refusals");
    conn.close(0u32.into(), b"");
    // Refused every time: after the backoff, the refusal is reported as such.
    let (addr, _server) = refusing_server(usize::MAX).await;
    let ep = client_endpoint(addr).expect("client endpoint");
    let err = connect(&ep, addr, ALPN_EXPORTER, None)
        .await
        .expect_err("refused for good");
    assert!(
        matches!(&err, ConnectError::Connection { source, .. }
            if matches!(source, quinn::ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)),
        "{err}"
    );
}
