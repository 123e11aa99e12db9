//! Durations as people type them on a command line (`30m`, `2h`, `1h30m`, `90s`, `300`), parsed
//! by `humantime`, with errors that name the position of the problem, like selector errors.
//! Jumpstarter's clock form (`00:30:00`, `1:30:00`, also `30:00`) is taken as well, since
//! recipes copied from it use it.

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
    if t.contains(':') {
        return clock(t).map_err(|(p, m)| fail(p, m));
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

/// `[H]H:MM:SS` or `MM:SS`: the last two fields below 60, each field one or more digits.
fn clock(t: &str) -> Result<u64, (usize, String)> {
    let fields: Vec<&str> = t.split(':').collect();
    if fields.len() > 3 {
        let at = t.match_indices(':').nth(2).map_or(0, |(i, _)| i);
        return Err((at, "too many ':' (use HH:MM:SS)".into()));
    }
    let mut secs: u64 = 0;
    let mut at = 0;
    for (i, f) in fields.iter().enumerate() {
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return Err((at, format!("expected a number in {t:?} (use HH:MM:SS)")));
        }
        let n: u64 = f
            .parse()
            .map_err(|_| (at, "number too large".to_string()))?;
        if i > 0 && n >= 60 {
            return Err((at, format!("{n} is not below 60 (use HH:MM:SS)")));
        }
        secs = secs
            .checked_mul(60)
            .and_then(|s| s.checked_add(n))
            .ok_or((at, "number too large".to_string()))?;
        at += f.len() + 1;
    }
    Ok(secs)
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

    #[test]
    fn jumpstarters_clock_form() {
        assert_eq!(parse_secs("00:30:00").unwrap(), 1800);
        assert_eq!(parse_secs("1:30:00").unwrap(), 5400);
        assert_eq!(parse_secs("48:00:00").unwrap(), 48 * 3600);
        assert_eq!(parse_secs("30:00").unwrap(), 1800);
        let e = parse_secs("00:61:00").unwrap_err();
        assert_eq!(e.position, 3, "{e}");
        assert!(e.to_string().contains("below 60"), "{e}");
        let e = parse_secs("00:3x:00").unwrap_err();
        assert_eq!(e.position, 3, "{e}");
        assert!(parse_secs("1:2:3:4").is_err());
        assert!(parse_secs("::").is_err());
    }
}
