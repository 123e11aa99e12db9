//! One table from error kinds to wire codes and to process exit codes, so that a refusal means
//! the same thing in jmpd's log, on the wire and in a CI script checking `$?`.

/// `jmp`'s exit codes: the one table. README.md and docs/protocol.md list exactly these (a test
/// checks both), scripts rely on them: never change a value, add new ones.
pub mod exit {
    pub const OK: i32 = 0;
    /// Anything not below: a connection that cannot be made, a changed fingerprint, a bug.
    pub const FAILURE: i32 = 1;
    /// Bad arguments or files (a malformed selector, duration or config).
    pub const USAGE: i32 = 2;
    /// A token or credential was refused (revoked, wrong exporter, tampered).
    pub const UNAUTHORIZED: i32 = 3;
    /// The board is held by someone else, all matching exporters are leased, or `--wait` ran
    /// out.
    pub const BUSY: i32 = 4;
    /// No exporter matches, none is online, or no such device.
    pub const UNAVAILABLE: i32 = 5;
    /// The lease ended.
    pub const LEASE_ENDED: i32 = 6;
    /// The session was replaced by a newer one.
    pub const REPLACED: i32 = 7;
    /// A device operation failed or timed out (a power command exited non-zero or hung).
    pub const DEVICE_FAILED: i32 = 8;
    /// The exporter could not connect to a TCP forward's target.
    pub const CONNECT_FAILED: i32 = 9;
    /// The client's policy forbids the request.
    pub const FORBIDDEN: i32 = 10;
    /// A waiting request was interrupted (Ctrl-C).
    pub const INTERRUPTED: i32 = 130;

    /// Every code with a short meaning, in order.
    pub const TABLE: &[(i32, &str)] = &[
        (OK, "success"),
        (FAILURE, "anything else"),
        (USAGE, "bad arguments or files"),
        (UNAUTHORIZED, "token or credential refused"),
        (
            BUSY,
            "board held by someone else, all leased, or --wait ran out",
        ),
        (
            UNAVAILABLE,
            "no exporter matches, none online, or no such device",
        ),
        (LEASE_ENDED, "the lease ended"),
        (REPLACED, "the session was replaced"),
        (DEVICE_FAILED, "a device operation failed or timed out"),
        (
            CONNECT_FAILED,
            "a TCP forward's target could not be reached",
        ),
        (FORBIDDEN, "the client's policy forbids it"),
        (INTERRUPTED, "interrupted"),
    ];
}

/// A failure the other side can be told about: the code and the reason for people. Carried by
/// `Reject`, `Done` and `Close`; returned by drivers, requests and opens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

/// A reason carried by `Reject`, `Close` and `Bye`. The numeric value is on the wire: never
/// renumber; add new codes at the end. Unknown codes decode as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Normal end (the peer is going away on purpose, or a channel finished).
    Ok,
    /// The peer broke the protocol (bad frame, unexpected message).
    Protocol,
    /// The token was missing, wrong, expired or for another exporter.
    Unauthorized,
    /// The board is held by someone else.
    Busy,
    /// No device of that name on this exporter.
    NoSuchDevice,
    /// The device exists but cannot be used now (port vanished, cannot be opened).
    DeviceUnavailable,
    /// A TCP forward's target refused or could not be reached.
    ConnectFailed,
    /// The lease ended (expired or released).
    LeaseEnded,
    /// The same client attached again from elsewhere; this connection was superseded.
    Replaced,
    /// The exporter is shutting down.
    Shutdown,
    /// A bug or resource failure on the sending side.
    Internal,
    /// The request is understood but not supported by this device or build.
    Unsupported,
    /// The device tried and failed (a power command exited non-zero); the reason says how.
    Failed,
    /// No answer in time (a request's deadline passed, a power command hung and was killed).
    Timeout,
    /// A code from a newer peer.
    Unknown(u64),
}

impl ErrorCode {
    pub fn to_wire(self) -> u64 {
        match self {
            ErrorCode::Ok => 0,
            ErrorCode::Protocol => 1,
            ErrorCode::Unauthorized => 2,
            ErrorCode::Busy => 3,
            ErrorCode::NoSuchDevice => 4,
            ErrorCode::DeviceUnavailable => 5,
            ErrorCode::ConnectFailed => 6,
            ErrorCode::LeaseEnded => 7,
            ErrorCode::Replaced => 8,
            ErrorCode::Shutdown => 9,
            ErrorCode::Internal => 10,
            ErrorCode::Unsupported => 11,
            ErrorCode::Failed => 12,
            ErrorCode::Timeout => 13,
            ErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_wire(code: u64) -> Self {
        match code {
            0 => ErrorCode::Ok,
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Unauthorized,
            3 => ErrorCode::Busy,
            4 => ErrorCode::NoSuchDevice,
            5 => ErrorCode::DeviceUnavailable,
            6 => ErrorCode::ConnectFailed,
            7 => ErrorCode::LeaseEnded,
            8 => ErrorCode::Replaced,
            9 => ErrorCode::Shutdown,
            10 => ErrorCode::Internal,
            11 => ErrorCode::Unsupported,
            12 => ErrorCode::Failed,
            13 => ErrorCode::Timeout,
            c => ErrorCode::Unknown(c),
        }
    }

    /// Exit code of `jmp` when a session ends for this reason. Documented in the README; scripts
    /// rely on it, so never change a value.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::Ok => exit::OK,
            ErrorCode::Unauthorized => exit::UNAUTHORIZED,
            ErrorCode::Busy => exit::BUSY,
            ErrorCode::NoSuchDevice | ErrorCode::DeviceUnavailable => exit::UNAVAILABLE,
            ErrorCode::LeaseEnded => exit::LEASE_ENDED,
            ErrorCode::Replaced => exit::REPLACED,
            ErrorCode::Failed | ErrorCode::Timeout => exit::DEVICE_FAILED,
            ErrorCode::ConnectFailed => exit::CONNECT_FAILED,
            ErrorCode::Protocol
            | ErrorCode::Shutdown
            | ErrorCode::Internal
            | ErrorCode::Unsupported
            | ErrorCode::Unknown(_) => exit::FAILURE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Ok => "ok",
            ErrorCode::Protocol => "protocol error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Busy => "busy",
            ErrorCode::NoSuchDevice => "no such device",
            ErrorCode::DeviceUnavailable => "device unavailable",
            ErrorCode::ConnectFailed => "connect failed",
            ErrorCode::LeaseEnded => "lease ended",
            ErrorCode::Replaced => "replaced by a newer session",
            ErrorCode::Shutdown => "exporter shutting down",
            ErrorCode::Internal => "internal error",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Failed => "failed",
            ErrorCode::Timeout => "timed out",
            ErrorCode::Unknown(_) => "unknown error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Unknown(c) => write!(f, "unknown error {c}"),
            other => f.write_str(other.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for c in 0..14u64 {
            let code = ErrorCode::from_wire(c);
            assert!(
                !matches!(code, ErrorCode::Unknown(_)),
                "{c} should be known"
            );
            assert_eq!(code.to_wire(), c);
            assert!(seen.insert(code));
        }
        assert_eq!(ErrorCode::from_wire(999), ErrorCode::Unknown(999));
        assert_eq!(ErrorCode::Unknown(999).to_wire(), 999);
    }

    #[test]
    fn exit_codes_of_refusals_are_not_success() {
        for c in 1..14u64 {
            assert_ne!(ErrorCode::from_wire(c).exit_code(), 0);
        }
        assert_eq!(ErrorCode::Unauthorized.exit_code(), 3);
        assert_eq!(ErrorCode::Busy.exit_code(), 4);
    }

    /// Every exit code of the table, as the docs list them: README.md's "Exit codes" section
    /// and docs/protocol.md's table must name exactly the codes of `exit::TABLE`.
    #[test]
    fn readme_and_protocol_doc_list_the_same_exit_codes() {
        use std::collections::BTreeSet;
        let want: BTreeSet<i32> = exit::TABLE.iter().map(|(c, _)| *c).collect();
        let section = |doc: &str, heading: &str| -> String {
            let start = doc
                .find(heading)
                .unwrap_or_else(|| panic!("no {heading:?} heading"));
            let rest = &doc[start + heading.len()..];
            let end = rest.find("\n#").unwrap_or(rest.len());
            rest[..end].to_string()
        };
        // Codes are written as `| N |` table cells in both documents.
        let codes = |text: &str| -> BTreeSet<i32> {
            text.lines()
                .filter_map(|l| {
                    let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                    (cells.len() > 2 && cells[0].is_empty())
                        .then(|| cells[1].parse::<i32>().ok())
                        .flatten()
                })
                .collect()
        };
        let readme = include_str!("../../README.md");
        let proto = include_str!("../../docs/protocol.md");
        assert_eq!(codes(&section(readme, "### Exit codes")), want, "README.md");
        assert_eq!(
            codes(&section(proto, "### Exit codes")),
            want,
            "docs/protocol.md"
        );
        for (c, _) in exit::TABLE {
            assert!(*c >= 0 && *c <= 255);
        }
        for w in 0..14u64 {
            assert!(want.contains(&ErrorCode::from_wire(w).exit_code()));
        }
    }
}
