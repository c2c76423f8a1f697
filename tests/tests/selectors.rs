//! Selectors that could name the wrong VM, against the real daemon and real
//! KVM VMs (`kvm-guest-fixture`): two VMs in one parent cgroup (real v1
//! cpusets) and a selector naming the parent, two VMs with one guest name,
//! and a checkpoint restored while its selector names two VMs. Each is
//! FAILED_PRECONDITION naming the VMs (or the selectors_ambiguous
//! condition for a restored intent); nothing is pinned to a guess.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sevplace_proto::v1 as pb;
use sevplace_tests::{cpus_allowed, wait_until, Daemon, GuestVm};

type Client = pb::sevplace_service_client::SevplaceServiceClient<tonic::transport::Channel>;

fn request(vm_id: &str, selector: Option<pb::vm_selector::Selector>) -> pb::PlaceVmRequest {
    pb::PlaceVmRequest {
        vm_id: vm_id.into(),
        vcpus: 1,
        confidential_class: pb::ConfidentialClass::None as i32,
        shared: true,
        selector: selector.map(|s| pb::VmSelector { selector: Some(s) }),
        ..Default::default()
    }
}

fn daemon(dir: tempfile::TempDir) -> Daemon {
    Daemon::start_in(dir, &[], &[("SEVPLACE__RECONCILE__PERIOD_MS", "200")])
}

/// Waits until the daemon has seen every pid in `pids` (as any VM).
fn wait_seen(c: &mut Client, rt: &tokio::runtime::Runtime, pids: &[u32]) {
    assert!(
        wait_until(Duration::from_secs(10), || {
            rt.block_on(c.list_vms(pb::ListVmsRequest::default()))
                .is_ok_and(|r| {
                    let vms = r.into_inner().vms;
                    pids.iter().all(|p| vms.iter().any(|v| v.pid == *p))
                })
        }),
        "daemon never listed {pids:?}"
    );
}

fn get(c: &mut Client, rt: &tokio::runtime::Runtime, id: &str) -> pb::Vm {
    rt.block_on(c.get_vm(pb::GetVmRequest { vm_id: id.into() }))
        .expect("GetVm")
        .into_inner()
        .vm
        .expect("vm")
}

fn condition(c: &mut Client, rt: &tokio::runtime::Runtime, t: pb::ConditionType) -> Option<String> {
    rt.block_on(c.get_host(pb::GetHostRequest {}))
        .expect("GetHost")
        .into_inner()
        .host
        .expect("host")
        .conditions
        .into_iter()
        .find(|c| c.r#type == t as i32)
        .map(|c| c.message)
}

/// A cgroup v1 cpuset tree made by the test; on drop its tasks go back to
/// the root cpuset and its directories are removed, deepest first.
struct V1Tree {
    mount: PathBuf,
    dirs: Vec<PathBuf>,
}

impl V1Tree {
    fn mkdir(&mut self, dir: PathBuf) -> std::io::Result<()> {
        let cpus = std::fs::read_to_string(self.mount.join("cpuset.effective_cpus"))?;
        let mems = std::fs::read_to_string(self.mount.join("cpuset.effective_mems"))?;
        std::fs::create_dir(&dir)?;
        self.dirs.push(dir.clone());
        std::fs::write(dir.join("cpuset.mems"), mems.trim())?;
        std::fs::write(dir.join("cpuset.cpus"), cpus.trim())
    }

    /// Moves every thread of `pid` into `dir`.
    fn adopt(dir: &Path, pid: u32) {
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .flatten()
        {
            std::fs::write(dir.join("tasks"), e.file_name().as_encoded_bytes())
                .unwrap_or_else(|err| panic!("move thread to {}: {err}", dir.display()));
        }
    }
}

impl Drop for V1Tree {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if let Ok(tasks) = std::fs::read_to_string(dir.join("tasks")) {
                for t in tasks.lines() {
                    let _ = std::fs::write(self.mount.join("tasks"), t);
                }
            }
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("cleanup of {}: {e}", dir.display());
            }
        }
    }
}

#[test]
fn a_parent_cgroup_of_two_vms_is_refused_and_each_own_cgroup_places_one() {
    let test = "a_parent_cgroup_of_two_vms_is_refused_and_each_own_cgroup_places_one";
    let mount = PathBuf::from("/sys/fs/cgroup/cpuset");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: not root (moving threads between cpusets needs it)");
        return;
    }
    if !mount.join("cpuset.cpus").is_file() {
        eprintln!(
            "SKIP {test}: no cgroup v1 cpuset hierarchy at {}",
            mount.display()
        );
        return;
    }
    let mut tree = V1Tree {
        mount: mount.clone(),
        dirs: Vec::new(),
    };
    let name = format!("sevplace-sel-{}", std::process::id());
    let parent = mount.join(&name);
    tree.mkdir(parent.clone()).unwrap();
    tree.mkdir(parent.join("a")).unwrap();
    tree.mkdir(parent.join("b")).unwrap();
    let Some(a) = GuestVm::start(test, &["--vcpus", "1"]) else {
        return;
    };
    let Some(b) = GuestVm::start(test, &["--vcpus", "1"]) else {
        return;
    };
    V1Tree::adopt(&parent.join("a"), a.pid);
    V1Tree::adopt(&parent.join("b"), b.pid);

    let d = daemon(tempfile::tempdir().unwrap());
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    wait_seen(&mut c, &rt, &[a.pid, b.pid]);

    use pb::vm_selector::Selector::CgroupPath;
    // The parent holds both VMs: refused, naming both, nothing placed.
    for path in [format!("/{name}"), format!("/{name}/")] {
        let e = rt
            .block_on(c.place_vm(request("sel-parent", Some(CgroupPath(path.clone())))))
            .expect_err("a parent cgroup names no single VM");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{path}: {e:?}");
        let m = e.message();
        assert!(
            m.contains(&format!("pid {}", a.pid)) && m.contains(&format!("pid {}", b.pid)),
            "{m}"
        );
    }
    let e = rt
        .block_on(c.get_vm(pb::GetVmRequest {
            vm_id: "sel-parent".into(),
        }))
        .expect_err("nothing was placed");
    assert_eq!(e.code(), tonic::Code::NotFound);
    // The root cgroup and an empty path are invalid arguments.
    for path in ["/", ""] {
        let e = rt
            .block_on(c.place_vm(request("sel-root", Some(CgroupPath(path.into())))))
            .expect_err("root cgroup");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{path:?}: {e:?}");
        assert!(
            e.message().contains("selector.cgroup_path"),
            "{}",
            e.message()
        );
    }
    // Each VM's own cgroup names that VM, and it is pinned.
    rt.block_on(c.place_vm(request("sel-a", Some(CgroupPath(format!("/{name}/a"))))))
        .expect("own cgroup of a");
    rt.block_on(c.place_vm(request("sel-b", Some(CgroupPath(format!("/{name}/b"))))))
        .expect("own cgroup of b");
    for (id, vm) in [("sel-a", &a), ("sel-b", &b)] {
        let v = get(&mut c, &rt, id);
        assert_eq!(v.pid, vm.pid, "{id} is the VM in its own cgroup");
        let want: sevplace::CpuSet = v.placement.as_ref().expect("placement").vcpus[0]
            .cpus
            .iter()
            .copied()
            .collect();
        let tid = vm.vcpu_tid(0);
        assert!(
            wait_until(Duration::from_secs(5), || cpus_allowed(vm.pid, tid) == want),
            "{id}: vCPU 0 allowed {} not {want}",
            cpus_allowed(vm.pid, tid)
        );
    }
    // A selector naming a VM another intent holds is refused too.
    let e = rt
        .block_on(c.place_vm(request("sel-a2", Some(CgroupPath(format!("/{name}/a"))))))
        .expect_err("held by sel-a");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("sel-a"), "{}", e.message());
}

#[test]
fn two_vms_with_one_guest_name_are_refused_until_one_is_gone() {
    let test = "two_vms_with_one_guest_name_are_refused_until_one_is_gone";
    let guest = format!("twin-{}", std::process::id());
    let args = [
        "--vcpus",
        "1",
        "-name",
        &format!("guest={guest},debug-threads=on"),
    ];
    let Some(first) = GuestVm::start(test, &args) else {
        return;
    };
    let Some(second) = GuestVm::start(test, &args) else {
        return;
    };
    let d = daemon(tempfile::tempdir().unwrap());
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    wait_seen(&mut c, &rt, &[first.pid, second.pid]);

    // By name, explicitly or through the vm_id: both are refused, naming
    // both processes; no intent is stored.
    let by_name = pb::vm_selector::Selector::LibvirtDomain(guest.clone());
    for req in [
        request("twin-vm", Some(by_name.clone())),
        request(&guest, None),
    ] {
        let e = rt
            .block_on(c.place_vm(req))
            .expect_err("two VMs have this guest name");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        let m = e.message();
        assert!(m.contains("matches 2 VMs"), "{m}");
        for vm in [&first, &second] {
            assert!(m.contains(&format!("pid {}", vm.pid)), "{m}");
        }
    }
    let listed = rt
        .block_on(c.list_vms(pb::ListVmsRequest::default()))
        .unwrap()
        .into_inner()
        .vms;
    assert!(
        listed
            .iter()
            .all(|v| v.vm_id != "twin-vm" && v.vm_id != guest),
        "{listed:?}"
    );

    // Once one twin is gone the name names one VM.
    let survivor = second.pid;
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || {
        rt.block_on(c.place_vm(request("twin-vm", Some(by_name.clone()))))
            .is_ok()
    }));
    assert_eq!(get(&mut c, &rt, "twin-vm").pid, survivor);
    drop(second);
}

#[test]
fn a_restored_intent_whose_name_now_matches_two_vms_is_held_and_reported() {
    let test = "a_restored_intent_whose_name_now_matches_two_vms_is_held_and_reported";
    let guest = format!("restored-{}", std::process::id());
    let args = [
        "--vcpus",
        "1",
        "-name",
        &format!("guest={guest},debug-threads=on"),
    ];
    let Some(original) = GuestVm::start(test, &args) else {
        return;
    };
    let mut d = daemon(tempfile::tempdir().unwrap());
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    wait_seen(&mut c, &rt, &[original.pid]);
    rt.block_on(c.place_vm(request(&guest, None)))
        .expect("one VM has the name");
    let placed = get(&mut c, &rt, &guest);
    assert_eq!(placed.pid, original.pid);
    d.terminate(Duration::from_secs(10));
    drop(c);

    // While the agent is down a second VM with the same name starts.
    let Some(twin) = GuestVm::start(test, &args) else {
        return;
    };
    let twin_before = cpus_allowed(twin.pid, twin.vcpu_tid(0));
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    drop(d);
    let d = daemon(dir);
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let ambiguous = pb::ConditionType::SelectorsAmbiguous;
    assert!(
        wait_until(Duration::from_secs(10), || condition(
            &mut c, &rt, ambiguous
        )
        .is_some()),
        "selectors_ambiguous never raised"
    );
    let m = condition(&mut c, &rt, ambiguous).unwrap();
    assert!(m.contains(&guest), "{m}");
    for pid in [original.pid, twin.pid] {
        assert!(m.contains(&format!("pid {pid}")), "{m}");
    }
    // The intent is kept, pending, and neither VM was pinned by a guess.
    let v = get(&mut c, &rt, &guest);
    assert_eq!(v.state, pb::VmState::Pending as i32);
    assert_eq!(v.pid, 0);
    assert_eq!(cpus_allowed(twin.pid, twin.vcpu_tid(0)), twin_before);
    let series = "sevplace_condition{condition=\"selectors_ambiguous\"}";
    assert_eq!(
        sevplace_tests::metric_value(&d.metrics_addr, series),
        Some(1.0)
    );

    // The twin goes: the name names the original again, the intent is
    // applied to it and the condition clears.
    drop(twin);
    assert!(
        wait_until(Duration::from_secs(10), || {
            condition(&mut c, &rt, ambiguous).is_none()
                && get(&mut c, &rt, &guest).pid == original.pid
        }),
        "the intent never went back to the original VM"
    );
    assert_eq!(
        sevplace_tests::metric_value(&d.metrics_addr, series),
        Some(0.0)
    );
}
