//! Generated traces: the shipped ones in `agent/traces/` come from
//! [`shipped_trace_specs`] (the `shipped_traces_are_current` test rewrites
//! them when `SEVPLACE_REGENERATE_TRACES=1`).

#[cfg(test)]
use super::rng::XorShift;
#[cfg(test)]
use super::trace::{Event, Trace};
#[cfg(test)]
use crate::types::{ConfidentialClass, VmId};

/// Parameters of a generated trace.
// Only `generate_trace`, which tests run, reads the generator's parameters.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone)]
pub struct TraceSpec {
    /// The trace's name.
    pub name: &'static str,
    pub(crate) description: &'static str,
    /// File name under `agent/traces/` (the extension picks the format).
    pub file: &'static str,
    /// Fixture the trace is meant for.
    pub topology: &'static str,
    pub(crate) seed: u64,
    pub(crate) duration: f64,
    /// VMs arriving at time 0 (a host that is already busy).
    pub(crate) initial_vms: u32,
    /// Arrivals per second after time 0.
    pub(crate) arrival_rate: f64,
    /// Mean lifetime in seconds (exponential); `None`: VMs never leave.
    pub(crate) mean_lifetime: Option<f64>,
    /// Fraction of VMs that are confidential; of those, sev : sev-es :
    /// sev-snp is 2 : 1 : 1.
    pub(crate) confidential_fraction: f64,
    /// Sizes in vCPUs and their weights.
    pub(crate) sizes: &'static [(u32, u32)],
    /// Fraction of VMs with dedicated CPUs.
    pub(crate) dedicated_fraction: f64,
    /// Reclaims per second of each confidential VM.
    pub(crate) reclaim_rate: f64,
    /// vCPU migrations per second of each VM.
    pub(crate) migration_rate: f64,
}

// below(total) is less than total, a u32: the cast cannot truncate.
#[allow(clippy::cast_possible_truncation)]
#[cfg(test)]
fn weighted(rng: &mut XorShift, sizes: &[(u32, u32)]) -> u32 {
    let total: u32 = sizes.iter().map(|s| s.1).sum();
    let mut x = rng.below(total as usize) as u32;
    for &(v, w) in sizes {
        if x < w {
            return v;
        }
        x -= w;
    }
    sizes.last().map_or(1, |s| s.0)
}

/// Builds the trace described by `spec` (run by the test that keeps the
/// shipped traces current).
#[cfg(test)]
pub(crate) fn generate_trace(spec: &TraceSpec) -> Trace {
    let mut rng = XorShift::new(spec.seed);
    let mut arrivals = Vec::new();
    let mut t = 0.0;
    let mut n = 0u32;
    loop {
        if n >= spec.initial_vms {
            t += rng.exp(spec.arrival_rate);
        }
        if t >= spec.duration {
            break;
        }
        n += 1;
        arrivals.push((n, (t * 1000.0_f64).round() / 1000.0));
    }
    let mut events = Vec::new();
    for (n, at) in arrivals {
        let Ok(vm) = VmId::new(format!("vm-{n:04}")) else {
            continue;
        };
        let confidential = rng.unit() <= spec.confidential_fraction;
        let class = if confidential {
            match rng.below(4) {
                0 | 1 => ConfidentialClass::Sev,
                2 => ConfidentialClass::SevEs,
                _ => ConfidentialClass::SevSnp,
            }
        } else {
            ConfidentialClass::None
        };
        let vcpus = weighted(&mut rng, spec.sizes);
        let dedicated = rng.unit() <= spec.dedicated_fraction;
        events.push(Event::Arrive {
            at,
            vm: vm.clone(),
            vcpus,
            class,
            dedicated,
            reclaim_rate: if confidential { spec.reclaim_rate } else { 0.0 },
            migration_rate: spec.migration_rate,
        });
        if let Some(life) = spec.mean_lifetime {
            let end = ((at + rng.exp(1.0 / life)) * 1000.0).round() / 1000.0;
            if end < spec.duration {
                events.push(Event::Depart { at: end, vm });
            }
        }
    }
    events.sort_by(|a, b| a.at().total_cmp(&b.at()));
    Trace {
        name: spec.name.to_string(),
        description: spec.description.to_string(),
        seed: spec.seed,
        duration: Some(spec.duration),
        events,
    }
}

/// The traces shipped in `agent/traces/`.
pub fn shipped_trace_specs() -> Vec<TraceSpec> {
    vec![
        TraceSpec {
            name: "mixed-host",
            description: "Mixed host: 20% confidential VMs, 2-32 vCPUs, 70% dedicated, churn until the host is full",
            file: "mixed-host.json",
            topology: "genoa-2x96-nps1",
            seed: 20,
            duration: 1200.0,
            initial_vms: 20,
            arrival_rate: 0.25,
            mean_lifetime: Some(900.0),
            confidential_fraction: 0.2,
            sizes: &[(2, 30), (4, 30), (8, 20), (16, 15), (32, 5)],
            dedicated_fraction: 0.7,
            reclaim_rate: 0.5,
            migration_rate: 2.0,
        },
        TraceSpec {
            name: "confidential-heavy",
            description: "Confidential-heavy host: 80% confidential VMs, 2-16 vCPUs, churn",
            file: "confidential-heavy.yaml",
            topology: "milan-64c",
            seed: 80,
            duration: 900.0,
            initial_vms: 10,
            arrival_rate: 0.1,
            mean_lifetime: Some(600.0),
            confidential_fraction: 0.8,
            sizes: &[(2, 30), (4, 35), (8, 25), (16, 10)],
            dedicated_fraction: 0.6,
            reclaim_rate: 1.0,
            migration_rate: 2.0,
        },
        TraceSpec {
            name: "odd-sizes",
            description: "Mixed host with odd vCPU counts (1, 3, 5, 7): plain dedicated VMs share SMT cores as with kubelet's static policy",
            file: "odd-sizes.json",
            topology: "genoa-2x96-nps1",
            seed: 20,
            duration: 1200.0,
            initial_vms: 20,
            arrival_rate: 0.25,
            mean_lifetime: Some(900.0),
            confidential_fraction: 0.2,
            sizes: &[(1, 15), (2, 15), (3, 25), (5, 20), (7, 15), (16, 10)],
            dedicated_fraction: 0.7,
            reclaim_rate: 0.5,
            migration_rate: 2.0,
        },
        TraceSpec {
            name: "long-running-migrations",
            description: "Long-running host: VMs stay for the whole trace, vCPUs migrate often, reclaims are rare",
            file: "long-running-migrations.json",
            topology: "genoa-2x96-nps4",
            seed: 7,
            duration: 3600.0,
            initial_vms: 40,
            arrival_rate: 0.0,
            mean_lifetime: None,
            confidential_fraction: 0.3,
            sizes: &[(2, 30), (4, 30), (8, 25), (16, 15)],
            dedicated_fraction: 0.5,
            reclaim_rate: 0.05,
            migration_rate: 2.0,
        },
    ]
}

/// The fleet traces shipped in `agent/traces/fleet/` (`TraceSpec::topology`
/// holds the `--fleet` argument they are sized for). Kept apart from
/// [`shipped_trace_specs`]: they are far too large for one host.
pub fn shipped_fleet_trace_specs() -> Vec<TraceSpec> {
    vec![
    TraceSpec {
        name: "fleet-1000",
        description: "Fleet of 1,000 hosts: 14,000 VMs at time 0 (about three quarters of the fleet), then 8 arrivals/s until the fleet is full; 30% confidential, 4-64 vCPUs, 70% dedicated",
        file: "fleet/fleet-1000.json",
        topology: "genoa-2x96-nps1:600,milan-64c:400",
        seed: 1000,
        duration: 1200.0,
        initial_vms: 14000,
        arrival_rate: 8.0,
        mean_lifetime: Some(7200.0),
        confidential_fraction: 0.3,
        sizes: &[(4, 25), (8, 30), (16, 25), (32, 15), (64, 5)],
        dedicated_fraction: 0.7,
        reclaim_rate: 0.05,
        migration_rate: 0.05,
    },
    TraceSpec {
        name: "fleet-50",
        description: "Fleet of 50 hosts: fleet-1000 scaled down (700 VMs at time 0, 0.4 arrivals/s) for the test of the fleet model's invariants",
        file: "fleet/fleet-50.json",
        topology: "genoa-2x96-nps1:30,milan-64c:20",
        seed: 50,
        duration: 1200.0,
        initial_vms: 700,
        arrival_rate: 0.4,
        mean_lifetime: Some(7200.0),
        confidential_fraction: 0.3,
        sizes: &[(4, 25), (8, 30), (16, 25), (32, 15), (64, 5)],
        dedicated_fraction: 0.7,
        reclaim_rate: 0.05,
        migration_rate: 0.05,
    }]
}
