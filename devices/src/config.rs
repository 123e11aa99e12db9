//! The exporter's configuration (YAML, Kubernetes-like, as Jumpstarter users know it).
//!
//! Unknown fields are errors naming the field and its line; every value is validated before
//! anything is opened or bound, so `jmpd --check-config` catches what a start would fail on.
//! Secrets are never in this file: the token lives in `auth.tokenFile`.

use jmp_protocol::selector::validate_label;
use jmp_protocol::{FlowControl, LineSettings, Parity};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const API_VERSION: &str = "jmp.dev/v1alpha1";
pub const DEFAULT_PORT: u16 = 7700;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExporterConfig {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the exporter keeps its TLS identity. Default: /var/lib/jmp/<name> as root, else
    /// $XDG_DATA_HOME/jmp/exporters/<name>.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub auth: Option<Auth>,
    /// Register with a controller, which leases this exporter out; clients then present lease
    /// tokens. May be combined with `auth` (a direct token for the lab's own use).
    #[serde(default)]
    pub controller: Option<ControllerSection>,
    pub export: Export,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControllerSection {
    /// The exporter credential (`jmp admin create exporter NAME > FILE`). It also says where
    /// the controller is and how to trust it.
    pub token_file: PathBuf,
    /// Override the controller's `host:port` named in the credential.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `host:port` clients reach this exporter at (default: `listen`, with this host's name
    /// when listening on all addresses).
    #[serde(default)]
    pub address: Option<String>,
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

impl<'de> Deserialize<'de> for Export {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Export;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of device name to device")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Export, A::Error> {
                let mut out: Vec<(String, DeviceSpec)> = Vec::new();
                while let Some((name, spec)) = map.next_entry::<String, DeviceSpec>()? {
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!(
                            "device {name:?} is listed twice"
                        )));
                    }
                    out.push((name, spec));
                }
                Ok(Export(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceSpec {
    /// A real serial port on the exporter host.
    #[serde(rename_all = "camelCase")]
    Serial {
        path: String,
        #[serde(default = "default_baud")]
        baudrate: u32,
        #[serde(default = "default_data_bits")]
        data_bits: u8,
        #[serde(default)]
        parity: ParitySpec,
        #[serde(default = "default_stop_bits")]
        stop_bits: u8,
        #[serde(default)]
        flow_control: FlowSpec,
        /// Console history kept for late or returning clients (bytes, or "64KiB", "1MiB").
        #[serde(default)]
        history: Option<ByteSize>,
    },
    /// The built-in simulated board console.
    SimConsole {
        #[serde(default)]
        hostname: Option<String>,
        #[serde(default)]
        history: Option<ByteSize>,
    },
    /// A TCP port as seen from the exporter (the board's SSH, a debug server).
    Tcp { host: String, port: u16 },
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ParitySpec {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FlowSpec {
    #[default]
    None,
    #[serde(alias = "xonxoff")]
    Software,
    #[serde(alias = "rtscts")]
    Hardware,
}

/// A size in bytes: `65536`, `"64KiB"`, `"1MiB"`, `"64k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number of bytes like 65536 or 64KiB")
        })?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1024,
            "m" | "mb" | "mib" => 1024 * 1024,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {unit:?} (use KiB or MiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

pub const MAX_HISTORY: u64 = 64 * 1024 * 1024;

impl DeviceSpec {
    pub fn line_settings(&self) -> Option<LineSettings> {
        match self {
            DeviceSpec::Serial {
                baudrate,
                data_bits,
                parity,
                stop_bits,
                flow_control,
                ..
            } => Some(LineSettings {
                baud: *baudrate,
                data_bits: *data_bits,
                parity: match parity {
                    ParitySpec::None => Parity::None,
                    ParitySpec::Odd => Parity::Odd,
                    ParitySpec::Even => Parity::Even,
                },
                stop_bits: *stop_bits,
                flow: match flow_control {
                    FlowSpec::None => FlowControl::None,
                    FlowSpec::Software => FlowControl::Software,
                    FlowSpec::Hardware => FlowControl::Hardware,
                },
            }),
            _ => None,
        }
    }

    /// The kind a client sees (`serial` for both real and simulated consoles).
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Serial { .. } | DeviceSpec::SimConsole { .. } => "serial",
            DeviceSpec::Tcp { .. } => "tcp",
        }
    }

    pub fn history_bytes(&self) -> usize {
        match self {
            DeviceSpec::Serial { history, .. } | DeviceSpec::SimConsole { history, .. } => history
                .map(|h| h.0 as usize)
                .unwrap_or(crate::serial::history::DEFAULT_CAPACITY),
            DeviceSpec::Tcp { .. } => 0,
        }
    }
}

/// Names used in paths (`/dev/jmp/<exporter>/<device>`): no slashes, no dot-dirs, no spaces.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is invalid: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

impl ExporterConfig {
    pub fn load(path: &Path) -> Result<ExporterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<ExporterConfig, String> {
        let c: ExporterConfig = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.api_version != API_VERSION {
            return Err(format!(
                "apiVersion {:?} is not supported (expected {API_VERSION:?})",
                self.api_version
            ));
        }
        if self.kind != "ExporterConfig" {
            return Err(format!("kind {:?} is not ExporterConfig", self.kind));
        }
        validate_name("metadata.name", &self.metadata.name)?;
        for (k, v) in &self.metadata.labels {
            validate_label(k, v).map_err(|e| format!("metadata.labels: {e}"))?;
        }
        self.listen_addr()?;
        if self.export.0.is_empty() {
            return Err("export: no devices listed".into());
        }
        for (name, spec) in &self.export.0 {
            validate_name("export: device name", name)?;
            let err = |m: String| format!("export.{name}: {m}");
            match spec {
                DeviceSpec::Serial {
                    path,
                    baudrate,
                    data_bits,
                    stop_bits,
                    ..
                } => {
                    if path.trim().is_empty() {
                        return Err(err("path is empty".into()));
                    }
                    if *baudrate == 0 {
                        return Err(err("baudrate must be positive".into()));
                    }
                    if !(5..=8).contains(data_bits) {
                        return Err(err(format!("dataBits {data_bits} is not 5, 6, 7 or 8")));
                    }
                    if !(1..=2).contains(stop_bits) {
                        return Err(err(format!("stopBits {stop_bits} is not 1 or 2")));
                    }
                }
                DeviceSpec::SimConsole { hostname, .. } => {
                    if let Some(h) = hostname {
                        validate_name("hostname", h).map_err(err)?;
                    }
                }
                DeviceSpec::Tcp { host, port } => {
                    if host.trim().is_empty() {
                        return Err(err("host is empty".into()));
                    }
                    if *port == 0 {
                        return Err(err("port 0 is not a port".into()));
                    }
                }
            }
            if let DeviceSpec::Serial {
                history: Some(h), ..
            }
            | DeviceSpec::SimConsole {
                history: Some(h), ..
            } = spec
            {
                if h.0 == 0 || h.0 > MAX_HISTORY {
                    return Err(err(format!(
                        "history {} must be between 1 byte and 64MiB",
                        h.0
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| {
            format!(
                "listen {:?} is not an address like 0.0.0.0:7700",
                self.listen
            )
        })
    }

    /// The built-in simulated board `jmp local start` runs without a config.
    pub fn simulated() -> ExporterConfig {
        ExporterConfig {
            api_version: API_VERSION.into(),
            kind: "ExporterConfig".into(),
            metadata: Metadata {
                name: "sim".into(),
                labels: BTreeMap::from([("board".to_string(), "sim".to_string())]),
            },
            listen: "127.0.0.1:0".into(),
            state_dir: None,
            auth: None,
            controller: None,
            export: Export(vec![(
                "console".into(),
                DeviceSpec::SimConsole {
                    hostname: Some("jmp-sim".into()),
                    history: None,
                },
            )]),
        }
    }
}

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
"#;

    #[test]
    fn the_design_example_parses_in_order() {
        let c = ExporterConfig::parse(GOOD).expect("valid");
        let names: Vec<_> = c.export.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["console", "ssh", "sim"]);
        assert_eq!(c.export.0[2].1.history_bytes(), 1 << 20);
        assert_eq!(
            c.export.0[0].1.line_settings().map(|l| l.baud),
            Some(115_200)
        );
        assert_eq!(c.metadata.labels["team"], "platform");
    }

    fn err(yaml: &str) -> String {
        ExporterConfig::parse(yaml).expect_err("must be rejected")
    }

    #[test]
    fn unknown_fields_are_named_with_their_line() {
        let e = err(&GOOD.replace("baudrate: 115200", "baud: 115200"));
        assert!(e.contains("unknown field `baud`"), "{e}");
        assert!(e.contains("line 10"), "{e}");
        let e = err(&GOOD.replace("listen:", "lisen:"));
        assert!(e.contains("unknown field `lisen`"), "{e}");
        let e = err(&GOOD.replace("type: tcp", "type: tpc"));
        assert!(e.contains("unknown variant `tpc`"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (from, to, want) in [
            ("jmp.dev/v1alpha1", "jmp.dev/v9", "apiVersion"),
            ("name: rpi4-01", "name: rpi4/01", "metadata.name"),
            ("port: 22", "port: 0", "export.ssh: port 0"),
            ("0.0.0.0:7700", "nowhere", "listen \"nowhere\""),
            ("history: 1MiB", "history: 1GiB", "unknown unit"),
            ("board: rpi4", "board: -rpi4", "metadata.labels"),
            (
                "baudrate: 115200}",
                "baudrate: 115200, dataBits: 9}",
                "dataBits 9",
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
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("65536"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("64KiB"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("2 MiB"), Ok(ByteSize(2 << 20)));
        assert!(ByteSize::parse("x").is_err());
    }
}
