use super::*;
use crate::placement::PlacementRequest;
use crate::state::{PlacementRecord, VmSelector};
use crate::types::ConfidentialClass;

fn request(id: &str, vcpus: u32, class: ConfidentialClass) -> PlacementRequest {
    PlacementRequest {
        vm_id: VmId::new(id).unwrap(),
        vcpus,
        class,
        dedicated: true,
        numa_preference: None,
    }
}

/// Intents placed one after another by the engine on `topo`.
fn placed(topo: &Topology, reqs: &[PlacementRequest]) -> Vec<IntentRecord> {
    let res = Reservations::default();
    let mut state = PlacementState::new();
    reqs.iter()
        .map(|r| {
            let p = state.place(topo, &res, r).unwrap();
            IntentRecord {
                vm_id: r.vm_id.clone(),
                selector: VmSelector::LibvirtDomain {
                    name: r.vm_id.to_string(),
                },
                request: crate::state::PlacementRequest {
                    vcpus: r.vcpus,
                    class: Some(r.class),
                    dedicated: r.dedicated,
                    numa_node: None,
                },
                placement: Some(PlacementRecord {
                    vcpu_cpus: p.vcpu_cpus.clone(),
                    emulator_cpus: None,
                }),
                engine: Some(p),
            }
        })
        .collect()
}

#[test]
fn the_same_topology_keeps_every_placement() {
    let topo = Topology::synthetic(2, 4, 4, 2, 1);
    let intents = placed(
        &topo,
        &[
            request("a", 4, ConfidentialClass::SevSnp),
            request("b", 2, ConfidentialClass::None),
        ],
    );
    let r = refit(&topo, &Reservations::default(), &intents);
    assert!(r.replaced.is_empty() && r.unplaceable.is_empty());
    assert_eq!(r.placements.len(), 2);
    for i in &intents {
        assert_eq!(r.placements.get(&i.vm_id), i.engine.as_ref());
    }
}

#[test]
fn plain_vms_on_shared_cores_keep_their_placement() {
    // Odd-sized plain VMs take single threads of cores they share; the same
    // topology keeps them where they are, beside a whole-core sev VM.
    let topo = Topology::synthetic(1, 2, 4, 2, 1);
    let intents = placed(
        &topo,
        &[
            request("p1", 1, ConfidentialClass::None),
            request("p3", 3, ConfidentialClass::None),
            request("s", 2, ConfidentialClass::Sev),
        ],
    );
    let shared = intents.iter().filter_map(|i| i.engine.as_ref()).any(|p| {
        p.cores
            .iter()
            .any(|&c| !topo.cores[c].cpus.is_subset(&p.cpus))
    });
    assert!(shared, "the engine gave some plain VM part of a core");
    let r = refit(&topo, &Reservations::default(), &intents);
    assert!(r.replaced.is_empty(), "{:?}", r.replaced);
    assert!(r.unplaceable.is_empty(), "{:?}", r.unplaceable);
    for i in &intents {
        assert_eq!(r.placements.get(&i.vm_id), i.engine.as_ref());
    }
}

#[test]
fn fewer_cpus_move_what_fits_and_keep_the_rest_unplaceable() {
    // 2 packages x 4 L3 x 4 cores x 2 threads = 64 CPUs.
    let big = Topology::synthetic(2, 4, 4, 2, 1);
    let reqs: Vec<PlacementRequest> = (0..8)
        .map(|i| request(&format!("vm-{i}"), 8, ConfidentialClass::SevSnp))
        .collect();
    let intents = placed(&big, &reqs);
    // 1 package x 2 L3 x 4 cores x 2 threads = 16 CPUs.
    let small = Topology::synthetic(1, 2, 4, 2, 1);
    let r = refit(&small, &Reservations::default(), &intents);
    assert_eq!(r.placements.len() + r.unplaceable.len(), 8, "none dropped");
    assert!(!r.unplaceable.is_empty());
    for (id, u) in &r.unplaceable {
        assert!(r.placements.get(id).is_none());
        assert!(!u.reason.is_empty());
    }
    for (id, m) in &r.replaced {
        assert!(m.new.cpus.is_subset(&small.online), "{id}: {}", m.new.cpus);
        assert_ne!(m.old.cpus, m.new.cpus);
    }
    // Every domain index the engine holds exists on the small host.
    assert!(r
        .placements
        .confidential_domains()
        .iter()
        .all(|&d| d < small.l3_domains.len()));
    // An intent whose CPUs are gone names them.
    let gone = r
        .unplaceable
        .values()
        .find(|u| !u.missing.is_empty())
        .expect("one unplaceable intent lost its CPUs");
    assert!(gone.missing.is_disjoint(&small.online));
}

#[test]
fn smt_off_and_offline_cpus_replace_the_placements_that_used_them() {
    let topo = Topology::synthetic(1, 2, 4, 2, 1);
    let intents = placed(
        &topo,
        &[
            request("a", 2, ConfidentialClass::SevSnp),
            request("b", 2, ConfidentialClass::None),
        ],
    );
    // SMT off: every second thread (8-15) goes offline.
    let smt_off = topo.with_changes(&CpuSet::range(8, 15), &CpuSet::new(), true);
    let r = refit(&smt_off, &Reservations::default(), &intents);
    assert!(r.unplaceable.is_empty(), "{:?}", r.unplaceable);
    assert_eq!(r.replaced.len(), 2, "exclusive cores lost their siblings");
    for m in r.replaced.values() {
        assert!(m.new.cpus.is_subset(&smt_off.online));
        assert!(m.reason.contains("not online"), "{}", m.reason);
    }
    // One CPU of a's cores offline: only a moves.
    let a_cpu = intents[0]
        .engine
        .as_ref()
        .unwrap()
        .cpus
        .iter()
        .next()
        .unwrap();
    let one_off = topo.with_changes(&CpuSet::from_iter([a_cpu]), &CpuSet::new(), true);
    let r = refit(&one_off, &Reservations::default(), &intents);
    assert_eq!(
        r.replaced.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(
        r.placements.get(&intents[1].vm_id),
        intents[1].engine.as_ref()
    );
}

#[test]
fn a_numa_change_moves_placements_whose_nodes_changed() {
    let nps1 = Topology::synthetic(1, 4, 4, 2, 1);
    let nps4 = Topology::synthetic(1, 4, 4, 2, 4);
    // a fills domain 0 (node 0 either way); b lands in another domain,
    // node 0 under NPS1 and that domain's own node under NPS4.
    let intents = placed(
        &nps1,
        &[
            request("a", 8, ConfidentialClass::SevSnp),
            request("b", 4, ConfidentialClass::SevSnp),
        ],
    );
    let b_domains = &intents[1].engine.as_ref().unwrap().l3_domains;
    assert!(!b_domains.contains(&0), "{b_domains:?}");
    let r = refit(&nps4, &Reservations::default(), &intents);
    assert!(r.unplaceable.is_empty());
    // b is placed again: moved, or kept on its CPUs with new indices.
    let b = &intents[1].vm_id;
    let (b_new, b_reason) = match (r.replaced.get(b), r.reindexed.get(b)) {
        (Some(m), None) => (&m.new, &m.reason),
        (None, Some((p, why))) => (p, why),
        other => panic!("b neither moved nor re-indexed once: {other:?}"),
    };
    assert!(b_reason.contains("NUMA"), "{b_reason}");
    assert!(misfit(&nps4, b_new, &CpuSet::new()).is_none(), "{b_new:?}");
    assert_eq!(r.placements.get(b), Some(b_new));
    for (p, _) in r.reindexed.values() {
        assert!(misfit(&nps4, p, &CpuSet::new()).is_none(), "{p:?}");
        assert_eq!(r.placements.get(&p.vm_id), Some(p));
    }
    for m in r.replaced.values() {
        assert!(
            misfit(&nps4, &m.new, &CpuSet::new()).is_none(),
            "{:?}",
            m.new
        );
        assert_eq!(r.placements.get(&m.new.vm_id), Some(&m.new));
    }
}
