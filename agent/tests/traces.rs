//! Every trace shipped in `agent/traces/` parses, and parses to the same
//! trace as when it was recorded: `agent/tests/fixtures/traces/<file>.json`
//! holds each parsed trace as JSON, written by serde_yaml 0.9 before the
//! YAML parser was replaced (re-record with `SEVPLACE_RECORD_TRACES=1`
//! after a deliberate change to a trace file).

use std::path::{Path, PathBuf};

use sevplace::simulate::{shipped_trace_specs, Trace};

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest().join("traces"))
        .expect("agent/traces")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "json")
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_trace_parses_as_recorded() {
    let files = shipped_files();
    assert!(
        files
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "yaml")),
        "a YAML trace is shipped: {files:?}"
    );
    let record = std::env::var_os("SEVPLACE_RECORD_TRACES").is_some();
    for path in &files {
        let trace = Trace::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!trace.events.is_empty(), "{}", path.display());
        let parsed = serde_json::to_value(&trace).expect("trace as JSON");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let expected_path = manifest()
            .join("tests/fixtures/traces")
            .join(format!("{name}.json"));
        if record {
            std::fs::create_dir_all(expected_path.parent().expect("parent")).unwrap();
            let text = serde_json::to_string_pretty(&parsed).unwrap() + "\n";
            std::fs::write(&expected_path, text).unwrap();
        }
        let text = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let expected: serde_json::Value = serde_json::from_str(&text).expect("recorded JSON");
        assert_eq!(parsed, expected, "{} parses differently", path.display());
    }
    // Every shipped file is one the generator describes, and back.
    let mut specs: Vec<&str> = shipped_trace_specs().iter().map(|s| s.file).collect();
    specs.sort_unstable();
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    assert_eq!(specs, names);
}
