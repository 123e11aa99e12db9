//! The relay for exporters behind NAT, end to end in network namespaces: the exporter's
//! namespace drops every inbound connection, so `jmp attach` cannot reach it directly and goes
//! through the controller's relay. The console and a TCP forward work through it, a capture on
//! the relay's host shows only ciphertext, and the end of the lease cuts the relayed session
//! (and closes the relay's port).

use jmp_e2e::lab::{config_token, lease_json, show, Controller, LONG};
use jmp_e2e::netns_relay::{http_get, sample, RelayNet, EXPORTER_IP, RELAY_IP};
use jmp_e2e::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn ok(label: &str, cmd: Command, logs: &Path) -> String {
    let out = run(label, cmd, logs, READY);
    assert!(out.status.success(), "{label} failed: {}", show(&out));
    out.stdout
}

/// Starts the controller inside the relay namespace, on all its addresses, advertising the
/// client-side address (which the exporter reaches too, through the relay's routing).
fn controller(net: &RelayNet, env: &TestEnv) -> (Controller, std::path::PathBuf) {
    let data = env.root.join("controller");
    let mut cmd = command(bin("jmp-controller"));
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["--listen", "0.0.0.0:7800", "--metrics", "127.0.0.1:9100"])
        .args(["--advertise", &format!("{RELAY_IP}:7800")])
        .env("JMP_LOG", "info,jmp_controller::relay=debug");
    let mut proc = Proc::spawn("jmp-controller", net.wrap(&net.relay, cmd), &env.logs);
    let l = proc.expect_line(READY, "the controller's listening line", |l| {
        l.starts_with("jmp-controller: listening on ")
    });
    let w: Vec<&str> = l.split_whitespace().collect();
    let fp = w[5].to_string();
    let admin = std::path::PathBuf::from(w[7]);
    (
        Controller {
            addr: format!("{RELAY_IP}:7800").parse().expect("address"),
            fingerprint: fp,
            admin_file: admin,
            metrics: "127.0.0.1:9100".parse().expect("address"),
            proc,
        },
        data,
    )
}

fn metrics(net: &RelayNet) -> String {
    net.enter(&net.relay, || http_get("127.0.0.1:9100", "/metrics"))
}

#[test]
fn attach_console_and_forward_through_the_relay_encrypted_until_the_lease_ends() {
    require!(skips::tool("tcpdump"));
    let net = require!(RelayNet::new().map_err(|e| format!("no namespace topology: {e}")));
    let env = TestEnv::new("relay");
    let (mut ctl, _data) = controller(&net, &env);
    let jmp = |ns: &str, args: &[&str]| {
        let mut c = env.jmp();
        c.env("JMP_ADMIN_CONFIG", &ctl.admin_file)
            .env("JMP_CLIENT", "u")
            .args(args);
        net.wrap(ns, c)
    };

    // Identities: an exporter behind NAT, and a client.
    let token = ok(
        "admin-create-exporter",
        jmp(
            &net.relay,
            &["admin", "create", "exporter", "nat-01", "-l", "board=nat"],
        ),
        &env.logs,
    );
    let token_file = env.root.join("nat-01.token");
    write_private(&token_file, &format!("{}\n", token.trim()));
    let client_file = env.root.join("u.client.yaml");
    let mut c = jmp(&net.relay, &["admin", "create", "client", "u", "--out"]);
    c.arg(&client_file);
    ok("admin-create-client", c, &env.logs);
    let mut c = jmp(&net.client, &["config", "client", "create", "u", "--from"]);
    c.arg(&client_file).arg("--no-use");
    ok("config-client-create", c, &env.logs);
    assert!(!config_token(&client_file).is_empty());

    // The board's TCP service, inside the exporter's namespace: an echo server.
    let mut echo = Proc::spawn(
        "echo-server",
        net.cmd(
            &net.exporter,
            "socat",
            &["TCP-LISTEN:7000,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"],
        ),
        &env.logs,
    );
    assert!(
        poll_until(READY, || {
            net.enter(&net.exporter, || {
                std::net::TcpStream::connect("127.0.0.1:7000").is_ok()
            })
        }),
        "the echo server never listened: {}",
        echo.describe()
    );

    // jmpd behind the firewall, with the relay enabled.
    let cfg = env.root.join("nat-01.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: nat-01, labels: {{board: nat}}}}\n\
             listen: 0.0.0.0:7700\nstateDir: {}\ncontroller: {{tokenFile: {}, relay: true, address: '{EXPORTER_IP}:7700'}}\n\
             export:\n  console: {{type: sim-console}}\n  echo: {{type: tcp, host: 127.0.0.1, port: 7000}}\n  power: {{type: power-sim}}\n",
            env.state.display(),
            token_file.display()
        ),
    )
    .expect("write config");
    let mut cmd = command(jmpd_bin());
    cmd.arg("--config").arg(&cfg).env("JMP_LOG", "info");
    let mut jmpd = Proc::spawn("jmpd", net.wrap(&net.exporter, cmd), &env.logs);
    jmpd.expect_line(READY, "jmpd's ready line", |l| {
        l.starts_with("jmpd: exporter ")
    });
    assert!(
        poll_until(LONG, || jmpd
            .stderr()
            .contains("registered with controller")),
        "jmpd never registered: {}",
        jmpd.describe()
    );

    // A lease, then a capture on the relay's host, then the attachment.
    let out = ok(
        "create-lease",
        jmp(
            &net.client,
            &[
                "create",
                "lease",
                "-l",
                "board=nat",
                "--duration",
                "10m",
                "-o",
                "json",
            ],
        ),
        &env.logs,
    );
    let lease = lease_json(&out)["name"]
        .as_str()
        .expect("lease name")
        .to_string();
    let pcap = env.root.join("relay.pcap");
    let mut dump = Proc::spawn(
        "tcpdump",
        net.cmd(
            &net.relay,
            "tcpdump",
            // --immediate-mode: each packet goes to tcpdump as it arrives. Without it the
            // kernel holds them in a ring block until the block's timeout (1 s), and a test
            // that is done in less stops tcpdump with everything still there: CI caught "0
            // packets captured, 264 received by filter".
            &[
                "--immediate-mode",
                "-i",
                "any",
                "-U",
                "-s",
                "0",
                "-w",
                &pcap.display().to_string(),
                "udp",
            ],
        ),
        &env.logs,
    );
    assert!(
        poll_until(READY, || dump.stderr().contains("listening on")),
        "tcpdump did not start: {}",
        dump.describe()
    );
    // A one-shot request (no attachment) reaches the board through the relay too.
    let power = ok(
        "power-status",
        jmp(&net.client, &["power", "status"]),
        &env.logs,
    );
    assert!(power.contains("power is on"), "{power}");
    let dropped_before = net.dropped();
    let dev = env.dev.display().to_string();
    let mut c = jmp(&net.client, &["attach", "-o", "json", "--dev-dir", &dev]);
    c.env("JMP_LOG", "info");
    let mut att = Proc::spawn("jmp-attach", c, &env.logs);
    let line = att.expect_line(LONG, "jmp attach's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
    let ready: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert!(
        att.stderr().contains("through the controller's relay"),
        "attached, but not through the relay: {}",
        att.describe()
    );
    // The direct attempt really met the firewall.
    assert!(
        net.dropped() > dropped_before,
        "the exporter's firewall dropped nothing: the direct path was not blocked"
    );

    // The console through the relay.
    let marker = format!("relay-plaintext-{}", std::process::id());
    let mut console = Console::open(local_of(&ready, "console"));
    sim_login_and_echo(&mut console, &marker);

    // The TCP forward through the relay.
    let fwd = local_of(&ready, "echo");
    let tcp_marker = format!("tcp-through-the-relay-{}", std::process::id());
    let m2 = tcp_marker.clone();
    let echoed = net.enter(&net.client, move || {
        let mut s = std::net::TcpStream::connect(&fwd).expect("connect to the forward");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(m2.as_bytes()).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = String::new();
        s.read_to_string(&mut back).expect("read");
        back
    });
    assert_eq!(echoed, tcp_marker, "the echo through the forward");

    // What the relay's host saw: plenty of relayed datagrams, none of it readable.
    let m = metrics(&net);
    let to_exporter = sample(&m, "jmp_relay_bytes_total{direction=\"to_exporter\"}").unwrap_or(0.0);
    let to_client = sample(&m, "jmp_relay_bytes_total{direction=\"to_client\"}").unwrap_or(0.0);
    assert!(to_exporter > 0.0 && to_client > 0.0, "nothing relayed: {m}");
    // The attachment's, and the one-shot power request's (idle until the lease ends).
    assert_eq!(sample(&m, "jmp_relay_sessions"), Some(2.0), "{m}");
    dump.stop();
    let captured = std::fs::read(&pcap).expect("read the capture");
    assert!(
        captured.len() as f64 > (to_exporter + to_client) * 0.5,
        "the capture holds {} bytes, the relay moved {}: it missed the traffic",
        captured.len(),
        to_exporter + to_client
    );
    for needle in [marker.as_bytes(), tcp_marker.as_bytes(), b"Password:"] {
        assert!(
            !captured.windows(needle.len()).any(|w| w == needle),
            "plaintext {:?} in the relay's capture",
            String::from_utf8_lossy(needle)
        );
    }

    // The lease ends: the relayed session is cut, and the relay's port closes.
    let port: u16 = {
        let log = ctl.proc.stderr();
        let at = log
            .find("relay session opened")
            .expect("a relay session in the log");
        let rest = &log[at..];
        let p = rest.find("port=").expect("port in the log line");
        rest[p + 5..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a port number")
    };
    ok(
        "delete-lease",
        jmp(&net.client, &["delete", "lease", &lease]),
        &env.logs,
    );
    let status = att.expect_exit(LONG);
    assert_eq!(status.code(), Some(6), "jmp attach: {}", att.describe());
    assert!(
        poll_until(LONG, || {
            let m = metrics(&net);
            sample(&m, "jmp_relay_sessions") == Some(0.0)
                && sample(&m, "jmp_relay_sessions_ended_total{reason=\"lease_ended\"}")
                    .is_some_and(|n| n >= 1.0)
        }),
        "the relay session outlived its lease: {}",
        metrics(&net)
    );
    let closed = net.enter(&net.client, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect((RELAY_IP, port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        (0..25).any(|_| {
            let _ = s.send(b"\x40still there?");
            matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
    });
    assert!(
        closed,
        "the relay's port {port} still takes datagrams after the lease ended"
    );
    drop(echo);
    drop(jmpd);
    ctl.proc.stop();
}
