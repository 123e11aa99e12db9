//! The command line, as clap definitions only: what each verb takes. What the verbs do lives in
//! the modules named after their jobs (attach, local, device, verbs, state).

use crate::controller as ctl;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "jmp",
    version,
    about = "jmp: a remote lab board as local devices",
    after_help = "Environment:\n  \
    JMP_CLIENT         client config to use (as --client)\n  \
    JMP_CLIENT_CONFIG  a client config file to use instead of ~/.config/jmp/clients/\n  \
    JMP_LEASE          the lease a command means when none is named (CI: bind a job to its lease)\n  \
    JMP_TOKEN          direct mode: the exporter's token itself (as --token-file, without a file)\n  \
    JMP_TOKEN_FILE     direct mode: the exporter's token file\n  \
    JMP_ADMIN_CONFIG   the admin credential for `jmp admin`\n  \
    JMP_RUNTIME_DIR    where attachments keep state files and control sockets\n  \
    JMP_DEV_DIR        where serial devices appear (as --dev-dir)\n  \
    JMP_JOB            the CI job a lease is tagged with (default: the CI system's job id)\n  \
    JMP_CONFIG_DIR     where client configs and known_exporters live\n  \
    JMP_LOG            log level (error, warn, info, debug, trace; default info)\n\n\
Exit codes: 0 ok, 1 other failure, 2 usage, 3 unauthorized, 4 busy, 5 not found or\n\
unavailable, 6 lease ended, 7 replaced, 8 device operation failed, 9 forward target\n\
unreachable, 10 forbidden by policy, 130 interrupted."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Attach an exporter: its serial consoles become local ptys, its TCP ports local ports.
    Attach(AttachArgs),
    /// Run a command (default: your shell) with a board attached: the devices' local endpoints
    /// are in its environment (JMP_DEV_<DEVICE>=path or address), and `jmp power`/`jmp serial`
    /// inside it mean this board. Attaches first (as `jmp attach` with the same options) unless
    /// that board is already attached; detaches afterwards if it attached. Exits with the
    /// command's status.
    Shell(ShellArgs),
    /// Stop a background attachment (`jmp attach -d`).
    Detach {
        /// Exporter name (default: the only attachment).
        exporter: Option<String>,
        /// Stop all attachments.
        #[arg(long)]
        all: bool,
    },
    /// Run a board on this machine: the built-in simulated board, or an exporter config.
    Local {
        #[command(subcommand)]
        cmd: LocalCmd,
    },
    /// The device kinds' own verbs (`jmp power`, `jmp serial`, `jmp storage`).
    #[command(flatten)]
    Device(jmp_devices::registry::Verbs),
    /// List attachments on this machine.
    Status {
        /// A table for people, or JSON (one array of attachments) for scripts.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Client configurations (which controller, as whom).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Create a lease.
    Create {
        #[command(subcommand)]
        what: CreateCmd,
    },
    /// List leases or exporters.
    Get {
        #[command(subcommand)]
        what: GetCmd,
    },
    /// Change a lease's duration.
    Update {
        #[command(subcommand)]
        what: UpdateCmd,
    },
    /// Release leases.
    Delete {
        #[command(subcommand)]
        what: DeleteCmd,
    },
    /// Let another client attach to your leased board beside you: it watches the console
    /// (read-only) unless --control, which also lets it type, power and write storage.
    Share {
        #[command(subcommand)]
        what: ShareCmd,
    },
    /// End a share: the colleague's sessions are detached, its tokens refused.
    Unshare {
        #[command(subcommand)]
        what: UnshareCmd,
    },
    /// Identities: create, list and delete clients and exporters (needs the admin credential).
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
        /// Admin credential (default: ~/.config/jmp/admin.yaml, then
        /// /var/lib/jmp-controller/admin.yaml).
        #[arg(long, env = "JMP_ADMIN_CONFIG", global = true)]
        admin_config: Option<PathBuf>,
    },
    /// The client's own credential.
    Auth {
        #[command(subcommand)]
        cmd: AuthCmd,
    },
    /// Exporter fingerprints this machine trusts (~/.config/jmp/known_exporters).
    Trust {
        #[command(subcommand)]
        cmd: TrustCmd,
    },
    /// A Model Context Protocol server on stdin/stdout for coding agents: tools to lease,
    /// attach and drive a board (power, console, CAN, flash) with this client's credential.
    Mcp(McpArgs),
    /// The board page: serves a running attachment's console, devices, power, CAN and
    /// flashing to a browser on a local address; prints its URL (with its token) first.
    Web(WebArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct WebArgs {
    /// Where to serve (loopback: the token of the printed URL is what guards the board).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(crate) listen: std::net::SocketAddr,
    /// The running attachment's exporter (default: the only attachment).
    #[arg(long, env = "JMP_EXPORTER")]
    pub(crate) exporter: Option<String>,
    /// The running attachment of this lease.
    #[arg(long, conflicts_with = "exporter")]
    pub(crate) lease: Option<String>,
    /// The largest image the page may upload for flashing, in MiB.
    #[arg(long, default_value_t = 64 * 1024)]
    pub(crate) max_upload_mib: u64,
    /// The directory whose images the page may flash by their path (absolute, or relative to
    /// it). Without it flashing by a path is off: the page must not make jmp read any file you
    /// can read (and the working directory may well hold credentials).
    #[arg(long, value_name = "DIR")]
    pub(crate) image_dir: Option<std::path::PathBuf>,
    /// Instead of a board page: print a sign-in link to the controller's lab dashboard for
    /// the client (it works once, within a minute; the dashboard shows what this client may
    /// see). The controller must serve one (`jmp-controller --web ADDR`).
    #[arg(long)]
    pub(crate) lab: bool,
    #[command(flatten)]
    pub(crate) client: ClientSel,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct McpArgs {
    /// Client config to lease with (default: the current one, see `jmp config client use`).
    #[arg(long, env = "JMP_CLIENT")]
    pub(crate) client: Option<String>,
    /// Name the exporter's log and a busy board's message show for this session's attachment
    /// (default: "USER@HOST via jmp mcp (AGENT)", the agent's name as its MCP client gives it).
    #[arg(long)]
    pub(crate) name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TrustCmd {
    /// List trusted exporters and their fingerprints.
    List,
    /// Trust this fingerprint for an exporter (after checking it: jmpd prints it at start).
    Pin {
        /// The exporter's address, HOST[:PORT].
        addr: String,
        /// sha256:... as jmpd prints it.
        fingerprint: String,
    },
    /// Forget an exporter's fingerprint (the next attach trusts what it sees, and says so).
    Forget {
        /// The exporter's address, HOST[:PORT].
        addr: String,
    },
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ClientSel {
    /// Client config to use (default: the current one, see `jmp config client use`).
    #[arg(long, env = "JMP_CLIENT")]
    pub(crate) client: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCmd {
    /// Manage client configs under ~/.config/jmp/clients/.
    Client {
        #[command(subcommand)]
        cmd: ConfigClientCmd,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ConfigClientCmd {
    /// Create (or replace) a client config from a file (`jmp admin create client --out`) or
    /// from its parts.
    Create {
        /// Name of the client config (~/.config/jmp/clients/NAME.yaml).
        name: String,
        /// A client config file to import.
        #[arg(long, conflicts_with_all = ["endpoint", "fingerprint", "token"])]
        from: Option<PathBuf>,
        /// The controller's HOST:PORT (with --fingerprint and --token, instead of --from).
        #[arg(long, requires_all = ["fingerprint", "token"])]
        endpoint: Option<String>,
        /// The controller's certificate fingerprint (sha256:...).
        #[arg(long)]
        fingerprint: Option<String>,
        /// The client credential (a secret: prefer --from with a 0600 file).
        #[arg(long)]
        token: Option<String>,
        /// Do not make it the current client.
        #[arg(long)]
        no_use: bool,
    },
    /// Make a client config the current one.
    Use {
        /// Name of the client config.
        name: String,
    },
    /// List client configs (the current one marked with *).
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
    /// Delete a client config.
    Delete {
        /// Name of the client config.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CreateCmd {
    /// Lease an exporter chosen by label selector (or by name); prints the lease's name.
    Lease {
        /// Label selector (Kubernetes syntax); repeated selectors must all match.
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        /// A specific exporter by name.
        #[arg(short = 'n', long = "name")]
        exporter: Option<String>,
        /// How long to hold it, e.g. 30m, 2h (with --auto-extend: each step).
        #[arg(long, default_value = "30m")]
        duration: String,
        /// End the lease once nothing has used it for this long (no attachment connected to
        /// its exporter, no jmp command naming it), e.g. 15m; `none`: only at its end, if the
        /// client's policy allows. Default: the controller's (10m unless its admin changed it).
        #[arg(long, value_name = "DURATION|none")]
        idle_timeout: Option<String>,
        /// Extend the lease while it is in use, by --duration at a time, up to --max-duration;
        /// one not in use is not extended.
        #[arg(long)]
        auto_extend: bool,
        /// With --auto-extend: the hard limit, counted from the lease's begin, e.g. 8h
        /// (default: the longest lease the client's policy allows).
        #[arg(long, requires = "auto_extend")]
        max_duration: Option<String>,
        /// Not before this time (RFC 3339, e.g. 2026-11-25T14:00:00Z).
        #[arg(long)]
        begin_time: Option<String>,
        /// Wait in the queue up to this many seconds if nothing is free (0: fail at once).
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Output: the lease's name (default), a table, JSON or YAML.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Name)]
        output: ctl::Out,
        /// Use an active lease this CI job (outside CI: this client, untagged) already holds on
        /// a matching exporter instead of queueing behind it; JSON output then says
        /// `"reused": true`. For test runners started after the pipeline leased the board.
        #[arg(long)]
        reuse: bool,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum GetCmd {
    /// Your leases (and waiting requests); -a: everyone's.
    #[command(alias = "lease")]
    Leases {
        /// Everyone's leases, not only yours.
        #[arg(short, long)]
        all: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
    /// Exporters you may lease.
    #[command(alias = "exporter")]
    Exporters {
        /// Only exporters matching this label selector (repeatable: all must match).
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        /// Extra columns: leases, online.
        #[arg(long, value_delimiter = ',')]
        with: Vec<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum UpdateCmd {
    /// Set a lease's total duration (from its start) or extend it.
    #[command(alias = "leases")]
    Lease {
        /// The lease.
        name: String,
        /// The lease's new total duration, counted from its start (e.g. 2h).
        #[arg(long, conflicts_with = "extend", required_unless_present = "extend")]
        duration: Option<String>,
        /// Move the lease's end this much later (e.g. 30m).
        #[arg(long)]
        extend: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ShareCmd {
    /// Share a lease with another client (it attaches with `jmp attach --lease NAME` under its
    /// own credential; its own policy must allow the exporter).
    #[command(alias = "leases")]
    Lease {
        /// The lease.
        name: String,
        /// The client to share it with.
        #[arg(long = "with", value_name = "CLIENT")]
        with: String,
        /// When the share ends: a time (RFC 3339, e.g. 2026-12-08T17:00:00Z) or a duration
        /// from now (e.g. 30m). Default: with the lease.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Also let it type on the console and use power and storage writes.
        #[arg(long)]
        control: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum UnshareCmd {
    /// End a lease's share with another client.
    #[command(alias = "leases")]
    Lease {
        /// The lease.
        name: String,
        /// The client it is shared with.
        #[arg(long = "with", value_name = "CLIENT")]
        with: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum DeleteCmd {
    /// Release leases by name (default: your only lease); --all: all of yours.
    #[command(alias = "leases")]
    Lease {
        /// The leases to release (default: your only lease).
        names: Vec<String>,
        /// Release all of your leases.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        #[command(flatten)]
        client: ClientSel,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminCmd {
    /// Create a client or exporter identity.
    Create {
        #[command(subcommand)]
        what: AdminCreate,
    },
    /// Change a client's policy or labels (what is not given stays); a narrowed policy ends
    /// its leases, reservations and waiting requests on exporters it no longer allows.
    Update {
        #[command(subcommand)]
        what: AdminUpdate,
    },
    /// List clients or exporters.
    Get {
        #[command(subcommand)]
        what: AdminGet,
    },
    /// Delete a client or exporter (its leases end, its credential is revoked).
    Delete {
        #[command(subcommand)]
        what: AdminDelete,
    },
    /// Take an exporter out of service (its lease ends; it is not leased until enabled).
    Disable {
        /// The word `exporter`.
        kind: ExporterWord,
        /// The exporter.
        name: String,
    },
    /// Put an exporter back into service.
    Enable {
        /// The word `exporter`.
        kind: ExporterWord,
        /// The exporter.
        name: String,
    },
    /// Leased time over a window, per team, client, exporter or lease (chargeback), from the
    /// controller's history of ended leases and the live ones; a lease across the window's
    /// edge counts only its part inside.
    Usage {
        /// Window start: a date (2026-11-01, UTC midnight), an RFC 3339 time, or a duration
        /// ago (30d).
        #[arg(long)]
        since: String,
        /// Window end (exclusive), in the same forms (default: now).
        #[arg(long)]
        until: Option<String>,
        /// What a row is.
        #[arg(long, value_enum, default_value_t = UsageByArg::Team)]
        by: UsageByArg,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = UsageOut::Table)]
        output: UsageOut,
    },
    /// Accept a new TLS identity for an exporter whose host was re-imaged: its next
    /// registration binds the fingerprint it presents (until then one registering with a
    /// different fingerprint than the bound one is refused).
    Rebind {
        /// The word `exporter`.
        kind: ExporterWord,
        /// The exporter.
        name: String,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub(crate) enum UsageByArg {
    Team,
    Client,
    Exporter,
    Lease,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub(crate) enum UsageOut {
    Table,
    Csv,
    Json,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub(crate) enum ExporterWord {
    Exporter,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminCreate {
    /// A client identity and its policy; prints (or writes) its client config. An existing
    /// client is refused unless --replace is given.
    Client {
        /// The client's name.
        name: String,
        /// Labels (k=v), e.g. team=platform for metrics.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Selector of exporters it may lease (default: any; with --replace: unchanged).
        #[arg(long)]
        allow: Option<String>,
        /// Longest lease it may hold, e.g. 2h (default: the controller's --max-duration; with
        /// --replace: unchanged).
        #[arg(long)]
        max_duration: Option<String>,
        /// Longest idle timeout its leases may have, e.g. 30m: a lease asking for more, or
        /// for none, is refused, and the controller's default is capped to it (default: no
        /// limit; with --replace: unchanged).
        #[arg(long, value_name = "DURATION|none")]
        max_idle_timeout: Option<String>,
        /// Give it admin rights.
        #[arg(long)]
        admin: bool,
        /// If the client exists, issue it a new credential (the old one is revoked at once),
        /// keeping its policy, limits and labels unless given here.
        #[arg(long)]
        replace: bool,
        /// Write the client config to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also store it under ~/.config/jmp/clients/ (and make it current if none is).
        #[arg(long)]
        save: bool,
    },
    /// An exporter identity; prints its credential (jmpd's controller.tokenFile).
    Exporter {
        /// The exporter's name (its config's metadata.name).
        name: String,
        /// Labels (k=v); the admin's labels win over the exporter config's.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Write the credential to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminUpdate {
    /// Change a client's policy, limits or labels; prints the client as it is now.
    Client {
        /// The client's name.
        name: String,
        /// Selector of exporters it may lease ('' for any).
        #[arg(long)]
        allow: Option<String>,
        /// Longest lease it may hold, e.g. 2h (`default`: the controller's --max-duration).
        #[arg(long)]
        max_duration: Option<String>,
        /// Longest idle timeout its leases may have, e.g. 30m (`none`: no limit). Its leases
        /// and waiting requests with a longer one, or none, get this one.
        #[arg(long, value_name = "DURATION|none")]
        max_idle_timeout: Option<String>,
        /// Its labels (k=v), replacing all it had.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminGet {
    /// Client identities and their policies.
    Clients {
        /// Only this client.
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
    /// Exporter identities, with their registration state.
    Exporters {
        /// Only exporters matching this label selector.
        #[arg(short = 'l', long = "selector")]
        selector: Vec<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ctl::Out::Table)]
        output: ctl::Out,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AdminDelete {
    /// Delete a client: its leases end, its credential is revoked.
    Client {
        /// The client.
        name: String,
    },
    /// Delete an exporter: its lease ends, its credential is revoked.
    Exporter {
        /// The exporter.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AuthCmd {
    /// Replace this client's credential with a new one; the old one is revoked at once.
    Rotate {
        #[command(flatten)]
        client: ClientSel,
    },
}

pub(crate) use jmp_devices::kind::Format;

#[derive(Args, Debug, Clone)]
pub(crate) struct AttachArgs {
    /// Direct mode: exporter address, HOST:PORT (port 7700 if omitted). Without it, attach
    /// the exporter of a lease from the controller.
    #[arg(long)]
    pub(crate) exporter: Option<String>,
    /// Direct mode: file holding the exporter's token.
    #[arg(long, env = "JMP_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Direct mode: the exporter's token itself (CI secrets in the environment).
    #[arg(
        long,
        env = "JMP_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub(crate) token: Option<String>,
    /// The lease to attach (default: this CI job's lease, else your only lease). A reservation
    /// is waited for until it begins.
    #[arg(long, env = "JMP_LEASE")]
    pub(crate) lease: Option<String>,
    #[command(flatten)]
    pub(crate) client: ClientSel,
    /// Expected certificate fingerprint (sha256:...). Default: trust on first use, recorded in
    /// ~/.config/jmp/known_exporters.
    #[arg(long)]
    pub(crate) fingerprint: Option<String>,
    /// How to reach the lease's exporter: auto (straight to it and through the controller's
    /// relay at once, if it takes relayed sessions; the first that proves the exporter's
    /// fingerprint is used), direct, or relay.
    #[arg(long, env = "JMP_VIA", value_enum, default_value = "auto")]
    pub(crate) via: ViaArg,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ShellArgs {
    #[command(flatten)]
    pub(crate) attach: AttachArgs,
    /// Local mode: run the board of this exporter config on this machine for the command (as
    /// `jmp local start --config`; a local exporter already running with it is used, one
    /// started here is stopped afterwards).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["exporter", "lease", "token_file", "token"])]
    pub(crate) exporter_config: Option<PathBuf>,
    /// Lease a board by label selector for the command (as `jmp create lease -l`; repeated
    /// selectors must all match), attach it, and release the lease afterwards (Jumpstarter's
    /// `jmp shell --selector`).
    #[arg(short = 'l', long = "selector", conflicts_with_all = ["exporter", "lease", "token_file", "token", "exporter_config"])]
    pub(crate) selector: Vec<String>,
    /// With --selector: how long to hold the lease, e.g. 30m or 00:30:00.
    #[arg(long, default_value = "30m", requires = "selector")]
    pub(crate) duration: String,
    /// With --selector: wait in the queue up to this many seconds if nothing is free.
    #[arg(long, default_value_t = 0, requires = "selector")]
    pub(crate) wait: u64,
    /// The command and its arguments (default: $SHELL); everything after the first word that
    /// is not an option of jmp shell is the command's, `--` optional.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub(crate) command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct CommonArgs {
    /// Where local devices appear: serial links and storage mounts (default: links in /dev/jmp
    /// and mounts in /run/jmp as root, else both in $XDG_RUNTIME_DIR/jmp).
    #[arg(long, env = "JMP_DEV_DIR")]
    pub(crate) dev_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) devices: jmp_devices::registry::ClientOptions,
    /// Name shown to others who find the board busy (default user@host).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Output once ready: a table, or exactly one JSON line.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub(crate) output: Format,
    /// Return once the devices are ready, leaving the attachment in the background.
    #[arg(short, long)]
    pub(crate) detach: bool,
    /// The attachment belongs to this process: it detaches when that process ends, however
    /// it ends (SIGKILL included). For test runners and scripts that attach with -d.
    #[arg(long, value_name = "PID")]
    pub(crate) owner_pid: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum LocalCmd {
    /// Start a local exporter in the background and attach it (returns once the devices
    /// exist, as `attach -d` does).
    Start(LocalArgs),
    /// Stop the local exporter started by `jmp local start`.
    Stop,
    #[command(hide = true)]
    Run(LocalArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct LocalArgs {
    /// Exporter config of a board wired to this machine (default: the simulated board).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// If a local exporter is already running with another config, stop it first (without
    /// this, that is an error).
    #[arg(long)]
    pub(crate) restart: bool,
    /// Keep the simulated card the last run wrote (without this, each start gets a fresh
    /// card; a card at a config's `path:` is always kept).
    #[arg(long)]
    pub(crate) keep_card: bool,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

/// `--via`: how `jmp attach` reaches an exporter of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ViaArg {
    /// Straight to the exporter; through the controller's relay if it does not answer within
    /// 2 s and takes relayed sessions.
    Auto,
    /// Only straight to the exporter.
    Direct,
    /// Only through the controller's relay.
    Relay,
}

impl From<ViaArg> for crate::attach::Via {
    fn from(v: ViaArg) -> Self {
        match v {
            ViaArg::Auto => crate::attach::Via::Auto,
            ViaArg::Direct => crate::attach::Via::Direct,
            ViaArg::Relay => crate::attach::Via::Relay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks over every subcommand (argument and group names unique,
    /// the kinds' flattened options and verbs included); they otherwise run only when a
    /// command is parsed.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The device of `jmp storage flash`/`dump` is optional: the usage says so.
    #[test]
    fn storage_usage_shows_the_device_as_optional() {
        let mut cmd = Cli::command();
        for (verb, file) in [("flash", "IMAGE"), ("dump", "OUTPUT")] {
            let sub = cmd
                .find_subcommand_mut("storage")
                .and_then(|s| s.find_subcommand_mut(verb))
                .expect("jmp storage has the verb");
            let usage = sub.render_usage().to_string();
            assert!(
                usage.contains(&format!("[DEVICE] {file}")),
                "jmp storage {verb}: {usage}"
            );
            assert!(!usage.contains("<DEVICE>"), "jmp storage {verb}: {usage}");
        }
    }

    /// Jumpstarter's spellings parse (the e2e table test runs them against a lab).
    #[test]
    fn jumpstarter_spellings_parse() {
        for line in [
            "jmp delete leases L1",
            "jmp get lease",
            "jmp get exporter -l board=x",
            "jmp shell -l board=x -- j power on",
            "jmp shell --selector board=x --duration 00:30:00 -- true",
        ] {
            Cli::try_parse_from(line.split(' ')).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }
}
