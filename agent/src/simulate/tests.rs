use std::path::PathBuf;

use super::*;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn catalogue_matches_fixtures() {
    for name in TOPOLOGY_NAMES {
        let fixture = manifest().join("tests/fixtures").join(name).join("sys");
        let from_disk = Topology::from_sysfs(&fixture).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(named_topology(name), Some(from_disk), "{name}");
    }
    assert!(named_topology("nope").is_none());
}

#[test]
fn topology_arg_takes_a_name_or_a_root() {
    let root = manifest().join("tests/fixtures/rome-64c");
    let (_, a) = topology_from_arg(root.to_str().unwrap()).unwrap();
    assert_eq!(Some(a), named_topology("rome-64c"));
    match topology_from_arg("/nonexistent") {
        Err(e @ SimError::UnknownTopology { .. }) => assert!(e.to_string().contains("milan-64c")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_errors_name_line_and_column() {
    let text = "{\n  \"name\": \"x\",\n  \"events\": [\n    {\"event\": \"arrive\", \"at\": 0, \"vm\": \"a\", \"vcpus\": \"eight\", \"class\": \"sev\"}\n  ]\n}\n";
    match Trace::parse(text, Format::Json, "t.json") {
        Err(e @ SimError::Parse { line: Some(4), .. }) => {
            let s = e.to_string();
            assert!(s.starts_with("t.json line 4 column"), "{s}");
            assert!(s.contains("expected u32"), "{s}");
        }
        other => panic!("{other:?}"),
    }
    let text = "{\"name\": \"x\", \"events\": [{\"event\": \"arrive\", \"at\": 0, \"vm\": \"a\", \"vcpus\": 2, \"class\": \"sev-xx\"}]}";
    let e = Trace::parse(text, Format::Json, "t.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sev-xx"), "{e}");
    let text = "{\"name\": \"x\", \"events\": [{\"event\": \"arrive\", \"at\": 0, \"vm\": \"a\", \"vcpus\": 2, \"class\": \"sev\", \"colour\": 1}]}";
    let e = Trace::parse(text, Format::Json, "t.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn yaml_errors_name_the_line() {
    let text = "name: x\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 2, class: sev}\n  - {event: leave, at: 1, vm: a}\n";
    match Trace::parse(text, Format::Yaml, "t.yaml") {
        Err(e @ SimError::Parse { line: Some(4), .. }) => {
            assert!(e.to_string().contains("leave"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let text = "name: x\nevents:\n  - {event: arrive, at: 0, vm: \"a/b\", vcpus: 2, class: sev}\n";
    match Trace::parse(text, Format::Yaml, "t.yaml") {
        Err(SimError::Parse { line: Some(3), .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_and_misplaced_fields() {
    let text = "name: x\nevents:\n  - {event: arrive, at: 0, vm: a, class: sev}\n";
    let e = Trace::parse(text, Format::Yaml, "t.yaml")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "t.yaml: events[0].vcpus: missing in the arrive event of a"
    );
    let text = "name: x\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 1, class: sev}\n  - {event: depart, at: 1, vm: a, vcpus: 2}\n";
    let e = Trace::parse(text, Format::Yaml, "t.yaml")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "t.yaml: events[1].vcpus: belongs to arrive events only (vm a)"
    );
}

#[test]
fn semantic_errors_name_the_field() {
    let cases = [
        ("name: x\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 0, class: sev}\n", "events[0].vcpus"),
        ("name: x\nevents:\n  - {event: reclaim, at: 0, vm: a}\n", "events[0].vm"),
        ("name: x\nevents:\n  - {event: arrive, at: -1, vm: a, vcpus: 1, class: sev}\n", "events[0].at"),
        (
            "name: x\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 1, class: sev}\n  - {event: arrive, at: 1, vm: a, vcpus: 1, class: sev}\n",
            "events[1].vm",
        ),
        (
            "name: x\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 1, class: sev, reclaimRate: -2}\n",
            "events[0].reclaimRate",
        ),
        (
            "name: x\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 1, class: sev}\n  - {event: depart, at: 2, vm: a}\n  - {event: migrate, at: 3, vm: a}\n",
            "events[2].vm",
        ),
    ];
    for (text, field) in cases {
        match Trace::parse(text, Format::Yaml, "t.yaml") {
            Err(SimError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn small_trace_counts_and_invariants() {
    let text = r#"
name: small
seed: 3
events:
  - {event: arrive, at: 0, vm: c1, vcpus: 4, class: sev, dedicated: true}
  - {event: arrive, at: 0, vm: g1, vcpus: 8, class: none, dedicated: false}
  - {event: arrive, at: 0, vm: s1, vcpus: 4, class: sev-es, dedicated: false}
  - {event: migrate, at: 1, vm: s1}
  - {event: migrate, at: 2, vm: s1}
  - {event: reclaim, at: 3, vm: c1}
  - {event: reclaim, at: 3, vm: s1}
  - {event: reclaim, at: 3, vm: g1}
  - {event: depart, at: 4, vm: c1}
"#;
    let trace = Trace::parse(text, Format::Yaml, "small").unwrap();
    let topo = named_topology("milan-64c").unwrap();
    let r = simulate(&topo, &trace, &SimOptions::default()).unwrap();
    assert_eq!(r.combinations.len(), 9);
    assert_eq!(r.reclaim_events, 3);
    let stock = r
        .combination(PlacementModelKind::Sevplace, FlushPolicy::Stock)
        .unwrap();
    // The plain VM's reclaim flushes nothing.
    assert_eq!(stock.reclaims, 2);
    assert_eq!(stock.flushed_cpus.max, 128);
    assert_eq!(stock.l3_domains_disturbed.max, 8);
    let sp = r
        .combination(PlacementModelKind::Sevplace, FlushPolicy::Sevplace)
        .unwrap();
    assert_eq!(sp.l3_domains_disturbed.max, 1);
    assert!(sp.flushed_cpus.max <= 16);
    assert_eq!(sp.non_confidential_vcpus_hit.max, 0);
    assert_eq!(sp.checks, Checks::default());
    for c in &r.combinations {
        assert_eq!(
            c.checks.reclaims_below_limit, 0,
            "{:?}/{:?}",
            c.placement, c.flush
        );
        assert_eq!(c.vms_before_first_rejection, 3);
    }
    // Deterministic.
    assert_eq!(simulate(&topo, &trace, &SimOptions::default()).unwrap(), r);
    let table = r.to_table();
    assert!(
        table.contains("kubelet-static") && table.contains("have-run-cpus"),
        "{table}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["combinations"][0]["flushedCpus"]["p99"].is_number());
    assert!(json["combinations"][0]["vmsBeforeFirstRejection"].is_number());
}

#[test]
fn shipped_traces_are_current() {
    let regenerate = std::env::var("SEVPLACE_REGENERATE_TRACES").is_ok_and(|v| v == "1");
    for spec in shipped_trace_specs()
        .into_iter()
        .chain(shipped_fleet_trace_specs())
    {
        let trace = generate_trace(&spec);
        let text = if spec.file.ends_with(".json") {
            trace.to_json()
        } else {
            trace.to_yaml()
        };
        let path = manifest().join("traces").join(spec.file);
        if regenerate {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} is stale: run SEVPLACE_REGENERATE_TRACES=1 cargo test -p sevplace-agent shipped_traces_are_current",
            path.display()
        );
        assert_eq!(Trace::load(&path).unwrap(), trace, "{}", spec.file);
    }
}

#[test]
fn a_vm_larger_than_the_host_names_the_field() {
    let text = "name: big\nevents:\n  - {event: arrive, at: 0, vm: a, vcpus: 1, class: sev}\n  - {event: arrive, at: 0, vm: b, vcpus: 3, class: none}\n";
    let trace = Trace::parse(text, Format::Yaml, "big").unwrap();
    let topo = named_topology("ci-host-2cpu").unwrap();
    let e = simulate(&topo, &trace, &SimOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "big: events[1].vcpus: b asks for 3 vCPUs; the topology has 2 online CPUs"
    );
}
