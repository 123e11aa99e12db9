//! Every example config shipped in examples/ parses and validates (an example that does not
//! work is worse than none).

use jmp_exporter::ExporterConfig;

#[test]
fn shipped_examples_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("examples/ exists") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "yaml") {
            ExporterConfig::load(&p).unwrap_or_else(|err| panic!("{err}"));
            n += 1;
        }
    }
    assert!(n >= 2, "expected the shipped examples in {}", dir.display());
}

#[test]
fn systemd_units_use_check_config_and_existing_flags() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in ["jmpd.service", "jmpd@.service"] {
        let text = std::fs::read_to_string(dir.join(unit)).expect("unit exists");
        assert!(
            text.contains("--check-config"),
            "{unit} validates before start"
        );
        assert!(text.contains("Restart=always"), "{unit} restarts");
    }
}
