//! Topology of every shipped fixture, and of the real host.

use std::path::PathBuf;

use sevplace::topology::{Topology, TopologyError};
use sevplace::CpuSet;

#[path = "../../tests/src/skip.rs"]
mod skip;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join("sys")
}

struct Case {
    name: &'static str,
    cpus: usize,
    cores: usize,
    l3: usize,
    numa: usize,
    /// (domain index, its CPUs)
    members: &'static [(usize, &'static str)],
}

#[test]
fn fixtures() {
    let cases = [
        Case {
            name: "milan-64c",
            cpus: 128,
            cores: 64,
            l3: 8,
            numa: 1,
            members: &[(0, "0-7,64-71"), (7, "56-63,120-127")],
        },
        Case {
            name: "genoa-2x96-nps1",
            cpus: 384,
            cores: 192,
            l3: 24,
            numa: 2,
            members: &[
                (0, "0-7,192-199"),
                (12, "96-103,288-295"),
                (23, "184-191,376-383"),
            ],
        },
        Case {
            name: "genoa-2x96-nps4",
            cpus: 384,
            cores: 192,
            l3: 24,
            numa: 8,
            members: &[(3, "24-31,216-223")],
        },
        Case {
            name: "rome-64c",
            cpus: 128,
            cores: 64,
            l3: 16,
            numa: 1,
            members: &[(0, "0-3,64-67"), (15, "60-63,124-127")],
        },
        Case {
            name: "rome-64c-offline",
            // CPU 5's sibling 69 stays online, so all 64 cores remain.
            cpus: 125,
            cores: 64,
            l3: 16,
            numa: 1,
            members: &[(1, "4,6-7,68-69"), (1, "4,6-7,68-69")],
        },
        Case {
            name: "vm-no-l3",
            cpus: 8,
            cores: 8,
            l3: 2,
            numa: 2,
            members: &[(0, "0-3"), (1, "4-7")],
        },
        Case {
            name: "ci-host-2cpu",
            cpus: 2,
            cores: 2,
            l3: 1,
            numa: 1,
            members: &[(0, "0-1")],
        },
    ];
    for c in cases {
        let t =
            Topology::from_sysfs(&fixture(c.name)).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(t.online.len(), c.cpus, "{} cpus", c.name);
        assert_eq!(t.cores.len(), c.cores, "{} cores", c.name);
        assert_eq!(t.l3_domains.len(), c.l3, "{} l3", c.name);
        assert_eq!(t.numa_nodes.len(), c.numa, "{} numa", c.name);
        for (i, cpus) in c.members {
            assert_eq!(
                t.l3_domains[*i].cpus.to_string(),
                *cpus,
                "{} domain {i}",
                c.name
            );
        }
        // Domains partition the online CPUs; cores sit inside one domain.
        let all = t
            .l3_domains
            .iter()
            .fold(CpuSet::new(), |a, d| a.union(&d.cpus));
        assert_eq!(all, t.online, "{}", c.name);
        for core in &t.cores {
            assert!(
                core.cpus.is_subset(&t.l3_domains[core.l3].cpus),
                "{}",
                c.name
            );
        }
    }
}

#[test]
fn offline_and_isolated_cpus() {
    let t = Topology::from_sysfs(&fixture("rome-64c-offline")).unwrap();
    assert!(!t.online.contains(5));
    assert!(t.cpu(70).is_none());
    assert_eq!(t.isolated.to_string(), "0,64");
    // Core 6 lost its second thread (70); core 5 lives on as CPU 69.
    let core6 = t.cpu(6).map(|c| &t.cores[c.core]).unwrap();
    assert_eq!(core6.cpus.to_string(), "6");
    let core5 = t.cpu(69).map(|c| &t.cores[c.core]).unwrap();
    assert_eq!(core5.cpus.to_string(), "69");
}

#[test]
fn genoa_nps4_nodes_hold_three_ccx_each() {
    let t = Topology::from_sysfs(&fixture("genoa-2x96-nps4")).unwrap();
    for n in &t.numa_nodes {
        assert_eq!(n.l3_domains.len(), 3, "node {}", n.id);
        assert_eq!(n.cpus.len(), 48);
    }
    assert_eq!(t, Topology::synthetic(2, 12, 8, 2, 4));
}

#[test]
fn real_host() {
    let sys = PathBuf::from("/sys");
    if !sys.join("devices/system/cpu/online").exists() {
        skip::skip(
            "real_host",
            "sysfs-cpu",
            "/sys/devices/system/cpu/online is missing",
        );
        return;
    }
    let t = Topology::from_sysfs(&sys).expect("real /sys topology");
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(t.online.len() >= n, "online {} < parallelism {n}", t.online);
    assert!(!t.l3_domains.is_empty());
    let all = t
        .l3_domains
        .iter()
        .fold(CpuSet::new(), |a, d| a.union(&d.cpus));
    assert_eq!(all, t.online);
}

#[test]
fn garbage_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = dir.path().join("devices/system/cpu");
    std::fs::create_dir_all(cpu.join("cpu0/topology")).unwrap();
    std::fs::write(cpu.join("online"), "0-x\n").unwrap();
    match Topology::from_sysfs(dir.path()) {
        Err(TopologyError::CpuList { path, .. }) => assert!(path.ends_with("online")),
        other => panic!("{other:?}"),
    }
    std::fs::write(cpu.join("online"), "0\n").unwrap();
    std::fs::write(cpu.join("cpu0/topology/physical_package_id"), "zero\n").unwrap();
    match Topology::from_sysfs(dir.path()) {
        Err(TopologyError::Value { path, value, .. }) => {
            assert!(path.ends_with("physical_package_id"));
            assert_eq!(value, "zero");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(cpu.join("cpu0/topology/physical_package_id")).unwrap();
    std::fs::create_dir_all(cpu.join("cpu0/cache/index3")).unwrap();
    std::fs::write(cpu.join("cpu0/cache/index3/level"), "3\n").unwrap();
    std::fs::write(
        cpu.join("cpu0/cache/index3/shared_cpu_list"),
        "\u{0}\u{1}garbage",
    )
    .unwrap();
    match Topology::from_sysfs(dir.path()) {
        Err(TopologyError::CpuList { path, .. }) => assert!(path.ends_with("shared_cpu_list")),
        other => panic!("{other:?}"),
    }
    std::fs::write(cpu.join("online"), "\n").unwrap();
    assert!(matches!(
        Topology::from_sysfs(dir.path()),
        Err(TopologyError::NoCpus(_))
    ));
}
