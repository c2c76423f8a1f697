use std::collections::{BTreeMap, BTreeSet};

use super::tree::{self, Consumer, FlushMode, HostFacts, ProviderNames, SevSupport};
use super::{consumer_from_parts, ConsumerStore};
use crate::placement::{PlacementRequest, PlacementState, Reservations};
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

fn facts() -> HostFacts {
    HostFacts {
        host_name: "h1".into(),
        sev: SevSupport {
            sev: true,
            sev_es: true,
            sev_snp: false,
        },
        flush: FlushMode::Targeted,
    }
}

fn consumer(n: u8) -> Consumer {
    Consumer {
        uuid: format!("00000000-0000-0000-0000-0000000000{n:02x}"),
        project_id: "p".into(),
        user_id: "u".into(),
    }
}

fn request(id: &str, vcpus: u32, class: ConfidentialClass, dedicated: bool) -> PlacementRequest {
    PlacementRequest {
        vm_id: VmId::new(id).expect("vm id"),
        vcpus,
        class,
        dedicated,
        numa_preference: None,
    }
}

#[test]
fn invariant_usage_plus_reserved_is_what_the_agent_uses() {
    // 2 packages x 4 L3 x 4 cores x 2 threads, 2 NUMA nodes per package.
    let topo = Topology::synthetic(2, 4, 4, 2, 2);
    let res = Reservations {
        host: crate::CpuSet::parse("0").expect("cpulist"),
        ..Reservations::default()
    };
    let mut state = PlacementState::new();
    let mut consumers = BTreeMap::new();
    let reqs = [
        ("c1", 4, ConfidentialClass::Sev, true, Some(1)),
        ("c2", 2, ConfidentialClass::SevEs, true, None),
        ("g1", 6, ConfidentialClass::None, true, Some(2)),
        ("s1", 3, ConfidentialClass::None, false, Some(3)),
        ("big", 12, ConfidentialClass::Sev, true, Some(4)),
    ];
    for (id, vcpus, class, dedicated, c) in reqs {
        let r = request(id, vcpus, class, dedicated);
        state.place(&topo, &res, &r).expect("placed");
        if let Some(n) = c {
            consumers.insert(r.vm_id.clone(), consumer(n));
        }
    }
    let t = tree::desired(&facts(), &topo, &state, &res, &consumers);
    assert_eq!(t.l3.len(), 8);
    assert_eq!(t.numa.len(), 4);
    let mut in_use = res.host.clone();
    for p in state.iter() {
        in_use = in_use.union(&p.cpus);
    }
    for l3 in &t.l3 {
        let dom = &topo.l3_domains[l3.index];
        assert_eq!(l3.name, format!("h1_l3_{}", l3.index));
        assert_eq!(l3.total as usize, dom.cpus.len());
        let usage: u32 = t
            .allocations
            .values()
            .filter_map(|a| a.per_l3.get(&l3.index))
            .sum();
        assert_eq!(
            (usage + l3.reserved) as usize,
            in_use.intersection(&dom.cpus).len(),
            "domain {}",
            l3.index
        );
        let opened = state.iter().any(|p| p.l3_domains.contains(&l3.index));
        assert_eq!(l3.open_reserved, u32::from(opened));
    }
    // Exclusive VMs' consumers hold their CPUs; the shared VM's holds none.
    let of = |n: u8| &t.allocations[&consumer(n).uuid];
    assert_eq!(of(1).per_l3.values().sum::<u32>(), 4);
    assert_eq!(of(2).per_l3.values().sum::<u32>(), 6);
    assert!(of(3).per_l3.is_empty());
    assert_eq!(of(4).per_l3.values().sum::<u32>(), 12);
    assert!(of(4).per_l3.len() >= 2, "12 vCPUs span domains of 8 CPUs");
    // One pool trait each, confidential where the engine's pool is.
    let conf: BTreeSet<usize> = state.confidential_domains().into_iter().collect();
    for l3 in &t.l3 {
        let want = if conf.contains(&l3.index) {
            tree::POOL_CONFIDENTIAL
        } else if state.iter().any(|p| p.l3_domains.contains(&l3.index)) {
            tree::POOL_GENERAL
        } else {
            tree::POOL_EMPTY
        };
        assert_eq!(l3.pool_trait, want);
    }
}

#[test]
fn root_traits_follow_the_host_and_keep_others() {
    let t = tree::root_traits(&facts());
    assert!(t.contains(tree::MANAGED_TRAIT));
    assert!(t.contains(tree::SEV_TRAIT) && t.contains(tree::SEV_ES_TRAIT));
    assert!(!t.contains(tree::SEV_SNP_TRAIT));
    assert!(t.contains(tree::FLUSH_TARGETED));
    let nova: BTreeSet<String> = [
        "COMPUTE_NODE",
        "HW_CPU_X86_AVX2",
        tree::SEV_SNP_TRAIT,
        "CUSTOM_SEVPLACE_FLUSH_STOCK",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let merged = tree::merged_root_traits(&nova, &t);
    assert!(merged.contains("COMPUTE_NODE") && merged.contains("HW_CPU_X86_AVX2"));
    assert!(!merged.contains(tree::SEV_SNP_TRAIT));
    assert!(!merged.contains(tree::FLUSH_STOCK));
    assert!(merged.is_superset(&t));
}

#[test]
fn flush_mode_from_module() {
    assert_eq!(
        FlushMode::from_module(true, "targeted\n"),
        FlushMode::Targeted
    );
    assert_eq!(FlushMode::from_module(true, "observe"), FlushMode::Observe);
    assert_eq!(FlushMode::from_module(false, "targeted"), FlushMode::Stock);
}

#[test]
fn child_names_are_recognised_exactly() {
    let n = ProviderNames { host: "h1".into() };
    assert!(n.is_child("h1_numa0") && n.is_child("h1_l3_12"));
    assert!(!n.is_child("h1") && !n.is_child("h10_l3_1") && !n.is_child("h1_l3_x"));
    assert!(!n.is_child("h1_numa") && !n.is_child("h1_l3_"));
}

#[test]
fn consumer_validation() {
    let c = consumer_from_parts("0B5B3C6E-1111-2222-3333-444455556666", "p", "u").expect("valid");
    assert_eq!(c.uuid, "0b5b3c6e-1111-2222-3333-444455556666");
    assert_eq!(
        consumer_from_parts("not-a-uuid", "p", "u").unwrap_err().0,
        "placement_consumer.uuid"
    );
    assert_eq!(
        consumer_from_parts("0b5b3c6e-1111-2222-3333-444455556666", "", "u")
            .unwrap_err()
            .0,
        "placement_consumer.project_id"
    );
}

#[test]
fn consumer_store_survives_reload_and_retires_replaced_consumers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = VmId::new("vm1").expect("id");
    let mut s = ConsumerStore::load(dir.path()).expect("empty store");
    s.record(&vm, consumer(1)).expect("record");
    s.record(&vm, consumer(2)).expect("replace");
    let s2 = ConsumerStore::load(dir.path()).expect("reload");
    assert_eq!(s2.get(&vm), Some(&consumer(2)));
    assert_eq!(s2.retired(), &[consumer(1)]);
    let mut s2 = s2;
    s2.forget(&[consumer(1).uuid, consumer(2).uuid])
        .expect("forget");
    let s3 = ConsumerStore::load(dir.path()).expect("reload");
    assert!(s3.consumers().is_empty() && s3.retired().is_empty());
    std::fs::write(dir.path().join(super::consumers::FILE_NAME), "{garbage").expect("write");
    assert!(matches!(
        ConsumerStore::load(dir.path()),
        Err(super::ConsumerStoreError::Corrupt { .. })
    ));
}

#[test]
fn sev_support_read_from_kvm_amd_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("sev"), "Y\n").expect("write");
    std::fs::write(dir.path().join("sev_es"), "N\n").expect("write");
    let s = super::read_sev_support(dir.path());
    assert_eq!(
        s,
        SevSupport {
            sev: true,
            sev_es: false,
            sev_snp: false
        }
    );
}
