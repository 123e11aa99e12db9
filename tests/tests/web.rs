//! The two web pages in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven by Selenium from the test venv (tests/board/web_browser.py).
//!
//! The board page (`jmp web`) on the board `jmp local start` runs: the token is required (a
//! request without it, or a WebSocket from another origin, is refused with 403), the boot log
//! shows after the page's On button, typing logs in and `echo web-ok` answers in the page, a
//! second tab shares the console, the Cycle button shows the boot log again, a CAN request sent
//! from python-can and the ECU's answer show in the live view (and its filter), the Off button
//! shows the board off, an image uploaded from the page is flashed with its progress seen, a
//! file outside `--image-dir` (`/proc/self/environ`, a device, a link out of the directory)
//! named as the image's path is refused, and an image under it named by its path is flashed,
//! its partition table read through the attachment's mount.
//!
//! The lab dashboard (`jmp-controller --web`): people sign in with a link from `jmp web --lab`
//! (once: a used link is refused; nothing without a session); the admin sees the exporter, a
//! lease made from the CLI while the page is open appears without a reload, with the usage per
//! team for the chosen month as a chart; two waiters show their queue positions; a forged
//! release (another origin, or not the holder) is refused; the holder's button releases the
//! lease, the board shows "cleaning" while its afterLease hook runs, then the head of the queue
//! gets it and the other waiter moves up; a client whose policy allows other boards sees
//! neither the exporter nor the lease, and no usage.
//!
//! Screenshots of both pages go to the test's log directory. The figures (page weight, time
//! to a console, keystroke to echo in the page) are printed for the report, never asserted as
//! times.

use jmp_e2e::lab::{show, Lab};
use jmp_e2e::py::*;
use jmp_e2e::*;
use serde_json::Value;

/// The venv's python with Selenium and python-can, and the browser and its driver.
fn browser_venv() -> Result<std::path::PathBuf, String> {
    venv_python(&["selenium", "can"])?;
    for p in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !std::path::Path::new(p).exists() {
            return Err(format!(
                "{p} is missing (Debian chromium and chromium-driver: run scripts/install-test-deps.sh)"
            ));
        }
    }
    venv_bin()
}

/// Runs the browser script with `args`; what it saw.
fn browse(
    env: &TestEnv,
    bin: &std::path::Path,
    label: &str,
    args: &[String],
    envs: &[(&str, &std::path::Path)],
) -> Value {
    let mut c = tool(env, bin, "python");
    c.arg(board_dir().join("web_browser.py")).args(args);
    c.envs(envs.iter().copied());
    let out = run_tool(env, label, c);
    assert!(out.status.success(), "{label}: {}", show(&out));
    let last = out.stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{label}: not JSON ({e}): {}", out.stdout))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The endpoint of `device` with `key` = `value` (an attachment's status row).
fn endpoint(a: &Value, name: &str, key: &str, value: &str) -> String {
    let d = device(a, name);
    d["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e[key] == value))
        .and_then(|e| e["at"].as_str())
        .unwrap_or_else(|| panic!("{name} has no {key}={value} endpoint: {d}"))
        .to_string()
}

#[test]
fn the_board_page_drives_the_local_board_in_a_browser() {
    let bin = require!(browser_venv());
    let env = TestEnv::new("web-board");
    let _left = Leftovers { env: &env };
    let mut c = env.jmp();
    c.args(["local", "start", "-o", "json"]);
    let out = run("jmp-local-start", c, &env.logs, READY);
    assert!(out.status.success(), "{}", show(&out));
    let status = attachments(&env);
    let a = status.first().expect("the local board's attachment");
    let ecu = endpoint(a, "ecu", "role", "slcan");
    let mount = endpoint(a, "sd", "type", "mount");

    // Images flashed by their path come from here only.
    let images = env.root.join("images");
    std::fs::create_dir_all(&images).expect("the image directory");
    let mut web = env.jmp();
    web.arg("web")
        .arg("--image-dir")
        .arg(&images)
        .env("JMP_LOG", "info");
    let mut web = Proc::spawn("jmp-web", web, &env.logs);
    let url = web.expect_line(READY, "jmp web's URL", |l| l.starts_with("http://"));
    // http://127.0.0.1:PORT/TOKEN/: the token is the path's first segment.
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with('/') && url.len() > 50,
        "{url}"
    );

    let args: Vec<String> = [
        "board",
        url.as_str(),
        &env.logs.display().to_string(),
        &board_dir().join("can_client.py").display().to_string(),
        "slcan",
        &ecu,
        "reqresp",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let v = browse(
        &env,
        &bin,
        "web-board",
        &args,
        &[("JMP_WEB_IMAGES", images.as_path())],
    );

    for k in [
        "no_token",
        "bad_token",
        "asset_no_token",
        "ws_no_token",
        "ws_other_origin",
    ] {
        assert_eq!(v[k], 403, "{k}: refused: {v}");
    }
    // No cookie: one would go to every other server on 127.0.0.1, whatever its port.
    assert_eq!(v["cookies"], 0, "the page set cookies: {v}");
    assert!(s(&v, "power_on").contains("power is on"), "{v}");
    assert_eq!(s(&v, "state"), "link up");
    assert_eq!(v["second_tab"], true);
    assert!(s(&v, "cycle").contains("cycled"), "{v}");
    assert_eq!(v["boot_again"], true);
    let can = s(&v, "can");
    assert!(
        can.contains("7E8") && can.contains("025003"),
        "the ECU's answer: {can}"
    );
    let filtered = v["can_filtered"].as_array().expect("filtered rows");
    assert!(
        !filtered.is_empty()
            && filtered
                .iter()
                .all(|r| r.as_str().is_some_and(|r| r.contains("7E8"))),
        "the filter shows only 7E8: {filtered:?}"
    );
    assert_eq!(s(&v, "state_off"), "board is off");
    let flash = s(&v, "flash");
    assert!(
        flash.starts_with("flashed: ") && flash.contains("3 MiB written"),
        "{flash}"
    );
    let progress: Vec<&str> = v["flash_progress"]
        .as_array()
        .expect("progress")
        .iter()
        .filter_map(Value::as_str)
        .filter(|p| p.starts_with("flashing: "))
        .collect();
    assert!(
        progress.len() >= 2,
        "progress seen twice: {:?}",
        v["flash_progress"]
    );
    // By a path: only under --image-dir. Another file the user can read, directly or by a
    // link in the image directory, is refused; an image file there is flashed.
    for k in [
        "flash_path_environ",
        "flash_path_link_out",
        "flash_path_device",
    ] {
        let refused = s(&v, k);
        assert!(
            refused.starts_with("flash failed: ") && refused.contains("is outside --image-dir"),
            "{k}: {refused}"
        );
    }
    let by_path = s(&v, "flash_path");
    assert!(
        by_path.starts_with("flashed: ") && by_path.contains("2 MiB written"),
        "{by_path}"
    );
    // The last image's partition table, read through the attachment's mount: one 6 MiB
    // partition (the upload's was 4 MiB).
    let p1 = std::fs::metadata(format!("{mount}/p1")).map(|m| m.len());
    assert_eq!(p1.ok(), Some(6 << 20), "the new partition through {mount}");

    // Page weight: the page, its script and style, xterm.js and its addon, gzipped.
    let transfer = v["weight"]["transfer"].as_u64().expect("transfer size");
    assert!(transfer < 200_000, "the board page weighs {transfer} bytes");
    let rt: Vec<f64> = v["roundtrip_ms"]
        .as_array()
        .expect("round trips")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(rt.len(), 20, "{rt:?}");
    // Where the time goes: from the key's first event to the page's WebSocket send (the
    // browser's and its driver's key events: the driver sends a key's events one by one), and
    // from the send to the echo in the page (jmp web, the attachment, the link, the board).
    let hops = v["roundtrip_hops_ms"]
        .as_array()
        .expect("the round trips' hops");
    let hop = |i: usize| -> Vec<f64> {
        hops.iter()
            .map(|h| {
                h[i].as_f64()
                    .unwrap_or_else(|| panic!("a round trip without a send: {h}"))
            })
            .collect()
    };
    let (to_send, send_to_echo) = (hop(0), hop(1));
    assert_eq!(send_to_echo.len(), rt.len(), "{hops:?}");
    raw_stderr(&format!(
        "web board page: keystroke to echo, from the key's first event to the WebSocket send: median {:.1} ms; from the send to the echo in the page: median {:.1} ms, max {:.1} ms",
        median(&to_send),
        median(&send_to_echo),
        send_to_echo.iter().cloned().fold(0.0, f64::max),
    ));
    // The same through the WebSocket from a client of the test's own, without a browser.
    let ws: Vec<f64> = v["ws_roundtrip_ms"]
        .as_array()
        .expect("the WebSocket's round trips")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(ws.len(), 20, "{ws:?}");
    raw_stderr(&format!(
        "jmp web's WebSocket without a browser: keystroke to echo median {:.1} ms, max {:.1} ms over {}",
        median(&ws),
        ws.iter().cloned().fold(0.0, f64::max),
        ws.len()
    ));
    raw_stderr(&format!(
        "web board page: {transfer} bytes transferred ({} decoded, {} files); first console byte {:.2}s, login prompt {:.2}s, echo answered {:.2}s after the page was asked for; keystroke to echo in the page: median {:.1} ms, max {:.1} ms over {}",
        v["weight"]["decoded"],
        v["weight"]["files"],
        v["first_byte_s"].as_f64().unwrap_or(0.0),
        v["login_prompt_s"].as_f64().unwrap_or(0.0),
        v["echo_s"].as_f64().unwrap_or(0.0),
        median(&rt),
        rt.iter().cloned().fold(0.0, f64::max),
        rt.len()
    ));
    web.stop();

    // The same keystroke to echo through the console's pty (what picocom reads), at the login
    // prompt of the board switched on again: printed beside the page's.
    let mut c = env.jmp();
    c.args(["power", "on"]);
    let out = run("jmp-power-on", c, &env.logs, READY);
    assert!(out.status.success(), "{}", show(&out));
    let mut con = Console::open(endpoint(a, "console", "type", "path"));
    con.write(b"\r");
    con.read_until("login: ", READY);
    // The prompt read may be the boot's own, with the answer to that Enter (another prompt)
    // still to come: a marker typed now is echoed after everything the board printed before
    // it, so what is read below is each key's echo alone.
    con.write(b"pty-");
    con.read_until("pty-", READY);
    let mut pty = Vec::new();
    for ch in b"abcdefghijklmnopqrst" {
        let t = std::time::Instant::now();
        con.write(&[*ch]);
        let got = con.read_some(READY);
        pty.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(got, [*ch], "the echo of {:?}", *ch as char);
    }
    raw_stderr(&format!(
        "console pty: keystroke to echo median {:.1} ms, max {:.1} ms over {}",
        median(&pty),
        pty.iter().cloned().fold(0.0, f64::max),
        pty.len()
    ));
}

/// The board page against a separate jmpd: killed with SIGKILL, the page shows the link
/// reconnecting; started again on the same address, the page's console works again.
#[test]
fn the_board_page_shows_the_link_dropping_and_recovers() {
    let bin = require!(browser_venv());
    let env = TestEnv::new("web-link");
    let _left = Leftovers { env: &env };
    let port = free_udp_port();
    let yaml = env.exporter_yaml(
        "phoenix",
        &format!("127.0.0.1:{port}"),
        "console: {type: sim-console}",
    );
    let mut jmpd = env.start_jmpd(&yaml);
    let (mut attach, _) = env.attach(&jmpd, &[]);
    let mut web = env.jmp();
    web.arg("web").env("JMP_LOG", "info");
    let mut web = Proc::spawn("jmp-web", web, &env.logs);
    let url = web.expect_line(READY, "jmp web's URL", |l| l.starts_with("http://"));
    let mut c = tool(&env, &bin, "python");
    c.arg(board_dir().join("web_browser.py"))
        .args(["link", url.as_str()])
        .arg(&env.logs);
    let mut page = Proc::spawn_with_stdin("web-link", c, &env.logs);
    page.expect_line(RUN, "the page's console up", |l| l == "up");
    jmpd.proc.kill9();
    page.send_line("killed");
    page.expect_line(RUN, "the page showing the link down", |l| {
        l == "reconnecting"
    });
    let jmpd2 = env.start_jmpd(&yaml);
    assert_eq!(jmpd2.addr.port(), port);
    page.send_line("restarted");
    let last = page.expect_line(RUN, "what the page saw", |l| l.starts_with('{'));
    let st = page.expect_exit(READY);
    assert!(st.success(), "{}", page.describe());
    let v: Value = serde_json::from_str(&last).expect("JSON");
    assert_eq!(s(&v, "before"), "link up", "{v}");
    assert_eq!(s(&v, "down"), "link down: reconnecting…", "{v}");
    assert_eq!(s(&v, "again"), "link up", "{v}");
    assert_eq!(v["echo_after"], true, "{v}");
    assert!(attach.is_running(), "{}", attach.describe());
    web.stop();
    attach.stop();
}

#[test]
fn the_lab_dashboard_shows_exporters_leases_and_the_queue_live() {
    let bin = require!(browser_venv());
    let mut lab = Lab::with_args("web-dash", "127.0.0.1:0", &["--web", "127.0.0.1:0"]);
    let line = lab
        .ctl
        .proc
        .expect_line(READY, "the dashboard's line", |l| {
            l.starts_with("jmp-controller: lab dashboard on http://")
        });
    let base = line
        .trim_start_matches("jmp-controller: lab dashboard on ")
        .to_string();
    let token = lab.create_exporter("mcp-01", &["vendor=acme", "team=platform"]);
    // Its afterLease hook runs until the browser script creates `release`: the dashboard
    // shows the board cleaning meanwhile, and the queue waits.
    let release = lab.env.root.join("hook-release");
    let hook = format!(
        "while [ ! -e {r} ]; do sleep 0.05; done",
        r = release.display()
    );
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: mcp-01}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nhooks:\n  afterLease: {{run: [sh, -c, {}], timeout: 120s}}\nexport:\n  {}",
        lab.env.root.join("state-web").display(),
        token.display(),
        serde_json::to_string(&hook).expect("json string"),
        widget_export().trim_end().replace('\n', "\n  ")
    );
    let p = lab.env.root.join("mcp-01.exporter.yaml");
    std::fs::write(&p, yaml + "\n").expect("write exporter config");
    let _jmpd = lab.start_jmpd(&p);
    lab.create_client("agent", &["-l", "team=platform"]);
    lab.create_client("w1", &["-l", "team=platform"]);
    lab.create_client("w2", &["-l", "team=platform"]);
    lab.create_client("limited", &["--allow", "vendor=other"]);
    let text = std::fs::read_to_string(&lab.ctl.admin_file).expect("the admin's config");
    let admin: jmp_protocol::api::ClientConfig = serde_norway::from_str(&text).expect("config");
    let env = &lab.env;
    let _left = Leftovers { env };
    let cfg = serde_json::json!({
        "base": base,
        "shots": env.logs.display().to_string(),
        "jmp": jmp_bin().display().to_string(),
        "admin_config": lab.ctl.admin_file.display().to_string(),
        "admin_token": admin.token,
        "hook_release": release.display().to_string(),
    });
    let v = browse(
        env,
        &bin,
        "web-dash",
        &["dashboard".into(), cfg.to_string()],
        &[],
    );
    // Nothing without a session, and no session without a live link.
    for k in [
        "no_session",
        "state_no_session",
        "bad_link",
        "release_no_session",
    ] {
        assert_eq!(v[k], 403, "{k}: refused: {v}");
    }
    assert_eq!(v["link_has_credential"], false, "{v}");
    // Login CSRF: a link opened from another site's page, or another server of this host, is
    // refused (and not used up); opened directly it sets the session and tells the second
    // secret in the redirect's fragment.
    assert_eq!(v["cross_site_link"], 403, "{v}");
    assert_eq!(v["same_site_link"], 403, "{v}");
    assert_eq!(
        v["direct_link"],
        serde_json::json!({"status": 303, "cookie": true, "fragment": true}),
        "{v}"
    );
    assert_eq!(
        s(&v, "url_after_sign_in"),
        base,
        "the link leaves the address bar"
    );
    assert_eq!(v["link_again"], 403, "a used link is refused: {v}");
    // Signed in: the browser holds a session id, never the credential or the link.
    assert_eq!(v["cookies"], 1, "{v}");
    assert_eq!(v["cookie_is_secret"], false, "{v}");
    // The second secret: in the tab's sessionStorage, not in the cookie, and in no answer the
    // cookie alone can get.
    assert_eq!(v["secret_len"], 32, "{v}");
    assert_eq!(v["secret_in_cookie"], false, "{v}");
    assert_eq!(v["secret_leaks"], serde_json::json!([]), "{v}");
    assert!(s(&v, "exporters").contains("vendor=acme"), "{v}");
    let lease = s(&v, "lease");
    assert!(
        s(&v, "leases").contains(lease) && s(&v, "leases").contains("mcp-01"),
        "the lease appeared without a reload: {}",
        v["leases"]
    );
    assert!(s(&v, "held").contains("agent"), "held by: {}", v["held"]);
    assert_eq!(v["admin_buttons"], 0, "no button for another's lease: {v}");
    assert!(
        s(&v, "usage").contains("platform"),
        "usage per team: {}",
        v["usage"]
    );
    assert_eq!(v["chart_bars"], 1, "one team, one bar: {v}");
    assert!(
        !s(&v, "usage_2020").contains("platform"),
        "another month: {}",
        v["usage_2020"]
    );
    // The queue: each waiter's position, and its wait so far.
    assert_eq!(v["queue"]["w1"], "1", "{v}");
    assert_eq!(v["queue"]["w2"], "2", "{v}");
    assert!(
        s(&v, "queue_wait").ends_with('s'),
        "wait so far: {}",
        v["queue_wait"]
    );
    // A forged release is refused, and the lease stays.
    assert_eq!(v["forged_origin"], 403, "{v}");
    assert_eq!(v["forged_holder"][0], 403, "{v}");
    assert!(
        v["forged_holder"][1]
            .as_str()
            .unwrap_or("")
            .contains("holds no lease"),
        "refused as not the holder, the secret right: {v}"
    );
    assert_eq!(v["lease_after_forgery"], true, "{v}");
    // The holder's cookie replayed with curl and a correct Origin releases nothing without
    // the tab's own second secret.
    assert_eq!(v["stolen_no_secret"][0], 403, "{v}");
    assert!(
        v["stolen_no_secret"][1]
            .as_str()
            .unwrap_or("")
            .contains("second secret"),
        "{v}"
    );
    assert_eq!(v["stolen_bad_secret"], 403, "{v}");
    assert_eq!(v["stolen_other_secret"], 403, "{v}");
    assert_eq!(v["lease_after_stolen"], true, "{v}");
    // The holder's button releases it; the board is cleaning while its hook runs and
    // nobody is granted it meanwhile; then the head of the queue gets it and the next moves up.
    assert_eq!(s(&v, "released"), format!("released {lease}"), "{v}");
    assert!(s(&v, "cleaning").contains("cleaning"), "{v}");
    assert_eq!(v["queue_cleaning"]["w1"], "1", "{v}");
    assert_eq!(v["queue_cleaning"]["w2"], "2", "{v}");
    assert_eq!(v["queue_after"]["w2"], "1", "{v}");
    assert!(v["queue_after"]["w1"].is_null(), "{v}");
    assert!(!s(&v, "w1_granted").is_empty(), "{v}");
    // Another client sees only what its policy allows.
    assert!(s(&v, "limited_me").starts_with("limited"), "{v}");
    assert!(
        !s(&v, "limited_exporters").contains("mcp-01")
            && !s(&v, "limited_leases").contains("mcp-01")
            && !s(&v, "limited_leases").contains(lease),
        "a client sees only what its policy allows: {v}"
    );
    assert_eq!(v["limited_usage_shown"], false, "usage is for admins");
    raw_stderr(&format!(
        "web dashboard: {} bytes transferred ({} decoded, {} files)",
        v["weight"]["transfer"], v["weight"]["decoded"], v["weight"]["files"]
    ));
}

/// `--web` on a non-loopback address is refused unless asked for by name: people sign in to the
/// dashboard with their client credential, which plain HTTP shows to anyone on the path.
#[test]
fn the_dashboard_refuses_a_non_loopback_address_over_plain_http() {
    let env = TestEnv::new("web-plain");
    let data = env.root.join("ctl");
    let mut c = std::process::Command::new(bin("jmp-controller"));
    c.arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--web", "0.0.0.0:0"]);
    let out = run("jmp-controller-web-plain", c, &env.logs, READY);
    assert!(!out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("not a loopback address") && out.stderr.contains("--web-plain-http"),
        "{}",
        out.stderr
    );
}
