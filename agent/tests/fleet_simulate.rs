//! Runs the shipped 50-host fleet trace over a 50-host fleet through the CLI
//! entry point (`sevplacectl simulate --fleet HOSTS --trace FILE --json`)
//! and checks the sevplace fleet model's invariants: no CPU given twice on
//! any host, no plain VM in a confidential domain while another host had
//! room in a general or empty domain, confidential domains within 5% of the
//! lower bound while the fleet has room, and fewer L3 domains disturbed per
//! reclaim than the baselines.

use std::path::PathBuf;

use sevplace::simulate::{run_fleet_simulate_cli, shipped_fleet_trace_specs};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["models"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["model"] == name))
        .unwrap_or_else(|| panic!("no model {name}"))
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn fifty_host_fleet_keeps_the_sevplace_invariants() {
    let spec = shipped_fleet_trace_specs()
        .into_iter()
        .find(|s| s.name == "fleet-50")
        .expect("the fleet-50 trace spec");
    let trace = manifest().join("traces").join(spec.file);
    let out = run_fleet_simulate_cli(&trace, spec.topology, true)
        .unwrap_or_else(|e| panic!("{}: {e}", spec.file));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["fleet"]["hosts"], 50, "{}", report["fleet"]);
    assert_eq!(report["models"].as_array().map(Vec::len), Some(3));

    let sp = model(&report, "sevplace");
    println!("{}", serde_json::to_string_pretty(sp).unwrap());
    // The trace runs the fleet full, so every model rejects at some point.
    for name in ["nova-like", "kubelet-static", "sevplace"] {
        let m = model(&report, name);
        assert!(m["rejected"].as_u64().unwrap() > 0, "{name}: never full");
        assert!(m["reclaims"].as_u64().unwrap() > 0, "{name}: no reclaims");
        assert_eq!(m["checks"]["cpusGivenTwice"], 0, "{name}");
        assert_eq!(m["checks"]["reclaimsBelowLimit"], 0, "{name}");
    }
    assert_eq!(sp["checks"]["plainInConfidentialWhileRoom"], 0);

    // Packing while the fleet has room: within 5% of the lower bound on
    // average, sampled at least 50 times.
    let packing = &sp["confidentialDomains"];
    assert!(
        packing["samplesBeforeFirstRejection"].as_u64().unwrap() >= 50,
        "{packing}"
    );
    let mean = f(&packing["meanRatioBeforeFirstRejection"]);
    assert!((1.0..=1.05).contains(&mean), "mean ratio {mean}: {packing}");
    // At the first rejection too.
    let full = &packing["atFirstRejection"];
    let (in_use, bound) = (f(&full["domainsInUse"]), f(&full["lowerBound"]));
    assert!(bound > 0.0 && in_use >= bound, "{full}");
    assert!(
        in_use <= 1.05 * bound,
        "{in_use} domains for a bound of {bound}"
    );

    // Blast radius: fewer L3 domains disturbed per reclaim than both
    // baselines, and fewer plain vCPUs in them.
    for name in ["nova-like", "kubelet-static"] {
        let b = model(&report, name);
        assert!(
            f(&sp["l3DomainsDisturbed"]["mean"]) < f(&b["l3DomainsDisturbed"]["mean"]),
            "{name}"
        );
        assert!(
            f(&sp["nonConfidentialVcpusHit"]["mean"]) < f(&b["nonConfidentialVcpusHit"]["mean"]),
            "{name}"
        );
    }
}

#[test]
fn a_bad_fleet_is_a_typed_error() {
    let trace = manifest().join("traces/fleet/fleet-50.json");
    for (arg, needle) in [
        ("0", "not a host count"),
        ("milan-64c:2,milan-64c:3", "listed twice"),
        ("milan-64c", "expected TOPOLOGY:COUNT"),
        ("nosuch:3", "unknown topology"),
    ] {
        let e = run_fleet_simulate_cli(&trace, arg, false)
            .expect_err(arg)
            .to_string();
        assert!(e.contains(needle), "{arg}: {e}");
    }
}
