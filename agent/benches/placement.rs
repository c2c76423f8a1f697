//! One placement decision, and one capacity summary, on a 192-CPU host
//! (Genoa 2 x 96 cores, SMT off: 24 L3 domains of 8 CPUs, 2 NUMA nodes)
//! with 200 VMs already placed.
//!
//! Baseline in the same run: rebuilding the state with its per-domain view
//! from the 200 placements (`PlacementState::apply` of each), which is what
//! every decision and every capacity probe paid before the view was kept
//! incrementally.
//!
//! `cargo bench -p sevplace-agent --bench placement`

// `criterion_group!` defines an undocumented public function; a bench has
// no users to document it for.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sevplace::placement::{
    capacity, place, Placement, PlacementRequest, PlacementState, Reservations,
};
use sevplace::topology::Topology;
use sevplace::{ConfidentialClass, VmId};

fn request(i: usize) -> PlacementRequest {
    let class = match i % 10 {
        0 | 5 => ConfidentialClass::Sev,
        1 => ConfidentialClass::SevEs,
        _ => ConfidentialClass::None,
    };
    let dedicated = i % 3 == 0;
    PlacementRequest {
        vm_id: VmId::new(format!("vm-{i:04}")).expect("valid id"),
        vcpus: if dedicated {
            1 + u32::from(i % 2 == 1)
        } else {
            2
        },
        class,
        dedicated,
        numa_preference: None,
    }
}

/// The host, its reservations (CPU 0 for the host, floating VMs overcommit
/// 4:1) and 200 placed VMs.
fn loaded_host() -> (Topology, Reservations, PlacementState) {
    let topo = Topology::synthetic(2, 12, 8, 1, 1);
    assert_eq!(topo.online.len(), 192);
    let res = Reservations {
        host: [0].into_iter().collect(),
        shared_vcpus_per_cpu: 4,
        ..Reservations::default()
    };
    let mut state = PlacementState::new();
    for i in 0..200 {
        state.place(&topo, &res, &request(i)).expect("200 VMs fit");
    }
    assert_eq!(state.len(), 200);
    (topo, res, state)
}

fn bench(c: &mut Criterion) {
    let (topo, res, state) = loaded_host();
    let dedicated_sev = PlacementRequest {
        vm_id: VmId::new("new-sev").expect("valid id"),
        vcpus: 8,
        class: ConfidentialClass::Sev,
        dedicated: true,
        numa_preference: None,
    };
    let shared_plain = PlacementRequest {
        vm_id: VmId::new("new-plain").expect("valid id"),
        vcpus: 4,
        class: ConfidentialClass::None,
        dedicated: false,
        numa_preference: None,
    };
    assert!(place(&topo, &state, &res, &dedicated_sev).is_ok());
    assert!(place(&topo, &state, &res, &shared_plain).is_ok());
    c.bench_function("place 8-vCPU dedicated sev, 192 CPUs, 200 VMs", |b| {
        b.iter(|| {
            place(
                black_box(&topo),
                black_box(&state),
                &res,
                black_box(&dedicated_sev),
            )
        })
    });
    c.bench_function("place 4-vCPU shared none, 192 CPUs, 200 VMs", |b| {
        b.iter(|| {
            place(
                black_box(&topo),
                black_box(&state),
                &res,
                black_box(&shared_plain),
            )
        })
    });
    let placements: Vec<Placement> = state.iter().cloned().collect();
    c.bench_function("baseline: rebuild the state from 200 placements", |b| {
        b.iter(|| {
            let mut rebuilt = PlacementState::new();
            for p in black_box(&placements) {
                rebuilt
                    .apply(p.clone())
                    .expect("placements of a valid state");
            }
            rebuilt
        })
    });
    c.bench_function("capacity summary, 192 CPUs, 200 VMs", |b| {
        b.iter(|| capacity(black_box(&topo), black_box(&state), &res))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
