//! `jmp mcp` end to end, driven as a coding agent drives it: the official MCP Python SDK's
//! stdio client (PyPI `mcp`, tests/board/mcp_agent.py) against the board `jmp local start`
//! runs and against a board leased from a controller. The agent lists the tools, gets a board,
//! waits for the login prompt, logs in, power cycles and sees the boot log again, asks the
//! simulated ECU over CAN, floods the console and gets it back in bounded chunks, flashes the
//! card with progress notifications, extends the lease, is refused the administrators' usage
//! report, and gives the board back; a client whose policy forbids
//! the board is refused; an agent that leaves holding a lease has it released; the exporter's
//! log names the agent for what it did to the board.

use jmp_e2e::lab::{show, Lab};
use jmp_e2e::py::*;
use jmp_e2e::*;
use serde_json::Value;

/// Everything the console tools may return in one call: 64 KiB of text and a line saying what
/// was left out.
const MAX_TEXT: usize = 64 * 1024 + 100;

/// Runs the agent script (`mode` and its arguments) as `client` (none: the local board) and
/// returns what it saw; fails with its output and the server's log if it fails.
fn agent(
    env: &TestEnv,
    bin: &std::path::Path,
    label: &str,
    client: Option<&str>,
    args: &[&str],
) -> Value {
    let server_log = env.logs.join(format!("{label}.server.log"));
    let mut c = tool(env, bin, "python");
    c.arg(board_dir().join("mcp_agent.py"))
        .arg(jmp_bin())
        .args(args)
        .env("MCP_SERVER_LOG", &server_log)
        .env("JMP_LOG", "info");
    if let Some(cl) = client {
        c.env("JMP_CLIENT", cl);
    }
    let out = run_tool(env, label, c);
    let log = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert!(
        out.status.success(),
        "{label}: {}\njmp mcp's log:\n{log}",
        show(&out)
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{label}: not JSON ({e}): {}", out.stdout))
}

/// The venv's bin directory if it has the package and the MCP SDK.
fn mcp_venv() -> Result<std::path::PathBuf, String> {
    venv_python(&["mcp"])?;
    venv_bin()
}

const TOOLS: &[&str] = &[
    "attach",
    "can_recv",
    "can_send",
    "console_expect",
    "console_read",
    "console_write",
    "detach",
    "devices",
    "extend",
    "flash",
    "lease",
    "list_boards",
    "power",
    "release",
    "usage",
];

/// What every session that got a board saw: the tools with the argument names, the
/// login prompt, a login, the boot log after a power cycle, and the flood in bounded chunks.
fn assert_session(v: &Value) {
    let tools: Vec<&str> = v["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tools, TOOLS, "{v}");
    for (tool, args) in [
        ("lease", &["duration", "selector"][..]),
        ("power", &["action", "device"]),
        ("console_write", &["data", "device"]),
        ("console_expect", &["device", "pattern", "timeout"]),
        ("console_read", &["device", "max_bytes"]),
    ] {
        let have = &v["schemas"][tool];
        for a in args {
            assert!(
                have.as_array().is_some_and(|h| h.iter().any(|x| x == a)),
                "{tool} lacks argument {a}: {have}"
            );
        }
    }
    assert!(
        v["no_board"].as_str().is_some_and(|t| t.contains("lease")),
        "a device tool before any board says what to call: {}",
        v["no_board"]
    );
    assert!(
        v["bad_action"]
            .as_str()
            .is_some_and(|t| t.contains("explode") && t.contains("cycle")),
        "{}",
        v["bad_action"]
    );
    assert!(
        v["login_prompt"]
            .as_str()
            .is_some_and(|t| t.ends_with("login: ")),
        "{}",
        v["login_prompt"]
    );
    for l in ["first_login", "second_login"] {
        assert!(
            v[l].as_str().is_some_and(|t| t.contains("-$((6*7))\r\n")),
            "{l}: {}",
            v[l]
        );
    }
    assert_eq!(v["cycle"]["power"]["state"], "on", "{}", v["cycle"]);
    let boot = v["boot_log"].as_str().expect("boot log");
    assert!(
        boot.contains("U-Boot") && boot.contains("Starting kernel"),
        "the boot log came again after the cycle: {boot}"
    );

    // The flood: about 320 KB of echo. An expect over it returns the latest 64 KiB and says
    // how much it left out; reads come in chunks of at most max_bytes.
    let n = v["flood_expect_len"].as_u64().expect("expect length") as usize;
    assert!(n <= MAX_TEXT, "console_expect returned {n} bytes");
    assert!(
        v["flood_expect_head"]
            .as_str()
            .is_some_and(|h| h.starts_with("[jmp: ") && h.contains("earlier bytes not shown")),
        "{}",
        v["flood_expect_head"]
    );
    let reads = v["flood_reads"].as_array().expect("reads");
    assert!(reads.len() >= 20, "{} reads for 320 KB", reads.len());
    for r in reads {
        assert!(r["bytes"].as_u64().expect("bytes") <= 8192, "{r}");
        assert!(r["text_len"].as_u64().expect("text") <= 8192 + 100, "{r}");
    }
    assert!(
        reads.iter().any(|r| r["pending"].as_u64() > Some(100_000)),
        "the rest was said to be pending: {reads:?}"
    );
}

#[test]
fn an_agent_drives_the_local_board_through_jmp_mcp() {
    let bin = require!(mcp_venv());
    let env = TestEnv::new("mcp-local");
    let _left = Leftovers { env: &env };
    let mut c = env.jmp();
    c.args(["local", "start", "-o", "json"])
        .env("JMP_DEV_DIR", &env.dev);
    let out = run("jmp-local-start", c, &env.logs, READY);
    assert!(out.status.success(), "{}", show(&out));

    let v = agent(&env, &bin, "mcp-local", None, &["local"]);
    assert_session(&v);
    assert!(
        v["boards"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["local"] == true && b["name"] == "sim")),
        "list_boards shows the local board: {}",
        v["boards"]
    );
    let devices: Vec<(String, String)> =
        serde_json::from_value(v["devices"].clone()).expect("devices");
    assert!(
        devices.contains(&("ecu".into(), "can".into()))
            && devices.contains(&("console".into(), "serial".into())),
        "{devices:?}"
    );

    // The ECU answers a UDS request (0x10 0x03) with its positive response (0x50 0x03).
    let frames = v["can_recv"]["frames"].as_array().expect("frames");
    assert!(
        frames.iter().any(
            |f| f["id"] == "7E8" && f["data"].as_str().is_some_and(|d| d.starts_with("025003"))
        ),
        "{}",
        v["can_recv"]
    );

    // 3 MiB flashed, its progress sent as notifications up to the total.
    assert!(
        v["flash"]
            .as_str()
            .is_some_and(|t| t.contains("3 MiB written")),
        "{}",
        v["flash"]
    );
    let progress = v["flash_progress"].as_array().expect("progress");
    assert!(!progress.is_empty(), "no progress notification");
    let last = progress.last().expect("last");
    assert_eq!(
        last[0], last[1],
        "the last notification says done: {progress:?}"
    );
    assert_eq!(last[1].as_f64(), Some((3u64 << 20) as f64));

    // The session did not start the local board's attachment, so it left it alone.
    let a = attachments(&env);
    assert!(
        a.len() == 1 && a[0]["local"] == true,
        "the local board is still attached, nothing else: {a:?}"
    );
}

/// A lab with one simulated board with a console, power and the simulated ECU, labelled
/// vendor=acme; clients `agent` (may lease it) and `limited` (may lease only vendor=other).
fn mcp_lab(tag: &str) -> (Lab, Jmpd) {
    let lab = Lab::new(tag);
    let token = lab.create_exporter("mcp-01", &["vendor=acme", "model=widget-v2"]);
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: mcp-01}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  {}ecu: {{type: can-sim}}\n",
        lab.env.root.join("state-mcp").display(),
        token.display(),
        widget_export().replace('\n', "\n  ")
    );
    let p = lab.env.root.join("mcp-01.exporter.yaml");
    std::fs::write(&p, yaml).expect("write exporter config");
    let jmpd = lab.start_jmpd(&p);
    lab.create_client("agent", &[]);
    lab.create_client("limited", &["--allow", "vendor=other"]);
    (lab, jmpd)
}

#[test]
fn an_agent_leases_a_board_from_a_controller_through_jmp_mcp() {
    let bin = require!(mcp_venv());
    let (lab, jmpd) = mcp_lab("mcp-lease");
    let env = &lab.env;
    let _left = Leftovers { env };

    let v = agent(
        env,
        &bin,
        "mcp-lease",
        Some("agent"),
        &["lease", "vendor=acme"],
    );
    assert_session(&v);
    assert!(
        v["boards"].as_array().is_some_and(|b| b
            .iter()
            .any(|b| b["name"] == "mcp-01" && b["labels"]["vendor"] == "acme")),
        "list_boards shows the lab's board with its labels: {}",
        v["boards"]
    );
    assert_eq!(v["lease"]["exporter"], "mcp-01", "{}", v["lease"]);
    let lease = v["lease"]["name"].as_str().expect("lease name");
    assert!(
        v["can_recv"]["frames"]
            .as_array()
            .is_some_and(|f| f
                .iter()
                .any(|f| f["id"] == "7E8"
                    && f["data"].as_str().is_some_and(|d| d.starts_with("025003")))),
        "{}",
        v["can_recv"]
    );
    let ends = v["extended"].as_array().expect("extend's answer");
    assert!(
        ends[1].as_u64() > ends[0].as_u64(),
        "extend moved the lease's end: {ends:?}"
    );
    assert_eq!(
        v["usage_refused"]["exit_code"], 10,
        "usage is for administrators: {}",
        v["usage_refused"]
    );
    assert!(
        v["end"]
            .as_str()
            .is_some_and(|t| t.contains(lease) && t.contains("released")),
        "{}",
        v["end"]
    );
    assert!(lab.leases().is_empty(), "released: {:?}", lab.leases());
    assert!(
        attachments(env).is_empty(),
        "detached: {:?}",
        attachments(env)
    );

    // The exporter's log names the agent's session (its attachment's name) for what it did to
    // the board: the power switched, the console and the bus opened.
    let log = jmpd.proc.stderr();
    let by_agent: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("via jmp mcp (e2e-agent)"))
        .collect();
    assert!(
        by_agent.iter().any(|l| l.contains("request: Cycle")),
        "no power cycle logged with the agent's name:\n{log}"
    );
    for dev in ["console", "ecu"] {
        assert!(
            by_agent
                .iter()
                .any(|l| l.contains("channel opened") && l.contains(&format!("device={dev}"))),
            "no channel of {dev} logged with the agent's name:\n{log}"
        );
    }

    // The client's policy applies as for the CLI: refused, naming the policy, and nothing
    // left waiting on the controller.
    let v = agent(
        env,
        &bin,
        "mcp-refused",
        Some("limited"),
        &["refused", "vendor=acme"],
    );
    let why = v["refused"].as_str().expect("refusal");
    assert!(
        why.contains("policy") && why.contains("vendor=other"),
        "{why}"
    );
    assert_eq!(v["refused_data"]["exit_code"], 10, "{}", v["refused_data"]);
    assert!(lab.leases().is_empty(), "{:?}", lab.leases());

    // An agent that leaves holding the board: the session's end gives the board back.
    let v = agent(
        env,
        &bin,
        "mcp-abandon",
        Some("agent"),
        &["abandon", "vendor=acme"],
    );
    assert_eq!(v["lease"]["exporter"], "mcp-01", "{v}");
    assert!(
        lab.leases().is_empty(),
        "released at the session's end: {:?}",
        lab.leases()
    );
    assert!(
        attachments(env).is_empty(),
        "detached: {:?}",
        attachments(env)
    );
}
