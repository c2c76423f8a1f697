//! deploy/: the systemd unit verifies, the alert rules pass their unit
//! tests, and every dashboard query parses and names metrics the agent
//! really exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn tool(name: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        sevplace_tests::skip(test, name, format_args!("{name} is not installed"));
    }
    found
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

/// The agent's metrics with every family populated (VMs, a module, each
/// kind of observation).
fn populated_metrics() -> sevplace::metrics::Metrics {
    use sevplace::kmod::{ModuleState, ModuleStatus};
    use sevplace::metrics::{Metrics, VmFigures, VmLabels};
    let m = Metrics::new();
    m.observe_grpc(
        "GetHost",
        tonic::Code::Ok,
        std::time::Duration::from_millis(1),
    );
    m.observe_drift("thread_moved");
    m.pin_failures
        .get_or_create(&sevplace::metrics::ReasonLabels {
            reason: "busy".into(),
        })
        .inc();
    m.observe_reconcile(std::time::Duration::from_millis(1));
    m.observe_reconcile_lock_wait(std::time::Duration::from_millis(1));
    m.observe_tls_handshake("ok");
    m.checkpoint_write_failures.inc();
    m.set_module(&ModuleStatus {
        state: ModuleState::Loaded,
        abi_version: 1,
        mode: "targeted".into(),
        flushes_total: 1,
        flushed_cpus_total: 1,
        full_flushes_total: 1,
        scrubs_total: 1,
        scrubbed_cpus_total: 1,
        message: String::new(),
    });
    m.set_vms(&[VmFigures {
        labels: VmLabels {
            vm: "a".into(),
            confidential: "sev".into(),
        },
        vcpus: 2,
        dirty_cpus: Some(2),
        ran_cpus: Some(2),
        flushes: Some(1),
        flushed_cpus: Some(2),
    }]);
    m
}

/// Names of every metric family the agent exports, with VMs and a module.
fn exported_names() -> BTreeSet<String> {
    populated_metrics()
        .encode_prometheus()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// `(family, type)` of every family, from the `# TYPE` lines.
fn exported_families() -> BTreeSet<(String, String)> {
    populated_metrics()
        .encode_prometheus()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_string(), kind.to_string()))
        })
        .collect()
}

/// The metrics reference in docs/operations.md lists every family the
/// agent exports with its type, and nothing else.
#[test]
fn metrics_reference_lists_every_family() {
    let doc = std::fs::read_to_string(deploy().join("../docs/operations.md")).unwrap();
    let section = doc
        .split("## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Metrics section in docs/operations.md");
    let listed: BTreeSet<(String, String)> = section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.split(['`', '{']).next()?;
            let kind = cells.get(2)?;
            Some((name.to_string(), kind.to_string()))
        })
        .collect();
    assert_eq!(listed, exported_families(), "docs/operations.md ## Metrics");
}

fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("sevplace_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    if !tool("promtool", "alert_rules_pass_their_unit_tests") {
        return;
    }
    let dir = deploy().join("prometheus");
    run_ok(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(dir.join("sevplace.rules.yml")),
    );
    run_ok(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(dir.join("sevplace.rules.test.yml")),
    );
    run_ok(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
    );
    let names = exported_names();
    let rules = std::fs::read_to_string(dir.join("sevplace.rules.yml")).unwrap();
    for n in metric_names_in(&rules) {
        assert!(
            names.contains(&n),
            "alert rules use {n}, which the agent does not export"
        );
    }
}

#[test]
fn dashboard_queries_parse_and_use_exported_metrics() {
    let text = std::fs::read_to_string(deploy().join("grafana/sevplace.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(p["title"].is_string());
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 8);
    let names = exported_names();
    for e in &exprs {
        for n in metric_names_in(e) {
            let base = n.strip_suffix("_bucket").unwrap_or(&n).to_string();
            assert!(
                names.contains(&n) || names.contains(&format!("{base}_bucket")),
                "dashboard uses {n}, which the agent does not export"
            );
        }
    }
    if !tool(
        "promtool",
        "dashboard_queries_parse_and_use_exported_metrics (PromQL parse)",
    ) {
        return;
    }
    // promtool parses every query as a recording rule.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e.replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = dir.path().join("dashboard.rules.yml");
    std::fs::write(&file, rules).unwrap();
    run_ok(Command::new("promtool").args(["check", "rules"]).arg(&file));
}

#[test]
fn systemd_unit_verifies() {
    if !tool("systemd-analyze", "systemd_unit_verifies") {
        return;
    }
    let unit = std::fs::read_to_string(deploy().join("systemd/sevplaced.service")).unwrap();
    let bin = sevplace_tests::bin("sevplaced");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sevplaced.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/sevplaced", bin.to_str().unwrap()),
    )
    .unwrap();
    run_ok(Command::new("systemd-analyze").arg("verify").arg(&path));
    let out = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&path),
    );
    let score: f64 = out
        .lines()
        .find_map(|l| l.split("exposure level for sevplaced.service:").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("exposure score");
    eprintln!("systemd-analyze security exposure: {score}");
    assert!(
        score <= 4.0,
        "exposure {score} rose above the recorded 3.1 (docs/operations.md)"
    );
}
