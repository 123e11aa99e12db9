//! The exporter's configuration (YAML, Kubernetes-like, as Jumpstarter users know it).
//!
//! Unknown fields are errors naming the device, the field and its line; every value is
//! validated before anything is opened or bound, so `jmpd --check-config` catches what a start
//! would fail on. Secrets are never in this file: the token lives in `auth.tokenFile`.

use jmp_devices::registry::DeviceSpec;
use jmp_protocol::name;
use jmp_protocol::selector::validate_label;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const API_VERSION: &str = "jmp.dev/v1alpha1";
pub const DEFAULT_PORT: u16 = jmp_protocol::DEFAULT_EXPORTER_PORT;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not `source`: the io error is part of this message, and an error chain printing it
    // again would report a missing file twice.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The config as written; devices are turned into their kinds' specs by [`ExporterConfig::parse`]
/// so that an error inside a device's table can name the device, the field and the line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    auth: Option<Auth>,
    #[serde(default)]
    controller: Option<ControllerSection>,
    #[serde(default)]
    hooks: Option<Hooks>,
    #[serde(default)]
    power_off_after_lease: bool,
    #[serde(default)]
    history: History,
    #[serde(default)]
    metrics: Option<String>,
    export: RawExport,
}

/// `history:` what a new holder is shown of what the board printed before it (the console
/// history a serial channel replays).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum History {
    /// Only what the board printed since the holder's own lease began (its own boot log
    /// included): nothing of an earlier holder's.
    #[default]
    Lease,
    /// Also what it printed during the same client's earlier leases and since, up to the
    /// history's size (a CI client that takes the board lease after lease); another client's
    /// lease in between still starts afresh.
    Client,
}

#[derive(Debug, Clone)]
pub struct ExporterConfig {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub listen: String,
    /// Where the exporter keeps its TLS identity. Default: /var/lib/jmp/<name> as root, else
    /// $XDG_DATA_HOME/jmp/exporters/<name>.
    pub state_dir: Option<PathBuf>,
    pub auth: Option<Auth>,
    /// Register with a controller, which leases this exporter out; clients then present lease
    /// tokens. May be combined with `auth` (a direct token for the lab's own use).
    pub controller: Option<ControllerSection>,
    /// Commands run before and after each lease (controller mode).
    pub hooks: Option<Hooks>,
    /// Switch every power device off after each lease (after the afterLease hook).
    pub power_off_after_lease: bool,
    /// What a new holder sees of the board's earlier output.
    pub history: History,
    /// `host:port` for jmpd's own Prometheus `/metrics` (none: no metrics endpoint).
    pub metrics: Option<String>,
    pub export: Export,
    /// Scratch state the devices make for themselves (a simulated card at its default path)
    /// starts anew instead of being kept from the last run: local mode's fresh board. Not
    /// read from the file; jmpd keeps it off.
    pub fresh_scratch: bool,
}

/// `hooks:`: commands jmpd runs around each lease, without a shell, in their own process
/// group, with `JMP_EXPORTER`, `JMP_LEASE`, `JMP_CLIENT` and `JMP_HOOK` set.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Hooks {
    /// Before a new lease's client may use the board (it waits, seeing "preparing board").
    #[serde(default)]
    pub before_lease: Option<Hook>,
    /// After a lease ended; the controller grants the board to nobody until it is done.
    #[serde(default)]
    pub after_lease: Option<Hook>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Hook {
    /// argv: the program and its arguments.
    pub run: Vec<String>,
    /// At most this long (default 5m); then it is killed with its process group and counts
    /// as failed.
    #[serde(default)]
    pub timeout: Option<jmp_devices::spec::DurationSpec>,
    /// What a failure does: beforeLease `endLease` (default: the lease ends, with the hook's
    /// output as the reason) or `warn`; afterLease `warn` (default) or `disable` (the exporter
    /// is disabled until an admin enables it).
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    EndLease,
    Warn,
    Disable,
}

/// A hook's default timeout.
pub const HOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl Hook {
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.map_or(HOOK_TIMEOUT, |d| d.0)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControllerSection {
    /// The exporter credential (`jmp admin create exporter NAME --out FILE`). It also says
    /// where the controller is and how to trust it.
    pub token_file: PathBuf,
    /// Override the controller's `host:port` named in the credential.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `host:port` clients reach this exporter at (default: `listen`; when listening on all
    /// addresses, the controller sends clients to the address this host's registration comes
    /// from).
    #[serde(default)]
    pub address: Option<String>,
    /// Keep an outbound connection for the controller's relay: clients that cannot reach
    /// this exporter (it is behind NAT or accepts no inbound connection) come through the
    /// controller, still end-to-end encrypted.
    #[serde(default)]
    pub relay: bool,
    /// Renew the credential this long before it expires (e.g. `7d`); default: when a third
    /// of its life is left. jmpd writes the renewed one back to `tokenFile`.
    #[serde(default)]
    pub renew_before: Option<jmp_devices::spec::DurationSpec>,
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PORT}")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Auth {
    /// A file holding the direct-mode token clients must present. Created (0600, random) on
    /// first start if missing.
    pub token_file: PathBuf,
}

/// The device table, in the order the config lists it.
#[derive(Debug, Clone, Default)]
pub struct Export(pub Vec<(String, DeviceSpec)>);

/// Devices as written: name and table, in order.
#[derive(Debug, Clone, Default)]
struct RawExport(Vec<(String, serde_norway::Value)>);

impl<'de> Deserialize<'de> for RawExport {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawExport;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of device name to device")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawExport, A::Error> {
                let mut out: Vec<(String, serde_norway::Value)> = Vec::new();
                while let Some((name, spec)) = map.next_entry::<String, serde_norway::Value>()? {
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!(
                            "device {name:?} is listed twice"
                        )));
                    }
                    out.push((name, spec));
                }
                Ok(RawExport(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The line (1-based) of `field` (a dotted path inside the device's table) in the block of
/// device `device` under `export:`, or of the device itself. Found in the text because the
/// YAML crate keeps no positions for values once they are trees.
fn locate(text: &str, device: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let export = lines
        .iter()
        .position(|l| l.trim_end() == "export:" || l.starts_with("export:"))?;
    let key = |l: &str, k: &str| {
        let t = l.trim_start();
        t.strip_prefix(k)
            .is_some_and(|r| r.trim_start().starts_with(':'))
            || t.strip_prefix(&format!("\"{k}\""))
                .is_some_and(|r| r.trim_start().starts_with(':'))
    };
    let dev_line = (export + 1..lines.len()).find(|&i| key(lines[i], device))?;
    let first = field.split('.').next().unwrap_or("");
    if first.is_empty() {
        return Some(dev_line + 1);
    }
    let indent = |l: &str| l.len() - l.trim_start().len();
    let dev_indent = indent(lines[dev_line]);
    // A flow mapping on the device's own line ({type: serial, prot: 1}).
    let own = lines[dev_line];
    if own.contains('{')
        && (own.contains(&format!(" {first}:")) || own.contains(&format!("{{{first}:")))
    {
        return Some(dev_line + 1);
    }
    for (i, l) in lines.iter().enumerate().skip(dev_line + 1) {
        if !l.trim().is_empty() && indent(l) <= dev_indent {
            break;
        }
        if key(l, first) || l.contains(&format!(" {first}:")) || l.contains(&format!("{{{first}:"))
        {
            return Some(i + 1);
        }
    }
    Some(dev_line + 1)
}

/// No problems, one (as it is), or several: counted, one per line, so that none is missed.
fn join_problems(problems: Vec<String>) -> Result<(), String> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems.into_iter().next().unwrap_or_default()),
        n => Err(format!("{n} problems:\n  {}", problems.join("\n  "))),
    }
}

impl ExporterConfig {
    pub fn load(path: &Path) -> Result<ExporterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and checks a config. Every problem found is reported, one per line (a device's
    /// own error does not hide the next device's, nor a bad `listen` a bad label), so that
    /// `jmpd --check-config` lists all that must be fixed at once. Only a config that is not
    /// YAML of the expected shape at all stops at its first error (the YAML reader's).
    pub fn parse(text: &str) -> Result<ExporterConfig, String> {
        let raw: RawConfig = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mut export = Vec::new();
        let mut problems = Vec::new();
        for (dev, value) in raw.export.0 {
            match Self::parse_device(text, &dev, value) {
                Ok(spec) => export.push((dev, spec)),
                Err(e) => problems.push(e),
            }
        }
        let export_complete = problems.is_empty();
        let c = ExporterConfig {
            api_version: raw.api_version,
            kind: raw.kind,
            metadata: raw.metadata,
            listen: raw.listen,
            state_dir: raw.state_dir,
            auth: raw.auth,
            controller: raw.controller,
            hooks: raw.hooks,
            power_off_after_lease: raw.power_off_after_lease,
            history: raw.history,
            metrics: raw.metrics,
            export: Export(export),
            fresh_scratch: false,
        };
        problems.extend(c.problems(export_complete));
        join_problems(problems)?;
        Ok(c)
    }

    /// One device's table turned into its kind's spec, or why not (naming the device, the
    /// field and its line).
    fn parse_device(
        text: &str,
        dev: &str,
        value: serde_norway::Value,
    ) -> Result<DeviceSpec, String> {
        let at = |field: &str| {
            locate(text, dev, field)
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default()
        };
        let shown = name::escape(dev).into_owned();
        let mut table = match value {
            serde_norway::Value::Mapping(m) => m,
            _ => {
                return Err(format!(
                    "export.{shown}{}: expected a table like {{type: serial, path: /dev/ttyUSB0}}",
                    at("")
                ))
            }
        };
        let ty = match table.remove("type") {
            Some(serde_norway::Value::String(t)) => t,
            Some(_) => {
                return Err(format!(
                    "export.{shown}{}: type must be a string",
                    at("type")
                ))
            }
            None => {
                return Err(format!(
                    "export.{shown}{}: no type (one of: {})",
                    at(""),
                    DeviceSpec::types()
                        .iter()
                        .map(|(_, t, _)| *t)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        };
        let spec =
            DeviceSpec::from_yaml(&ty, serde_norway::Value::Mapping(table)).map_err(|e| {
                let field = if e.path.is_empty() {
                    String::new()
                } else {
                    format!(".{}", e.path)
                };
                format!("export.{shown}{field}{}: {}", at(&e.path), e.message)
            })?;
        spec.validate()
            .map_err(|m| format!("export.{shown}{}: {m}", at("")))?;
        Ok(spec)
    }

    /// Checks the whole config; every problem is reported (see [`ExporterConfig::parse`]).
    pub fn validate(&self) -> Result<(), String> {
        join_problems(self.problems(true))
    }

    /// Every problem of the config. `export_complete`: every listed device was understood
    /// (otherwise checks that need the whole list, such as "no devices" or "no power device",
    /// would report what is only a consequence of a device's own error).
    fn problems(&self, export_complete: bool) -> Vec<String> {
        let mut p = Vec::new();
        if self.api_version != API_VERSION {
            p.push(format!(
                "apiVersion {:?} is not supported (expected {API_VERSION:?})",
                self.api_version
            ));
        }
        if self.kind != "ExporterConfig" {
            p.push(format!("kind {:?} is not ExporterConfig", self.kind));
        }
        if let Err(e) = name::check("metadata.name", &self.metadata.name) {
            p.push(e.to_string());
        }
        for (k, v) in &self.metadata.labels {
            if let Err(e) = validate_label(k, v) {
                p.push(format!("metadata.labels: {e}"));
            }
        }
        if let Err(e) = self.listen_addr() {
            p.push(e);
        }
        if self.export.0.is_empty() && export_complete {
            p.push("export: no devices listed".into());
        }
        if self.export.0.len() > jmp_protocol::MAX_DEVICES {
            p.push(format!(
                "export: {} devices listed; at most {} are allowed",
                self.export.0.len(),
                jmp_protocol::MAX_DEVICES
            ));
        }
        for (dev, _) in &self.export.0 {
            if let Err(e) = name::check("export: device name", dev) {
                p.push(e.to_string());
            }
        }
        p.extend(self.lease_action_problems(export_complete));
        if let Some(m) = &self.metrics {
            if m.parse::<SocketAddr>().is_err() {
                p.push(format!(
                    "metrics {m:?} is not an address like 127.0.0.1:9200"
                ));
            }
        }
        p
    }

    fn lease_action_problems(&self, export_complete: bool) -> Vec<String> {
        let mut p = Vec::new();
        let any = self
            .hooks
            .as_ref()
            .is_some_and(|h| h.before_lease.is_some() || h.after_lease.is_some());
        if (any || self.power_off_after_lease) && self.controller.is_none() {
            p.push(
                "hooks and powerOffAfterLease need a controller: section (leases come from the controller)"
                    .into(),
            );
        }
        if self.power_off_after_lease
            && export_complete
            && !self.export.0.iter().any(|(_, s)| s.switches_power())
        {
            p.push("powerOffAfterLease: true, but no power device is exported".into());
        }
        let Some(h) = &self.hooks else {
            return p;
        };
        for (what, hook, allowed) in [
            (
                "beforeLease",
                &h.before_lease,
                [OnFailure::EndLease, OnFailure::Warn],
            ),
            (
                "afterLease",
                &h.after_lease,
                [OnFailure::Warn, OnFailure::Disable],
            ),
        ] {
            let Some(hook) = hook else { continue };
            if hook.run.is_empty() || hook.run[0].trim().is_empty() {
                p.push(format!(
                    "hooks.{what}.run is empty (a program and its arguments)"
                ));
            }
            if hook.timeout().is_zero() {
                p.push(format!("hooks.{what}.timeout must be positive"));
            }
            if let Some(f) = hook.on_failure {
                if !allowed.contains(&f) {
                    p.push(format!(
                        "hooks.{what}.onFailure: {} is not possible here (use {} or {})",
                        on_failure_name(f),
                        on_failure_name(allowed[0]),
                        on_failure_name(allowed[1])
                    ));
                }
            }
        }
        p
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| {
            format!(
                "listen {:?} is not an address like 0.0.0.0:7700",
                self.listen
            )
        })
    }

    /// The built-in simulated board `jmp local start` runs without a config: a console and a
    /// power switch (power starts on).
    pub fn simulated() -> ExporterConfig {
        ExporterConfig::parse(SIMULATED).unwrap_or_else(|e| {
            // The text is a constant, checked by a test: this cannot happen in a build that
            // passed its tests.
            panic!("the built-in simulated board's config is invalid: {e}")
        })
    }
}

fn on_failure_name(f: OnFailure) -> &'static str {
    match f {
        OnFailure::EndLease => "endLease",
        OnFailure::Warn => "warn",
        OnFailure::Disable => "disable",
    }
}

/// The simulated board's config, also the example of the local-mode config format
/// (examples/local-config.yaml carries it verbatim; a test checks).
pub const SIMULATED: &str = r#"apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata:
  name: sim
  labels: {board: sim, vendor: acme, model: widget-v2}
listen: 127.0.0.1:0
export:
  console: {type: sim-console, hostname: jmp-sim}
  power:   {type: power-sim}
  ecu:     {type: can-sim}
  sd:      {type: storage-sim, size: 256MiB}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: jmp.dev/v1alpha1
kind: ExporterConfig
metadata:
  name: rpi4-01
  labels: {board: rpi4, arch: arm64, team: platform}
listen: 0.0.0.0:7700
auth: {tokenFile: /etc/jmp/rpi4-01.token}
export:
  console: {type: serial, path: /dev/ttyUSB0, baudrate: 115200}
  ssh:     {type: tcp, host: 192.168.10.2, port: 22}
  sim:     {type: sim-console, history: 1MiB}
  power:
    type: power
    command:
      on: [relay, "1", "on"]
      off: [relay, "1", "off"]
    cycleDelay: 3s
"#;

    #[test]
    fn the_design_example_parses_in_order() {
        let c = ExporterConfig::parse(GOOD).expect("valid");
        let names: Vec<_> = c.export.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["console", "ssh", "sim", "power"]);
        match &c.export.0[0].1 {
            DeviceSpec::Serial(jmp_devices::serial::SerialConfig::Tty(s)) => {
                assert_eq!(s.baudrate, 115_200)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.metadata.labels["team"], "platform");
    }

    fn err(yaml: &str) -> String {
        ExporterConfig::parse(yaml).expect_err("must be rejected")
    }

    #[test]
    fn errors_name_the_device_the_field_and_its_line() {
        let e = err(&GOOD.replace("baudrate: 115200", "baud: 115200"));
        assert!(e.contains("export.console"), "{e}");
        assert!(e.contains("unknown field `baud`"), "{e}");
        assert!(e.contains("line 10"), "{e}");
        let e = err(&GOOD.replace("listen:", "lisen:"));
        assert!(e.contains("unknown field `lisen`"), "{e}");
        let e = err(&GOOD.replace("type: tcp", "type: tpc"));
        assert!(
            e.contains("export.ssh.type") && e.contains("\"tpc\""),
            "{e}"
        );
        assert!(e.contains("line 11"), "{e}");
        // A bad value in a block-style table: the field and its own line.
        let e = err(&GOOD.replace("cycleDelay: 3s", "cycleDelay: soon"));
        assert!(e.contains("export.power.cycleDelay"), "{e}");
        assert!(e.contains("line 18"), "{e}");
        let e = err(&GOOD.replace(
            "path: /dev/ttyUSB0, baudrate",
            "path: /dev/ttyUSB0, parity: evn, baudrate",
        ));
        assert!(e.contains("export.console.parity"), "{e}");
        assert!(e.contains("evn"), "{e}");
        let e = err(&GOOD.replace("      off: [relay, \"1\", \"off\"]\n", ""));
        assert!(e.contains("export.power.command"), "{e}");
        assert!(e.contains("off"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let bad = GOOD
            .replace("baudrate: 115200", "baud: 115200")
            .replace("cycleDelay: 3s", "cycleDelay: soon")
            .replace("0.0.0.0:7700", "nowhere")
            .replace("board: rpi4", "board: -rpi4");
        let e = err(&bad);
        assert!(e.starts_with("4 problems:\n"), "{e}");
        for want in [
            "export.console",
            "unknown field `baud`",
            "export.power.cycleDelay (line 18)",
            "listen \"nowhere\"",
            "metadata.labels",
        ] {
            assert!(e.contains(want), "{want} missing in: {e}");
        }
        assert_eq!(e.lines().count(), 5, "{e}");
        // A device that cannot be read is not also reported as "no power device".
        let only_power_bad = format!(
            "{}\ncontroller: {{tokenFile: /t}}\npowerOffAfterLease: true",
            GOOD.replace("auth: {tokenFile: /etc/jmp/rpi4-01.token}\n", "")
                .replace("cycleDelay: 3s", "cycleDelay: soon")
        );
        let e = err(&only_power_bad);
        assert!(e.contains("export.power.cycleDelay"), "{e}");
        assert!(!e.contains("no power device"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (from, to, want) in [
            ("jmp.dev/v1alpha1", "jmp.dev/v9", "apiVersion"),
            ("name: rpi4-01", "name: rpi4/01", "metadata.name"),
            ("port: 22", "port: 0", "export.ssh"),
            ("0.0.0.0:7700", "nowhere", "listen \"nowhere\""),
            ("history: 1MiB", "history: 1TiB", "unknown unit"),
            ("board: rpi4", "board: -rpi4", "metadata.labels"),
            (
                "baudrate: 115200}",
                "baudrate: 115200, dataBits: 9}",
                "dataBits 9",
            ),
            (
                "on: [relay, \"1\", \"on\"]",
                "on: []",
                "command.on is empty",
            ),
        ] {
            let e = err(&GOOD.replace(from, to));
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
        let e = err(&GOOD.replace(
            "  ssh:     {type: tcp, host: 192.168.10.2, port: 22}\n",
            "  console: {type: tcp, host: h, port: 1}\n",
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&GOOD.replace("  ssh:  ", "  ../x:"));
        assert!(e.contains("device name"), "{e}");
    }

    #[test]
    fn hooks_relay_and_metrics_are_read_and_checked() {
        let with_ctl = GOOD.replace(
            "auth: {tokenFile: /etc/jmp/rpi4-01.token}",
            "controller: {tokenFile: /etc/jmp/rpi4-01.token, relay: true}\nmetrics: 127.0.0.1:9200\npowerOffAfterLease: true\nhooks:\n  beforeLease: {run: [flash, image.wic], timeout: 10m}\n  afterLease: {run: [reset-board], onFailure: disable}",
        );
        let c = ExporterConfig::parse(&with_ctl).expect("valid");
        assert!(c.controller.as_ref().unwrap().relay);
        assert_eq!(c.history, History::Lease, "the default");
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9200"));
        let c = ExporterConfig::parse(&format!("{with_ctl}\nhistory: client")).expect("valid");
        assert_eq!(c.history, History::Client);
        let e = ExporterConfig::parse(&format!("{with_ctl}\nhistory: forever")).expect_err("bad");
        assert!(e.contains("history") || e.contains("forever"), "{e}");
        assert!(c.power_off_after_lease);
        let h = c.hooks.as_ref().unwrap();
        let b = h.before_lease.as_ref().unwrap();
        assert_eq!(b.run, ["flash", "image.wic"]);
        assert_eq!(b.timeout().as_secs(), 600);
        assert_eq!(b.on_failure, None);
        let a = h.after_lease.as_ref().unwrap();
        assert_eq!(a.timeout(), HOOK_TIMEOUT);
        assert_eq!(a.on_failure, Some(OnFailure::Disable));
        for (from, to, want) in [
            (
                "onFailure: disable",
                "onFailure: endLease",
                "afterLease.onFailure: endLease",
            ),
            (
                "timeout: 10m",
                "timeout: 10m, onFailure: disable",
                "beforeLease.onFailure",
            ),
            (
                "run: [flash, image.wic]",
                "run: []",
                "beforeLease.run is empty",
            ),
            ("timeout: 10m", "timeout: soon", "invalid duration"),
            ("timeout: 10m", "timout: 10m", "unknown field `timout`"),
            ("127.0.0.1:9200", "everywhere", "metrics \"everywhere\""),
        ] {
            let e = err(&with_ctl.replace(from, to));
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
        // Without a controller there are no leases to hook.
        let e = err(&GOOD.replace("export:", "hooks: {afterLease: {run: [x]}}\nexport:"));
        assert!(e.contains("need a controller"), "{e}");
        // Powering off needs something to power off.
        let e = err(&with_ctl.replace(
            "  power:\n    type: power\n    command:\n      on: [relay, \"1\", \"on\"]\n      off: [relay, \"1\", \"off\"]\n    cycleDelay: 3s\n",
            "",
        ));
        assert!(e.contains("no power device"), "{e}");
    }

    #[test]
    fn the_simulated_board_parses_and_matches_the_example_file() {
        let c = ExporterConfig::simulated();
        assert_eq!(c.metadata.name, "sim");
        let kinds: Vec<_> = c.export.0.iter().map(|(_, s)| s.kind()).collect();
        assert_eq!(
            kinds,
            [
                jmp_protocol::Kind::Serial,
                jmp_protocol::Kind::Power,
                jmp_protocol::Kind::Can,
                jmp_protocol::Kind::Storage
            ]
        );
        let example = include_str!("../../examples/local-config.yaml");
        assert!(
            example.contains(SIMULATED),
            "examples/local-config.yaml must carry the built-in simulated board's config"
        );
    }
}
