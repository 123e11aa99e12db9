//! `--via` (issue 20 item 7): `auto` tries the exporter's address and the controller's relay at
//! once and takes the first that proves the exporter's pinned fingerprint; an impostor at the
//! advertised address is warned about and never used; `jmp power` and `jmp storage` take
//! `--via` (and `JMP_VIA`) as `jmp attach` does.

use jmp_e2e::lab::*;
use jmp_e2e::*;

#[test]
fn an_impostor_at_the_advertised_address_is_never_used_and_the_relay_is() {
    let lab = Lab::new("via-impostor");
    // The impostor: another jmpd with an identity of its own, answering at the address the
    // real exporter advertises.
    let other = TestEnv::new("via-impostor-other");
    let impostor = other.start_jmpd(&other.exporter_yaml(
        "real-01",
        "127.0.0.1:0",
        "console: {type: sim-console, hostname: impostor}",
    ));
    let token = lab.create_exporter("real-01", &["board=real"]);
    let cfg = lab.exporter_config("real-01", &token, 0);
    let yaml = std::fs::read_to_string(&cfg).expect("config");
    let ctl = format!("controller: {{tokenFile: {}}}", token.display());
    assert!(yaml.contains(&ctl), "{yaml}");
    let yaml = yaml
        .replace(
            &ctl,
            &format!(
                "controller: {{tokenFile: {}, relay: true, address: '{}'}}",
                token.display(),
                impostor.addr
            ),
        )
        .replace(
            "console: {type: sim-console}",
            "console: {type: sim-console, hostname: genuine}\n  power: {type: power-sim}",
        );
    std::fs::write(&cfg, yaml).expect("config");
    let real = lab.start_jmpd(&cfg);
    assert_ne!(real.fingerprint, impostor.fingerprint);
    lab.create_client("u", &[]);
    lab.ok(
        "create-lease",
        lab.as_client(
            "u",
            &["create", "lease", "-l", "board=real", "--duration", "10m"],
        ),
    );

    // A verb: --via direct meets only the impostor and refuses it; JMP_VIA says the same.
    let out = lab.run(
        "power-direct",
        lab.as_client("u", &["power", "status", "--via", "direct"]),
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(out.stderr.contains(&real.fingerprint), "{}", show(&out));
    let mut c = lab.as_client("u", &["power", "status"]);
    c.env("JMP_VIA", "direct");
    let out = lab.run("power-direct-env", c);
    assert!(!out.status.success(), "{}", show(&out));
    // auto and relay reach the real board through the controller.
    for via in ["auto", "relay"] {
        let out = lab.run(
            "power-status",
            lab.as_client("u", &["power", "status", "--via", via]),
        );
        assert!(out.status.success(), "--via {via}: {}", show(&out));
        assert!(out.stdout.contains("power is on"), "{}", show(&out));
    }

    // jmp attach (auto): a warning naming the impostor's address, then the relay; the
    // console is the genuine board's.
    let (mut att, v) = attach_lease(&lab, "u", &[]);
    assert_eq!(v["fingerprint"], real.fingerprint.as_str(), "{v}");
    let log = att.stderr();
    assert!(
        log.contains(&format!("not using {}", impostor.addr)),
        "no warning about the impostor: {}",
        att.describe()
    );
    let mut con = Console::open(local_of(&v, "console"));
    con.write(b"\r");
    con.read_until("genuine login: ", READY);
    att.stop();
}

/// An exporter listening on all addresses is advertised at the address its registration came
/// from, with its port (its host name may resolve to a loopback address, which on a client's
/// machine is the client itself), and a lease reaches it there.
#[test]
fn an_exporter_on_all_addresses_is_advertised_where_it_registered_from() {
    let lab = Lab::new("via-any");
    let token = lab.create_exporter("any-01", &["board=any"]);
    let cfg = lab.exporter_config("any-01", &token, 0);
    let yaml = std::fs::read_to_string(&cfg).expect("config");
    assert!(yaml.contains("listen: 127.0.0.1:0"), "{yaml}");
    std::fs::write(
        &cfg,
        yaml.replace("listen: 127.0.0.1:0", "listen: 0.0.0.0:0"),
    )
    .expect("config");
    let jmpd = lab.start_jmpd(&cfg);
    let port = jmpd.addr.port();
    let e = lab.exporter("any-01");
    assert_eq!(e["address"], format!("127.0.0.1:{port}").as_str(), "{e}");
    lab.create_client("u", &[]);
    lab.ok(
        "create-lease",
        lab.as_client(
            "u",
            &["create", "lease", "-l", "board=any", "--duration", "10m"],
        ),
    );
    let (mut att, v) = attach_lease(&lab, "u", &["--via", "direct"]);
    let mut con = Console::open(local_of(&v, "console"));
    con.write(b"\r");
    con.read_until("login: ", READY);
    att.stop();
}
