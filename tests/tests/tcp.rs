//! TCP devices: the board's service (an echo server here) appears as a local listener; many
//! concurrent connections each get their own channel and their bytes back exactly.

use jmp_e2e::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

/// Sends `data` on a new connection to `addr` (writing and reading concurrently), half-closes,
/// and returns everything read until EOF.
fn echo_roundtrip(addr: &str, data: Vec<u8>) -> Vec<u8> {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(READY)).unwrap();
    s.set_write_timeout(Some(READY)).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).expect("write");
        w.shutdown(Shutdown::Write).expect("shutdown(Write)");
    });
    let mut got = Vec::new();
    (&s).read_to_end(&mut got).expect("read to EOF");
    writer.join().expect("writer thread");
    got
}

#[test]
fn twenty_concurrent_connections_echo_exactly() {
    let env = TestEnv::new("tcp");
    let board_port = echo_server().port();
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "tcp-board",
        "127.0.0.1:0",
        &format!("echo: {{type: tcp, host: 127.0.0.1, port: {board_port}}}"),
    ));
    let local_port = free_tcp_port();
    let fwd = format!("{local_port}=echo");
    let (mut attach, v) = env.attach(&jmpd, &["--forward", &fwd]);
    assert_eq!(device(&v, "echo")["kind"], "tcp", "{v}");
    let local = local_of(&v, "echo");
    assert_eq!(
        local,
        format!("127.0.0.1:{local_port}"),
        "--forward {fwd} not honoured: {v}"
    );

    let threads: Vec<_> = (0..20u64)
        .map(|i| {
            let local = local.clone();
            std::thread::spawn(move || {
                let data = pseudo_random(256 * 1024, 1000 + i);
                let got = echo_roundtrip(&local, data.clone());
                (i, data, got)
            })
        })
        .collect();
    for t in threads {
        let (i, data, got) = t.join().expect("connection thread panicked");
        assert_eq!(got.len(), data.len(), "connection {i}: length differs");
        if let Some(k) = (0..data.len()).find(|&k| data[k] != got[k]) {
            panic!("connection {i}: first difference at byte {k}");
        }
    }
    assert!(attach.is_running(), "{}", attach.describe());
}

#[test]
fn closed_board_port_gives_prompt_eof_and_attach_survives() {
    let env = TestEnv::new("tcp-closed");
    let board_port = echo_server().port();
    let dead_port = free_tcp_port(); // nothing listens there any more
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "tcp-board2",
        "127.0.0.1:0",
        &format!(
            "dead: {{type: tcp, host: 127.0.0.1, port: {dead_port}}}\necho: {{type: tcp, host: 127.0.0.1, port: {board_port}}}"
        ),
    ));
    // No --forward: every TCP device gets an ephemeral local port.
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let dead = local_of(&v, "dead");
    let echo = local_of(&v, "echo");
    assert!(
        dead.starts_with("127.0.0.1:") && echo.starts_with("127.0.0.1:"),
        "{v}"
    );

    for round in 0..3 {
        let mut s = TcpStream::connect(&dead)
            .unwrap_or_else(|e| panic!("the local listener {dead} must accept: {e}"));
        // Hang guard only: EOF or reset is expected long before.
        s.set_read_timeout(Some(READY)).unwrap();
        let _ = s.write_all(b"hello?");
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("round {round}: read {n} bytes from a closed board port"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("round {round}: expected EOF or reset, got {e}"),
        }
        assert!(
            attach.is_running(),
            "jmp attach exited: {}",
            attach.describe()
        );
    }

    let data = pseudo_random(64 * 1024, 7);
    assert_eq!(echo_roundtrip(&echo, data.clone()), data);
    assert!(attach.is_running(), "{}", attach.describe());
}
