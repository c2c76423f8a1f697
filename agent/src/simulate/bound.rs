//! The most VMs any placement that keeps confidential VMs on whole cores
//! can admit before its first rejection, counted from CPUs alone.
//!
//! Before a model's first rejection it has admitted every VM that arrived,
//! so the VMs alive at each arrival are the same for every model. A model
//! that gives confidential VMs whole cores (an SMT sibling is a side
//! channel) must reject an arrival once those VMs need more CPUs than the
//! host has, counting at least the idle siblings that whole cores leave:
//! an exclusive confidential VM takes its vCPUs rounded up to whole cores,
//! and the floating confidential VMs together take theirs rounded up to
//! whole cores (they may share cores with each other, never with a plain
//! VM). Plain VMs may take single threads. The bound leaves out every other
//! limit (domains, NUMA, reserved cores), so no such placement can exceed
//! it; kubelet's model, which splits cores between any VMs, can.

use std::collections::BTreeSet;

use super::baselines::VmSpec;
use crate::cpuset::count_u32;
use crate::placement::Reservations;
use crate::topology::Topology;
use crate::types::ConfidentialClass;

/// One change of the VMs alive, in trace order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change<'a> {
    Arrive(usize, &'a VmSpec),
    Depart(usize),
}

/// Slots a VM needs, in floating vCPUs (one CPU = `ratio` slots).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Demand {
    /// Exclusive VMs and plain floating VMs, in slots.
    fixed: u64,
    /// vCPUs of floating confidential VMs.
    confidential_floating: u64,
}

fn demand_of(spec: &VmSpec, threads: u64, ratio: u64) -> Demand {
    let vcpus = u64::from(spec.vcpus);
    let exclusive = spec.dedicated || spec.class == ConfidentialClass::SevSnp;
    match (spec.class.is_confidential(), exclusive) {
        (true, true) => Demand {
            fixed: vcpus.div_ceil(threads) * threads * ratio,
            confidential_floating: 0,
        },
        (true, false) => Demand {
            fixed: 0,
            confidential_floating: vcpus,
        },
        (false, true) => Demand {
            fixed: vcpus * ratio,
            confidential_floating: 0,
        },
        (false, false) => Demand {
            fixed: vcpus,
            confidential_floating: 0,
        },
    }
}

/// Arrivals admitted before the first one that no whole-core placement can
/// admit (every arrival when none is).
pub(crate) fn whole_core_fit_bound<'a>(
    topo: &Topology,
    reservations: &Reservations,
    changes: impl IntoIterator<Item = Change<'a>>,
) -> u32 {
    let ratio = u64::from(reservations.shared_vcpus_per_cpu.max(1));
    let usable = topo.online.difference(&reservations.host);
    let cpus = u64::from(count_u32(usable.len()));
    // The fewest usable threads of a core: with fewer threads per core an
    // odd VM leaves fewer idle siblings, so this never overstates them.
    let threads = topo
        .cores
        .iter()
        .map(|c| u64::from(count_u32(c.cpus.intersection(&usable).len())))
        .filter(|&n| n > 0)
        .min()
        .unwrap_or(1);
    let capacity = cpus * ratio;
    let mut alive: BTreeSet<usize> = BTreeSet::new();
    let mut fixed = 0u64;
    let mut confidential_floating = 0u64;
    let mut demands: Vec<Demand> = Vec::new();
    let mut admitted = 0u32;
    for change in changes {
        match change {
            Change::Arrive(n, spec) => {
                let d = demand_of(spec, threads, ratio);
                let floating = confidential_floating + d.confidential_floating;
                let need = fixed + d.fixed + floating.div_ceil(threads * ratio) * threads * ratio;
                if need > capacity {
                    return admitted;
                }
                admitted += 1;
                fixed += d.fixed;
                confidential_floating = floating;
                if demands.len() <= n {
                    demands.resize(n + 1, Demand::default());
                }
                demands[n] = d;
                alive.insert(n);
            }
            Change::Depart(n) => {
                if alive.remove(&n) {
                    let d = demands[n];
                    fixed -= d.fixed;
                    confidential_floating -= d.confidential_floating;
                }
            }
        }
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VmId;

    fn spec(vcpus: u32, class: ConfidentialClass, dedicated: bool) -> VmSpec {
        VmSpec {
            vm: VmId::new(format!("v{vcpus}")).unwrap(),
            vcpus,
            class,
            dedicated,
        }
    }

    fn milan() -> Topology {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/milan-64c/sys");
        Topology::from_sysfs(&root).unwrap()
    }

    #[test]
    fn idle_siblings_of_confidential_vms_count() {
        use ConfidentialClass::{None as Plain, Sev, SevSnp};
        let topo = milan(); // 128 CPUs, 2 threads per core
        let res = Reservations::default();
        let table: &[(&str, Vec<VmSpec>, u32)] = &[
            // 125 plain vCPUs and 3 more fit exactly.
            (
                "plain",
                vec![spec(125, Plain, true), spec(3, Plain, false)],
                2,
            ),
            (
                "plain-over",
                vec![spec(125, Plain, true), spec(4, Plain, false)],
                1,
            ),
            // 3 dedicated sev vCPUs hold 4 CPUs: 124 plain fit beside them, 125 do not.
            (
                "sev-dedicated",
                vec![spec(3, Sev, true), spec(124, Plain, true)],
                2,
            ),
            (
                "sev-dedicated-over",
                vec![spec(3, Sev, true), spec(125, Plain, true)],
                1,
            ),
            // A shared sev-snp VM holds whole cores too.
            (
                "snp-shared",
                vec![spec(5, SevSnp, false), spec(123, Plain, true)],
                1,
            ),
            // Floating sev VMs share cores with each other: 3 + 2 vCPUs hold 6 CPUs.
            (
                "sev-floating",
                vec![
                    spec(3, Sev, false),
                    spec(2, Sev, false),
                    spec(122, Plain, true),
                ],
                3,
            ),
            (
                "sev-floating-over",
                vec![
                    spec(3, Sev, false),
                    spec(2, Sev, false),
                    spec(123, Plain, true),
                ],
                2,
            ),
        ];
        for (name, specs, want) in table {
            let changes = specs.iter().enumerate().map(|(i, s)| Change::Arrive(i, s));
            assert_eq!(whole_core_fit_bound(&topo, &res, changes), *want, "{name}");
        }
    }

    #[test]
    fn departures_free_their_cpus() {
        let topo = milan();
        let res = Reservations::default();
        let a = spec(101, ConfidentialClass::Sev, true); // 102 CPUs
        let b = spec(100, ConfidentialClass::None, true);
        let changes = [
            Change::Arrive(0, &a),
            Change::Depart(0),
            Change::Arrive(1, &b),
            Change::Depart(7),
        ];
        assert_eq!(whole_core_fit_bound(&topo, &res, changes), 2);
        let changes = [Change::Arrive(0, &a), Change::Arrive(1, &b)];
        assert_eq!(whole_core_fit_bound(&topo, &res, changes), 1);
    }
}
