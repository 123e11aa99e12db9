//! Real SocketCAN, in the qemu test guest (tests/src/guest.rs: Debian's distribution kernel; this
//! machine's kernel has no CAN): `jmp attach` creates a vcan interface in the guest against a
//! jmpd on the host (reached as 10.0.2.2), used with candump, cansend and python-can `socketcan`;
//! a crashed attachment's interface is removed by the next one; and a jmpd in the guest whose
//! backend is a vcan interface. One boot runs every check (tests/guest/can_checks.sh).

use jmp_e2e::guest::{Guest, Init};
use jmp_e2e::*;
use std::time::Duration;

#[test]
fn real_socketcan_in_a_guest() {
    let py = require!(python());
    require!(skips::tool("qemu-system-x86_64"));
    require!(skips::tool("candump"));
    let env = TestEnv::new("can-guest");
    // The host's jmpd, reached from the guest through qemu's user-mode network.
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "hostboard",
        "127.0.0.1:0",
        "ecu: {type: can-sim, period: 10ms}",
    ));
    let g = Guest::boot(Init::Minimal);
    raw_stderr(&format!(
        "can guest: ready {:.1} s after qemu started",
        g.boot_time().as_secs_f64()
    ));
    let token = g.dir().join("token");
    std::fs::copy(&env.token_file, &token).expect("copy the token");
    let script = g.dir().join("can_checks.sh");
    let header = format!(
        "BIN={}\nPY={}\nBOARD={}\nEXPORTER=10.0.2.2:{}\nTOKEN={}\nFP={}\n",
        target_dir().display(),
        py.display(),
        board_dir().display(),
        jmpd.addr.port(),
        token.display(),
        jmpd.fingerprint
    );
    let checks = std::fs::read_to_string(workspace_root().join("tests/guest/can_checks.sh"))
        .expect("can_checks.sh");
    std::fs::write(&script, header + &checks).expect("write script");
    let out = g.run_timeout(
        &format!("/bin/sh {}", script.display()),
        Duration::from_secs(400),
    );
    let text = format!("{}\n{}", out.stdout, out.stderr);
    for check in [
        "vcan-endpoint",
        "candump-counter",
        "cansend-candump",
        "python-can-reqresp",
        "python-can-isotp",
        "python-can-mirror",
        "stale-cleaned",
        "removed-at-exit",
        "jmpd-vcan-mirror",
    ] {
        assert!(
            text.contains(&format!("CHECK {check} ok")),
            "guest check {check} did not pass:\n{text}"
        );
    }
    assert!(out.success(), "the guest failed:\n{text}");
}
