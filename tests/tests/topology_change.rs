//! A host whose topology changed under the agent's checkpoint, through the
//! real daemon on host-root fixtures: fewer CPUs and L3 domains across a
//! restart (2x96-core Genoa to 64-core Milan), a NUMA layout change
//! (NPS1 to NPS4) across a restart, and at run time CPUs going offline and
//! SMT turned off (the fixture's sysfs swapped under the running daemon).
//! A real CPU offline is not possible on the test host (no CPU hotplug in
//! the sandbox), so the fixtures stand for it. Every intent survives; each
//! placement either fits the new topology or is re-placed (an event with
//! old and new CPUs), or is kept UNPLACEABLE with its missing CPUs, a
//! condition and a metric.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sevplace_proto::v1 as pb;
use sevplace_tests::{metric_value, wait_until, Daemon};

type Client = pb::sevplace_service_client::SevplaceServiceClient<tonic::transport::Channel>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures")
        .join(name)
}

/// Makes `root/sys` a copy of the fixture's sysfs (replacing any), and an
/// empty `root/proc` (a host without VM processes).
fn install(root: &Path, name: &str) {
    let staged = root.join("sys.new");
    let _ = std::fs::remove_dir_all(&staged);
    let out = Command::new("cp")
        .arg("-a")
        .arg(fixture(name).join("sys"))
        .arg(&staged)
        .output()
        .expect("cp");
    assert!(out.status.success(), "{out:?}");
    let live = root.join("sys");
    if live.exists() {
        std::fs::rename(&live, root.join("sys.old")).unwrap();
    }
    std::fs::rename(&staged, &live).unwrap();
    let _ = std::fs::remove_dir_all(root.join("sys.old"));
    std::fs::create_dir_all(root.join("proc")).unwrap();
}

/// sevplaced on the host root `root`, its stderr kept; the state
/// directory's `sevplaced.toml`, when the test wrote one, is its config.
fn start(state: tempfile::TempDir, root: &Path) -> Daemon {
    Daemon::start_logged(state, &["--host-root", root.to_str().unwrap()])
}

fn place(c: &mut Client, rt: &tokio::runtime::Runtime, id: &str, vcpus: u32) -> pb::Vm {
    rt.block_on(c.place_vm(pb::PlaceVmRequest {
        vm_id: id.into(),
        vcpus,
        confidential_class: pb::ConfidentialClass::SevSnp as i32,
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("place {id}: {e:?}"))
    .into_inner()
    .vm
    .expect("vm")
}

fn vms(c: &mut Client, rt: &tokio::runtime::Runtime) -> Vec<pb::Vm> {
    let mut v = rt
        .block_on(c.list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        }))
        .expect("ListVms")
        .into_inner()
        .vms;
    v.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    v
}

fn host(c: &mut Client, rt: &tokio::runtime::Runtime) -> pb::Host {
    rt.block_on(c.get_host(pb::GetHostRequest {}))
        .expect("GetHost")
        .into_inner()
        .host
        .expect("host")
}

fn online(root: &Path) -> sevplace::CpuSet {
    let t = std::fs::read_to_string(root.join("sys/devices/system/cpu/online")).unwrap();
    sevplace::CpuSet::parse(t.trim()).unwrap()
}

/// Checks the invariants of a daemon on the topology at `root`: every
/// intent listed, each either placed on online CPUs or UNPLACEABLE with a
/// reason, no CPU of a dedicated VM given twice, the pool within the
/// host's domains, condition and metric naming the unplaceable ones.
/// Returns the ids of the unplaceable VMs.
fn check(
    c: &mut Client,
    rt: &tokio::runtime::Runtime,
    d: &Daemon,
    root: &Path,
    ids: &[String],
) -> Vec<String> {
    let on = online(root);
    let listed = vms(c, rt);
    assert_eq!(
        listed.iter().map(|v| v.vm_id.clone()).collect::<Vec<_>>(),
        ids,
        "no intent is dropped"
    );
    let mut used = sevplace::CpuSet::new();
    let mut unplaceable = Vec::new();
    for v in &listed {
        if v.state == pb::VmState::Unplaceable as i32 {
            assert!(v.placement.is_none(), "{}", v.vm_id);
            assert!(!v.unplaceable_reason.is_empty(), "{}", v.vm_id);
            unplaceable.push(v.vm_id.clone());
            continue;
        }
        let p = v
            .placement
            .as_ref()
            .unwrap_or_else(|| panic!("{} placed", v.vm_id));
        let cpus: sevplace::CpuSet = p.cpus.iter().copied().collect();
        assert!(cpus.is_subset(&on), "{}: {cpus} not within {on}", v.vm_id);
        assert!(used.is_disjoint(&cpus), "{}: {cpus} given twice", v.vm_id);
        used = used.union(&cpus);
    }
    let h = host(c, rt);
    let domains = h.topology.as_ref().expect("topology").l3_domains.len();
    assert!(
        h.confidential_pool_l3_domains
            .iter()
            .all(|&d| (d as usize) < domains),
        "pool {:?} on a host with {domains} L3 domains",
        h.confidential_pool_l3_domains
    );
    let cond = h
        .conditions
        .iter()
        .find(|c| c.r#type == pb::ConditionType::PlacementsUnplaceable as i32);
    match (&cond, unplaceable.is_empty()) {
        (None, true) => {}
        (Some(c), false) => {
            for id in &unplaceable {
                assert!(c.message.contains(id.as_str()), "{}", c.message);
            }
        }
        (c, _) => panic!("condition {c:?} with unplaceable {unplaceable:?}"),
    }
    assert_eq!(
        metric_value(&d.metrics_addr, "sevplace_vms_unplaceable"),
        Some(unplaceable.len() as f64)
    );
    unplaceable
}

#[test]
fn fewer_cpus_after_a_restart_keep_every_intent() {
    let root = tempfile::tempdir().unwrap();
    install(root.path(), "genoa-2x96-nps1");
    let d = start(tempfile::tempdir().unwrap(), root.path());
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    // 24 VMs of 16 vCPUs fill the 24 L3 domains of 16 CPUs.
    let ids: Vec<String> = (0..24).map(|i| format!("vm-{i:02}")).collect();
    for id in &ids {
        place(&mut c, &rt, id, 16);
    }
    assert_eq!(host(&mut c, &rt).confidential_pool_l3_domains.len(), 24);
    let state = d.kill9();

    // The same state on a 64-core Milan: 8 domains of 16 CPUs.
    install(root.path(), "milan-64c");
    let d = start(state, root.path());
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let unplaceable = check(&mut c, &rt, &d, root.path(), &ids);
    assert_eq!(unplaceable.len(), 16, "8 of 24 fit on 8 domains");
    assert_eq!(host(&mut c, &rt).confidential_pool_l3_domains.len(), 8);
    let gone = vms(&mut c, &rt)
        .into_iter()
        .find(|v| v.vm_id == unplaceable[0])
        .unwrap();
    assert!(
        gone.missing_cpus.iter().any(|&cpu| cpu >= 128),
        "missing CPUs {:?}",
        gone.missing_cpus
    );
    assert!(d.log().contains("unplaceable"), "a log line names it");
    // An unplaceable VM can be released; the condition follows.
    for id in &unplaceable {
        rt.block_on(c.release_vm(pb::ReleaseVmRequest { vm_id: id.clone() }))
            .expect("release unplaceable");
    }
    let kept: Vec<String> = ids
        .iter()
        .filter(|i| !unplaceable.contains(i))
        .cloned()
        .collect();
    assert!(check(&mut c, &rt, &d, root.path(), &kept).is_empty());
}

#[test]
fn a_numa_change_after_a_restart_re_places_the_moved_vms() {
    let root = tempfile::tempdir().unwrap();
    install(root.path(), "genoa-2x96-nps1");
    let d = start(tempfile::tempdir().unwrap(), root.path());
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("vm-{i}")).collect();
    for id in &ids {
        place(&mut c, &rt, id, 16);
    }
    let state = d.kill9();
    install(root.path(), "genoa-2x96-nps4");
    let d = start(state, root.path());
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    assert!(check(&mut c, &rt, &d, root.path(), &ids).is_empty());
    let log = d.log();
    assert!(
        log.contains("placement re-placed on the new topology") && log.contains("NUMA"),
        "the re-placement is logged"
    );
    // The placements' NUMA nodes are those of their domains now.
    let h = host(&mut c, &rt);
    let topo = h.topology.expect("topology");
    for v in vms(&mut c, &rt) {
        let p = v.placement.expect("placement");
        let mut want: Vec<u32> = p
            .l3_domains
            .iter()
            .map(|&d| topo.l3_domains[d as usize].numa_node)
            .collect();
        want.dedup();
        assert_eq!(p.numa_nodes, want, "{}", v.vm_id);
    }
}

/// Waits for a Replaced event of each of `ids` on `events`; returns the
/// old CPUs seen.
fn replaced_events(
    rt: &tokio::runtime::Runtime,
    events: &mut tonic::Streaming<pb::WatchEventsResponse>,
    want: usize,
) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    while out.len() < want {
        // The timer is made inside the runtime: `timeout` needs its reactor.
        let next = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), events.message()).await
        });
        let Ok(Ok(Some(m))) = next else {
            panic!("only {} of {want} re-placement events: {next:?}", out.len());
        };
        let e = m.event.expect("event");
        if let Some(pb::event::Kind::Replaced(r)) = e.kind {
            let new = r.placement.expect("placement").cpus;
            out.push((e.vm_id, r.old_cpus, new));
        }
    }
    out
}

#[test]
fn cpus_offline_and_smt_off_at_run_time_re_place_under_the_running_daemon() {
    let root = tempfile::tempdir().unwrap();
    install(root.path(), "rome-64c");
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        state.path().join("sevplaced.toml"),
        "[reconcile]\nperiod_ms = 100\n",
    )
    .unwrap();
    let d = start(state, root.path());
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let mut events = rt
        .block_on(c.watch_events(pb::WatchEventsRequest::default()))
        .expect("watch")
        .into_inner();
    // 4 VMs of 8 vCPUs fill 4 of the 16 L3 domains (4 cores x 2 threads).
    let ids: Vec<String> = (0..4).map(|i| format!("vm-{i}")).collect();
    for id in &ids {
        place(&mut c, &rt, id, 8);
    }
    let holder_of_5 = vms(&mut c, &rt)
        .into_iter()
        .find(|v| v.placement.as_ref().is_some_and(|p| p.cpus.contains(&5)))
        .map(|v| v.vm_id);

    // CPUs 5 and 70-71 go offline.
    install(root.path(), "rome-64c-offline");
    if let Some(holder) = &holder_of_5 {
        let seen = replaced_events(&rt, &mut events, 1);
        assert_eq!(&seen[0].0, holder);
        assert!(
            seen[0].1.contains(&5) && !seen[0].2.contains(&5),
            "{seen:?}"
        );
    }
    assert!(wait_until(Duration::from_secs(10), || {
        vms(&mut c, &rt).iter().all(|v| {
            v.placement
                .as_ref()
                .is_some_and(|p| !p.cpus.iter().any(|c| [5, 70, 71].contains(c)))
        })
    }));
    check(&mut c, &rt, &d, root.path(), &ids);

    // SMT off: the second threads (64-127) go offline; every VM held whole
    // cores with both threads, so every VM moves, and all still fit.
    install(root.path(), "rome-64c-smt-off");
    let seen = replaced_events(&rt, &mut events, ids.len());
    for (id, old, new) in &seen {
        assert!(old.iter().any(|&c| c >= 64), "{id}: {old:?}");
        assert!(new.iter().all(|&c| c < 64), "{id}: {new:?}");
    }
    assert!(wait_until(Duration::from_secs(10), || {
        check(&mut c, &rt, &d, root.path(), &ids).is_empty()
    }));
}
