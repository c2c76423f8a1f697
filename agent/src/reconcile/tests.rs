//! The core against a fake procfs: placement, idempotence, enforcement,
//! drift, exits, restart from the checkpoint, and a VM that exits while it
//! is pinned. Affinity writes go to the fake procfs, never to real threads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::events::{EventBus, EventKind};
use super::*;

use crate::cgroup::CgroupError;
use crate::cgroup::{Target, ThreadAffinity};
use crate::cpuset::CpuSet;
use crate::discovery::fake_procfs::{write_process, FakeProcess};
use crate::discovery::{DiscoveredVm, VmScanner};
use crate::kmod::ModuleReader;
use crate::metrics::Metrics;
use crate::placement::{self, Reservations};
use crate::state::{CheckpointStore, VmSelector};
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

/// Writes affinity into the fake procfs (so the next scan sees it), and
/// fails with `VmGone` for threads whose task directory is gone.
struct FakeAffinity {
    proc_root: PathBuf,
    calls: Mutex<Vec<(u32, CpuSet)>>,
}

fn task_dir(root: &Path, tid: u32) -> Option<PathBuf> {
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let t = e.path().join("task").join(tid.to_string());
        if t.exists() {
            return Some(t);
        }
    }
    None
}

impl ThreadAffinity for FakeAffinity {
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
        self.calls.lock().unwrap().push((tid, cpus.clone()));
        let Some(dir) = task_dir(&self.proc_root, tid) else {
            return Err(CgroupError::VmGone {
                target: Target::Syscall {
                    call: "sched_setaffinity",
                    tid,
                },
            });
        };
        let status = dir.join("status");
        let text = std::fs::read_to_string(&status).unwrap();
        let new: String = text
            .lines()
            .map(|l| {
                if l.starts_with("Cpus_allowed_list:") {
                    format!("Cpus_allowed_list:\t{cpus}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(status, new).unwrap();
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    affinity: Arc<FakeAffinity>,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        Self {
            affinity: Arc::new(FakeAffinity {
                proc_root: dir.path().join("proc"),
                calls: Mutex::new(Vec::new()),
            }),
            events: Arc::new(EventBus::new(256)),
            metrics: Arc::new(Metrics::new()),
            dir,
        }
    }

    fn proc(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    fn core(&self) -> Result<AgentCore, AgentError> {
        AgentCore::new(
            Arc::new(Topology::synthetic(1, 8, 8, 2, 1)),
            Reservations::default(),
            HostAccess {
                scanner: VmScanner::new(self.proc()),
                cgroups: None,
                module: ModuleReader::new(self.dir.path().join("sevflush")),
                affinity: self.affinity.clone(),
            },
            CheckpointStore::in_dir(self.dir.path().join("state")),
            self.metrics.clone(),
            self.events.clone(),
        )
    }

    fn add_vm(&self, pid: u32, vcpus: u32, sev: bool) {
        let mut args = vec!["qemu-system-x86_64", "-name", "guest=g1"];
        if sev {
            args.extend([
                "-object",
                "sev-guest,id=sev0,policy=0x1",
                "-machine",
                "q35,confidential-guest-support=sev0",
            ]);
        }
        write_process(&self.proc(), &FakeProcess::qemu_vm(pid, vcpus, &args)).unwrap();
    }

    fn scan(&self, core: &AgentCore) -> Vec<DiscoveredVm> {
        core.scanner().scan().unwrap()
    }
}

fn call(id: &str, pid: Option<u32>, vcpus: u32) -> PlaceCall {
    PlaceCall {
        vm_id: VmId::new(id).unwrap(),
        selector: pid.map(|pid| VmSelector::Process {
            pid,
            start_time: None,
        }),
        request: crate::state::PlacementRequest {
            vcpus,
            class: None,
            dedicated: true,
            numa_node: None,
        },
        validate_only: false,
    }
}

fn allowed(core: &AgentCore, f: &Fixture) -> Vec<(u32, CpuSet)> {
    f.scan(core)
        .iter()
        .flat_map(|v| v.vcpus.iter().map(|t| (t.index, t.cpus_allowed.clone())))
        .collect()
}

#[test]
fn place_classifies_pins_and_is_idempotent() {
    let f = Fixture::new();
    f.add_vm(100, 4, true);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    assert_eq!(core.view("pid-100").unwrap().state, VmState::Unmanaged);

    let v = core.place(call("vm-a", Some(100), 4)).unwrap();
    assert_eq!(v.class, Some(ConfidentialClass::Sev));
    assert_eq!(v.class_source, ClassSource::CommandLine);
    assert_eq!(v.state, VmState::Placed);
    let p = v.placement.clone().unwrap();
    assert_eq!(p.l3_domains.len(), 1, "4 vCPUs fit one L3 domain");
    for (index, set) in allowed(&core, &f) {
        assert_eq!(set, p.vcpu_cpus[index as usize], "vCPU {index}");
    }
    assert!(core.view("pid-100").is_none(), "the VM is managed now");

    // Same request: same answer, nothing written twice.
    let generation = core.checkpoint().generation;
    let again = core.place(call("vm-a", Some(100), 4)).unwrap();
    assert_eq!(again.placement, v.placement);
    assert_eq!(core.checkpoint().generation, generation);
    // Different request for the same id: a conflict.
    assert!(matches!(
        core.place(call("vm-a", Some(100), 2)),
        Err(AgentError::PlacedDifferently(_))
    ));
    // The checkpoint holds the intent with its placement.
    let stored = CheckpointStore::in_dir(f.dir.path().join("state"))
        .load()
        .unwrap();
    assert_eq!(stored.intents.len(), 1);
    assert_eq!(
        stored.intents[0].placement.as_ref().unwrap().vcpu_cpus,
        p.vcpu_cpus
    );
}

#[test]
fn an_orchestrator_id_pid_n_does_not_collide_with_an_unmanaged_vm() {
    let f = Fixture::new();
    f.add_vm(42, 2, false);
    f.add_vm(100, 2, false);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    let unmanaged = core.view("pid-42").unwrap();
    assert_eq!(unmanaged.key, crate::types::VmKey::Process(42));
    assert_eq!(unmanaged.pid, Some(42));

    // "pid-42" for process 100 would name two VMs: refused, nothing stored.
    match core.place(call("pid-42", Some(100), 2)) {
        Err(e @ AgentError::ReservedVmId(_)) => {
            let (field, reason) = e.field_violation().unwrap();
            assert_eq!(field, "vm_id");
            assert!(reason.contains("pid-<N>"), "{reason}")
        }
        other => panic!("expected vm_id refused, got {other:?}"),
    }
    assert!(core.checkpoint().intents.is_empty());
    assert_eq!(core.view("pid-42").unwrap().state, VmState::Unmanaged);
    assert_eq!(core.view("pid-100").unwrap().state, VmState::Unmanaged);

    // An id that only looks like one (not the canonical pid form) is a name.
    let v = core.place(call("pid-042", Some(100), 2)).unwrap();
    assert_eq!(v.key.to_string(), "pid-042");
    assert_eq!(v.pid, Some(100));
    assert_eq!(core.view("pid-42").unwrap().pid, Some(42));
    let keys: Vec<String> = core.views().iter().map(|v| v.key.to_string()).collect();
    assert_eq!(keys, ["pid-042", "pid-42"]);
}

#[test]
fn drift_is_corrected_and_reported() {
    let f = Fixture::new();
    f.add_vm(200, 2, true);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    let p = core
        .place(call("vm-d", Some(200), 2))
        .unwrap()
        .placement
        .unwrap();
    let mut rx = f.events.subscribe();
    // Someone moves vCPU 0 by hand.
    let tid0 = f.scan(&core)[0].vcpus[0].tid;
    f.affinity.set(tid0, &CpuSet::range(0, 127)).unwrap();
    let report = core.reconcile(f.scan(&core));
    assert_eq!(report.corrections, 1);
    for (index, set) in allowed(&core, &f) {
        assert_eq!(set, p.vcpu_cpus[index as usize]);
    }
    let ev = rx.try_recv().unwrap();
    match ev.kind {
        EventKind::Drift {
            reason,
            tid,
            observed,
            enforced,
        } => {
            assert_eq!(reason, events::DriftReason::ThreadMoved);
            assert_eq!(tid, tid0);
            assert_eq!(observed, CpuSet::range(0, 127));
            assert_eq!(enforced, p.vcpu_cpus[0]);
        }
        other => panic!("{other:?}"),
    }
    // Nothing more to do on the next pass.
    assert_eq!(core.reconcile(f.scan(&core)).corrections, 0);
}

#[test]
fn exit_releases_and_restart_restores() {
    let f = Fixture::new();
    f.add_vm(300, 2, true);
    f.add_vm(400, 2, false);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    let a = core
        .place(call("vm-a", Some(300), 2))
        .unwrap()
        .placement
        .unwrap();
    let b = core
        .place(call("vm-b", Some(400), 2))
        .unwrap()
        .placement
        .unwrap();
    assert!(a.cpus.is_disjoint(&b.cpus));
    // Pending: no process yet.
    let mut c = call("vm-c", None, 2);
    c.request.class = Some(ConfidentialClass::SevSnp);
    assert_eq!(core.place(c).unwrap().state, VmState::Pending);
    let cap_before = core.capacity();
    drop(core);

    // A restart restores all three exactly.
    let mut core = f.core().unwrap();
    assert_eq!(core.placements().get(&VmId::new("vm-a").unwrap()), Some(&a));
    assert_eq!(core.placements().len(), 3);
    assert_eq!(core.capacity(), cap_before);
    core.reconcile(f.scan(&core));
    assert_eq!(core.view("vm-b").unwrap().state, VmState::Placed);

    // vm-a exits: released, capacity returns.
    std::fs::remove_dir_all(f.proc().join("300")).unwrap();
    let report = core.reconcile(f.scan(&core));
    assert_eq!(report.released, vec!["vm-a".to_string()]);
    assert!(core.view("vm-a").is_none());
    assert!(core.placements().get(&VmId::new("vm-a").unwrap()).is_none());
    assert_eq!(core.checkpoint().intents.len(), 2);
    // The cached capacity follows the release.
    assert_ne!(core.capacity(), cap_before);
    assert_eq!(
        core.capacity(),
        placement::capacity(core.topology(), core.placements(), core.reservations())
    );
    // The pending one stays pending.
    assert_eq!(core.view("vm-c").unwrap().state, VmState::Pending);
}

#[test]
fn vm_exiting_mid_pin_is_a_clean_release() {
    let f = Fixture::new();
    f.add_vm(500, 2, true);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    // The vCPU threads exit between discovery and the pin: the pin meets
    // ESRCH, and the placement is released, not left half-applied.
    let vcpu_tid = f.scan(&core)[0].vcpus[1].tid;
    let mut call = call("vm-x", Some(500), 2);
    std::fs::remove_dir_all(f.proc().join(format!("500/task/{vcpu_tid}"))).unwrap();
    call.request.class = Some(ConfidentialClass::Sev);
    let r = core.place(call);
    // With the thread gone at inspect time, discovery still finds vCPU 0;
    // its pin succeeds, the process lives: the VM is placed and drifted
    // only if a pin failed. Either way no placement is half-applied.
    match r {
        Err(e @ AgentError::ExitedWhilePinning(_)) => {
            let m = e.to_string();
            assert!(m.contains("exited"), "{m}");
            assert!(core.placements().is_empty());
            assert!(core.checkpoint().intents.is_empty());
        }
        Ok(v) => {
            assert_eq!(v.threads.len(), 1, "only the live vCPU thread is seen");
            assert_eq!(core.checkpoint().intents.len(), 1);
        }
        Err(e) => panic!("{e}"),
    }
    // Now the whole process goes: the next pass releases cleanly, once.
    std::fs::remove_dir_all(f.proc().join("500")).unwrap();
    let report = core.reconcile(f.scan(&core));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(core.placements().is_empty());
    assert!(core.checkpoint().intents.is_empty());
    assert!(core.capacity().confidential_domains.is_empty());
    assert_eq!(core.reconcile(f.scan(&core)), PassReport::default());
}

#[test]
fn affinity_failing_with_esrch_releases_the_placement() {
    /// An affinity that reports every thread gone, as when a VM exits
    /// between the scan and the pin.
    struct AllGone;
    impl ThreadAffinity for AllGone {
        fn set(&self, tid: u32, _: &CpuSet) -> Result<(), CgroupError> {
            Err(CgroupError::VmGone {
                target: Target::Syscall {
                    call: "sched_setaffinity",
                    tid,
                },
            })
        }
    }
    let f = Fixture::new();
    f.add_vm(700, 2, true);
    let mut core = AgentCore::new(
        Arc::new(Topology::synthetic(1, 8, 8, 2, 1)),
        Reservations::default(),
        HostAccess {
            scanner: VmScanner::new(f.proc()),
            cgroups: None,
            module: ModuleReader::new(f.dir.path().join("no-module")),
            affinity: Arc::new(AllGone),
        },
        CheckpointStore::in_dir(f.dir.path().join("state")),
        Arc::new(Metrics::new()),
        f.events.clone(),
    )
    .unwrap();
    match core.place(call("vm-g", Some(700), 2)) {
        Err(e @ AgentError::ExitedWhilePinning(_)) => {
            let m = e.to_string();
            assert!(m.contains("exited"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(core.placements().is_empty());
    assert!(core.checkpoint().intents.is_empty());
    let stored = CheckpointStore::in_dir(f.dir.path().join("state"))
        .load()
        .unwrap();
    assert!(
        stored.intents.is_empty(),
        "the release reached the checkpoint"
    );
}

#[test]
fn invalid_requests_and_unknown_vms() {
    let f = Fixture::new();
    let mut core = f.core().unwrap();
    assert!(matches!(
        core.place(call("x", None, 0)),
        Err(AgentError::BadField { field: "vcpus", .. })
    ));
    assert!(matches!(
        core.place(call("x", None, 2)),
        Err(e) if e.field_violation().is_some_and(|(field, _)| field == "confidential_class")
    ));
    assert!(matches!(
        core.place(call("x", Some(999_999), 2)),
        Err(AgentError::NoSuchProcess { pid: 999_999 })
    ));
    let mut big = call("x", None, 10_000);
    big.request.class = Some(ConfidentialClass::Sev);
    assert!(matches!(core.place(big), Err(AgentError::Place(_))));
    assert!(matches!(
        core.release(&VmId::new("nope").unwrap()),
        Err(AgentError::NotPlaced(_))
    ));
    // validate_only changes nothing.
    let mut v = call("y", None, 4);
    v.request.class = Some(ConfidentialClass::SevEs);
    v.validate_only = true;
    let view = core.place(v).unwrap();
    assert_eq!(view.placement.unwrap().vcpu_cpus.len(), 4);
    assert!(core.placements().is_empty());
    assert_eq!(core.checkpoint().generation, 0);
}

#[test]
fn corrupt_checkpoint_stops_start_up() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.dir.path().join("state")).unwrap();
    std::fs::write(f.dir.path().join("state/checkpoint.json"), "{garbage").unwrap();
    match f.core() {
        Err(AgentError::Checkpoint(e)) => assert!(e.to_string().contains("corrupt"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a corrupt checkpoint was accepted"),
    }
}

#[test]
fn unwritable_checkpoint_changes_nothing() {
    let f = Fixture::new();
    f.add_vm(600, 2, true);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    // The state "directory" is a file: saving fails.
    std::fs::write(f.dir.path().join("state"), "not a dir").unwrap();
    assert!(matches!(
        core.place(call("vm-z", Some(600), 2)),
        Err(AgentError::Checkpoint(_))
    ));
    assert!(core.placements().is_empty());
    assert!(
        f.affinity.calls.lock().unwrap().is_empty(),
        "nothing pinned"
    );
    let text = f.metrics.encode_prometheus();
    assert!(text.contains("sevplace_condition{condition=\"checkpoint_write_failing\"} 1"));
    assert!(text.contains("sevplace_checkpoint_write_failures_total 1"));
    assert_eq!(
        core.conditions()[0].kind,
        crate::conditions::ConditionKind::CheckpointWriteFailing
    );
    // Writable again: the retried call succeeds and the condition clears.
    std::fs::remove_file(f.dir.path().join("state")).unwrap();
    core.place(call("vm-z", Some(600), 2)).unwrap();
    assert!(core.conditions().is_empty());
    assert!(f
        .metrics
        .encode_prometheus()
        .contains("sevplace_condition{condition=\"checkpoint_write_failing\"} 0"));
}

/// Decisions staged while the checkpoint cannot be written (a place of a
/// running VM, the release of a durable intent, a place that reuses the
/// released CPUs, an identical retry of the first) all fail with the
/// write's error when the group write fails; the engine is rolled back to
/// the durable checkpoint: nothing pinned, nothing published, no CPU given
/// twice. Once the store heals, the same calls succeed.
#[test]
fn a_failed_group_write_rolls_back_every_undurable_decision() {
    let f = Fixture::new();
    f.add_vm(700, 2, true);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    let mut pending = call("vm-a", None, 4);
    pending.request.class = Some(ConfidentialClass::None);
    let a = core.place(pending.clone()).unwrap().placement.unwrap();
    let durable = core.checkpoint().clone();
    let mut rx = f.events.subscribe();

    std::fs::remove_dir_all(f.dir.path().join("state")).unwrap();
    std::fs::write(f.dir.path().join("state"), "not a dir").unwrap();
    let log = core.log();
    let b = core.decide_place(call("vm-b", Some(700), 2));
    let release_a = core.decide_release(&VmId::new("vm-a").unwrap());
    let mut reuse = call("vm-c", None, 8);
    reuse.request.class = Some(ConfidentialClass::None);
    let c = core.decide_place(reuse.clone());
    let c_cpus = core
        .placements()
        .get(&VmId::new("vm-c").unwrap())
        .unwrap()
        .cpus
        .clone();
    assert!(
        !c_cpus.is_disjoint(&a.cpus),
        "vm-c was decided on vm-a's freed CPUs"
    );
    let retry_b = core.decide_place(call("vm-b", Some(700), 2));
    assert_eq!(core.checkpoint().generation, durable.generation + 3);

    let written: Vec<_> = [&b.ticket, &release_a.ticket, &c.ticket, &retry_b.ticket]
        .into_iter()
        .map(|t| log.wait(t))
        .collect();
    assert!(written.iter().all(Result::is_err), "{written:?}");
    let mut written = written.into_iter();
    let mut next = || written.next().unwrap();
    for r in [
        core.finish_place(b, next()).map(|_| ()),
        core.finish_release(release_a, next()).map(|_| ()),
        core.finish_place(c, next()).map(|_| ()),
        core.finish_place(retry_b, next()).map(|_| ()),
    ] {
        assert!(matches!(r, Err(AgentError::Checkpoint(_))), "{r:?}");
    }
    assert_eq!(*core.checkpoint(), durable);
    let placed: Vec<_> = core
        .placements()
        .iter()
        .map(|p| p.vm_id.to_string())
        .collect();
    assert_eq!(placed, ["vm-a"]);
    assert_eq!(core.placements().iter().next().unwrap().cpus, a.cpus);
    assert_eq!(core.view("pid-700").unwrap().state, VmState::Unmanaged);
    assert!(
        f.affinity.calls.lock().unwrap().is_empty(),
        "nothing pinned"
    );
    assert!(rx.try_recv().is_err(), "nothing published");
    let text = f.metrics.encode_prometheus();
    assert!(
        text.contains("sevplace_checkpoint_write_failures_total 1"),
        "{text}"
    );
    assert_eq!(
        core.conditions()[0].kind,
        crate::conditions::ConditionKind::CheckpointWriteFailing
    );

    std::fs::remove_file(f.dir.path().join("state")).unwrap();
    let vb = core.place(call("vm-b", Some(700), 2)).unwrap();
    assert_eq!(vb.state, VmState::Placed);
    assert!(
        !f.affinity.calls.lock().unwrap().is_empty(),
        "pinned once durable"
    );
    let vc = core.place(reuse).unwrap().placement.unwrap();
    assert!(vc.cpus.is_disjoint(&a.cpus), "vm-a still holds its CPUs");
    assert!(core.conditions().is_empty());
    let stored = CheckpointStore::in_dir(f.dir.path().join("state"))
        .load()
        .unwrap();
    let ids: Vec<_> = stored.intents.iter().map(|i| i.vm_id.to_string()).collect();
    assert_eq!(ids, ["vm-a", "vm-b", "vm-c"]);
}

/// A sevflush tree with one VM record.
fn write_module(root: &Path, id: u64, pid: u32, dirty: &str, flushes: u64) {
    use crate::kmod::fake_tree::{write_globals, write_record};
    write_globals(root, "targeted", [10 + flushes, 40, 2, 0, 0]).unwrap();
    write_record(root, id, pid, dirty, "0-7", flushes, flushes * 2).unwrap();
}

#[test]
fn module_records_feed_metrics_labels_and_disappear_with_the_vm() {
    let f = Fixture::new();
    f.add_vm(800, 2, true);
    let module = f.dir.path().join("sevflush");
    write_module(&module, 7, 800, "0-3", 5);
    let mut core = f.core().unwrap();
    core.reconcile(f.scan(&core));
    core.place(call("vm-m", Some(800), 2)).unwrap();
    core.reconcile(f.scan(&core));
    // The agent's classification reached the module.
    assert_eq!(
        std::fs::read_to_string(module.join("vms/7/confidential")).unwrap(),
        "sev\n"
    );
    let text = f.metrics.encode_prometheus();
    assert!(
        text.contains("sevplace_vm_dirty_cpus{vm=\"vm-m\",confidential=\"sev\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("sevplace_vm_flushes_total{vm=\"vm-m\",confidential=\"sev\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("sevplace_kmod_flushes_total{kind=\"targeted\"} 15"),
        "{text}"
    );
    assert!(text.contains("sevplace_kmod_loaded 1"), "{text}");
    assert!(
        text.contains("# TYPE sevplace_vm_flushes_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sevplace_vm_dirty_cpus gauge"),
        "{text}"
    );
    promtool_check_metrics(&text);
    // Counters follow the module; a module reload does not make them drop.
    write_module(&module, 7, 800, "0-1", 9);
    core.reconcile(f.scan(&core));
    let text = f.metrics.encode_prometheus();
    assert!(
        text.contains("sevplace_vm_flushes_total{vm=\"vm-m\",confidential=\"sev\"} 9"),
        "{text}"
    );
    assert!(
        text.contains("sevplace_vm_dirty_cpus{vm=\"vm-m\",confidential=\"sev\"} 2"),
        "{text}"
    );

    // The VM exits: every series of it goes.
    std::fs::remove_dir_all(f.proc().join("800")).unwrap();
    std::fs::remove_dir_all(module.join("vms/7")).unwrap();
    core.reconcile(f.scan(&core));
    let text = f.metrics.encode_prometheus();
    assert!(!text.contains("vm-m"), "{text}");

    // An ABI this agent does not know: reported, module features off.
    std::fs::write(module.join("abi_version"), "9\n").unwrap();
    core.reconcile(f.scan(&core));
    let text = f.metrics.encode_prometheus();
    assert!(text.contains("sevplace_kmod_loaded 0"), "{text}");
    assert!(text.contains("state=\"abi-mismatch\""), "{text}");
}

/// `promtool check metrics` on a scrape, when promtool is installed.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        crate::skip::skip(
            "promtool check metrics",
            "promtool",
            "promtool is not installed (apt install prometheus)",
        );
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An affinity that fails with a chosen errno until it is healed.
struct FailingAffinity {
    inner: Arc<FakeAffinity>,
    failing: Mutex<Option<i32>>,
}

impl ThreadAffinity for FailingAffinity {
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
        if let Some(errno) = *self.failing.lock().unwrap() {
            let e = std::io::Error::from_raw_os_error(errno);
            return Err(match errno {
                libc_errno::EACCES => CgroupError::Permission {
                    target: Target::Syscall {
                        call: "sched_setaffinity",
                        tid,
                    },
                    value: cpus.to_string(),
                    source: e,
                },
                libc_errno::EBUSY => CgroupError::Busy {
                    target: Target::Syscall {
                        call: "sched_setaffinity",
                        tid,
                    },
                    value: cpus.to_string(),
                    source: e,
                },
                libc_errno::ENOSPC => CgroupError::NoSpace {
                    target: Target::Syscall {
                        call: "sched_setaffinity",
                        tid,
                    },
                    value: cpus.to_string(),
                    source: e,
                },
                _ => CgroupError::InvalidSet {
                    target: Target::Syscall {
                        call: "sched_setaffinity",
                        tid,
                    },
                    value: cpus.to_string(),
                    reason: e.to_string(),
                },
            });
        }
        self.inner.set(tid, cpus)
    }
}

mod libc_errno {
    pub(crate) const EACCES: i32 = 13;
    pub(crate) const EBUSY: i32 = 16;
    pub(crate) const ENOSPC: i32 = 28;
    pub(crate) const EINVAL: i32 = 22;
}

#[test]
fn failing_pins_keep_the_intent_report_and_retry_with_backoff() {
    for errno in [
        libc_errno::EACCES,
        libc_errno::EBUSY,
        libc_errno::ENOSPC,
        libc_errno::EINVAL,
    ] {
        let f = Fixture::new();
        f.add_vm(950, 2, true);
        let failing = Arc::new(FailingAffinity {
            inner: f.affinity.clone(),
            failing: Mutex::new(Some(errno)),
        });
        let mut core = AgentCore::new(
            Arc::new(Topology::synthetic(1, 8, 8, 2, 1)),
            Reservations::default(),
            HostAccess {
                scanner: VmScanner::new(f.proc()),
                cgroups: None,
                module: ModuleReader::new(f.dir.path().join("sevflush")),
                affinity: failing.clone(),
            },
            CheckpointStore::in_dir(f.dir.path().join("state")),
            f.metrics.clone(),
            f.events.clone(),
        )
        .unwrap();
        core.reconcile(f.scan(&core));
        // The call is acknowledged: the intent is durable even though the
        // pin failed; the VM is reported drifted.
        let v = core.place(call("vm-f", Some(950), 2)).unwrap();
        assert_eq!(v.state, VmState::Drifted, "errno {errno}");
        assert_eq!(
            CheckpointStore::in_dir(f.dir.path().join("state"))
                .load()
                .unwrap()
                .intents
                .len(),
            1
        );
        let mut attempts = 0;
        let mut passes = 0;
        for _ in 0..8 {
            let r = core.reconcile(f.scan(&core));
            passes += 1;
            if !r.errors.is_empty() {
                attempts += 1;
            }
        }
        // Backoff: fewer attempts than passes, and never zero.
        assert!(
            attempts >= 1 && attempts < passes,
            "errno {errno}: {attempts} attempts in {passes} passes"
        );
        let text = f.metrics.encode_prometheus();
        assert!(text.contains("sevplace_vms_failing_pins 1"), "{text}");
        assert!(
            text.contains("sevplace_condition{condition=\"pins_failing\"} 1"),
            "{text}"
        );
        let raised = core.conditions();
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(
            raised[0].kind,
            crate::conditions::ConditionKind::PinsFailing
        );
        assert!(raised[0].message.contains("vm-f"), "{raised:?}");
        assert!(
            text.contains("sevplace_pin_failures_total{reason="),
            "{text}"
        );
        assert_eq!(core.view("vm-f").unwrap().state, VmState::Drifted);
        // Healed: the next attempt pins and the VM is placed; nothing was lost.
        *failing.failing.lock().unwrap() = None;
        let mut placed = false;
        for _ in 0..70 {
            core.reconcile(f.scan(&core));
            if core.view("vm-f").unwrap().state == VmState::Placed {
                placed = true;
                break;
            }
        }
        assert!(placed, "errno {errno}: never placed after healing");
        let p = core.view("vm-f").unwrap().placement.unwrap();
        for (index, set) in allowed(&core, &f) {
            assert_eq!(set, p.vcpu_cpus[index as usize]);
        }
        let text = f.metrics.encode_prometheus();
        assert!(text.contains("sevplace_vms_failing_pins 0"));
        assert!(text.contains("sevplace_condition{condition=\"pins_failing\"} 0"));
        assert!(core.conditions().is_empty());
    }
}

#[test]
fn scrubs_of_one_vm_are_spaced_by_the_interval() {
    use std::time::{Duration, Instant};
    let f = Fixture::new();
    let mut core = f.core().unwrap();
    core.set_scrub_min_interval(Duration::from_millis(1000));
    let a = VmId::new("vm-a").unwrap();
    let b = VmId::new("vm-b").unwrap();
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    // (vm, at, admitted or the wait)
    let table: [(&VmId, Instant, Result<(), Duration>); 5] = [
        (&a, ms(0), Ok(())),
        (&a, ms(400), Err(Duration::from_millis(600))),
        (&b, ms(400), Ok(())),
        (&a, ms(1000), Ok(())),
        (&b, ms(1399), Err(Duration::from_millis(1))),
    ];
    for (i, (vm, at, want)) in table.into_iter().enumerate() {
        assert_eq!(core.admit_scrub(vm, at), want, "row {i}");
    }
    core.set_scrub_min_interval(Duration::ZERO);
    assert_eq!(core.admit_scrub(&a, ms(1001)), Ok(()));
    assert_eq!(core.admit_scrub(&a, ms(1001)), Ok(()));
}

/// The file version 1 wrote (state/testdata/README.md: this fixture's
/// topology and VMs) restores the engine state it recorded, index for
/// index, from the decisions alone; the first commit writes version 2.
#[test]
fn a_version_1_checkpoint_restores_the_engine_it_recorded() {
    let f = Fixture::new();
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/state/testdata/checkpoint-v1.json"
    ))
    .unwrap();
    std::fs::create_dir_all(f.dir.path().join("state")).unwrap();
    let path = f.dir.path().join("state/checkpoint.json");
    std::fs::write(&path, &fixture).unwrap();
    let core = f.core().unwrap();
    let v1: serde_json::Value = serde_json::from_slice(&fixture).unwrap();
    let recorded = v1["payload"]["intents"].as_array().unwrap();
    assert_eq!(core.placements().len(), recorded.len());
    for old in recorded {
        let engine: placement::Placement = serde_json::from_value(old["engine"].clone()).unwrap();
        assert_eq!(
            core.placements().get(&engine.vm_id),
            Some(&engine),
            "{}",
            engine.vm_id
        );
    }
    // Loading recorded the L3 grouping version 1 lacked: saved as a
    // snapshot of the current version (a writer's first write).
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved["version"], crate::state::CHECKPOINT_VERSION);
    assert_eq!(saved["payload"]["intents"][0]["vm"]["process"], 200);
    assert_eq!(
        core.checkpoint(),
        &CheckpointStore::new(&path).load().unwrap()
    );
}

/// The decisions are checked against the topology on load: on a host
/// with half the CPUs, the confidential VMs on CPUs it lacks are placed
/// again or kept unplaceable, never dropped.
#[test]
fn a_checkpoint_from_a_larger_host_is_checked_against_this_one() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.dir.path().join("state")).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/state/testdata/checkpoint-v1.json"
        ),
        f.dir.path().join("state/checkpoint.json"),
    )
    .unwrap();
    let core = AgentCore::new(
        Arc::new(Topology::synthetic(1, 4, 8, 2, 1)),
        Reservations::default(),
        HostAccess {
            scanner: VmScanner::new(f.proc()),
            cgroups: None,
            module: ModuleReader::new(f.dir.path().join("sevflush")),
            affinity: f.affinity.clone(),
        },
        CheckpointStore::in_dir(f.dir.path().join("state")),
        f.metrics.clone(),
        f.events.clone(),
    )
    .unwrap();
    assert_eq!(core.checkpoint().intents.len(), 5, "none dropped");
    let online = core.topology().online.clone();
    for id in ["pid-200", "vm-a"] {
        let id = VmId::new(id).unwrap();
        let record = core
            .checkpoint()
            .get(&id)
            .unwrap()
            .placement
            .clone()
            .unwrap();
        // Re-placed on CPUs this host has (the recorded 56-58,120-122 are
        // beyond its 64).
        assert!(record.cpus.is_subset(&online), "{id}: {}", record.cpus);
        assert_eq!(core.placements().get(&id).unwrap().cpus, record.cpus);
    }
}
