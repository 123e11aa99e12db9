//! A controller lab for end-to-end tests: a real `jmp-controller` process (own data dir and
//! ports), identities made with the `jmp admin` CLI, controller-mode `jmpd`s, and `jmp` as a
//! given client. Used by the controller tests and by every test of lease workflows.

use crate::*;
use jmp_protocol::api::ClientConfig;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Hang guard for waits that ride on the product's own timers (the 10 s QUIC idle timeout that
/// tells the controller an exporter is gone, queue waits, reconnect backoffs).
pub const LONG: Duration = Duration::from_secs(90);

pub fn is_link(p: &str) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn show(out: &RunOutput) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status, out.stdout, out.stderr
    )
}

// ---------------------------------------------------------------------------------------------
// The controller process and one test's lab around it

pub struct Controller {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub admin_file: PathBuf,
    pub metrics: SocketAddr,
}

pub fn start_controller(logs: &Path, data: &Path, listen: &str) -> Controller {
    start_controller_with(logs, data, listen, &[])
}

/// [`start_controller`] with extra command-line arguments.
pub fn start_controller_with(logs: &Path, data: &Path, listen: &str, extra: &[&str]) -> Controller {
    Controller::start(&bin("jmp-controller"), logs, data, listen, extra)
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Controller {
    /// Starts `program` (a jmp-controller binary) on `data`, listening on `listen`, with its
    /// metrics on a free port and `extra` arguments, and waits for its two ready lines.
    pub fn start(
        program: &Path,
        logs: &Path,
        data: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Result<Controller, crate::proc::Error> {
        let bad = |what: &str, l: &str| crate::proc::Error(format!("unexpected {what} line {l:?}"));
        let mut cmd = command(program);
        cmd.arg("--data-dir")
            .arg(data)
            .args(["--listen", listen, "--metrics", "127.0.0.1:0"])
            .args(extra)
            .env("JMP_LOG", "info");
        let mut proc = Proc::start("jmp-controller", cmd, logs, Options::default())?;
        let m = proc.wait_line(READY, "the controller's metrics line", |l| {
            l.starts_with("jmp-controller: metrics on ")
        })?;
        let metrics = m
            .trim_start_matches("jmp-controller: metrics on http://")
            .trim_end_matches("/metrics")
            .parse()
            .map_err(|_| bad("metrics", &m))?;
        let l = proc.wait_line(READY, "the controller's listening line", |l| {
            l.starts_with("jmp-controller: listening on ")
        })?;
        let w: Vec<&str> = l.split_whitespace().collect();
        let ["jmp-controller:", "listening", "on", addr, "fingerprint", fp, "admin", admin] =
            w.as_slice()
        else {
            return Err(bad("listening", &l));
        };
        Ok(Controller {
            addr: addr.parse().map_err(|_| bad("listening", &l))?,
            fingerprint: fp.to_string(),
            admin_file: PathBuf::from(admin),
            metrics,
            proc,
        })
    }
}

pub struct Lab {
    pub env: TestEnv,
    pub data: PathBuf,
    pub ctl: Controller,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        Self::listening(tag, "127.0.0.1:0")
    }

    pub fn listening(tag: &str, listen: &str) -> Lab {
        Self::with_args(tag, listen, &[])
    }

    /// A lab whose controller gets `extra` arguments.
    pub fn with_args(tag: &str, listen: &str, extra: &[&str]) -> Lab {
        let env = TestEnv::new(tag);
        let data = env.root.join("controller");
        let ctl = start_controller_with(&env.logs, &data, listen, extra);
        assert!(
            ctl.admin_file.is_file(),
            "no admin credential at {}",
            ctl.admin_file.display()
        );
        Lab { env, data, ctl }
    }

    /// `jmp` with this lab's directories and admin credential, and no client chosen.
    pub fn jmp(&self) -> Command {
        let mut c = self.env.jmp();
        c.env("JMP_ADMIN_CONFIG", &self.ctl.admin_file)
            .env_remove("JMP_CLIENT")
            .env_remove("JMP_CLIENT_CONFIG");
        c
    }

    pub fn admin(&self, args: &[&str]) -> Command {
        let mut c = self.jmp();
        c.arg("admin").args(args);
        c
    }

    /// `jmp ARGS` as the client config `client` (by name, `JMP_CLIENT`).
    pub fn as_client(&self, client: &str, args: &[&str]) -> Command {
        let mut c = self.jmp();
        c.env("JMP_CLIENT", client).args(args);
        c
    }

    /// `jmp ARGS` with the admin credential used as a client config (`get leases -a`).
    pub fn as_admin(&self, args: &[&str]) -> Command {
        let mut c = self.jmp();
        c.env("JMP_CLIENT_CONFIG", &self.ctl.admin_file).args(args);
        c
    }

    pub fn run(&self, label: &str, cmd: Command) -> RunOutput {
        run(label, cmd, &self.env.logs, READY)
    }

    /// Runs `cmd`, which must succeed; its stdout.
    pub fn ok(&self, label: &str, cmd: Command) -> String {
        let out = self.run(label, cmd);
        assert!(out.status.success(), "{label} failed: {}", show(&out));
        out.stdout
    }

    pub fn spawn(&self, label: &str, cmd: Command) -> Proc {
        Proc::spawn(label, cmd, &self.env.logs)
    }

    /// A client made with `jmp admin create client` and imported with `jmp config client
    /// create --no-use`; returns its config file.
    pub fn create_client(&self, name: &str, extra: &[&str]) -> PathBuf {
        let file = self.env.root.join(format!("{name}.client.yaml"));
        let mut c = self.admin(&["create", "client", name, "--out"]);
        c.arg(&file).args(extra);
        self.ok("admin-create-client", c);
        let mut c = self.jmp();
        c.args(["config", "client", "create", name, "--from"])
            .arg(&file)
            .arg("--no-use");
        self.ok("config-client-create", c);
        file
    }

    /// An exporter identity (admin labels `labels`); returns the file holding its credential.
    pub fn create_exporter(&self, name: &str, labels: &[&str]) -> PathBuf {
        let mut c = self.admin(&["create", "exporter", name]);
        for l in labels {
            c.args(["-l", l]);
        }
        let token = self.ok("admin-create-exporter", c);
        assert!(!token.trim().is_empty(), "no exporter credential printed");
        let f = self.env.root.join(format!("{name}.token"));
        write_private(&f, &format!("{}\n", token.trim()));
        f
    }

    /// A controller-mode jmpd config for `name` (own state dir, so a restart keeps its
    /// identity) on `port` (0: any).
    pub fn exporter_config(&self, name: &str, token: &Path, port: u16) -> PathBuf {
        let state = self.env.root.join(format!("state-{name}"));
        let yaml = format!(
            "apiVersion: jmp.dev/v1alpha1\nkind: ExporterConfig\nmetadata: {{name: {name}, labels: {{site: e2e}}}}\nlisten: 127.0.0.1:{port}\nstateDir: {}\ncontroller: {{tokenFile: {}}}\nexport:\n  console: {{type: sim-console}}\n",
            state.display(),
            token.display()
        );
        let p = self.env.root.join(format!("{name}.exporter.yaml"));
        std::fs::write(&p, yaml).expect("write exporter config");
        p
    }

    /// Starts jmpd and waits until it has registered with the controller.
    pub fn start_jmpd(&self, config: &Path) -> Jmpd {
        let mut cmd = command(jmpd_bin());
        cmd.arg("--config").arg(config).env("JMP_LOG", "info");
        let mut jmpd = Jmpd::start(cmd, &self.env.logs).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            poll_until(LONG, || jmpd
                .proc
                .stderr()
                .contains("registered with controller")),
            "jmpd {} never registered: {}",
            jmpd.name,
            jmpd.proc.describe()
        );
        jmpd
    }

    /// Every lease and waiting request (`jmp get leases -a -o json` as the admin).
    pub fn leases(&self) -> Vec<Value> {
        let out = self.ok(
            "get-leases",
            self.as_admin(&["get", "leases", "-a", "-o", "json"]),
        );
        match serde_json::from_str(&out) {
            Ok(Value::Array(v)) => v,
            other => panic!("get leases -o json printed {out:?} ({other:?})"),
        }
    }

    /// `jmp admin get exporters -o json`.
    pub fn exporters(&self) -> Vec<Value> {
        let out = self.ok(
            "admin-get-exporters",
            self.admin(&["get", "exporters", "-o", "json"]),
        );
        match serde_json::from_str(&out) {
            Ok(Value::Array(v)) => v,
            other => panic!("admin get exporters -o json printed {out:?} ({other:?})"),
        }
    }

    pub fn exporter(&self, name: &str) -> Value {
        self.exporters()
            .into_iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no exporter {name} listed"))
    }

    pub fn admin_token(&self) -> String {
        config_token(&self.ctl.admin_file)
    }
}

pub fn config_token(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("read client config");
    let c: ClientConfig = serde_norway::from_str(&text).expect("parse client config");
    c.token
}

/// The one-line JSON lease printed by `jmp create lease -o json`.
pub fn lease_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON lease in {stdout:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad lease JSON {line:?}: {e}"))
}

pub fn find_lease<'a>(leases: &'a [Value], name: &str) -> Option<&'a Value> {
    leases.iter().find(|l| l["name"] == name)
}

/// Polls `p`'s stderr until it contains `needle`, failing if the process exits first.
pub fn wait_stderr(p: &mut Proc, needle: &str, timeout: Duration) {
    let ok = poll_until(timeout, || p.stderr().contains(needle) || !p.is_running());
    if !(ok && p.stderr().contains(needle)) {
        panic!("no {needle:?} on stderr of {}", p.describe());
    }
}

pub fn lab_with_one_board(tag: &str, name: &str, board: &str) -> (Lab, Jmpd) {
    let lab = Lab::new(tag);
    let token = lab.create_exporter(name, &[&format!("board={board}")]);
    let jmpd = lab.start_jmpd(&lab.exporter_config(name, &token, 0));
    lab.create_client("u", &[]);
    (lab, jmpd)
}

pub fn attach_lease(lab: &Lab, client: &str, extra: &[&str]) -> (Proc, Value) {
    let mut cmd = lab.as_client(client, &["attach", "-o", "json", "--dev-dir"]);
    cmd.arg(&lab.env.dev).args(extra);
    let mut p = lab.spawn("jmp-attach", cmd);
    let line = p.expect_line(READY, "jmp attach's JSON line", |l| {
        l.trim_start().starts_with('{')
    });
    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"));
    (p, v)
}
