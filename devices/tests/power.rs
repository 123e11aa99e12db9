//! Power without a network: the command backend driving a script that records its calls (on,
//! off, cycle with its delay, status read back, a failing command, a hanging one killed at its
//! timeout), the simulated board's power (its console goes quiet and boots again), and requests
//! through an in-memory session the way `jmp power` makes them.

use bytes::Bytes;
use jmp_devices::board::Board;
use jmp_devices::power::spec::CommandSpec;
use jmp_devices::power::PowerDriver;
use jmp_devices::serial::driver::{SerialDriver, Source};
use jmp_devices::serve::DeviceSet;
use jmp_devices::{DeviceStatus, Driver};
use jmp_e2e::pipe::read_until;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::power::{DeviceParams, PowerState, Request, Response};
use jmp_protocol::kinds::serial::OpenParams;
use jmp_protocol::ErrorCode;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Relay {
    dir: PathBuf,
}

impl Relay {
    /// A fake relay: `relay.sh on|off|status|fail|hang`; on/off record a line "OP SECONDS" in
    /// `calls` and the state in `state`; status prints the state; fail exits 1 with a message
    /// on stderr; hang sleeps.
    fn new(tag: &str) -> Relay {
        let dir = std::env::temp_dir().join(format!("jmp-power-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let script = format!(
            r#"#!/bin/sh
d={dir}
case "$1" in
  on|off) echo "$1 $JMP_DEVICE $(date +%s.%N)" >> "$d/calls"; echo "$1" > "$d/state" ;;
  status) cat "$d/state" 2>/dev/null || echo unknown ;;
  fail) echo "relay board busy: port 3 locked" >&2; exit 1 ;;
  hang) echo started >> "$d/hang"; sleep 60 ;;
esac
"#,
            dir = dir.display()
        );
        let path = dir.join("relay.sh");
        std::fs::write(&path, script).expect("write script");
        Relay { dir }
    }

    fn argv(&self, op: &str) -> Vec<String> {
        vec![
            "sh".into(),
            self.dir.join("relay.sh").display().to_string(),
            op.into(),
        ]
    }

    fn calls(&self) -> Vec<(String, f64)> {
        std::fs::read_to_string(self.dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut w = l.split_whitespace();
                let op = w.next().unwrap_or_default().to_string();
                let _device = w.next();
                let t: f64 = w.next().and_then(|t| t.parse().ok()).unwrap_or(0.0);
                (op, t)
            })
            .collect()
    }

    fn driver(&self, on: &str, status: bool, timeout: Duration) -> PowerDriver {
        PowerDriver::commands(
            "power",
            "rpi4",
            jmp_devices::board::Board::new(),
            CommandSpec {
                on: self.argv(on),
                off: self.argv("off"),
                status: status.then(|| self.argv("status")),
            },
            Duration::from_millis(300),
            timeout,
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ask(d: &dyn Driver, r: Request) -> Result<Response, jmp_protocol::Refusal> {
    let b = d.request(to_bytes(&r)).await?;
    Ok(Response::decode_exact(&b).expect("power response"))
}

fn state_of(st: &DeviceStatus) -> PowerState {
    DeviceParams::decode_exact(&st.params)
        .expect("params")
        .state
}

#[tokio::test]
async fn commands_switch_cycle_and_report_state() {
    let relay = Relay::new("cmd");
    let d = relay.driver("on", true, Duration::from_secs(10));
    let mut status = d.status();
    assert_eq!(state_of(&status.borrow_and_update()), PowerState::Unknown);

    let r = ask(&d, Request::On).await.expect("on");
    assert_eq!((r.state, r.readable), (PowerState::On, true));
    assert_eq!(
        state_of(&status.borrow_and_update()),
        PowerState::On,
        "published"
    );
    let r = ask(&d, Request::Off).await.expect("off");
    assert_eq!(r.state, PowerState::Off);
    let r = ask(&d, Request::Status).await.expect("status");
    assert_eq!(
        r.state,
        PowerState::Off,
        "read back from the status command"
    );

    // A cycle is off, the delay, on; the request's own delay wins over the configured one.
    let t0 = Instant::now();
    let r = ask(&d, Request::Cycle { off_ms: Some(500) })
        .await
        .expect("cycle");
    assert_eq!(r.state, PowerState::On);
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "stayed off for the delay"
    );
    let calls = relay.calls();
    let ops: Vec<&str> = calls.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops, ["on", "off", "off", "on"]);
    let gap = calls[3].1 - calls[2].1;
    assert!(
        gap >= 0.5,
        "on came {gap:.3}s after off; the delay is 500 ms"
    );
    // The configured delay when the request names none.
    ask(&d, Request::Cycle { off_ms: None })
        .await
        .expect("cycle");
    let calls = relay.calls();
    assert!(calls[5].1 - calls[4].1 >= 0.3);
}

#[tokio::test]
async fn a_failing_command_reports_its_stderr_and_a_hanging_one_is_killed() {
    let relay = Relay::new("fail");
    let d = relay.driver("fail", false, Duration::from_millis(400));
    let e = ask(&d, Request::On).await.expect_err("fails");
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(
        e.reason.contains("relay board busy: port 3 locked"),
        "{}",
        e.reason
    );
    assert!(e.reason.contains("exited with status 1"), "{}", e.reason);
    assert_eq!(
        state_of(&d.status().borrow()),
        PowerState::Unknown,
        "nothing claimed"
    );
    // A cycle whose on fails reports the failure (after the off that worked).
    let e = ask(&d, Request::Cycle { off_ms: Some(10) })
        .await
        .expect_err("on fails");
    assert_eq!(e.code, ErrorCode::Failed);
    assert_eq!(state_of(&d.status().borrow()), PowerState::Off);
    // Without a status command the state is what was last set, and says so.
    let r = ask(&d, Request::Status).await.expect("status");
    assert_eq!((r.state, r.readable), (PowerState::Off, false));

    let d = relay.driver("hang", false, Duration::from_millis(300));
    let t0 = Instant::now();
    let e = ask(&d, Request::On).await.expect_err("times out");
    assert_eq!(e.code, ErrorCode::Timeout);
    assert!(e.reason.contains("was killed"), "{}", e.reason);
    assert!(t0.elapsed() < Duration::from_secs(30), "not waited out");
    assert!(relay.dir.join("hang").exists(), "the command did start");
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_field() {
    let relay = Relay::new("bad");
    let d = relay.driver("on", false, Duration::from_secs(5));
    let e = d
        .request(Bytes::from_static(&[0x7f]))
        .await
        .expect_err("bad");
    assert_eq!(e.code, ErrorCode::Protocol);
    assert!(e.reason.contains("power request"), "{}", e.reason);
    assert!(d.modes().is_empty(), "power has no channels");
}

fn boots(s: &str) -> usize {
    s.matches("U-Boot SPL").count()
}

/// The simulated board: power off silences the console and makes it ignore input; power on
/// prints the boot log again. Driven through an in-memory session like `jmp power` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_boards_console_follows_its_power() {
    use jmp_devices::registry::{DeviceRequest, DeviceResponse};
    let board = Board::new();
    let console: Arc<dyn Driver> = Arc::new(SerialDriver::start(
        "console".into(),
        Source::Sim {
            hostname: "simb".into(),
            board: board.clone(),
        },
        64 * 1024,
    ));
    let power: Arc<dyn Driver> = Arc::new(PowerDriver::sim(
        "power",
        board.clone(),
        Duration::from_millis(50),
    ));
    let (link, _server) =
        jmp_devices::testing::mem_session(DeviceSet::new("simb", vec![console, power]));
    let (mut pipe, _) = jmp_transport::Channels::open_stream(
        link.as_ref(),
        "console",
        to_bytes(&OpenParams { resume_from: None }),
    )
    .await
    .expect("console channel");
    let mut acc = Vec::new();
    read_until(&mut pipe.rx, &mut acc, "the first login prompt", |s| {
        s.ends_with("simb login: ")
    })
    .await;
    assert_eq!(boots(&String::from_utf8_lossy(&acc)), 1);

    let (resp, msg) = DeviceRequest::Power(Request::Off)
        .run(link.as_ref(), "power")
        .await
        .expect("off");
    assert!(msg.contains("switched off"), "{msg}");
    assert_eq!(
        resp,
        DeviceResponse::Power(Response {
            state: PowerState::Off,
            readable: true
        })
    );
    // (What is typed while it is off is dropped: tested on the console task itself, where
    // the order of a keystroke and a power change is known; here they travel apart.)
    DeviceRequest::Power(Request::On)
        .run(link.as_ref(), "power")
        .await
        .expect("on");
    read_until(&mut pipe.rx, &mut acc, "a second boot and prompt", |s| {
        boots(s) == 2 && s.ends_with("simb login: ")
    })
    .await;

    // A cycle boots it a third time.
    DeviceRequest::Power(Request::Cycle { off_ms: None })
        .run(link.as_ref(), "power")
        .await
        .expect("cycle");
    read_until(&mut pipe.rx, &mut acc, "a third boot", |s| {
        boots(s) == 3 && s.ends_with("simb login: ")
    })
    .await;
}
