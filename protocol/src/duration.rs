//! Durations as people type them on a command line (`30m`, `2h`, `1h30m`, `90s`, `300`), parsed
//! by `humantime`, with errors that name the position of the problem, like selector errors.

/// A duration that did not parse, pointing at a 0-based character position of `input`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position} in duration {input:?}")]
pub struct DurationError {
    pub input: String,
    pub position: usize,
    pub message: String,
}

/// Whole seconds. A bare number is seconds. Zero is allowed here; callers that need a
/// positive duration say so themselves.
pub fn parse_secs(s: &str) -> Result<u64, DurationError> {
    let t = s.trim();
    let lead = s.len() - s.trim_start().len();
    let fail = |position: usize, message: String| DurationError {
        input: s.to_string(),
        position: lead + position,
        message,
    };
    if t.is_empty() {
        return Err(fail(
            0,
            "empty duration (examples: 30m, 2h, 1h30m, 90s)".into(),
        ));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map_err(|_| fail(0, "number too large".into()));
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(d.as_secs()),
        Err(e) => Err(match e {
            humantime::DurationError::InvalidCharacter(p) => fail(
                p,
                format!(
                    "unexpected character {:?}",
                    t[p..].chars().next().unwrap_or(' ')
                ),
            ),
            humantime::DurationError::NumberExpected(p) => fail(p, "expected a number".into()),
            humantime::DurationError::UnknownUnit { start, unit, .. } => {
                fail(start, format!("unknown unit {unit:?} (use s, m, h, d)"))
            }
            humantime::DurationError::NumberOverflow => fail(0, "number too large".into()),
            humantime::DurationError::Empty => fail(0, "empty duration".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_their_errors() {
        assert_eq!(parse_secs("30m").unwrap(), 1800);
        assert_eq!(parse_secs("2h").unwrap(), 7200);
        assert_eq!(parse_secs("1h30m").unwrap(), 5400);
        assert_eq!(parse_secs(" 300 ").unwrap(), 300);
        let e = parse_secs("30x").unwrap_err();
        assert_eq!(e.position, 2, "{e}");
        assert!(e.to_string().contains("unknown unit"), "{e}");
        let e = parse_secs("1h#").unwrap_err();
        assert_eq!(e.position, 2, "{e}");
        assert!(parse_secs("").unwrap_err().to_string().contains("empty"));
    }
}
