//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every
//! input that once failed a fuzz target (`fuzz/regressions/<target>/`)
//! through the same checks as the `cargo fuzz` targets, so
//! `cargo test` covers them on stable Rust without cargo-fuzz.

use std::path::{Path, PathBuf};

use sevplace::fuzzing::{self, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs every file of `dir/<target>/` through its target's check; returns
/// the number of files. A directory that names no target is an error.
fn replay(dir: &Path) -> usize {
    let mut files = 0;
    let Ok(targets) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in targets {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let check = fuzzing::target(&name)
            .unwrap_or_else(|| panic!("{} names no fuzz target", entry.path().display()));
        let mut paths: Vec<PathBuf> = std::fs::read_dir(entry.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails its check", path.display());
            files += 1;
        }
    }
    files
}

#[test]
fn every_target_has_a_seed_corpus() {
    for (name, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let n = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        assert!(n > 0, "{} is empty", dir.display());
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "no fuzz target file for {name}"
        );
    }
}

#[test]
fn corpus_passes_the_checks() {
    assert!(replay(&fuzz_dir().join("corpus")) > 0);
}

#[test]
fn regressions_pass_the_checks() {
    replay(&fuzz_dir().join("regressions"));
}

/// Found by the checkpoint target's order property: a document with a
/// valid checksum whose intents are out of order or repeated was accepted,
/// and `Checkpoint::upsert` (a binary search) then kept duplicate intents.
#[test]
fn checkpoint_with_unsorted_or_repeated_intents_is_corrupt() {
    for name in ["unsorted-intents", "repeated-intent"] {
        let path = fuzz_dir().join("regressions/checkpoint").join(name);
        let data = std::fs::read(&path).unwrap();
        match sevplace::state::decode(&data) {
            Err(sevplace::state::DecodeFault::Corrupt(what)) => {
                assert!(what.contains("not sorted by vm_id"), "{what}")
            }
            other => panic!("{}: {other:?}", path.display()),
        }
    }
}
