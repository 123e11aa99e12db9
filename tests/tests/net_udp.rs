//! UDP forwards end to end on loopback (no privileges needed): a UDP echo byte-exact from
//! several local sockets at once, and iperf3 -u through a TCP forward (its control connection)
//! and a UDP forward (its data) on the same local port number.

use jmp_e2e::*;
use std::net::UdpSocket;
use std::time::Duration;

fn udp_echo_server() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind echo");
    let port = s.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    port
}

#[test]
fn udp_forward_echoes_byte_exact_and_carries_iperf3_udp() {
    let env = TestEnv::new("udp");
    let echo_port = udp_echo_server();
    let iperf_port = free_tcp_port();
    let mut server = command("iperf3");
    server.args([
        "-s",
        "--forceflush",
        "-B",
        "127.0.0.1",
        "-p",
        &iperf_port.to_string(),
    ]);
    let mut server = Proc::spawn("iperf3-server", server, &env.logs);
    server.expect_line(READY, "iperf3 server ready", |l| {
        l.contains("Server listening")
    });
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "udp-board",
        "127.0.0.1:0",
        &format!(
            "echo: {{type: udp, host: 127.0.0.1, port: {echo_port}}}\n\
             iperf-ctl: {{type: tcp, host: 127.0.0.1, port: {iperf_port}}}\n\
             iperf-data: {{type: udp, host: 127.0.0.1, port: {iperf_port}}}"
        ),
    ));
    let local_iperf = free_tcp_port();
    let (mut attach, v) = env.attach(
        &jmpd,
        &[
            "--forward",
            &format!("{local_iperf}=iperf-ctl"),
            "--forward",
            &format!("{local_iperf}=iperf-data"),
        ],
    );
    assert_eq!(device(&v, "echo")["kind"], "udp", "{v}");
    let echo = local_of(&v, "echo");
    assert_eq!(
        local_of(&v, "iperf-data"),
        format!("127.0.0.1:{local_iperf}")
    );

    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let echo = echo.clone();
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind client");
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .expect("timeout");
                let mut buf = vec![0u8; 65536];
                for k in 0..50u64 {
                    let msg = pseudo_random(1 + ((k * 97 + i * 13) % 1100) as usize, i * 1000 + k);
                    // UDP may drop a datagram: resend until its echo comes (bounded).
                    let mut got = None;
                    for _ in 0..40 {
                        s.send_to(&msg, &echo).expect("send");
                        if let Ok(n) = s.recv(&mut buf) {
                            got = Some(buf[..n].to_vec());
                            break;
                        }
                    }
                    let got = got.unwrap_or_else(|| panic!("client {i}: no echo for datagram {k}"));
                    assert!(got == msg, "client {i} datagram {k}: echo differs");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }

    let out = run(
        "iperf3-udp",
        {
            let mut c = command("iperf3");
            c.args(["-c", "127.0.0.1", "-p", &local_iperf.to_string()])
                .args(["-u", "-b", "50M", "-l", "1200", "-t", "2", "-J"]);
            c
        },
        &env.logs,
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "iperf3 -u: {}\n{}",
        out.stdout,
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("iperf3 JSON");
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(f64::MAX);
    assert!(
        packets > 0.0 && lost < packets / 2.0,
        "iperf3 -u through the forward: {sum}"
    );
    assert!(attach.is_running(), "{}", attach.describe());
}
