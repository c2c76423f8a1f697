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

/// Intents placed one after another by the engine on `topo`, with the
/// engine's placements.
fn placed(
    topo: &Topology,
    reqs: &[PlacementRequest],
) -> (Vec<std::sync::Arc<IntentRecord>>, Vec<Placement>) {
    let res = Reservations::default();
    let mut state = PlacementState::new();
    reqs.iter()
        .map(|r| {
            let p = state.place(topo, &res, r).unwrap();
            let intent = IntentRecord {
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
                placement: Some(PlacementRecord::of_placement(topo, &p, None)),
            };
            (std::sync::Arc::new(intent), p)
        })
        .unzip()
}

/// Whether `p` describes `topo`: the engine rebuilds it there unchanged.
fn describes(topo: &Topology, p: &Placement) -> bool {
    let record = PlacementRecord::of_placement(topo, p, None);
    placement::rebuild(
        topo,
        &PlacementState::new(),
        &Reservations::default(),
        &p.request,
        record.decided(),
    )
    .is_ok_and(|q| q.cpus == p.cpus && q.l3_domains == p.l3_domains && q.numa_nodes == p.numa_nodes)
        && p.numa_nodes
            == p.l3_domains
                .iter()
                .map(|&d| topo.l3_domains[d].numa)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
}

#[test]
fn the_same_topology_keeps_every_placement() {
    let topo = Topology::synthetic(2, 4, 4, 2, 1);
    let (intents, engine) = placed(
        &topo,
        &[
            request("a", 4, ConfidentialClass::SevSnp),
            request("b", 2, ConfidentialClass::None),
        ],
    );
    let r = refit(&topo, &Reservations::default(), &intents);
    assert!(r.replaced.is_empty() && r.unplaceable.is_empty());
    assert_eq!(r.placements.len(), 2);
    for (i, p) in intents.iter().zip(&engine) {
        assert_eq!(r.placements.get(&i.vm_id), Some(p));
    }
}

#[test]
fn plain_vms_on_shared_cores_keep_their_placement() {
    // Odd-sized plain VMs take single threads of cores they share; the same
    // topology keeps them where they are, beside a whole-core sev VM.
    let topo = Topology::synthetic(1, 2, 4, 2, 1);
    let (intents, engine) = placed(
        &topo,
        &[
            request("p1", 1, ConfidentialClass::None),
            request("p3", 3, ConfidentialClass::None),
            request("s", 2, ConfidentialClass::Sev),
        ],
    );
    let shared = engine.iter().any(|p| {
        p.cores
            .iter()
            .any(|&c| !topo.cores[c].cpus.is_subset(&p.cpus))
    });
    assert!(shared, "the engine gave some plain VM part of a core");
    let r = refit(&topo, &Reservations::default(), &intents);
    assert!(r.replaced.is_empty(), "{:?}", r.replaced);
    assert!(r.unplaceable.is_empty(), "{:?}", r.unplaceable);
    for (i, p) in intents.iter().zip(&engine) {
        assert_eq!(r.placements.get(&i.vm_id), Some(p));
    }
}

#[test]
fn fewer_cpus_move_what_fits_and_keep_the_rest_unplaceable() {
    // 2 packages x 4 L3 x 4 cores x 2 threads = 64 CPUs.
    let big = Topology::synthetic(2, 4, 4, 2, 1);
    let reqs: Vec<PlacementRequest> = (0..8)
        .map(|i| request(&format!("vm-{i}"), 8, ConfidentialClass::SevSnp))
        .collect();
    let (intents, _) = placed(&big, &reqs);
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
        assert_ne!(m.old_cpus, m.new.cpus);
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
    let (intents, engine) = placed(
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
    let a_cpu = engine[0].cpus.iter().next().unwrap();
    let one_off = topo.with_changes(&CpuSet::from_iter([a_cpu]), &CpuSet::new(), true);
    let r = refit(&one_off, &Reservations::default(), &intents);
    assert_eq!(
        r.replaced.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(r.placements.get(&intents[1].vm_id), Some(&engine[1]));
}

#[test]
fn a_numa_change_moves_placements_whose_nodes_changed() {
    let nps1 = Topology::synthetic(1, 4, 4, 2, 1);
    let nps4 = Topology::synthetic(1, 4, 4, 2, 4);
    // a fills domain 0 (node 0 either way); b lands in another domain,
    // node 0 under NPS1 and that domain's own node under NPS4.
    let (intents, engine) = placed(
        &nps1,
        &[
            request("a", 8, ConfidentialClass::SevSnp),
            request("b", 4, ConfidentialClass::SevSnp),
        ],
    );
    let b_domains = &engine[1].l3_domains;
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
    assert!(describes(&nps4, b_new), "{b_new:?}");
    assert_eq!(r.placements.get(b), Some(b_new));
    for (p, _) in r.reindexed.values() {
        assert!(describes(&nps4, p), "{p:?}");
        assert_eq!(r.placements.get(&p.vm_id), Some(p));
    }
    for m in r.replaced.values() {
        assert!(describes(&nps4, &m.new), "{:?}", m.new);
        assert_eq!(r.placements.get(&m.new.vm_id), Some(&m.new));
    }
}
