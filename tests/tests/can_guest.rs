//! Real SocketCAN, in a qemu guest booting Debian's distribution kernel (this machine's kernel
//! has no CAN): `jmp attach` creates a vcan interface in the guest against a jmpd on the host
//! (reached as 10.0.2.2), used with candump, cansend and python-can `socketcan`; a crashed
//! attachment's interface is removed by the next one; and a jmpd in the guest whose backend is
//! a vcan interface. One boot runs every check (tests/guest/can_checks.sh).

use jmp_e2e::*;
use std::time::Duration;

#[test]
fn real_socketcan_in_a_guest() {
    let py = require!(python());
    let harness = workspace_root().join("tests/guest/vcan-guest.sh");
    require!(skips::tool("qemu-system-x86_64"));
    require!(skips::tool("candump"));
    let env = TestEnv::new("can-guest");
    // The host's jmpd, reached from the guest through qemu's user-mode network.
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "hostboard",
        "127.0.0.1:0",
        "ecu: {type: can-sim, period: 10ms}",
    ));
    let script = env.root.join("guest.sh");
    let header = format!(
        "BIN={}\nPY={}\nBOARD={}\nEXPORTER=10.0.2.2:{}\nTOKEN={}\nFP={}\n",
        target_dir().display(),
        py.display(),
        board_dir().display(),
        jmpd.addr.port(),
        env.token_file.display(),
        jmpd.fingerprint
    );
    let checks = std::fs::read_to_string(workspace_root().join("tests/guest/can_checks.sh"))
        .expect("can_checks.sh");
    std::fs::write(&script, header + &checks).expect("write script");
    let mut c = command(&harness);
    c.arg("run").arg(&script);
    let out = run("vcan-guest", c, &env.logs, Duration::from_secs(400));
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
    assert!(out.status.success(), "the guest failed:\n{text}");
}
