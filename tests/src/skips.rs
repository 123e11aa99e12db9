//! A test that cannot run here fails, naming what is missing. On this project's machines
//! (root, TUN, FUSE, network namespaces, `scripts/install-test-deps.sh` run) every test runs; a
//! test that skipped would be a failure nobody sees.
//!
//! The one exception is a test that genuinely cannot run on these machines: it is listed, with
//! the reason, in `tests/SKIPS.md` (reviewed like code). Such a test prints
//! `SKIP: [<id>] <what is missing>` and passes; `scripts/test.sh` fails the run if a SKIP line
//! names a test the list does not.

use std::collections::HashMap;
use std::sync::OnceLock;

/// The reviewed list, relative to the workspace root.
pub const LIST: &str = "tests/SKIPS.md";

/// This test's id as the list names it: `<test target>::<test path>`, e.g.
/// `python::an_interrupted_pytest_gives_the_board_back` (libtest names each test's thread after
/// the test; the target is the test binary's name without cargo's hash).
pub fn test_id() -> String {
    let exe = std::env::current_exe().ok();
    let target = exe
        .as_deref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(|n| n.rsplit_once('-').map(|(t, _)| t).unwrap_or(n).to_string())
        .unwrap_or_else(|| "?".into());
    let test = std::thread::current().name().unwrap_or("?").to_string();
    format!("{target}::{test}")
}

/// The listed tests and their reasons: the rows of the list's table whose first cell is a test
/// id in backquotes.
pub fn listed() -> &'static HashMap<String, String> {
    static LISTED: OnceLock<HashMap<String, String>> = OnceLock::new();
    LISTED.get_or_init(|| {
        let path = crate::workspace_root().join(LIST);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        parse(&text)
    })
}

fn parse(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .strip_prefix('|')?
                .split('|')
                .map(str::trim)
                .collect();
            let id = cells.first()?.strip_prefix('`')?.strip_suffix('`')?;
            let reason = cells.get(1).copied().unwrap_or("").to_string();
            Some((id.to_string(), reason))
        })
        .collect()
}

/// The current test cannot run here because of `missing`: panics naming it, unless the list
/// names this test (then prints the SKIP line and returns; the caller returns too, see
/// [`require!`](crate::require)).
pub fn unavailable(missing: &str) {
    let id = test_id();
    match listed().get(&id) {
        Some(reason) => {
            let line = format!("SKIP: [{id}] {missing} (listed in {LIST}: {reason})");
            println!("{line}");
            crate::raw_stderr(&line);
        }
        None => panic!(
            "{id} cannot run here: {missing}. On this project's machines every test runs \
             (as root, after scripts/install-test-deps.sh); a test that genuinely cannot is \
             listed with its reason in {LIST}"
        ),
    }
}

/// `require!(check)`: `check` is a `Result<T, String>` saying whether what the test needs is
/// here. `Ok(v)` gives `v`; `Err(missing)` fails the test naming what is missing, unless
/// `tests/SKIPS.md` lists the test, in which case it prints a SKIP line and returns from the
/// test.
#[macro_export]
macro_rules! require {
    ($check:expr) => {
        match $check {
            Ok(v) => v,
            Err(missing) => {
                $crate::skips::unavailable(&missing);
                return;
            }
        }
    };
}

/// `Ok` if `tool` is on PATH, else what is missing and how to get it.
pub fn tool(tool: &str) -> Result<std::path::PathBuf, String> {
    crate::which(tool).ok_or_else(|| {
        format!("{tool} is not installed (scripts/install-test-deps.sh installs it)")
    })
}

/// `Ok` if this process runs as root.
pub fn root() -> Result<(), String> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err("this test needs root".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_to_ids_and_reasons() {
        let t = "# x\n\n| test | reason |\n|---|---|\n| `can_guest::a_b` | no KVM here |\n| not an id | x |\n";
        let m = parse(t);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m["can_guest::a_b"], "no KVM here");
        // The repository's list parses, and every id in it names a target and a test.
        for id in listed().keys() {
            assert!(id.contains("::"), "{LIST}: {id:?} is not <target>::<test>");
        }
    }

    #[test]
    fn an_unlisted_test_that_cannot_run_fails() {
        let id = test_id();
        assert!(
            id.ends_with("::skips::tests::an_unlisted_test_that_cannot_run_fails"),
            "{id}"
        );
        assert!(!listed().contains_key(&id));
        let r = std::panic::catch_unwind(|| unavailable("a tool this test made up"));
        assert!(r.is_err(), "an unlisted skip must fail the test");
    }
}
