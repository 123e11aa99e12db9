//! CAN buses without a network: the bridge and the driver on both ends of an in-memory session,
//! reached through the bridge's socketcand port and slcan pty as local programs would (the
//! simulated ECU mirrors, counts and answers ISO-TP; an emulated slcan adapter on a pty is the
//! exporter's backend), and bad input refused naming what was wrong.

use jmp_devices::board::Board;
use jmp_devices::can::backend::SimConfig;
use jmp_devices::can::driver::{CanDriver, Source};
use jmp_devices::can::ops::{DeviceOptions, Fronts};
use jmp_devices::serve::DeviceSet;
use jmp_devices::testing::bridge_ctx;
use jmp_devices::testing::mem_session;
use jmp_devices::{info, Bridge, BridgeCtx, Driver, Local};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::can::DeviceParams;
use jmp_protocol::DeviceState;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

const GUARD: Duration = Duration::from_secs(30);

fn sim(board: &Board) -> Arc<dyn Driver> {
    Arc::new(CanDriver::start(
        "ecu",
        Source::Sim(SimConfig {
            bitrate: 500_000,
            period: Some(Duration::from_millis(20)),
            counter_id: 0x100,
            request_id: 0x7e0,
            response_id: 0x7e8,
            load: 0,
            board: board.clone(),
        }),
    ))
}

fn ctx(tag: &str) -> BridgeCtx {
    bridge_ctx("exp", &format!("can-{tag}"))
}

fn both() -> DeviceOptions {
    DeviceOptions {
        fronts: Some(Fronts {
            vcan: false,
            slcan: true,
            socketcand: true,
        }),
        ..DeviceOptions::default()
    }
}

/// A blocking socketcand client (as python-can would be), reading whole `< … >` messages.
struct Scd {
    r: BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl Scd {
    fn connect(addr: std::net::SocketAddr, bus: &str) -> Scd {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(GUARD)).expect("timeout");
        let w = s.try_clone().expect("clone");
        let mut c = Scd {
            r: BufReader::new(s),
            w,
        };
        assert_eq!(c.msg(), "< hi >");
        c.send(&format!("< open {bus} >"));
        assert_eq!(c.msg(), "< ok >");
        c.send("< rawmode >");
        assert_eq!(c.msg(), "< ok >");
        c
    }
    fn send(&mut self, m: &str) {
        self.w.write_all(m.as_bytes()).expect("write");
    }
    fn msg(&mut self) -> String {
        let mut v = Vec::new();
        self.r.read_until(b'>', &mut v).expect("read");
        String::from_utf8_lossy(&v).trim().to_string()
    }
    /// The next message that is not the ECU's counter frame.
    fn next_non_counter(&mut self) -> String {
        loop {
            let m = self.msg();
            if !m.starts_with("< frame 100 ") {
                return m;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_ecu_through_socketcand_and_slcan_over_memory() {
    let board = Board::new();
    let d = sim(&board);
    let devices = DeviceSet::new("exp", vec![d.clone()]);
    let infos = devices.infos();
    let (link, server) = mem_session(devices);
    let c = ctx("sim");
    let mut bridge = jmp_devices::can::CanBridge::create(&infos[0], &c, both())
        .await
        .expect("fronts");
    let eps = bridge.endpoints();
    let addr = eps
        .iter()
        .find_map(|e| match (&e.role, &e.local) {
            (Some(r), Local::Address(a)) if r == "socketcand" => Some(*a),
            _ => None,
        })
        .expect("socketcand endpoint");
    let pty = eps
        .iter()
        .find_map(|e| match &e.local {
            Local::Path(p) => Some(p.clone()),
            _ => None,
        })
        .expect("slcan endpoint");
    assert_eq!(pty, c.dev_dir.join("exp").join("ecu"));
    bridge.on_welcome(&infos[0], 1);
    let run = tokio::spawn(async move {
        let _ = bridge.run(link).await;
        bridge
    });

    let r = tokio::task::spawn_blocking(move || {
        let mut s = Scd::connect(addr, "ecu");
        // The counter frame arrives with the exporter's receive time.
        let m = s.msg();
        assert!(
            m.starts_with("< frame 100 ") && m.ends_with("4A4D5000 >"),
            "{m}"
        );
        // Mirrored: classic, extended, remote, FD.
        s.send("< send 123 3 1 2 3 >");
        assert!(s.next_non_counter().ends_with(" 010203 >"));
        s.send("< send 1ABCDEF0 0 >");
        let m = s.next_non_counter();
        assert!(m.starts_with("< frame 1ABCDEF0 "), "{m}");
        s.send("< sendrtr 7DF 8 >");
        let m = s.next_non_counter();
        assert!(m.starts_with("< rtr 7DF ") && m.ends_with(" 8 >"), "{m}");
        s.send(&format!("< fdsend 123 1 {} >", "AB".repeat(64)));
        let m = s.next_non_counter();
        assert!(
            m.starts_with("< fdframe 123 ") && m.contains(&"AB".repeat(64)),
            "{m}"
        );
        // ISO-TP single frame: 10 03 → 50 03.
        s.send("< send 7E0 8 2 10 3 CC CC CC CC CC >");
        let m = s.next_non_counter();
        assert!(
            m.starts_with("< frame 7E8 ") && m.ends_with(" 025003CCCCCCCCCC >"),
            "{m}"
        );
        // Bad input: named, and the connection keeps working.
        s.send("< send 123 9 1 2 3 4 5 6 7 8 9 >");
        let m = s.next_non_counter();
        assert!(m.contains("at most 8"), "{m}");
        s.send("< frobnicate >");
        assert!(s.next_non_counter().contains("unknown command"));

        // slcan: open, wrong bit rate refused, the right one accepted, frames both ways.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pty)
            .expect("open slcan pty");
        let mut g = f.try_clone().expect("clone");
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = g.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let until = |needle: &[u8], got: &mut Vec<u8>| {
            let t0 = std::time::Instant::now();
            while !got.windows(needle.len()).any(|w| w == needle) {
                assert!(
                    t0.elapsed() < GUARD,
                    "no {:?} in {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(got)
                );
                if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
                    got.extend_from_slice(&b);
                }
            }
        };
        // The bridge notices the open on its next poll; answers prove it listens.
        std::thread::sleep(Duration::from_millis(100));
        f.write_all(b"C\rS8\r").expect("write");
        until(b"\r\x07", &mut got);
        f.write_all(b"S6\rO\rt1232ABCD\r").expect("write");
        until(b"z\r", &mut got);
        until(b"t1232ABCD\r", &mut got);
        // With timestamps on, frames carry the exporter's receive time (ms within a minute).
        f.write_all(b"Z1\rt1231AA\r").expect("write");
        until(b"t1231AA", &mut got);
        let at = got.windows(7).rposition(|w| w == b"t1231AA").expect("seen") + 7;
        until(b"\r", &mut got);
        let ts = &got[at..at + 5];
        assert!(
            ts[..4].iter().all(|c| c.is_ascii_hexdigit()) && ts[4] == b'\r',
            "a 4-digit timestamp: {:?}",
            String::from_utf8_lossy(&got[at..])
        );
        f.write_all(b"t12\r").expect("write");
        until(b"\x07", &mut got);
        got
    })
    .await
    .expect("client");
    assert!(
        r.windows(2).any(|w| w == b"z\r"),
        "the frame was acknowledged"
    );
    // Cutting the session ends the bridge's run; dropping the bridge removes its fronts.
    server.abort();
    let bridge = tokio::time::timeout(GUARD, run)
        .await
        .expect("run ends")
        .expect("bridge");
    drop(bridge);
    let st = d.status().borrow().clone();
    let p = DeviceParams::decode_exact(&st.params).expect("params");
    assert_eq!(p.bitrate, 500_000);
    let _ = std::fs::remove_dir_all(&c.dev_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_applied_on_the_exporter() {
    let board = Board::new();
    let d = sim(&board);
    let devices = DeviceSet::new("exp", vec![d.clone()]);
    let infos = devices.infos();
    let (link, server) = mem_session(devices);
    let c = ctx("filter");
    let mut opts = both();
    opts.filters = jmp_devices::can::ops::parse_filters("7E8:7FF").expect("filter");
    let mut bridge = jmp_devices::can::CanBridge::create(&infos[0], &c, opts)
        .await
        .expect("fronts");
    let addr = bridge
        .endpoints()
        .iter()
        .find_map(|e| match &e.local {
            Local::Address(a) => Some(*a),
            _ => None,
        })
        .expect("socketcand");
    bridge.on_welcome(&infos[0], 1);
    let run = tokio::spawn(async move {
        let _ = bridge.run(link).await;
        bridge
    });
    let first = tokio::task::spawn_blocking(move || {
        let mut s = Scd::connect(addr, "ecu");
        // Mirrored on 0x123 and the counter on 0x100 every 20 ms: both filtered out on the
        // exporter; the ISO-TP answer on 0x7e8 passes, and is the first thing that arrives.
        s.send("< send 123 1 AA >");
        s.send("< send 7E0 8 2 10 3 CC CC CC CC CC >");
        s.msg()
    })
    .await
    .expect("client");
    assert!(first.starts_with("< frame 7E8 "), "{first}");
    server.abort();
    let _ = tokio::time::timeout(GUARD, run).await.expect("run ends");
    let _ = std::fs::remove_dir_all(&c.dev_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_ecu_is_silent_while_the_board_is_off() {
    let board = Board::new();
    let d = sim(&board);
    board.set_power(false);
    let mut st = d.status();
    tokio::time::timeout(
        GUARD,
        st.wait_for(|s| {
            DeviceParams::decode_exact(&s.params)
                .is_ok_and(|p| p.state == jmp_protocol::kinds::can::BusState::Stopped)
        }),
    )
    .await
    .expect("stopped in time")
    .expect("alive");
    assert_eq!(info(d.as_ref()).state, DeviceState::Available);
}

/// An emulated slcan adapter: the master of a pty whose slave the exporter opens, answering as
/// a CANable does and mirroring every frame.
fn adapter() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd, String) {
    let p = nix::pty::openpty(None, None).expect("openpty");
    let path = nix::unistd::ttyname(&p.slave).expect("ttyname");
    // Raw mode on the slave, so that `\r` arrives as sent.
    let mut t = nix::sys::termios::tcgetattr(&p.slave).expect("tcgetattr");
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&p.slave, nix::sys::termios::SetArg::TCSANOW, &t).expect("raw");
    // The slave stays open for the test's life (as a USB adapter's node stays while plugged):
    // the master never sees a hangup between the exporter's opens.
    (p.master, p.slave, path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slcan_adapter_backend_sets_the_bit_rate_and_keeps_the_order() {
    let (master, _slave, path) = adapter();
    let d = Arc::new(CanDriver::start(
        "body",
        Source::Slcan {
            path: path.clone(),
            tty_baud: 115_200,
            bitrate: 500_000,
            data_bitrate: None,
            fd: false,
        },
    ));
    // The adapter: reads lines, mirrors frames, answers commands.
    let m = std::fs::File::from(master);
    let mut w = m.try_clone().expect("clone");
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let emu = std::thread::spawn(move || {
        let mut r = BufReader::new(m);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\r', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = String::from_utf8_lossy(&line).trim().to_string();
            s2.lock().expect("lock").push(l.clone());
            let reply: Vec<u8> = match l.chars().next() {
                Some('t' | 'T' | 'r' | 'R') => {
                    let mut v = format!("{l}\r").into_bytes();
                    v.extend_from_slice(b"z\r");
                    v
                }
                Some('q') => return,
                _ => b"\r".to_vec(),
            };
            // Malformed output from the adapter too: the exporter names it and goes on.
            if l == "t1110" {
                let _ = w.write_all(b"t99\r");
            }
            if w.write_all(&reply).is_err() {
                return;
            }
        }
    });
    let mut st = d.status();
    tokio::time::timeout(GUARD, st.wait_for(|s| s.state == DeviceState::Available))
        .await
        .unwrap_or_else(|_| panic!("not opened: {:?}", d.status().borrow()))
        .expect("alive");
    let devices = DeviceSet::new("exp", vec![d.clone() as Arc<dyn Driver>]);
    let infos = devices.infos();
    let (link, server) = mem_session(devices);
    let c = ctx("adapter");
    let mut bridge = jmp_devices::can::CanBridge::create(&infos[0], &c, both())
        .await
        .expect("fronts");
    let addr = bridge
        .endpoints()
        .iter()
        .find_map(|e| match &e.local {
            Local::Address(a) => Some(*a),
            _ => None,
        })
        .expect("socketcand");
    bridge.on_welcome(&infos[0], 1);
    let run = tokio::spawn(async move {
        let _ = bridge.run(link).await;
        bridge
    });
    tokio::task::spawn_blocking(move || {
        let mut s = Scd::connect(addr, "body");
        s.send("< send 111 0 >");
        assert!(s.msg().starts_with("< frame 111 "));
        for i in 0..200u32 {
            s.send(&format!(
                "< send {:08X} 4 {:X} 1 2 3 >",
                0x1000_0000 + i,
                i % 256
            ));
        }
        for i in 0..200u32 {
            let m = s.msg();
            assert!(
                m.starts_with(&format!("< frame {:08X} ", 0x1000_0000 + i)),
                "in order: {m}"
            );
        }
    })
    .await
    .expect("client");
    // The adapter heard the configured bit rate before it was opened (and before the frames).
    let lines = seen.lock().expect("lock").clone();
    let s6 = lines.iter().position(|l| l == "S6").expect("S6 sent");
    let o = lines.iter().position(|l| l == "O").expect("O sent");
    assert!(s6 < o, "{lines:?}");
    server.abort();
    drop(emu);
    let _ = tokio::time::timeout(GUARD, run).await.expect("run ends");
    let _ = std::fs::remove_dir_all(&c.dev_dir);
}

#[test]
fn configs_are_checked_naming_the_field() {
    use jmp_devices::registry::DeviceSpec;
    let spec = |y: &str| {
        let v: serde_norway::Value = serde_norway::from_str(y).expect("yaml");
        let ty = v["type"].as_str().expect("type").to_string();
        let mut m = v.as_mapping().expect("map").clone();
        m.remove("type");
        DeviceSpec::from_yaml(&ty, serde_norway::Value::Mapping(m))
            .map_err(|e| e.message)
            .and_then(|s| s.validate().map(|_| s).map_err(|e| e.0))
    };
    assert!(spec("{type: can, interface: can0, bitrate: 500000}").is_ok());
    assert!(spec("{type: can, slcan: {path: /dev/ttyACM0}}")
        .is_err_and(|e| e.contains("bitrate is required")));
    assert!(spec("{type: can, slcan: {path: /dev/x}, bitrate: 123}")
        .is_err_and(|e| e.contains("S0-S9")));
    assert!(
        spec("{type: can, interface: 'a/b'}").is_err_and(|e| e.contains("not an interface name"))
    );
    assert!(spec("{type: can}").is_err_and(|e| e.contains("give interface")));
    assert!(spec("{type: can-sim, load: 1000000}").is_err_and(|e| e.contains("allowed")));
    assert!(spec("{type: can-sim, colour: red}").is_err_and(|e| e.contains("unknown field")));
}
