use std::path::PathBuf;

use proptest::prelude::*;

use super::occupancy::Occupancy;
use super::*;

fn fixture(name: &str) -> Topology {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join("sys");
    Topology::from_sysfs(&root).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn req(id: &str, vcpus: u32, class: &str, dedicated: bool) -> PlacementRequest {
    PlacementRequest {
        vm_id: VmId::new(id).unwrap(),
        vcpus,
        class: class.parse().unwrap(),
        dedicated,
        numa_preference: None,
    }
}

/// One step of a table: a request and what the placement must be.
struct Step {
    req: PlacementRequest,
    /// `Ok((cpus, l3 domains, shares_confidential_domain))` or `Err(())` for
    /// NotEnoughCapacity.
    want: Result<(&'static str, &'static [usize], bool), ()>,
}

fn ok(req: PlacementRequest, cpus: &'static str, l3: &'static [usize], mixed: bool) -> Step {
    Step {
        req,
        want: Ok((cpus, l3, mixed)),
    }
}

fn full(req: PlacementRequest) -> Step {
    Step { req, want: Err(()) }
}

fn run_table(name: &str, topo: &Topology, res: &Reservations, steps: Vec<Step>) {
    let mut state = PlacementState::new();
    for (i, s) in steps.into_iter().enumerate() {
        let got = state.place(topo, res, &s.req);
        match (s.want, got) {
            (Ok((cpus, l3, mixed)), Ok(p)) => {
                assert_eq!(p.cpus.to_string(), cpus, "{name} step {i} cpus");
                assert_eq!(p.l3_domains, l3, "{name} step {i} l3");
                assert_eq!(p.shares_confidential_domain, mixed, "{name} step {i} mixed");
                assert_eq!(p.vcpu_cpus.len(), s.req.vcpus as usize, "{name} step {i}");
            }
            (Err(()), Err(PlaceError::NotEnoughCapacity { .. })) => {}
            (want, got) => panic!("{name} step {i}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn milan_table() {
    let t = fixture("milan-64c");
    let res = Reservations::default();
    run_table(
        "milan",
        &t,
        &res,
        vec![
            // General VMs fill from the lowest domain, confidential from the highest.
            ok(req("a", 4, "none", true), "0-1,64-65", &[0], false),
            ok(req("b", 8, "sev", true), "56-59,120-123", &[7], false),
            // Domain 0 has 12 free CPUs: 16 goes to the next empty domain.
            ok(req("c", 16, "none", true), "8-15,72-79", &[1], false),
            // The pool domain still has room: no growth.
            ok(req("d", 8, "sev-es", true), "60-63,124-127", &[7], false),
            // Larger than a domain: two empty domains, pool grows downwards.
            ok(req("e", 32, "sev", true), "40-55,104-119", &[6, 5], false),
            // Shared general VM: best fit is domain 0; it floats over one core.
            ok(req("f", 2, "none", false), "2,66", &[0], false),
            // Domain 0 has 10 free CPUs left: 12 goes to the next empty domain.
            ok(req("g", 12, "none", true), "16-21,80-85", &[2], false),
            ok(req("h", 6, "none", false), "3-5,67-69", &[0], false),
            // Floating VMs share cores: 1 vCPU fills the half-used core first.
            ok(req("i", 1, "none", false), "6,70", &[0], false),
            ok(req("j", 1, "none", false), "6,70", &[0], false),
        ],
    );
}

#[test]
fn plain_floating_vms_take_free_threads_next_to_plain_dedicated_vms() {
    let t = fixture("milan-64c");
    let res = Reservations::default();
    run_table(
        "milan-odd",
        &t,
        &res,
        vec![
            // One whole core, then one thread of the next.
            ok(req("a", 3, "none", true), "0-1,64", &[0], false),
            // The free sibling of that thread before a free core.
            ok(req("b", 1, "none", false), "65", &[0], false),
            // That sibling is in b's set now: a dedicated VM takes a thread
            // of a free core instead.
            ok(req("c", 1, "none", true), "2", &[0], false),
            ok(req("d", 1, "none", false), "66", &[0], false),
            // Confidential VMs never float next to a plain VM's thread.
            ok(req("e", 1, "sev", false), "56,120", &[7], false),
        ],
    );
    // A thread left by a dedicated VM and in no floating set goes to the
    // next dedicated VM, though the core carries floating vCPUs.
    let mut state = PlacementState::new();
    let place = |state: &mut PlacementState, r| state.place(&t, &res, &r).unwrap().cpus.to_string();
    assert_eq!(place(&mut state, req("a", 1, "none", true)), "0");
    assert_eq!(place(&mut state, req("b", 1, "none", false)), "64");
    state.release(&VmId::new("a").unwrap());
    assert_eq!(place(&mut state, req("c", 1, "none", true)), "0");
    // Never to a confidential VM.
    state.release(&VmId::new("c").unwrap());
    assert_eq!(place(&mut state, req("d", 2, "sev", true)), "56,120");
    assert_eq!(place(&mut state, req("e", 2, "sev", false)), "57,121");
    let whole = Reservations {
        whole_cores_for_plain: true,
        ..Reservations::default()
    };
    run_table(
        "milan-odd-whole",
        &t,
        &whole,
        vec![
            ok(req("a", 3, "none", true), "0-1,64-65", &[0], false),
            ok(req("b", 1, "none", false), "2,66", &[0], false),
        ],
    );
}

#[test]
fn placement_json_uses_lower_camel_case() {
    let t = fixture("ci-host-2cpu");
    let p = place(
        &t,
        &PlacementState::new(),
        &Reservations::default(),
        &req("a", 1, "sev-es", true),
    )
    .unwrap();
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["vmId"], "a");
    assert_eq!(v["cpus"], "0");
    assert_eq!(v["vcpuCpus"][0], "0");
    assert_eq!(v["l3Domains"][0], 0);
    assert_eq!(v["pool"], "confidential");
    assert_eq!(v["sharesConfidentialDomain"], false);
    assert_eq!(v["request"]["class"], "sev-es");
    assert_eq!(v["request"]["numaPreference"], serde_json::Value::Null);
    let back: Placement = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}

#[test]
fn milan_vcpu_order_is_sibling_pairs() {
    let t = fixture("milan-64c");
    let p = place(
        &t,
        &PlacementState::new(),
        &Reservations::default(),
        &req("a", 3, "none", true),
    )
    .unwrap();
    let per: Vec<String> = p.vcpu_cpus.iter().map(|s| s.to_string()).collect();
    assert_eq!(per, ["0", "64", "1"]);
    // A plain VM holds one whole core and one thread; the sibling 65 stays
    // free for another plain VM.
    assert_eq!(p.cpus.to_string(), "0-1,64");
    assert!(p.exclusive);
    let mut state = PlacementState::new();
    state.apply(p).unwrap();
    let b = place(
        &t,
        &state,
        &Reservations::default(),
        &req("b", 1, "none", true),
    )
    .unwrap();
    assert_eq!(b.cpus.to_string(), "65");
    // A confidential VM never takes that thread: whole cores only.
    let c = place(
        &t,
        &state,
        &Reservations::default(),
        &req("c", 1, "sev", true),
    )
    .unwrap();
    assert!(c.cpus.is_disjoint(&CpuSet::parse("0-1,64-65").unwrap()));
    assert_eq!(c.cpus.len(), 2);
    // Whole cores for plain VMs too: the idle sibling belongs to the VM.
    let whole = Reservations {
        whole_cores_for_plain: true,
        ..Reservations::default()
    };
    let p = place(
        &t,
        &PlacementState::new(),
        &whole,
        &req("a", 3, "none", true),
    )
    .unwrap();
    let per: Vec<String> = p.vcpu_cpus.iter().map(|s| s.to_string()).collect();
    assert_eq!(per, ["0", "64", "1"]);
    assert_eq!(p.cpus.to_string(), "0-1,64-65");
}

#[test]
fn genoa_nps1_table() {
    let t = fixture("genoa-2x96-nps1");
    run_table(
        "genoa-nps1",
        &t,
        &Reservations::default(),
        vec![
            ok(req("a", 32, "none", true), "0-15,192-207", &[0, 1], false),
            // 12 domains per node: a 48-vCPU confidential VM takes three of node 1.
            ok(
                req("c", 48, "sev", true),
                "168-191,360-383",
                &[23, 22, 21],
                false,
            ),
            // The pool is full: it grows by the next domain.
            ok(
                req("d", 16, "sev-snp", false),
                "160-167,352-359",
                &[20],
                false,
            ),
        ],
    );
}

#[test]
fn genoa_nps4_numa_rules() {
    let t = fixture("genoa-2x96-nps4");
    let res = Reservations::default();
    let mut state = PlacementState::new();
    let mut r = req("a", 8, "none", true);
    r.numa_preference = Some(5);
    let p = state.place(&t, &res, &r).unwrap();
    assert_eq!(p.l3_domains, [15]);
    assert_eq!(p.numa_nodes, [5]);
    // Three domains of one node hold 48 vCPUs.
    let p = state.place(&t, &res, &req("b", 48, "sev", true)).unwrap();
    assert_eq!(p.numa_nodes, [7]);
    assert_eq!(p.l3_domains.len(), 3);
    assert!(!p.spans_numa_nodes());
    // 64 vCPUs need four domains: no node has them, so it spans nodes.
    let p = state.place(&t, &res, &req("c", 64, "sev", true)).unwrap();
    assert_eq!(p.l3_domains.len(), 4);
    assert!(p.spans_numa_nodes());
    // Unknown node.
    let mut r = req("d", 2, "none", true);
    r.numa_preference = Some(9);
    match place(&t, &state, &res, &r) {
        Err(PlaceError::InvalidRequest { field, .. }) => assert_eq!(field, "numa_preference"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rome_table() {
    let t = fixture("rome-64c");
    run_table(
        "rome",
        &t,
        &Reservations::default(),
        vec![
            // sev-snp always gets whole cores, even when shared: 3 vCPUs, 2 cores.
            ok(req("a", 3, "sev-snp", false), "60-61,124-125", &[15], false),
            ok(req("b", 4, "sev", true), "62-63,126-127", &[15], false),
            // Pool domain 15 is full; the pool grows into domain 14.
            ok(req("c", 2, "sev", true), "56,120", &[14], false),
            ok(req("d", 8, "none", true), "0-3,64-67", &[0], false),
        ],
    );
    let mut state = PlacementState::new();
    let p = state
        .place(&t, &Reservations::default(), &req("a", 3, "sev-snp", false))
        .unwrap();
    // Floating: every vCPU may use the VM's whole set.
    assert!(p.vcpu_cpus.iter().all(|s| *s == p.cpus));
}

#[test]
fn rome_offline_isolated_and_reserved() {
    let t = fixture("rome-64c-offline");
    let res = Reservations::default();
    run_table(
        "rome-offline",
        &t,
        &res,
        vec![
            // Best fit: domain 1 has 5 CPUs left after offlining; the
            // floating VM takes its two one-thread cores.
            ok(req("a", 2, "none", false), "6-7", &[1], false),
            ok(req("b", 2, "none", true), "4,68", &[1], false),
            // Dedicated VMs may use the isolated core 0; a plain one takes
            // a whole core and one thread of the next.
            ok(req("c", 3, "none", true), "0-1,64", &[0], false),
        ],
    );
    // Dedicated VMs may use isolated CPUs.
    let p = place(&t, &PlacementState::new(), &res, &req("d", 8, "none", true)).unwrap();
    assert_eq!(p.cpus.to_string(), "0-3,64-67");
    // A reserved CPU takes its whole core out of exclusive use.
    let res = Reservations {
        host: CpuSet::parse("1").unwrap(),
        ..Reservations::default()
    };
    let p = place(&t, &PlacementState::new(), &res, &req("d", 8, "none", true)).unwrap();
    assert_eq!(p.l3_domains, [2]);
    let p = place(
        &t,
        &PlacementState::new(),
        &res,
        &req("e", 2, "none", false),
    )
    .unwrap();
    // Floating: core 0 is isolated, CPU 1 reserved; the half-usable core
    // (65) is filled first.
    assert_eq!(p.cpus.to_string(), "2,65-66");
}

#[test]
fn ci_host_mixes_only_when_it_must() {
    let t = fixture("ci-host-2cpu");
    run_table(
        "ci-host",
        &t,
        &Reservations::default(),
        vec![
            ok(req("a", 1, "none", true), "0", &[0], false),
            ok(req("b", 1, "sev", true), "1", &[0], true),
            full(req("c", 1, "none", true)),
        ],
    );
    match place(
        &t,
        &PlacementState::new(),
        &Reservations::default(),
        &req("x", 3, "none", true),
    ) {
        Err(PlaceError::InvalidRequest { field, reason }) => {
            assert_eq!(field, "vcpus");
            assert!(reason.contains("2 online CPUs"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_and_idempotence() {
    let t = fixture("milan-64c");
    let res = Reservations::default();
    let mut state = PlacementState::new();
    match place(&t, &state, &res, &req("z", 0, "none", true)) {
        Err(PlaceError::InvalidRequest { field, .. }) => assert_eq!(field, "vcpus"),
        other => panic!("{other:?}"),
    }
    let a = state.place(&t, &res, &req("a", 8, "sev", true)).unwrap();
    assert_eq!(state.place(&t, &res, &req("a", 8, "sev", true)).unwrap(), a);
    assert_eq!(state.len(), 1);
    match state.place(&t, &res, &req("a", 4, "sev", true)) {
        Err(PlaceError::Conflict { vm_id, .. }) => assert_eq!(vm_id.as_str(), "a"),
        other => panic!("{other:?}"),
    }
    // Fill the host: 7 more 16-vCPU VMs fit (domain 7 has 8 left).
    for i in 0..7 {
        state
            .place(&t, &res, &req(&format!("g{i}"), 16, "none", true))
            .unwrap();
    }
    match state.place(&t, &res, &req("big", 16, "none", true)) {
        Err(e @ PlaceError::NotEnoughCapacity { .. }) => {
            let PlaceError::NotEnoughCapacity { free, .. } = &e else {
                unreachable!()
            };
            assert_eq!(free.confidential, 8);
            assert_eq!(free.general, 0);
            assert!(
                e.to_string().contains("16 dedicated vCPUs of class none"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Mixing as the last resort: 8 general vCPUs into the pool's domain.
    let p = state.place(&t, &res, &req("mix", 8, "none", true)).unwrap();
    assert!(p.shares_confidential_domain);
    // An overlapping apply is refused.
    let mut clash = a.clone();
    clash.vm_id = VmId::new("clash").unwrap();
    clash.request.vm_id = clash.vm_id.clone();
    assert!(matches!(
        state.apply(clash),
        Err(PlaceError::Conflict { .. })
    ));
}

#[test]
fn pool_shrinks_when_empty_and_release_restores() {
    let t = fixture("genoa-2x96-nps1");
    let res = Reservations::default();
    let mut state = PlacementState::new();
    let before = capacity(&t, &state, &res);
    state.place(&t, &res, &req("c", 8, "sev", true)).unwrap();
    state.place(&t, &res, &req("g", 8, "none", false)).unwrap();
    assert_eq!(state.confidential_domains(), [23]);
    let mid = capacity(&t, &state, &res);
    assert_eq!(mid.confidential_domains, [23]);
    assert_ne!(mid, before);
    state.release(&VmId::new("c").unwrap());
    state.release(&VmId::new("g").unwrap());
    assert!(state.confidential_domains().is_empty());
    assert_eq!(capacity(&t, &state, &res), before);
}

#[test]
fn capacity_counts_common_sizes() {
    let t = fixture("milan-64c");
    let res = Reservations::default();
    let mut state = PlacementState::new();
    let c = capacity(&t, &state, &res);
    let none = &c.classes[0];
    assert_eq!(none.class, ConfidentialClass::None);
    assert_eq!(none.free_cpus, 128);
    assert_eq!(none.largest_vm, 128);
    let counts: Vec<u32> = none.fits.iter().map(|f| f.count).collect();
    // Plain VMs share cores: a 1-vCPU VM takes one thread.
    assert_eq!(counts, [128, 64, 32, 16, 8, 4]);
    let whole = Reservations {
        whole_cores_for_plain: true,
        ..Reservations::default()
    };
    let c = capacity(&t, &state, &whole);
    let counts: Vec<u32> = c.classes[0].fits.iter().map(|f| f.count).collect();
    // Whole cores: a 1-vCPU VM takes a 2-thread core.
    assert_eq!(counts, [64, 64, 32, 16, 8, 4]);
    let sev: Vec<u32> = c.classes[1].fits.iter().map(|f| f.count).collect();
    assert_eq!(sev, [64, 64, 32, 16, 8, 4]);
    state.place(&t, &res, &req("c", 16, "sev", true)).unwrap();
    let c = capacity(&t, &state, &res);
    let sev = c
        .classes
        .iter()
        .find(|x| x.class == ConfidentialClass::Sev)
        .unwrap();
    let none = &c.classes[0];
    assert_eq!(sev.free_cpus, 112);
    assert_eq!(none.free_cpus, 112);
    assert_eq!(none.largest_vm, 112);
    assert_eq!(c.confidential_domains, [7]);
    assert_eq!(c.empty_domains, [0, 1, 2, 3, 4, 5, 6]);
}

// ---- properties ----

#[derive(Debug, Clone)]
enum Op {
    Place {
        vm: u8,
        vcpus: u32,
        class: u8,
        dedicated: bool,
        numa: Option<u32>,
    },
    Release(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..16, 1u32..=12, 0u8..4, any::<bool>(), proptest::option::weighted(0.2, 0u32..3))
            .prop_map(|(vm, vcpus, class, dedicated, numa)| Op::Place { vm, vcpus, class, dedicated, numa }),
        1 => (0u8..16).prop_map(Op::Release),
    ]
}

fn topology() -> impl Strategy<Value = (Topology, CpuSet)> {
    (
        (1u32..=2, 1u32..=5, 1u32..=4, 1u32..=2, 1u32..=2),
        proptest::collection::vec(0u32..80, 0..4),
        proptest::collection::vec(0u32..80, 0..6),
        proptest::collection::vec(0u32..80, 0..3),
        any::<bool>(),
    )
        .prop_map(
            |((p, l, c, t, n), reserved, offline, isolated, cache_info)| {
                let base = Topology::synthetic(p, l, c, t, n.min(l));
                // Offline some CPUs (never all), isolate some, and sometimes drop
                // the L3 entries, as real hosts and VMs do.
                let mut offline: CpuSet = offline
                    .into_iter()
                    .filter(|&x| base.online.contains(x))
                    .collect();
                if offline.len() == base.online.len() {
                    offline = CpuSet::new();
                }
                let isolated: CpuSet = isolated.into_iter().collect();
                let topo = base.with_changes(
                    &offline,
                    &isolated.intersection(&base.online.difference(&offline)),
                    cache_info,
                );
                let reserved: CpuSet = reserved
                    .into_iter()
                    .filter(|&x| topo.online.contains(x))
                    .collect();
                (topo, reserved)
            },
        )
}

fn request_of(
    op_vm: u8,
    vcpus: u32,
    class: u8,
    dedicated: bool,
    numa: Option<u32>,
) -> PlacementRequest {
    PlacementRequest {
        vm_id: VmId::new(format!("vm{op_vm}")).unwrap(),
        vcpus,
        class: ConfidentialClass::ALL[class as usize % 4],
        dedicated,
        numa_preference: numa,
    }
}

fn check_invariants(
    topo: &Topology,
    state: &PlacementState,
    res: &Reservations,
) -> Result<(), TestCaseError> {
    let all: Vec<&Placement> = state.iter().collect();
    for (i, a) in all.iter().enumerate() {
        prop_assert!(
            a.cpus.is_disjoint(&res.host),
            "{} uses reserved CPUs",
            a.vm_id
        );
        prop_assert_eq!(a.vcpu_cpus.len(), a.request.vcpus as usize);
        let whole = a.pool == Pool::Confidential || res.whole_cores_for_plain;
        if a.exclusive && whole {
            for c in a.cpus.iter() {
                let core = &topo.cores[topo.cpu(c).unwrap().core];
                prop_assert!(
                    core.cpus.is_subset(&a.cpus),
                    "{} splits core {}",
                    a.vm_id,
                    core.cpus
                );
            }
        }
        if a.request.dedicated {
            let distinct: CpuSet = a.vcpu_cpus.iter().fold(CpuSet::new(), |s, x| s.union(x));
            prop_assert_eq!(distinct.len(), a.vcpu_cpus.len());
            prop_assert!(a.vcpu_cpus.iter().all(|s| s.len() == 1));
        }
        for b in &all[i + 1..] {
            if a.exclusive || b.exclusive {
                prop_assert!(
                    a.cpus.is_disjoint(&b.cpus),
                    "{} and {} overlap",
                    a.vm_id,
                    b.vm_id
                );
            }
            // No physical core across the confidential boundary, none
            // between a whole-core VM and any other; an exclusive VM and a
            // floating one share a core only as plain VMs on threads of
            // their own.
            let cores_of = |p: &Placement| -> Vec<usize> {
                let mut v: Vec<usize> = p.cpus.iter().map(|c| topo.cpu(c).unwrap().core).collect();
                v.dedup();
                v
            };
            let (ca, cb) = (cores_of(a), cores_of(b));
            if ca.iter().any(|c| cb.contains(c)) {
                prop_assert_eq!(
                    a.pool,
                    b.pool,
                    "{} and {} share a core across pools",
                    &a.vm_id,
                    &b.vm_id
                );
                prop_assert!(
                    a.exclusive == b.exclusive || a.pool == Pool::General,
                    "{} and {} share a core, one floating, not plain",
                    &a.vm_id,
                    &b.vm_id
                );
                prop_assert!(
                    !a.exclusive || (a.pool == Pool::General && !res.whole_cores_for_plain),
                    "{} and {} share a whole-core VM's core",
                    a.vm_id,
                    b.vm_id
                );
            }
            let share = a.l3_domains.iter().any(|d| b.l3_domains.contains(d));
            if share && a.pool != b.pool {
                prop_assert!(
                    a.shares_confidential_domain || b.shares_confidential_domain,
                    "{} and {} share a domain across pools unreported",
                    a.vm_id,
                    b.vm_id
                );
            }
        }
    }
    // The incremental occupancy equals one rebuilt from the placements, and
    // so does the view decisions are made on.
    prop_assert_eq!(state.occupancy(), &Occupancy::rebuild(state.iter()));
    let rebuilt = PlacementState::from(PlacementsWire {
        placements: state.iter().map(|p| (p.vm_id.clone(), p.clone())).collect(),
    });
    prop_assert_eq!(
        select::view_digest(topo, state, res),
        select::view_digest(topo, &rebuilt, res)
    );
    // Floating load never exceeds a core's capacity (its threads no
    // exclusive VM holds).
    let held: CpuSet = all
        .iter()
        .filter(|p| p.exclusive)
        .fold(CpuSet::new(), |s, p| s.union(&p.cpus));
    for core in &topo.cores {
        let load: u32 = all
            .iter()
            .filter(|p| !p.exclusive)
            .flat_map(|p| p.cores.iter().zip(&p.vcpus_per_core))
            .filter(|(c, _)| **c == core.index)
            .map(|(_, n)| *n)
            .sum();
        let cap = crate::cpuset::count_u32(
            core.cpus
                .difference(&res.host)
                .difference(&topo.isolated)
                .difference(&held)
                .len(),
        ) * res.shared_vcpus_per_cpu;
        prop_assert!(load <= cap, "core {} load {load} > {cap}", core.index);
    }
    // Floating load never exceeds a domain's capacity.
    for d in &topo.l3_domains {
        let load: u32 = all
            .iter()
            .filter(|p| !p.exclusive)
            .flat_map(|p| p.l3_domains.iter().zip(&p.vcpus_per_domain))
            .filter(|(x, _)| **x == d.index)
            .map(|(_, n)| *n)
            .sum();
        let cap = crate::cpuset::count_u32(
            d.cpus
                .difference(&res.host)
                .difference(&topo.isolated)
                .len(),
        ) * res.shared_vcpus_per_cpu;
        prop_assert!(load <= cap, "domain {} load {load} > {cap}", d.index);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn placement_properties((topo, reserved) in topology(), ratio in 1u32..=3, whole in any::<bool>(), ops in proptest::collection::vec(op(), 1..40)) {
        let res = Reservations { host: reserved, shared_vcpus_per_cpu: ratio, whole_cores_for_plain: whole };
        let mut state = PlacementState::new();
        for op in ops {
            match op {
                Op::Place { vm, vcpus, class, dedicated, numa } => {
                    let r = request_of(vm, vcpus, class, dedicated, numa);
                    let first = place(&topo, &state, &res, &r);
                    // Determinism: the same inputs give the same output.
                    let second = place(&topo, &state.clone(), &res, &r);
                    prop_assert_eq!(&first, &second);
                    if let Ok(p) = first {
                        let before = capacity(&topo, &state, &res);
                        // The shortcuts in `capacity` decide as the plain
                        // probe loop does.
                        prop_assert_eq!(&before, &select::capacity_reference(&topo, &state, &res));
                        let already = state.get(&r.vm_id).is_some();
                        state.apply(p.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        // Idempotence.
                        prop_assert_eq!(place(&topo, &state, &res, &r), Ok(p.clone()));
                        if !already {
                            // Release restores capacity exactly, and placing
                            // again gives the same placement.
                            let mut probe = state.clone();
                            probe.release(&r.vm_id);
                            prop_assert_eq!(capacity(&topo, &probe, &res), before);
                            prop_assert_eq!(place(&topo, &probe, &res, &r), Ok(p));
                        }
                    }
                }
                Op::Release(vm) => {
                    state.release(&VmId::new(format!("vm{vm}")).unwrap());
                }
            }
            check_invariants(&topo, &state, &res)?;
        }
    }
}
