//! Labels and Kubernetes-style label selectors.
//!
//! Exporters (boards) advertise a [`Labels`] map; clients pick boards with a
//! [`Selector`] written in the Kubernetes label-selector syntax, e.g.
//! `board=rpi4,arch in (arm64,armhf),!reserved`. Key and value syntax follow
//! the Kubernetes rules so selectors are portable between the two worlds.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Labels attached to an exporter. Ordered so that rendering is deterministic.
pub type Labels = BTreeMap<String, String>;

/// Maximum length of a label name (the part after the optional prefix) and of a value.
const MAX_NAME_LEN: usize = 63;
/// Maximum length of a DNS-subdomain key prefix.
const MAX_PREFIX_LEN: usize = 253;

/// A parse or validation error, pointing at a 0-based character position of `input`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position} in {input:?}")]
pub struct SelectorError {
    pub input: String,
    pub position: usize,
    pub message: String,
}

impl SelectorError {
    fn new(input: &str, position: usize, message: impl Into<String>) -> Self {
        SelectorError {
            input: input.to_owned(),
            position,
            message: message.into(),
        }
    }
}

/// Validation failure relative to the start of the checked string:
/// (character offset, message). Callers rebase the offset onto their input.
type Invalid = (usize, String);

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// Checks a label name or value: `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 chars.
fn check_name(s: &str, what: &str, allow_empty: bool) -> Result<(), Invalid> {
    let chars: Vec<char> = s.chars().collect();
    let Some((&first, &last)) = chars.first().zip(chars.last()) else {
        return if allow_empty {
            Ok(())
        } else {
            Err((0, format!("{what} must not be empty")))
        };
    };
    if let Some((i, c)) = chars.iter().enumerate().find(|(_, c)| !is_name_char(**c)) {
        return Err((
            i,
            format!("invalid character {c:?} in {what} (allowed: A-Z, a-z, 0-9, '-', '_', '.')"),
        ));
    }
    if chars.len() > MAX_NAME_LEN {
        return Err((
            0,
            format!(
                "{what} must be at most {MAX_NAME_LEN} characters, found {}",
                chars.len()
            ),
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err((
            0,
            format!("{what} must start with an alphanumeric character, found {first:?}"),
        ));
    }
    if !last.is_ascii_alphanumeric() {
        return Err((
            chars.len() - 1,
            format!("{what} must end with an alphanumeric character, found {last:?}"),
        ));
    }
    Ok(())
}

/// Checks a key prefix: a lowercase RFC 1123 DNS subdomain of at most 253 chars.
fn check_prefix(prefix: &str) -> Result<(), Invalid> {
    const WHAT: &str = "label key prefix";
    let chars: Vec<char> = prefix.chars().collect();
    if chars.is_empty() {
        return Err((0, format!("{WHAT} before '/' must not be empty")));
    }
    if chars.len() > MAX_PREFIX_LEN {
        return Err((
            0,
            format!(
                "{WHAT} must be at most {MAX_PREFIX_LEN} characters, found {}",
                chars.len()
            ),
        ));
    }
    let mut seg_start = 0;
    for i in 0..=chars.len() {
        if let Some(&c) = chars.get(i).filter(|c| **c != '.') {
            if c.is_ascii_uppercase() {
                return Err((i, format!("{WHAT} must be lowercase, found {c:?}")));
            }
            if !(c.is_ascii_alphanumeric() || c == '-') {
                return Err((
                    i,
                    format!(
                        "invalid character {c:?} in {WHAT} (a DNS subdomain allows a-z, 0-9, '-', '.')"
                    ),
                ));
            }
            continue;
        }
        // End of a dot-separated DNS label: chars[seg_start..i].
        if i == seg_start {
            return Err((
                i,
                format!("{WHAT} must not contain an empty DNS label (check the dots)"),
            ));
        }
        if chars[seg_start] == '-' {
            return Err((
                seg_start,
                format!(
                    "each DNS label in the {WHAT} must start with a letter or digit, found '-'"
                ),
            ));
        }
        if chars[i - 1] == '-' {
            return Err((
                i - 1,
                format!("each DNS label in the {WHAT} must end with a letter or digit, found '-'"),
            ));
        }
        seg_start = i + 1;
    }
    Ok(())
}

/// Checks a full key: `[prefix/]name`.
fn check_key(key: &str) -> Result<(), Invalid> {
    if key.is_empty() {
        return Err((0, "label key must not be empty".to_owned()));
    }
    let slashes: Vec<usize> = key
        .chars()
        .enumerate()
        .filter(|(_, c)| *c == '/')
        .map(|(i, _)| i)
        .collect();
    match slashes.as_slice() {
        [] => check_name(key, "label key name", false),
        [slash] => {
            let (prefix, name) = key.split_once('/').unwrap_or((key, ""));
            check_prefix(prefix)?;
            check_name(name, "label key name (after '/')", false)
                .map_err(|(off, msg)| (slash + 1 + off, msg))
        }
        [_, second, ..] => Err((
            *second,
            "label key may contain at most one '/' (between prefix and name)".to_owned(),
        )),
    }
}

fn check_value(value: &str) -> Result<(), Invalid> {
    check_name(value, "label value", true)
}

/// Validates a label key and value according to the Kubernetes rules.
///
/// Errors are reported against the text `key=value`.
pub fn validate_label(key: &str, value: &str) -> Result<(), SelectorError> {
    let input = format!("{key}={value}");
    check_key(key).map_err(|(off, msg)| SelectorError::new(&input, off, msg))?;
    let value_start = key.chars().count() + 1;
    check_value(value).map_err(|(off, msg)| SelectorError::new(&input, value_start + off, msg))
}

/// Parses one `key=value` label (as given on a command line) and validates it.
pub fn parse_label(s: &str) -> Result<(String, String), SelectorError> {
    let Some((key, value)) = s.split_once('=') else {
        return Err(SelectorError::new(
            s,
            s.chars().count(),
            "expected '=' separating label key and value",
        ));
    };
    // Rebuild from the original input so the error text is exactly what the user typed.
    validate_label(key, value).map_err(|e| SelectorError::new(s, e.position, e.message))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// One term of a selector; all terms of a [`Selector`] must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals { key: String, value: String },
    NotEquals { key: String, value: String },
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    NotExists { key: String },
}

impl Requirement {
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals { key, .. }
            | Requirement::NotEquals { key, .. }
            | Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::NotExists { key } => key,
        }
    }

    /// Negative requirements match absent keys, as in Kubernetes.
    pub fn matches(&self, labels: &Labels) -> bool {
        let actual = labels.get(self.key());
        match self {
            Requirement::Equals { value, .. } => actual == Some(value),
            Requirement::NotEquals { value, .. } => actual != Some(value),
            Requirement::In { values, .. } => actual.is_some_and(|a| values.contains(a)),
            Requirement::NotIn { values, .. } => !actual.is_some_and(|a| values.contains(a)),
            Requirement::Exists { .. } => actual.is_some(),
            Requirement::NotExists { .. } => actual.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Requirement::In { key, values } => write!(f, "{key} in ({})", values.join(",")),
            Requirement::NotIn { key, values } => write!(f, "{key} notin ({})", values.join(",")),
            Requirement::Exists { key } => write!(f, "{key}"),
            Requirement::NotExists { key } => write!(f, "!{key}"),
        }
    }
}

/// A conjunction of requirements. The empty selector matches every label set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses Kubernetes label-selector syntax; an empty or blank string matches everything.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        Parser::new(s).parse_selector()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Conjunction of both selectors (repeated `-l` flags narrow the choice).
    pub fn and(mut self, other: Selector) -> Selector {
        self.requirements.extend(other.requirements);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Canonical form, e.g. `a=b,c!=d,e in (x,y),f notin (z),g,!h`; [`Selector::parse`]
/// reads it back to an equal selector (as long as `in`/`notin` lists are non-empty
/// and hold non-empty values, which the parser guarantees).
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Comma,
    LParen,
    RParen,
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("'{s}'"),
            Tok::Comma => "','".to_owned(),
            Tok::LParen => "'('".to_owned(),
            Tok::RParen => "')'".to_owned(),
            Tok::Eq => "'='".to_owned(),
            Tok::DoubleEq => "'=='".to_owned(),
            Tok::NotEq => "'!='".to_owned(),
            Tok::Bang => "'!'".to_owned(),
            Tok::End => "end of input".to_owned(),
        }
    }
}

/// Identifier characters are exactly those any valid key or value can contain, so
/// anything else is reported as an unexpected character at its own position.
fn is_ident_char(c: char) -> bool {
    is_name_char(c) || c == '/'
}

/// Recursive-descent parser with an on-demand lexer, so the first error in
/// reading order is the one reported.
struct Parser<'a> {
    input: &'a str,
    chars: Vec<char>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            chars: input.chars().collect(),
            pos: 0,
        }
    }

    fn err(&self, position: usize, message: impl Into<String>) -> SelectorError {
        SelectorError::new(self.input, position, message)
    }

    /// Lexes the token at the cursor without consuming it: (token, start, end).
    fn peek(&self) -> Result<(Tok, usize, usize), SelectorError> {
        let mut i = self.pos;
        while self.chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        let start = i;
        let Some(&c) = self.chars.get(i) else {
            return Ok((Tok::End, start, start));
        };
        let next = self.chars.get(i + 1).copied();
        let (tok, len) = match c {
            ',' => (Tok::Comma, 1),
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            '=' if next == Some('=') => (Tok::DoubleEq, 2),
            '=' => (Tok::Eq, 1),
            '!' if next == Some('=') => (Tok::NotEq, 2),
            '!' => (Tok::Bang, 1),
            c if is_ident_char(c) => {
                let mut end = i;
                while self.chars.get(end).copied().is_some_and(is_ident_char) {
                    end += 1;
                }
                let text: String = self.chars[i..end].iter().collect();
                return Ok((Tok::Ident(text), start, end));
            }
            c => return Err(self.err(start, format!("unexpected character {c:?}"))),
        };
        Ok((tok, start, start + len))
    }

    fn next(&mut self) -> Result<(Tok, usize), SelectorError> {
        let (tok, start, end) = self.peek()?;
        self.pos = end;
        Ok((tok, start))
    }

    fn parse_selector(&mut self) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        if self.peek()?.0 == Tok::End {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(self.parse_requirement()?);
            match self.next()? {
                (Tok::End, _) => return Ok(Selector { requirements }),
                (Tok::Comma, _) => {}
                (tok, at) => {
                    return Err(self.err(
                        at,
                        format!("expected ',' or end of input, found {}", tok.describe()),
                    ))
                }
            }
        }
    }

    fn parse_key(&mut self) -> Result<String, SelectorError> {
        match self.next()? {
            (Tok::Ident(key), at) => {
                check_key(&key).map_err(|(off, msg)| {
                    self.err(at + off, format!("invalid label key '{key}': {msg}"))
                })?;
                Ok(key)
            }
            (tok, at) => Err(self.err(
                at,
                format!("expected a label key, found {}", tok.describe()),
            )),
        }
    }

    fn check_value_at(&self, value: &str, at: usize) -> Result<(), SelectorError> {
        check_value(value).map_err(|(off, msg)| {
            self.err(at + off, format!("invalid label value '{value}': {msg}"))
        })
    }

    fn parse_requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.peek()?.0 == Tok::Bang {
            self.next()?;
            let key = self.parse_key()?;
            return Ok(Requirement::NotExists { key });
        }
        let key = self.parse_key()?;
        let (tok, at, _) = self.peek()?;
        match tok {
            Tok::End | Tok::Comma => Ok(Requirement::Exists { key }),
            Tok::Eq | Tok::DoubleEq | Tok::NotEq => {
                self.next()?;
                let value = self.parse_single_value()?;
                Ok(if tok == Tok::NotEq {
                    Requirement::NotEquals { key, value }
                } else {
                    Requirement::Equals { key, value }
                })
            }
            Tok::Ident(op) if op == "in" || op == "notin" => {
                self.next()?;
                let values = self.parse_value_list(&op)?;
                Ok(if op == "in" {
                    Requirement::In { key, values }
                } else {
                    Requirement::NotIn { key, values }
                })
            }
            tok => Err(self.err(
                at,
                format!(
                    "expected an operator ('=', '==', '!=', 'in', 'notin'), ',' or end of input after label key '{key}', found {}",
                    tok.describe()
                ),
            )),
        }
    }

    /// The value after `=`/`==`/`!=`; it may be empty (`k=` or `k=,...`).
    fn parse_single_value(&mut self) -> Result<String, SelectorError> {
        let (tok, at, _) = self.peek()?;
        match tok {
            Tok::End | Tok::Comma => Ok(String::new()),
            Tok::Ident(value) => {
                self.next()?;
                self.check_value_at(&value, at)?;
                Ok(value)
            }
            tok => Err(self.err(
                at,
                format!(
                    "expected a label value, ',' or end of input, found {}",
                    tok.describe()
                ),
            )),
        }
    }

    /// `( v1, v2, ... )`, non-empty. Empty entries are rejected because they have no
    /// unambiguous canonical rendering (`k in ()` would read as an empty list).
    fn parse_value_list(&mut self, op: &str) -> Result<Vec<String>, SelectorError> {
        match self.next()? {
            (Tok::LParen, _) => {}
            (tok, at) => {
                return Err(self.err(
                    at,
                    format!("expected '(' after '{op}', found {}", tok.describe()),
                ))
            }
        }
        let mut values = Vec::new();
        loop {
            match self.next()? {
                (Tok::Ident(value), at) => {
                    self.check_value_at(&value, at)?;
                    values.push(value);
                }
                (Tok::RParen, at) if values.is_empty() => {
                    return Err(self.err(
                        at,
                        format!("the value list of '{op}' must not be empty, found ')'"),
                    ))
                }
                (tok, at) => {
                    return Err(self.err(
                        at,
                        format!("expected a label value, found {}", tok.describe()),
                    ))
                }
            }
            match self.next()? {
                (Tok::Comma, _) => {}
                (Tok::RParen, _) => return Ok(values),
                (tok, at) => {
                    return Err(
                        self.err(at, format!("expected ',' or ')', found {}", tok.describe()))
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    fn parse_err(input: &str) -> SelectorError {
        match Selector::parse(input) {
            Ok(sel) => panic!("expected error for {input:?}, got {sel:?}"),
            Err(e) => e,
        }
    }

    fn assert_err(input: &str, position: usize, needle: &str) {
        let e = parse_err(input);
        assert_eq!(e.position, position, "position for {input:?}: {e}");
        assert!(
            e.message.contains(needle),
            "message for {input:?} should contain {needle:?}: {e}"
        );
        assert_eq!(e.input, input);
    }

    #[test]
    fn parses_every_operator() {
        let sel = Selector::parse("a=b,c!=d,e in (x,y),f notin (z),g,!h,i==j").unwrap();
        assert_eq!(
            sel.requirements,
            vec![
                Requirement::Equals {
                    key: s("a"),
                    value: s("b")
                },
                Requirement::NotEquals {
                    key: s("c"),
                    value: s("d")
                },
                Requirement::In {
                    key: s("e"),
                    values: vec![s("x"), s("y")]
                },
                Requirement::NotIn {
                    key: s("f"),
                    values: vec![s("z")]
                },
                Requirement::Exists { key: s("g") },
                Requirement::NotExists { key: s("h") },
                Requirement::Equals {
                    key: s("i"),
                    value: s("j")
                },
            ]
        );
        assert_eq!(sel.to_string(), "a=b,c!=d,e in (x,y),f notin (z),g,!h,i=j");
    }

    #[test]
    fn whitespace_variants_parse_equal() {
        let canonical = Selector::parse("a=b,c!=d,e in (x,y),f notin (z),g,!h").unwrap();
        for variant in [
            "  a = b , c != d , e in ( x , y ) , f notin ( z ) , g , ! h  ",
            "a==b,c!=d,e in(x,y),f notin(z),g,!h",
            "\ta=b,\nc!=d,e  in  (x,y),f\tnotin (z),g ,!h",
        ] {
            assert_eq!(Selector::parse(variant).unwrap(), canonical, "{variant:?}");
        }
    }

    #[test]
    fn empty_values_and_prefixed_keys() {
        let sel = Selector::parse("a=,b!=,example.com/board=rpi4").unwrap();
        assert_eq!(
            sel.requirements,
            vec![
                Requirement::Equals {
                    key: s("a"),
                    value: s("")
                },
                Requirement::NotEquals {
                    key: s("b"),
                    value: s("")
                },
                Requirement::Equals {
                    key: s("example.com/board"),
                    value: s("rpi4")
                },
            ]
        );
        assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        assert!(sel.matches(&labels(&[
            ("a", ""),
            ("b", "x"),
            ("example.com/board", "rpi4")
        ])));
        assert!(!sel.matches(&labels(&[("a", "x"), ("example.com/board", "rpi4")])));
    }

    #[test]
    fn keywords_are_usable_as_keys_and_values() {
        let sel = Selector::parse("in=notin,notin,in in (in,notin)").unwrap();
        assert_eq!(
            sel.requirements,
            vec![
                Requirement::Equals {
                    key: s("in"),
                    value: s("notin")
                },
                Requirement::Exists { key: s("notin") },
                Requirement::In {
                    key: s("in"),
                    values: vec![s("in"), s("notin")]
                },
            ]
        );
    }

    #[test]
    fn matching_each_operator() {
        let l = labels(&[("board", "rpi4"), ("arch", "arm64")]);
        let m = |sel: &str| Selector::parse(sel).unwrap().matches(&l);
        assert!(m("board=rpi4"));
        assert!(m("board==rpi4"));
        assert!(!m("board=rpi3"));
        assert!(!m("missing=rpi4"));
        assert!(m("board!=rpi3"));
        assert!(!m("board!=rpi4"));
        assert!(m("arch in (amd64,arm64)"));
        assert!(!m("arch in (amd64)"));
        assert!(!m("missing in (amd64)"));
        assert!(m("arch notin (amd64)"));
        assert!(!m("arch notin (amd64,arm64)"));
        assert!(m("board"));
        assert!(!m("missing"));
        assert!(m("!missing"));
        assert!(!m("!board"));
        assert!(m("board=rpi4,arch in (arm64),!reserved"));
        assert!(!m("board=rpi4,arch in (amd64)"));
    }

    #[test]
    fn negative_operators_match_absent_keys() {
        let l = labels(&[("board", "rpi4")]);
        assert!(Selector::parse("arch!=arm64").unwrap().matches(&l));
        assert!(Selector::parse("arch notin (arm64,amd64)")
            .unwrap()
            .matches(&l));
        assert!(Selector::parse("arch!=arm64")
            .unwrap()
            .matches(&Labels::new()));
        // `k!=` (empty value) excludes only boards that carry an empty `k`.
        assert!(Selector::parse("arch!=").unwrap().matches(&l));
        assert!(!Selector::parse("arch!=")
            .unwrap()
            .matches(&labels(&[("arch", "")])));
    }

    #[test]
    fn empty_selector_matches_everything() {
        for input in ["", "   ", "\t\n "] {
            let sel = Selector::parse(input).unwrap();
            assert!(sel.is_empty());
            assert!(sel.matches(&Labels::new()));
            assert!(sel.matches(&labels(&[("a", "b")])));
            assert_eq!(sel.to_string(), "");
        }
        assert_eq!(Selector::default(), Selector::parse("").unwrap());
        assert!(!Selector::parse("a").unwrap().is_empty());
    }

    #[test]
    fn and_is_conjunction() {
        let a: Selector = "board=rpi4".parse().unwrap();
        let b: Selector = "arch in (arm64)".parse().unwrap();
        let both = a.clone().and(b.clone());
        assert_eq!(both.requirements.len(), 2);
        assert_eq!(both.to_string(), "board=rpi4,arch in (arm64)");
        assert!(both.matches(&labels(&[("board", "rpi4"), ("arch", "arm64")])));
        assert!(!both.matches(&labels(&[("board", "rpi4"), ("arch", "amd64")])));
        assert!(!both.matches(&labels(&[("board", "rpi3"), ("arch", "arm64")])));
        assert_eq!(a.clone().and(Selector::default()), a);
        assert_eq!(Selector::default().and(b.clone()), b);
    }

    #[test]
    fn error_positions_and_messages() {
        assert_err("board=rpi4,,arch", 11, "expected a label key, found ','");
        assert_err(
            "board in (a,b",
            13,
            "expected ',' or ')', found end of input",
        );
        assert_err(
            "board in (a,b   ",
            16,
            "expected ',' or ')', found end of input",
        );
        assert_err("board ~ x", 6, "unexpected character '~'");
        assert_err(
            "board=rpi4,",
            11,
            "expected a label key, found end of input",
        );
        assert_err(",a", 0, "expected a label key, found ','");
        assert_err("a in ()", 6, "must not be empty");
        assert_err("a notin ()", 9, "must not be empty");
        assert_err("a in (x,)", 8, "expected a label value, found ')'");
        assert_err("a in (x,,y)", 8, "expected a label value, found ','");
        assert_err("a in x", 5, "expected '(' after 'in', found 'x'");
        assert_err(
            "a notin",
            7,
            "expected '(' after 'notin', found end of input",
        );
        assert_err("a in (x y)", 8, "expected ',' or ')', found 'y'");
        assert_err("a b", 2, "expected an operator");
        assert_err("a(b)", 1, "found '('");
        assert_err("a=b c", 4, "expected ',' or end of input, found 'c'");
        assert_err(
            "a=(b)",
            2,
            "expected a label value, ',' or end of input, found '('",
        );
        assert_err("a===b", 3, "found '='");
        assert_err("!a=b", 2, "expected ',' or end of input, found '='");
        assert_err("!", 1, "expected a label key, found end of input");
        assert_err("!!a", 1, "expected a label key, found '!'");
        assert_err("a)", 1, "found ')'");
        assert_err("a=b,é=x", 4, "unexpected character 'é'");
        // Positions are in characters, not bytes.
        assert_err("a in (é)", 6, "unexpected character 'é'");
    }

    #[test]
    fn invalid_keys_and_values_explain_why() {
        assert_err(
            "-bad=x",
            0,
            "must start with an alphanumeric character, found '-'",
        );
        assert_err("-bad=x", 0, "invalid label key '-bad'");
        assert_err("x,bad-=x", 5, "must end with an alphanumeric character");
        assert_err("a/b/c=x", 3, "at most one '/'");
        assert_err("/b=x", 0, "prefix before '/' must not be empty");
        assert_err("a/=x", 2, "must not be empty");
        assert_err("Example.com/b=x", 0, "must be lowercase, found 'E'");
        assert_err(
            "ex_ample.com/b=x",
            2,
            "invalid character '_' in label key prefix",
        );
        assert_err("example..com/b=x", 8, "empty DNS label");
        assert_err("-x.com/b", 0, "must start with a letter or digit");
        assert_err("x-.com/b", 1, "must end with a letter or digit");
        assert_err("a=-x", 2, "invalid label value '-x'");
        assert_err(
            "a in (ok,x_)",
            10,
            "must end with an alphanumeric character",
        );
        let long = "k".repeat(64);
        assert_err(&format!("a={long}"), 2, "at most 63 characters, found 64");
        assert_err(&format!("{long}=a"), 0, "at most 63 characters, found 64");
        assert!(Selector::parse(&format!("{}={}", "k".repeat(63), "v".repeat(63))).is_ok());
    }

    #[test]
    fn error_display_names_position_and_input() {
        let e = parse_err("board=rpi4,,arch");
        let text = e.to_string();
        assert!(text.contains("position 11"), "{text}");
        assert!(text.contains("\"board=rpi4,,arch\""), "{text}");
        assert!(text.contains("expected a label key"), "{text}");
    }

    #[test]
    fn validate_label_rules() {
        assert!(validate_label("board", "rpi4").is_ok());
        assert!(validate_label("board", "").is_ok());
        assert!(validate_label("jumpstarter.dev/board", "Rpi_4.b-x").is_ok());
        assert!(validate_label("a.b-c.d/N_a.m-e", "v").is_ok());
        assert!(validate_label(&"k".repeat(63), &"v".repeat(63)).is_ok());
        let prefix = format!("{}.com", "a".repeat(249));
        assert!(validate_label(&format!("{prefix}/k"), "").is_ok());

        let e = validate_label(&"k".repeat(64), "v").unwrap_err();
        assert_eq!(e.position, 0);
        assert!(e.message.contains("at most 63"), "{e}");
        let e = validate_label("k", &"v".repeat(64)).unwrap_err();
        assert_eq!(e.position, 2);
        assert!(e.message.contains("at most 63"), "{e}");
        let e = validate_label(&format!("a{prefix}/k"), "").unwrap_err();
        assert!(e.message.contains("at most 253"), "{e}");

        let e = validate_label("", "v").unwrap_err();
        assert!(e.message.contains("must not be empty"), "{e}");
        let e = validate_label("bo ard", "v").unwrap_err();
        assert_eq!(e.position, 2);
        assert!(e.message.contains("invalid character ' '"), "{e}");
        let e = validate_label("board", "rpi 4").unwrap_err();
        assert_eq!(e.position, 9);
        let e = validate_label("bøard", "v").unwrap_err();
        assert_eq!(e.position, 1);
        let e = validate_label("Foo.com/x", "v").unwrap_err();
        assert!(e.message.contains("lowercase"), "{e}");
        let e = validate_label("foo.com/-x", "v").unwrap_err();
        assert_eq!(e.position, 8);
        let e = validate_label("k", "_v").unwrap_err();
        assert_eq!(e.position, 2);
        assert!(e.message.contains("start with an alphanumeric"), "{e}");
        assert_eq!(e.input, "k=_v");
    }

    #[test]
    fn parse_label_rules() {
        assert_eq!(parse_label("board=rpi4").unwrap(), (s("board"), s("rpi4")));
        assert_eq!(parse_label("board=").unwrap(), (s("board"), s("")));
        assert_eq!(
            parse_label("lab.example.com/rack=r-12").unwrap(),
            (s("lab.example.com/rack"), s("r-12"))
        );
        let e = parse_label("board").unwrap_err();
        assert_eq!(e.position, 5);
        assert!(e.message.contains("expected '='"), "{e}");
        let e = parse_label("board=a=b").unwrap_err();
        assert_eq!(e.position, 7);
        assert_eq!(e.input, "board=a=b");
        let e = parse_label("=x").unwrap_err();
        assert_eq!(e.position, 0);
        let e = parse_label("board=rpi4!").unwrap_err();
        assert_eq!(e.position, 10);
    }

    // ---- property tests ----

    fn arb_name() -> impl Strategy<Value = String> + Clone {
        prop_oneof![
            "[A-Za-z0-9]",
            "[A-Za-z0-9][A-Za-z0-9._-]{0,61}[A-Za-z0-9]",
            Just(s("in")),
            Just(s("notin")),
        ]
    }

    fn arb_key() -> impl Strategy<Value = String> + Clone {
        let prefix = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,4}[a-z0-9])?){0,3}";
        (proptest::option::of(prefix), arb_name()).prop_map(|(p, n)| match p {
            Some(p) => format!("{p}/{n}"),
            None => n,
        })
    }

    fn arb_value() -> impl Strategy<Value = String> + Clone {
        prop_oneof![1 => Just(String::new()), 4 => arb_name()]
    }

    fn arb_requirement() -> impl Strategy<Value = Requirement> {
        let values = proptest::collection::vec(arb_name(), 1..4);
        prop_oneof![
            (arb_key(), arb_value()).prop_map(|(key, value)| Requirement::Equals { key, value }),
            (arb_key(), arb_value()).prop_map(|(key, value)| Requirement::NotEquals { key, value }),
            (arb_key(), values.clone()).prop_map(|(key, values)| Requirement::In { key, values }),
            (arb_key(), values).prop_map(|(key, values)| Requirement::NotIn { key, values }),
            arb_key().prop_map(|key| Requirement::Exists { key }),
            arb_key().prop_map(|key| Requirement::NotExists { key }),
        ]
    }

    fn arb_selector() -> impl Strategy<Value = Selector> {
        proptest::collection::vec(arb_requirement(), 0..6)
            .prop_map(|requirements| Selector { requirements })
    }

    /// Abstract requirement over a tiny alphabet, so random labels often hit.
    #[derive(Debug, Clone)]
    enum Op {
        Eq(String),
        DoubleEq(String),
        Ne(String),
        In(Vec<String>),
        NotIn(Vec<String>),
        Exists,
        NotExists,
    }

    fn small_key() -> impl Strategy<Value = String> + Clone {
        prop_oneof![Just(s("a")), Just(s("b")), Just(s("c"))]
    }

    fn small_value() -> impl Strategy<Value = String> + Clone {
        prop_oneof![Just(s("x")), Just(s("y")), Just(s("z"))]
    }

    fn small_value_or_empty() -> impl Strategy<Value = String> + Clone {
        prop_oneof![Just(String::new()), small_value()]
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let list = proptest::collection::vec(small_value(), 1..3);
        prop_oneof![
            small_value_or_empty().prop_map(Op::Eq),
            small_value_or_empty().prop_map(Op::DoubleEq),
            small_value_or_empty().prop_map(Op::Ne),
            list.clone().prop_map(Op::In),
            list.prop_map(Op::NotIn),
            Just(Op::Exists),
            Just(Op::NotExists),
        ]
    }

    fn ws() -> impl Strategy<Value = String> + Clone {
        "[ \t]{0,2}"
    }

    /// Renders with random whitespace, to exercise the lexer as well.
    fn render(key: &str, op: &Op, w: &[String; 4]) -> String {
        let [w0, w1, w2, w3] = w;
        match op {
            Op::Eq(v) => format!("{w0}{key}{w1}={w2}{v}{w3}"),
            Op::DoubleEq(v) => format!("{w0}{key}{w1}=={w2}{v}{w3}"),
            Op::Ne(v) => format!("{w0}{key}{w1}!={w2}{v}{w3}"),
            Op::In(vs) => format!(
                "{w0}{key} in{w1}({w2}{}{w3}){w3}",
                vs.join(&format!("{w1},{w2}"))
            ),
            Op::NotIn(vs) => {
                format!(
                    "{w0}{key} notin{w1}({w2}{}{w3}){w3}",
                    vs.join(&format!("{w1},{w2}"))
                )
            }
            Op::Exists => format!("{w0}{key}{w3}"),
            Op::NotExists => format!("{w0}!{w1}{key}{w3}"),
        }
    }

    /// Deliberately naive: scans the label list instead of using map lookups.
    fn reference_eval(key: &str, op: &Op, labels: &Labels) -> bool {
        let mut found: Option<&str> = None;
        for (k, v) in labels.iter() {
            if k == key {
                found = Some(v);
            }
        }
        match (op, found) {
            (Op::Eq(want) | Op::DoubleEq(want), Some(v)) => v == want,
            (Op::Eq(_) | Op::DoubleEq(_), None) => false,
            (Op::Ne(want), Some(v)) => v != want,
            (Op::Ne(_), None) => true,
            (Op::In(vs), Some(v)) => vs.iter().any(|x| x == v),
            (Op::In(_), None) => false,
            (Op::NotIn(vs), Some(v)) => vs.iter().all(|x| x != v),
            (Op::NotIn(_), None) => true,
            (Op::Exists, found) => found.is_some(),
            (Op::NotExists, found) => found.is_none(),
        }
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(sel in arb_selector()) {
            let text = sel.to_string();
            let parsed = Selector::parse(&text);
            prop_assert_eq!(parsed.as_ref(), Ok(&sel), "text: {:?}", text);
            prop_assert_eq!(parsed.map(|p| p.to_string()), Ok(text));
        }

        #[test]
        fn parse_never_panics_on_arbitrary_strings(input in any::<String>()) {
            if let Err(e) = Selector::parse(&input) {
                prop_assert!(e.position <= input.chars().count());
            }
        }

        #[test]
        fn parse_never_panics_on_selector_like_strings(
            input in "[a-c/.=!,() \t_-]{0,12}(in|notin)?[a-c/.=!,() é~_-]{0,12}"
        ) {
            match Selector::parse(&input) {
                Err(e) => prop_assert!(e.position <= input.chars().count()),
                Ok(sel) => prop_assert_eq!(Selector::parse(&sel.to_string()), Ok(sel)),
            }
        }

        #[test]
        fn validate_label_never_panics(key in any::<String>(), value in any::<String>()) {
            if let Err(e) = validate_label(&key, &value) {
                prop_assert!(e.position <= e.input.chars().count());
            }
        }

        #[test]
        fn matches_agrees_with_reference(
            reqs in proptest::collection::vec(
                (small_key(), arb_op(), [ws(), ws(), ws(), ws()]), 0..5),
            pairs in proptest::collection::vec((small_key(), small_value_or_empty()), 0..4),
        ) {
            let text = reqs
                .iter()
                .map(|(k, op, w)| render(k, op, w))
                .collect::<Vec<_>>()
                .join(",");
            let sel = Selector::parse(&text);
            prop_assert!(sel.is_ok(), "{:?} failed: {:?}", text, sel);
            let sel = sel.unwrap();
            prop_assert_eq!(sel.requirements.len(), reqs.len());
            let labels: Labels = pairs.into_iter().collect();
            let expected = reqs.iter().all(|(k, op, _)| reference_eval(k, op, &labels));
            prop_assert_eq!(sel.matches(&labels), expected, "{:?} on {:?}", text, labels);
        }
    }
}
