//! One table from error kinds to wire codes and to process exit codes, so that a refusal means
//! the same thing in jmpd's log, on the wire and in a CI script checking `$?`.

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
            c => ErrorCode::Unknown(c),
        }
    }

    /// Exit code of `jmp` when a session ends for this reason. Documented in the README; scripts
    /// rely on it, so never change a value.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::Ok => 0,
            ErrorCode::Unauthorized => 3,
            ErrorCode::Busy => 4,
            ErrorCode::NoSuchDevice | ErrorCode::DeviceUnavailable => 5,
            ErrorCode::LeaseEnded => 6,
            ErrorCode::Replaced => 7,
            ErrorCode::Shutdown => 8,
            ErrorCode::ConnectFailed => 9,
            ErrorCode::Protocol
            | ErrorCode::Internal
            | ErrorCode::Unsupported
            | ErrorCode::Unknown(_) => 1,
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
        for c in 0..12u64 {
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
        for c in 1..12u64 {
            assert_ne!(ErrorCode::from_wire(c).exit_code(), 0);
        }
        assert_eq!(ErrorCode::Unauthorized.exit_code(), 3);
        assert_eq!(ErrorCode::Busy.exit_code(), 4);
    }
}
