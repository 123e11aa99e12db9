//! Serial driver tests over in-memory pipes: the simulated board, history replay and resume,
//! and a real tty (a pty pair standing in for the board's UART) with settings applied to it.

use bytes::Bytes;
use jmp_devices::serial::driver::{SerialDriver, Source};
use jmp_devices::Driver;
use jmp_protocol::{ChannelMode, ControlBody, ErrorCode, FlowControl, LineSettings, Open, Parity};
use jmp_transport::pipe::pair;
use std::os::fd::AsRawFd;
use std::time::Duration;

fn open(resume_from: Option<u64>) -> Open {
    Open {
        channel: 1,
        device: "console".into(),
        mode: ChannelMode::Stream,
        resume_from,
    }
}

/// Reads from the client end until `needle` shows up (or panics after a generous guard).
async fn read_until(rx: &mut jmp_transport::PipeRx, acc: &mut Vec<u8>, needle: &str) {
    let guard = tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(acc).contains(needle) {
            match rx.recv().await {
                Ok(Some(b)) => acc.extend_from_slice(&b),
                other => panic!(
                    "channel ended before {needle:?}: {other:?}; got {:?}",
                    String::from_utf8_lossy(acc)
                ),
            }
        }
    });
    guard
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", String::from_utf8_lossy(acc)));
}

#[tokio::test]
async fn sim_console_replays_history_and_answers() {
    let d = SerialDriver::start(
        "console".into(),
        Source::Sim {
            hostname: "simhost".into(),
        },
        64 * 1024,
    );
    let ch = d.open(&open(None)).await.expect("open");
    assert_eq!(ch.offset(), 0, "first attach replays from the start");
    let (client, exporter) = pair(16);
    tokio::spawn(ch.serve(exporter));
    let (mut tx, mut rx) = client.split();
    let mut acc = Vec::new();
    read_until(&mut rx, &mut acc, "simhost login: ").await;
    tx.send(Bytes::from_static(b"root\r")).await.expect("send");
    read_until(&mut rx, &mut acc, "Password: ").await;
    tx.send(Bytes::from_static(b"pw\r")).await.expect("send");
    read_until(&mut rx, &mut acc, "root@simhost:~# ").await;
    tx.send(Bytes::from_static(b"echo jmp-test\r"))
        .await
        .expect("send");
    read_until(&mut rx, &mut acc, "jmp-test\r\nroot@simhost").await;
    let seen = acc.len() as u64;

    // A second channel resuming at what the first saw gets only what came after.
    tx.send(Bytes::from_static(b"echo after\r"))
        .await
        .expect("send");
    read_until(&mut rx, &mut acc, "after\r\nroot@simhost").await;
    let ch2 = d.open(&open(Some(seen))).await.expect("open");
    assert_eq!(ch2.offset(), seen);
    let (client2, exporter2) = pair(16);
    tokio::spawn(ch2.serve(exporter2));
    let (_tx2, mut rx2) = client2.split();
    let mut acc2 = Vec::new();
    read_until(&mut rx2, &mut acc2, "after\r\nroot@simhost").await;
    assert!(
        acc2.starts_with(b"echo after"),
        "resumed exactly: {:?}",
        String::from_utf8_lossy(&acc2)
    );
}

#[tokio::test]
async fn small_history_reports_the_gap() {
    let d = SerialDriver::start(
        "console".into(),
        Source::Sim {
            hostname: "h".into(),
        },
        64,
    );
    // Wait for the boot log, much longer than 64 bytes.
    for _ in 0..200 {
        if d.history().end() > 64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = d.history().end();
    assert!(end > 64);
    let ch = d.open(&open(Some(1))).await.expect("open");
    assert_eq!(
        ch.offset(),
        end - 64,
        "resume clamps to the oldest byte still kept"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tty_bytes_and_settings() {
    let (master, path) = board_pty();
    let settings = LineSettings {
        baud: 115_200,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 1,
        flow: FlowControl::None,
    };
    let d = SerialDriver::start(
        "console".into(),
        Source::Tty {
            path: path.clone(),
            settings,
        },
        4096,
    );
    let mut opened = None;
    for _ in 0..100 {
        match d.open(&open(None)).await {
            Ok(ch) => {
                opened = Some(ch);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let ch = opened.expect("the port opens");
    let (client, exporter) = pair(16);
    tokio::spawn(ch.serve(exporter));
    let jmp_transport::Pipe {
        mut tx,
        mut rx,
        mut control_rx,
        control_tx,
        ..
    } = client;

    // Board prints: every byte value arrives unchanged.
    let all: Vec<u8> = (0..=255u8).collect();
    nix::unistd::write(&master, &all).expect("board writes");
    let mut got = Vec::new();
    while got.len() < 256 {
        let b = tokio::time::timeout(Duration::from_secs(10), rx.recv())
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
    let read = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("no hang")
        .expect("reader");
    assert_eq!(read, b"hi\x00\x03\x11\x13");

    // Settings from the client reach the real port.
    assert_eq!(speed_of(&master), 115_200);
    control_tx.send(ControlBody::LineSettings(LineSettings {
        baud: 250_000,
        ..settings
    }));
    let mut speed = 0;
    for _ in 0..200 {
        speed = speed_of(&master);
        if speed == 250_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(speed, 250_000, "non-standard speed applied to the port");

    // What a pty cannot do comes back as a notice naming it.
    control_tx.send(ControlBody::ModemLines {
        dtr: Some(true),
        rts: None,
    });
    let notice = tokio::time::timeout(Duration::from_secs(10), control_rx.recv())
        .await
        .expect("notice");
    match notice {
        Some(ControlBody::Notice(text)) => assert!(text.contains("DTR"), "{text}"),
        other => panic!("expected a notice, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_port_is_refused_with_the_reason_and_retried() {
    let d = SerialDriver::start(
        "console".into(),
        Source::Tty {
            path: "/dev/ttyNOPE9".into(),
            settings: LineSettings::default(),
        },
        4096,
    );
    let mut refusal = None;
    for _ in 0..100 {
        match d.open(&open(None)).await {
            Err(r) => {
                refusal = Some(r);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // The first open may race the port task's first attempt; the second must be refused.
    let r = match refusal {
        Some(r) => r,
        None => panic!("a missing port must be refused"),
    };
    assert_eq!(r.code, ErrorCode::DeviceUnavailable);
    assert!(r.reason.contains("/dev/ttyNOPE9"), "{}", r.reason);
    assert!(
        d.info().detail.contains("unavailable"),
        "{}",
        d.info().detail
    );
}
