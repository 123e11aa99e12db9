//! deploy/: the Prometheus alert rules pass `promtool check rules`, and every metric the rules
//! and the Grafana dashboard query is served by a live controller or jmpd after a lease's
//! ordinary life (granted, attached through the relay, a request that gave up waiting,
//! released).

use jmp_e2e::lab::{attach_lease, lease_json, wait_stderr, Lab, LONG};
use jmp_e2e::netns_relay::http_get;
use jmp_e2e::*;
use std::collections::BTreeSet;

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names (inside `{...}` or `by (...)`), strings, durations or Grafana variables.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let (mut i, mut out) = (0, Vec::new());
    let mut skip_group = false;
    while i < b.len() {
        let c = b[i] as char;
        match c {
            '"' | '\'' => {
                i += 1;
                while i < b.len() && b[i] as char != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < b.len() && b[i] as char != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if skip_group => {
                skip_group = false;
                while i < b.len() && b[i] != b')' {
                    i += 1;
                }
                i += 1;
            }
            '$' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = expr[i..].trim_start().chars().next();
                match word {
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => {
                        skip_group = true
                    }
                    "and" | "or" | "unless" | "bool" | "offset" => {}
                    // Aggregations may put their `by (...)` before the parenthesis.
                    "sum" | "min" | "max" | "avg" | "group" | "stddev" | "stdvar" | "count"
                    | "count_values" | "bottomk" | "topk" | "quantile" => {}
                    _ if next == Some('(') => {}
                    _ => out.push(word.to_string()),
                }
            }
            _ => i += 1,
        }
    }
    out
}

fn exprs_in_json(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs_in_json(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs_in_json(x, out)),
        _ => {}
    }
}

#[test]
fn the_expression_scanner_finds_metric_names_only() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, sum by (le, team) (rate(jmp_lease_wait_seconds_bucket{team=\"a\"}[5m]))) > 900"
        ),
        ["jmp_lease_wait_seconds_bucket"]
    );
    assert_eq!(
        metric_names("sum by (team) (increase(jmp_leased_seconds_total[$__range])) / 3600"),
        ["jmp_leased_seconds_total"]
    );
    assert_eq!(
        metric_names("jmp_exporter_up == 0 and on (exporter) jmp_x"),
        ["jmp_exporter_up", "jmp_x"]
    );
}

#[test]
fn alert_rules_check_and_every_queried_metric_exists() {
    require!(skips::tool("promtool"));
    let root = workspace_root();
    let rules = root.join("deploy/prometheus/jmp-alerts.yml");
    let out = command("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the rules and the dashboard query.
    let mut exprs = Vec::new();
    let y: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(&rules).expect("read rules"))
            .expect("rules YAML");
    for g in y["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            exprs.push(r["expr"].as_str().expect("expr").to_string());
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/jmp-lab.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let before = exprs.len();
    exprs_in_json(&dash, &mut exprs);
    assert!(exprs.len() > before + 10, "the dashboard has few queries");
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    // A lab whose metrics have seen a lease's life.
    let lab = Lab::new("deploy");
    let token = lab.create_exporter("mon-01", &["board=mon"]);
    let cfg = lab.env.root.join("mon-01.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: mon-01}}\n\
             listen: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}, relay: true}}\n\
             metrics: 127.0.0.1:0\npowerOffAfterLease: true\nhooks:\n  afterLease: {{run: [\"true\"]}}\n\
             export:\n  console: {{type: sim-console}}\n  power: {{type: power-sim}}\n",
            lab.env.root.join("state-mon").display(),
            token.display()
        ),
    )
    .expect("write config");
    let mut jmpd = lab.start_jmpd(&cfg);
    let seen = jmpd.proc.stdout_so_far();
    let jmpd_metrics = seen
        .lines()
        .find_map(|l| l.strip_prefix("jmpd: metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line from jmpd: {seen}"))
        .to_string();
    lab.create_client("u", &["-l", "team=qa"]);
    let out = lab.ok(
        "create-lease",
        lab.as_client(
            "u",
            &[
                "create",
                "lease",
                "-l",
                "board=mon",
                "--duration",
                "5m",
                "-o",
                "json",
            ],
        ),
    );
    let lease = lease_json(&out)["name"].as_str().expect("name").to_string();
    // A second request that gives up waiting.
    let gave_up = lab.run(
        "create-lease-wait",
        lab.as_client(
            "u",
            &[
                "create",
                "lease",
                "-l",
                "board=mon",
                "--duration",
                "5m",
                "--wait",
                "1",
            ],
        ),
    );
    assert_eq!(gave_up.status.code(), Some(4), "{}", gave_up.stderr);
    let (mut att, ready) = attach_lease(&lab, "u", &["--via", "relay"]);
    wait_stderr(&mut att, "through the controller's relay", LONG);
    let mut console = Console::open(local_of(&ready, "console"));
    sim_login_and_echo(&mut console, "metrics-traffic");
    let during_jmpd = http_get(&jmpd_metrics, "/metrics");
    let during_ctl = http_get(&lab.ctl.metrics.to_string(), "/metrics");
    assert!(
        during_jmpd.contains("jmpd_holder_info{client=\"u\",lease=\"")
            && during_jmpd.contains("team=\"qa\""),
        "{during_jmpd}"
    );
    lab.ok(
        "delete-lease",
        lab.as_client("u", &["delete", "lease", &lease]),
    );
    att.expect_exit(LONG);
    assert!(
        poll_until(LONG, || http_get(&lab.ctl.metrics.to_string(), "/metrics")
            .contains("jmp_relay_sessions_ended_total")),
        "the relay session never ended"
    );
    // The cleanup after the lease: the afterLease hook, then the board powered off.
    assert!(
        poll_until(LONG, || jmpd
            .proc
            .stderr()
            .contains("powered off after the lease")),
        "powerOffAfterLease did not power the board off: {}",
        jmpd.proc.describe()
    );
    let after_ctl = http_get(&lab.ctl.metrics.to_string(), "/metrics");
    let after_jmpd = http_get(&jmpd_metrics, "/metrics");

    let mut served = BTreeSet::new();
    for text in [&during_jmpd, &during_ctl, &after_ctl, &after_jmpd] {
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            served.insert(name.to_string());
        }
    }
    let missing: Vec<&String> = wanted.iter().filter(|m| !served.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "queried by deploy/ but served by neither the controller nor jmpd: {missing:?}\nserved: {served:?}"
    );
}
