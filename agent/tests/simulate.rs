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
    // Each shipped trace on the topology it was made for, and the odd-size
    // trace also on the small Milan host, where idle siblings of
    // confidential VMs weigh most.
    let mut runs: Vec<_> = shipped_trace_specs()
        .into_iter()
        .map(|s| (s.name, s.file, s.topology))
        .collect();
    runs.push(("odd-sizes on milan", "odd-sizes.json", "milan-64c"));
    for (name, file, topology) in runs {
        let trace = manifest().join("traces").join(file);
        // The topology given as a host root, as `--topology ROOT` would.
        let root = manifest().join("tests/fixtures").join(topology);
        let start = Instant::now();
        let out = run_simulate_cli(&trace, root.to_str().unwrap(), true)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let secs = start.elapsed().as_secs_f64();
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
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
        // sevplace placement packs at least as many VMs as kubelet, or as
        // many as any placement can that keeps confidential VMs on whole
        // cores (kubelet splits their cores).
        let fit = |p| {
            combo(&report, p, "stock")["vmsBeforeFirstRejection"]
                .as_u64()
                .unwrap()
        };
        let bound = report["wholeCoreFitBound"].as_u64().unwrap();
        assert!(
            fit("sevplace") >= fit("kubelet-static").min(bound),
            "{name}: sevplace fits {} < kubelet {} (whole-core bound {bound})",
            fit("sevplace"),
            fit("kubelet-static")
        );
        assert!(fit("sevplace") <= bound, "{name}: above the bound {bound}");
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
        eprintln!("{name} on {topology} in {secs:.2}s");
        // The tables in docs/benchmarks.md come from the release build:
        // `cargo test --release -p sevplace-agent --test simulate -- --nocapture`.
        if !cfg!(debug_assertions) {
            eprintln!("{}", run_simulate_cli(&trace, topology, false).unwrap());
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
