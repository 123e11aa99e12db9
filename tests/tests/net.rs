//! Network devices end to end, in namespaces each test builds and removes (jmp_e2e::netns): a
//! client, a lab host running jmpd, and a board behind the lab host with sshd, an HTTP server,
//! iperf3 and a UDP echo server. Through the TUN tunnel: ping, ssh, scp of 100 MiB, curl,
//! iperf3 TCP and UDP, NAT, a refused address outside the subnets; through --socks: curl and
//! ssh by name; kill -9 of jmpd mid-transfer. After each test nothing of jmp's is left.

use jmp_e2e::netns::*;
use jmp_e2e::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const EXPORTER: &str = "rpi4";
const TUN: &str = "jmp-rpi4";
const HTTP_PORT: u16 = 8080;

/// The board's services, each a guarded process in the board namespace.
struct Board {
    _procs: Vec<Proc>,
    /// The client's ssh key and options.
    ssh_key: PathBuf,
    www: PathBuf,
}

fn wait_stderr(p: &Proc, what: &str) {
    assert!(
        poll_until(READY, || p.stderr().contains(what)),
        "{}: no {what:?} in its stderr:\n{}",
        p.label,
        p.stderr()
    );
}

fn board(t: &Topology, env: &TestEnv) -> Board {
    let dir = env.root.join("board");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let keygen = |path: &Path| {
        let st = command("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .expect("ssh-keygen");
        assert!(st.success());
    };
    let host_key = dir.join("host_key");
    let ssh_key = dir.join("client_key");
    keygen(&host_key);
    keygen(&ssh_key);
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).expect("copy");
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {BOARD_ADDR}\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nSubsystem sftp internal-sftp\nLogLevel INFO\n",
            host_key.display(),
            dir.join("authorized_keys").display()
        ),
    )
    .expect("sshd_config");
    // sshd's privilege separation directory, normally made by its service unit.
    std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
    let mut procs = Vec::new();
    let mut sshd = t.cmd(&t.board, "/usr/sbin/sshd");
    sshd.args(["-D", "-e", "-f"]).arg(&cfg);
    let sshd = Proc::spawn("sshd", sshd, &env.logs);
    wait_stderr(&sshd, "Server listening on");
    procs.push(sshd);

    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    std::fs::write(www.join("index.html"), "hello from the board\n").expect("page");
    let mut http = t.cmd(&t.board, "python3");
    http.args(["-u", "-m", "http.server", "--bind", BOARD_ADDR])
        .arg(HTTP_PORT.to_string())
        .arg("--directory")
        .arg(&www);
    let mut http = Proc::spawn("http", http, &env.logs);
    http.expect_line(READY, "http.server ready", |l| {
        l.starts_with("Serving HTTP")
    });
    procs.push(http);

    let mut iperf = t.cmd(&t.board, "iperf3");
    iperf.args(["-s", "--forceflush", "-B", BOARD_ADDR]);
    let mut iperf = Proc::spawn("iperf3-server", iperf, &env.logs);
    iperf.expect_line(READY, "iperf3 server ready", |l| {
        l.contains("Server listening")
    });
    procs.push(iperf);
    Board {
        _procs: procs,
        ssh_key,
        www,
    }
}

fn exporter_yaml(env: &TestEnv, extra: &str) -> String {
    env.exporter_yaml(
        EXPORTER,
        &format!("{LAB_ADDR}:7700"),
        &format!("lan: {{type: network, subnets: [{BOARD_SUBNET}], via: {LAB_LAN_IF}}}\n{extra}"),
    )
}

fn ssh_args(key: &Path) -> Vec<String> {
    [
        "-i",
        &key.display().to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `args` in `ns` with a hang guard; the output.
fn run_in(t: &Topology, env: &TestEnv, ns: &str, args: &[&str], guard: Duration) -> RunOutput {
    let mut c = t.cmd(ns, args[0]);
    c.args(&args[1..]);
    run(args[0], c, &env.logs, guard)
}

fn ok_in(t: &Topology, env: &TestEnv, ns: &str, args: &[&str]) -> String {
    let out = run_in(t, env, ns, args, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{args:?} in {ns} failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn iperf_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("iperf3 -J output ({e}): {out}"))
}

fn stop_and_check_clean(t: Topology, mut attach: Proc, mut jmpd: Jmpd) {
    attach.stop();
    assert_eq!(
        t.leftovers(&t.client),
        Vec::<String>::new(),
        "jmp attach left these"
    );
    jmpd.proc.stop();
    assert_eq!(t.leftovers(&t.lab), Vec::<String>::new(), "jmpd left these");
    assert_eq!(
        t.sh(
            &t.lab,
            &[
                "cat",
                &format!("/proc/sys/net/ipv4/conf/{LAB_LAN_IF}/forwarding")
            ]
        )
        .trim(),
        "0",
        "jmpd restores forwarding on {LAB_LAN_IF}"
    );
    t.remove();
}

#[test]
fn tunnel_carries_ping_ssh_scp_curl_iperf_with_nat_and_refuses_outside() {
    require!(available());
    let env = TestEnv::new("net-tunnel");
    let t = Topology::new();
    let b = board(&t, &env);
    let jmpd = env.start_jmpd_in(Some(&t.lab), &exporter_yaml(&env, ""));
    let (attach, v) = env.attach_in(Some(&t.client), &jmpd, &[]);
    assert_eq!(device(&v, "lan")["kind"], "network", "{v}");
    assert_eq!(local_of(&v, "lan"), TUN, "{v}");
    assert_eq!(device(&v, "lan")["summary"], BOARD_SUBNET, "{v}");
    // The address comes with the tunnel's first open, right after the devices exist.
    wait_stderr(&attach, &format!("tunnel up on {TUN}"));
    let routes = t.sh(&t.client, &["ip", "-4", "route"]);
    assert!(
        routes.contains(&format!("{BOARD_SUBNET} dev {TUN}")),
        "{routes}"
    );
    assert!(!routes.contains(&format!("default dev {TUN}")), "{routes}");

    ok_in(
        &t,
        &env,
        &t.client,
        &["ping", "-c", "3", "-i", "0.2", "-W", "5", BOARD_ADDR],
    );

    // ssh runs a command; the board sees the lab host's address (source NAT).
    let mut args: Vec<String> = vec!["ssh".into()];
    args.extend(ssh_args(&b.ssh_key));
    args.push(format!("root@{BOARD_ADDR}"));
    args.push("echo ran-on-board $SSH_CONNECTION".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok_in(&t, &env, &t.client, &a);
    assert!(
        out.contains(&format!("ran-on-board {LAB_LAN_ADDR} ")),
        "ssh output {out:?}: the board must see {LAB_LAN_ADDR}"
    );

    // scp of 100 MiB, byte-exact (the namespaces share the file system).
    let src = env.root.join("big.bin");
    let data = pseudo_random(100 << 20, 10);
    std::fs::write(&src, &data).expect("write big file");
    let dst = env.root.join("board").join("received.bin");
    let mut args: Vec<String> = vec!["scp".into()];
    args.extend(ssh_args(&b.ssh_key));
    args.push(src.display().to_string());
    args.push(format!("root@{BOARD_ADDR}:{}", dst.display()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    ok_in(&t, &env, &t.client, &a);
    let got = std::fs::read(&dst).expect("scp'd file");
    assert_eq!(got.len(), data.len(), "scp length");
    assert!(got == data, "scp'd bytes differ");
    drop((got, data));

    let page = ok_in(
        &t,
        &env,
        &t.client,
        &[
            "curl",
            "-sS",
            "-m",
            "30",
            &format!("http://{BOARD_ADDR}:{HTTP_PORT}/"),
        ],
    );
    assert_eq!(page.trim_end(), "hello from the board");

    let tcp = iperf_json(&ok_in(
        &t,
        &env,
        &t.client,
        &["iperf3", "-c", BOARD_ADDR, "-t", "2", "-J"],
    ));
    let got = tcp["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(got > 0.0, "iperf3 TCP received nothing: {tcp}");
    let udp = iperf_json(&ok_in(
        &t,
        &env,
        &t.client,
        &[
            "iperf3", "-c", BOARD_ADDR, "-u", "-b", "20M", "-l", "1200", "-t", "2", "-J",
        ],
    ));
    let sum = &udp["end"]["sum"];
    let (packets, lost) = (
        sum["packets"].as_f64().unwrap_or(0.0),
        sum["lost_packets"].as_f64().unwrap_or(f64::MAX),
    );
    assert!(packets > 0.0 && lost < packets / 2.0, "iperf3 UDP: {sum}");

    // An address the lab host reaches, but outside the exported subnets: this namespace
    // routes it into the tunnel by hand; the exporter drops it and says so.
    ok_in(
        &t,
        &env,
        &t.lab,
        &["ping", "-c", "1", "-W", "5", BOARD_OTHER_ADDR],
    );
    t.sh(
        &t.client,
        &["ip", "route", "add", "192.168.20.0/24", "dev", TUN],
    );
    let out = run_in(
        &t,
        &env,
        &t.client,
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", BOARD_OTHER_ADDR],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "{BOARD_OTHER_ADDR} answered through the tunnel: {}",
        out.stdout
    );
    wait_stderr(
        &jmpd.proc,
        &format!("destination outside the exported subnets: {BOARD_OTHER_ADDR}"),
    );

    stop_and_check_clean(t, attach, jmpd);
}

#[test]
fn socks_reaches_the_board_by_name_refuses_elsewhere_and_unprivileged_attach_offers_it() {
    require!(available());
    let env = TestEnv::new("net-socks");
    let mut t = Topology::new();
    // Names resolve on the exporter only: the lab host knows them, the client does not.
    t.hosts(
        &t.lab.clone(),
        &format!("127.0.0.1 localhost\n{BOARD_ADDR} board\n{BOARD_OTHER_ADDR} other\n"),
    );
    let b = board(&t, &env);
    let jmpd = env.start_jmpd_in(Some(&t.lab), &exporter_yaml(&env, ""));

    // Without CAP_NET_ADMIN: attach works, says why there is no tunnel and offers --socks.
    let mut c = env.attach_cmd(&jmpd, &[]);
    c = {
        let mut p = command("setpriv");
        p.args(["--inh-caps=-net_admin", "--bounding-set=-net_admin"])
            .arg(c.get_program())
            .args(c.get_args());
        for (k, v) in c.get_envs() {
            if let Some(v) = v {
                p.env(k, v);
            }
        }
        p
    };
    let mut unpriv = Proc::spawn("jmp-attach-unprivileged", in_netns(&t.client, c), &env.logs);
    let line = unpriv.expect_line(READY, "JSON line", |l| l.starts_with('{'));
    assert!(line.contains("\"lan\""), "{line}");
    wait_stderr(&unpriv, "CAP_NET_ADMIN");
    assert!(unpriv.stderr().contains("--socks"), "{}", unpriv.stderr());
    assert_eq!(t.leftovers(&t.client), Vec::<String>::new());
    unpriv.stop();

    let port = "1080";
    let (attach, v) = env.attach_in(Some(&t.client), &jmpd, &["--socks", port]);
    assert_eq!(
        local_of(&v, "lan"),
        format!("socks:127.0.0.1:{port}"),
        "{v}"
    );
    assert_eq!(
        t.leftovers(&t.client),
        Vec::<String>::new(),
        "--socks makes no TUN"
    );
    let proxy = format!("127.0.0.1:{port}");
    let page = ok_in(
        &t,
        &env,
        &t.client,
        &[
            "curl",
            "-sS",
            "-m",
            "30",
            "--socks5-hostname",
            &proxy,
            &format!("http://board:{HTTP_PORT}/"),
        ],
    );
    assert_eq!(page.trim_end(), "hello from the board");

    let mut args: Vec<String> = vec!["ssh".into()];
    args.extend(ssh_args(&b.ssh_key));
    args.push("-o".into());
    args.push(format!("ProxyCommand=nc -X 5 -x {proxy} %h %p"));
    args.push("root@board".into());
    args.push("echo via-socks $SSH_CONNECTION".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok_in(&t, &env, &t.client, &a);
    assert!(
        out.contains(&format!("via-socks {LAB_LAN_ADDR} ")),
        "{out:?}"
    );

    // Refusals with their SOCKS codes (curl exits 97 for a refused proxy request).
    for (url, logged) in [
        (
            format!("http://other:{HTTP_PORT}/"),
            "not allowed: other (192.168.20.2) is outside the exported subnets",
        ),
        (
            format!("http://{BOARD_OTHER_ADDR}:{HTTP_PORT}/"),
            "refused: outside the exported subnets",
        ),
        (format!("http://{BOARD_ADDR}:1/"), "connection refused"),
    ] {
        let out = run_in(
            &t,
            &env,
            &t.client,
            &["curl", "-sS", "-m", "30", "--socks5-hostname", &proxy, &url],
            Duration::from_secs(60),
        );
        assert_eq!(out.status.code(), Some(97), "{url}: {}", out.stderr);
        wait_stderr(&attach, logged);
    }
    stop_and_check_clean(t, attach, jmpd);
}

#[test]
fn jmpd_killed_mid_transfer_tunnel_and_routes_stay_new_connections_work() {
    require!(available());
    let env = TestEnv::new("net-kill9");
    let t = Topology::new();
    let b = board(&t, &env);
    std::fs::write(b.www.join("big.bin"), pseudo_random(64 << 20, 3)).expect("write");
    let yaml = exporter_yaml(&env, "");
    let mut jmpd = env.start_jmpd_in(Some(&t.lab), &yaml);
    let (mut attach, _) = env.attach_in(Some(&t.client), &jmpd, &[]);
    wait_stderr(&attach, &format!("tunnel up on {TUN}"));
    // A download, rate-limited so that it is still running when jmpd dies.
    let mut dl = t.cmd(&t.client, "curl");
    dl.args(["-sS", "-o", "/dev/null", "--limit-rate", "4M", "-m", "120"])
        .arg(format!("http://{BOARD_ADDR}:{HTTP_PORT}/big.bin"));
    let mut dl = Proc::spawn("curl-download", dl, &env.logs);
    assert!(
        poll_until(READY, || t
            .sh(
                &t.board,
                &["ss", "-Htn", "state", "established", "( sport = :8080 )"]
            )
            .contains(&format!("{LAB_LAN_ADDR}:"))),
        "the download never started"
    );
    jmpd.proc.kill9();
    let link = t.sh(&t.client, &["ip", "-o", "link", "show", TUN]);
    assert!(link.contains(TUN), "the TUN went with jmpd: {link}");
    let routes = t.sh(&t.client, &["ip", "-4", "route"]);
    assert!(
        routes.contains(&format!("{BOARD_SUBNET} dev {TUN}")),
        "routes went with jmpd: {routes}"
    );
    // The killed jmpd's TUN is gone with its descriptor; its nftables table stays until the
    // next start removes it.
    assert!(t
        .sh(&t.lab, &["nft", "list", "tables"])
        .contains("jmpd-rpi4"));

    let before = attach
        .stderr()
        .matches(&format!("tunnel up on {TUN}"))
        .count();
    let jmpd2 = env.start_jmpd_in(Some(&t.lab), &yaml);
    wait_stderr(&jmpd2.proc, "left behind by an earlier run");
    assert!(
        poll_until(READY, || attach
            .stderr()
            .matches(&format!("tunnel up on {TUN}"))
            .count()
            > before),
        "jmp attach did not reopen the tunnel: {}",
        attach.stderr()
    );
    assert!(attach.is_running(), "{}", attach.describe());
    let routes = t.sh(&t.client, &["ip", "-4", "route"]);
    assert!(
        routes.contains(&format!("{BOARD_SUBNET} dev {TUN}")),
        "{routes}"
    );
    let page = ok_in(
        &t,
        &env,
        &t.client,
        &[
            "curl",
            "-sS",
            "-m",
            "30",
            &format!("http://{BOARD_ADDR}:{HTTP_PORT}/"),
        ],
    );
    assert_eq!(page.trim_end(), "hello from the board");
    dl.stop();
    stop_and_check_clean(t, attach, jmpd2);
}

#[test]
fn bad_configs_and_conflicting_routes_are_refused_naming_them_and_change_nothing() {
    require!(available());
    let env = TestEnv::new("net-bad");
    let t = Topology::new();
    for (export, says) in [
        (format!("lan: {{type: network, subnets: [{BOARD_SUBNET}], via: eth9}}"), "there is no network interface \"eth9\""),
        (format!("lan: {{type: network, subnets: [{BOARD_SUBNET}, 192.168.0.0/16], via: {LAB_LAN_IF}}}"), "192.168.0.0/16 overlaps 192.168.10.0/24"),
        ("lan: {type: network, subnets: [192.168.10.1/24], via: l1}".to_string(), "host bits set"),
    ] {
        let cfg = env.write_config(&env.exporter_yaml(EXPORTER, &format!("{LAB_ADDR}:7700"), &export));
        let mut c = command(jmpd_bin());
        c.arg("--config").arg(&cfg).arg("--check-config");
        let out = run("jmpd-check", in_netns(&t.lab, c), &env.logs, READY);
        assert!(!out.status.success(), "{export} accepted");
        assert!(out.stderr.contains(says), "{export}: {}", out.stderr);
        assert_eq!(t.leftovers(&t.lab), Vec::<String>::new());
    }

    // The client already routes a network that overlaps the export: attach refuses, naming it.
    let jmpd = env.start_jmpd_in(Some(&t.lab), &exporter_yaml(&env, ""));
    t.sh(
        &t.client,
        &["ip", "route", "add", "192.168.0.0/16", "via", LAB_ADDR],
    );
    let mut p = Proc::spawn(
        "jmp-attach-conflict",
        in_netns(&t.client, env.attach_cmd(&jmpd, &[])),
        &env.logs,
    );
    let st = p.expect_exit(READY);
    assert!(!st.success());
    assert!(
        p.stderr()
            .contains("overlaps this machine's route 192.168.0.0/16 via 10.200.0.1 dev c0"),
        "{}",
        p.stderr()
    );
    assert_eq!(t.leftovers(&t.client), Vec::<String>::new());
    t.sh(&t.client, &["ip", "route", "del", "192.168.0.0/16"]);

    // Something else has the TUN's name: refused, naming it, and left alone.
    t.sh(
        &t.client,
        &[
            "ip", "link", "add", TUN, "type", "veth", "peer", "name", "zz0",
        ],
    );
    let mut p = Proc::spawn(
        "jmp-attach-taken",
        in_netns(&t.client, env.attach_cmd(&jmpd, &[])),
        &env.logs,
    );
    assert!(!p.expect_exit(READY).success());
    assert!(
        p.stderr()
            .contains(&format!("the interface {TUN} exists and is not a TUN")),
        "{}",
        p.stderr()
    );
    assert!(t
        .sh(&t.client, &["ip", "-d", "link", "show", TUN])
        .contains("veth"));
    t.sh(&t.client, &["ip", "link", "del", TUN]);

    // A persistent TUN of that name left by some earlier run is replaced.
    t.sh(
        &t.client,
        &["ip", "tuntap", "add", "dev", TUN, "mode", "tun"],
    );
    let (attach, _) = env.attach_in(Some(&t.client), &jmpd, &[]);
    wait_stderr(
        &attach,
        &format!("removed {TUN}, a TUN left behind by an earlier run"),
    );
    wait_stderr(&attach, &format!("tunnel up on {TUN}"));
    stop_and_check_clean(t, attach, jmpd);
}
