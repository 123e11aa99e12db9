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
    let mut table = String::from("pub static ASSETS: &[Asset] = &[\n");
    for (name, rel, ty) in ASSETS {
        let src = web.join(rel);
        println!("cargo:rerun-if-changed={}", src.display());
        let raw = std::fs::read(&src).unwrap_or_else(|e| {
            panic!(
                "\n\njmp web's asset {} is missing ({e}).\nThe board page's browser code comes from npm through web/package-lock.json: run `npm ci` in web/ (scripts/install-test-deps.sh does) and build again.\n\n",
                src.display()
            )
        });
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
