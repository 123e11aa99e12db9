//! Recipes copied from Jumpstarter work as typed: its spellings are accepted as aliases. One
//! table of command lines, each run against a real controller and exporter, each with what
//! must come of it.

use jmp_e2e::lab::*;
use serde_json::Value;

/// What a row's command must produce, checked against its output and the lab afterwards.
enum Expect {
    /// Exit 0, stdout a lease name; the lease lasts `secs` (end - begin), released after.
    LeaseFor(u64),
    /// Exit 0, stdout contains this text; no lease left held afterwards.
    Prints(&'static str),
}

/// `{lease}` in a row is replaced by a lease made for that row.
const TABLE: &[(&str, &[&str], Expect)] = &[
    (
        "a duration in Jumpstarter's clock form",
        &[
            "create",
            "lease",
            "-l",
            "board=js",
            "--duration",
            "00:30:00",
        ],
        Expect::LeaseFor(1800),
    ),
    (
        "--selector spelled out, hours in the clock form",
        &[
            "create",
            "lease",
            "--selector",
            "board=js",
            "--duration",
            "1:00:00",
        ],
        Expect::LeaseFor(3600),
    ),
    (
        "delete leases (plural)",
        &["delete", "leases", "{lease}"],
        Expect::Prints(""),
    ),
    (
        "get lease (singular)",
        &["get", "lease", "-o", "json"],
        Expect::Prints("{lease}"),
    ),
    (
        "get exporter (singular)",
        &["get", "exporter", "-l", "board=js"],
        Expect::Prints("js-01"),
    ),
    (
        "shell -l, and j inside it",
        &[
            "shell",
            "-l",
            "board=js",
            "--",
            "sh",
            "-c",
            "j power on && test -n \"$JMP_LEASE\" && echo in-shell-lease-set",
        ],
        Expect::Prints("in-shell-lease-set"),
    ),
    (
        "shell --selector with a clock duration, j run directly",
        &[
            "shell",
            "--selector",
            "board=js",
            "--duration",
            "00:10:00",
            "--",
            "j",
            "power",
            "off",
        ],
        Expect::Prints(""),
    ),
    (
        "shell --selector=, the board's variables inside",
        &[
            "shell",
            "--selector=board=js",
            "--",
            "sh",
            "-c",
            "echo exporter=$JMP_EXPORTER",
        ],
        Expect::Prints("exporter=js-01"),
    ),
];

#[test]
fn jumpstarter_spellings_work_as_aliases() {
    let lab = Lab::new("jumpstarter");
    let token = lab.create_exporter("js-01", &["board=js"]);
    let state = lab.env.root.join("state-js-01");
    let yaml = format!(
        "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: js-01, labels: {{site: e2e}}}}\nlisten: 127.0.0.1:0\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  console: {{type: sim-console}}\n  power: {{type: power-sim}}\n",
        state.display(),
        token.display()
    );
    let config = lab.env.root.join("js-01.exporter.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let _jmpd = lab.start_jmpd(&config);
    lab.create_client("u", &[]);

    let mut failures = Vec::new();
    for (what, args, expect) in TABLE {
        // A lease for the rows that name one.
        let lease = args.contains(&"{lease}").then(|| {
            let name = lab.ok(
                "create",
                lab.as_client("u", &["create", "lease", "-l", "board=js"]),
            );
            name.trim().to_string()
        });
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{lease}", lease.as_deref().unwrap_or("")))
            .collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = lab.as_client("u", &argv);
        c.env("JMP_DEV_DIR", &lab.env.dev);
        let out = lab.run("row", c);
        let shown = format!("jmp {}: {}", args.join(" "), show(&out));
        if !out.status.success() {
            failures.push(format!("{what}: failed\n{shown}"));
            continue;
        }
        match expect {
            Expect::LeaseFor(secs) => {
                let name = out.stdout.trim();
                match mine(&lab).iter().find(|l| l["name"] == name) {
                    Some(l) => {
                        let d = l["end"].as_u64().unwrap_or(0) - l["begin"].as_u64().unwrap_or(0);
                        if d != *secs {
                            failures
                                .push(format!("{what}: lease lasts {d}s, not {secs}s\n{shown}"));
                        }
                    }
                    None => failures.push(format!("{what}: no lease {name:?} listed\n{shown}")),
                }
                lab.ok("delete", lab.as_client("u", &["delete", "lease", name]));
            }
            Expect::Prints(text) => {
                let text = text.replace("{lease}", lease.as_deref().unwrap_or(""));
                if !out.stdout.contains(&text) {
                    failures.push(format!("{what}: stdout lacks {text:?}\n{shown}"));
                }
                if let Some(l) = &lease {
                    if mine(&lab).iter().any(|x| x["name"] == l.as_str()) {
                        let _ = lab.run("delete", lab.as_client("u", &["delete", "lease", l]));
                    }
                }
            }
        }
        let left = mine(&lab);
        if !left.is_empty() {
            failures.push(format!("{what}: leases left held: {left:?}\n{shown}"));
            lab.ok(
                "delete-all",
                lab.as_client("u", &["delete", "lease", "--all"]),
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // `delete leases` really released: checked by the "leases left held" rule above.
}

fn mine(lab: &Lab) -> Vec<Value> {
    let out = lab.ok(
        "get-leases",
        lab.as_client("u", &["get", "leases", "-o", "json"]),
    );
    match serde_json::from_str(&out) {
        Ok(Value::Array(v)) => v,
        other => panic!("get leases -o json printed {out:?} ({other:?})"),
    }
}

/// A selector error names the option as the user typed it (`-l`, or `--selector`).
#[test]
fn a_selector_error_names_the_option_typed() {
    let env = jmp_e2e::TestEnv::new("selector-flag");
    for (flag, typed) in [("-l", "-l"), ("--selector", "--selector")] {
        let mut c = env.jmp();
        c.args(["create", "lease", typed, "board in (x"]);
        let out = jmp_e2e::run("create", c, &env.logs, jmp_e2e::READY);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(
            out.stderr.contains(&format!("error: {flag}: ")),
            "names {flag}: {}",
            out.stderr
        );
    }
}
