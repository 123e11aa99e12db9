//! The device-kind seam holds: outside a kind's two homes (`devices/src/<kind>/` and
//! `protocol/src/kinds/<kind>.rs`), no library or binary code names a kind, except its one line
//! in each registry (`devices/src/registry.rs`, `protocol/src/kinds/mod.rs`). The storage
//! kind's standalone FUSE binary (`jmp-mount/`) counts as the storage kind's home. Tests,
//! benchmarks and fuzz targets may name kinds (they exercise them); a source file's test module
//! (from its first `#[cfg(test)]`) counts as a test.
//!
//! What "names a kind" means here: `Kind::<Variant>`, `kinds::<module>`, a path into its folder
//! (`crate::<module>::`, `jmp_devices::<module>::`, `registry::<module>::`) or one of its
//! types (`<Stem>Spec`, `<Stem>Config`, `<Stem>Bridge`, `<Stem>Driver`, `<Stem>Verb`,
//! `<Stem>Cmd`, `<Stem>Args`).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The workspace's library and binary sources, relative to the root.
fn sources(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let r = rel.join(&name);
        if p.is_dir() {
            // Tests, benchmarks, fuzz targets and build output exercise kinds by name.
            if matches!(
                name.as_str(),
                "target" | "tests" | "benches" | "fuzz" | ".git" | "python" | "node_modules"
            ) {
                continue;
            }
            sources(&p, &r, out);
        } else if name.ends_with(".rs") && name != "tests.rs" {
            out.push(r);
        }
    }
}

fn stem(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `line` has `pat` as a whole word (not inside a longer identifier).
fn names(line: &str, pat: &str) -> bool {
    line.match_indices(pat).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + pat.len()..].chars().next();
        let open_start = pat.starts_with(|c: char| !is_ident(c)) || !before.is_some_and(is_ident);
        let open_end = pat.ends_with(|c: char| !is_ident(c)) || !after.is_some_and(is_ident);
        open_start && open_end
    })
}

#[test]
fn no_kind_is_named_outside_its_homes_but_one_registry_line() {
    let root = root();
    let mut files = Vec::new();
    sources(&root, Path::new(""), &mut files);
    assert!(files.len() > 50, "found only {} sources", files.len());
    let mut wrong = Vec::new();
    for w in jmp_protocol::kinds::WIRE {
        let module = w.module;
        let variant = format!("{:?}", w.kind);
        let mut pats = vec![
            format!("Kind::{variant}"),
            format!("kinds::{module}"),
            format!("crate::{module}::"),
            format!("jmp_devices::{module}::"),
            format!("registry::{module}::"),
        ];
        for s in [variant.clone(), stem(module)] {
            for suffix in ["Spec", "Config", "Bridge", "Driver", "Verb", "Cmd", "Args"] {
                pats.push(format!("{s}{suffix}"));
            }
        }
        let homes = [
            format!("devices/src/{module}/"),
            format!("protocol/src/kinds/{module}.rs"),
        ];
        let mut registry_lines = 0;
        for f in &files {
            let rel = f.to_string_lossy();
            if homes.iter().any(|h| rel.starts_with(h.as_str()))
                || (w.kind == jmp_protocol::Kind::Storage && rel.starts_with("jmp-mount/"))
            {
                continue;
            }
            let text = std::fs::read_to_string(root.join(f)).expect("read");
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let is_registry =
                rel == "devices/src/registry.rs" || rel == "protocol/src/kinds/mod.rs";
            for (n, line) in code.lines().enumerate() {
                if is_registry && line.trim_start().starts_with(&format!("{variant} =>")) {
                    registry_lines += 1;
                    continue;
                }
                // `crate::<module>::` means the kind's folder only inside jmp-devices.
                let in_devices = rel.starts_with("devices/");
                if !pats
                    .iter()
                    .filter(|p| in_devices || !p.starts_with("crate::"))
                    .any(|p| names(line, p))
                {
                    continue;
                }
                wrong.push(format!("{rel}:{}: names {variant}: {}", n + 1, line.trim()));
            }
        }
        assert_eq!(
            registry_lines, 2,
            "{variant}: expected one line in each registry (devices/src/registry.rs, protocol/src/kinds/mod.rs)"
        );
    }
    assert!(
        wrong.is_empty(),
        "kinds named outside their homes:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_word_matcher_sees_whole_names_only() {
    assert!(names("x = Kind::Can;", "Kind::Can"));
    assert!(!names("x = Kind::Canary;", "Kind::Can"));
    assert!(names("use crate::net::pump;", "crate::net::"));
    assert!(!names("use std::net::Ipv4Addr;", "crate::net::"));
    assert!(!names("SerialSpecial", "SerialSpec"));
}
