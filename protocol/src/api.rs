//! The controller API (ALPN `jmp-ctl/1`), spoken by `jmp` (users, CI, admins) and by `jmpd`
//! (exporters registering).
//!
//! One call per QUIC bidirectional stream. The caller writes one frame holding a [`Call`] and
//! finishes its side; the controller answers with frames holding [`Reply`] values, the last of
//! which is final ([`Reply::is_final`]). A call can therefore report progress: a lease request
//! that waits in the queue sends [`Reply::Queued`] each time its place changes, then the lease.
//! An exporter's [`Request::Register`] stream stays open for as long as the exporter is online,
//! and the controller pushes [`Reply::ExporterState`] on it whenever the exporter's lease changes.
//!
//! A frame is a QUIC varint length followed by that many bytes of JSON. JSON rather than the
//! binary codec of the exporter's control stream because these messages are few, large and
//! evolving (selectors, label maps, lists of thousands of exporters) and because an operator can
//! read them in a capture; unknown fields are ignored so that either side can add some.
//!
//! Times on this API are Unix seconds; durations are seconds.

use crate::codec::{get_varint, put_varint, varint_len, DecodeError};
use crate::error::exit;
use crate::selector::Labels;
use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (a listing of 10,000 exporters fits comfortably).
pub const MAX_CTL_FRAME: usize = 16 * 1024 * 1024;

/// What the caller sends first on a stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Call {
    /// The caller's credential (a client, exporter or admin token issued by this controller).
    pub credential: String,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Who the credential belongs to. Answered with [`Reply::Identity`].
    Whoami,
    /// Ask for a lease. Answered with `Lease`, or `Queued`… then `Lease`, or `Error`.
    CreateLease(LeaseRequest),
    /// The caller's leases (admins: everyone's with `all`).
    GetLeases {
        #[serde(default)]
        all: bool,
    },
    /// Change a lease's end: a new total duration counted from its start, or an extension.
    UpdateLease {
        name: String,
        #[serde(default)]
        duration_secs: Option<u64>,
        #[serde(default)]
        extend_secs: Option<u64>,
    },
    /// Release leases (and withdraw waiting requests of the same names). `all`: every lease of
    /// the caller.
    DeleteLease {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    /// What `jmp attach` needs to reach the leased exporter: answered with [`Reply::Access`].
    /// `name: None` picks the caller's only active lease. It counts as a use of the lease.
    LeaseAccess {
        #[serde(default)]
        name: Option<String>,
    },
    /// Client: the caller uses this lease (`name: None`: its only active one), so it does not
    /// end as idle yet; an auto-extending lease due for its extension is extended. Answered
    /// with [`Reply::Lease`] (the lease as it is now). The calls that name a lease for use
    /// (`lease-access`, `update-lease`) count as a use too; this one is for a command that
    /// uses a lease without them (`jmp create lease --reuse`).
    TouchLease {
        #[serde(default)]
        name: Option<String>,
    },
    /// The lease's holder lets another client attach to the same board beside it
    /// (`jmp share lease`): `with` attaches with its own credential (its `lease-access` for
    /// this lease is answered with a share's token), read-only unless `control`, until
    /// `until` (Unix seconds; absent: the lease's end). Refused when `with`'s own policy does
    /// not allow the lease's exporter. Sharing again with the same client replaces its share.
    /// Answered with `Lease` (the lease as it is now, its shares listed).
    ShareLease {
        name: String,
        with: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        control: bool,
    },
    /// The holder ends a share: the colleague's sessions are ended, its tokens refused.
    /// Answered with `Lease`.
    UnshareLease { name: String, with: String },
    /// Exporters visible to the caller, optionally filtered by a selector.
    GetExporters {
        #[serde(default)]
        selector: Option<String>,
    },
    /// Admin: create a client. A client of that name must not exist (its credential is
    /// re-issued, and its policy changed, with [`Request::UpdateClient`]).
    CreateClient(ClientSpec),
    /// Admin: change a client's policy, labels or admin rights (what is not given stays), and
    /// with `reissue` give it a new credential (the old one is revoked). A narrowed policy
    /// reaches the client's queued requests, reservations and leases at once. Answered with
    /// `Credential` when re-issued, else `Clients` (the client as it is now).
    UpdateClient(ClientUpdate),
    /// Admin: create (or replace the credential of) an exporter.
    CreateExporter(ExporterSpec),
    /// Admin: list clients (one by name if given).
    GetClients {
        #[serde(default)]
        name: Option<String>,
    },
    /// Admin: delete a client; its leases end and its credential is revoked.
    DeleteClient { name: String },
    /// Admin: delete an exporter; its lease ends and its credential is revoked.
    DeleteExporter { name: String },
    /// Admin: a disabled exporter is never leased (its current lease ends).
    SetExporterEnabled { name: String, enabled: bool },
    /// Admin: forget the TLS fingerprint bound to an exporter at its first registration, so
    /// that its next registration binds a new one (its host was re-imaged).
    RebindExporter { name: String },
    /// Any identity: issue a new credential for the caller and revoke the one used for this call.
    Rotate,
    /// Any identity: the same credential with a new expiry (same id, so copies of the old one
    /// keep working until they expire on their own). `jmp` and `jmpd` call it before their
    /// credential expires. Answered with `Credential`.
    Renew,
    /// Exporter: come online. The stream stays open; the controller pushes `ExporterState`.
    Register(Registration),
    /// Client: reach the leased exporter through the controller's relay (it accepts no inbound
    /// connection). `token` is the lease token from `lease-access`: the relay serves only its
    /// holder, for that lease's exporter, until the lease ends. Answered with [`Reply::Relay`]
    /// once the exporter has punched through to the relay port.
    Relay { token: String },
    /// Exporter: a lease hook finished (see [`HookReport`]). Answered with `Done`.
    LeaseHook(HookReport),
    /// Exporter: which lease a session is attached under right now (`None`: nobody holds the
    /// board), sent whenever that changes. While a session of its lease is attached, a lease
    /// is in use (it does not end as idle, and an auto-extending one is extended); when it
    /// leaves, its idle timeout starts. The exporter sends these one at a time, each after the
    /// answer to the previous, so they arrive in order. Answered with `Done`.
    InUse {
        #[serde(default)]
        lease: Option<String>,
    },
    /// Admin: leased time over a window, per team, client, exporter or lease, from the
    /// history of ended leases and the live ones. Answered with [`Reply::Usage`].
    Usage(crate::usage::UsageQuery),
    /// Client: a short-lived, single-use link that signs its opener in to the lab dashboard
    /// (`jmp-controller --web`) as the caller, so no credential is ever pasted into a page
    /// (`jmp web --lab`). Answered with [`Reply::SignInLink`] by the controller's API itself,
    /// which keeps the links; refused when the controller serves no dashboard.
    WebSignIn,
}

/// What jmpd reports when a lease hook has run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct HookReport {
    /// The lease the hook ran for.
    pub lease: String,
    /// `before` (beforeLease) or `after` (afterLease, and powering off after the lease).
    pub phase: HookPhase,
    pub ok: bool,
    /// The hook's output (its tail), or why it failed (exit status, timeout).
    #[serde(default)]
    pub output: String,
    /// A failed beforeLease whose `onFailure` is `endLease`: end the lease, with `output`.
    #[serde(default)]
    pub end_lease: bool,
    /// A failed afterLease whose `onFailure` is `disable`: take the exporter out of service.
    #[serde(default)]
    pub disable: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HookPhase {
    #[default]
    Before,
    After,
}

/// A relay session: a UDP port on the controller's host that splices the client's and the
/// exporter's QUIC packets (it cannot read them). Each side gets its own secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayGrant {
    /// Identifies the session in logs and metrics.
    pub session: String,
    /// The relay port, on `host`.
    pub port: u16,
    /// Where the relay listens; `None`: the controller's host as this side reaches it.
    #[serde(default)]
    pub host: Option<String>,
    /// 32 hex digits ([`crate::relay`]): the punch's (exporter) or the claim's (client).
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LeaseRequest {
    /// Chosen by the caller, so that a retried request (after a lost connection or a controller
    /// restart) finds the same queue place or lease instead of creating another.
    pub request_id: String,
    /// Kubernetes label selector over exporters' labels ("" matches all).
    #[serde(default)]
    pub selector: String,
    /// A specific exporter by name (still subject to the selector and the client's policy).
    #[serde(default)]
    pub exporter: Option<String>,
    pub duration_secs: u64,
    /// Not before this time (Unix seconds): the request joins the queue at that moment.
    #[serde(default)]
    pub begin_time: Option<u64>,
    /// How long to wait in the queue; 0 means fail at once if nothing is free — except with a
    /// begin time in the future: then it is a reservation, answered at once, that joins the
    /// queue at the begin time and waits there until granted or until its would-be end.
    #[serde(default)]
    pub wait_secs: u64,
    /// The CI job (or any scope) making the request (`JMP_JOB`, or the CI system's job id), so
    /// that a job's commands find its own lease among its client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The lease ends when nothing has used it for this long (no session attached at its
    /// exporter, no call naming it). Absent: the controller's default; `0`: no idle timeout
    /// (refused when the client's policy caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// While in use, the lease is extended by `duration_secs` at a time (half a step before
    /// its end), up to `max_duration_secs` from its begin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_extend: bool,
    /// With `auto_extend`: the hard limit, counted from the lease's begin (default: the most
    /// the client's policy allows). At least `duration_secs`, at most the policy's maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClientSpec {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    /// Selector the client's leases are limited to ("" = any exporter).
    #[serde(default)]
    pub allow: String,
    /// Longest lease the client may hold (0 = the controller's default).
    #[serde(default)]
    pub max_duration_secs: u64,
    /// Longest idle timeout its leases may have (0 = no limit; a limit also refuses leases
    /// without an idle timeout).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_idle_timeout_secs: u64,
    /// Admin rights (creating identities, seeing every lease).
    #[serde(default)]
    pub admin: bool,
}

/// What [`Request::UpdateClient`] changes: only the fields given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClientUpdate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Selector the client's leases are limited to ("" = any exporter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<String>,
    /// Longest lease the client may hold (0 = the controller's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_secs: Option<u64>,
    /// Longest idle timeout its leases may have (0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,
    /// Issue a new credential (the old one is revoked at once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reissue: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ExporterSpec {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// Sent by jmpd when it registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Registration {
    /// `host:port` clients connect to.
    pub address: String,
    /// The exporter's TLS certificate fingerprint (`sha256:…`), which clients pin.
    pub fingerprint: String,
    /// Labels from the exporter's own config. The admin's labels win where both name a key.
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub devices: Vec<DeviceSummary>,
    /// The exporter takes relayed sessions (`controller: {relay: true}`): clients that cannot
    /// reach `address` come through the controller.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// After every lease the exporter cleans up (its afterLease hook, powering off) for at
    /// most this long; the controller grants it to nobody meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_secs: Option<u64>,
    /// A lease this exporter still owes its cleanup for (it restarted, or was cut off, before
    /// it could run it); ignored while that lease is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleaning: Option<String>,
    /// The lease a session is attached under right now (as [`Request::InUse`] says later):
    /// after a restart or failover of the controller, what the exporters say rebuilds which
    /// leases are in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<String>,
    /// The exporter reports its sessions (`attached` here, [`Request::InUse`] later). One that
    /// does not (an older jmpd) has its leases counted as attached while it is online, so
    /// they never end as idle.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reports_in_use: bool,
    /// The exporter knows share tokens (`jmp share lease`) and admits them as read-only or
    /// controlling guests beside the holder. One that does not (an older jmpd) would drop the
    /// token's `share` claim and admit a colleague as the holder, so no lease of it is shared.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admits_shares: bool,
    /// That the registering process holds the private key of the TLS identity whose
    /// `fingerprint` it registers (required: a leaked exporter credential alone cannot move the
    /// exporter to another address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<IdentityProof>,
}

/// Label of the TLS keying material an exporter signs when it registers (RFC 8446 7.5); the
/// context is the exporter's name.
pub const REGISTRATION_BINDING: &[u8] = b"EXPORTER-jmp-registration";

/// Proof of possession of a TLS key, for this connection only: `signature` is the key's
/// ECDSA P-256 SHA-256 signature (ASN.1 DER) over 32 bytes of keying material exported from
/// the connection the call arrives on ([`REGISTRATION_BINDING`], the exporter's name as
/// context), which only the two ends of that connection can compute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IdentityProof {
    /// The TLS certificate, DER, hex; its SHA-256 is the registered fingerprint.
    pub certificate: String,
    /// Hex.
    pub signature: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DeviceSummary {
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Error(CtlError),
    Identity {
        kind: IdentityKind,
        name: String,
        #[serde(default)]
        admin: bool,
    },
    /// The request waits. `position` is 1 for the head of the queue among requests competing
    /// for the same exporters; `behind` is the lease it waits for (the one that ends soonest).
    Queued {
        request_id: String,
        /// The name the lease will have (and by which `jmp delete lease` withdraws it).
        #[serde(default)]
        lease: String,
        position: u32,
        #[serde(default)]
        behind: Option<String>,
        /// When the wait gives up (Unix seconds).
        wait_until: u64,
    },
    Lease(LeaseInfo),
    Leases {
        leases: Vec<LeaseInfo>,
    },
    Access(Access),
    Exporters {
        exporters: Vec<ExporterInfo>,
    },
    Clients {
        clients: Vec<ClientInfo>,
    },
    /// A new credential (create or rotate). `token` is secret.
    Credential(Credential),
    Deleted {
        names: Vec<String>,
    },
    Done,
    /// Pushed on a Register stream: the exporter's current lease (if any) and the public key
    /// lease tokens are signed with.
    ExporterState {
        #[serde(default)]
        lease: Option<ActiveLease>,
        /// Leases that ended since the last push, with why; jmpd ends their sessions.
        #[serde(default)]
        ended: Vec<EndedLease>,
        enabled: bool,
        /// The controller's clock (Unix seconds) when it sent this. A lease token issued later
        /// (`iat` > `at`) is newer news about the lease than this push: jmpd follows the
        /// token's end when it missed a push (an extension while it was cut off). 0: unknown.
        #[serde(default)]
        at: u64,
        /// The ended lease the controller waits for the exporter to clean up after (its
        /// afterLease hook); nobody is granted the exporter until it reports `lease-hook`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cleaning: Option<String>,
    },
    /// The answer to `relay`: where the client sends its claim and its QUIC packets.
    Relay(RelayGrant),
    /// Pushed on a Register stream: punch through to this relay session now.
    RelayOpen(RelayGrant),
    /// The answer to `usage`.
    Usage(crate::usage::UsageReport),
    /// The answer to `web-sign-in`: open `url` within `expires` (Unix seconds), once.
    SignInLink {
        url: String,
        expires: u64,
    },
}

impl Reply {
    /// Whether this is the last frame of a call (everything but progress and pushes).
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Reply::Queued { .. } | Reply::ExporterState { .. } | Reply::RelayOpen(_)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityKind {
    Client,
    Exporter,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum CtlErrorCode {
    /// Bad, expired, revoked or unknown credential.
    Unauthorized,
    /// Authenticated, but not allowed (admin-only call, outside the client's policy).
    Forbidden,
    NotFound,
    /// Malformed request (bad selector, zero duration, …): the message names what.
    Invalid,
    /// Nothing matches the selector (and the policy) at all.
    NoMatch,
    /// Matching exporters exist but all are leased.
    AllBusy,
    /// Matching exporters exist but none is online (or all are disabled).
    AllOffline,
    /// `--wait` ran out.
    Timeout,
    /// More than one active lease, and the call needs exactly one.
    Ambiguous,
    Internal,
    /// This controller of a cluster is not the leader: `leader` says which one is (absent
    /// while an election is under way). Nothing was done; the caller repeats the call there.
    NotLeader,
    /// The controller's lease store (etcd) is unreachable or did not confirm a change; the
    /// message says which. Nothing the caller was told about was lost; retrying is safe.
    Unavailable,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    pub code: CtlErrorCode,
    pub message: String,
    /// With [`CtlErrorCode::NotLeader`]: the leader's `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl CtlError {
    pub fn new(code: CtlErrorCode, message: impl Into<String>) -> Self {
        CtlError {
            code,
            message: message.into(),
            leader: None,
        }
    }

    /// A non-leader's answer: where the leader is, if one is known.
    pub fn not_leader(leader: Option<String>, message: impl Into<String>) -> Self {
        CtlError {
            code: CtlErrorCode::NotLeader,
            message: message.into(),
            leader,
        }
    }

    /// Whether the same call may succeed later or elsewhere (a failover, the store coming
    /// back), as opposed to a definite answer about the request.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code,
            CtlErrorCode::NotLeader | CtlErrorCode::Unavailable
        )
    }

    /// `jmp`'s exit code for this refusal (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self.code {
            CtlErrorCode::Unauthorized => exit::UNAUTHORIZED,
            CtlErrorCode::AllBusy | CtlErrorCode::Timeout => exit::BUSY,
            CtlErrorCode::NotFound
            | CtlErrorCode::NoMatch
            | CtlErrorCode::AllOffline
            | CtlErrorCode::NotLeader
            | CtlErrorCode::Unavailable => exit::UNAVAILABLE,
            CtlErrorCode::Forbidden => exit::FORBIDDEN,
            CtlErrorCode::Invalid | CtlErrorCode::Ambiguous => exit::USAGE,
            CtlErrorCode::Internal => exit::FAILURE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseInfo {
    pub name: String,
    pub client: String,
    pub exporter: String,
    #[serde(default)]
    pub selector: String,
    pub begin: u64,
    pub end: u64,
    pub request_id: String,
    /// `active`, or `waiting` for a request still in the queue, or `reserved` for a
    /// reservation not yet begun (then `exporter` is the exporter asked for by name, or empty,
    /// and `begin`/`end` are the earliest it may begin and when it gives up).
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// It ends when nothing has used it for this long (seconds); absent: no idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    /// When something last used it (Unix seconds): its grant, a call naming it, a session of
    /// it leaving its exporter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_use: Option<u64>,
    /// A session of it is attached at its exporter (as the exporter last said): in use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attached: bool,
    /// When it ends as idle unless something uses it first (Unix seconds); absent while
    /// attached or without an idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_deadline: Option<u64>,
    /// Auto-extending: extended while in use, never past this (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<u64>,
    /// Clients the holder shares it with (`jmp share lease`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareInfo>,
    /// A waiting request's place in the queue (1: served first among the requests that
    /// compete for the same exporters); absent for leases and reservations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
}

/// A lease shared with another client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareInfo {
    /// The colleague's client name.
    pub client: String,
    /// When the share ends (Unix seconds); absent: with the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// The colleague may type on the console and use the board's controls.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
}

/// What `jmp attach` needs; the controller is not on the data path after this.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Access {
    pub lease: LeaseInfo,
    /// Lease token for the exporter's Hello (an EdDSA JWT, see [`crate::token`]).
    pub token: String,
    pub address: String,
    pub fingerprint: String,
    /// The exporter also takes sessions through the controller's relay (`relay` call), for
    /// clients that cannot reach `address`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExporterInfo {
    pub name: String,
    pub labels: Labels,
    pub online: bool,
    pub enabled: bool,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub devices: Vec<DeviceSummary>,
    /// The lease holding it, if any (name and client).
    #[serde(default)]
    pub lease: Option<String>,
    #[serde(default)]
    pub client: Option<String>,
    /// The TLS fingerprint bound at its first registration (clients pin it).
    #[serde(default)]
    pub fingerprint: String,
    /// A registration refused because it presented another fingerprint than the bound one:
    /// either the host was re-imaged (an admin rebinds it) or its credential leaked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_refused: Option<String>,
    /// `cleaning` while its afterLease cleanup runs (it is granted to nobody meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientInfo {
    pub name: String,
    pub labels: Labels,
    pub allow: String,
    pub max_duration_secs: u64,
    /// Longest idle timeout its leases may have (0: no limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_idle_timeout_secs: u64,
    #[serde(default)]
    pub admin: bool,
    /// When the newest credential issued to it (created, rotated or renewed) expires, Unix
    /// seconds; `None`: it does not expire. A client that stopped renewing shows a date near.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_expires: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credential {
    pub kind: IdentityKind,
    pub name: String,
    pub token: String,
    /// How to reach and trust the controller, so the credential is all a client needs.
    pub endpoint: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActiveLease {
    pub name: String,
    pub client: String,
    pub end: u64,
    /// The client's `team` label ("" without one), for the exporter's metrics.
    #[serde(default)]
    pub team: String,
    /// Auto-extending and below its hard limit: `end` moves while a session uses it, so the
    /// exporter does not warn its holder of an end that will not come while attached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extends: bool,
    /// Other clients that may attach beside the holder (current shares only): jmpd admits
    /// their share tokens and ends the sessions of a share that is no longer listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndedLease {
    pub name: String,
    pub reason: String,
    /// Until when a lease token of it may be valid (Unix seconds; 0: unknown): jmpd keeps
    /// refusing them that long, across its own restarts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub until: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A client's configuration file (`~/.config/jmp/clients/<name>.yaml`): everything `jmp`
/// needs to reach the controller as this identity. The token is secret; the file is 0600.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ClientMeta,
    /// The controller's `host:port`.
    pub endpoint: String,
    /// The controller's certificate fingerprint, pinned.
    pub fingerprint: String,
    pub token: String,
    /// Renew the credential this long before it expires (`7d`); default: when a third of its
    /// life is left.
    #[serde(
        rename = "renewBefore",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub renew_before: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientMeta {
    pub name: String,
}

pub const API_VERSION: &str = "jmp.dev/v1alpha1";

impl ClientConfig {
    pub fn new(c: &Credential) -> ClientConfig {
        ClientConfig {
            api_version: API_VERSION.into(),
            kind: "ClientConfig".into(),
            metadata: ClientMeta {
                name: c.name.clone(),
            },
            endpoint: c.endpoint.clone(),
            fingerprint: c.fingerprint.clone(),
            token: c.token.clone(),
            renew_before: None,
        }
    }
}

/// The controllers named by a credential's or config's `endpoint`: one `host:port`, or several
/// separated by commas (the controllers of a cluster, any of which points to the leader).
/// Blanks around each are ignored; empty entries are dropped.
pub fn endpoints(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

/// Appends one frame (varint length + JSON) to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    // Serializing these plain data types cannot fail (no maps with non-string keys).
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut len = bytes::BytesMut::with_capacity(varint_len(body.len() as u64));
    put_varint(&mut len, body.len() as u64);
    out.extend_from_slice(&len);
    out.extend_from_slice(&body);
}

/// Errors reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum CtlDecodeError {
    #[error(transparent)]
    Frame(#[from] DecodeError),
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(u64, usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Largest call frame the controller reads. Calls are small (a credential and a request); the
/// large frames are replies (lists of thousands of exporters). A caller's credential is checked
/// only once its frame is whole, so this is also what an unauthenticated stream can make the
/// controller buffer.
pub const MAX_CALL_FRAME: usize = 64 * 1024;

/// Takes one whole frame off the front of `buf`, if there is one.
pub fn decode<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
) -> Result<Option<T>, CtlDecodeError> {
    decode_limited(buf, MAX_CTL_FRAME)
}

/// [`decode`] with a smaller limit: a frame announcing more than `max` bytes is refused from
/// its length prefix, before its body is buffered.
pub fn decode_limited<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<T>, CtlDecodeError> {
    let mut cur: &[u8] = buf;
    let len = match get_varint(&mut cur, "frame length") {
        Ok(l) => l,
        Err(DecodeError::Truncated { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let max = max.min(MAX_CTL_FRAME);
    if len > max as u64 {
        return Err(CtlDecodeError::TooLarge(len, max));
    }
    let head = buf.len() - cur.len();
    let len = len as usize;
    if cur.len() < len {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&cur[..len])?;
    buf.drain(..head + len);
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller API's examples in docs/protocol.md: every `→` line is a `Call` and every
    /// `←` line a `Reply`, and each reads back as it was written (no field dropped or renamed).
    #[test]
    fn the_documented_examples_are_calls_and_replies() {
        let doc = include_str!("../../docs/protocol.md");
        let section = doc
            .split("## The controller API")
            .nth(1)
            .expect("the controller API section");
        let (mut calls, mut replies) = (0, 0);
        for line in section.lines() {
            let (json, call) = if let Some(j) = line.strip_prefix("→ ") {
                (j, true)
            } else if let Some(j) = line.strip_prefix("← ") {
                (j, false)
            } else {
                continue;
            };
            let written: serde_json::Value =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"));
            let read = if call {
                calls += 1;
                let c: Call = serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"));
                serde_json::to_value(c).unwrap()
            } else {
                replies += 1;
                let r: Reply = serde_json::from_str(json).unwrap_or_else(|e| panic!("{line}: {e}"));
                serde_json::to_value(r).unwrap()
            };
            // Every field written is read (the serialiser may add defaults, e.g. nulls).
            let (serde_json::Value::Object(w), serde_json::Value::Object(r)) = (&written, &read)
            else {
                panic!("{line}: not an object");
            };
            for (k, v) in w {
                assert_eq!(r.get(k), Some(v), "{line}: field {k}");
            }
        }
        assert!(
            calls >= 4 && replies >= 6,
            "{calls} calls, {replies} replies"
        );
    }

    #[test]
    fn a_call_round_trips_through_a_frame_split_anywhere() {
        let call = Call {
            credential: "tok".into(),
            request: Request::CreateLease(LeaseRequest {
                request_id: "r1".into(),
                selector: "board=rpi4".into(),
                duration_secs: 60,
                wait_secs: 30,
                ..Default::default()
            }),
        };
        let mut wire = Vec::new();
        encode(&call, &mut wire);
        for split in 0..wire.len() {
            let mut buf = wire[..split].to_vec();
            assert!(decode::<Call>(&mut buf).unwrap().is_none(), "split {split}");
            buf.extend_from_slice(&wire[split..]);
            assert_eq!(decode::<Call>(&mut buf).unwrap(), Some(call.clone()));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors_naming_the_problem() {
        let mut buf = Vec::new();
        let mut len = bytes::BytesMut::new();
        put_varint(&mut len, (MAX_CTL_FRAME + 1) as u64);
        buf.extend_from_slice(&len);
        let e = decode::<Call>(&mut buf).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");

        let mut buf = Vec::new();
        buf.push(5);
        buf.extend_from_slice(b"{\"x\":");
        let e = decode::<Call>(&mut buf).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");

        let mut buf = Vec::new();
        encode(
            &serde_json::json!({"credential": "t", "op": "launch-missiles"}),
            &mut buf,
        );
        let e = decode::<Call>(&mut buf).unwrap_err();
        assert!(e.to_string().contains("launch-missiles"), "{e}");
    }

    #[test]
    fn the_wire_form_is_plain_json_with_an_op_tag() {
        let call = Call {
            credential: "c".into(),
            request: Request::DeleteLease {
                names: vec!["l1".into()],
                all: false,
            },
        };
        let v = serde_json::to_value(&call).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"credential": "c", "op": "delete-lease", "names": ["l1"], "all": false})
        );
        let r = Reply::Error(CtlError::new(CtlErrorCode::AllBusy, "busy"));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"reply": "error", "code": "all-busy", "message": "busy"})
        );
        // A non-leader names the leader; an error from an older controller (no field) reads.
        let r = Reply::Error(CtlError::not_leader(Some("h2:7800".into()), "ask h2"));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"reply": "error", "code": "not-leader", "message": "ask h2", "leader": "h2:7800"})
        );
        let old: Reply = serde_json::from_value(
            serde_json::json!({"reply": "error", "code": "internal", "message": "x"}),
        )
        .unwrap();
        assert_eq!(
            old,
            Reply::Error(CtlError::new(CtlErrorCode::Internal, "x"))
        );
    }

    #[test]
    fn an_endpoint_list_splits_on_commas() {
        assert_eq!(endpoints("h1:7800"), ["h1:7800"]);
        assert_eq!(
            endpoints(" h1:7800, h2:7800 ,,h3:7800"),
            ["h1:7800", "h2:7800", "h3:7800"]
        );
        assert!(endpoints(" , ").is_empty());
    }
}
