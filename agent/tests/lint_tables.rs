//! Every crate takes the lint set of the root `Cargo.toml`
//! (`[lints] workspace = true`), and `fuzz/Cargo.toml`, a workspace of its
//! own, repeats the root's `[workspace.lints]` table, so CI lints both
//! workspaces with the same set (docs/architecture.md, "Lints").

use std::path::Path;

fn manifest(path: &str) -> toml::Table {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn workspace_lints(path: &str) -> toml::Value {
    manifest(path)["workspace"]
        .get("lints")
        .cloned()
        .unwrap_or_else(|| panic!("{path} has no [workspace.lints]"))
}

#[test]
fn fuzz_workspace_repeats_the_root_lint_table() {
    assert_eq!(
        workspace_lints("fuzz/Cargo.toml"),
        workspace_lints("Cargo.toml")
    );
}

#[test]
fn every_crate_takes_the_workspace_lints() {
    for path in [
        "proto/Cargo.toml",
        "agent/Cargo.toml",
        "tests/Cargo.toml",
        "fuzz/Cargo.toml",
    ] {
        let lints = manifest(path).get("lints").cloned();
        assert_eq!(
            lints.and_then(|l| l.get("workspace").cloned()),
            Some(toml::Value::Boolean(true)),
            "{path} lacks [lints] workspace = true"
        );
    }
}
