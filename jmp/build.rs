//! The board page's assets (`jmp web`), built into the binary: the project's own files from
//! `web/src/` and the third-party browser code that `npm ci` in `web/` installs from the
//! lockfile (`scripts/install-test-deps.sh` runs it). Each asset is embedded raw and gzipped,
//! so the page is served compressed without compressing on every request.

use std::io::Write;
use std::path::{Path, PathBuf};

/// (name served under `assets/`, file under `web/`, content type)
const ASSETS: &[(&str, &str, &str)] = &[
    ("board.html", "src/board.html", "text/html; charset=utf-8"),
    ("board.js", "src/board.js", "text/javascript; charset=utf-8"),
    ("style.css", "src/style.css", "text/css; charset=utf-8"),
    (
        "xterm.js",
        "node_modules/@xterm/xterm/lib/xterm.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "xterm.css",
        "node_modules/@xterm/xterm/css/xterm.css",
        "text/css; charset=utf-8",
    ),
    (
        "addon-fit.js",
        "node_modules/@xterm/addon-fit/lib/addon-fit.js",
        "text/javascript; charset=utf-8",
    ),
];

fn main() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!(
        "cargo:rerun-if-changed={}",
        web.join("package-lock.json").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        web.join("node_modules").display()
    );
    // A build without the npm packages still gives a whole jmp (the quick start's
    // `scripts/demo.sh` on a machine without node): only `jmp web` refuses, naming the fix.
    // The web pages' e2e test fails on such a build, so CI cannot pass without them.
    let missing = ASSETS.iter().find_map(|(_, rel, _)| {
        let src = web.join(rel);
        (!src.is_file()).then(|| src.display().to_string())
    });
    if let Some(m) = missing {
        println!(
            "cargo:warning=jmp web's asset {m} is missing: `jmp web` will refuse to start. The board page's browser code comes from npm through web/package-lock.json: run `npm ci` in web/ (scripts/install-test-deps.sh does) and build again."
        );
        let table = format!(
            "pub static ASSETS: &[Asset] = &[];\npub static MISSING_ASSETS: Option<&str> = Some({m:?});\n"
        );
        std::fs::write(out.join("assets.rs"), table).expect("write assets.rs");
        return;
    }
    let mut table = String::from(
        "pub static MISSING_ASSETS: Option<&str> = None;\npub static ASSETS: &[Asset] = &[\n",
    );
    for (name, rel, ty) in ASSETS {
        let src = web.join(rel);
        println!("cargo:rerun-if-changed={}", src.display());
        let raw = std::fs::read(&src).expect("asset checked above");
        let gz_path = out.join(format!("{name}.gz"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&raw).expect("gzip");
        std::fs::write(&gz_path, gz.finish().expect("gzip")).expect("write gz");
        let src = src.canonicalize().expect("canonical path");
        table.push_str(&format!(
            "    Asset {{ name: {name:?}, content_type: {ty:?}, raw: include_bytes!({:?}), gzip: include_bytes!({:?}) }},\n",
            src.display().to_string(),
            gz_path.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("assets.rs"), table).expect("write assets.rs");
}
