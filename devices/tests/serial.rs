//! Serial consoles without a network: the driver over in-memory pipes (the simulated board,
//! history replay and resume, a real tty with settings and requests applied to it, a missing
//! port), then the bridge and the driver on both ends of an in-memory session (a pty a local
//! program opens, as it would through QUIC).

use bytes::Bytes;
use jmp_devices::board::Board;
use jmp_devices::serial::driver::{SerialDriver, Source};
use jmp_devices::serial::spec::LinePolicy;
use jmp_devices::serve::DeviceSet;
use jmp_devices::testing::{bridge_ctx, mem_session};
use jmp_devices::{Bridge, DeviceStatus, Driver};
use jmp_e2e::pipe::read_until_text;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::serial::{
    Control, DeviceParams, FlowControl, LineChange, LineSettings, OpenParams, OpenedParams, Parity,
    Request, Response,
};
use jmp_protocol::{ChannelMode, DeviceState, ErrorCode, Kind, Open};
use jmp_transport::pipe::pair;
use jmp_transport::{ChannelIo, ChannelMsg};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// Hang guard only.
const GUARD: Duration = Duration::from_secs(20);

fn open(resume_from: Option<u64>) -> Open {
    Open {
        channel: 1,
        device: "console".into(),
        mode: ChannelMode::Stream,
        params: to_bytes(&OpenParams {
            resume_from,
            pacing: None,
            timed: false,
        }),
    }
}

fn sim(hostname: &str, history: usize) -> SerialDriver {
    SerialDriver::start(
        "console".into(),
        Source::Sim {
            hostname: hostname.into(),
            board: Board::new(),
            slow: None,
        },
        history,
    )
}

fn offset(ch: &dyn jmp_devices::Channel) -> u64 {
    OpenedParams::decode_exact(&ch.params())
        .expect("serial opened params")
        .offset
}

/// Waits (on the driver's status events) until `pred` holds.
async fn status_until(
    d: &dyn Driver,
    what: &str,
    pred: impl Fn(&DeviceStatus) -> bool,
) -> DeviceStatus {
    let mut rx = d.status();
    let got = tokio::time::timeout(GUARD, rx.wait_for(|s| pred(s)))
        .await
        .unwrap_or_else(|_| panic!("no status {what}: {:?}", d.status().borrow()))
        .expect("driver alive")
        .clone();
    got
}

#[tokio::test]
async fn sim_console_replays_history_and_answers() {
    let d = sim("simhost", 64 * 1024);
    let ch = d.open(&open(None)).await.expect("open");
    assert_eq!(
        offset(ch.as_ref()),
        0,
        "first attach replays from the start"
    );
    let (client, exporter) = pair(16);
    tokio::spawn(ch.serve(ChannelIo::Stream(exporter)));
    let (mut tx, mut rx) = client.split();
    let mut acc = Vec::new();
    read_until_text(&mut rx, &mut acc, "simhost login: ").await;
    tx.send(Bytes::from_static(b"root\r")).await.expect("send");
    read_until_text(&mut rx, &mut acc, "Password: ").await;
    tx.send(Bytes::from_static(b"pw\r")).await.expect("send");
    read_until_text(&mut rx, &mut acc, "root@simhost:~# ").await;
    tx.send(Bytes::from_static(b"echo jmp-test\r"))
        .await
        .expect("send");
    read_until_text(&mut rx, &mut acc, "jmp-test\r\nroot@simhost").await;
    let seen = acc.len() as u64;

    // A second channel resuming at what the first saw gets only what came after.
    tx.send(Bytes::from_static(b"echo after\r"))
        .await
        .expect("send");
    read_until_text(&mut rx, &mut acc, "after\r\nroot@simhost").await;
    let ch2 = d.open(&open(Some(seen))).await.expect("open");
    assert_eq!(offset(ch2.as_ref()), seen);
    let (client2, exporter2) = pair(16);
    tokio::spawn(ch2.serve(ChannelIo::Stream(exporter2)));
    let (_tx2, mut rx2) = client2.split();
    let mut acc2 = Vec::new();
    read_until_text(&mut rx2, &mut acc2, "after\r\nroot@simhost").await;
    assert!(
        acc2.starts_with(b"echo after"),
        "resumed exactly: {:?}",
        String::from_utf8_lossy(&acc2)
    );
}

#[tokio::test]
async fn small_history_reports_the_gap() {
    let d = sim("h", 64);
    // The boot log is much longer than 64 bytes: wait for it on the history's end offset.
    let mut end = d.history().subscribe();
    tokio::time::timeout(GUARD, end.wait_for(|e| *e > 64))
        .await
        .expect("boot log")
        .expect("history alive");
    let end = d.history().end();
    let ch = d.open(&open(Some(1))).await.expect("open");
    assert_eq!(
        offset(ch.as_ref()),
        end - 64,
        "resume clamps to the oldest byte still kept"
    );
}

#[tokio::test]
async fn bad_open_parameters_and_requests_are_refused_with_the_field() {
    let d = sim("h", 4096);
    let mut o = open(None);
    o.params = Bytes::from_static(&[7]);
    let r = d.open(&o).await.err().expect("refused");
    assert_eq!(r.code, ErrorCode::Protocol);
    assert!(r.reason.contains("resume"), "{}", r.reason);
    let r = d
        .request(Bytes::from_static(&[0x09]))
        .await
        .expect_err("unknown request");
    assert!(r.reason.contains("serial request"), "{}", r.reason);
    // A break longer than the exporter allows is refused before the port is touched.
    let r = d
        .request(to_bytes(&Request::Break { millis: 60_000 }))
        .await
        .expect_err("too long");
    assert_eq!(r.code, ErrorCode::Unsupported);
    assert!(r.reason.contains("60000 ms"), "{}", r.reason);
}

/// A pty pair: the slave is "the board's UART" that jmpd opens; the master is the board.
fn board_pty() -> (std::os::fd::OwnedFd, String) {
    let p = nix::pty::openpty(None, None).expect("openpty");
    let name = nix::unistd::ttyname(&p.slave).expect("ttyname");
    // SAFETY: termios calls on a descriptor we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(p.slave.as_raw_fd(), &mut t);
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(p.slave.as_raw_fd(), libc::TCSANOW, &t);
    }
    // The slave fd is closed here; jmpd opens the path itself.
    (p.master, name.to_string_lossy().into_owned())
}

fn speed_of(master: &std::os::fd::OwnedFd) -> u32 {
    // SAFETY: TCGETS2 fills a termios2.
    unsafe {
        let mut t: libc::termios2 = std::mem::zeroed();
        assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TCGETS2, &mut t), 0);
        t.c_ospeed
    }
}

fn settings_of(st: &DeviceStatus) -> LineSettings {
    DeviceParams::decode_exact(&st.params)
        .expect("serial params")
        .settings
}

const S115200: LineSettings = LineSettings {
    baud: 115_200,
    data_bits: 8,
    parity: Parity::None,
    stop_bits: 1,
    flow: FlowControl::None,
};

fn tty(path: &str, policy: LinePolicy) -> SerialDriver {
    SerialDriver::start(
        "console".into(),
        Source::Tty {
            path: path.into(),
            settings: S115200,
            policy,
        },
        4096,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tty_bytes_settings_and_requests() {
    let (master, path) = board_pty();
    let d = tty(&path, LinePolicy::Follow);
    status_until(&d, "available", |s| s.state == DeviceState::Available).await;
    let ch = d.open(&open(None)).await.expect("the port is open");
    let (client, exporter) = pair(16);
    tokio::spawn(ch.serve(ChannelIo::Stream(exporter)));
    let jmp_transport::Pipe {
        mut tx,
        mut rx,
        control_tx,
        ..
    } = client;

    // Board prints: every byte value arrives unchanged.
    let all: Vec<u8> = (0..=255u8).collect();
    nix::unistd::write(&master, &all).expect("board writes");
    let mut got = Vec::new();
    while got.len() < 256 {
        let b = tokio::time::timeout(GUARD, rx.recv())
            .await
            .expect("no hang")
            .expect("recv")
            .expect("data");
        got.extend_from_slice(&b);
    }
    assert_eq!(got, all);

    // Client types: the board reads it.
    tx.send(Bytes::from_static(b"hi\x00\x03\x11\x13"))
        .await
        .expect("send");
    // The board's blocking reads stay off the runtime's threads.
    let board = master.try_clone().expect("dup");
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 64];
        let mut read = Vec::new();
        while read.len() < 6 {
            let n = nix::unistd::read(board.as_raw_fd(), &mut buf).expect("board reads");
            read.extend_from_slice(&buf[..n]);
        }
        read
    });
    let read = tokio::time::timeout(GUARD, read)
        .await
        .expect("no hang")
        .expect("reader");
    assert_eq!(read, b"hi\x00\x03\x11\x13");

    // A local program's settings (what a pty carries) reach the real port; the device's
    // status reports the port's new settings, data bits and parity kept.
    assert_eq!(speed_of(&master), 115_200);
    control_tx.control(to_bytes(&Control::Follow(LineChange {
        baud: Some(250_000),
        stop_bits: Some(2),
        ..LineChange::default()
    })));
    let st = status_until(&d, "250000", |s| settings_of(s).baud == 250_000).await;
    assert_eq!(settings_of(&st).stop_bits, 2);
    assert_eq!(
        speed_of(&master),
        250_000,
        "non-standard speed applied to the port"
    );

    // A request merges with the port's settings and answers with the result.
    let resp = d
        .request(to_bytes(&Request::Set(LineChange {
            parity: Some(Parity::Even),
            data_bits: Some(7),
            ..LineChange::default()
        })))
        .await
        .expect("applied");
    let s = Response::decode_exact(&resp).expect("response").settings;
    assert_eq!(
        (s.baud, s.data_bits, s.parity, s.stop_bits),
        (250_000, 7, Parity::Even, 2)
    );
    // What the port cannot do is a failure naming it (a pty has no modem lines).
    let e = d
        .request(to_bytes(&Request::Modem {
            dtr: Some(true),
            rts: None,
        }))
        .await
        .expect_err("a pty has no DTR");
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.reason.contains("DTR"), "{}", e.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_line_settings_refuse_changes_with_a_notice() {
    let (master, path) = board_pty();
    let d = tty(&path, LinePolicy::Fixed);
    status_until(&d, "available", |s| s.state == DeviceState::Available).await;
    let ch = d.open(&open(None)).await.expect("open");
    let (mut client, exporter) = pair(16);
    tokio::spawn(ch.serve(ChannelIo::Stream(exporter)));
    client
        .control_tx
        .control(to_bytes(&Control::Follow(LineChange {
            baud: Some(9600),
            ..LineChange::default()
        })));
    match tokio::time::timeout(GUARD, client.control_rx.recv()).await {
        Ok(Some(ChannelMsg::Notice(text))) => {
            assert!(text.contains("lineSettings: fixed"), "{text}")
        }
        other => panic!("expected a notice, got {other:?}"),
    }
    assert_eq!(
        speed_of(&master),
        115_200,
        "the port keeps its configured speed"
    );
}

#[tokio::test]
async fn missing_port_is_refused_with_the_reason_and_retried() {
    let d = tty("/dev/ttyNOPE9", LinePolicy::Follow);
    let st = status_until(
        &d,
        "unavailable naming the port",
        |s| matches!(&s.state, DeviceState::Unavailable(w) if w.contains("cannot open")),
    )
    .await;
    assert!(matches!(&st.state, DeviceState::Unavailable(w) if w.contains("/dev/ttyNOPE9")));
    let r = d.open(&open(None)).await.err().expect("refused");
    assert_eq!(r.code, ErrorCode::DeviceUnavailable);
    assert!(r.reason.contains("/dev/ttyNOPE9"), "{}", r.reason);
    let info = jmp_devices::info(&d);
    assert_eq!(info.kind, Kind::Serial);
    assert!(matches!(info.state, DeviceState::Unavailable(_)));
}

/// The bridge and the driver over an in-memory session: the pty appears under the device
/// directory, a program opening it gets the boot log (held until it opened), and its typing
/// reaches the board.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_over_an_in_memory_session() {
    let driver: Arc<dyn Driver> = Arc::new(sim("memhost", 64 * 1024));
    let info = jmp_devices::info(driver.as_ref());
    let devices = DeviceSet::new("board1", vec![driver]);
    let (link, _server) = mem_session(devices);
    let ctx = bridge_ctx("board1", "serial-bridge");
    let dir = ctx.dev_dir.clone();
    let mut bridge = jmp_devices::serial::SerialBridge::create(&info, &ctx).expect("pty");
    let path = dir.join("board1").join("console");
    assert_eq!(bridge.path(), path);
    assert_eq!(bridge.endpoints().len(), 1);
    bridge.on_welcome(&info, 1);
    let run = tokio::spawn(async move {
        let exit = bridge.run(link).await;
        (bridge, exit)
    });
    // A local program, as pyserial would: open, raw mode, read.
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the local device");
    // SAFETY: termios on a descriptor we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(console.as_raw_fd(), &mut t);
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(console.as_raw_fd(), libc::TCSANOW, &t);
    }
    let transcript = tokio::task::spawn_blocking(move || {
        let mut c = console;
        let mut acc = Vec::new();
        let mut buf = [0u8; 4096];
        let mut wait_for = |c: &mut std::fs::File, acc: &mut Vec<u8>, s: &str| {
            while !String::from_utf8_lossy(acc).contains(s) {
                let n = c.read(&mut buf).expect("read the pty");
                acc.extend_from_slice(&buf[..n]);
            }
        };
        wait_for(&mut c, &mut acc, "memhost login: ");
        c.write_all(b"root\r").expect("type");
        wait_for(&mut c, &mut acc, "Password: ");
        String::from_utf8_lossy(&acc).into_owned()
    });
    let t = tokio::time::timeout(GUARD, transcript)
        .await
        .expect("no hang")
        .expect("reader");
    assert!(t.contains("U-Boot"), "the boot log was replayed: {t}");
    run.abort();
    let _ = run.await;
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "the link is removed with the bridge"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 21 item 2: a colleague watching a lease shared read-only. Its channel reads the same
/// console as the holder's (two terminals on one pty); what it types never reaches the board
/// and it is told so; the holder's typing does.
#[tokio::test]
async fn a_watcher_reads_the_console_and_its_typing_is_refused_with_a_notice() {
    let d = sim("simhost", 64 * 1024);
    let why = "lease L1 is shared with bob read-only";
    let holder = d.open(&open(None)).await.expect("open");
    let watcher = d.watch(&open(None), why).await.expect("watch");
    let (h_client, h_exporter) = pair(16);
    let (w_client, w_exporter) = pair(16);
    tokio::spawn(holder.serve(ChannelIo::Stream(h_exporter)));
    tokio::spawn(watcher.serve(ChannelIo::Stream(w_exporter)));
    let jmp_transport::Pipe {
        tx: mut w_tx,
        rx: mut w_rx,
        mut control_rx,
        ..
    } = w_client;
    let (mut h_tx, mut h_rx) = h_client.split();
    let (mut h_acc, mut w_acc) = (Vec::new(), Vec::new());
    read_until_text(&mut w_rx, &mut w_acc, "simhost login: ").await;
    // The watcher types a login: refused, with the reason.
    w_tx.send(Bytes::from_static(b"watcher-typed\r"))
        .await
        .expect("send");
    let notice = tokio::time::timeout(GUARD, async {
        loop {
            match control_rx.recv().await {
                Some(ChannelMsg::Notice(t)) => break t,
                Some(_) => continue,
                None => panic!("the channel ended without a notice"),
            }
        }
    })
    .await
    .expect("a notice");
    assert!(
        notice.contains("typing refused") && notice.contains(why),
        "{notice}"
    );
    // The holder logs in and types; the watcher sees it all.
    read_until_text(&mut h_rx, &mut h_acc, "simhost login: ").await;
    h_tx.send(Bytes::from_static(b"root\r"))
        .await
        .expect("send");
    read_until_text(&mut h_rx, &mut h_acc, "Password: ").await;
    h_tx.send(Bytes::from_static(b"pw\r")).await.expect("send");
    read_until_text(&mut h_rx, &mut h_acc, "root@simhost:~# ").await;
    h_tx.send(Bytes::from_static(b"echo holder-typed\r"))
        .await
        .expect("send");
    read_until_text(&mut h_rx, &mut h_acc, "holder-typed\r\nroot@simhost").await;
    read_until_text(&mut w_rx, &mut w_acc, "holder-typed\r\nroot@simhost").await;
    // The simulated board echoes what reaches it: the watcher's line never did, and the
    // holder's login was not disturbed by it.
    for (who, acc) in [("holder", &h_acc), ("watcher", &w_acc)] {
        let text = String::from_utf8_lossy(acc);
        assert!(!text.contains("watcher-typed"), "{who} saw: {text:?}");
        assert!(!text.contains("Login incorrect"), "{who} saw: {text:?}");
    }
}
