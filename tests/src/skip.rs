//! Skips that are seen: the one way a test skips for something the machine
//! lacks. The skip is printed (`SKIP <test>: <reason>`), appended to the
//! file named by `SEVPLACE_SKIP_LOG` (scripts/test-all.sh sets it and
//! prints the count and names at the end), and under `CI=true` it fails the
//! test unless the need is in tests/ci-may-lack.txt.
//!
//! This file is also compiled into the agent's own tests (`#[path]`
//! modules), so every skip in the workspace goes through it.

/// tests/ci-may-lack.txt: `need<TAB>why` lines, `#` comments.
const CI_MAY_LACK: &str = include_str!("../ci-may-lack.txt");

/// The needs a CI machine may lack.
fn ci_may_lack() -> impl Iterator<Item = &'static str> {
    CI_MAY_LACK
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
}

/// Whether a test that lacks `need` may skip: always outside CI, under CI
/// only for a need on the list.
fn may_skip(need: &str, ci: bool) -> bool {
    !ci || ci_may_lack().any(|n| n == need)
}

/// Skips `test`, which lacks `need` (a key such as `kvm`, `root`,
/// `cgroup-v1-cpuset`), for `reason`. The caller returns right after.
///
/// # Panics
/// Under `CI=true` when `need` is not in tests/ci-may-lack.txt: CI machines
/// have it, so its absence is a failure.
pub fn skip(test: &str, need: &str, reason: impl std::fmt::Display) {
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("SEVPLACE_SKIP_LOG") {
        use std::io::Write;
        // One write of one line with O_APPEND: parallel tests do not
        // interleave.
        let flat = |s: &str| s.replace(['\n', '\t'], " ");
        let record = format!(
            "{}\t{}\t{}\n",
            flat(test),
            flat(need),
            flat(&reason.to_string())
        );
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(record.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot record the skip in {}: {e}", log.to_string_lossy());
        }
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        may_skip(need, ci),
        "{line}; under CI=true this is a failure: CI machines have {need:?} \
         (tests/ci-may-lack.txt lists what they may lack)"
    );
}

#[cfg(test)]
mod skip_policy {
    use super::*;

    #[test]
    fn outside_ci_every_need_may_skip() {
        assert!(may_skip("kvm", false));
        assert!(may_skip("nested-svm", false));
    }

    #[test]
    fn under_ci_only_listed_needs_may_skip() {
        assert!(may_skip("nested-svm", true));
        assert!(may_skip("host-module-loading", true));
        for need in [
            "kvm",
            "root",
            "cgroup-v1-cpuset",
            "promtool",
            "qemu",
            "pypi",
        ] {
            assert!(!may_skip(need, true), "{need}");
        }
    }

    #[test]
    fn the_list_has_a_reason_for_each_need() {
        for line in CI_MAY_LACK.lines().filter(|l| !l.starts_with('#')) {
            if line.trim().is_empty() {
                continue;
            }
            let (need, why) = line.split_once('\t').expect("need<TAB>why");
            assert!(!need.is_empty() && !why.trim().is_empty(), "{line:?}");
        }
    }
}
