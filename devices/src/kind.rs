//! The device-kind seam: what a kind is, as one trait implementation per kind folder.
//!
//! A kind ([`DeviceKind`]) brings its config (a [`KindConfig`]: its `type:` names, the real
//! device and its simulated stand-in), its client options (clap `Args`, flattened into `jmp
//! attach` and `jmp shell`), its verb (`jmp power ...`, a clap `Subcommand` flattened into
//! `jmp`), its device requests and answers, its bridge, its one-line status summary, the
//! sandbox it needs on the exporter host ([`Sandbox`], rendered by `jmpd --print-systemd`) and
//! the privileges it needs on the client ([`ClientNeeds`]). `registry.rs` lists the kinds, one
//! line each, and generates every list from these implementations, so nothing else in the
//! workspace names a kind.

use crate::board::Board;
use crate::registry::{DeviceRequest, DeviceResponse};
use crate::{Bridge, BridgeCtx, Driver};
use bytes::Bytes;
use jmp_protocol::codec::{Codec, DecodeError};
use jmp_protocol::{DeviceInfo, Kind, Refusal};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use jmp_transport::BoxFuture;

/// What a verb that must not name the power's kind asks of the board's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    On,
    Off,
    Cycle,
}

/// One device kind. Implemented by a unit struct in the kind's folder.
pub trait DeviceKind: Send + Sync + 'static {
    /// The kind on the wire.
    const KIND: Kind;
    /// Whether the kind's bridge listens on a local address that `--forward LOCAL=DEVICE` may
    /// choose (the address comes to the bridge as [`BridgeCtx::listen`]).
    const LISTENS: bool = false;
    /// How long a device request may take before the client gives up (a guard against a
    /// hang: the exporter enforces each operation's own timeout and answers `timeout`).
    const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
    /// Whether the kind's channels carry bulk data (images, blocks) that must queue behind
    /// interactive channels on the same connection: a channel relayed for a local tool (the
    /// attachment's control socket) gets the bulk stream priority then.
    const BULK: bool = false;

    /// The kind's tables in an exporter config.
    type Config: KindConfig;
    /// `jmp attach` options that belong to the kind ([`NoOptions`] for none).
    type Options: clap::Args + Clone + Debug + Default + Send + Sync + 'static;
    /// The kind's own `jmp` verb ([`NoVerb`] for none).
    type Verb: KindVerb;
    /// The body of a device request (`Request.body`) and of its answer (`Done.body`);
    /// [`NoRequest`] for a kind that takes none.
    type Request: Codec + Serialize + DeserializeOwned + Debug + Clone + Eq + Send + Sync;
    type Response: Codec + Serialize + DeserializeOwned + Debug + Clone + Eq + Send + Sync;

    /// Checks the options before connecting (syntax).
    fn parse_options(_opts: &Self::Options) -> Result<(), OptionError> {
        Ok(())
    }

    /// Checks the options against what the exporter offers (an option naming a device that
    /// is not of this kind).
    fn check_options(
        _opts: &Self::Options,
        _exporter: &str,
        _devices: &[DeviceInfo],
    ) -> Result<(), OptionError> {
        Ok(())
    }

    /// The client side of one device of this kind.
    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        opts: &'a Self::Options,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>>;

    /// A short state for people (`jmp status`) from the device's parameters; `None` when they
    /// do not decode.
    fn summary(params: &[u8]) -> Option<String>;

    /// One line for people about a request's answer (`jmp power cycle`: "power: cycled; power
    /// is on").
    fn describe(device: &str, _req: &Self::Request, _resp: &Self::Response) -> String {
        format!("{device}: done")
    }

    /// The request that switches the board's power as `action` says, for a kind whose devices
    /// switch it: a console's power keys (`jmp console`, `~p`, `~o`, `~f`) ask for it without
    /// naming that kind.
    fn power(_action: PowerAction) -> Option<Self::Request> {
        None
    }

    /// What the bridge of `info` needs on the client to be made as asked (root for a TUN or
    /// vhci). Checked before anything is created, so the user is told what to run.
    fn client_needs(_info: &DeviceInfo, _opts: &Self::Options) -> ClientNeeds {
        ClientNeeds::default()
    }

    /// The kind's tools for coding agents (`jmp mcp`), made fresh for each agent session;
    /// none by default.
    fn agent_tools() -> Vec<Box<dyn crate::agent::AgentTool>> {
        Vec::new()
    }
}

/// A kind's config: the device tables of its `type:` names.
pub trait KindConfig: Debug + Clone + Send + Sync + 'static {
    /// The `type:` names of this kind with an example table of each (every example must parse
    /// and validate: a test iterates them).
    const TYPES: &'static [(&'static str, &'static str)];

    /// Reads a table whose `type:` is `ty`, one of [`KindConfig::TYPES`].
    fn from_yaml(ty: &str, v: serde_norway::Value) -> Result<Self, FieldError>;
    fn validate(&self) -> Result<(), InvalidSpec>;
    /// Starts the driver (background tasks need a tokio runtime).
    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn Driver>;
    /// What the device needs from the exporter host's sandbox beyond the hardened unit.
    fn sandbox(&self, name: &str) -> Sandbox;
    /// The device switches the board's power (`powerOffAfterLease` needs one).
    fn switches_power(&self) -> bool {
        false
    }
}

/// One table of a kind's config: a spec type with its own checks and driver.
pub trait Spec: Debug + Clone + DeserializeOwned + Send + Sync + 'static {
    fn validate(&self) -> Result<(), InvalidSpec> {
        Ok(())
    }
    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn Driver>;
    fn sandbox(&self, _name: &str) -> Sandbox {
        Sandbox::default()
    }
    fn switches_power(&self) -> bool {
        false
    }
}

/// Declares a kind's config enum from its specs and their `type:` names (with one example
/// table each):
///
/// ```ignore
/// config_types! {
///     /// A relay board's channel.
///     pub enum RelayConfig {
///         Board(RelaySpec) = "relay" => "{path: /dev/ttyUSB3, channel: 2}",
///         Sim(RelaySimSpec) = "relay-sim" => "{}",
///     }
/// }
/// ```
#[macro_export]
macro_rules! config_types {
    ($(#[$m:meta])* pub enum $name:ident { $($variant:ident($spec:ty) = $ty:literal => $example:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone)]
        pub enum $name {
            $($variant($spec),)+
        }

        impl $crate::kind::KindConfig for $name {
            const TYPES: &'static [(&'static str, &'static str)] = &[$(($ty, $example)),+];

            fn from_yaml(ty: &str, v: serde_norway::Value) -> Result<Self, $crate::kind::FieldError> {
                match ty {
                    $($ty => Ok($name::$variant($crate::kind::from_value(v)?)),)+
                    other => Err($crate::kind::FieldError {
                        path: "type".into(),
                        message: format!("{other:?} is not a type of this kind"),
                    }),
                }
            }

            fn validate(&self) -> Result<(), $crate::kind::InvalidSpec> {
                match self {
                    $($name::$variant(s) => $crate::kind::Spec::validate(s),)+
                }
            }

            fn start(&self, name: &str, ctx: &$crate::kind::BuildCtx) -> std::sync::Arc<dyn $crate::Driver> {
                match self {
                    $($name::$variant(s) => $crate::kind::Spec::start(s, name, ctx),)+
                }
            }

            fn sandbox(&self, name: &str) -> $crate::kind::Sandbox {
                match self {
                    $($name::$variant(s) => $crate::kind::Spec::sandbox(s, name),)+
                }
            }

            fn switches_power(&self) -> bool {
                match self {
                    $($name::$variant(s) => $crate::kind::Spec::switches_power(s),)+
                }
            }
        }
    };
}

/// What the exporter builds drivers with.
pub struct BuildCtx<'a> {
    pub exporter: &'a str,
    /// The board's shared state (its power, as the power device last set it), followed by
    /// every device of this exporter that depends on it.
    pub board: &'a Board,
    /// Scratch state a device makes for itself (a simulated card at its default path) starts
    /// anew rather than as the last run left it (`jmp local start` without `--keep-card`).
    pub fresh_scratch: bool,
    /// The exporter's state directory, where a device keeps what must outlive a crash of the
    /// exporter (what it changed on the host, to undo at the next start); `None` when there is
    /// none (`jmp local` without `stateDir`).
    pub state_dir: Option<&'a Path>,
}

/// Why a device's table was refused: where in the table (`parity`, `command.on`) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// The field's path inside the device's table; empty for the table itself.
    pub path: String,
    pub message: String,
}

/// A device table that parsed but does not make sense (a zero baud rate, a relative path):
/// what is wrong, for people; the config reader adds the device and its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl From<String> for InvalidSpec {
    fn from(s: String) -> Self {
        InvalidSpec(s)
    }
}

/// A `jmp attach` option that is malformed or names what the exporter does not have: a usage
/// error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

impl From<String> for OptionError {
    fn from(s: String) -> Self {
        OptionError(s)
    }
}

/// Why a device's bridge could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The user's options for it are wrong (a usage error).
    #[error(transparent)]
    Options(#[from] OptionError),
    /// The exporter described the device in a way this client cannot use (its parameters do
    /// not decode, a subnet overlaps this machine's routes).
    #[error("{0}")]
    Exporter(String),
    /// The local endpoint could not be made (a port in use, a mount refused).
    #[error("{0}")]
    Local(String),
}

/// Deserializes a device table, keeping the path of the field that was wrong.
pub fn from_value<T: DeserializeOwned>(v: serde_norway::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| FieldError {
        path: match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        },
        message: e.inner().to_string(),
    })
}

/// What a device needs from the exporter host beyond the hardened unit (systemd/jmpd.service),
/// which grants every exporter AF_INET, AF_INET6 and AF_UNIX, the usual serial port classes
/// (ttyS, ttyUSB, ttyACM), USB character devices, ptys, and writes to its state directory
/// only. `jmpd --print-systemd` renders the union of its devices' needs as a drop-in
/// ([`Sandbox::render`]). What each kind needs was found by running the hardened unit for real
/// (tests/tests/systemd_guest.rs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Why each grant is there, and what the unit cannot know (shown as comments).
    pub notes: Vec<String>,
    /// Address families beyond the unit's (`AF_CAN`, `AF_NETLINK`).
    pub families: Vec<&'static str>,
    /// Capabilities, ambient and in the bounding set (`CAP_NET_ADMIN`).
    pub capabilities: Vec<&'static str>,
    /// System calls the unit's filter refuses (`sched_setaffinity`, in `@resources`).
    pub syscalls: Vec<&'static str>,
    /// Other unit lines (`DeviceAllow=/dev/sdb rw`, `ReadWritePaths=...`, `ProcSubset=all`),
    /// each once.
    pub settings: Vec<String>,
}

impl Sandbox {
    pub fn note(&mut self, s: String) {
        self.notes.push(s);
    }
    pub fn family(&mut self, f: &'static str) {
        if !self.families.contains(&f) {
            self.families.push(f);
        }
    }
    pub fn cap(&mut self, c: &'static str) {
        if !self.capabilities.contains(&c) {
            self.capabilities.push(c);
        }
    }
    pub fn syscall(&mut self, c: &'static str) {
        if !self.syscalls.contains(&c) {
            self.syscalls.push(c);
        }
    }
    pub fn set(&mut self, s: String) {
        if !self.settings.contains(&s) {
            self.settings.push(s);
        }
    }

    /// Adds `other`'s needs to these.
    pub fn merge(&mut self, other: Sandbox) {
        self.notes.extend(other.notes);
        other.families.into_iter().for_each(|f| self.family(f));
        other.capabilities.into_iter().for_each(|c| self.cap(c));
        other.syscalls.into_iter().for_each(|c| self.syscall(c));
        other.settings.into_iter().for_each(|s| self.set(s));
    }

    /// A path as a unit file may hold it, or a note why not: a config is not trusted to add
    /// lines (a newline) or systemd specifiers (`%`) to the unit.
    pub fn unit_path(&mut self, name: &str, path: &Path) -> Option<String> {
        let p = path.to_str().unwrap_or_default();
        let ok = p.starts_with('/')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@,=~".contains(&b));
        if !ok {
            self.note(format!(
                "{name}: {:?} cannot be written into a unit file: grant it by hand",
                path.display().to_string()
            ));
        }
        ok.then(|| p.to_string())
    }

    /// A tty the device opens at `path` (a serial port, an slcan adapter): the unit allows
    /// ttyS*, ttyUSB*, ttyACM* and ptys; any other device node by its path (a by-id link is
    /// resolved by systemd when the unit starts).
    pub fn tty(name: &str, path: &Path, what: &str) -> Sandbox {
        let mut s = Sandbox::default();
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let base = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let usual = ["ttyS", "ttyUSB", "ttyACM"].iter().any(|c| {
            base.strip_prefix(c)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        if usual {
            s.note(format!(
                "{name}: {} is a {what} the unit already allows",
                real.display()
            ));
        } else if let Some(p) = s.unit_path(name, path) {
            s.note(format!("{name}: {what} {p}"));
            s.set(format!("DeviceAllow={p} rw"));
        }
        s
    }

    /// A medium at `path`: a block device by its path (DevicePolicy=closed); an image file is
    /// readable under ProtectSystem=strict, writable only if listed, and not there at all
    /// under a home directory (ProtectHome=yes) or in /tmp (PrivateTmp=yes). `made`: jmpd
    /// creates the image (a simulated card), so its directory must be writable.
    pub fn medium(name: &str, path: &Path, writable: bool, made: bool) -> Sandbox {
        use std::os::unix::fs::FileTypeExt;
        let mut s = Sandbox::default();
        let Some(p) = s.unit_path(name, path) else {
            return s;
        };
        let device = match std::fs::metadata(path) {
            Ok(m) => m.file_type().is_block_device() || m.file_type().is_char_device(),
            Err(_) => path.starts_with("/dev"),
        };
        if device {
            s.note(format!("{name}: block device {p}"));
            s.set(format!(
                "DeviceAllow={p} {}",
                if writable { "rw" } else { "r" }
            ));
            return s;
        }
        s.note(format!(
            "{name}: image {p}{}",
            if writable {
                ", writable"
            } else {
                ", read-only"
            }
        ));
        if ["/home", "/root", "/run/user"]
            .iter()
            .any(|d| path.starts_with(d))
        {
            s.note(format!(
                "{name}: ProtectHome=yes hides {p}: better move it out of the home directory"
            ));
            s.set("ProtectHome=read-only".into());
        }
        if ["/tmp", "/var/tmp"].iter().any(|d| path.starts_with(d)) {
            s.note(format!(
                "{name}: PrivateTmp=yes gives jmpd its own {p}: better move it out of /tmp"
            ));
            s.set("PrivateTmp=no".into());
        }
        if made {
            // `-`: the directory may not be there yet (the image's maker creates it).
            if let Some(dir) = path.parent().and_then(|d| d.to_str()) {
                s.set(format!("ReadWritePaths=-{dir}"));
            }
        } else if writable {
            s.set(format!("ReadWritePaths={p}"));
        }
        s
    }

    /// The unit lines: notes as comments, then each allow list once (systemd adds a repeated
    /// allow list to the unit's), then the other settings.
    pub fn render(&self) -> Vec<String> {
        let mut out: Vec<String> = self.notes.iter().map(|n| format!("# {n}")).collect();
        let join = |v: &[&str]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.join(" ")
        };
        if !self.families.is_empty() {
            out.push(format!("RestrictAddressFamilies={}", join(&self.families)));
        }
        if !self.capabilities.is_empty() {
            out.push(format!("AmbientCapabilities={}", join(&self.capabilities)));
            out.push(format!(
                "CapabilityBoundingSet={}",
                join(&self.capabilities)
            ));
        }
        if !self.syscalls.is_empty() {
            out.push(format!("SystemCallFilter={}", join(&self.syscalls)));
        }
        out.extend(self.settings.iter().cloned());
        out
    }
}

/// What a kind's bridge needs on the client machine.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientNeeds {
    /// The bridge needs these capabilities (`CAP_NET_ADMIN` for a TUN); without them the
    /// device is listed, not bridged, and `why` is shown.
    pub capabilities: Vec<&'static str>,
    /// What to tell a user who lacks them (what to run instead).
    pub why: String,
}

impl ClientNeeds {
    /// What is missing on this machine for these needs, said for people; `None` when nothing.
    pub fn unmet(&self) -> Option<String> {
        let missing: Vec<&str> = self
            .capabilities
            .iter()
            .copied()
            .filter(|c| {
                !c.parse::<caps::Capability>().is_ok_and(|cap| {
                    caps::has_cap(None, caps::CapSet::Effective, cap).unwrap_or(false)
                })
            })
            .collect();
        if missing.is_empty() {
            None
        } else {
            Some(format!("this needs {}: {}", missing.join(", "), self.why))
        }
    }
}

/// A kind without `jmp attach` options. No argument group: several kinds flatten it.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(skip)]
pub struct NoOptions {}

/// A kind's `jmp` verb: a clap subcommand (one variant, named after the verb) run against the
/// board its target names, through what `jmp` lends it ([`VerbHost`]).
pub trait KindVerb: clap::Subcommand + Debug + Send + 'static {
    fn run(self, host: &dyn VerbHost) -> BoxFuture<'_, Result<(), VerbError>>;
}

/// A kind without a verb.
#[derive(clap::Subcommand, Debug)]
pub enum NoVerb {}

impl KindVerb for NoVerb {
    fn run(self, _host: &dyn VerbHost) -> BoxFuture<'_, Result<(), VerbError>> {
        match self {}
    }
}

/// A kind that takes no device requests: no value of it exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoRequest {}

impl Codec for NoRequest {
    fn encode(&self, _buf: &mut bytes::BytesMut) {
        match *self {}
    }
    fn decode(_buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Err(DecodeError::Invalid {
            field: "request of a kind that takes none",
            value: 0,
        })
    }
    fn encoded_len(&self) -> usize {
        match *self {}
    }
}

/// Which board a device command goes to: a running attachment (by its exporter's name, or the
/// only one), a lease (`--lease`), or an exporter reached directly (`--exporter HOST:PORT
/// --token-file F`). Every kind's verb carries one.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Target {
    /// The exporter: the name of a running attachment's exporter (inside `jmp shell`:
    /// JMP_EXPORTER), or with --token-file its address HOST:PORT (direct mode, its own
    /// connection).
    #[arg(long, env = "JMP_EXPORTER")]
    pub exporter: Option<String>,
    /// Direct mode: file holding the exporter's token.
    #[arg(long, env = "JMP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Direct mode: the exporter's token itself (CI secrets in the environment).
    #[arg(
        long,
        env = "JMP_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Direct mode: the exporter's certificate fingerprint (default: known_exporters).
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// A lease from the controller (default: the running attachment, else your only lease).
    #[arg(long, env = "JMP_LEASE")]
    pub lease: Option<String>,
    /// Client config to use (default: the current one, see `jmp config client use`).
    #[arg(long, env = "JMP_CLIENT")]
    pub client: Option<String>,
    /// How to reach a lease's exporter: auto (straight to it and through the controller's
    /// relay at once, if it takes relayed sessions), direct, or relay.
    #[arg(long, env = "JMP_VIA", value_enum, default_value_t = ViaChoice::Auto)]
    pub via: ViaChoice,
    /// Output: a line for people, or the typed answer as JSON.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `--via` of the kinds' verbs (as `jmp attach --via`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ViaChoice {
    #[default]
    Auto,
    Direct,
    Relay,
}

/// How a command prints its answer.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// A verb's failure: the exit code of the one table (`jmp_protocol::exit`) and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct VerbError {
    pub code: i32,
    pub message: String,
}

impl VerbError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        VerbError {
            code,
            message: message.into(),
        }
    }
}

impl From<Refusal> for VerbError {
    fn from(r: Refusal) -> Self {
        VerbError::new(r.code.exit_code(), r.reason)
    }
}

/// What `jmp` lends a kind's verb: the board a [`Target`] names, through the running
/// attachment (which has the connection) or on a connection of the verb's own.
pub trait VerbHost: Send + Sync {
    /// Sends a device request to `device` (default: the board's only device of the request's
    /// kind) and waits for the answer: the device's name, the answer and one line for people.
    fn request<'a>(
        &'a self,
        target: &'a Target,
        device: Option<String>,
        req: DeviceRequest,
    ) -> BoxFuture<'a, Result<(String, DeviceResponse, String), VerbError>>;

    /// Opens a stream channel to `device` (default: the only one of `kind`) for bulk work,
    /// with the kind's open parameters (`params`, encoded; empty for a kind that takes none).
    fn channel_with<'a>(
        &'a self,
        target: &'a Target,
        kind: Kind,
        device: Option<String>,
        params: Bytes,
    ) -> BoxFuture<'a, Result<VerbChannel, VerbError>>;

    /// [`VerbHost::channel_with`] without open parameters.
    fn channel<'a>(
        &'a self,
        target: &'a Target,
        kind: Kind,
        device: Option<String>,
    ) -> BoxFuture<'a, Result<VerbChannel, VerbError>> {
        self.channel_with(target, kind, device, Bytes::new())
    }

    /// Waits until every local attachment of the channel's exporter that caches `device`'s
    /// contents has caught up with `generation` (see [`crate::CacheState`]); says which one
    /// could not.
    fn settle<'a>(
        &'a self,
        ch: &'a ChannelOrigin,
        generation: u64,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Writes the answer to stdout (a closed pipe ends the program quietly, as Unix tools do).
    fn print(&self, text: &str) -> Result<(), VerbError>;

    /// The board's devices and their local endpoints as `jmp status` shows them, one device a
    /// line (the console's devices key). Default: a host that has no such list says so.
    fn local_devices<'a>(
        &'a self,
        _target: &'a Target,
    ) -> BoxFuture<'a, Result<String, VerbError>> {
        Box::pin(async {
            Err(VerbError::new(
                jmp_protocol::exit::UNAVAILABLE,
                "this host lists no local devices",
            ))
        })
    }

    /// How far a long operation got (`what`: "flashing"; bytes `done` of `total`), for a host
    /// that shows it somewhere else than the terminal the verb draws its bar on (an agent's
    /// progress notifications). Called often: the host throttles. Default: nothing.
    fn progress(&self, _what: &str, _done: u64, _total: Option<u64>) {}
}

/// Where a verb's answer text and progress go: the part of a [`VerbHost`] in which hosts
/// that reach the board the same way differ (`jmp mcp` sends progress to its agent, `jmp web`
/// to its tabs).
pub trait VerbOutput: Send + Sync {
    /// As [`VerbHost::print`].
    fn print(&self, text: &str) -> Result<(), VerbError>;
    /// As [`VerbHost::progress`].
    fn progress(&self, _what: &str, _done: u64, _total: Option<u64>) {}
}

/// The verb host `base`, its answer text and progress going to `out` instead.
pub struct WithOutput<B, O> {
    pub base: B,
    pub out: O,
}

impl<B: VerbHost, O: VerbOutput> VerbHost for WithOutput<B, O> {
    fn request<'a>(
        &'a self,
        target: &'a Target,
        device: Option<String>,
        req: DeviceRequest,
    ) -> BoxFuture<'a, Result<(String, DeviceResponse, String), VerbError>> {
        self.base.request(target, device, req)
    }

    fn channel_with<'a>(
        &'a self,
        target: &'a Target,
        kind: Kind,
        device: Option<String>,
        params: Bytes,
    ) -> BoxFuture<'a, Result<VerbChannel, VerbError>> {
        self.base.channel_with(target, kind, device, params)
    }

    fn settle<'a>(
        &'a self,
        ch: &'a ChannelOrigin,
        generation: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.base.settle(ch, generation)
    }

    fn print(&self, text: &str) -> Result<(), VerbError> {
        self.out.print(text)
    }

    fn progress(&self, what: &str, done: u64, total: Option<u64>) {
        self.out.progress(what, done, total)
    }
}

/// Whose device a verb's channel reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOrigin {
    pub device: String,
    /// The exporter's name and certificate fingerprint, as attachments list them.
    pub exporter: String,
    pub fingerprint: String,
    /// The exporter's instance, when known.
    pub instance: Option<u64>,
}

/// How a verb's channel is carried.
pub enum VerbStream {
    /// A stream channel of the verb's own connection.
    Pipe(jmp_transport::PipeTx, jmp_transport::PipeRx),
    /// Relayed through the running attachment's control socket.
    Socket(
        tokio::net::unix::OwnedWriteHalf,
        tokio::net::unix::OwnedReadHalf,
    ),
}

/// A stream channel lent to a verb, with the device's parameters as of its open.
pub struct VerbChannel {
    pub origin: ChannelOrigin,
    /// The device's parameters (`DeviceInfo.params`).
    pub params: Bytes,
    pub stream: VerbStream,
    /// Ends the verb's own connection (a `Bye`, then waiting for the peer to read it); `None`
    /// for a channel through the attachment.
    pub close: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}
