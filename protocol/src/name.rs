//! The one rule for names that come from the other side of a connection or from a token
//! (exporters, devices, leases, clients) and become local paths, interface names, mount points
//! or log lines. Checked in one place so that every device kind creates local objects from names
//! that cannot climb out of the directory jmp owns.
//!
//! The rule: 1 to 63 bytes of `A-Z a-z 0-9 . _ -`, starting with a letter or digit. So no `/`,
//! no `.` or `..`, no leading `-` (read as an option by tools), no spaces, no control characters,
//! no shell or glob metacharacters. The same rule holds for names in configs, so a name a config
//! accepts always survives the trip.

use std::borrow::Cow;

/// Longest name, in bytes. Leaves room for prefixes in a 255-byte path component and matches
/// a DNS label and a Kubernetes label value.
pub const MAX_NAME: usize = 63;

/// Why a name was refused (the message names the rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {shown} is not a valid name: use 1-{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit")]
pub struct NameError {
    pub what: &'static str,
    /// The refused name, escaped for display (it may hold terminal escapes).
    pub shown: String,
}

/// Checks `name` against the rule; `what` says what it names ("exporter name", "device name").
pub fn check(what: &'static str, name: &str) -> Result<(), NameError> {
    if is_valid(name) {
        Ok(())
    } else {
        Err(NameError {
            what,
            shown: format!("\"{}\"", escape(&truncated(name))),
        })
    }
}

pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn truncated(s: &str) -> Cow<'_, str> {
    if s.len() <= 80 {
        return Cow::Borrowed(s);
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// `s` made safe to print to a terminal or a log line: control characters (ANSI escapes, CR,
/// LF that would forge a log line) and other invisible code points become `\u{..}`-style
/// escapes; everything else is unchanged. Text that needs no escaping is borrowed.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_and_bad_names() {
        for good in ["rpi4-01", "console", "a", "A.b_c-9", &"x".repeat(63)] {
            assert!(check("name", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "x/../../victim",
            "/etc",
            "-rf",
            ".hidden",
            "a b",
            "a\u{1b}[2J",
            "tab\there",
            "ünï",
            "x;rm",
            "*",
            &"x".repeat(64),
        ] {
            let e = check("exporter name", bad).expect_err(bad);
            assert!(e.to_string().starts_with("exporter name"), "{e}");
            assert!(
                !e.to_string().contains('\u{1b}'),
                "the refusal must not carry the escape itself: {e:?}"
            );
        }
    }

    #[test]
    fn escape_defuses_terminal_and_log_forgery() {
        assert_eq!(escape("plain name"), "plain name");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{1b}[31mred"), "a\\u{1b}[31mred");
        assert_eq!(escape("x\nINFO forged"), "x\\nINFO forged");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("rtl\u{202e}txt"), "rtl\\u{202e}txt");
    }

    proptest! {
        #[test]
        fn escaped_text_has_no_control_characters(s in any::<String>()) {
            let e = escape(&s);
            prop_assert!(!e.chars().any(|c| c.is_control()));
        }

        #[test]
        fn valid_names_are_path_components(s in "[A-Za-z0-9][A-Za-z0-9._-]{0,62}") {
            prop_assert!(is_valid(&s));
            let p = std::path::Path::new("/base").join(&s);
            prop_assert_eq!(p.parent(), Some(std::path::Path::new("/base")));
        }
    }
}
