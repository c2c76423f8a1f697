//! Runs every shipped trace on its fixture through the CLI entry point
//! (`sevplacectl simulate --trace FILE --topology ROOT --json`) and checks
//! the invariants of the report.

use std::path::PathBuf;
use std::time::Instant;

use sevplace::simulate::{run_simulate_cli, shipped_trace_specs};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn combo<'a>(report: &'a serde_json::Value, placement: &str, flush: &str) -> &'a serde_json::Value {
    report["combinations"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c["placement"] == placement && c["flush"] == flush)
        })
        .unwrap_or_else(|| panic!("no combination {placement}/{flush}"))
}

#[test]
fn shipped_traces_keep_the_invariants() {
    for spec in shipped_trace_specs() {
        let trace = manifest().join("traces").join(spec.file);
        // The topology given as a host root, as `--topology ROOT` would.
        let root = manifest().join("tests/fixtures").join(spec.topology);
        let start = Instant::now();
        let out = run_simulate_cli(&trace, root.to_str().unwrap(), true)
            .unwrap_or_else(|e| panic!("{}: {e}", spec.file));
        let secs = start.elapsed().as_secs_f64();
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        let name = spec.name;
        assert_eq!(
            report["combinations"].as_array().map(Vec::len),
            Some(9),
            "{name}"
        );

        let sp = combo(&report, "sevplace", "sevplace");
        assert!(sp["reclaims"].as_u64().unwrap() > 0, "{name}: no reclaims");
        // sevplace flushes never miss a CPU of the limit, and never leave a
        // dedicated VM's own CPUs.
        assert_eq!(sp["checks"]["reclaimsBelowLimit"], 0, "{name}");
        assert_eq!(sp["checks"]["reclaimsOutsideExclusiveCpus"], 0, "{name}");
        let flushed = sp["flushedCpus"]["mean"].as_f64().unwrap();
        let limit = sp["limitCpus"]["mean"].as_f64().unwrap();
        assert!(
            flushed >= limit,
            "{name}: flushed {flushed} < limit {limit}"
        );
        // No policy flushes less than the limit (they are all safe).
        for c in report["combinations"].as_array().unwrap() {
            assert_eq!(c["checks"]["reclaimsBelowLimit"], 0, "{name}: {c}");
        }
        // sevplace placement packs at least as many VMs as kubelet.
        let fit = |p| {
            combo(&report, p, "stock")["vmsBeforeFirstRejection"]
                .as_u64()
                .unwrap()
        };
        assert!(
            fit("sevplace") >= fit("kubelet-static"),
            "{name}: sevplace fits {} < kubelet {}",
            fit("sevplace"),
            fit("kubelet-static")
        );
        // On the mixed host, pools mix only once the host is full (on the
        // small, 80%-confidential Milan host one plain VM must mix earlier).
        if name == "mixed-host" {
            assert_eq!(sp["mixedPoolPlacementsBeforeFirstRejection"], 0, "{name}");
        }
        // Stock disturbs every domain; sevplace far fewer.
        let stock = combo(&report, "floating", "stock");
        assert!(
            sp["l3DomainsDisturbed"]["mean"].as_f64().unwrap()
                < stock["l3DomainsDisturbed"]["mean"].as_f64().unwrap(),
            "{name}"
        );
        eprintln!("{name} on {} in {secs:.2}s", spec.topology);
        // The tables in docs/benchmarks.md come from the release build:
        // `cargo test --release -p sevplace-agent --test simulate -- --nocapture`.
        if !cfg!(debug_assertions) {
            eprintln!(
                "{}",
                run_simulate_cli(&trace, spec.topology, false).unwrap()
            );
        }
    }
}

#[test]
fn cli_errors_are_one_line_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"name\": \"x\",\n \"events\": [\n {\"event\": \"arrive\", \"at\": 0, \"vm\": \"a\", \"vcpus\": -4, \"class\": \"sev\"}]}").unwrap();
    let e = run_simulate_cli(&bad, "milan-64c", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("bad.json"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = run_simulate_cli(&bad, "no-such-host", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no-such-host") && e.contains("genoa-2x96-nps1"),
        "{e}"
    );
    let e = run_simulate_cli(&dir.path().join("missing.yaml"), "milan-64c", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.yaml"), "{e}");
}
