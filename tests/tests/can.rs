//! CAN end to end with real processes and python-can: the simulated ECU and an emulated slcan
//! adapter (a pty speaking Lawicel, as a CANable would) behind jmpd, reached through jmp
//! attach's slcan pty and socketcand port (this machine's kernel has no CAN, so those are the
//! default fronts here); frames of every class each way, in order and counted; ISO-TP
//! multi-frame with can-isotp; the adapter unplugged and plugged back mid-traffic; jmpd killed
//! and restarted; a SocketCAN interface the host cannot have, named clearly.

use jmp_e2e::*;
use std::io::{Read, Write};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(180);
/// Frames each way per front and backend (the figure).
const FRAMES: &str = "100000";

fn endpoint(v: &serde_json::Value, dev: &str, role: &str) -> String {
    device(v, dev)["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["role"] == role))
        .and_then(|e| e["at"].as_str())
        .unwrap_or_else(|| panic!("no {role} endpoint for {dev} in {v}"))
        .to_string()
}

fn client(py: &std::path::Path, env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let mut c = command(py);
    c.arg(board_dir().join("can_client.py")).args(args);
    let out = run("can-client", c, &env.logs, TIMEOUT);
    assert!(
        out.status.success(),
        "can_client.py {args:?}: {}\n{}",
        out.stdout,
        out.stderr
    );
    serde_json::from_str(out.stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn assert_mirrored(r: &serde_json::Value, what: &str) {
    assert_eq!(r["received"], r["sent"], "{what}: every frame back: {r}");
    assert_eq!(
        r["mismatches"],
        serde_json::json!([]),
        "{what}: in order, unchanged: {r}"
    );
}

fn python_can() -> Result<std::path::PathBuf, String> {
    venv_python(&["serial", "can", "isotp"])
}

#[test]
fn sim_ecu_through_python_can_slcan_and_socketcand() {
    let py = require!(python_can());
    let env = TestEnv::new("can-sim");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "canboard",
        "127.0.0.1:0",
        "ecu: {type: can-sim}\nconsole: {type: sim-console}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let d = device(&v, "ecu");
    assert_eq!(d["kind"], "can", "{v}");
    assert!(
        d["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("500 kbit/s")),
        "{v}"
    );
    let slcan = endpoint(&v, "ecu", "slcan");
    assert_eq!(slcan, env.dev.join("canboard/ecu").display().to_string());
    let scd = endpoint(&v, "ecu", "socketcand");

    let r = client(&py, &env, &["slcan", &slcan, "reqresp"]);
    assert_eq!(r["ok"], true, "slcan request/response: {r}");
    let r = client(&py, &env, &["socketcand", &scd, "ecu", "reqresp"]);
    assert_eq!(r["ok"], true, "socketcand request/response: {r}");
    // The frame carries the exporter's receive time (here: moments ago, same clock).
    assert!(
        r["timestamp_age_s"]
            .as_f64()
            .is_some_and(|a| (0.0..5.0).contains(&a)),
        "{r}"
    );
    let r = client(&py, &env, &["slcan", &slcan, "isotp"]);
    assert_eq!(r["ok"], true, "ISO-TP through slcan: {r}");
    let r = client(&py, &env, &["socketcand", &scd, "ecu", "isotp"]);
    assert_eq!(r["ok"], true, "ISO-TP through socketcand: {r}");
    let r = client(&py, &env, &["slcan", &slcan, "mirror", FRAMES]);
    assert_mirrored(&r, "slcan");
    let r = client(&py, &env, &["socketcand", &scd, "ecu", "mirror", FRAMES]);
    assert_mirrored(&r, "socketcand");

    // Nothing was lost or refused on the way: jmp status says nothing beyond the bus summary.
    let mut c = env.jmp();
    c.args(["status", "-o", "json"]);
    let st = run("status", c, &env.logs, TIMEOUT);
    let sv: serde_json::Value = serde_json::from_str(st.stdout.trim()).expect("status json");
    let row = sv[0]["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == "ecu"))
        .cloned()
        .expect("ecu row");
    assert!(row["notes"].is_null(), "no losses reported: {row}");
    attach.stop();
}

/// A raw socketcand client: one message at a time.
struct Scd(std::net::TcpStream, Vec<u8>);

impl Scd {
    fn open(addr: &str, bus: &str) -> Scd {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(READY)).expect("timeout");
        let mut c = Scd(s, Vec::new());
        assert_eq!(c.msg(), "< hi >");
        c.send(&format!("< open {bus} >"));
        assert_eq!(c.msg(), "< ok >");
        c.send("< rawmode >");
        assert_eq!(c.msg(), "< ok >");
        c
    }
    fn send(&mut self, m: &str) {
        self.0.write_all(m.as_bytes()).expect("write");
    }
    fn msg(&mut self) -> String {
        loop {
            if let Some(i) = self.1.iter().position(|b| *b == b'>') {
                let m: Vec<u8> = self.1.drain(..=i).collect();
                return String::from_utf8_lossy(&m).trim().to_string();
            }
            let mut b = [0u8; 4096];
            let n = self.0.read(&mut b).expect("read");
            assert!(n > 0, "socketcand connection closed");
            self.1.extend_from_slice(&b[..n]);
        }
    }
    /// Reads until a message containing `needle` (skipping the bus's other traffic).
    fn until(&mut self, needle: &str) -> String {
        loop {
            let m = self.msg();
            if m.contains(needle) {
                return m;
            }
        }
    }
}

fn status_row(env: &TestEnv, dev: &str) -> serde_json::Value {
    let mut c = env.jmp();
    c.args(["status", "-o", "json"]);
    let st = run("status", c, &env.logs, TIMEOUT);
    serde_json::from_str::<serde_json::Value>(st.stdout.trim())
        .ok()
        .and_then(|v| {
            v[0]["devices"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == dev)
                .cloned()
        })
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn emulated_adapter_mirrors_survives_unplug_and_resumes() {
    let py = require!(python_can());
    let env = TestEnv::new("can-adapter");
    let link = env.root.join("ttyCANable");
    let mut emu_cmd = command(&py);
    emu_cmd.arg(board_dir().join("slcan_adapter.py")).arg(&link);
    let mut emu = Proc::spawn_with_stdin("slcan-adapter", emu_cmd, &env.logs);
    emu.expect_line(READY, "the adapter's ready line", |l| {
        l.starts_with("ready ")
    });
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "lab",
        "127.0.0.1:0",
        &format!(
            "body: {{type: can, slcan: {{path: {}}}, bitrate: 500000, dataBitrate: 2000000}}\necu: {{type: can-sim}}",
            link.display()
        ),
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let slcan = endpoint(&v, "body", "slcan");
    let scd = endpoint(&v, "body", "socketcand");
    let ecu = endpoint(&v, "ecu", "socketcand");
    let r = client(&py, &env, &["slcan", &slcan, "mirror", FRAMES]);
    assert_mirrored(&r, "slcan to the adapter");
    let r = client(&py, &env, &["socketcand", &scd, "body", "mirror", FRAMES]);
    assert_mirrored(&r, "socketcand to the adapter");

    // Mid-traffic: a burst from the adapter is arriving while it is pulled out.
    let mut s = Scd::open(&scd, "body");
    emu.send_line("burst 2000");
    emu.expect_line(READY, "burst", |l| l == "done burst");
    s.until("< frame 321 ");
    emu.send_line("unplug");
    emu.expect_line(READY, "unplug", |l| l == "done unplug");
    let gone = poll_until(TIMEOUT, || {
        status_row(&env, "body")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("vanished") || r.contains("cannot open"))
    });
    assert!(
        gone,
        "jmp status names the vanished adapter: {}",
        status_row(&env, "body")
    );
    // The daemon keeps serving its other devices.
    let r = client(&py, &env, &["socketcand", &ecu, "ecu", "reqresp"]);
    assert_eq!(
        r["ok"], true,
        "the ECU still answers while the adapter is out: {r}"
    );
    // A frame sent now is refused, not queued: an error frame comes back.
    let mut s = Scd::open(&scd, "body");
    s.send("< send 123 1 AA >");
    let m = s.until("< error ");
    assert!(
        m.starts_with("< error 00000004 "),
        "controller error frame: {m}"
    );
    // Plugged back: jmpd reopens it, traffic resumes through the same local endpoints.
    emu.send_line("plug");
    emu.expect_line(READY, "plug", |l| l == "done plug");
    let back = poll_until(TIMEOUT, || status_row(&env, "body")["state"] == "available");
    assert!(back, "the adapter is back: {}", status_row(&env, "body"));
    let resumed = poll_until(TIMEOUT, || {
        let mut c = command(&py);
        c.arg(board_dir().join("can_client.py")).args([
            "socketcand",
            &scd,
            "body",
            "mirror",
            "100",
        ]);
        let out = run("can-client", c, &env.logs, TIMEOUT);
        serde_json::from_str::<serde_json::Value>(out.stdout.trim())
            .is_ok_and(|r| r["received"] == 100)
    });
    assert!(resumed, "traffic resumes after the adapter returns");
    let row = status_row(&env, "body");
    assert!(
        row["notes"].as_str().is_some_and(|n| n.contains("refused")),
        "jmp status counts the refused frame: {row}"
    );
    attach.stop();
    emu.send_line("quit");
}

#[test]
fn jmpd_killed_mid_traffic_fronts_stay_and_resume() {
    let py = require!(python_can());
    let env = TestEnv::new("can-kill");
    let port = free_udp_port();
    let yaml = env.exporter_yaml(
        "killme",
        &format!("127.0.0.1:{port}"),
        "ecu: {type: can-sim, period: 1ms}",
    );
    let mut jmpd = env.start_jmpd(&yaml);
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let slcan = endpoint(&v, "ecu", "slcan");
    let scd = endpoint(&v, "ecu", "socketcand");
    let mut s = Scd::open(&scd, "ecu");
    s.until("< frame 100 ");
    jmpd.proc.kill9();
    // The local fronts stay: the pty link and the port are still there.
    assert!(
        std::fs::symlink_metadata(&slcan).is_ok(),
        "slcan link stays"
    );
    let refused = poll_until(TIMEOUT, || {
        let mut s2 = Scd::open(&scd, "ecu");
        s2.send("< send 7E0 8 2 10 3 CC CC CC CC CC >");
        // Until the client notices, the frame may still go out on the dying link; after, it
        // is refused with an error frame.
        s2.0.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut b = [0u8; 4096];
        let n = s2.0.read(&mut b).unwrap_or(0);
        String::from_utf8_lossy(&b[..n]).contains("< error 00000004 ")
    });
    assert!(refused, "frames sent while jmpd is down are refused");
    let _jmpd2 = env.start_jmpd(&yaml);
    // The same local endpoints work again.
    let ok = poll_until(TIMEOUT, || {
        let mut c = command(&py);
        c.arg(board_dir().join("can_client.py"))
            .args(["socketcand", &scd, "ecu", "reqresp"]);
        let out = run("can-client", c, &env.logs, TIMEOUT);
        serde_json::from_str::<serde_json::Value>(out.stdout.trim()).is_ok_and(|r| r["ok"] == true)
    });
    assert!(ok, "request/response resumes after the restart");
    let r = client(&py, &env, &["slcan", &slcan, "reqresp"]);
    assert_eq!(r["ok"], true, "slcan resumes too: {r}");
    s.until("< frame 100 ");
    let row = status_row(&env, "ecu");
    assert!(
        row["notes"]
            .as_str()
            .is_some_and(|n| n.contains("refused while disconnected")),
        "jmp status counts what was refused during the outage: {row}"
    );
    attach.stop();
}

#[test]
fn socketcan_interface_this_host_cannot_have_is_named() {
    let env = TestEnv::new("can-missing");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "nocan",
        "127.0.0.1:0",
        "can0: {type: can, interface: can0, bitrate: 500000}\necu: {type: can-sim}",
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let d = device(&v, "can0");
    let why = d["reason"].as_str().unwrap_or("").to_string();
    assert!(
        why.contains("no SocketCAN") || why.contains("does not exist"),
        "the reason names what is missing: {v}"
    );
    assert_eq!(device(&v, "ecu")["state"], "available", "{v}");
    attach.stop();
}
